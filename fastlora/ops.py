"""The LoRA linear op: validation, backend dispatch, ``torch.library`` registration and autograd.

``lora_linear`` computes ``y = x·W0ᵀ + b + s·(D(x)·Aᵀ)·Bᵀ`` (see ``fastlora.reference`` for the math). It is made
of two custom ops, ``fastlora::lora_linear_fwd`` and ``fastlora::lora_linear_bwd``, each with a fake (meta)
implementation, and an autograd formula registered on the forward, so ``torch.compile(fullgraph=True)`` traces a
model made of fastlora layers without graph breaks, and eager autograd runs the fused backward.

Backends, chosen per call (``FASTLORA_BACKEND=auto|triton|torch`` or the ``backend`` argument):

- ``triton``: the kernels of ``fastlora.kernels``, on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1``
  was set before Triton was imported (the interpreter: slow, for tests);
- ``torch``: ``fastlora.reference``, the same math in PyTorch, for every other device;
- ``auto`` (default): ``triton`` for CUDA tensors and for CPU tensors under the interpreter, else ``torch``.

What autograd keeps for the backward: ``x`` itself, the weights, ``xs = s·D(x)·Aᵀ`` (``[M, r]``) and the dropout
seed (one int64). The dropout mask is regenerated from the seed, so nothing of size ``M·K`` is stored.
"""

from __future__ import annotations

import os

import torch

from . import kernels, reference
from .kernels._common import is_interpreting

BACKENDS = ("auto", "triton", "torch")
FORWARD_IMPLS = ("auto", "onepass", "split")
# The one-pass forward wins while W0 dominates the traffic; beyond this many tokens the GEMM path does.
ONEPASS_MAX_TOKENS = 64
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TORCH_DTYPES = _TRITON_DTYPES + (torch.float64,)


def resolve_backend(device: torch.device, backend: str | None = None) -> str:
    """The backend (``"triton"`` or ``"torch"``) that runs tensors on ``device``."""
    choice = backend or os.environ.get("FASTLORA_BACKEND", "auto") or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"fastlora: backend must be one of {BACKENDS}, got {choice!r} (FASTLORA_BACKEND or backend=)")
    if choice == "torch":
        return "torch"
    runs_triton = device.type == "cuda" or (device.type == "cpu" and is_interpreting())
    if choice == "triton" and not runs_triton:
        if device.type == "cpu":
            raise RuntimeError(
                "fastlora: backend 'triton' was forced for CPU tensors, but the Triton interpreter is off; "
                "set TRITON_INTERPRET=1 before importing triton, or use backend 'torch' or 'auto'"
            )
        raise RuntimeError(f"fastlora: backend 'triton' runs CUDA tensors, got tensors on {device}")
    return "triton" if runs_triton else "torch"


def choose_forward_impl(M: int, r: int, impl: str = "auto") -> str:
    """``"onepass"`` for few tokens (decode), ``"split"`` (shrink, then fused GEMM) otherwise."""
    if impl not in FORWARD_IMPLS:
        raise ValueError(f"fastlora: forward_impl must be one of {FORWARD_IMPLS}, got {impl!r}")
    if impl == "auto":
        return "onepass" if M <= ONEPASS_MAX_TOKENS and r <= kernels.ONEPASS_MAX_RANK else "split"
    if impl == "onepass" and r > kernels.ONEPASS_MAX_RANK:
        raise ValueError(f"fastlora: forward_impl='onepass' takes r <= {kernels.ONEPASS_MAX_RANK}, got r={r}")
    return impl


def _as_2d(x: torch.Tensor) -> torch.Tensor:
    """``x [..., K]`` as ``[M, K]``: a view whenever the leading dims collapse (kernels take any strides)."""
    try:
        return x.view(-1, x.shape[-1])
    except RuntimeError:
        return x.reshape(-1, x.shape[-1])


