"""``lora_linear``: one LoRA adapter over a linear layer, forward and backward, for training.

``lora_linear`` computes ``y = x·W0ᵀ + b + s·(D(x)·Aᵀ)·Bᵀ`` (see ``fastlora.reference`` for the math). It is made
of two custom ops, ``fastlora::lora_linear_fwd`` and ``fastlora::lora_linear_bwd``, each with a fake (meta)
implementation, and an autograd formula registered on the forward, so ``torch.compile(fullgraph=True)`` traces a
model made of fastlora layers without graph breaks, and eager autograd runs the fused backward. The backend is chosen
per call (``fastlora.ops.common``).

What autograd keeps for the backward: ``x`` itself, the weights, ``xs = s·D(x)·Aᵀ`` (``[M, r]``) and the dropout
seed (one int64). The dropout mask is regenerated from the seed, so nothing of size ``M·K`` is stored.
"""

from __future__ import annotations

import torch

from .. import kernels, reference
from .common import as_2d, check_base_layer, out_features, resolve_backend, weight_t

FORWARD_IMPLS = ("auto", "onepass", "split")
# The one-pass forward wins while W0 dominates the traffic; beyond this many tokens the GEMM path does.
ONEPASS_MAX_TOKENS = 64


def choose_forward_impl(M: int, r: int, impl: str = "auto") -> str:
    """``"onepass"`` for few tokens (decode), ``"split"`` (shrink, then fused GEMM) otherwise."""
    if impl not in FORWARD_IMPLS:
        raise ValueError(f"fastlora: forward_impl must be one of {FORWARD_IMPLS}, got {impl!r}")
    if impl == "auto":
        return "onepass" if M <= ONEPASS_MAX_TOKENS and r <= kernels.ONEPASS_MAX_RANK else "split"
    if impl == "onepass" and r > kernels.ONEPASS_MAX_RANK:
        raise ValueError(f"fastlora: forward_impl='onepass' takes r <= {kernels.ONEPASS_MAX_RANK}, got r={r}")
    return impl


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
    x2d = as_2d(x)
    wt = weight_t(weight, fan_in_fan_out)
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
    x2d = as_2d(x)
    dy2d = as_2d(dy)
    wt = weight_t(weight, fan_in_fan_out)
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
    dy2d = as_2d(dy)
    if need_w:
        # W0 is frozen in LoRA training; when a caller does want its gradient, cuBLAS computes it.
        dW = dy2d.t().to(x.dtype) @ as_2d(x)
        dW = dW.t() if ctx.fan_in_fan_out else dW
    if need_b:
        db = dy2d.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
    return dx, dW, db, dA, dB, None, None, None, None, None, None, None


_lora_linear_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------- public API


def _check_inputs(x, weight, bias, lora_A, lora_B, dropout_p, fan_in_fan_out, backend) -> None:
    tensors = {"x": x, "weight": weight, "bias": bias, "lora_A": lora_A, "lora_B": lora_B}
    K, N = check_base_layer("fastlora.lora_linear", tensors, x, weight, bias, fan_in_fan_out, backend)
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
