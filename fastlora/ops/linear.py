"""``lora_linear``: one LoRA adapter over a linear layer, forward and backward, for training.

``lora_linear`` computes ``y = x·W0ᵀ + b + s·(D(x)·Aᵀ)·Bᵀ`` (see ``fastlora.reference`` for the math). Two entry points
run the same implementation (``_forward`` / ``_backward``):

- in eager mode, a ``torch.autograd.Function``: the cheapest way through the dispatcher, so a decode-size call costs
  little more Python than the kernels' launches (under ``torch.no_grad`` the forward is called directly);
- under ``torch.compile``, two custom ops, ``fastlora::lora_linear_fwd`` and ``fastlora::lora_linear_bwd``, each with a
  fake (meta) implementation, and an autograd formula registered on the forward, so ``torch.compile(fullgraph=True)``
  traces a model made of fastlora layers without graph breaks.

The backend is chosen per call (``fastlora.ops.common``). On the Triton backend a training step with dropout launches
six kernels: the seed draw, shrink and fused GEMM forward, and the three launches of ``fastlora.kernels.backward``.
The torch backend runs ``fastlora.ops.torch_linear`` (its own dropout masks, from a host-side seed).

What autograd keeps for the backward: ``x`` itself, the weights, ``xs = s·D(x)·Aᵀ`` (``[M, r]``) and the dropout
seed (one int64). The dropout mask is regenerated from the seed, so nothing of size ``M·K`` is stored.
"""

from __future__ import annotations

import math
import numbers

import torch

from .. import kernels
from . import torch_linear
from .common import (
    as_2d,
    check_base_layer,
    check_tensor_types,
    is_quantized,
    out_features,
    resolve_backend,
    weight_t,
)

_WHERE = "fastlora.lora_linear"
# A Python int seed is stored as one int64; ``draw_seed`` draws below 2**62.
_SEED_LIMIT = 2**63

FORWARD_IMPLS = ("auto", "onepass", "split")
# The one-pass forward wins while W0 dominates the traffic; beyond this many tokens the GEMM path does.
ONEPASS_MAX_TOKENS = 64
# ``auto`` takes the one-pass forward below this rank, and only with LoRA weights in the activation dtype: it
# recomputes ``x·Aᵀ`` in every column tile, which costs A's bytes again per tile, too much for a wide or fp32 A.
ONEPASS_AUTO_MAX_RANK = 32


def choose_forward_impl(M: int, r: int, impl: str = "auto", lora_is_wide: bool = False) -> str:
    """``"onepass"`` for few tokens (decode) and a narrow ``A``, ``"split"`` (shrink, then fused GEMM) otherwise.
    ``lora_is_wide``: the LoRA weights are wider than the activations (fp32 adapters on a 16-bit model)."""
    if impl not in FORWARD_IMPLS:
        raise ValueError(f"fastlora: forward_impl must be one of {FORWARD_IMPLS}, got {impl!r}")
    if impl == "auto":
        narrow = r <= ONEPASS_AUTO_MAX_RANK and not lora_is_wide
        return "onepass" if M <= ONEPASS_MAX_TOKENS and narrow else "split"
    if impl == "onepass" and r > kernels.ONEPASS_MAX_RANK:
        raise ValueError(f"fastlora: forward_impl='onepass' takes r <= {kernels.ONEPASS_MAX_RANK}, got r={r}")
    return impl


def _host_seed(seed) -> int | None:
    """The torch backend's seed as a Python int: its masks come from a host-seeded generator, so a tensor seed is read
    here (a synchronisation only when the torch backend is forced on GPU tensors)."""
    if seed is None or isinstance(seed, int):
        return seed
    return int(seed.reshape(-1)[0])