def _weight_t(weight: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """The ``[K, N]`` view of ``W0``, whichever way it is stored."""
    return weight if fan_in_fan_out else weight.t()


# ----------------------------------------------------------------------------------------------- custom ops


@torch.library.custom_op("fastlora::lora_linear_fwd", mutates_args=())
def _lora_linear_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    seed: torch.Tensor | None,
    scaling: float,
    dropout_p: float,
    fan_in_fan_out: bool,
    need_xs: bool,
    forward_impl: str,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    x2d = _as_2d(x)
    wt = _weight_t(weight, fan_in_fan_out)
    M, r = x2d.shape[0], lora_A.shape[0]
    if backend == "torch":
        y, xs = reference.lora_forward(x2d, wt, bias, lora_A, lora_B, scaling, dropout_p, seed)
        y = y.to(x.dtype)
        xs = xs if need_xs else xs.new_empty((0, r))
    elif choose_forward_impl(M, r, forward_impl) == "onepass":
        xs = torch.empty((M if need_xs else 0, r), device=x.device, dtype=lora_A.dtype)
        y = kernels.lora_onepass(
            x2d, wt, bias, lora_A.t(), lora_B.t(), scaling, dropout_p, seed, xs if need_xs else None
        )
    else:
        xs = kernels.lora_shrink(x2d, lora_A.t(), scaling, lora_A.dtype, dropout_p, seed)
        y = kernels.lora_expand(x2d, wt, xs, lora_B.t(), bias)
        if not need_xs:
            xs = xs.new_empty((0, r))
    return y.view(*x.shape[:-1], y.shape[-1]), xs


@_lora_linear_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, seed, scaling, dropout_p, fan_in_fan_out, need_xs, forward_impl, backend):
    N = weight.shape[1] if fan_in_fan_out else weight.shape[0]
    M = x.numel() // x.shape[-1] if need_xs else 0
    return x.new_empty((*x.shape[:-1], N)), lora_A.new_empty((M, lora_A.shape[0]))


