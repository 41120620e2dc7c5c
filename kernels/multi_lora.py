"""Many adapters in one batch: ``y[t] = x[t]·W0ᵀ + b + [slot(t) >= 0]·c[t]·(x[t]·A_sᵀ)·B_sᵀ``, ``s = slot(t)``.

``c[t] = scaling[s]·token_scale[t]``; ``A_s = a_pool[s, :rank_s]`` (``a_pool [num_slots, r_max, K]``) and
``B_s = b_pool[s, :, :rank_s]`` (``b_pool [num_slots, N, r_max]``). Which slot each token uses, and the tokens grouped
by slot, come from ``fastlora.ops.BatchMeta``. Three kernels, in the spirit of punica's SGMV/BGMV and S-LoRA:

- **segmented shrink** ``xa[t] = x[t]·A_sᵀ``: grid ``(segment, token block, rank block × K split)``. A segment holds
  the tokens of one slot (gathered through ``sorted_token_ids``), so every program runs one tensor-core GEMM tile
  against one adapter. A program whose rank block starts at or beyond its slot's rank returns at once, and the
  ``A_s`` loads stop at the rank: a rank-8 adapter in a pool sized for rank 128 reads 8 rows of ``A_s`` and runs one
  rank tile (``rank_tile``: 16 to 64 columns, from the batch's largest rank). Writes ``xa`` in fp32, unscaled, at the
  token's own row, one fp32 partial sum per K split: ``xa [SPLIT_K, T, R]`` (``R = meta.max_rank``) laid out as
  ``[T, SPLIT_K, R]``, so a token's partial sums sit side by side.
- **segmented expand** ``y[t] += round(c[t]·Σ_split xa[:, t])·B_sᵀ``: grid ``(segment, token block, N block)``; the
  rank loop stops at the slot's own rank and adds the K splits in a fixed order as it loads ``xa``. It adds into
  ``y`` from the base GEMM (cuBLAS ``x·W0ᵀ + b``); each ``(token, N block)`` belongs to exactly one program, so there
  are no atomics and the result is deterministic.
- **fused decode** (few tokens): the base GEMM tile ``[BLOCK_M tokens, BLOCK_N]`` streams ``x`` and ``W0`` once, and
  its epilogue adds every row's own expand, gathering ``B_s[n-block, r-chunk]`` per row (3-D gather
  ``[BLOCK_M, BLOCK_N, EPI_R]``) up to the largest rank in the tile; then the bias and the single store of ``y``. The
  rows with slot ``-1`` (rank 0) are masked, so their loads move no bytes, and a tile whose tokens have no adapter
  runs no epilogue iteration past the first chunk.

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
  would instead write ``y`` from cuBLAS and then read and write it again in the expand, and launch one more kernel;
- programmatic dependent launch (sm_90 and newer, ``pdl_enabled``): the shrink signals at its start that the fused
  kernel may launch, so the fused kernel's ``W0`` stream (the bulk of the layer's bytes) runs while the shrink's
  programs are still in flight instead of after them, and the launch gap between the two disappears. The fused
  kernel waits for the shrink (``griddepcontrol.wait``) only after its K loop, before its first load of ``xa``; the
  ``B_s`` loads do not depend on the shrink and may come before the wait. Every program waits, also one whose
  tokens have no adapter: the fused grid then never completes before the shrink, which the next kernel in the
  stream relies on (a fixed-size batch launches the shrink even when no token has an adapter). The shrink itself
  waits for the kernel before it (which wrote ``x``) before it lets the fused kernel start, so ``x`` is visible to
  both; when no shrink runs (no token has an adapter), the fused kernel is an ordinary launch;
- the ``B_s`` gather moves whole 16-byte vectors: ``r`` is the unit stride of ``b_pool``, and each rank chunk of
  ``EPI_R`` columns (8 for 16-bit pools, 4 for fp32 ones) is loaded with a mask constant along ``r`` (the row's rank
  reaches the chunk, the column is inside ``N``), so a row's chunk is one vector load instead of ``EPI_R`` scalar
  ones (with ``r_max`` a multiple of 16, whose strides the launcher specialises as 16-element aligned). The chunks
  run to the tile's largest rank rounded up to whole chunks, which stays inside ``r_max`` when ``EVEN_R`` (``r_max``
  a multiple of 8, so of every config's ``EPI_R``; otherwise the loads also stop at ``R`` and are scalar); the values
  past each row's own rank are read but zeroed before use, and ``xa`` stays masked at the row's rank (it is not
  written there);
- the first ``B_s`` chunk is loaded before the ``W0`` loop (``PREFETCH_B``), so its DRAM latency hides under the
  base GEMM instead of following it: with ranks up to ``EPI_R`` the epilogue then waits only for ``xa`` (a few KiB,
  in L2 from the shrink). The decode tiles' accumulators are small and a chunk is 128 bytes per thread, so it fits
  in registers next to the main loop; two configs whose main loop needs more load it after the loop (the static
  check holds every config to no spills and no ptxas advisory, on sm_80 and sm_90, with Triton 3.6 and 3.9).

Above ``fastlora.ops.MULTI_FUSED_MAX_TOKENS`` tokens the base GEMM is compute bound, so cuBLAS does it (the op in
``fastlora.ops`` chooses the path) and the segmented kernels add the low-rank terms with tensor-core tiles per adapter
segment. With few adapters of few tokens each, the segmented shrink's grid (one program per segment, token block and
rank block) would leave most of the GPU idle, e.g. 32 programs for 32 adapters on a 132-SM H100: it then splits K
(``segmented_splits``) until about two programs per SM are in flight, keeping at least 512 columns of K per split.
Each split writes one fp32 partial row per token (``T·R`` values, against the ``512·T`` activation elements it
reads), and the expand adds the splits in a fixed order as it loads ``xa``.

Limits: inference only (no backward). Ranks are read at run time from ``slot_ranks`` and clamped to ``R`` (the batch's
largest rank): a layer whose rank exceeds ``meta.max_rank`` breaks the caller's contract and is truncated, never read
out of bounds. Each K split of a shrink adds a partial-sum row per token (``SPLIT_K·T·R`` fp32).
"""