def _forward(x2d, wt, bias, lora_A, lora_B, seed, scaling, dropout_p, need_xs, forward_impl, backend):
    """``(y [M, N], xs [M, r] or None)`` for ``x2d [M, K]`` and ``wt [K, N]``."""
    if backend == "torch":
        if is_quantized(wt):  # the torch backend's one full-precision copy of W0, for this call only
            wt = wt.dequantize(x2d.dtype)
        # Never under autocast (``lora_linear`` turns it off around this call, after applying its casts).
        return torch_linear.forward(x2d, wt, bias, lora_A, lora_B, scaling, dropout_p, _host_seed(seed), need_xs)
    M, r = x2d.shape[0], lora_A.shape[0]
    wide = lora_A.element_size() > x2d.element_size()
    if choose_forward_impl(M, r, forward_impl, wide) == "onepass":
        xs = torch.empty((M, r), device=x2d.device, dtype=lora_A.dtype) if need_xs else None
        y = kernels.lora_onepass(x2d, wt, bias, lora_A.t(), lora_B.t(), scaling, dropout_p, seed, xs)
        return y, xs
    xs = kernels.lora_shrink(x2d, lora_A.t(), scaling, lora_A.dtype, dropout_p, seed)
    y = kernels.lora_expand(x2d, wt, xs, lora_B.t(), bias)
    return y, xs if need_xs else None


def _backward(dy2d, x2d, wt, lora_A, lora_B, xs, seed, scaling, dropout_p, need_dx, backend):
    """``(dx [M, K] or None, dA, dB)``, the LoRA gradients in the LoRA weights' dtype."""
    if backend == "torch":
        wt = wt.dequantize(dy2d.dtype) if is_quantized(wt) else wt
        args = (dy2d, x2d, wt, lora_A, lora_B, xs, scaling, dropout_p, _host_seed(seed), need_dx)
        if torch.is_autocast_enabled(x2d.device.type):
            # A backward called inside an autocast region: autocast would recast the GEMMs of an fp32 LoRA branch.
            with torch.autocast(x2d.device.type, enabled=False):
                return torch_linear.backward(*args)
        return torch_linear.backward(*args)
    return kernels.lora_backward(dy2d, x2d, wt.t(), lora_A, lora_B, xs, scaling, dropout_p, seed, need_dx)


def _refuse_double_backward(dy: torch.Tensor, saved: tuple) -> None:
    """Raise when the backward runs with ``create_graph=True`` (grad mode on inside it) and its result would need a
    graph: the kernels' gradients are not differentiable, and a silently constant first gradient would give wrong
    second-order gradients."""
    if dy.requires_grad or any(t is not None and t.requires_grad for t in saved):
        raise RuntimeError(
            f"{_WHERE}: second-order gradients (double backward, create_graph=True) are not supported: the backward "
            "is not differentiable; compute the gradient without create_graph=True"
        )


def _grads(ctx, dy, lora_grads):
    """The gradients of ``x``, ``W0``, ``b``, ``A`` and ``B`` (None where not needed) from what either entry point
    saved (the same fields on ``ctx``). ``lora_grads(dy, x, weight, lora_A, lora_B, xs, seed, need_dx)`` returns
    ``(dx, dA, dB)`` with ``dx`` shaped as ``x``. ``W0`` and ``b`` (frozen in LoRA training) get theirs from cuBLAS
    when a caller asks."""
    x, weight, lora_A, lora_B, xs, saved_seed = saved = ctx.saved_tensors
    weight = weight if ctx.qweight is None else ctx.qweight
    # ``ctx.saved_tensors`` is read once: non-reentrant activation checkpointing (transformers' default) refuses a
    # second unpack of the same saved tensor. A Python int seed of the eager path is on ``ctx``.
    seed = saved_seed if saved_seed is not None else getattr(ctx, "host_seed", None)
    if torch.is_grad_enabled():
        _refuse_double_backward(dy, saved)
    need_x, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
    dx = dA = dB = dW = db = None
    if need_x or need_a or need_bb:
        dx, dA, dB = lora_grads(dy, x, weight, lora_A, lora_B, xs, seed, need_x)
        dx = dx if need_x else None
        dA = dA if need_a else None
        dB = dB if need_bb else None
    dy2d = as_2d(dy)
    if need_w:
        dW = dy2d.t().to(x.dtype) @ as_2d(x)
        dW = dW.t() if ctx.fan_in_fan_out else dW
    if need_b:
        db = dy2d.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
    return dx, dW, db, dA, dB


