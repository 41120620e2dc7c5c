"""Many adapters in one batch: ``y[t] = x[t]·W0ᵀ + b + [slot(t) >= 0]·c[t]·(x[t]·A_sᵀ)·B_sᵀ``, ``s = slot(t)``.

``c[t] = scaling[s]·token_scale[t]``; ``A_s = a_pool[s, :rank_s]`` (``a_pool [num_slots, r_max, K]``) and
``B_s = b_pool[s, :, :rank_s]`` (``b_pool [num_slots, N, r_max]``). Which slot each token uses, and the tokens grouped
by slot, come from ``fastlora.ops.BatchMeta``. Three kernels, in the spirit of punica's SGMV/BGMV and S-LoRA:

- **segmented shrink** ``xa[t] = x[t]·A_sᵀ``: grid ``(segment, token block, rank block × K split)``. A segment holds
  the tokens of one slot (gathered through ``sorted_token_ids``), so every program runs one tensor-core GEMM tile
  against one adapter. A program whose rank block starts at or beyond its slot's rank returns at once, and the
  ``A_s`` loads stop at the rank: a rank-8 adapter in a pool sized for rank 128 reads 8 rows of ``A_s`` and runs one
  rank tile (``rank_tile``: 16 to 64 columns, from the batch's largest rank). Writes ``xa`` in fp32, unscaled, at the
  token's own row (``xa [SPLIT_K, T, R]`` with ``R = meta.max_rank``), and one fp32 partial sum per K split.
- **segmented expand** ``y[t] += round(c[t]·xa[t])·B_sᵀ``: grid ``(segment, token block, N block)``; the rank loop
  stops at the slot's own rank. It adds into ``y`` from the base GEMM (cuBLAS ``x·W0ᵀ + b``); each ``(token,
  N block)`` belongs to exactly one program, so there are no atomics and the result is deterministic.
- **fused decode** (few tokens): the base GEMM tile ``[BLOCK_M tokens, BLOCK_N]`` streams ``x`` and ``W0`` once, and
  its epilogue adds every row's own expand, gathering ``B_s[n-block, r-chunk]`` per row (3-D gather, ``r`` is the
  unit stride of ``b_pool``, so each row reads contiguous runs) up to the largest rank in the tile; then the bias and
  the single store of ``y``. A tile whose tokens have no adapter runs no epilogue iteration; inside a mixed tile, the
  rows with slot ``-1`` (rank 0) are masked, so their loads move no bytes.

The scale ``c[t]`` is applied where ``xa`` is consumed, after the K splits are summed, and ``c[t]·xa[t]`` is rounded
to the pools' dtype before the expand, as the single-adapter kernels round ``s·xa``.

Memory traffic at decode (why the fused path looks this way). With ``T ≤ 64`` tokens the layer is bound by memory:
``W0`` (``N·K`` elements) dominates, and the LoRA terms must read each active adapter's ``A_s`` and ``B_s`` once.
For 32 distinct rank-16 adapters on a 4096×4096 fp16 layer that is 32 MiB of ``W0`` and 2 × 4 MiB of adapters, so
the floor is 1.25× the base GEMM and everything else must hide under those bytes:

- the shrink is a separate small launch, not recomputed per N tile as the single-adapter one-pass kernel does: that
  would read every ``A_s`` ``N / BLOCK_N`` times. With one token per adapter, a segment is a single row, so the
  shrink splits K (``decode_splits``) to put a few hundred programs in flight; the partial sums (a few KiB) are
  added by the consumer in a fixed order, keeping it deterministic without atomics;
- the fused kernel reads ``W0`` once when ``BLOCK_M ≥ T`` (the autotune key buckets ``T``), reads each token's
  ``B_s`` rows once per N tile (``N·rank`` elements per token in total), and writes ``y`` once. The segmented path
  would instead write ``y`` from cuBLAS and then read and write it again in the expand, and launch one more kernel.

Above ``fastlora.ops.MULTI_FUSED_MAX_TOKENS`` tokens the base GEMM is compute bound, so cuBLAS does it (the op in
``fastlora.ops`` chooses the path) and the segmented kernels add the low-rank terms with tensor-core tiles per adapter
segment.

Limits: inference only (no backward). Ranks are read at run time from ``slot_ranks`` and clamped to ``R`` (the batch's
largest rank): a layer whose rank exceeds ``meta.max_rank`` breaks the caller's contract and is truncated, never read
out of bounds. Each K split of the decode shrink adds a partial-sum row per token (``SPLIT_K·T·R`` fp32).
"""

