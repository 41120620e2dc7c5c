"""The LoRA layer's training backward in three launches, deterministic, with no float atomics.

With ``xs = s·D(x)·Aᵀ`` saved by the forward and the upstream gradient ``dy [M, N]``:

1. ``lora_dy`` reads ``dy`` once for both of its products: ``dxa = s·dy·B`` ``[M, r]`` (a reduction over ``N``) and
   ``dB = dyᵀ·xs`` ``[N, r]`` (a reduction over ``M``). A program owns ``BLOCK_M`` rows and one of ``NS`` column
   ranges of ``dy``; it writes its ``[BLOCK_M, r]`` share of ``dxa`` to slice ``ns`` of ``dxa_parts [NS, M, r]`` and,
   per column tile, its row block's share of ``dB`` to slice ``m`` of ``db_parts [M / BLOCK_M, N, r]``.
2. ``lora_dx_da`` is the GEMM ``dx = dy·W0`` with ``D'(dxa·A)`` added in its epilogue, where ``dxa`` is the sum of
   the ``NS`` slices in index order. The same epilogue loads the tile of ``x`` under the output tile, applies the
   dropout mask of ``D'`` to it (generated again: held in registers it would spill at rank 64), and accumulates
   ``dA = dxaᵀ·D(x)`` over the program's chunk of rows into ``da_parts [S, r, K]``. Without ``dx`` (an input that
   needs no gradient) it runs the ``dA`` part alone.
3. ``lora_grad_sum`` adds the slices of ``da_parts`` and ``db_parts`` in index order and writes ``dA [r, K]`` and
   ``dB [N, r]`` in the LoRA weights' dtype: the split-K sums, the transpose and the cast in one launch.

Every split depends on the shape alone, never on the device or on timing, and every sum runs in a fixed order, so
two runs give bitwise-equal gradients. Compared with a shrink over ``dy`` then two weight-gradient passes, this
reads ``dy`` once instead of twice and saves a launch per pass; the partial sums
cost ``4·r·(M / BLOCK_M · N + NS · M + S · K)`` bytes, a fraction of one pass over ``dy`` at ``r <= 64``.

Ranks above ``MAX_FUSED_RANK``, and fp32 activations, give ``dA`` its own launch of the second kernel (whose grid covers the
rank tiles): its accumulator does not fit in registers beside the ``dx`` tile's (``fuses_da``).
"""

import torch
import triton
import triton.language as tl

from ._common import (
    GpuKernel,
    base_gemm,
    config_pruner,
    dot_precision,
    dropout_fits,
    dropout_tile,
    fits_in_smem,
    is_interpreting,
    launching,
    load_tile,
    m_bucket,
    mma,
    rank_tile,
    signed_threshold,
    store_tile,
    w_stage_bytes,
    weight_operand,
)

# dA accumulates in registers over a program's rows, beside the dx tile's: up to a rank tile of 32 they fit (at 64,
# with dropout, every config spills on sm_90: ``fastlora info``); above, dA takes a launch of its own.
MAX_FUSED_RANK = 32
# Programs to aim for: about two per SM of the largest GPUs, so neither kernel leaves SMs idle.
TARGET_PROGRAMS = 264
# A chunk of rows of the dx/dA kernel is a multiple of its largest BLOCK_M, so every program but the last sees
# whole tiles whichever config the autotuner picks; a dy column range is a multiple of the largest BLOCK_N.
CHUNK_ALIGN = 128
SPLIT_ALIGN = 256


# ----------------------------------------------------------------------------------------------- 1. one read of dy


def dy_gpu_configs() -> list[triton.Config]:
    """Configs of the ``dy`` kernel (``BLOCK_M`` is the launcher's: the partial buffers' size depends on it). No
    128-wide column step: with the ``dxa`` accumulator, the ``dB`` tile and a transposed ``dy`` tile live at once,
    it spills at rank 64 (``fastlora info``)."""
    return [
        triton.Config({"BLOCK_N": 64}, num_warps=w, num_stages=s) for w, s in [(4, 4), (4, 2), (8, 4), (8, 3), (8, 2)]
    ]


def _dy_configs():
    if is_interpreting():
        return [triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=1)]
    return dy_gpu_configs()