@torch.library.custom_op("fastlora::lora_linear_bwd", mutates_args=())
def _lora_linear_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    xs: torch.Tensor,
    seed: torch.Tensor | None,
    scaling: float,
    dropout_p: float,
    fan_in_fan_out: bool,
    need_dx: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(dx, dA, dB)``; ``dx`` is empty unless ``need_dx``."""
    x2d = _as_2d(x)
    dy2d = _as_2d(dy)
    wt = _weight_t(weight, fan_in_fan_out)
    if backend == "torch":
        dx, dA, dB = reference.lora_backward(dy2d, x2d, wt, lora_A, lora_B, xs, scaling, dropout_p, seed)
        dx = dx.view(x.shape) if need_dx else dx.new_empty((0,))
        return dx, dA.to(lora_A.dtype), dB.to(lora_B.dtype)
    dxa = kernels.lora_shrink(dy2d, lora_B, scaling, lora_A.dtype)
    if need_dx:
        dx = kernels.lora_expand(dy2d, wt.t(), dxa, lora_A, None, dropout_p=dropout_p, seed=seed).view(x.shape)
    else:
        dx = x.new_empty((0,))
    dA = kernels.lora_wgrad(dxa, x2d, dropout_p, seed).to(lora_A.dtype)
    dB = kernels.lora_wgrad(xs, dy2d).t().to(lora_B.dtype).contiguous()
    return dx, dA, dB


@_lora_linear_bwd.register_fake
def _(dy, x, weight, lora_A, lora_B, xs, seed, scaling, dropout_p, fan_in_fan_out, need_dx, backend):
    dx = x.new_empty(x.shape) if need_dx else x.new_empty((0,))
    return dx, torch.empty_like(lora_A), torch.empty_like(lora_B)


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, seed, scaling, dropout_p, fan_in_fan_out, _, _, backend = inputs
    _, xs = output
    ctx.save_for_backward(x, weight, lora_A, lora_B, xs, seed)
    ctx.scaling = scaling
    ctx.dropout_p = dropout_p
    ctx.fan_in_fan_out = fan_in_fan_out
    ctx.backend = backend
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _backward(ctx, dy, _dxs):
    x, weight, lora_A, lora_B, xs, seed = ctx.saved_tensors
    need_x, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
    dx = dA = dB = dW = db = None
    if need_x or need_a or need_bb:
        dx, dA, dB = _lora_linear_bwd(
            dy, x, weight, lora_A, lora_B, xs, seed, ctx.scaling, ctx.dropout_p, ctx.fan_in_fan_out, need_x, ctx.backend
        )
        dx = dx if need_x else None
        dA = dA if need_a else None
        dB = dB if need_bb else None
    dy2d = _as_2d(dy)
    if need_w:
        # W0 is frozen in LoRA training; when a caller does want its gradient, cuBLAS computes it.
        dW = dy2d.t().to(x.dtype) @ _as_2d(x)
        dW = dW.t() if ctx.fan_in_fan_out else dW
    if need_b:
        db = dy2d.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
    return dx, dW, db, dA, dB, None, None, None, None, None, None, None


_lora_linear_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------- public API


def _check_base_layer(
    where: str, tensors: dict, x, weight, bias, fan_in_fan_out: bool, backend: str
) -> tuple[int, int]:
    """The checks every op shares: ``tensors`` (name -> tensor or None) are tensors on one device, and ``x``,
    ``weight``, ``bias`` make a linear layer of these dtypes and shapes. Returns ``(K, N)``."""
    for name, t in tensors.items():
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(t).__name__}")
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(f"{where}: all tensors must be on one device, got {devices}")
    allowed = _TRITON_DTYPES if backend == "triton" else _TORCH_DTYPES
    if x.dtype not in allowed:
        raise TypeError(f"{where}: x.dtype must be one of {allowed} on the {backend} backend, got {x.dtype}")
    if weight.dtype != x.dtype:
        raise TypeError(f"{where}: weight.dtype ({weight.dtype}) must equal x.dtype ({x.dtype})")
    if bias is not None and bias.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"{where}: bias.dtype must be x.dtype ({x.dtype}) or float32, got {bias.dtype}")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{where}: x must have shape [..., K] with K >= 1, got {tuple(x.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"{where}: weight must be 2-D, got shape {tuple(weight.shape)}")
    K = x.shape[-1]
    N, K_w = (weight.shape[1], weight.shape[0]) if fan_in_fan_out else weight.shape
    if K_w != K:
        layout = "[K, N] (fan_in_fan_out=True)" if fan_in_fan_out else "[N, K]"
        raise ValueError(
            f"{where}: weight {tuple(weight.shape)} read as {layout} has K={K_w}, but x has K={K} "
            f"(x.shape={tuple(x.shape)})"
        )
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"{where}: bias must be [N] = [{N}], got {tuple(bias.shape)}")
    return K, N


def _check_inputs(x, weight, bias, lora_A, lora_B, dropout_p, fan_in_fan_out, backend) -> None:
    tensors = {"x": x, "weight": weight, "bias": bias, "lora_A": lora_A, "lora_B": lora_B}
    K, N = _check_base_layer("fastlora.lora_linear", tensors, x, weight, bias, fan_in_fan_out, backend)
    if lora_A.dtype != lora_B.dtype:
        raise TypeError(f"fastlora.lora_linear: lora_A.dtype ({lora_A.dtype}) and lora_B.dtype ({lora_B.dtype}) differ")
    if lora_A.dtype not in (x.dtype, torch.float32):
        raise TypeError(
            f"fastlora.lora_linear: lora_A/lora_B dtype must be float32 or x.dtype ({x.dtype}), got {lora_A.dtype}"
        )
    if lora_A.dim() != 2 or lora_A.shape[0] < 1:
        raise ValueError(f"fastlora.lora_linear: lora_A must be [r, K] with rank r >= 1, got {tuple(lora_A.shape)}")
    r = lora_A.shape[0]
    if lora_A.shape[1] != K:
        raise ValueError(f"fastlora.lora_linear: lora_A must be [r, K] = [{r}, {K}], got {tuple(lora_A.shape)}")
    if tuple(lora_B.shape) != (N, r):
        raise ValueError(
            f"fastlora.lora_linear: lora_B must be [N, r] = [{N}, {r}] to match weight and lora_A, "
            f"got {tuple(lora_B.shape)}"
        )
    if not (isinstance(dropout_p, (int, float)) and 0.0 <= dropout_p < 1.0):
        raise ValueError(f"fastlora.lora_linear: dropout_p must be in [0, 1), got {dropout_p!r}")


def draw_seed(device: torch.device) -> torch.Tensor:
    """A dropout seed from the default generator of ``device``: ``torch.manual_seed`` makes runs reproducible,
    and every call draws a fresh one, so no two layers or steps share a mask."""
    return torch.randint(0, 2**62, (1,), device=device, dtype=torch.int64)


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = False,
    *,
    fan_in_fan_out: bool = False,
    forward_impl: str = "auto",
    backend: str | None = None,
    seed: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = x·W0ᵀ + b + scaling·(D(x)·lora_Aᵀ)·lora_Bᵀ``, differentiable in every tensor argument.

    Args:
        x: ``[..., K]`` activations (fp16, bf16 or fp32; any strides).
        weight: frozen ``W0``, ``[N, K]`` as in ``nn.Linear``, or ``[K, N]`` with ``fan_in_fan_out=True``
            (GPT-2 ``Conv1D``); same dtype as ``x``. Never copied.
        bias: ``[N]`` or None.
        lora_A, lora_B: ``[r, K]`` and ``[N, r]`` (PEFT's shapes), fp32 or ``x.dtype``.
        scaling: ``lora_alpha / r`` (or ``/ sqrt(r)`` for rsLoRA).
        dropout_p: dropout on the LoRA branch's input, applied only when ``training``.
        forward_impl: ``"onepass"``, ``"split"`` (shrink, then fused GEMM) or ``"auto"`` (by token count).
        backend: ``"auto"``, ``"triton"`` or ``"torch"``; defaults to ``FASTLORA_BACKEND`` or ``"auto"``.
        seed: dropout seed (int64 tensor of one element on ``x.device``); drawn from the default generator
            when omitted.

    Returns:
        ``[..., N]`` in ``x.dtype``.
    """
    backend = resolve_backend(x.device, backend)
    if torch.is_autocast_enabled(x.device.type):
        # As nn.Linear under autocast: the base GEMM runs in the autocast dtype. fp32 LoRA weights stay fp32.
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None and bias.dtype != torch.float32 else bias
        if lora_A.dtype != torch.float32:
            lora_A, lora_B = lora_A.to(dtype), lora_B.to(dtype)
    _check_inputs(x, weight, bias, lora_A, lora_B, dropout_p, fan_in_fan_out, backend)
    choose_forward_impl(1, lora_A.shape[0], forward_impl)  # validates the name and the rank limit early
    p = float(dropout_p) if training else 0.0
    if p > 0.0 and seed is None:
        seed = draw_seed(x.device)
    elif p == 0.0:
        seed = None
    need_xs = torch.is_grad_enabled() and (lora_B.requires_grad or lora_A.requires_grad or x.requires_grad)
    y, _ = _lora_linear_fwd(
        x, weight, bias, lora_A, lora_B, seed, float(scaling), p, fan_in_fan_out, need_xs, forward_impl, backend
    )
    return y


