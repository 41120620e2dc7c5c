"""LoRA weight gradients: ``out[R, Q] = uᵀ[R, M] @ D(v)[M, Q]``, a reduction over the tokens ``M``.

- ``dA = dxaᵀ·D(x)`` with ``u = dxa [M, r]``, ``v = x [M, K]`` and the forward's dropout mask on ``v``;
- ``dBᵀ = xsᵀ·dy`` with ``u = xs = s·D(x)·Aᵀ [M, r]``, ``v = dy [M, N]``.

Deterministic, with no atomics: when there are too few output tiles to fill the GPU, the token range is split
into ``SPLIT`` fixed chunks, each program writes its fp32 partial sum to its own slice of a
``[SPLIT, R, Q]`` buffer, and the slices are added in index order. The split depends only on the shape, so
two runs give bitwise-equal gradients.
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

# A split chunk is a multiple of the largest BLOCK_M, so every program but the last sees whole tiles.
CHUNK_ALIGN = 128
TARGET_PROGRAMS = 256


def gpu_configs() -> list[triton.Config]:
    """Every config the autotuner may pick on a GPU; the interpreter runs a single config of its own."""
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_Q": bq}, num_warps=w, num_stages=s)
        for bm, bq, w, s in [(64, 64, 4, 4), (64, 128, 4, 4), (128, 64, 4, 3), (128, 128, 8, 3), (32, 256, 8, 3)]
    ]


def _wgrad_configs():
    if is_interpreting():
        return [triton.Config({"BLOCK_M": 64, "BLOCK_Q": 64}, num_warps=4, num_stages=1)]
    return gpu_configs()


def config_ok(config: triton.Config, act_bytes: int, lora_bytes: int, BLOCK_R: int, DROPOUT: bool, **_) -> bool:
    """Whether the launcher may run ``config`` for these operand sizes and switches (shared memory, spills)."""
    kw = config.kwargs
    if not fits_in_smem(config, kw["BLOCK_M"] * (kw["BLOCK_Q"] * act_bytes + BLOCK_R * lora_bytes)):
        return False
    return not DROPOUT or dropout_fits(config, kw["BLOCK_M"], kw["BLOCK_Q"])


@triton.autotune(
    configs=_wgrad_configs(),
    key=["M_BUCKET", "Q", "BLOCK_R", "DROPOUT"],
    prune_configs_by={"early_config_prune": config_pruner(config_ok, "v_ptr", "u_ptr")},
)
@triton.jit
def _lora_wgrad_kernel(
    # pointers
    u_ptr,  # [M, R]
    v_ptr,  # [M, Q]
    out_ptr,  # [SPLIT, R, Q] fp32
    seed_ptr,  # [1] int64, read only with DROPOUT
    # sizes
    M,
    R,
    Q,
    chunk,  # tokens per split
    M_BUCKET,  # autotune key only
    # strides
    stride_um,
    stride_ur,
    stride_vm,
    stride_vq,
    stride_os,
    stride_or,
    stride_oq,
    # scalars
    threshold,
    keep_scale,
    # meta-parameters
    DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr,
):
    pid_q = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_q = offs_q < Q
    mask_r = offs_r < R
    m_start = pid_s * chunk
    m_end = min(m_start + chunk, M)
    if DROPOUT:
        seed = tl.load(seed_ptr)

    acc = tl.zeros((BLOCK_R, BLOCK_Q), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < m_end
        rows = offs_m.to(tl.int64)
        ut = load_tile(u_ptr, offs_r, rows, stride_ur, stride_um, mask_r, mask_m)
        v = load_tile(v_ptr, rows, offs_q, stride_vm, stride_vq, mask_m, mask_q)
        if DROPOUT:
            v = dropout_tile(v, seed, offs_m, offs_q, threshold, keep_scale).to(ut.dtype)
        acc = mma(acc, ut, v, UPCAST, PRECISION)

    store_tile(out_ptr + pid_s * stride_os, acc, offs_r, offs_q, stride_or, stride_oq, mask_r, mask_q)


def split_count(M: int, R: int, Q: int) -> tuple[int, int]:
    """``(SPLIT, chunk)`` for a reduction over ``M`` tokens: enough programs to fill a large GPU.

    A function of the shape alone, never of the device or the timing, which keeps gradients deterministic.
    """
    tiles = triton.cdiv(Q, 128) * triton.cdiv(R, 64)
    split = max(1, min(triton.cdiv(TARGET_PROGRAMS, tiles), triton.cdiv(M, CHUNK_ALIGN)))
    chunk = triton.cdiv(triton.cdiv(M, split), CHUNK_ALIGN) * CHUNK_ALIGN
    return triton.cdiv(M, chunk), chunk


def lora_wgrad(
    u: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0, seed: torch.Tensor | None = None
) -> torch.Tensor:
    """``uᵀ @ D(v)`` in fp32 for ``u [M, R]`` and ``v [M, Q]`` with any strides; returns ``[R, Q]``."""
    M, R = u.shape
    Q = v.shape[1]
    assert v.shape[0] == M, "wgrad: u and v have different token counts"
    if M == 0:
        return torch.zeros((R, Q), device=u.device, dtype=torch.float32)
    split, chunk = split_count(M, R, Q)
    partial = torch.empty((split, R, Q), device=u.device, dtype=torch.float32)
    dropout = dropout_p > 0.0
    BLOCK_R = rank_tile(R)

    def grid(meta):
        return (triton.cdiv(Q, meta["BLOCK_Q"]), triton.cdiv(R, BLOCK_R), split)

    with launching("lora_wgrad", u, v, partial):
        _lora_wgrad_kernel[grid](
            u, v, partial, seed if dropout else u,
            M, R, Q, chunk, m_bucket(M),
            u.stride(0), u.stride(1), v.stride(0), v.stride(1),
            partial.stride(0), partial.stride(1), partial.stride(2),
            signed_threshold(dropout_p), 1.0 / (1.0 - dropout_p),
            DROPOUT=dropout,
            UPCAST=is_interpreting(),
            PRECISION=dot_precision(u.dtype, v.dtype),
            BLOCK_R=BLOCK_R,
        )  # fmt: skip
    # Summed in index order: deterministic.
    return partial[0] if split == 1 else partial.sum(0)


# What the static check and the AOT build compile for GPUs.
GPU_KERNEL = GpuKernel("lora_wgrad", _lora_wgrad_kernel.fn, gpu_configs(), config_ok)