def dy_config_ok(config: triton.Config, act_bytes: int, lora_bytes: int, BLOCK_M: int, BLOCK_R: int, **_) -> bool:
    """Shared memory for the pipelined ``dy`` and ``B`` tiles (``xs`` is loaded once), and registers, which the
    ``dxa`` accumulator, a ``dB`` tile and a transposed ``dy`` tile share: at rank 64, four warps hold 64 rows with
    16-bit LoRA weights and eight warps 64 rows, or 128 with 16-bit LoRA weights; beyond that sm_80 spills
    (``fastlora info``)."""
    bn = config.kwargs["BLOCK_N"]
    if not fits_in_smem(config, bn * (BLOCK_M * act_bytes + BLOCK_R * lora_bytes)):
        return False
    narrow = lora_bytes == 2
    if config.num_warps < 8:
        return BLOCK_M <= 64 and narrow
    return BLOCK_M <= (128 if narrow else 64)


@triton.autotune(
    configs=_dy_configs(),
    key=["M_BUCKET", "N", "BLOCK_M", "BLOCK_R"],
    prune_configs_by={"early_config_prune": config_pruner(dy_config_ok, "dy_ptr", "b_ptr")},
)
@triton.jit
def _lora_dy_kernel(
    # pointers
    dy_ptr,  # [M, N]
    b_ptr,  # [N, R]   lora_B
    xs_ptr,  # [M, R]  s·D(x)·Aᵀ from the forward
    dxa_ptr,  # [NS, M, R] fp32, written
    db_ptr,  # [cdiv(M, BLOCK_M), N, R] fp32, written
    # sizes
    M,
    N,
    R,
    cols_per_split,  # columns of dy per program (a multiple of every BLOCK_N)
    M_BUCKET,  # autotune key only
    # strides
    stride_dm,
    stride_dn,
    stride_bn,
    stride_br,
    stride_sm,
    stride_sr,
    stride_as,
    stride_am,
    stride_ar,
    stride_bs,
    stride_bbn,
    stride_bbr,
    # scalars
    scale,
    # meta-parameters
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_r = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_r = offs_r < R
    rows = offs_m.to(tl.int64)
    n_start = pid_s * cols_per_split
    n_end = min(n_start + cols_per_split, N)

    xs = load_tile(xs_ptr, rows, offs_r, stride_sm, stride_sr, mask_m, mask_r)
    db_out = db_ptr + pid_m.to(tl.int64) * stride_bs
    dxa = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_end
        dy = load_tile(dy_ptr, rows, offs_n, stride_dm, stride_dn, mask_m, mask_n)
        b = load_tile(b_ptr, offs_n, offs_r, stride_bn, stride_br, mask_n, mask_r)
        dxa = mma(dxa, dy, b, UPCAST, PRECISION)
        # This row block's share of dB for these columns: [BLOCK_N, BLOCK_R], stored as dB's own layout.
        db = mma(tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32), tl.trans(dy), xs, UPCAST, PRECISION)
        store_tile(db_out, db, offs_n, offs_r, stride_bbn, stride_bbr, mask_n, mask_r)
    store_tile(dxa_ptr + pid_s * stride_as, dxa * scale, rows, offs_r, stride_am, stride_ar, mask_m, mask_r)


def dy_block_m(M: int, lora_bytes: int) -> int:
    """Rows per ``dy`` program: the largest block ``dy_config_ok`` takes, which keeps ``db_parts`` (``M / BLOCK_M``
    slices) small: 128 rows with 16-bit LoRA weights, 64 with fp32 ones."""
    return min(128 if lora_bytes == 2 else 64, max(16, triton.next_power_of_2(M)))


def dy_splits(M: int, N: int, block_m: int) -> tuple[int, int]:
    """``(NS, cols_per_split)``: column ranges of ``dy`` so that the grid fills the GPU. Depends on the shape alone."""
    want = max(1, min(triton.cdiv(TARGET_PROGRAMS, triton.cdiv(M, block_m)), triton.cdiv(N, SPLIT_ALIGN)))
    cols = triton.cdiv(triton.cdiv(N, want), SPLIT_ALIGN) * SPLIT_ALIGN
    return triton.cdiv(N, cols), cols