# ----------------------------------------------------------------------------------------------- many adapters

MULTI_IMPLS = ("auto", "fused", "segmented")
# Up to this many tokens (decode) the layer is bound by reading W0 once: the fused kernel does the base GEMM and the
# per-token expand in one pass over y. Beyond it the base GEMM is compute bound and cuBLAS plus the segmented
# shrink/expand (tensor-core tiles per adapter segment) win.
MULTI_FUSED_MAX_TOKENS = 64


def _check_multi_inputs(x, weight, bias, a_pool, b_pool, meta, slot_ranks, slot_scalings, fan_in_fan_out, backend):
    where = "fastlora.multi_lora_linear"
    for field in ("token_slots", "sorted_token_ids", "seg_offsets", "seg_slots", "num_tokens", "max_rank"):
        if not hasattr(meta, field):
            raise TypeError(f"{where}: meta must be a fastlora.serving.BatchMeta, got {type(meta).__name__}")
    tensors = {"x": x, "weight": weight, "bias": bias, "a_pool": a_pool, "b_pool": b_pool,
               "slot_ranks": slot_ranks, "slot_scalings": slot_scalings, "meta.token_slots": meta.token_slots,
               "meta.sorted_token_ids": meta.sorted_token_ids, "meta.slot_ranks": meta.slot_ranks,
               "meta.token_scales": meta.token_scales}  # fmt: skip
    K, N = _check_base_layer(where, tensors, x, weight, bias, fan_in_fan_out, backend)
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
        weight: frozen ``W0``, ``[N, K]``, or ``[K, N]`` with ``fan_in_fan_out=True``; same dtype as ``x``.
        bias: ``[N]`` (``x.dtype`` or fp32) or None.
        a_pool, b_pool: ``[num_slots, r_max, K]`` and ``[num_slots, N, r_max]``, fp32 or ``x.dtype``; slot ``s``
            uses ``a_pool[s, :rank_s]`` and ``b_pool[s, :, :rank_s]``. Entries beyond a slot's rank are never read.
        meta: the batch's ``fastlora.serving.BatchMeta`` (slot of each token, tokens grouped by slot).
        slot_ranks, slot_scalings: this layer's per-slot ranks (int32) and scalings (fp32), ``[num_slots]`` on
            ``x.device``, when they differ from ``meta.slot_ranks`` / ``meta.slot_scalings`` (PEFT's
            ``rank_pattern`` / ``alpha_pattern``); a layer's rank never exceeds the batch's ``meta.max_rank``.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``; defaults to ``FASTLORA_BACKEND`` or ``"auto"``.
        impl: ``"fused"``, ``"segmented"`` or ``"auto"`` (fused up to ``MULTI_FUSED_MAX_TOKENS`` tokens);
            triton backend only.

    Returns:
        ``[..., N]`` in ``x.dtype``.

    Inference only on the triton backend: with autograd recording and an input that requires grad it raises (run
    under ``torch.no_grad()``). The torch backend is differentiable. No call synchronises with the device on the
    triton backend: every grid is sized from ``meta``'s host integers.
    """
    backend = resolve_backend(x.device, backend)
    _check_multi_inputs(x, weight, bias, a_pool, b_pool, meta, slot_ranks, slot_scalings, fan_in_fan_out, backend)
    if impl == "auto" and meta.num_segments == 0:
        impl = "segmented"  # no token has an adapter: the vendor GEMM alone, nothing else is launched
    impl = choose_multi_impl(meta.num_tokens, impl)
    ranks = meta.slot_ranks if slot_ranks is None else slot_ranks
    scalings = meta.slot_scalings if slot_scalings is None else slot_scalings
    if backend == "torch":
        y = reference.multi_lora_linear_reference(
            x, weight, bias, a_pool, b_pool, meta.token_slots, ranks, scalings, meta.token_scales,
            fan_in_fan_out=fan_in_fan_out, active_slots=meta.active_slots,
        )  # fmt: skip
        return y.to(x.dtype)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, a_pool, b_pool)):
        raise RuntimeError(
            "fastlora.multi_lora_linear: the triton backend is inference only and an input requires grad; "
            "call it under torch.no_grad() (or torch.inference_mode()), or use backend='torch' to differentiate"
        )
    return _multi_lora_linear_fwd(
        x, weight, bias, a_pool, b_pool, meta.token_slots, meta.sorted_token_ids, meta.seg_offsets, meta.seg_slots,
        meta.token_scales, ranks, scalings, meta.num_segments, meta.max_segment_len, meta.max_rank, fan_in_fan_out,
        impl,
    )  # fmt: skip


# The Triton path as one custom op (a BatchMeta is not an op argument type, so its tensors and host integers are
# passed one by one): torch.compile traces code that calls it with a batch's metadata without graph breaks.
@torch.library.custom_op("fastlora::multi_lora_linear", mutates_args=())
def _multi_lora_linear_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    a_pool: torch.Tensor,
    b_pool: torch.Tensor,
    token_slots: torch.Tensor,
    sorted_token_ids: torch.Tensor,
    seg_offsets: torch.Tensor,
    seg_slots: torch.Tensor,
    token_scales: torch.Tensor | None,
    ranks: torch.Tensor,
    scalings: torch.Tensor,
    num_segments: int,
    max_segment_len: int,
    max_rank: int,
    fan_in_fan_out: bool,
    impl: str,
) -> torch.Tensor:
    from .serving.meta import BatchMeta  # a plain dataclass; imported here as fastlora.serving imports this module

    meta = BatchMeta(
        token_slots=token_slots, sorted_token_ids=sorted_token_ids, seg_offsets=seg_offsets, seg_slots=seg_slots,
        slot_ranks=ranks, slot_scalings=scalings, token_scales=token_scales, num_tokens=token_slots.numel(),
        num_segments=num_segments, max_segment_len=max_segment_len, max_rank=max_rank, active_slots=(),
    )  # fmt: skip
    y = kernels.multi_lora_linear_triton(
        _as_2d(x), _weight_t(weight, fan_in_fan_out), bias, a_pool, b_pool, meta, ranks, scalings, impl
    )
    return y.view(*x.shape[:-1], y.shape[-1])


@_multi_lora_linear_fwd.register_fake
def _(x, weight, bias, a_pool, b_pool, token_slots, sorted_token_ids, seg_offsets, seg_slots, token_scales, ranks,
      scalings, num_segments, max_segment_len, max_rank, fan_in_fan_out, impl):  # fmt: skip
    N = weight.shape[1] if fan_in_fan_out else weight.shape[0]
    return x.new_empty((*x.shape[:-1], N))