# ------------------------------------------------------------------------------------------------ eager autograd


class _LoraLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, seed, scaling, dropout_p, fan_in_fan_out, forward_impl, backend):
        y, xs = _forward(
            as_2d(x), weight_t(weight, fan_in_fan_out), bias, lora_A, lora_B, seed, scaling, dropout_p, True,
            forward_impl, backend,
        )  # fmt: skip
        seed_tensor = seed if isinstance(seed, torch.Tensor) else None
        quantized = is_quantized(weight)
        # A 4-bit weight's tensors are the frozen layer's own buffers: kept on ctx, never copied.
        ctx.qweight = weight if quantized else None
        ctx.save_for_backward(x, None if quantized else weight, lora_A, lora_B, xs, seed_tensor)
        ctx.host_seed = seed if isinstance(seed, int) else None
        ctx.scaling = scaling
        ctx.dropout_p = dropout_p
        ctx.fan_in_fan_out = fan_in_fan_out
        ctx.backend = backend
        ctx.bias_dtype = bias.dtype if bias is not None else None
        # An output that is a view costs autograd's view tracking, some 10 µs a call: return y itself when x is 2-D.
        return y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        def lora_grads(dy, x, weight, lora_A, lora_B, xs, seed, need_dx):
            dx, dA, dB = _backward(
                as_2d(dy), as_2d(x), weight_t(weight, ctx.fan_in_fan_out), lora_A, lora_B, xs, seed, ctx.scaling,
                ctx.dropout_p, need_dx, ctx.backend,
            )  # fmt: skip
            return (dx.view(x.shape) if need_dx else None), dA, dB

        return *_grads(ctx, dy, lora_grads), *(None,) * 6


# ------------------------------------------------------------------------------------ custom ops (torch.compile)


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
    x2d = as_2d(x)
    y, xs = _forward(
        x2d, weight_t(weight, fan_in_fan_out), bias, lora_A, lora_B, seed, scaling, dropout_p, need_xs, forward_impl,
        backend,
    )  # fmt: skip
    if xs is None:
        xs = lora_A.new_empty((0, lora_A.shape[0]))
    return y.view(*x.shape[:-1], y.shape[-1]), xs


@_lora_linear_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, seed, scaling, dropout_p, fan_in_fan_out, need_xs, forward_impl, backend):
    N = out_features(weight, fan_in_fan_out)
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
    dx, dA, dB = _backward(
        as_2d(dy), as_2d(x), weight_t(weight, fan_in_fan_out), lora_A, lora_B, xs, seed, scaling, dropout_p, need_dx,
        backend,
    )  # fmt: skip
    return (dx.view(x.shape) if need_dx else x.new_empty((0,))), dA, dB


@_lora_linear_bwd.register_fake
def _(dy, x, weight, lora_A, lora_B, xs, seed, scaling, dropout_p, fan_in_fan_out, need_dx, backend):
    dx = x.new_empty(x.shape) if need_dx else x.new_empty((0,))
    return dx, torch.empty_like(lora_A), torch.empty_like(lora_B)


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, seed, scaling, dropout_p, fan_in_fan_out, _, _, backend = inputs
    _, xs = output
    ctx.save_for_backward(x, weight, lora_A, lora_B, xs, seed)
    ctx.qweight = None
    ctx.scaling = scaling
    ctx.dropout_p = dropout_p
    ctx.fan_in_fan_out = fan_in_fan_out
    ctx.backend = backend
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _op_backward(ctx, dy, _dxs):
    def lora_grads(dy, x, weight, lora_A, lora_B, xs, seed, need_dx):
        return _lora_linear_bwd(
            dy,
            x,
            weight,
            lora_A,
            lora_B,
            xs,
            seed,
            ctx.scaling,
            ctx.dropout_p,
            ctx.fan_in_fan_out,
            need_dx,
            ctx.backend,
        )

    return *_grads(ctx, dy, lora_grads), *(None,) * 7