def lora_dy(dy: torch.Tensor, lora_B: torch.Tensor, xs: torch.Tensor, scale: float):
    """``(dxa_parts [NS, M, R], db_parts [S, N, R])``, fp32: ``dxa = scale·dy·B`` is the sum of the first over its
    leading axis and ``dB = dyᵀ·xs`` the sum of the second. ``dy [M, N]``, ``lora_B [N, R]``, ``xs [M, R]``."""
    M, N = dy.shape
    R = lora_B.shape[1]
    block_m = dy_block_m(M, lora_B.element_size())
    splits, cols = dy_splits(M, N, block_m)
    dxa_parts = torch.empty((splits, M, R), device=dy.device, dtype=torch.float32)
    db_parts = torch.empty((triton.cdiv(M, block_m), N, R), device=dy.device, dtype=torch.float32)
    BLOCK_R = rank_tile(R)
    grid = (triton.cdiv(M, block_m), splits, triton.cdiv(R, BLOCK_R))
    with launching("lora_dy", dy, lora_B, xs, dxa_parts, db_parts):
        _lora_dy_kernel[grid](
            dy, lora_B, xs, dxa_parts, db_parts,
            M, N, R, cols, m_bucket(M),
            dy.stride(0), dy.stride(1), lora_B.stride(0), lora_B.stride(1), xs.stride(0), xs.stride(1),
            dxa_parts.stride(0), dxa_parts.stride(1), dxa_parts.stride(2),
            db_parts.stride(0), db_parts.stride(1), db_parts.stride(2),
            scale,
            UPCAST=is_interpreting(),
            PRECISION=dot_precision(dy.dtype, lora_B.dtype),
            BLOCK_M=block_m,
            BLOCK_R=BLOCK_R,
        )  # fmt: skip
    return dxa_parts, db_parts


# ------------------------------------------------------------------------------------- 2. dx GEMM with dA in it


def dx_gpu_configs() -> list[triton.Config]:
    """Configs of the ``dx``/``dA`` kernel: output tile ``BLOCK_M x BLOCK_K`` of ``dx``, reduction step ``BLOCK_N``."""
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_K": bk, "BLOCK_N": bn, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bk, bn, w, s in [
            (128, 128, 64, 8, 4),
            (128, 64, 64, 8, 4),
            (64, 128, 64, 8, 4),
            (64, 64, 64, 4, 4),
            (64, 64, 32, 4, 5),
        ]
    ]


def _dx_configs():
    if is_interpreting():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_K": 64, "BLOCK_N": 64, "GROUP_M": 1}, num_warps=4, num_stages=1)]
    return dx_gpu_configs()


def dx_config_ok(
    config: triton.Config, act_bytes: int, lora_bytes: int, DROPOUT: bool, COMPUTE_DX: bool, COMPUTE_DA: bool,
    QBLOCK: int = 0, QPACKED: int = 0, **_,
) -> bool:  # fmt: skip
    """Shared memory for the pipelined ``dy`` and ``W0`` tiles; with dropout, the Philox rounds' registers; with
    ``dA``, its accumulator ``[BLOCK_R, BLOCK_K]`` beside the dx tile's, which spills past 64 columns, and with fp32
    activations at all (the launcher runs ``dA`` on its own there: ``fuses_da``)."""
    kw = config.kwargs
    w_bytes = w_stage_bytes(act_bytes, QBLOCK, QPACKED)
    if not fits_in_smem(config, kw["BLOCK_N"] * (kw["BLOCK_M"] * act_bytes + kw["BLOCK_K"] * w_bytes)):
        return False
    if COMPUTE_DA and (kw["BLOCK_K"] > 64 or (COMPUTE_DX and act_bytes == 4)):
        return False
    # A 4-bit W0 tile dequantized beside the dx and dA accumulators spilled 16-24 B with four warps.
    if COMPUTE_DX and COMPUTE_DA and QBLOCK and config.num_warps < 8:
        return False
    return not DROPOUT or dropout_fits(config, kw["BLOCK_M"], kw["BLOCK_K"])


