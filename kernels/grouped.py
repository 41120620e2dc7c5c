"""Grouped LoRA for mixture-of-experts layers: each routed row gets its own expert's ``A_e`` and ``B_e``.

Rows. ``x [S, K]`` holds the routed (token, expert) pairs sorted by expert, as the model's grouped expert GEMM reads
them: expert ``e`` owns rows ``offsets[e] .. offsets[e + 1] - 1`` (``offsets [E + 1]`` int32, on the device). The
shrink and expand kernels walk a *tile list* built on the device from ``offsets`` without a host synchronisation
(``tile_list``): tile ``t`` is ``BLOCK_M`` rows of one expert, ``tile_expert[t]`` and ``tile_start[t]``. The list has a
fixed length, ``(S + E·(BLOCK_M - 1)) // BLOCK_M``, the most tiles ``S`` rows can need; tiles past the real count
carry expert ``-1`` and return at once. An expert with no rows has no tile, so it costs nothing. A tile never crosses
an expert, so each program runs tensor-core tiles against one ``A_e`` or ``B_e``.

Three kernels, each used in the forward and the backward:

- **grouped shrink** ``out[m] = scale · D(x[m]) · W_eᵀ`` with ``W_e = w[e] [R, K]``: the forward's ``xa = D(x)·A_eᵀ``
  (dropout on ``x``), the backward's ``dxa = s · dy·B_e`` (``w`` a strided view of ``B``). Writes fp32.
- **grouped expand** ``y[m] += D'(round(scale · u[m]) · V_eᵀ) + bias[e]`` with ``V_e = v[e] [N, R]``, adding into ``y`` in
  place: the forward's ``y += s·xa·B_eᵀ + b_e`` on the base GEMM's output, the backward's ``dx += D'(dxa·A_e)`` on the
  base GEMM's ``dy·W_e`` (``D'``: the forward's mask, regenerated). ``scale · u`` is rounded to the LoRA weights' dtype
  before the product, as the dense kernels round ``s·xa``. Each ``(row, column)`` belongs to exactly one program.
- **grouped wgrad** ``out[e] = scale · Σ_{m of e} u[m]ᵀ · D(v[m])``, ``u [S, R]``, ``v [S, H]``, ``out [E, R, H]`` with
  any strides: ``dA_e = dxa_eᵀ · D(x_e)`` and ``dB_eᵀ = s · xa_eᵀ · dy_e``, written straight into the gradients' own
  layout. One program owns one ``(expert, rank tile, hidden tile)`` and sums its expert's rows in order: no atomics,
  bitwise-deterministic. An expert with no rows writes zeros.

Dropout. The mask of row ``m`` (the sorted row) and column ``k`` is the dense layer's (``_common``), keyed on
``(seed, m, k)``; the backward regenerates it from the saved seed, so nothing of size ``S·K`` is kept. A token routed to
``top_k`` experts appears in ``top_k`` rows, each with its own mask, as ``top_k`` separate calls of a dense layer
would have.
"""

import torch
import triton
import triton.language as tl

from ._common import (
    GpuKernel,
    config_pruner,
    dot_precision,
    dropout_fits,
    dropout_tile,
    fits_in_smem,
    is_interpreting,
    launching,
    load_tile,
    mma,
    rank_tile,
    signed_threshold,
    store_tile,
)


def tile_rows(num_rows: int, num_experts: int, narrow: bool) -> int:
    """Rows per tile of the tile list: 16 when the experts get few rows each (decode), 32 or 64 as they fill up.
    ``narrow`` (dropout, or an fp32 operand) caps it at 32: there the 64-row tiles' wgmma were serialised by ptxas
    (advisory C7515: the mask's Philox rounds, or fp32 operands converted in registers) or spilled, and 32-row tiles
    run mma.sync, which nothing serialises; these kernels are bound by streaming the activations either way."""
    per_expert = num_rows / max(num_experts, 1)
    return 16 if per_expert <= 16 else 32 if per_expert <= 48 or narrow else 64


