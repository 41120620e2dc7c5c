"""``multi_lora_linear``: every token of a batch adds the LoRA update of its own adapter slot, for serving.

``y[t] = x[t]·W0ᵀ + b + [slot(t) >= 0]·token_scale[t]·scaling[slot]·(x[t]·A_slotᵀ)·B_slotᵀ`` over adapter pools
``a_pool [num_slots, r_max, K]`` / ``b_pool [num_slots, N, r_max]``; which slot each token uses comes from the batch's
``BatchMeta`` (``fastlora.ops.meta``). Two paths on the triton backend, chosen by token count:

- ``fused`` (decode, up to ``MULTI_FUSED_MAX_TOKENS`` tokens): the layer is bound by reading ``W0`` once, so a small
  shrink with K splits runs first and one kernel does the base GEMM with every token's expand in its epilogue;
- ``segmented``: the base GEMM is compute bound, so the vendor GEMM (cuBLAS) computes ``x·W0ᵀ + b`` and the
  segmented shrink and expand add the low-rank terms with tensor-core tiles per adapter segment.

The Triton path is one ``torch.library`` custom op (``fastlora::multi_lora_linear``) with a fake implementation, so
``torch.compile`` traces code that calls it with a batch's metadata without graph breaks. A ``BatchMeta`` is not an
op argument type: the op takes ``BatchMeta.kernel_args()``, the tensors and host integers the kernels read, and hands
them to the launchers as they are.
"""

from __future__ import annotations

import torch

from .. import kernels, reference
from .common import (
    as_2d,
    check_base_layer,
    check_tensor_types,
    is_quantized,
    out_features,
    resolve_backend,
    weight_t,
)
from .meta import KernelArgs

MULTI_IMPLS = ("auto", "fused", "segmented")
# Up to this many tokens (decode) the layer is bound by reading W0 once: the fused kernel does the base GEMM and the
# per-token expand in one pass over y. Beyond it the base GEMM is compute bound and cuBLAS plus the segmented
# shrink/expand (tensor-core tiles per adapter segment) win.
MULTI_FUSED_MAX_TOKENS = 64


_WHERE = "fastlora.multi_lora_linear"
_META_FIELDS = ("token_slots", "sorted_token_ids", "seg_offsets", "seg_slots", "num_tokens", "max_rank")


def _check_multi_types(x, weight, bias, a_pool, b_pool, meta, slot_ranks, slot_scalings) -> dict:
    """``meta`` is a ``BatchMeta`` and every tensor argument (``meta``'s included) a tensor, checked before any attribute
    of one is read; returns them by name for ``check_base_layer``."""
    for field in _META_FIELDS:
        if not hasattr(meta, field):
            raise TypeError(f"{_WHERE}: meta must be a fastlora.ops.BatchMeta, got {type(meta).__name__}")
    tensors = {"x": x, "weight": weight, "bias": bias, "a_pool": a_pool, "b_pool": b_pool,
               "slot_ranks": slot_ranks, "slot_scalings": slot_scalings, "meta.token_slots": meta.token_slots,
               "meta.sorted_token_ids": meta.sorted_token_ids, "meta.slot_ranks": meta.slot_ranks,
               "meta.token_scales": meta.token_scales}  # fmt: skip
    if is_quantized(weight):
        del tensors["weight"]  # a 4-bit weight, not a tensor: check_base_layer checks it apart
    check_tensor_types(_WHERE, tensors, ("bias", "slot_ranks", "slot_scalings", "meta.token_scales"))
    return tensors