_lora_linear_fwd.register_autograd(_op_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------- public API


def _check_seed(seed, device: torch.device) -> None:
    """``seed`` is None, an int in ``[0, 2**63)``, or an int64 tensor of one element on ``device``: a few attribute
    reads, never the tensor's value (on a GPU that would wait for the device)."""
    if seed is None:
        return
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64:
            raise TypeError(
                f"{_WHERE}: seed must be an int64 tensor (or a Python int), got a {seed.dtype} tensor; "
                "convert it with seed.long()"
            )
        if seed.numel() != 1:
            what = "an empty tensor" if seed.numel() == 0 else f"{seed.numel()} elements"
            raise ValueError(f"{_WHERE}: seed must hold exactly one element, got {what} (shape {tuple(seed.shape)})")
        if seed.device != device:
            raise ValueError(
                f"{_WHERE}: seed must be on x's device ({device}), got a tensor on {seed.device}; "
                f"create it there or move it with seed.to({str(device)!r})"
            )
        return
    if isinstance(seed, int) and not isinstance(seed, bool):
        if not 0 <= seed < _SEED_LIMIT:
            raise ValueError(f"{_WHERE}: seed must be in [0, 2**63) as a Python int, got {seed}")
        return
    raise TypeError(
        f"{_WHERE}: seed must be None, a Python int or an int64 tensor of one element, got {type(seed).__name__}"
    )


def _check_scaling(scaling) -> float:
    """``scaling`` as a finite float. A tensor must hold one element on the CPU and not require grad: its gradient would
    be lost, and reading a GPU tensor's value would wait for the device."""
    if type(scaling) is float:
        value = scaling
    elif isinstance(scaling, torch.Tensor):
        if scaling.requires_grad:
            raise ValueError(
                f"{_WHERE}: scaling is a tensor that requires grad, but gradients with respect to scaling are not "
                "supported; pass a Python float (or scaling.detach())"
            )
        if scaling.numel() != 1:
            raise ValueError(f"{_WHERE}: scaling must hold one element, got a tensor of shape {tuple(scaling.shape)}")
        if scaling.device.type != "cpu":
            raise ValueError(
                f"{_WHERE}: scaling must be a Python number or a CPU tensor, got a tensor on {scaling.device}: reading "
                "its value on the host would wait for the device"
            )
        if scaling.dtype == torch.bool or scaling.is_complex():
            raise TypeError(f"{_WHERE}: scaling must be a real number, got a {scaling.dtype} tensor")
        value = float(scaling)
    elif isinstance(scaling, numbers.Real) and not isinstance(scaling, bool):
        try:
            value = float(scaling)
        except OverflowError:
            value = math.inf
    else:
        raise TypeError(f"{_WHERE}: scaling must be a real number (int or float), got {type(scaling).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{_WHERE}: scaling must be finite, got {value}")
    return value


def _check_dropout(dropout_p, training) -> float:
    """The dropout probability applied: ``dropout_p`` when ``training``, else 0 (``dropout_p`` is checked either way)."""
    if type(dropout_p) is float and 0.0 <= dropout_p < 1.0 and type(training) is bool:
        return dropout_p if training else 0.0
    if type(dropout_p) is not float and (isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real)):
        raise TypeError(f"{_WHERE}: dropout_p must be a float in [0, 1), got {type(dropout_p).__name__} {dropout_p!r}")
    if not 0.0 <= dropout_p < 1.0:  # NaN fails both comparisons
        raise ValueError(f"{_WHERE}: dropout_p must be in [0, 1), got {dropout_p!r}")
    if training is not True and training is not False and not (type(training) is int and training in (0, 1)):
        raise TypeError(f"{_WHERE}: training must be a bool, got {type(training).__name__} {training!r}")
    return float(dropout_p) if training else 0.0