@triton.jit
def _dxa_tile(
    dxa_ptr, splits, rows, offs_r, stride_as, stride_am, stride_ar, mask_m, mask_r,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """``dxa[rows, offs_r]``: the sum of its ``splits`` partial slices, in index order, fp32."""
    dxa = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for j in range(0, splits):
        dxa += load_tile(dxa_ptr + j * stride_as, rows, offs_r, stride_am, stride_ar, mask_m, mask_r)
    return dxa


@triton.autotune(
    configs=_dx_configs(),
    key=["M_BUCKET", "N", "K", "BLOCK_R", "stride_wk", "COMPUTE_DX", "COMPUTE_DA", "DROPOUT", "QBLOCK"],
    prune_configs_by={"early_config_prune": config_pruner(dx_config_ok, "dy_ptr", "a_ptr")},
)
@triton.jit
def _lora_dx_da_kernel(
    # pointers
    dy_ptr,  # [M, N]
    w_ptr,  # [N, K]  (a view of W0, either layout)
    dxa_ptr,  # [NS, M, R] fp32
    a_ptr,  # [R, K]  lora_A
    x_ptr,  # [M, K], read only with COMPUTE_DA
    dx_ptr,  # [M, K], written only with COMPUTE_DX
    da_ptr,  # [S, R, K] fp32, written only with COMPUTE_DA
    seed_ptr,  # [1] int64, read only with DROPOUT
    wq_absmax_ptr,  # W0's 4-bit quantization state, read only with QBLOCK > 0 (``load_w_tile``)
    wq_code_ptr,
    wq_absmax2_ptr,
    wq_code2_ptr,
    wq_offset_ptr,
    # sizes
    M,
    N,
    K,
    R,
    splits,  # NS
    chunk,  # rows per program (a multiple of every BLOCK_M)
    M_BUCKET,  # autotune key only
    # strides
    stride_dm,
    stride_dn,
    stride_wn,
    stride_wk,
    stride_as,
    stride_am,
    stride_ar,
    stride_ar0,
    stride_ak,
    stride_xm,
    stride_xk,
    stride_om,
    stride_ok,
    stride_das,
    stride_dar,
    stride_dak,
    # scalars
    threshold,
    keep_scale,
    # meta-parameters
    COMPUTE_DX: tl.constexpr,
    COMPUTE_DA: tl.constexpr,
    DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUP_M: tl.constexpr,
    QBLOCK: tl.constexpr = 0,  # 0: W0 is dense; else it is 4-bit with this block size
    QBLOCK2: tl.constexpr = 0,  # with QBLOCK: 0, or the block size of the double-quantized absmax
    QPACKED: tl.constexpr = 0,  # with QBLOCK: how its tiles are read (``load_w_tile``)
):
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_r = tl.program_id(2)  # the rank tile of dA (one unless R > BLOCK_R, which only a dA-only launch takes)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    offs_ra = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_ra = offs_ra < R
    if DROPOUT:
        seed = tl.load(seed_ptr)
    m_first = pid_s * chunk
    m_last = min(m_first + chunk, M)

    da = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for m0 in range(m_first, m_last, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < m_last
        rows = offs_m.to(tl.int64)
        if COMPUTE_DX:
            # The base GEMM from a zero accumulator (pipelined, wgmma-only accumulator), then the low-rank term.
            acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
            acc = base_gemm(
                acc, dy_ptr, w_ptr, rows, offs_k, pid_k * BLOCK_K, mask_m, mask_k, N, stride_dm, stride_dn, stride_wn,
                stride_wk, wq_absmax_ptr, wq_code_ptr, wq_absmax2_ptr, wq_code2_ptr, wq_offset_ptr, UPCAST, PRECISION,
                BLOCK_N, BLOCK_K, QBLOCK, QBLOCK2, QPACKED,
            )  # fmt: skip
            low = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32) if DROPOUT else acc
            for r0 in tl.range(0, R, BLOCK_R, num_stages=1):
                offs_r = r0 + tl.arange(0, BLOCK_R)
                mask_r = offs_r < R
                dxa = _dxa_tile(
                    dxa_ptr, splits, rows, offs_r, stride_as, stride_am, stride_ar, mask_m, mask_r, BLOCK_M, BLOCK_R
                )
                a = load_tile(a_ptr, offs_r, offs_k, stride_ar0, stride_ak, mask_r, mask_k)
                low = mma(low, dxa.to(a.dtype), a, UPCAST, PRECISION)
            if DROPOUT:
                acc += dropout_tile(low, seed, offs_m, offs_k, threshold, keep_scale)
            else:
                acc = low
            store_tile(dx_ptr, acc, rows, offs_k, stride_om, stride_ok, mask_m, mask_k)
        if COMPUTE_DA:
            dxa = _dxa_tile(
                dxa_ptr, splits, rows, offs_ra, stride_as, stride_am, stride_ar, mask_m, mask_ra, BLOCK_M, BLOCK_R
            ).to(a_ptr.dtype.element_ty)
            xt = load_tile(x_ptr, rows, offs_k, stride_xm, stride_xk, mask_m, mask_k)
            if DROPOUT:
                # The same mask as D' above, generated again rather than held in registers through the dx tile's
                # epilogue (which spills at rank 64).
                xt = dropout_tile(xt, seed, offs_m, offs_k, threshold, keep_scale)
            da = mma(da, tl.trans(dxa), xt.to(dxa.dtype), UPCAST, PRECISION)
    if COMPUTE_DA:
        out = da_ptr + pid_s.to(tl.int64) * stride_das
        store_tile(out, da, offs_ra, offs_k, stride_dar, stride_dak, mask_ra, mask_k)


def dx_chunks(M: int, K: int) -> tuple[int, int]:
    """``(S, chunk)``: rows per ``dx``/``dA`` program, so that ``K / 128`` column tiles times ``S`` row chunks fill the
    GPU while ``da_parts`` keeps few slices. Depends on the shape alone."""
    split = max(1, min(triton.cdiv(TARGET_PROGRAMS, triton.cdiv(K, 128)), triton.cdiv(M, CHUNK_ALIGN)))
    chunk = triton.cdiv(triton.cdiv(M, split), CHUNK_ALIGN) * CHUNK_ALIGN
    return triton.cdiv(M, chunk), chunk


def fuses_da(R: int, act_bytes: int) -> bool:
    """Whether ``dA`` rides in the ``dx`` GEMM's epilogue: up to ``MAX_FUSED_RANK`` with 16-bit activations (with fp32
    ones the two tiles spill on sm_80)."""
    return R <= MAX_FUSED_RANK and act_bytes == 2


def lora_dx_da(
    dy: torch.Tensor,
    w,
    dxa_parts: torch.Tensor,
    lora_A: torch.Tensor,
    x: torch.Tensor,
    dropout_p: float,
    seed: torch.Tensor | None,
    need_dx: bool,
    need_da: bool = True,
):
    """``(dx, da_parts)``: ``dx = dy·w + D'(dxa·A)`` in ``dy``'s dtype (None unless ``need_dx``) and ``da_parts
    [S, R, K]`` fp32 whose sum over its leading axis is ``dA = dxaᵀ·D(x)`` (None unless ``need_da``).

    ``dy [M, N]``, ``w [N, K]`` (W0, either layout), ``dxa_parts [NS, M, R]`` from ``lora_dy``, ``lora_A [R, K]``,
    ``x [M, K]``. Above ``MAX_FUSED_RANK``, ``dA`` takes a second launch whose grid covers the rank tiles. ``w`` is a
    tensor or a 4-bit ``fastlora.nf4.QuantizedWeight`` view (dequantized tile by tile in the GEMM's loop)."""
    M, N = dy.shape
    K = w.shape[1]
    R = lora_A.shape[0]
    dropout = dropout_p > 0.0
    dx = torch.empty((M, K), device=dy.device, dtype=dy.dtype) if need_dx else None
    if M == 0 or K == 0:
        return dx, torch.zeros((1, R, K), device=dy.device, dtype=torch.float32) if need_da else None
    splits, chunk = dx_chunks(M, K)
    da_parts = torch.empty((splits, R, K), device=dy.device, dtype=torch.float32) if need_da else None
    BLOCK_R = rank_tile(R)
    fused = fuses_da(R, dy.element_size())
    wo = weight_operand(w, dy.dtype)

    def launch(compute_dx: bool, compute_da: bool):
        def grid(meta):
            return (triton.cdiv(K, meta["BLOCK_K"]), splits, triton.cdiv(R, BLOCK_R) if not compute_dx else 1)

        weight = wo.tensors if compute_dx else ()
        operands = (dy, *weight, dxa_parts, lora_A, x if compute_da else None, dx if compute_dx else None, da_parts)
        with launching("lora_dx_da", *operands):
            _lora_dx_da_kernel[grid](
                dy, wo.ptr, dxa_parts, lora_A, x, dx if compute_dx else dy, da_parts if compute_da else dxa_parts,
                seed if dropout else dxa_parts, *wo.args,
                M, N, K, R, dxa_parts.shape[0], chunk, m_bucket(M),
                dy.stride(0), dy.stride(1), wo.stride0, wo.stride1,
                dxa_parts.stride(0), dxa_parts.stride(1), dxa_parts.stride(2), lora_A.stride(0), lora_A.stride(1),
                x.stride(0), x.stride(1),
                dx.stride(0) if compute_dx else 0, dx.stride(1) if compute_dx else 0,
                da_parts.stride(0) if compute_da else 0, da_parts.stride(1) if compute_da else 0,
                da_parts.stride(2) if compute_da else 0,
                signed_threshold(dropout_p), 1.0 / (1.0 - dropout_p),
                COMPUTE_DX=compute_dx,
                COMPUTE_DA=compute_da,
                DROPOUT=dropout,
                UPCAST=is_interpreting(),
                PRECISION=dot_precision(dy.dtype, wo.dtype, lora_A.dtype),
                BLOCK_R=BLOCK_R,
                QBLOCK=wo.qblock if compute_dx else 0,
                QBLOCK2=wo.qblock2 if compute_dx else 0,
                QPACKED=wo.qpacked if compute_dx else 0,
            )  # fmt: skip

    if need_dx:
        launch(True, need_da and fused)
    if need_da and not (need_dx and fused):
        launch(False, True)
    return dx, da_parts


# -------------------------------------------------------------------------------------- 3. sums, transpose, cast


@triton.jit
def _sum_slices(parts_ptr, out_ptr, slices, stride_s, numel, block, BLOCK: tl.constexpr):
    """``out[i] = sum_s parts[s, i]`` over the flat block ``block`` of ``numel`` elements, in index order of ``s``."""
    offs = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, slices):
        acc += tl.load(parts_ptr + s * stride_s + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lora_grad_sum_kernel(
    da_parts_ptr, da_ptr, da_slices, stride_das, da_numel,
    db_parts_ptr, db_ptr, db_slices, stride_dbs, db_numel,
    BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    da_blocks = tl.cdiv(da_numel, BLOCK)
    if pid < da_blocks:
        _sum_slices(da_parts_ptr, da_ptr, da_slices, stride_das, da_numel, pid, BLOCK)
    else:
        _sum_slices(db_parts_ptr, db_ptr, db_slices, stride_dbs, db_numel, pid - da_blocks, BLOCK)


SUM_BLOCK = 1024


def lora_grad_sum(da_parts: torch.Tensor, db_parts: torch.Tensor, dtype: torch.dtype):
    """``(dA, dB)`` in ``dtype``: the sums over the leading axis of ``da_parts [S, R, K]`` and ``db_parts [S', N, R]``
    (contiguous), in index order, rounded once."""
    da = torch.empty(da_parts.shape[1:], device=da_parts.device, dtype=dtype)
    db = torch.empty(db_parts.shape[1:], device=db_parts.device, dtype=dtype)
    grid = (triton.cdiv(da.numel(), SUM_BLOCK) + triton.cdiv(db.numel(), SUM_BLOCK),)
    if grid[0] == 0:
        return da, db
    with launching("lora_grad_sum", da_parts, db_parts, da, db):
        _lora_grad_sum_kernel[grid](
            da_parts, da, da_parts.shape[0], da_parts.stride(0), da.numel(),
            db_parts, db, db_parts.shape[0], db_parts.stride(0), db.numel(),
            BLOCK=SUM_BLOCK,
        )  # fmt: skip
    return da, db


def lora_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    w: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    xs: torch.Tensor,
    scale: float,
    dropout_p: float,
    seed: torch.Tensor | None,
    need_dx: bool,
):
    """``(dx, dA, dB)`` of the LoRA layer (``dx`` None unless ``need_dx``): three launches up to rank
    ``MAX_FUSED_RANK``. ``dy [M, N]``, ``x [M, K]``, ``w [N, K]`` (W0), ``lora_A [R, K]``, ``lora_B [N, R]``,
    ``xs [M, R]``; ``dA`` and ``dB`` come in ``lora_A``'s dtype."""
    M, N = dy.shape
    if M == 0 or N == 0:  # nothing flows back through the LoRA branch
        dx = torch.zeros_like(x) if need_dx else None
        return dx, torch.zeros_like(lora_A), torch.zeros_like(lora_B)
    dxa_parts, db_parts = lora_dy(dy, lora_B, xs, scale)
    dx, da_parts = lora_dx_da(dy, w, dxa_parts, lora_A, x, dropout_p, seed, need_dx)
    da, db = lora_grad_sum(da_parts, db_parts, lora_A.dtype)
    return dx, da, db


# What the static check and the AOT build compile for GPUs.
DY_GPU_KERNEL = GpuKernel("lora_dy", _lora_dy_kernel.fn, dy_gpu_configs(), dy_config_ok)
DX_GPU_KERNEL = GpuKernel("lora_dx_da", _lora_dx_da_kernel.fn, dx_gpu_configs(), dx_config_ok)