import functools
import os

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
    nf4_tile_fits,
    rank_tile,
    store_tile,
    store_with_bias,
    tile_ids,
    w_stage_bytes,
    weight_operand,
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
    # EPI_R rank columns per epilogue step make one 16-byte vector of the pool per row and column: 8 for 16-bit pools,
    # 4 for fp32 ones (``fused_config_ok`` keeps the configs that match the pool). The gather [BLOCK_M, BLOCK_N, EPI_R]
    # is then 128 bytes per thread. PREFETCH_B holds the first chunk across the main loop; the BLOCK_K = 128 tiles of
    # 1024 outputs spilled 8 bytes with it on sm_90 under Triton 3.6, so they load the chunk after the loop.
    return [
        triton.Config(
            {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "EPI_R": er, "PREFETCH_B": pf, "GROUP_M": 8},
            num_warps=w,
            num_stages=s,
        )
        for er in (8, 4)
        for bm, bn, bk, pf, w, s in [
            (16, 32, 128, True, 4, 4),
            (16, 64, 128, False, 4, 4),
            (16, 64, 64, True, 4, 5),
            (32, 32, 128, False, 4, 4),
            (32, 64, 64, True, 8, 4),
            (64, 32, 64, True, 8, 3),
        ]
    ]


def _fused_configs():
    if is_interpreting():  # EPI_R 8, as on a GPU for 16-bit pools
        return [
            triton.Config(
                {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "EPI_R": 8, "PREFETCH_B": True, "GROUP_M": 4},
                num_warps=4,
                num_stages=1,
            )
        ]
    return fused_gpu_configs()


# The largest EPI_R of the fused kernel's configs (GPU and interpreter), a multiple of every other one (powers of two):
# the launcher passes EVEN_R when r_max is a multiple of it, whichever config the autotuner then picks.
FUSED_EPI_R_ALIGN = max(config.kwargs["EPI_R"] for config in fused_gpu_configs() + _fused_configs())


