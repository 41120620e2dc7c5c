"""Base GEMM with the LoRA expand in its epilogue: ``out = x @ wt + D_out(l @ rt) + bias``.

``x [M, K]``, ``wt [K, N]``, ``l [M, R]``, ``rt [R, N]``, all with any strides. One kernel serves two places:

- forward, large ``M`` ("shrink, then fused GEMM"): ``y = x·W0ᵀ + xs·Bᵀ + b`` with ``xs = s·D(x)·Aᵀ`` written by
  the shrink kernel; the expand is an extra K-chunk of ``R`` columns that seeds the accumulator;
- backward: ``dx = dy·W0 + D'(dxa·A)``, where ``D'`` is the forward's dropout mask on the output coordinates
  ``(row, col)`` of ``dx``, regenerated from the seed.

``out`` is written exactly once. The rank loop runs over ``R`` at run time in ``BLOCK_R`` steps, so ranks are not
compiled in.
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
    nf4_tile_fits,
    rank_tile,
    signed_threshold,
    store_with_bias,
    tile_ids,
    w_stage_bytes,
    weight_operand,
)


def gpu_configs() -> list[triton.Config]:
    """Every config the autotuner may pick on a GPU; the interpreter runs a single config of its own."""
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in [
            (128, 128, 64, 8, 4),
            (128, 128, 32, 8, 4),
            (128, 64, 64, 8, 4),
            (64, 128, 64, 8, 4),
            (64, 64, 64, 4, 4),
            (64, 64, 32, 4, 5),
            # The widest tiles halve the operand traffic per FLOP; four stages of them fit only sm_90's 227 KiB.
            # Last in the list, so the AOT build's config indices stay put.
            (128, 256, 64, 8, 4),
            (128, 256, 64, 8, 3),
            (256, 128, 64, 8, 3),
        ]
    ]


def _expand_configs():
    if is_interpreting():
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 4}, num_warps=4, num_stages=1)]
    return gpu_configs()


def config_ok(
    config: triton.Config, act_bytes: int, lora_bytes: int, BLOCK_R: int, DROPOUT: bool, QBLOCK: int = 0, QPACKED: int = 0, **_
) -> bool:  # fmt: skip
    """Whether the launcher may run ``config`` for these operand sizes and switches (shared memory, spills).

    Tiles wider than 128x128 hold a 128-register accumulator per thread; the low-rank term's operands fit beside it
    up to a rank tile of 32 (195-254 registers on sm_80 and sm_90), and spill at 64 or with a dropout mask.
    """
    kw = config.kwargs
    w_bytes = w_stage_bytes(act_bytes, QBLOCK, QPACKED)
    if not fits_in_smem(config, kw["BLOCK_K"] * (kw["BLOCK_M"] * act_bytes + kw["BLOCK_N"] * w_bytes)):
        return False
    if not nf4_tile_fits(config, kw["BLOCK_K"], kw["BLOCK_N"], act_bytes, QBLOCK, per_thread=16):
        return False
    # A 4-bit tile's dequantization holds its nibbles, codes and absmax in registers beside the accumulator.
    if kw["BLOCK_M"] * kw["BLOCK_N"] > 128 * 128 and (BLOCK_R > 32 or DROPOUT or QBLOCK):
        return False
    if kw["BLOCK_M"] > 128 and lora_bytes > act_bytes:
        return False  # 256 rows of fp32 low-rank operands beside the accumulator spill 8 B on sm_80
    return not DROPOUT or dropout_fits(config, kw["BLOCK_M"], kw["BLOCK_N"])


@triton.autotune(
    configs=_expand_configs(),
    # stride_wk tells W0's layout apart ([N, K] has stride_wk 1, [K, N] has N), which the best tile depends on.
    key=["M_BUCKET", "N", "K", "BLOCK_R", "stride_wk", "HAS_BIAS", "DROPOUT", "QBLOCK"],
    prune_configs_by={"early_config_prune": config_pruner(config_ok, "x_ptr", "l_ptr")},
)
@triton.jit
def _lora_expand_kernel(
    # pointers
    x_ptr,  # [M, K]
    wt_ptr,  # [K, N]
    l_ptr,  # [M, R]
    rt_ptr,  # [R, N]
    bias_ptr,  # [N], read only with HAS_BIAS
    out_ptr,  # [M, N]
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
    stride_lm,
    stride_lr,
    stride_rr,
    stride_rn,
    stride_om,
    stride_on,
    # scalars
    threshold,
    keep_scale,
    # meta-parameters
    HAS_BIAS: tl.constexpr,
    DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,
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
    mask_m = offs_m < M
    mask_n = offs_n < N
    rows_m = offs_m.to(tl.int64)

    # The base GEMM first, from a zero accumulator: its K loop is software-pipelined with the tensor-core
    # accumulator defined by nothing but MMAs. (Seeding it with the rank loop's result, a loop whose trip count is
    # known only at run time, made ptxas serialise every wgmma of the K loop on sm_90: advisory C7515.)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = base_gemm(
        acc, x_ptr, wt_ptr, rows_m, offs_n, pid_n * BLOCK_N, mask_m, mask_n, K, stride_xm, stride_xk, stride_wk,
        stride_wn, wq_absmax_ptr, wq_code_ptr, wq_absmax2_ptr, wq_code2_ptr, wq_offset_ptr, UPCAST, PRECISION, BLOCK_K,
        BLOCK_N, QBLOCK, QBLOCK2, QPACKED,
    )  # fmt: skip
    # Then the low-rank term, a short reduction over R (one stage: R is a few tiles at most, and pipelining it would
    # double the shared memory for fp32 LoRA). With dropout its mask applies to the low-rank product alone, which
    # therefore gets its own accumulator.
    low = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32) if DROPOUT else acc
    for r0 in tl.range(0, R, BLOCK_R, num_stages=1):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        lt = load_tile(l_ptr, rows_m, offs_r, stride_lm, stride_lr, mask_m, mask_r)
        rt = load_tile(rt_ptr, offs_r, offs_n, stride_rr, stride_rn, mask_r, mask_n)
        low = mma(low, lt, rt, UPCAST, PRECISION)
    if DROPOUT:
        acc += dropout_tile(low, tl.load(seed_ptr), offs_m, offs_n, threshold, keep_scale)
    else:
        acc = low
    store_with_bias(out_ptr, acc, bias_ptr, rows_m, offs_n, stride_om, stride_on, mask_m, mask_n, HAS_BIAS)


def lora_expand(
    x: torch.Tensor,
    wt,
    low: torch.Tensor,
    rt: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ wt + D(low @ rt) + bias`` for ``x [M, K]``, ``wt [K, N]``, ``low [M, R]``, ``rt [R, N]``; returns ``[M, N]``.
    ``wt`` is a tensor or a 4-bit ``fastlora.nf4.QuantizedWeight`` view (dequantized tile by tile in the K loop)."""
    M, K = x.shape
    N = wt.shape[1]
    R = low.shape[1]
    assert wt.shape[0] == K and low.shape[0] == M and tuple(rt.shape) == (R, N), "expand: inconsistent operand shapes"
    w = weight_operand(wt, x.dtype)
    out = torch.empty((M, N), device=x.device, dtype=out_dtype or x.dtype)
    if M == 0 or N == 0:
        return out
    dropout = dropout_p > 0.0

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    with launching("lora_expand", x, *w.tensors, low, rt, bias, out):
        _lora_expand_kernel[grid](
            x, w.ptr, low, rt, bias if bias is not None else x, out, seed if dropout else x, *w.args,
            M, N, K, R, m_bucket(M),
            x.stride(0), x.stride(1), w.stride0, w.stride1, low.stride(0), low.stride(1),
            rt.stride(0), rt.stride(1), out.stride(0), out.stride(1),
            signed_threshold(dropout_p), 1.0 / (1.0 - dropout_p),
            HAS_BIAS=bias is not None,
            DROPOUT=dropout,
            UPCAST=is_interpreting(),
            PRECISION=dot_precision(x.dtype, w.dtype, low.dtype),
            BLOCK_R=rank_tile(R),
            QBLOCK=w.qblock,
            QBLOCK2=w.qblock2,
            QPACKED=w.qpacked,
        )  # fmt: skip
    return out


# What the static check and the AOT build compile for GPUs.
GPU_KERNEL = GpuKernel("lora_expand", _lora_expand_kernel.fn, gpu_configs(), config_ok)
