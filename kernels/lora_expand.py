"""Base GEMM with the LoRA expand in its epilogue: ``out = x @ wt + D_out(l @ rt) + bias``.

``x [M, K]``, ``wt [K, N]``, ``l [M, R]``, ``rt [R, N]``, all with any strides. One kernel serves two places:

- forward, large ``M`` ("shrink, then fused GEMM"): ``y = x·W0ᵀ + xs·Bᵀ + b`` with ``xs = s·D(x)·Aᵀ`` written by
  the shrink kernel; the expand is an extra K-chunk of ``R`` columns after the main loop;
- backward: ``dx = dy·W0 + D'(dxa·A)``, where ``D'`` is the forward's dropout mask on the output coordinates
  ``(row, col)`` of ``dx``, regenerated from the seed.

``out`` is written exactly once. The rank loop runs over ``R`` at run time in ``BLOCK_R`` steps, so ranks are not
compiled in.
"""

import torch
import triton
import triton.language as tl

from ._common import dot_precision, dropout_tile, fits_in_smem, is_interpreting, m_bucket, mma, signed_threshold
from ._common import tile_ids


def _expand_gpu_configs():
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in [
            (128, 256, 64, 8, 3),
            (256, 128, 64, 8, 3),
            (128, 128, 64, 8, 4),
            (128, 128, 64, 4, 4),
            (128, 128, 32, 4, 4),
            (128, 64, 64, 4, 4),
            (64, 128, 64, 4, 4),
            (64, 64, 64, 4, 4),
            (64, 64, 32, 4, 5),
        ]
    ]


def _expand_configs():
    if is_interpreting():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}, num_warps=4, num_stages=1)]
    return _expand_gpu_configs()


def expand_smem_elems(config: triton.Config) -> int:
    kw = config.kwargs
    return kw["BLOCK_K"] * (kw["BLOCK_M"] + kw["BLOCK_N"])


def _prune(configs, nargs, **kwargs):
    elem = max(nargs["x_ptr"].element_size(), nargs["wt_ptr"].element_size())
    keep = [c for c in configs if fits_in_smem(c, expand_smem_elems(c), elem)]
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

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + rows_m * stride_xm + offs_k[None, :] * stride_xk, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(wt_ptr + offs_k[:, None].to(tl.int64) * stride_wk + offs_n[None, :] * stride_wn, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = mma(acc, x, w, UPCAST, PRECISION)

    # The low-rank term: one more short reduction, over R.
    if DROPOUT:
        low = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        low = acc
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        lt = tl.load(l_ptr + rows_m * stride_lm + offs_r[None, :] * stride_lr, mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        rt = tl.load(rt_ptr + offs_r[:, None] * stride_rr + offs_n[None, :] * stride_rn, mask=mask_r[:, None] & mask_n[None, :], other=0.0)
        low = mma(low, lt, rt, UPCAST, PRECISION)
    if DROPOUT:
        acc += dropout_tile(low, tl.load(seed_ptr), offs_m, offs_n, threshold, keep_scale)
    else:
        acc = low

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rows_m * stride_om + offs_n[None, :] * stride_on
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def lora_expand(
    x: torch.Tensor,
    wt: torch.Tensor,
    l: torch.Tensor,
    rt: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ wt + D(l @ rt) + bias`` for ``x [M, K]``, ``wt [K, N]``, ``l [M, R]``, ``rt [R, N]``; returns ``[M, N]``."""
    M, K = x.shape
    N = wt.shape[1]
    R = l.shape[1]
    assert wt.shape[0] == K and l.shape[0] == M and rt.shape == (R, N), "expand: inconsistent operand shapes"
    out = torch.empty((M, N), device=x.device, dtype=out_dtype or x.dtype)
    if M == 0 or N == 0:
        return out
    dropout = dropout_p > 0.0

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    _lora_expand_kernel[grid](
        x, wt, l, rt, bias if bias is not None else x, out, seed if dropout else x,
        M, N, K, R, m_bucket(M),
        x.stride(0), x.stride(1), wt.stride(0), wt.stride(1), l.stride(0), l.stride(1),
        rt.stride(0), rt.stride(1), out.stride(0), out.stride(1),
        signed_threshold(dropout_p), 1.0 / (1.0 - dropout_p),
        HAS_BIAS=bias is not None,
        DROPOUT=dropout,
        UPCAST=is_interpreting(),
        PRECISION=dot_precision(x.dtype, wt.dtype, l.dtype),
        BLOCK_R=min(64, max(16, triton.next_power_of_2(R))),
    )  # fmt: skip
    return out