def _check_multi_inputs(
    x, weight, bias, a_pool, b_pool, meta, tensors, slot_ranks, slot_scalings, fan_in_fan_out, backend
) -> None:
    where = _WHERE
    K, N = check_base_layer(where, tensors, x, weight, bias, fan_in_fan_out, backend)
    if a_pool.dtype != b_pool.dtype:
        raise TypeError(f"{where}: a_pool.dtype ({a_pool.dtype}) and b_pool.dtype ({b_pool.dtype}) differ")
    if a_pool.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"{where}: the pools' dtype must be float32 or x.dtype ({x.dtype}), got {a_pool.dtype}")
    if a_pool.dim() != 3 or a_pool.shape[2] != K:
        raise ValueError(f"{where}: a_pool must be [num_slots, r_max, K={K}], got {tuple(a_pool.shape)}")
    num_slots, r_max = a_pool.shape[:2]
    if tuple(b_pool.shape) != (num_slots, N, r_max):
        raise ValueError(
            f"{where}: b_pool must be [num_slots, N, r_max] = [{num_slots}, {N}, {r_max}] to match weight and a_pool, "
            f"got {tuple(b_pool.shape)}"
        )
    T = x.numel() // K
    if T != meta.num_tokens or tuple(meta.token_slots.shape) != (T,):
        raise ValueError(
            f"{where}: x {tuple(x.shape)} holds {T} tokens but the batch metadata describes {meta.num_tokens}"
        )
    if meta.token_scales is not None and tuple(meta.token_scales.shape) != (T,):
        raise ValueError(f"{where}: meta.token_scales must be [T] = [{T}], got {tuple(meta.token_scales.shape)}")
    if meta.slot_ranks.numel() != num_slots:
        raise ValueError(
            f"{where}: the pools have {num_slots} slots but the batch metadata was built for {meta.slot_ranks.numel()}"
        )
    if meta.max_rank > r_max:
        raise ValueError(f"{where}: the batch uses rank {meta.max_rank} but the pools hold ranks up to r_max={r_max}")
    if backend == "triton" and meta.max_segment_len > kernels.MULTI_MAX_SEGMENT_TOKENS:
        raise ValueError(
            f"{where}: {meta.max_segment_len} tokens use one adapter in this batch; the kernels take at most "
            f"{kernels.MULTI_MAX_SEGMENT_TOKENS} per adapter and batch: split the batch"
        )
    if slot_ranks is not None:
        if tuple(slot_ranks.shape) != (num_slots,) or slot_ranks.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"{where}: slot_ranks must be an int32 (or int64) tensor [num_slots] = [{num_slots}], "
                f"got {slot_ranks.dtype} {tuple(slot_ranks.shape)}"
            )
    if slot_scalings is not None:
        if tuple(slot_scalings.shape) != (num_slots,) or slot_scalings.dtype != torch.float32:
            raise ValueError(
                f"{where}: slot_scalings must be a float32 tensor [num_slots] = [{num_slots}], "
                f"got {slot_scalings.dtype} {tuple(slot_scalings.shape)}"
            )


def choose_multi_impl(num_tokens: int, impl: str = "auto") -> str:
    """``"fused"`` (base GEMM with the per-token expand in its epilogue) for few tokens, else ``"segmented"``."""
    if impl not in MULTI_IMPLS:
        raise ValueError(f"fastlora.multi_lora_linear: impl must be one of {MULTI_IMPLS}, got {impl!r}")
    if impl == "auto":
        return "fused" if num_tokens <= MULTI_FUSED_MAX_TOKENS else "segmented"
    return impl