def shrink_config_ok(config: triton.Config, act_bytes: int, lora_bytes: int, BLOCK_R: int, **_) -> bool:
    """Whether the shrink launcher may run ``config`` for these operand sizes (shared memory)."""
    kw = config.kwargs
    return fits_in_smem(config, kw["BLOCK_K"] * (kw["BLOCK_M"] * act_bytes + BLOCK_R * lora_bytes))


def expand_config_ok(config: triton.Config, act_bytes: int, lora_bytes: int, SPLIT_K: int = 1, **_) -> bool:
    """Whether the expand launcher may run ``config`` (``xa`` is fp32, one tile per K split; shared memory)."""
    kw = config.kwargs
    return fits_in_smem(config, kw["BLOCK_R"] * (kw["BLOCK_M"] * 4 * SPLIT_K + kw["BLOCK_N"] * lora_bytes))


def fused_config_ok(
    config: triton.Config, act_bytes: int, lora_bytes: int, QBLOCK: int = 0, QPACKED: int = 0, **_
) -> bool:
    """Whether the fused launcher may run ``config``: its epilogue steps are one 16-byte vector of the pool wide, and
    the main loop's pipelined x and W0 tiles fit in shared memory."""
    kw = config.kwargs
    w_bytes = w_stage_bytes(act_bytes, QBLOCK, QPACKED)
    return (
        kw["EPI_R"] * lora_bytes == 16
        and fits_in_smem(config, kw["BLOCK_K"] * (kw["BLOCK_M"] * act_bytes + kw["BLOCK_N"] * w_bytes))
        and nf4_tile_fits(config, kw["BLOCK_K"], kw["BLOCK_N"], act_bytes, QBLOCK)
    )


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
    USE_PDL: tl.constexpr,  # launched as a programmatic dependent launch (sm_90+): see the module docstring
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    if USE_PDL:
        # x is visible once the kernel before this one has flushed; then the fused kernel may start its W0 stream.
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
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
    k_per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_lo = pid_k * k_per_split
    k_len = tl.minimum(K - k_lo, k_per_split)  # this split's columns, from k_lo; <= 0 past the end of K
    # The slot's rank columns of A are the same at every K step: computed once, they cost fewer registers than a
    # ``load_tile`` that rebuilds them. Both bases start at the split's first column, so the loop's offsets and mask
    # count from 0 (with offsets from ``k_lo``, a 64x128 tile spilled on sm_80 for SPLIT_K > 1).
    a_cols = a_ptr + slot * stride_as + offs_r[None, :] * stride_ar + k_lo * stride_ak
    x_split = x_ptr + k_lo * stride_xk

    # The loop runs at least once, so that the accumulator reaching the store is always the MMAs' own: a K split
    # past the end of K (k_len <= 0) makes one fully masked step and writes zeros. With the trip count left
    # possibly zero (``range(0, k_len, BLOCK_K)``), ptxas serialised every wgmma of the loop on sm_90 (advisory
    # C7515, 64-row tile with bf16 x and fp32 A), and ``range(k_lo, k_lo + max(k_len, 1), ...)`` still did.
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, tl.maximum(k_len, 1), BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_len
        x = load_tile(x_split, tok, offs_k, stride_xm, stride_xk, mask_m, mask_k)
        a = tl.load(a_cols + offs_k[:, None] * stride_ak, mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        acc = mma(acc, x, a, UPCAST, PRECISION)

    store_tile(xa_ptr + pid_k * stride_os, acc, tok, offs_r, stride_om, stride_or, mask_m, mask_r)


@triton.autotune(
    configs=_expand_configs(),
    key=["M_BUCKET", "N", "R", "SPLIT_K"],
    prune_configs_by={"early_config_prune": config_pruner(expand_config_ok, "y_ptr", "b_ptr")},
    # The kernel adds into y: every timed launch of the tuner would add the LoRA term again.
    restore_value=["y_ptr"],
)
@triton.jit
def _multi_expand_kernel(
    # pointers
    xa_ptr,  # [T, SPLIT_K·R] fp32 from the shrink: each token's K-split partial sums side by side
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
    SPLIT_K: tl.constexpr,  # the shrink's K splits, summed here in a fixed order
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
        for split in tl.static_range(1, SPLIT_K):
            xa += load_tile(xa_ptr + split * R * stride_or, tok, offs_r, stride_om, stride_or, mask_m, mask_r)
        xs = (xa * scale[:, None]).to(b_ptr.dtype.element_ty)
        b = tl.load(b_cols + offs_r[:, None] * stride_br, mask=mask_r[:, None] & mask_n[None, :], other=0.0)
        acc = mma(acc, xs, b, UPCAST, PRECISION)

    acc += load_tile(y_ptr, tok, offs_n, stride_ym, stride_yn, mask_m, mask_n).to(tl.float32)
    store_tile(y_ptr, acc, tok, offs_n, stride_ym, stride_yn, mask_m, mask_n)


@triton.jit
def _b_chunk(b_rows, ranks, mask_n, r0, R, stride_br, EPI_R: tl.constexpr, EVEN_R: tl.constexpr):
    """Rank columns ``r0 .. r0 + EPI_R`` of ``B_s`` for every row whose rank reaches ``r0``, ``[BLOCK_M, BLOCK_N,
    EPI_R]``. With ``EVEN_R`` the mask (row, column) is constant along ``r``, so each row's run is whole vector
    loads; otherwise the loads also stop at ``R``. Columns past a row's own rank are loaded: the caller drops them."""
    offs_r = r0 + tl.arange(0, EPI_R)
    mask = (ranks > r0)[:, None, None] & mask_n[None, :, None]
    if not EVEN_R:
        mask = mask & (offs_r < R)[None, None, :]
    return tl.load(b_rows + offs_r[None, None, :] * stride_br, mask=mask, other=0.0)


@triton.jit
def _lora_chunk(b, xa_rows, ranks, scale, r0, stride_or, EPI_R: tl.constexpr):
    """``round(c·Σ_split xa[:, r0 : r0 + EPI_R])·bᵀ`` per row, ``[BLOCK_M, BLOCK_N]`` fp32, for one rank chunk ``b``
    of ``_b_chunk``: ``xa`` loads and ``b`` values stop at each row's own rank."""
    own = (r0 + tl.arange(0, EPI_R))[None, :] < ranks[:, None]  # [BLOCK_M, EPI_R]
    xa = tl.load(xa_rows + (r0 + tl.arange(0, EPI_R))[None, None, :] * stride_or, mask=own[None, :, :], other=0.0)
    xs = (tl.sum(xa, axis=0) * scale[:, None]).to(b.dtype).to(tl.float32)
    b = tl.where(own[:, None, :], b.to(tl.float32), 0.0)  # the pool past a row's rank may hold anything
    return tl.sum(xs[:, None, :] * b, axis=2)


@triton.autotune(
    configs=_fused_configs(),
    key=["M_BUCKET", "N", "K", "SPLIT_K", "stride_wk", "HAS_BIAS", "QBLOCK"],
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
    wq_absmax_ptr,  # W0's 4-bit quantization state, read only with QBLOCK > 0 (``load_w_tile``)
    wq_code_ptr,
    wq_absmax2_ptr,
    wq_code2_ptr,
    wq_offset_ptr,
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
    USE_PDL: tl.constexpr,  # launched as a programmatic dependent launch of the shrink (sm_90+)
    EVEN_R: tl.constexpr,  # r_max % EPI_R == 0: whole rank chunks stay inside the pool
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EPI_R: tl.constexpr,  # rank columns per epilogue step
    PREFETCH_B: tl.constexpr,  # load the first B chunk before the main loop
    GROUP_M: tl.constexpr,
    QBLOCK: tl.constexpr = 0,  # 0: W0 is dense; else it is 4-bit with this block size
    QBLOCK2: tl.constexpr = 0,  # with QBLOCK: 0, or the block size of the double-quantized absmax
    QPACKED: tl.constexpr = 0,  # with QBLOCK: how its tiles are read (``load_w_tile``)
):
    pid_m, pid_n = tile_ids(T, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < T
    mask_n = offs_n < N
    rows_m = offs_m.to(tl.int64)

    # Each row's adapter: rows without one have rank 0, so every load of the epilogue is masked off for them.
    slots = tl.load(token_slots_ptr + offs_m, mask=mask_m, other=-1)
    active = slots >= 0
    slots = tl.where(active, slots, 0).to(tl.int64)
    ranks = tl.where(active, tl.minimum(tl.load(ranks_ptr + slots, mask=active, other=0).to(tl.int32), R), 0)
    tile_rank = tl.max(ranks, axis=0)
    b_rows = b_ptr + slots[:, None, None] * stride_bs + offs_n[None, :, None] * stride_bn  # [BLOCK_M, BLOCK_N, 1]
    if PREFETCH_B:  # B does not depend on the shrink: its first chunk's latency hides under the main loop
        b_first = _b_chunk(b_rows, ranks, mask_n, 0, R, stride_br, EPI_R, EVEN_R)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = base_gemm(
        acc, x_ptr, wt_ptr, rows_m, offs_n, pid_n * BLOCK_N, mask_m, mask_n, K, stride_xm, stride_xk, stride_wk,
        stride_wn, wq_absmax_ptr, wq_code_ptr, wq_absmax2_ptr, wq_code2_ptr, wq_offset_ptr, UPCAST, PRECISION, BLOCK_K,
        BLOCK_N, QBLOCK, QBLOCK2, QPACKED,
    )  # fmt: skip

    if not PREFETCH_B:
        b_first = _b_chunk(b_rows, ranks, mask_n, 0, R, stride_br, EPI_R, EVEN_R)
    scale = tl.where(active, tl.load(scalings_ptr + slots, mask=active, other=0.0), 0.0)
    if HAS_TOKEN_SCALES:
        scale *= tl.load(token_scales_ptr + offs_m, mask=mask_m, other=0.0)
    if USE_PDL:  # xa is the shrink's: wait until it has flushed (every program: see the module docstring)
        tl.extra.cuda.gdc_wait()
    offs_s = tl.arange(0, SPLIT_K)
    xa_rows = xa_ptr + offs_s[:, None, None] * stride_os + rows_m[None, :, None] * stride_om  # [SPLIT_K, BLOCK_M, 1]
    lora = _lora_chunk(b_first, xa_rows, ranks, scale, 0, stride_or, EPI_R)
    for r0 in range(EPI_R, tile_rank, EPI_R):
        b = _b_chunk(b_rows, ranks, mask_n, r0, R, stride_br, EPI_R, EVEN_R)
        lora += _lora_chunk(b, xa_rows, ranks, scale, r0, stride_or, EPI_R)
    acc += lora

    store_with_bias(y_ptr, acc, bias_ptr, rows_m, offs_n, stride_ym, stride_yn, mask_m, mask_n, HAS_BIAS)


# ----------------------------------------------------------------------------------------------- launchers


def decode_splits(K: int) -> int:
    """K splits of the decode shrink: enough programs in flight when each adapter has a single token, and at least
    512 columns of K per split so that the partial sums stay a small fraction of the reads."""
    return max(1, min(8, triton.next_power_of_2(K) // 512))


# The segmented shrink's K splits: at most this many, each of at least this many columns of K, until about
# ``SEGMENTED_PROGRAMS_PER_SM`` programs per SM are in flight. The grid is estimated with 64-token blocks, the
# largest shrink tile, so that the estimate never overstates it.
MAX_SEGMENTED_SPLITS = 8
MIN_SPLIT_COLUMNS = 512
SEGMENTED_PROGRAMS_PER_SM = 2


def segmented_splits(num_segments: int, max_segment_len: int, R: int, K: int, device: torch.device) -> int:
    """K splits of the segmented shrink for a batch (host integers only: no device sync). Its grid has one program
    per segment, token block and rank block; when that underfills the GPU (few adapters with few tokens each), K is
    split in powers of two up to ``MAX_SEGMENTED_SPLITS``, keeping at least ``MIN_SPLIT_COLUMNS`` columns per split."""
    if num_segments == 0 or R == 0:
        return 1
    programs = num_segments * triton.cdiv(max_segment_len, 64) * triton.cdiv(R, rank_tile(R))
    target = SEGMENTED_PROGRAMS_PER_SM * sm_count(device)
    split = 1
    while split < MAX_SEGMENTED_SPLITS and programs * split < target and K >= 2 * split * MIN_SPLIT_COLUMNS:
        split *= 2
    return split


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.cache
def _cuda_major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``: the CUDA device's own count, 132 (an H100 SXM) elsewhere."""
    return _cuda_sm_count(_device_index(device)) if device.type == "cuda" else 132


def pdl_enabled(device: torch.device) -> bool:
    """Whether the decode kernels run as programmatic dependent launches on ``device``: CUDA devices of compute
    capability 9.0 and newer, unless ``FASTLORA_PDL=0``; never in the interpreter, which cannot run the
    grid-dependency instructions."""
    if is_interpreting() or device.type != "cuda" or os.environ.get("FASTLORA_PDL", "1") == "0":
        return False
    return _cuda_major(_device_index(device)) >= 9


# The segmented kernels put a segment's token blocks on grid axis 1, which CUDA caps at 65535 blocks; with the smallest
# BLOCK_M of 16 that is over a million tokens of one adapter in one batch.
MAX_SEGMENT_TOKENS = 65535 * 16


# Every launcher takes the batch's layout as the same eight trailing arguments, in this order (what
# ``fastlora.ops.BatchMeta.kernel_args()`` returns), and reads the ones it needs:
#   token_slots [T] int32 (-1 = no adapter), sorted_token_ids [T_active] int32 (tokens grouped by slot),
#   seg_offsets [S + 1] int32, seg_slots [S] int32, token_scales [T] fp32 or None,
#   num_segments, max_segment_len, max_rank (host integers: they size the grids, so no launch reads the device).


def _shrink_launches(num_segments: int, max_rank: int) -> bool:
    """Whether ``multi_lora_shrink`` launches its kernel for a batch (some token has an adapter of some rank)."""
    return num_segments > 0 and max_rank > 0


def multi_lora_shrink(
    x: torch.Tensor, a_pool: torch.Tensor, ranks: torch.Tensor,
    token_slots, sorted_token_ids, seg_offsets, seg_slots, token_scales, num_segments, max_segment_len, max_rank,
    split_k: int = 1,
) -> torch.Tensor:  # fmt: skip
    """``xa [split_k, T, max_rank]`` fp32: ``x[t]·A_sᵀ`` of each token with an adapter, summed over the ``split_k`` K
    slices of its row; other entries (tokens without an adapter, columns beyond a rank) are unwritten. In memory it is
    ``[T, split_k, max_rank]`` (a token's partial sums side by side), the layout ``multi_lora_expand`` reads."""
    T, K = x.shape
    R = max_rank
    xa = torch.empty((T, split_k, R), device=x.device, dtype=torch.float32).transpose(0, 1)
    if not _shrink_launches(num_segments, R):
        return xa
    BLOCK_R = rank_tile(R)
    pdl = pdl_enabled(x.device)

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
            USE_PDL=pdl,
            BLOCK_R=BLOCK_R,
            launch_pdl=pdl,
        )  # fmt: skip
    return xa


def multi_lora_expand(
    y: torch.Tensor, xa: torch.Tensor, b_pool: torch.Tensor, ranks: torch.Tensor, scalings: torch.Tensor,
    token_slots, sorted_token_ids, seg_offsets, seg_slots, token_scales, num_segments, max_segment_len, max_rank,
) -> torch.Tensor:  # fmt: skip
    """``y[t] += round(c[t]·Σ_split xa[:, t])·B_sᵀ`` in place for every token with an adapter; ``xa [split_k, T, R]``
    fp32 is ``multi_lora_shrink``'s output (any number of K splits, added in a fixed order)."""
    T, N = y.shape
    split_k, _, R = xa.shape
    if num_segments == 0 or R == 0 or N == 0:
        return y
    if split_k > 1 and xa.stride(0) != R * xa.stride(2):
        raise ValueError("multi_lora_expand: xa must be laid out as multi_lora_shrink writes it, [T, split_k, R]")

    def grid(cfg):
        return (num_segments, triton.cdiv(max_segment_len, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]))

    with launching("multi_lora_expand", xa, y, y):
        _multi_expand_kernel[grid](
            xa, b_pool, y, sorted_token_ids, seg_offsets, seg_slots, ranks, scalings,
            token_scales if token_scales is not None else scalings,
            N, R, m_bucket(max_segment_len),
            xa.stride(1), xa.stride(2), b_pool.stride(0), b_pool.stride(1), b_pool.stride(2), y.stride(0), y.stride(1),
            HAS_TOKEN_SCALES=token_scales is not None,
            UPCAST=is_interpreting(),
            PRECISION=dot_precision(b_pool.dtype),
            SPLIT_K=split_k,
        )  # fmt: skip
    return y


def multi_lora_fused(
    x: torch.Tensor, wt, bias, xa: torch.Tensor, b_pool: torch.Tensor, ranks: torch.Tensor,
    scalings: torch.Tensor,
    token_slots, sorted_token_ids, seg_offsets, seg_slots, token_scales, num_segments, max_segment_len, max_rank,
) -> torch.Tensor:  # fmt: skip
    """``x @ wt + bias`` plus every token's own expand ``round(c[t]·Σ_split xa[:, t])·B_sᵀ``, written once; ``xa``
    is ``multi_lora_shrink``'s output (any number of K splits), launched right before on the same stream: where
    ``pdl_enabled``, this kernel starts while that shrink runs and reads ``x`` before it waits for it. ``wt`` is a
    tensor or a 4-bit ``fastlora.nf4.QuantizedWeight`` view (dequantized tile by tile in the K loop)."""
    T, K = x.shape
    N = wt.shape[1]
    y = torch.empty((T, N), device=x.device, dtype=x.dtype)
    if T == 0 or N == 0:
        return y
    split_k, _, R = xa.shape
    even_r = b_pool.shape[2] % FUSED_EPI_R_ALIGN == 0  # whole rank chunks of any config stay inside r_max
    # Only behind a launched shrink, which waited for whatever wrote x: after any other kernel, this one could read x
    # before it is visible.
    pdl = _shrink_launches(num_segments, max_rank) and pdl_enabled(x.device)
    w = weight_operand(wt, x.dtype)

    def grid(cfg):
        return (triton.cdiv(T, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)

    with launching("multi_lora_fused", x, *w.tensors, bias, xa, y):
        _multi_fused_kernel[grid](
            x, w.ptr, bias if bias is not None else x, xa, b_pool, y, token_slots, ranks, scalings,
            token_scales if token_scales is not None else scalings, *w.args,
            T, N, K, R, m_bucket(T),
            x.stride(0), x.stride(1), w.stride0, w.stride1, xa.stride(0), xa.stride(1), xa.stride(2),
            b_pool.stride(0), b_pool.stride(1), b_pool.stride(2), y.stride(0), y.stride(1),
            HAS_BIAS=bias is not None,
            HAS_TOKEN_SCALES=token_scales is not None,
            UPCAST=is_interpreting(),
            PRECISION=dot_precision(x.dtype, w.dtype),
            SPLIT_K=split_k,
            USE_PDL=pdl,
            EVEN_R=even_r,
            QBLOCK=w.qblock,
            QBLOCK2=w.qblock2,
            QPACKED=w.qpacked,
            launch_pdl=pdl,
        )  # fmt: skip
    return y


# What the static check and the AOT build compile for GPUs.
SHRINK_GPU_KERNEL = GpuKernel("multi_lora_shrink", _multi_shrink_kernel.fn, shrink_gpu_configs(), shrink_config_ok)
EXPAND_GPU_KERNEL = GpuKernel("multi_lora_expand", _multi_expand_kernel.fn, expand_gpu_configs(), expand_config_ok)
FUSED_GPU_KERNEL = GpuKernel("multi_lora_fused", _multi_fused_kernel.fn, fused_gpu_configs(), fused_config_ok)