import torch
import triton
import triton.language as tl

from ._common import (
    GpuKernel,
    base_gemm,
    config_pruner,
    dot_precision,
    fits_in_smem,
    is_interpreting,
    launching,
    load_tile,
    m_bucket,
    mma,
    rank_tile,
    store_tile,
    store_with_bias,
    tile_ids,
)

# ----------------------------------------------------------------------------------------------- configs


def shrink_gpu_configs() -> list[triton.Config]:
    """Every config the autotuner may pick on a GPU; the interpreter runs a single config of its own."""
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm, bk, w, s in [(16, 128, 4, 4), (16, 256, 4, 3), (32, 128, 4, 4), (64, 64, 4, 4), (64, 128, 8, 3)]
    ]


def _shrink_configs():
    if is_interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_K": 64}, num_warps=4, num_stages=1)]
    return shrink_gpu_configs()


def expand_gpu_configs() -> list[triton.Config]:
    """Every config the autotuner may pick on a GPU; the interpreter runs a single config of its own."""
    # BLOCK_R = 16, the smallest tensor-core K: the rank loop then stops within 15 columns of each slot's rank.
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_R": 16}, num_warps=w, num_stages=s)
        for bm, bn, w, s in [(16, 64, 4, 2), (32, 128, 4, 3), (64, 128, 4, 3), (64, 256, 8, 3), (128, 128, 8, 3)]
    ]


def _expand_configs():
    if is_interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_R": 16}, num_warps=4, num_stages=1)]
    return expand_gpu_configs()


def fused_gpu_configs() -> list[triton.Config]:
    """Every config the autotuner may pick on a GPU; the interpreter runs a single config of its own."""
    # EPI_R sets the epilogue's 3-D gather [BLOCK_M, BLOCK_N, EPI_R] to 64 values per thread: the main loop's tiles
    # are dead by then, so this is the register room left next to the accumulator.
    return [
        triton.Config(
            {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "EPI_R": er, "GROUP_M": 8}, num_warps=w, num_stages=s
        )
        for bm, bn, bk, er, w, s in [
            (16, 32, 128, 16, 4, 4),
            (16, 64, 128, 8, 4, 4),
            (16, 64, 64, 8, 4, 5),
            (32, 32, 128, 8, 4, 4),
            (32, 64, 64, 4, 4, 4),
            (64, 32, 64, 4, 4, 3),
            (64, 64, 64, 4, 8, 3),
        ]
    ]


def _fused_configs():
    if is_interpreting():
        return [
            triton.Config(
                {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "EPI_R": 8, "GROUP_M": 4}, num_warps=4, num_stages=1
            )
        ]
    return fused_gpu_configs()


def shrink_config_ok(config: triton.Config, act_bytes: int, lora_bytes: int, BLOCK_R: int, **_) -> bool:
    """Whether the shrink launcher may run ``config`` for these operand sizes (shared memory)."""
    kw = config.kwargs
    return fits_in_smem(config, kw["BLOCK_K"] * (kw["BLOCK_M"] * act_bytes + BLOCK_R * lora_bytes))


def expand_config_ok(config: triton.Config, act_bytes: int, lora_bytes: int, **_) -> bool:
    """Whether the expand launcher may run ``config`` (``xa`` is fp32; shared memory)."""
    kw = config.kwargs
    return fits_in_smem(config, kw["BLOCK_R"] * (kw["BLOCK_M"] * 4 + kw["BLOCK_N"] * lora_bytes))


def fused_config_ok(config: triton.Config, act_bytes: int, lora_bytes: int, **_) -> bool:
    """Whether the fused launcher may run ``config`` (the main loop's pipelined x and W0 tiles; shared memory)."""
    kw = config.kwargs
    return fits_in_smem(config, kw["BLOCK_K"] * (kw["BLOCK_M"] + kw["BLOCK_N"]) * act_bytes)


# ----------------------------------------------------------------------------------------------- kernels


