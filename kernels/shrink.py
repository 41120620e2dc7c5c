"""Shrink: ``out[M, R] = scale · D(x)[M, K] @ wt[K, R]``, the thin GEMM on the LoRA branch.

Used twice per layer: in the forward for ``xs = s · D(x)·Aᵀ`` (``wt`` is a transposed view of ``A``, dropout on
``x``) and in the backward for ``dxa = s · dy·B`` (no dropout). Accumulates in fp32 and stores in ``out``'s
dtype. ``R`` is any rank: the tile over it is a power of two of at least 16 and the grid covers ranks above
64 with more column tiles, so no rank is compiled in.
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
    m_bucket,
    mma,
    rank_tile,
    signed_threshold,
    store_tile,
)


def gpu_configs() -> list[triton.Config]:
    """Every config the autotuner may pick on a GPU; the interpreter runs a single config of its own."""
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm, bk, w, s in [
            (32, 128, 4, 4),
            (64, 64, 4, 4),
            (64, 128, 8, 3),
            # Two stages, not four: with dropout and bf16 operands at 3 or 4 stages, ptxas (given no register cap)
            # holds this 256-thread block to 128 registers on sm_80 and spills 8 B under Triton 3.6, and sm_90 takes
            # 247-254 of 255 registers under Triton 3.9. At 2 stages neither spills: 128/127 registers on sm_80/sm_90
            # under 3.6, 156/169 under 3.9 (`fastlora info`). Without dropout, large M also has 128x128 below.
            (128, 64, 8, 2),
            (128, 128, 8, 3),
            # With dropout only 32-row tiles run (config_ok); this one fits fp32 operands in sm_80's shared memory.
            (32, 64, 4, 4),
        ]
    ]


def _shrink_configs():
    if is_interpreting():
        return [triton.Config({"BLOCK_M": 64, "BLOCK_K": 64}, num_warps=4, num_stages=1)]
    return gpu_configs()


# Tiles (BLOCK_M, BLOCK_K, warps, stages) whose wgmma ptxas serialises on sm_90 (advisory C7515) without dropout, by
# (act bytes, LoRA bytes): 16-bit x converted to fp32 in registers for fp32 weights.
_SERIALISED = {(2, 4): {(128, 64, 8, 2), (64, 128, 8, 3)}}


def config_ok(config: triton.Config, act_bytes: int, lora_bytes: int, BLOCK_R: int, DROPOUT: bool, **_) -> bool:
    """Whether the launcher may run ``config`` for these operand sizes and switches (shared memory, spills)."""
    kw = config.kwargs
    if not fits_in_smem(config, kw["BLOCK_K"] * (kw["BLOCK_M"] * act_bytes + BLOCK_R * lora_bytes)):
        return False
    # Under a dropout mask x is rewritten in registers before its product, and ptxas (Triton 3.6's and 3.9's)
    # serialised the wgmma of every 64- and 128-row tile (C7515); 32 rows run mma.sync, which nothing serialises,
    # and a shrink is bound by reading x anyway.
    tile = (kw["BLOCK_M"], kw["BLOCK_K"], config.num_warps, config.num_stages)
    if DROPOUT:
        return kw["BLOCK_M"] < 64 and dropout_fits(config, kw["BLOCK_M"], kw["BLOCK_K"])
    if act_bytes == 4 and tile == (64, 128, 8, 3):
        return False  # its 180 KiB of stages fit only sm_90, where fp32 operands spill 8 B
    return tile not in _SERIALISED.get((act_bytes, lora_bytes), ())


@triton.autotune(
    configs=_shrink_configs(),
    key=["M_BUCKET", "K", "BLOCK_R", "DROPOUT"],
    prune_configs_by={"early_config_prune": config_pruner(config_ok, "x_ptr", "wt_ptr")},
)
@triton.jit
def _lora_shrink_kernel(
    # pointers
    x_ptr,  # [M, K]
    wt_ptr,  # [K, R]
    out_ptr,  # [M, R]
    seed_ptr,  # [1] int64, read only with DROPOUT
    # sizes
    M,
    K,
    R,
    M_BUCKET,  # autotune key only
    # strides
    stride_xm,
    stride_xk,
    stride_wk,
    stride_wr,
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
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_r = offs_r < R
    rows_m = offs_m.to(tl.int64)
    if DROPOUT:
        seed = tl.load(seed_ptr)

    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = load_tile(x_ptr, rows_m, offs_k, stride_xm, stride_xk, mask_m, mask_k)
        w = load_tile(wt_ptr, offs_k, offs_r, stride_wk, stride_wr, mask_k, mask_r)
        if DROPOUT:
            x = dropout_tile(x, seed, offs_m, offs_k, threshold, keep_scale).to(w.dtype)
        acc = mma(acc, x, w, UPCAST, PRECISION)

    store_tile(out_ptr, acc * scale, rows_m, offs_r, stride_om, stride_or, mask_m, mask_r)


def lora_shrink(
    x: torch.Tensor,
    wt: torch.Tensor,
    scale: float,
    out_dtype: torch.dtype,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
) -> torch.Tensor:
    """``scale · D(x) @ wt`` for ``x [M, K]`` and ``wt [K, R]`` with any strides; returns ``[M, R]``."""
    M, K = x.shape
    K2, R = wt.shape
    assert K == K2, f"shrink: x has K={K} but wt has {K2} rows"
    out = torch.empty((M, R), device=x.device, dtype=out_dtype)
    if M == 0:
        return out
    dropout = dropout_p > 0.0
    BLOCK_R = rank_tile(R)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(R, BLOCK_R))

    with launching("lora_shrink", x, wt, out):
        _lora_shrink_kernel[grid](
            x, wt, out, seed if dropout else x,
            M, K, R, m_bucket(M),
            x.stride(0), x.stride(1), wt.stride(0), wt.stride(1), out.stride(0), out.stride(1),
            scale, signed_threshold(dropout_p), 1.0 / (1.0 - dropout_p),
            DROPOUT=dropout,
            UPCAST=is_interpreting(),
            PRECISION=dot_precision(x.dtype, wt.dtype),
            BLOCK_R=BLOCK_R,
        )  # fmt: skip
    return out


# What the static check and the AOT build compile for GPUs.
GPU_KERNEL = GpuKernel("lora_shrink", _lora_shrink_kernel.fn, gpu_configs(), config_ok)
