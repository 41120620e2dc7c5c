"""``quant_linear``: a frozen 4-bit linear layer, ``y = x·dequant(W0)ᵀ + b``, forward and backward.

``W0`` is a ``fastlora.nf4.QuantizedWeight`` (bitsandbytes' NF4 / FP4 layout). On the Triton backend the forward runs
the LoRA kernels with no LoRA term: ``lora_onepass`` for a few tokens (decode, bound by reading the 4-bit weight) and
the fused GEMM ``lora_expand`` otherwise; the backward's ``dx = dy·dequant(W0)`` is ``lora_expand`` over ``W0``'s other
orientation. Either way the weight's tiles are dequantized in registers and no full-precision copy of ``W0`` is ever
written. The torch backend dequantizes ``W0`` for each call (``fastlora.nf4.QuantizedWeight.dequantize``), as
bitsandbytes does.

This is the layer of a quantized model that carries no adapter: gradients flow through it to the layers below, while
``W0`` and ``b`` stay frozen (no gradient is computed for them; a bias that requires grad is refused).
"""

from __future__ import annotations

import torch

from .. import kernels
from ..nf4 import QuantizedWeight
from .common import as_2d, check_base_layer, check_tensor_types, resolve_backend
from .linear import ONEPASS_MAX_TOKENS

_WHERE = "fastlora.quant_linear"


def _forward(x2d: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None, backend: str) -> torch.Tensor:
    if backend == "torch":
        return torch.nn.functional.linear(
            x2d, weight.dequantize(x2d.dtype), bias.to(x2d.dtype) if bias is not None else None
        )
    M, K = x2d.shape
    N = weight.out_features
    if M <= ONEPASS_MAX_TOKENS:
        return kernels.lora_onepass(x2d, weight.t(), bias, x2d.new_empty((K, 0)), x2d.new_empty((0, N)), 0.0)
    return kernels.lora_expand(x2d, weight.t(), x2d.new_empty((M, 0)), x2d.new_empty((0, N)), bias)


def _dx(dy2d: torch.Tensor, weight: QuantizedWeight, backend: str) -> torch.Tensor:
    if backend == "torch":
        return dy2d @ weight.dequantize(dy2d.dtype)
    M = dy2d.shape[0]
    K = weight.in_features
    return kernels.lora_expand(dy2d, weight, dy2d.new_empty((M, 0)), dy2d.new_empty((0, K)))


class _QuantLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, weight, backend):
        ctx.weight = weight
        ctx.backend = backend
        y = _forward(as_2d(x), weight, bias, backend)
        return y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        dx = _dx(as_2d(dy), ctx.weight, ctx.backend)
        return dx.view(*dy.shape[:-1], dx.shape[-1]), None, None, None


def quant_linear(
    x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None = None, *, backend: str | None = None
) -> torch.Tensor:
    """``y = x·dequant(weight)ᵀ + bias`` for ``x [..., K]`` (fp16, bf16 or fp32: the dtype the weight is dequantized
    to) and a 4-bit ``weight`` ``[N, K]``; differentiable in ``x`` only. Returns ``[..., N]`` in ``x.dtype``.

    Raises TypeError / ValueError naming the argument (type, dtype, shape, device) before anything is computed."""
    if not isinstance(weight, QuantizedWeight):
        raise TypeError(f"{_WHERE}: weight must be a fastlora.nf4.QuantizedWeight, got {type(weight).__name__}")
    check_tensor_types(_WHERE, {"x": x, "bias": bias}, optional=("bias",))
    backend = resolve_backend(x.device, backend)
    check_base_layer(_WHERE, {"x": x, "bias": bias}, x, weight, bias, False, backend)
    if bias is not None and bias.requires_grad:
        raise ValueError(f"{_WHERE}: the bias of a 4-bit layer is frozen here; it requires grad (detach it)")
    if torch.is_autocast_enabled(x.device.type):
        x = x.to(torch.get_autocast_dtype(x.device.type))
    if torch.is_grad_enabled() and x.requires_grad:
        return _QuantLinearFunction.apply(x, bias, weight, backend)
    y = _forward(as_2d(x), weight, bias, backend)
    return y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[-1])