def multi_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    a_pool: torch.Tensor,
    b_pool: torch.Tensor,
    meta,
    *,
    slot_ranks: torch.Tensor | None = None,
    slot_scalings: torch.Tensor | None = None,
    fan_in_fan_out: bool = False,
    backend: str | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Every token adds the LoRA update of its own adapter slot:
    ``y[t] = x[t]·W0ᵀ + b + [slot(t) >= 0]·token_scale[t]·scaling[slot]·(x[t]·A_slotᵀ)·B_slotᵀ``.

    Args:
        x: ``[..., K]`` activations, ``T = meta.num_tokens`` rows once flattened (fp16, bf16 or fp32; any strides).
        weight: frozen ``W0``, ``[N, K]``, or ``[K, N]`` with ``fan_in_fan_out=True``; same dtype as ``x``. Or a
            4-bit ``fastlora.nf4.QuantizedWeight`` ``[N, K]`` (a QLoRA base): the kernels dequantize its tiles in
            registers (the fused decode kernel and the base GEMM of the segmented path), the torch backend
            dequantizes it for the call. Calls over a 4-bit weight are not a custom op (eager only).
        bias: ``[N]`` (``x.dtype`` or fp32) or None.
        a_pool, b_pool: ``[num_slots, r_max, K]`` and ``[num_slots, N, r_max]``, fp32 or ``x.dtype``; slot ``s``
            uses ``a_pool[s, :rank_s]`` and ``b_pool[s, :, :rank_s]``. Entries beyond a slot's rank are never read.
        meta: the batch's ``fastlora.ops.BatchMeta`` (slot of each token, tokens grouped by slot).
        slot_ranks, slot_scalings: this layer's per-slot ranks (int32) and scalings (fp32), ``[num_slots]`` on
            ``x.device``, when they differ from ``meta.slot_ranks`` / ``meta.slot_scalings`` (PEFT's
            ``rank_pattern`` / ``alpha_pattern``); a layer's rank never exceeds the batch's ``meta.max_rank``.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``; defaults to ``FASTLORA_BACKEND`` or ``"auto"``.
        impl: ``"fused"``, ``"segmented"`` or ``"auto"`` (fused up to ``MULTI_FUSED_MAX_TOKENS`` tokens);
            triton backend only.

    Returns:
        ``[..., N]`` in ``x.dtype``.

    Every argument is checked before anything is computed (a non-tensor, a wrong dtype, shape or device raises a
    TypeError or ValueError naming it). The values of the device tensors are not read: ``BatchMeta.build`` checks that
    the scalings and token scales it is given are finite, on the host; a layer's own ``slot_scalings`` are its
    caller's to keep finite.

    Inference only on the triton backend: with autograd recording and an input that requires grad it raises (run
    under ``torch.no_grad()``). The torch backend is differentiable. No call synchronises with the device on the
    triton backend: every grid is sized from ``meta``'s host integers.
    """
    tensors = _check_multi_types(x, weight, bias, a_pool, b_pool, meta, slot_ranks, slot_scalings)
    backend = resolve_backend(x.device, backend)
    _check_multi_inputs(
        x, weight, bias, a_pool, b_pool, meta, tensors, slot_ranks, slot_scalings, fan_in_fan_out, backend
    )
    if impl == "auto" and meta.num_segments == 0:
        impl = "segmented"  # no token has an adapter: the vendor GEMM alone, nothing else is launched
    impl = choose_multi_impl(meta.num_tokens, impl)
    ranks = meta.slot_ranks if slot_ranks is None else slot_ranks
    scalings = meta.slot_scalings if slot_scalings is None else slot_scalings
    quantized = is_quantized(weight)
    if backend == "torch" and quantized:
        weight = weight.dequantize(x.dtype)
    if backend == "torch":
        if meta.active_slots is None:  # fixed-size metadata: no host reads, no shapes that depend on the batch
            return _multi_lora_torch_dense(x, weight, bias, a_pool, b_pool, meta, ranks, scalings, fan_in_fan_out)
        y = reference.multi_lora_linear_reference(
            x, weight, bias, a_pool, b_pool, meta.token_slots, ranks, scalings, meta.token_scales,
            fan_in_fan_out=fan_in_fan_out, active_slots=meta.active_slots,
        )  # fmt: skip
        return y.to(x.dtype)
    inputs = (x, bias, a_pool, b_pool) if quantized else (x, weight, bias, a_pool, b_pool)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        raise RuntimeError(
            "fastlora.multi_lora_linear: the triton backend is inference only and an input requires grad; "
            "call it under torch.no_grad() (or torch.inference_mode()), or use backend='torch' to differentiate"
        )
    if quantized:
        y = multi_lora_triton(as_2d(x), weight.t(), bias, a_pool, b_pool, ranks, scalings, meta.kernel_args(), impl)
        return y.view(*x.shape[:-1], y.shape[-1])
    return _multi_lora_linear_op(
        x, weight, bias, a_pool, b_pool, ranks, scalings, *meta.kernel_args(), fan_in_fan_out, impl
    )


def _multi_lora_torch_dense(x, weight, bias, a_pool, b_pool, meta, ranks, scalings, fan_in_fan_out):
    """The torch backend over fixed-size metadata (``StaticBatch``): every token against every slot in two dense GEMMs,
    ``xa = x·[A_0; ...; A_{S-1}]ᵀ`` and ``y += xs·[B_0 ... B_{S-1}]ᵀ`` with ``xs`` zero outside each token's own slot
    and rank, so nothing reads the host or depends on which slots the batch uses (CUDA graphs, ``torch.compile``
    without recompiles). It costs ``num_slots`` times the LoRA FLOPs of the slot loop; entries beyond a slot's rank
    are never used (selected away, so even a NaN there cannot leak). Rounds ``c·xa`` to the pools' dtype as the
    kernels do."""
    w = weight.t() if fan_in_fan_out else weight
    x2d = x.reshape(-1, x.shape[-1])
    y = x2d @ w.t()
    if bias is not None:
        y = y + bias
    num_slots, r_max, K = a_pool.shape
    zero = torch.zeros((), dtype=a_pool.dtype, device=a_pool.device)
    keep = torch.arange(r_max, device=a_pool.device)[None, :] < ranks[:, None]  # [S, r]
    a = torch.where(keep[:, :, None], a_pool, zero).reshape(num_slots * r_max, K)
    b = torch.where(keep[:, None, :], b_pool, zero).permute(1, 0, 2).reshape(b_pool.shape[1], num_slots * r_max)
    own = meta.token_slots[:, None] == torch.arange(num_slots, device=x.device)[None, :]  # [T, S]
    scale = torch.where(own, scalings[None, :], 0.0)
    if meta.token_scales is not None:
        scale = scale * meta.token_scales[:, None]
    xa = (x2d.to(a_pool.dtype) @ a.t()).view(-1, num_slots, r_max)
    xs = torch.where(keep[None] & own[:, :, None], xa * scale[:, :, None], 0.0).to(a_pool.dtype)
    y = y + (xs.view(-1, num_slots * r_max) @ b.t()).to(y.dtype)
    return y.reshape(*x.shape[:-1], y.shape[-1]).to(x.dtype)


@torch.library.custom_op("fastlora::multi_lora_linear", mutates_args=())
def _multi_lora_linear_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    a_pool: torch.Tensor,
    b_pool: torch.Tensor,
    ranks: torch.Tensor,
    scalings: torch.Tensor,
    token_slots: torch.Tensor,
    sorted_token_ids: torch.Tensor,
    seg_offsets: torch.Tensor,
    seg_slots: torch.Tensor,
    token_scales: torch.Tensor | None,
    num_segments: int,
    max_segment_len: int,
    max_rank: int,
    fan_in_fan_out: bool,
    impl: str,
) -> torch.Tensor:
    batch = KernelArgs(
        token_slots, sorted_token_ids, seg_offsets, seg_slots, token_scales, num_segments, max_segment_len, max_rank
    )
    y = multi_lora_triton(
        as_2d(x), weight_t(weight, fan_in_fan_out), bias, a_pool, b_pool, ranks, scalings, batch, impl
    )
    return y.view(*x.shape[:-1], y.shape[-1])


@_multi_lora_linear_op.register_fake
def _(x, weight, bias, a_pool, b_pool, ranks, scalings, token_slots, sorted_token_ids, seg_offsets, seg_slots,
      token_scales, num_segments, max_segment_len, max_rank, fan_in_fan_out, impl):  # fmt: skip
    return x.new_empty((*x.shape[:-1], out_features(weight, fan_in_fan_out)))


def multi_lora_triton(
    x: torch.Tensor, wt: torch.Tensor, bias, a_pool: torch.Tensor, b_pool: torch.Tensor, ranks: torch.Tensor,
    scalings: torch.Tensor, batch: KernelArgs, impl: str,
) -> torch.Tensor:  # fmt: skip
    """The whole layer on the triton backend for ``x [T, K]`` and ``wt [K, N]`` (either layout of W0); ``batch`` is
    ``BatchMeta.kernel_args()``, handed to every launcher as its trailing arguments. ``impl`` is ``"fused"`` (decode: shrink with K splits, then the fused GEMM) or
    ``"segmented"`` (vendor base GEMM, then the segmented shrink, with K splits when its grid would underfill the
    GPU, and expand)."""
    has_lora = batch.num_segments > 0 and batch.max_rank > 0
    if impl == "fused":
        split_k = kernels.multi_decode_splits(x.shape[1]) if has_lora else 1
        xa = kernels.multi_lora_shrink(x, a_pool, ranks, *batch, split_k=split_k)
        return kernels.multi_lora_fused(x, wt, bias, xa, b_pool, ranks, scalings, *batch)
    y = _base_gemm(x, wt, bias)
    if has_lora and y.numel():
        split_k = kernels.multi_segmented_splits(
            batch.num_segments, batch.max_segment_len, batch.max_rank, x.shape[1], x.device
        )
        xa = kernels.multi_lora_shrink(x, a_pool, ranks, *batch, split_k=split_k)
        kernels.multi_lora_expand(y, xa, b_pool, ranks, scalings, *batch)
    return y


def _base_gemm(x: torch.Tensor, wt, bias) -> torch.Tensor:
    """``x @ wt + bias`` by the vendor GEMM, in ``x.dtype`` (an fp32 bias is added after the GEMM's rounding); over a
    4-bit W0, by the fused GEMM with no low-rank term, which dequantizes W0's tiles in its K loop."""
    if is_quantized(wt):
        return kernels.lora_expand(x, wt, x.new_empty((x.shape[0], 0)), x.new_empty((0, wt.shape[1])), bias)
    if bias is None:
        return x @ wt
    if bias.dtype == x.dtype:
        return torch.addmm(bias, x, wt)
    y = x @ wt
    y += bias
    return y