@triton.autotune(
    configs=_shrink_configs(),
    key=["M_BUCKET", "K", "BLOCK_R", "SPLIT_K"],
    prune_configs_by={"early_config_prune": config_pruner(shrink_config_ok, "x_ptr", "a_ptr")},
)
@triton.jit
def _multi_shrink_kernel(
    # pointers
    x_ptr,  # [T, K]
    a_ptr,  # [num_slots, r_max, K]
    xa_ptr,  # [SPLIT_K, T, R] fp32, rows of tokens without an adapter are never written
    sorted_ids_ptr,  # [T_active] int32
    seg_offsets_ptr,  # [S + 1] int32
    seg_slots_ptr,  # [S] int32
    ranks_ptr,  # [num_slots]
    # sizes
    K,
    R,  # the width of xa: the batch's largest rank; ranks are clamped to it
    M_BUCKET,  # autotune key only
    # strides
    stride_xm,
    stride_xk,
    stride_as,
    stride_ar,
    stride_ak,
    stride_os,
    stride_om,
    stride_or,
    # meta-parameters
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    SPLIT_K: tl.constexpr,  # K splits: each writes its own partial sum, added by the consumer in a fixed order
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    seg = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_r = tl.program_id(2) // SPLIT_K
    pid_k = tl.program_id(2) % SPLIT_K
    start = tl.load(seg_offsets_ptr + seg)
    end = tl.load(seg_offsets_ptr + seg + 1)
    m0 = start + pid_m * BLOCK_M
    if m0 >= end:
        return
    slot = tl.load(seg_slots_ptr + seg).to(tl.int64)
    rank = tl.minimum(tl.load(ranks_ptr + slot).to(tl.int32), R)
    r0 = pid_r * BLOCK_R
    if r0 >= rank:
        return

    offs_m = m0 + tl.arange(0, BLOCK_M)
    mask_m = offs_m < end
    tok = tl.load(sorted_ids_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
    offs_r = r0 + tl.arange(0, BLOCK_R)
    mask_r = offs_r < rank
    # The slot's rank columns of A are the same at every K step: computed once, they cost fewer registers than a
    # ``load_tile`` that rebuilds them.
    a_cols = a_ptr + slot * stride_as + offs_r[None, :] * stride_ar
    k_per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(K, k_lo + k_per_split)

    # The loop runs at least once, so that the accumulator reaching the store is always the MMAs' own: a K split
    # past the end of K (k_hi <= k_lo) makes one fully masked step and writes zeros. With the trip count left
    # possibly zero (``range(k_lo, k_hi, BLOCK_K)``), ptxas serialised every wgmma of the loop on sm_90 (advisory
    # C7515, 64-row tile with bf16 x and fp32 A), and ``range(k_lo, k_lo + max(k_hi - k_lo, 1), ...)`` still did.
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, tl.maximum(k_hi - k_lo, 1), BLOCK_K):
        offs_k = k_lo + k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_hi
        x = load_tile(x_ptr, tok, offs_k, stride_xm, stride_xk, mask_m, mask_k)
        a = tl.load(a_cols + offs_k[:, None] * stride_ak, mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        acc = mma(acc, x, a, UPCAST, PRECISION)

    store_tile(xa_ptr + pid_k * stride_os, acc, tok, offs_r, stride_om, stride_or, mask_m, mask_r)


@triton.autotune(
    configs=_expand_configs(),
    key=["M_BUCKET", "N", "R"],
    prune_configs_by={"early_config_prune": config_pruner(expand_config_ok, "y_ptr", "b_ptr")},
    # The kernel adds into y: every timed launch of the tuner would add the LoRA term again.
    restore_value=["y_ptr"],
)
@triton.jit
def _multi_expand_kernel(
    # pointers
    xa_ptr,  # [T, R] fp32, from the shrink (one K split)
    b_ptr,  # [num_slots, N, r_max]
    y_ptr,  # [T, N], the base output, updated in place
    sorted_ids_ptr,  # [T_active] int32
    seg_offsets_ptr,  # [S + 1] int32
    seg_slots_ptr,  # [S] int32
    ranks_ptr,  # [num_slots]
    scalings_ptr,  # [num_slots] fp32
    token_scales_ptr,  # [T] fp32, read only with HAS_TOKEN_SCALES
    # sizes
    N,
    R,
    M_BUCKET,  # autotune key only
    # strides
    stride_om,
    stride_or,
    stride_bs,
    stride_bn,
    stride_br,
    stride_ym,
    stride_yn,
    # meta-parameters
    HAS_TOKEN_SCALES: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    seg = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_n = tl.program_id(2)
    start = tl.load(seg_offsets_ptr + seg)
    end = tl.load(seg_offsets_ptr + seg + 1)
    m0 = start + pid_m * BLOCK_M
    if m0 >= end:
        return
    slot = tl.load(seg_slots_ptr + seg).to(tl.int64)
    rank = tl.minimum(tl.load(ranks_ptr + slot).to(tl.int32), R)
    if rank <= 0:  # this layer is not adapted by the slot's adapter
        return

    offs_m = m0 + tl.arange(0, BLOCK_M)
    mask_m = offs_m < end
    tok = tl.load(sorted_ids_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    scale = tl.load(scalings_ptr + slot) + tl.zeros((BLOCK_M,), dtype=tl.float32)
    if HAS_TOKEN_SCALES:
        scale *= tl.load(token_scales_ptr + tok, mask=mask_m, other=0.0)
    # The slot's columns of B are the same at every step of the rank loop: computed once, they cost fewer registers
    # than a ``load_tile`` that rebuilds them.
    b_cols = b_ptr + slot * stride_bs + offs_n[None, :] * stride_bn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < rank
        xa = load_tile(xa_ptr, tok, offs_r, stride_om, stride_or, mask_m, mask_r)
        xs = (xa * scale[:, None]).to(b_ptr.dtype.element_ty)
        b = tl.load(b_cols + offs_r[:, None] * stride_br, mask=mask_r[:, None] & mask_n[None, :], other=0.0)
        acc = mma(acc, xs, b, UPCAST, PRECISION)

    acc += load_tile(y_ptr, tok, offs_n, stride_ym, stride_yn, mask_m, mask_n).to(tl.float32)
    store_tile(y_ptr, acc, tok, offs_n, stride_ym, stride_yn, mask_m, mask_n)


@triton.autotune(
    configs=_fused_configs(),
    key=["M_BUCKET", "N", "K", "SPLIT_K", "stride_wk", "HAS_BIAS"],
    prune_configs_by={"early_config_prune": config_pruner(fused_config_ok, "x_ptr", "b_ptr")},
)
@triton.jit
def _multi_fused_kernel(
    # pointers
    x_ptr,  # [T, K]
    wt_ptr,  # [K, N]  (a view of W0, either layout)
    bias_ptr,  # [N], read only with HAS_BIAS
    xa_ptr,  # [SPLIT_K, T, R] fp32 partial sums from the shrink
    b_ptr,  # [num_slots, N, r_max]
    y_ptr,  # [T, N]
    token_slots_ptr,  # [T] int32, -1 = no adapter
    ranks_ptr,  # [num_slots]
    scalings_ptr,  # [num_slots] fp32
    token_scales_ptr,  # [T] fp32, read only with HAS_TOKEN_SCALES
    # sizes
    T,
    N,
    K,
    R,
    M_BUCKET,  # autotune key only
    # strides
    stride_xm,
    stride_xk,
    stride_wk,
    stride_wn,
    stride_os,
    stride_om,
    stride_or,
    stride_bs,
    stride_bn,
    stride_br,
    stride_ym,
    stride_yn,
    # meta-parameters
    HAS_BIAS: tl.constexpr,
    HAS_TOKEN_SCALES: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    SPLIT_K: tl.constexpr,  # the shrink's K splits, summed here
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EPI_R: tl.constexpr,  # rank columns per epilogue step
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = tile_ids(T, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < T
    mask_n = offs_n < N
    rows_m = offs_m.to(tl.int64)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = base_gemm(
        acc, x_ptr, wt_ptr, rows_m, offs_n, mask_m, mask_n, K, stride_xm, stride_xk, stride_wk, stride_wn,
        UPCAST, PRECISION, BLOCK_K,
    )  # fmt: skip

    # Epilogue: each row's own adapter. Rows without one have rank 0, so every load below is masked off for them.
    slots = tl.load(token_slots_ptr + offs_m, mask=mask_m, other=-1)
    active = slots >= 0
    slots = tl.where(active, slots, 0).to(tl.int64)
    ranks = tl.where(active, tl.minimum(tl.load(ranks_ptr + slots, mask=active, other=0).to(tl.int32), R), 0)
    scale = tl.where(active, tl.load(scalings_ptr + slots, mask=active, other=0.0), 0.0)
    if HAS_TOKEN_SCALES:
        scale *= tl.load(token_scales_ptr + offs_m, mask=mask_m, other=0.0)
    tile_rank = tl.max(ranks, axis=0)
    offs_s = tl.arange(0, SPLIT_K)
    b_rows = b_ptr + slots[:, None, None] * stride_bs + offs_n[None, :, None] * stride_bn  # [BLOCK_M, BLOCK_N, 1]
    xa_rows = xa_ptr + offs_s[:, None, None] * stride_os + rows_m[None, :, None] * stride_om  # [SPLIT_K, BLOCK_M, 1]
    lora = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, tile_rank, EPI_R):
        offs_r = r0 + tl.arange(0, EPI_R)
        mask_r = offs_r[None, :] < ranks[:, None]  # [BLOCK_M, EPI_R]
        xa = tl.load(xa_rows + offs_r[None, None, :] * stride_or, mask=mask_r[None, :, :], other=0.0)
        xs = (tl.sum(xa, axis=0) * scale[:, None]).to(b_ptr.dtype.element_ty).to(tl.float32)
        b = tl.load(
            b_rows + offs_r[None, None, :] * stride_br, mask=mask_r[:, None, :] & mask_n[None, :, None], other=0.0
        )
        lora += tl.sum(xs[:, None, :] * b.to(tl.float32), axis=2)
    acc += lora

    store_with_bias(y_ptr, acc, bias_ptr, rows_m, offs_n, stride_ym, stride_yn, mask_m, mask_n, HAS_BIAS)


# ----------------------------------------------------------------------------------------------- launchers


def decode_splits(K: int) -> int:
    """K splits of the decode shrink: enough programs in flight when each adapter has a single token, and at least
    512 columns of K per split so that the partial sums stay a small fraction of the reads."""
    return max(1, min(8, triton.next_power_of_2(K) // 512))


# The segmented kernels put a segment's token blocks on grid axis 1, which CUDA caps at 65535 blocks; with the smallest
# BLOCK_M of 16 that is over a million tokens of one adapter in one batch.
MAX_SEGMENT_TOKENS = 65535 * 16


# Every launcher takes the batch's layout as the same eight trailing arguments, in this order (what
# ``fastlora.ops.BatchMeta.kernel_args()`` returns), and reads the ones it needs:
#   token_slots [T] int32 (-1 = no adapter), sorted_token_ids [T_active] int32 (tokens grouped by slot),
#   seg_offsets [S + 1] int32, seg_slots [S] int32, token_scales [T] fp32 or None,
#   num_segments, max_segment_len, max_rank (host integers: they size the grids, so no launch reads the device).


def multi_lora_shrink(
    x: torch.Tensor, a_pool: torch.Tensor, ranks: torch.Tensor,
    token_slots, sorted_token_ids, seg_offsets, seg_slots, token_scales, num_segments, max_segment_len, max_rank,
    split_k: int = 1,
) -> torch.Tensor:  # fmt: skip
    """``xa [split_k, T, max_rank]`` fp32: ``x[t]·A_sᵀ`` of each token with an adapter, summed over the ``split_k`` K
    slices of its row; other entries (tokens without an adapter, columns beyond a rank) are unwritten."""
    T, K = x.shape
    R = max_rank
    xa = torch.empty((split_k, T, R), device=x.device, dtype=torch.float32)
    if num_segments == 0 or R == 0:
        return xa
    BLOCK_R = rank_tile(R)

    def grid(cfg):
        return (num_segments, triton.cdiv(max_segment_len, cfg["BLOCK_M"]), triton.cdiv(R, BLOCK_R) * split_k)

    with launching("multi_lora_shrink", x, xa):
        _multi_shrink_kernel[grid](
            x, a_pool, xa, sorted_token_ids, seg_offsets, seg_slots, ranks,
            K, R, m_bucket(max_segment_len),
            x.stride(0), x.stride(1), a_pool.stride(0), a_pool.stride(1), a_pool.stride(2),
            xa.stride(0), xa.stride(1), xa.stride(2),
            UPCAST=is_interpreting(),
            PRECISION=dot_precision(x.dtype, a_pool.dtype),
            SPLIT_K=split_k,
            BLOCK_R=BLOCK_R,
        )  # fmt: skip
    return xa


def multi_lora_expand(
    y: torch.Tensor, xa: torch.Tensor, b_pool: torch.Tensor, ranks: torch.Tensor, scalings: torch.Tensor,
    token_slots, sorted_token_ids, seg_offsets, seg_slots, token_scales, num_segments, max_segment_len, max_rank,
) -> torch.Tensor:  # fmt: skip
    """``y[t] += round(c[t]·xa[t])·B_sᵀ`` in place for every token with an adapter; ``xa [T, R]`` fp32 from
    ``multi_lora_shrink`` (one K split)."""
    T, N = y.shape
    R = xa.shape[1]
    if num_segments == 0 or R == 0 or N == 0:
        return y

    def grid(cfg):
        return (num_segments, triton.cdiv(max_segment_len, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]))

    with launching("multi_lora_expand", xa, y, y):
        _multi_expand_kernel[grid](
            xa, b_pool, y, sorted_token_ids, seg_offsets, seg_slots, ranks, scalings,
            token_scales if token_scales is not None else scalings,
            N, R, m_bucket(max_segment_len),
            xa.stride(0), xa.stride(1), b_pool.stride(0), b_pool.stride(1), b_pool.stride(2), y.stride(0), y.stride(1),
            HAS_TOKEN_SCALES=token_scales is not None,
            UPCAST=is_interpreting(),
            PRECISION=dot_precision(b_pool.dtype),
        )  # fmt: skip
    return y


def multi_lora_fused(
    x: torch.Tensor, wt: torch.Tensor, bias, xa: torch.Tensor, b_pool: torch.Tensor, ranks: torch.Tensor,
    scalings: torch.Tensor,
    token_slots, sorted_token_ids, seg_offsets, seg_slots, token_scales, num_segments, max_segment_len, max_rank,
) -> torch.Tensor:  # fmt: skip
    """``x @ wt + bias`` plus every token's own expand ``round(c[t]·Σ_split xa[:, t])·B_sᵀ``, written once; ``xa``
    is ``multi_lora_shrink``'s output (any number of K splits)."""
    T, K = x.shape
    N = wt.shape[1]
    y = torch.empty((T, N), device=x.device, dtype=x.dtype)
    if T == 0 or N == 0:
        return y
    split_k, _, R = xa.shape

    def grid(cfg):
        return (triton.cdiv(T, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)

    with launching("multi_lora_fused", x, wt, bias, xa, y):
        _multi_fused_kernel[grid](
            x, wt, bias if bias is not None else x, xa, b_pool, y, token_slots, ranks, scalings,
            token_scales if token_scales is not None else scalings,
            T, N, K, R, m_bucket(T),
            x.stride(0), x.stride(1), wt.stride(0), wt.stride(1), xa.stride(0), xa.stride(1), xa.stride(2),
            b_pool.stride(0), b_pool.stride(1), b_pool.stride(2), y.stride(0), y.stride(1),
            HAS_BIAS=bias is not None,
            HAS_TOKEN_SCALES=token_scales is not None,
            UPCAST=is_interpreting(),
            PRECISION=dot_precision(x.dtype, wt.dtype),
            SPLIT_K=split_k,
        )  # fmt: skip
    return y


# What the static check and the AOT build compile for GPUs.
SHRINK_GPU_KERNEL = GpuKernel("multi_lora_shrink", _multi_shrink_kernel.fn, shrink_gpu_configs(), shrink_config_ok)
EXPAND_GPU_KERNEL = GpuKernel("multi_lora_expand", _multi_expand_kernel.fn, expand_gpu_configs(), expand_config_ok)
FUSED_GPU_KERNEL = GpuKernel("multi_lora_fused", _multi_fused_kernel.fn, fused_gpu_configs(), fused_config_ok)
