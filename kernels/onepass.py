"""One-pass LoRA forward: ``y = x·W0ᵀ + s·(D(x)·Aᵀ)·Bᵀ + b`` in a single kernel.

Each program owns a ``[BLOCK_M, BLOCK_N]`` tile of ``y``. It streams its rows of ``x`` once, accumulating
``x·W0ᵀ`` and ``D(x)·Aᵀ`` in the same K loop, then adds ``s·xa·Bᵀ`` and the bias in the epilogue before the
single store of ``y``. This suits small ``M`` (decode), where the layer is bound by reading ``W0`` and a second
launch would cost more than the work. ``xa`` is recomputed by every column tile, an extra ``R / BLOCK_N`` of the
base work, and its padded rank ``R_PAD`` is held in registers, so the launcher accepts ranks up to
``MAX_RANK``; the shrink-then-GEMM path has no such limit.

``s·xa`` is rounded to the LoRA weights' dtype before the expand, exactly as the two-kernel path stores it,
so both forward shapes give the same ``y`` up to accumulation order.
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
    load_w_tile,
    m_bucket,
    mma,
    nf4_tile_fits,
    pow2_at_least_16,
    signed_threshold,
    store_tile,
    store_with_bias,
    tile_ids,
    w_stage_bytes,
    weight_operand,
)

MAX_RANK = 128

# The kernel reads its warp count from Triton, which the interpreter does not model: there it takes the 4 warps of the
# interpreter's config, so the tests run the warps' split of x·Aᵀ.
_INTERPRETED = tl.constexpr(is_interpreting())


def gpu_configs() -> list[triton.Config]:
    """Every config the autotuner may pick on a GPU; the interpreter runs a single config of its own."""
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
        # Warps: every dot of the kernel splits across them and none is computed twice (see the kernel): a warp of
        # mma.sync takes at least 16 rows and 8 columns, and where the warps split x·Aᵀ over K, each takes 16 or more
        # columns of BLOCK_K. So four warps everywhere; eight would leave 8 columns of a 64-wide K step, or of a
        # rank-32 tile, to each, and on sm_80 put two warps on each 16 rows of a 64-row tile.
        for bm, bn, bk, w, s in [
            # Fits every rank up to MAX_RANK with fp32 operands. Two stages: with three, ptxas spilled 8 B at rank 128
            # with bf16 x and fp32 LoRA weights on sm_90.
            (16, 32, 64, 4, 2),
            (16, 32, 128, 4, 4),
            (16, 64, 128, 4, 4),
            (16, 64, 64, 4, 5),
            # The most registers of any config, at rank 128 with dropout: 248 under Triton 3.9 (sm_80) and all 255
            # under 3.6 (sm_90), without spilling.
            (16, 128, 64, 4, 4),
            (32, 32, 64, 4, 4),
            # One warpgroup of wgmma on sm_90. BLOCK_K = 32 keeps the tile within ``dropout_fits`` up to rank 32.
            (64, 64, 32, 4, 4),
        ]
    ]


def _onepass_configs():
    if is_interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 4}, num_warps=4, num_stages=1)]
    return gpu_configs()


def config_ok(
    config: triton.Config, act_bytes: int, lora_bytes: int, R_PAD: int, DROPOUT: bool, QBLOCK: int = 0, QPACKED: int = 0, **_
) -> bool:  # fmt: skip
    """Whether the launcher may run ``config`` for these operand sizes and switches (shared memory, spills, serialised
    wgmma)."""
    kw = config.kwargs
    w_bytes = w_stage_bytes(act_bytes, QBLOCK, QPACKED)
    stage = kw["BLOCK_K"] * (kw["BLOCK_M"] * act_bytes + kw["BLOCK_N"] * w_bytes + R_PAD * lora_bytes)
    if not fits_in_smem(config, stage) or not nf4_tile_fits(config, kw["BLOCK_K"], kw["BLOCK_N"], act_bytes, QBLOCK):
        return False
    # Registers: the two accumulators, [BLOCK_M, BLOCK_N] and [BLOCK_M, R_PAD], at most 64 fp32 per thread (the
    # 64-row tile at R_PAD = 128 with fp32 operands took 255 registers and spilled 16 B on sm_80).
    if kw["BLOCK_M"] * (kw["BLOCK_N"] + R_PAD) > 64 * 32 * config.num_warps:
        return False
    # A 64-row tile runs wgmma on sm_90. With LoRA weights wider than x, x·Aᵀ takes x converted to fp32 in
    # registers, and ptxas serialised every wgmma of the loop (advisory C7515 at R_PAD = 32 without dropout).
    if kw["BLOCK_M"] >= 64 and lora_bytes != act_bytes:
        return False
    # With dropout on fp32 x, Triton 3.6's ptxas serialised it too (C7515 at R_PAD = 16).
    if kw["BLOCK_M"] >= 64 and DROPOUT and act_bytes == 4:
        return False
    # Four stages of the 128-column tile at R_PAD = 128 with fp32 LoRA weights fit only sm_90's shared memory, where
    # they spill 24 B with dropout.
    if (kw["BLOCK_N"], R_PAD, config.num_stages) == (128, 128, 4) and lora_bytes == 4:
        return False
    # The accumulators also count against the Philox rounds.
    return not DROPOUT or dropout_fits(config, kw["BLOCK_M"], kw["BLOCK_K"] + R_PAD)


@triton.autotune(
    configs=_onepass_configs(),
    key=["M_BUCKET", "N", "K", "R_PAD", "stride_wk", "HAS_BIAS", "DROPOUT", "QBLOCK"],
    prune_configs_by={"early_config_prune": config_pruner(config_ok, "x_ptr", "at_ptr")},
)
@triton.jit
def _lora_onepass_kernel(
    # pointers
    x_ptr,  # [M, K]
    wt_ptr,  # [K, N]  (a view of W0, either layout)
    at_ptr,  # [K, R]  (a view of A)
    bt_ptr,  # [R, N]  (a view of B)
    bias_ptr,  # [N], read only with HAS_BIAS
    y_ptr,  # [M, N]
    xs_ptr,  # [M, R] s·D(x)·Aᵀ for the backward, written only with STORE_XS
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
    M_BUCKET,  # autotune key only
    # strides
    stride_xm,
    stride_xk,
    stride_wk,
    stride_wn,
    stride_ak,
    stride_ar,
    stride_br,
    stride_bn,
    stride_ym,
    stride_yn,
    stride_sm,
    stride_sr,
    # scalars
    scaling,
    threshold,
    keep_scale,
    # meta-parameters
    HAS_BIAS: tl.constexpr,
    DROPOUT: tl.constexpr,
    STORE_XS: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    R_PAD: tl.constexpr,  # the rank padded to a power of two >= 16: the width of xa in registers
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    QBLOCK: tl.constexpr = 0,  # 0: W0 is dense; else it is 4-bit with this block size
    QBLOCK2: tl.constexpr = 0,  # with QBLOCK: 0, or the block size of the double-quantized absmax
    QPACKED: tl.constexpr = 0,  # with QBLOCK: how its tiles are read (``load_w_tile``)
):
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, R_PAD)
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask_r = offs_r < R
    rows_m = offs_m.to(tl.int64)
    if DROPOUT:
        seed = tl.load(seed_ptr)

    # How the warps share x·Aᵀ. Triton lays two dots that read the same tile (here x) out alike, and a tile no wider
    # than tall gets all its warps along its rows; mma.sync gives a warp 16 rows. With BLOCK_M = 16, 4 warps and
    # R_PAD = 16 that put all four warps on the same rows of both dots (40 HMMA per warp per 64-wide K step instead
    # of 10, every one computed four times). In that case the warps split the K step of x·Aᵀ instead: a batched
    # dot over SPLIT slices of BLOCK_K // SPLIT columns, one slice per warp, summed once after the loop; the base
    # dot, no longer tied to it, splits its columns across the warps. The [SPLIT, BLOCK_M, R_PAD] fp32 accumulator
    # takes as many registers per thread as the replicated [BLOCK_M, R_PAD] one did.
    if _INTERPRETED:
        WARPS: tl.constexpr = 4
    else:
        WARPS: tl.constexpr = tl.extra.cuda.num_warps()
    SPLIT: tl.constexpr = WARPS if R_PAD <= BLOCK_M and BLOCK_M < 16 * WARPS else 1
    tl.static_assert(BLOCK_K // SPLIT >= 16, "each warp's slice of the K step must be a tensor-core K (16)")

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if SPLIT > 1:
        xa = tl.zeros((SPLIT, BLOCK_M, R_PAD), dtype=tl.float32)
    else:
        xa = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = load_tile(x_ptr, rows_m, offs_k, stride_xm, stride_xk, mask_m, mask_k)
        # W0 has N·K elements, which can pass 2**31: its offsets are int64.
        w = load_w_tile(
            wt_ptr, offs_k.to(tl.int64), offs_n.to(tl.int64), k0, pid_n * BLOCK_N, stride_wk, stride_wn, mask_k,
            mask_n, wq_absmax_ptr, wq_code_ptr, wq_absmax2_ptr, wq_code2_ptr, wq_offset_ptr,
            x_ptr.dtype.element_ty, QBLOCK, QBLOCK2, QPACKED, BLOCK_K, BLOCK_N,
        )  # fmt: skip
        a = load_tile(at_ptr, offs_k, offs_r, stride_ak, stride_ar, mask_k, mask_r)
        acc = mma(acc, x, w, UPCAST, PRECISION)
        if DROPOUT:
            xd = dropout_tile(x, seed, offs_m, offs_k, threshold, keep_scale).to(a.dtype)
        else:
            xd = x
        if SPLIT > 1:
            # Without dropout both views are register relabellings of the tiles read from shared memory.
            xd = tl.permute(tl.reshape(xd, (BLOCK_M, SPLIT, BLOCK_K // SPLIT)), (1, 0, 2))
            a = tl.reshape(a, (SPLIT, BLOCK_K // SPLIT, R_PAD))
        xa = mma(xa, xd, a, UPCAST, PRECISION)
    if SPLIT > 1:
        xa = tl.sum(xa, axis=0)

    b = load_tile(bt_ptr, offs_r, offs_n, stride_br, stride_bn, mask_r, mask_n)
    xs = (xa * scaling).to(bt_ptr.dtype.element_ty)
    if STORE_XS:
        # Every column tile holds the same xs; the first one writes it.
        if pid_n == 0:
            store_tile(xs_ptr, xs, rows_m, offs_r, stride_sm, stride_sr, mask_m, mask_r)
    acc = mma(acc, xs, b, UPCAST, PRECISION)
    store_with_bias(y_ptr, acc, bias_ptr, rows_m, offs_n, stride_ym, stride_yn, mask_m, mask_n, HAS_BIAS)


def lora_onepass(
    x: torch.Tensor,
    wt,
    bias: torch.Tensor | None,
    at: torch.Tensor,
    bt: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
    xs: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ wt + scaling · (D(x) @ at) @ bt + bias`` for ``x [M, K]``, ``wt [K, N]``, ``at [K, R]``, ``bt [R, N]``.

    With ``xs`` (``[M, R]``, the LoRA weights' dtype) also writes ``scaling · D(x) @ at`` there for the backward.
    ``wt`` is a tensor or a 4-bit ``fastlora.nf4.QuantizedWeight`` view (dequantized tile by tile in the K loop).
    """
    M, K = x.shape
    N = wt.shape[1]
    R = at.shape[1]
    if R > MAX_RANK:
        raise ValueError(f"the one-pass forward holds the rank in registers and takes r <= {MAX_RANK}, got r={R}")
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0 or N == 0:
        return y
    dropout = dropout_p > 0.0
    w = weight_operand(wt, x.dtype)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    with launching("lora_onepass", x, *w.tensors, at, bt, bias, y, xs):
        _lora_onepass_kernel[grid](
            x, w.ptr, at, bt, bias if bias is not None else x, y, xs if xs is not None else y, seed if dropout else x,
            *w.args,
            M, N, K, R, m_bucket(M),
            x.stride(0), x.stride(1), w.stride0, w.stride1, at.stride(0), at.stride(1),
            bt.stride(0), bt.stride(1), y.stride(0), y.stride(1),
            xs.stride(0) if xs is not None else 0, xs.stride(1) if xs is not None else 0,
            scaling, signed_threshold(dropout_p), 1.0 / (1.0 - dropout_p),
            HAS_BIAS=bias is not None,
            DROPOUT=dropout,
            STORE_XS=xs is not None,
            UPCAST=is_interpreting(),
            PRECISION=dot_precision(x.dtype, w.dtype, at.dtype),
            R_PAD=pow2_at_least_16(R),
            QBLOCK=w.qblock,
            QBLOCK2=w.qblock2,
            QPACKED=w.qpacked,
        )  # fmt: skip
    return y


# What the static check and the AOT build compile for GPUs.
GPU_KERNEL = GpuKernel("lora_onepass", _lora_onepass_kernel.fn, gpu_configs(), config_ok)