def tile_count(num_rows: int, num_experts: int, block_m: int) -> int:
    """Length of the tile list: the most ``block_m``-row tiles ``num_rows`` rows split among ``num_experts`` experts
    can need (each expert's last tile may be partial)."""
    return max((num_rows + num_experts * (block_m - 1)) // block_m, 1)


def tile_list(offsets: torch.Tensor, num_rows: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tile_expert, tile_start)``, int32 ``[tile_count]``, from ``offsets [E + 1]``: tile ``t`` covers rows
    ``tile_start[t] ..`` of expert ``tile_expert[t]`` (``-1`` past the real tiles). Built with device ops from
    ``offsets`` (no host synchronisation), so it can be captured in a CUDA graph."""
    E = offsets.numel() - 1
    offsets = offsets.to(torch.int64)
    counts = offsets[1:] - offsets[:-1]
    tiles = (counts + block_m - 1) // block_m
    last = torch.cumsum(tiles, 0)
    t = torch.arange(tile_count(num_rows, E, block_m), device=offsets.device)
    expert = torch.searchsorted(last, t, right=True)
    valid = expert < E
    expert = expert.clamp(max=E - 1)
    start = offsets[expert] + (t - (last[expert] - tiles[expert])) * block_m
    return torch.where(valid, expert, -1).to(torch.int32), start.to(torch.int32)


# --- grouped shrink -------------------------------------------------------------------------------------------------


def shrink_gpu_configs() -> list[triton.Config]:
    """Every config the autotuner may pick on a GPU (``BLOCK_M`` comes from the tile list)."""
    return [
        triton.Config({"BLOCK_K": bk}, num_warps=w, num_stages=s) for bk, w, s in [(64, 4, 4), (128, 4, 3), (128, 8, 3)]
    ]


def _shrink_configs():
    if is_interpreting():
        return [triton.Config({"BLOCK_K": 32}, num_warps=4, num_stages=1)]
    return shrink_gpu_configs()


def shrink_config_ok(
    config: triton.Config, act_bytes: int, lora_bytes: int, BLOCK_M: int, BLOCK_R: int, DROPOUT: bool, **_
) -> bool:
    """Whether the launcher may run ``config`` (shared memory; under dropout, the mask's registers)."""
    bk = config.kwargs["BLOCK_K"]
    if not fits_in_smem(config, bk * (BLOCK_M * act_bytes + BLOCK_R * lora_bytes)):
        return False
    if BLOCK_M >= 64 and (act_bytes == 4 or lora_bytes == 4):
        return False  # the tile list never runs 64-row tiles with fp32 operands (``tile_rows``)
    # x converted in registers (dropout, or 16-bit x for fp32 weights): beyond 32 elements per thread it spilled.
    converts = DROPOUT or act_bytes != lora_bytes
    return not converts or BLOCK_M * bk <= 32 * 32 * config.num_warps


@triton.autotune(
    configs=_shrink_configs(),
    key=["K", "R", "BLOCK_M", "DROPOUT"],
    prune_configs_by={"early_config_prune": config_pruner(shrink_config_ok, "x_ptr", "w_ptr")},
)
@triton.jit
def _grouped_shrink_kernel(
    # pointers
    x_ptr,  # [S, K], rows sorted by expert
    w_ptr,  # [E, R, K]
    out_ptr,  # [S, R] fp32
    tile_expert_ptr,  # [T] int32, -1 past the real tiles
    tile_start_ptr,  # [T] int32
    offsets_ptr,  # [E + 1] int32
    seed_ptr,  # [1] int64, read only with DROPOUT
    # sizes
    K,
    R,
    # strides
    stride_xm,
    stride_xk,
    stride_we,
    stride_wr,
    stride_wk,
    stride_om,
    stride_or,
    # scalars
    scale,
    threshold,
    keep_scale,
    # meta-parameters
    DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    expert = tl.load(tile_expert_ptr + tl.program_id(0))
    if expert < 0:
        return
    start = tl.load(tile_start_ptr + tl.program_id(0))
    end = tl.load(offsets_ptr + expert + 1)
    offs_m = start + tl.arange(0, BLOCK_M)
    mask_m = offs_m < end
    rows = offs_m.to(tl.int64)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    w_e = w_ptr + expert.to(tl.int64) * stride_we
    if DROPOUT:
        seed = tl.load(seed_ptr)

    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = load_tile(x_ptr, rows, offs_k, stride_xm, stride_xk, mask_m, mask_k)
        w = load_tile(w_e, offs_k, offs_r, stride_wk, stride_wr, mask_k, mask_r)
        if DROPOUT:
            x = dropout_tile(x, seed, offs_m, offs_k, threshold, keep_scale).to(x.dtype)
        acc = mma(acc, x, w, UPCAST, PRECISION)

    store_tile(out_ptr, acc * scale, rows, offs_r, stride_om, stride_or, mask_m, mask_r)


def grouped_shrink(
    x: torch.Tensor,
    w: torch.Tensor,
    offsets: torch.Tensor,
    tiles: tuple[torch.Tensor, torch.Tensor],
    block_m: int,
    scale: float = 1.0,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out[m] = scale · D(x[m]) · w[e(m)]ᵀ`` for ``x [S, K]`` sorted by expert and ``w [E, R, K]`` with any strides;
    returns ``[S, R]`` fp32. ``tiles``: ``tile_list(offsets, S, block_m)``."""
    S, K = x.shape
    E, R, K2 = w.shape
    assert K == K2, f"grouped shrink: x has K={K} but w has {K2} columns"
    out = torch.empty((S, R), device=x.device, dtype=torch.float32)
    if S == 0:
        return out
    dropout = dropout_p > 0.0
    BLOCK_R = rank_tile(R)
    grid = (tiles[0].numel(), triton.cdiv(R, BLOCK_R))
    with launching("grouped_shrink", x, w, out):
        _grouped_shrink_kernel[grid](
            x, w, out, tiles[0], tiles[1], offsets, seed if dropout else offsets,
            K, R,
            x.stride(0), x.stride(1), w.stride(0), w.stride(1), w.stride(2), out.stride(0), out.stride(1),
            scale, signed_threshold(dropout_p), 1.0 / (1.0 - dropout_p),
            DROPOUT=dropout,
            UPCAST=is_interpreting(),
            PRECISION=dot_precision(x.dtype, w.dtype),
            BLOCK_M=block_m,
            BLOCK_R=BLOCK_R,
        )  # fmt: skip
    return out


# --- grouped expand -------------------------------------------------------------------------------------------------


def expand_gpu_configs() -> list[triton.Config]:
    """Every config the autotuner may pick on a GPU (``BLOCK_M`` comes from the tile list)."""
    return [
        triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s) for bn, w, s in [(64, 4, 2), (128, 8, 2), (256, 8, 2)]
    ]


def _expand_configs():
    if is_interpreting():
        return [triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=1)]
    return expand_gpu_configs()


def expand_config_ok(
    config: triton.Config, act_bytes: int, lora_bytes: int, BLOCK_M: int, BLOCK_R: int, DROPOUT: bool, **_
) -> bool:
    """Whether the launcher may run ``config`` (shared memory; under dropout, the mask's registers)."""
    bn = config.kwargs["BLOCK_N"]
    if not fits_in_smem(config, BLOCK_R * (BLOCK_M * 4 + bn * lora_bytes)):
        return False
    if BLOCK_M >= 64 and (act_bytes == 4 or lora_bytes == 4):
        return False  # the tile list never runs 64-row tiles with fp32 operands (``tile_rows``)
    # The accumulator, the y tile it is added to and (under dropout) the mask share the registers.
    if BLOCK_M * bn > 32 * 32 * config.num_warps * (1 if DROPOUT else 2):
        return False
    return True


@triton.autotune(
    configs=_expand_configs(),
    key=["N", "R", "BLOCK_M", "DROPOUT", "HAS_BIAS"],
    prune_configs_by={"early_config_prune": config_pruner(expand_config_ok, "y_ptr", "v_ptr")},
    # The kernel adds into y: every timed launch of the tuner would add the LoRA term again.
    restore_value=["y_ptr"],
)
@triton.jit
def _grouped_expand_kernel(
    # pointers
    u_ptr,  # [S, R] fp32
    v_ptr,  # [E, N, R]
    y_ptr,  # [S, N], added into
    bias_ptr,  # [E, N], read only with HAS_BIAS
    tile_expert_ptr,  # [T] int32, -1 past the real tiles
    tile_start_ptr,  # [T] int32
    offsets_ptr,  # [E + 1] int32
    seed_ptr,  # [1] int64, read only with DROPOUT
    # sizes
    N,
    R,
    # strides
    stride_um,
    stride_ur,
    stride_ve,
    stride_vn,
    stride_vr,
    stride_ym,
    stride_yn,
    stride_be,
    stride_bn,
    # scalars
    scale,
    threshold,
    keep_scale,
    # meta-parameters
    HAS_BIAS: tl.constexpr,
    DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    expert = tl.load(tile_expert_ptr + tl.program_id(0))
    if expert < 0:
        return
    start = tl.load(tile_start_ptr + tl.program_id(0))
    end = tl.load(offsets_ptr + expert + 1)
    offs_m = start + tl.arange(0, BLOCK_M)
    mask_m = offs_m < end
    rows = offs_m.to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    expert = expert.to(tl.int64)
    v_e = v_ptr + expert * stride_ve

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        u = load_tile(u_ptr, rows, offs_r, stride_um, stride_ur, mask_m, mask_r)
        v = load_tile(v_e, offs_r, offs_n, stride_vr, stride_vn, mask_r, mask_n)
        acc = mma(acc, (u * scale).to(v.dtype), v, UPCAST, PRECISION)
    if DROPOUT:
        acc = dropout_tile(acc, tl.load(seed_ptr), offs_m, offs_n, threshold, keep_scale)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + expert * stride_be + offs_n * stride_bn, mask=mask_n, other=0.0).to(tl.float32)[
            None, :
        ]
    acc += load_tile(y_ptr, rows, offs_n, stride_ym, stride_yn, mask_m, mask_n).to(tl.float32)
    store_tile(y_ptr, acc, rows, offs_n, stride_ym, stride_yn, mask_m, mask_n)


def grouped_expand_(
    y: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    offsets: torch.Tensor,
    tiles: tuple[torch.Tensor, torch.Tensor],
    block_m: int,
    scale: float = 1.0,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y[m] += D'(round(scale · u[m]) · v[e(m)]ᵀ) + bias[e(m)]`` in place, for ``y [S, N]``, ``u [S, R]`` (fp32),
    ``v [E, N, R]`` and ``bias [E, N]`` with any strides; returns ``y``."""
    S, N = y.shape
    E, N2, R = v.shape
    assert N == N2 and u.shape == (S, R), f"grouped expand: y {tuple(y.shape)}, u {tuple(u.shape)}, v {tuple(v.shape)}"
    if S == 0:
        return y
    dropout = dropout_p > 0.0
    BLOCK_R = rank_tile(R)

    def grid(meta):
        return (tiles[0].numel(), triton.cdiv(N, meta["BLOCK_N"]))

    has_bias = bias is not None
    with launching("grouped_expand", y, u, v, bias, y):
        _grouped_expand_kernel[grid](
            u, v, y, bias if has_bias else y, tiles[0], tiles[1], offsets, seed if dropout else offsets,
            N, R,
            u.stride(0), u.stride(1), v.stride(0), v.stride(1), v.stride(2), y.stride(0), y.stride(1),
            bias.stride(0) if has_bias else 0, bias.stride(1) if has_bias else 0,
            scale, signed_threshold(dropout_p), 1.0 / (1.0 - dropout_p),
            HAS_BIAS=has_bias,
            DROPOUT=dropout,
            UPCAST=is_interpreting(),
            PRECISION=dot_precision(v.dtype),
            BLOCK_M=block_m,
            BLOCK_R=BLOCK_R,
        )  # fmt: skip
    return y


# --- grouped wgrad --------------------------------------------------------------------------------------------------


def wgrad_gpu_configs() -> list[triton.Config]:
    """Every config the autotuner may pick on a GPU."""
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_H": bh}, num_warps=w, num_stages=s)
        for bm, bh, w, s in [(32, 64, 4, 4), (64, 128, 8, 3), (32, 128, 8, 3)]
    ]


def _wgrad_configs():
    if is_interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_H": 32}, num_warps=4, num_stages=1)]
    return wgrad_gpu_configs()


def wgrad_config_ok(config: triton.Config, act_bytes: int, lora_bytes: int, BLOCK_R: int, DROPOUT: bool, **_) -> bool:
    """Whether the launcher may run ``config`` (shared memory; under dropout, the mask's registers)."""
    kw = config.kwargs
    if not fits_in_smem(config, kw["BLOCK_M"] * (kw["BLOCK_H"] * act_bytes + BLOCK_R * 4)):
        return False
    # The mask of a 64x128 tile at 8 warps (32 elements per thread, within ``dropout_fits``) spilled 8 B on sm_80.
    return not DROPOUT or (dropout_fits(config, kw["BLOCK_M"], kw["BLOCK_H"]) and kw["BLOCK_M"] * kw["BLOCK_H"] <= 4096)


@triton.autotune(
    configs=_wgrad_configs(),
    key=["H", "R", "DROPOUT"],
    prune_configs_by={"early_config_prune": config_pruner(wgrad_config_ok, "v_ptr", "out_ptr")},
)
@triton.jit
def _grouped_wgrad_kernel(
    # pointers
    u_ptr,  # [S, R]
    v_ptr,  # [S, H]
    out_ptr,  # [E, R, H]
    offsets_ptr,  # [E + 1] int32
    seed_ptr,  # [1] int64, read only with DROPOUT
    # sizes
    R,
    H,
    # strides
    stride_um,
    stride_ur,
    stride_vm,
    stride_vh,
    stride_oe,
    stride_or,
    stride_oh,
    # scalars
    scale,
    threshold,
    keep_scale,
    # meta-parameters
    DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    expert = tl.program_id(0)
    tiles_h = tl.cdiv(H, BLOCK_H)
    offs_r = (tl.program_id(1) // tiles_h) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_h = (tl.program_id(1) % tiles_h) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_r = offs_r < R
    mask_h = offs_h < H
    start = tl.load(offsets_ptr + expert)
    count = tl.load(offsets_ptr + expert + 1) - start
    # Offsets count from the expert's first row, and the loop runs at least once (a fully masked step when the expert
    # has no rows): the accumulator reaching the store is the MMAs' own, which keeps ptxas from serialising them.
    u_e = u_ptr + start.to(tl.int64) * stride_um
    v_e = v_ptr + start.to(tl.int64) * stride_vm
    if DROPOUT:
        seed = tl.load(seed_ptr)

    acc = tl.zeros((BLOCK_R, BLOCK_H), dtype=tl.float32)
    for m0 in range(0, tl.maximum(count, 1), BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < count
        rows = offs_m.to(tl.int64)
        u = load_tile(u_e, offs_r, rows, stride_ur, stride_um, mask_r, mask_m)
        v = load_tile(v_e, rows, offs_h, stride_vm, stride_vh, mask_m, mask_h)
        if DROPOUT:
            v = dropout_tile(v, seed, start + offs_m, offs_h, threshold, keep_scale).to(v.dtype)
        acc = mma(acc, u, v, UPCAST, PRECISION)

    out_e = out_ptr + expert.to(tl.int64) * stride_oe
    store_tile(out_e, acc * scale, offs_r, offs_h, stride_or, stride_oh, mask_r, mask_h)


def grouped_wgrad(
    u: torch.Tensor,
    v: torch.Tensor,
    offsets: torch.Tensor,
    out: torch.Tensor,
    scale: float = 1.0,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out[e] = scale · Σ_{m of e} u[m]ᵀ · D(v[m])`` for ``u [S, R]``, ``v [S, H]`` sorted by expert and
    ``out [E, R, H]`` with any strides (written, not added to); returns ``out``."""
    S, R = u.shape
    S2, H = v.shape
    E = offsets.numel() - 1
    assert S == S2 and out.shape == (E, R, H), f"grouped wgrad: u {tuple(u.shape)}, v {tuple(v.shape)}, out {out.shape}"
    dropout = dropout_p > 0.0
    BLOCK_R = rank_tile(R)

    def grid(meta):
        return (E, triton.cdiv(R, BLOCK_R) * triton.cdiv(H, meta["BLOCK_H"]))

    with launching("grouped_wgrad", u, v, out):
        _grouped_wgrad_kernel[grid](
            u, v, out, offsets, seed if dropout else offsets,
            R, H,
            u.stride(0), u.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1), out.stride(2),
            scale, signed_threshold(dropout_p), 1.0 / (1.0 - dropout_p),
            DROPOUT=dropout,
            UPCAST=is_interpreting(),
            PRECISION=dot_precision(u.dtype, v.dtype),
            BLOCK_R=BLOCK_R,
        )  # fmt: skip
    return out


# What the static check and the AOT build compile for GPUs.
SHRINK_GPU_KERNEL = GpuKernel("grouped_shrink", _grouped_shrink_kernel.fn, shrink_gpu_configs(), shrink_config_ok)
EXPAND_GPU_KERNEL = GpuKernel("grouped_expand", _grouped_expand_kernel.fn, expand_gpu_configs(), expand_config_ok)
WGRAD_GPU_KERNEL = GpuKernel("grouped_wgrad", _grouped_wgrad_kernel.fn, wgrad_gpu_configs(), wgrad_config_ok)