def _check_inputs(x, weight, bias, lora_A, lora_B, fan_in_fan_out, backend) -> None:
    tensors = {"x": x, "weight": weight, "bias": bias, "lora_A": lora_A, "lora_B": lora_B}
    K, N = check_base_layer(_WHERE, tensors, x, weight, bias, fan_in_fan_out, backend)
    if lora_A.dtype != lora_B.dtype:
        raise TypeError(f"{_WHERE}: lora_A.dtype ({lora_A.dtype}) and lora_B.dtype ({lora_B.dtype}) differ")
    if lora_A.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"{_WHERE}: lora_A/lora_B dtype must be float32 or x.dtype ({x.dtype}), got {lora_A.dtype}")
    if lora_A.dim() != 2 or lora_A.shape[0] < 1:
        raise ValueError(f"{_WHERE}: lora_A must be [r, K] with rank r >= 1, got {tuple(lora_A.shape)}")
    r = lora_A.shape[0]
    if lora_A.shape[1] != K:
        raise ValueError(f"{_WHERE}: lora_A must be [r, K] = [{r}, {K}], got {tuple(lora_A.shape)}")
    if tuple(lora_B.shape) != (N, r):
        raise ValueError(
            f"{_WHERE}: lora_B must be [N, r] = [{N}, {r}] to match weight and lora_A, got {tuple(lora_B.shape)}"
        )


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
    scaling: float | torch.Tensor,
    dropout_p: float = 0.0,
    training: bool = False,
    *,
    fan_in_fan_out: bool = False,
    forward_impl: str = "auto",
    backend: str | None = None,
    seed: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = x·W0ᵀ + b + scaling·(D(x)·lora_Aᵀ)·lora_Bᵀ``, differentiable in every tensor argument.

    Args:
        x: ``[..., K]`` activations (fp16, bf16 or fp32; any strides).
        weight: frozen ``W0``, ``[N, K]`` as in ``nn.Linear``, or ``[K, N]`` with ``fan_in_fan_out=True``
            (GPT-2 ``Conv1D``); same dtype as ``x``. Never copied. Or a 4-bit ``fastlora.nf4.QuantizedWeight``
            (QLoRA's NF4 / FP4 base, ``[N, K]``): the kernels dequantize its tiles to ``x.dtype`` in registers inside
            the GEMMs, so no full-precision copy of W0 exists (the torch backend dequantizes it for each call); no
            gradient flows to it. ``torch.compile`` traces such a call as an ``autograd.Function``, not as the custom
            ops below.
        bias: ``[N]`` (``x.dtype`` or fp32) or None.
        lora_A, lora_B: ``[r, K]`` and ``[N, r]`` (PEFT's shapes), fp32 or ``x.dtype``.
        scaling: ``lora_alpha / r`` (or ``/ sqrt(r)`` for rsLoRA): a finite real number, or a one-element CPU tensor
            that does not require grad (no gradient flows to ``scaling``; a GPU tensor is refused, as reading it would
            wait for the device).
        dropout_p: dropout on the LoRA branch's input, in ``[0, 1)``, applied only when ``training`` (a bool).
        forward_impl: ``"onepass"``, ``"split"`` (shrink, then fused GEMM) or ``"auto"`` (by token count, rank and
            LoRA dtype).
        backend: ``"auto"``, ``"triton"`` or ``"torch"``; defaults to ``FASTLORA_BACKEND`` or ``"auto"``.
        seed: dropout seed: a Python int in ``[0, 2**63)``, or an int64 tensor of exactly one element on
            ``x.device`` whose 64 bits are the key (any value; other integer dtypes and tensors on another device
            are refused rather than converted or moved, which would cost a launch or a copy per call). Checked on
            every call, even when no dropout applies. When omitted, the Triton backend draws one on the device from
            its default generator, the torch backend one on the host from the CPU generator (no device work);
            ``torch.manual_seed`` makes either reproducible. The two backends draw different masks: the Triton
            kernels' mask is the one ``fastlora.reference.dropout_mask`` reproduces bit for bit. The torch backend
            reads a tensor seed's value on the host (on a GPU tensor, a synchronisation).

    Returns:
        ``[..., N]`` in ``x.dtype``.

    Raises:
        TypeError / ValueError: an argument of the wrong type, dtype, shape, device or value (the message names it),
            before anything is computed; the inputs are left as they were.
        RuntimeError: a backward with ``create_graph=True`` (second-order gradients are not supported).
    """
    # Types and the scalar arguments first, before any attribute of a tensor argument is read.
    quantized = is_quantized(weight)
    if not (
        isinstance(x, torch.Tensor)
        and (quantized or isinstance(weight, torch.Tensor))
        and isinstance(lora_A, torch.Tensor)
        and isinstance(lora_B, torch.Tensor)
        and (bias is None or isinstance(bias, torch.Tensor))
    ):
        tensors = {"x": x, "bias": bias, "lora_A": lora_A, "lora_B": lora_B}
        if not quantized:
            tensors["weight"] = weight
        check_tensor_types(_WHERE, tensors, optional=("bias",))
    device = x.device
    _check_seed(seed, device)
    scaling = _check_scaling(scaling)
    p = _check_dropout(dropout_p, training)
    backend = resolve_backend(device, backend)
    if torch.is_autocast_enabled(device.type):
        # As nn.Linear under autocast: the base GEMM runs in the autocast dtype. fp32 LoRA weights stay fp32.
        dtype = torch.get_autocast_dtype(device.type)
        x, weight = x.to(dtype), (weight if quantized else weight.to(dtype))
        bias = bias.to(dtype) if bias is not None and bias.dtype != torch.float32 else bias
        if lora_A.dtype != torch.float32:
            lora_A, lora_B = lora_A.to(dtype), lora_B.to(dtype)
        if backend == "torch":
            # The casts above are autocast's whole effect: inside, it would recast the GEMMs of an fp32 LoRA branch
            # or bias and break the torch backend's dtype rules (the kernels never see autocast).
            with torch.autocast(device.type, enabled=False):
                return _lora_linear(
                    x, weight, bias, lora_A, lora_B, scaling, p, fan_in_fan_out, forward_impl, backend, seed
                )
    return _lora_linear(x, weight, bias, lora_A, lora_B, scaling, p, fan_in_fan_out, forward_impl, backend, seed)


def _lora_linear(x, weight, bias, lora_A, lora_B, scaling, p, fan_in_fan_out, forward_impl, backend, seed):
    """``lora_linear`` once its scalar arguments are checked and autocast applied: the checks of the tensors, then the
    entry point (custom op when compiling, autograd function when recording, the forward alone otherwise)."""
    _check_inputs(x, weight, bias, lora_A, lora_B, fan_in_fan_out, backend)
    choose_forward_impl(1, lora_A.shape[0], forward_impl)  # validates the name and the rank limit early
    compiling = torch.compiler.is_compiling()
    if p == 0.0:
        seed = None
    elif seed is None:
        seed = torch_linear.draw_seed() if backend == "torch" and not compiling else draw_seed(x.device)
    elif type(seed) is int and (backend == "triton" or compiling):
        # The kernels and the custom op read the seed from a tensor: a fill on the device, no copy from the host.
        seed = torch.full((1,), seed, dtype=torch.int64, device=x.device)
    quantized = is_quantized(weight)
    needs_grad = lora_B.requires_grad or lora_A.requires_grad or x.requires_grad
    needs_grad = needs_grad or (not quantized and weight.requires_grad) or (bias is not None and bias.requires_grad)
    if compiling and not quantized:
        need_xs = torch.is_grad_enabled() and needs_grad
        y, _ = _lora_linear_fwd(
            x, weight, bias, lora_A, lora_B, seed, scaling, p, fan_in_fan_out, need_xs, forward_impl, backend
        )
        return y
    if torch.is_grad_enabled() and needs_grad:
        return _LoraLinearFunction.apply(
            x, weight, bias, lora_A, lora_B, seed, scaling, p, fan_in_fan_out, forward_impl, backend
        )
    y, _ = _forward(
        as_2d(x), weight_t(weight, fan_in_fan_out), bias, lora_A, lora_B, seed, scaling, p, False, forward_impl, backend
    )
    return y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[-1])
