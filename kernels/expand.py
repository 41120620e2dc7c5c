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
    dot_precision,
    dropout_fits,
    dropout_tile,
    fits_in_smem,
    is_interpreting,
    launch_lock,
    m_bucket,
    mma,
    signed_threshold,
    tile_ids,
)


def _expand_gpu_configs():
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in [
            (128, 128, 64, 8, 4),
            (128, 128, 32, 8, 4),
            (128, 64, 64, 8, 4),
            (64, 128, 64, 8, 4),
            (64, 64, 64, 4, 4),
            (64, 64, 32, 4, 5),
        ]
    ]


def _expand_configs():
    if is_interpreting():
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 4}, num_warps=4, num_stages=1)]
    return _expand_gpu_configs()


def config_ok(config: triton.Config, act_bytes: int, lora_bytes: int, DROPOUT: bool, **_) -> bool:
    """Whether the launcher may run ``config`` for these operand sizes and switches (shared memory, spills)."""
    kw = config.kwargs
    if not fits_in_smem(config, kw["BLOCK_K"] * (kw["BLOCK_M"] + kw["BLOCK_N"]) * act_bytes):
        return False
    return not DROPOUT or dropout_fits(config, kw["BLOCK_M"], kw["BLOCK_N"])


def _prune(configs, nargs, **kwargs):
    sizes = nargs["x_ptr"].element_size(), nargs["l_ptr"].element_size()
    keep = [c for c in configs if config_ok(c, *sizes, **kwargs)]
    return keep or configs[-1:]


@triton.autotune(
    configs=_expand_configs(),
    key=["M_BUCKET", "N", "K", "BLOCK_R", "DROPOUT"],
    prune_configs_by={"early_config_prune": _prune},
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
):
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    rows_m = offs_m.to(tl.int64)[:, None]

    # The low-rank term first, a short reduction over R: with dropout, its mask is generated while the
    # accumulator is the only other live tile, which keeps the Philox rounds out of the spill zone. One
    # stage: R is a few tiles at most, and pipelining it would double the shared memory for fp32 LoRA.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in tl.range(0, R, BLOCK_R, num_stages=1):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        lt = tl.load(
            l_ptr + rows_m * stride_lm + offs_r[None, :] * stride_lr, mask=mask_m[:, None] & mask_r[None, :], other=0.0
        )
        rt = tl.load(
            rt_ptr + offs_r[:, None] * stride_rr + offs_n[None, :] * stride_rn,
            mask=mask_r[:, None] & mask_n[None, :],
            other=0.0,
        )
        acc = mma(acc, lt, rt, UPCAST, PRECISION)
    if DROPOUT:
        acc = dropout_tile(acc, tl.load(seed_ptr), offs_m, offs_n, threshold, keep_scale)

    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(
            x_ptr + rows_m * stride_xm + offs_k[None, :] * stride_xk, mask=mask_m[:, None] & mask_k[None, :], other=0.0
        )
        w = tl.load(
            wt_ptr + offs_k[:, None].to(tl.int64) * stride_wk + offs_n.to(tl.int64)[None, :] * stride_wn,
            mask=mask_k[:, None] & mask_n[None, :],
            other=0.0,
        )
        acc = mma(acc, x, w, UPCAST, PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rows_m * stride_om + offs_n[None, :] * stride_on
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def lora_expand(
    x: torch.Tensor,
    wt: torch.Tensor,
    low: torch.Tensor,
    rt: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ wt + D(low @ rt) + bias`` for ``x [M, K]``, ``wt [K, N]``, ``low [M, R]``, ``rt [R, N]``; returns ``[M, N]``."""
    M, K = x.shape
    N = wt.shape[1]
    R = low.shape[1]
    assert wt.shape[0] == K and low.shape[0] == M and rt.shape == (R, N), "expand: inconsistent operand shapes"
    out = torch.empty((M, N), device=x.device, dtype=out_dtype or x.dtype)
    if M == 0 or N == 0:
        return out
    dropout = dropout_p > 0.0

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    with launch_lock:
        _lora_expand_kernel[grid](
            x, wt, low, rt, bias if bias is not None else x, out, seed if dropout else x,
            M, N, K, R, m_bucket(M),
            x.stride(0), x.stride(1), wt.stride(0), wt.stride(1), low.stride(0), low.stride(1),
            rt.stride(0), rt.stride(1), out.stride(0), out.stride(1),
            signed_threshold(dropout_p), 1.0 / (1.0 - dropout_p),
            HAS_BIAS=bias is not None,
            DROPOUT=dropout,
            UPCAST=is_interpreting(),
            PRECISION=dot_precision(x.dtype, wt.dtype, low.dtype),
            BLOCK_R=min(64, max(16, triton.next_power_of_2(R))),
        )  # fmt: skip
    return out
