"""Run the LoRA layers of an existing PEFT model through fastlora's fused op, leaving the model PEFT's own.

``patch_peft(model)`` replaces, per module instance, the ``forward`` of every PEFT ``lora.Linear`` whose base layer
is an ``nn.Linear`` (or a transformers ``Conv1D``, PEFT's ``fan_in_fan_out``), and of every PEFT QLoRA layer
(``lora.bnb.Linear4bit``, or a ``lora.Linear``) over a bitsandbytes ``Linear4bit`` (NF4 or FP4), by a small bound
method. Nothing else changes: no class swap, no copied parameter. The layer keeps its ``base_layer``, ``lora_A[name]``,
``lora_B[name]``, ``lora_dropout[name]`` and ``scaling[name]``, so PEFT's ``save_pretrained``, ``load_adapter``,
``set_adapter``, ``disable_adapter()``, ``merge_and_unload`` and the rest keep working on the very same objects.

Each call decides again whether fastlora computes it exactly (one active plain-LoRA adapter, plain tensors on one
device, dtypes the op takes). Every other call runs PEFT's own forward: disabled adapters, merged layers, DoRA and
the other LoRA variants, ``lora_bias``, several active adapters, mixed-adapter batches (``adapter_names=``),
hooks on the base layer (accelerate offloading, DeepSpeed ZeRO-3 gather parameters in them), tensor subclasses,
and dtypes outside the op's. So the math never changes silently; what differs is only rounding (fastlora adds the
LoRA branch to the fp32 accumulator before the single rounding of the output) and, in training with dropout, which
elements are dropped (fastlora's mask comes from its own seeded Philox stream, not from ``torch.bernoulli``).

A QLoRA layer runs ``lora_linear`` over the bitsandbytes weight read in place (``fastlora.nf4.from_bnb``, cached
until bitsandbytes replaces the weight or its quantization state), with ``x`` in the base layer's compute dtype (by
bitsandbytes' own rule) and the result in ``x``'s dtype, as PEFT's forward returns it; merging and unmerging stay
PEFT's. Under autocast a QLoRA layer runs PEFT's forward.

Known limits: other quantized bases (bitsandbytes 8-bit, GPTQ, AWQ, HQQ, torchao), LoRA on embeddings and
convolutions, and PEFT's tensor-parallel layers always run PEFT's forward. ``torch.save`` of a whole patched module
(pickling, not ``save_pretrained``) is not supported: unpatch first.
"""

from __future__ import annotations

import functools
import sys
import types
import warnings
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from .layers import (
    LoraExperts,
    bnb_compute_dtype,
    bnb_quantized_weight,
    expert_weights,
    experts_forward,
    is_bnb_4bit,
    is_fused_experts,
    lora_projection,
)
from .ops import TORCH_DTYPES, TRITON_DTYPES, lora_linear, resolve_backend

# Keyword arguments PEFT itself passes to a LoRA layer's forward; with the value None they change nothing.
_PEFT_CALL_KWARGS = ("adapter_names", "alora_offsets")
_PLAIN_TENSOR_TYPES = (torch.Tensor, nn.Parameter)
_SHOWN_PER_REASON = 4


@dataclass(frozen=True)
class PatchSummary:
    """What ``patch_peft`` found: ``patched`` layers run fastlora's op for the adapters active when it ran;
    ``skipped`` maps every other LoRA layer's module name to why it runs PEFT's forward."""

    patched: tuple[str, ...]
    skipped: dict[str, str]


@dataclass
class _CallLog:
    """Call-time fallbacks of one patched model, shared by its layers: counts per reason, and the reasons already
    warned about (each is warned about once)."""

    counts: Counter = field(default_factory=Counter)
    warned: set = field(default_factory=set)

    def record(self, reason: str) -> None:
        self.counts[reason] += 1
        if reason not in self.warned:
            self.warned.add(reason)
            warnings.warn(
                f"fastlora: a patched PEFT LoRA layer runs PEFT's forward for a call: {reason} "
                "(counted in model.fastlora_fallback_counts; warned once per reason)",
                stacklevel=2,
            )


# ----------------------------------------------------------------------------------------------- eligibility


def _base_layout(base: nn.Module) -> bool | None:
    """``fan_in_fan_out`` of a base layer whose forward is plain ``x·W0ᵀ + b`` (False: ``nn.Linear``; True:
    transformers ``Conv1D``, weight ``[in, out]``), None for any other module, subclasses included."""
    if type(base) is nn.Linear:
        return False
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")  # a Conv1D base means transformers is imported
    if pytorch_utils is not None and type(base) is getattr(pytorch_utils, "Conv1D", None):
        return True
    return None


def _has_hooks(module: nn.Module) -> bool:
    """Hooks, or an instance-level ``forward`` (accelerate's way): the fused op would bypass them."""
    return bool(
        module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks
    ) or ("forward" in module.__dict__)


def _structural_issue(layer: nn.Module, lora_linear_cls: type) -> str | None:
    """Why ``layer`` can never run fastlora's op, or None."""
    if type(layer) is not lora_linear_cls:
        cls = type(layer)
        return (
            f"{cls.__module__}.{cls.__qualname__} is not PEFT's lora.Linear (quantized, embedding, convolution or "
            "other special LoRA layers keep PEFT's forward)"
        )
    if "forward" in layer.__dict__:
        return "the layer's forward was already replaced on the instance (a hook or another patch)"
    base = layer.base_layer
    layout = _base_layout(base)
    if layout is None:
        return (
            f"base layer is {type(base).__module__}.{type(base).__qualname__}, not exactly nn.Linear or transformers "
            "Conv1D (quantized or unknown base)"
        )
    if layout != bool(layer.fan_in_fan_out):
        return f"fan_in_fan_out={layer.fan_in_fan_out} does not match the base layer's weight layout"
    if any(t is not None and type(t) not in _PLAIN_TENSOR_TYPES for t in (base.weight, base.bias)):
        return f"the base weight is a {type(base.weight).__name__} tensor subclass (quantized or distributed)"
    return None


def _peft_linear4bit_class() -> type | None:
    """PEFT's QLoRA layer class (``peft.tuners.lora.bnb.Linear4bit``), or None: PEFT defines it only with
    bitsandbytes installed, and without bitsandbytes imported no model holds one (nothing is imported for it)."""
    if sys.modules.get("bitsandbytes") is None:
        return None
    try:
        from peft.tuners.lora import bnb as peft_bnb
    except ImportError:
        return None
    return getattr(peft_bnb, "Linear4bit", None)


def _structural_issue_4bit(layer: nn.Module) -> str | None:
    """Why a PEFT QLoRA layer can never run fastlora's op, or None."""
    if "forward" in layer.__dict__:
        return "the layer's forward was already replaced on the instance (a hook or another patch)"
    base = layer.base_layer
    linear4bit = sys.modules["bitsandbytes"].nn.Linear4bit
    if not is_bnb_4bit(base) or type(base).forward is not linear4bit.forward:
        return f"base layer is {type(base).__module__}.{type(base).__qualname__}, not bitsandbytes' Linear4bit"
    if layer.fan_in_fan_out:
        return "fan_in_fan_out=True on a 4-bit layer"
    if type(base.weight).__name__ != "Params4bit" or getattr(base.weight, "quant_state", None) is None:
        return "the base weight is not a quantized bitsandbytes Params4bit"
    if getattr(base.weight.quant_state, "quant_type", None) not in ("nf4", "fp4"):
        return f"the base weight's quant_type is {base.weight.quant_state.quant_type!r}, not nf4 or fp4"
    if base.bias is not None and type(base.bias) not in _PLAIN_TENSOR_TYPES:
        return f"the base bias is a {type(base.bias).__name__} tensor subclass"
    return None


def _adapter_issue(layer: nn.Module, adapter: str) -> str | None:
    """Why ``adapter`` of ``layer`` is not plain LoRA that fastlora's op computes, or None."""
    if layer.use_dora.get(adapter, False):
        return f"adapter {adapter!r} uses DoRA (use_dora=True)"
    if layer.lora_bias.get(adapter, False):
        return f"adapter {adapter!r} has a bias on lora_B (lora_bias=True)"
    variant = layer.lora_variant.get(adapter)
    if variant is not None:
        return f"adapter {adapter!r} is a LoRA variant ({type(variant).__name__})"
    lora_A, lora_B, dropout = layer.lora_A[adapter], layer.lora_B[adapter], layer.lora_dropout[adapter]
    if type(lora_A) is not nn.Linear or type(lora_B) is not nn.Linear or lora_A.bias is not None:
        return f"adapter {adapter!r}: lora_A/lora_B are not bias-free nn.Linear modules"
    if lora_B.bias is not None:
        return f"adapter {adapter!r} has a bias on lora_B"
    if type(dropout) is nn.Dropout:
        if not 0.0 <= dropout.p < 1.0:
            return f"adapter {adapter!r}: lora_dropout p={dropout.p} is outside [0, 1)"
    elif type(dropout) is not nn.Identity:
        return f"adapter {adapter!r}: lora_dropout is a {type(dropout).__name__}, not nn.Dropout"
    if not isinstance(layer.scaling.get(adapter), (int, float)):
        return f"adapter {adapter!r}: scaling is not a Python number"
    if any(_has_hooks(m) for m in (lora_A, lora_B, dropout)):
        return f"adapter {adapter!r}: hooks on lora_A/lora_B/lora_dropout"
    return None


def _active_issue(layer: nn.Module) -> tuple[str | None, str | None]:
    """``(adapter, None)`` when the layer's active adapter can run fastlora's op (``(None, None)``: no active
    adapter in this layer, so PEFT's forward is the base layer alone), else ``(None, reason)``."""
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(active) > 1:
        return None, (
            f"{len(active)} active adapters {tuple(active)}: fastlora runs one adapter per call, PEFT's forward "
            "sums them"
        )
    if not active:
        return None, None
    issue = _adapter_issue(layer, active[0])
    if issue is None and _has_hooks(layer.base_layer):
        issue = "hooks or a replaced forward on the base layer (accelerate offloading, DeepSpeed ZeRO-3, ...)"
    return (None, issue) if issue else (active[0], None)


def _tensor_issue(x: torch.Tensor, weight, bias, lora_A, lora_B, cast_input: bool) -> str | None:
    """Why these tensors are outside what fastlora's op takes (or computes as PEFT would), or None."""
    tensors = (x, weight, lora_A, lora_B) if bias is None else (x, weight, bias, lora_A, lora_B)
    if any(type(t) not in _PLAIN_TENSOR_TYPES for t in tensors):
        return "a tensor subclass among the input and weights"
    if any(t.device != x.device for t in tensors):
        return "the input and weights are on different devices"
    if lora_A.dtype != lora_B.dtype:
        return f"lora_A ({lora_A.dtype}) and lora_B ({lora_B.dtype}) dtypes differ"
    if torch.is_autocast_enabled(x.device.type):
        # The op casts x, W0 and b to the autocast dtype as nn.Linear does; only those dtypes may take part.
        if any(t.dtype not in TRITON_DTYPES for t in tensors):
            return f"under autocast, dtypes must be among {TRITON_DTYPES}"
        return None
    backend = resolve_backend(x.device)
    allowed = TRITON_DTYPES if backend == "triton" else TORCH_DTYPES
    if x.dtype not in allowed:
        return f"input dtype {x.dtype} is not among those of fastlora's {backend} backend {allowed}"
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        return f"base weight/bias dtype differs from the input's ({x.dtype})"
    # PEFT casts x to lora_A's dtype; the op computes the LoRA branch in fp32 when the weights are fp32.
    if lora_A.dtype != x.dtype and not (lora_A.dtype == torch.float32 and cast_input):
        return f"LoRA weights in {lora_A.dtype} with input in {x.dtype}"
    return None


# ----------------------------------------------------------------------------------------------- the forward


def _call_adapter(self, args: tuple, kwargs: dict) -> tuple[str | None, str | None]:
    """``(adapter, reason)`` for one call of a PEFT LoRA layer: the one active adapter fastlora's op may compute, or
    None with why not (None as well when the call is the base layer's: adapters disabled or merged)."""
    if self.disable_adapters or self.merged:
        return None, None
    if kwargs.get("adapter_names") is not None:
        return None, "a mixed-adapter batch (adapter_names=)"
    if args or any(k not in _PEFT_CALL_KWARGS or v is not None for k, v in kwargs.items()):
        return None, "extra arguments to forward"
    return _active_issue(self)


def _fastlora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """A PEFT ``lora.Linear`` forward: fastlora's fused op when it computes the call exactly, else PEFT's."""
    adapter, reason = _call_adapter(self, args, kwargs)
    if adapter is not None:
        base = self.base_layer
        lora_A, lora_B = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        cast_input = getattr(self, "cast_input_dtype_enabled", True)
        reason = _tensor_issue(x, base.weight, base.bias, lora_A, lora_B, cast_input)
        if reason is None:
            dropout = self.lora_dropout[adapter]
            p = dropout.p if type(dropout) is nn.Dropout else 0.0
            y = lora_linear(
                x, base.weight, base.bias, lora_A, lora_B, self.scaling[adapter], p, dropout.training,
                fan_in_fan_out=self.fan_in_fan_out,
            )  # fmt: skip
            return y  # x.dtype (the autocast dtype under autocast): the dtype of PEFT's result, base_layer(x)
    if reason is not None:
        self._fastlora_call_log.record(reason)
    return type(self).forward(self, x, *args, **kwargs)


def _tensor_issue_4bit(x: torch.Tensor, base: nn.Module, lora_A, lora_B, cast_input: bool) -> str | None:
    """Why these tensors are outside what fastlora's op takes over a 4-bit base (or computes as PEFT would), or
    None."""
    tensors = (x, lora_A, lora_B) if base.bias is None else (x, base.bias, lora_A, lora_B)
    if any(type(t) not in _PLAIN_TENSOR_TYPES for t in tensors):
        return "a tensor subclass among the input and weights"
    if any(t.device != base.weight.device for t in tensors):
        return "the input and weights are on different devices"
    if torch.is_autocast_enabled(x.device.type):
        return "autocast over a 4-bit base layer"
    if x.dtype not in TRITON_DTYPES:
        return f"input dtype {x.dtype} is not among those a 4-bit layer computes in {TRITON_DTYPES}"
    if lora_A.dtype != lora_B.dtype:
        return f"lora_A ({lora_A.dtype}) and lora_B ({lora_B.dtype}) dtypes differ"
    compute = base.compute_dtype or x.dtype
    if lora_A.dtype not in (torch.float32, compute):
        return f"LoRA weights in {lora_A.dtype} with the base layer computing in {compute}"
    if not cast_input and lora_A.dtype != x.dtype:
        return f"LoRA weights in {lora_A.dtype} with input in {x.dtype} and PEFT's input casting turned off"
    return None


def _fastlora_forward_4bit(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """A PEFT QLoRA layer's forward: fastlora's fused op over the bitsandbytes weight when it computes the call
    exactly, else PEFT's."""
    adapter, reason = _call_adapter(self, args, kwargs)
    if adapter is not None:
        base = self.base_layer
        lora_A, lora_B = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        reason = _tensor_issue_4bit(x, base, lora_A, lora_B, getattr(self, "cast_input_dtype_enabled", True))
        if reason is None:
            dtype = bnb_compute_dtype(base, x)
            bias = base.bias if base.bias is None or base.bias.dtype == dtype else base.bias.to(dtype)
            dropout = self.lora_dropout[adapter]
            p = dropout.p if type(dropout) is nn.Dropout else 0.0
            weight = bnb_quantized_weight(self.__dict__, base.weight)
            y = lora_linear(x.to(dtype), weight, bias, lora_A, lora_B, self.scaling[adapter], p, dropout.training)
            return y.to(x.dtype)  # the dtype of PEFT's result: bitsandbytes casts back to the input's
    if reason is not None:
        self._fastlora_call_log.record(reason)
    return type(self).forward(self, x, *args, **kwargs)


# ------------------------------------------------------------------------------ mixture-of-experts parameters


def _param_chain(wrapper: nn.Module, param_wrapper_cls: type) -> tuple[list[nn.Module], nn.Module]:
    """PEFT's nested ``ParamWrapper`` s around one module, outermost first, and the module they wrap."""
    chain, module = [], wrapper
    while type(module) is param_wrapper_cls:
        chain.append(module)
        module = module.base_layer
    return chain, module


def _experts_structural_issue(chain: list[nn.Module], base: nn.Module) -> str | None:
    """Why a chain of ``ParamWrapper`` s can never run fastlora's grouped op, or None."""
    if len(chain) == 1 and getattr(base, chain[0].parameter_name).dim() == 2:
        return (
            f"LoRA on the 2-D parameter {chain[0].parameter_name!r} of a {type(base).__name__} (a router): PEFT's "
            "forward computes with W + s·B·A, as fastlora's LoraParameter does"
        )
    if not is_fused_experts(base):
        return f"{type(base).__name__} is not one of transformers' fused-experts modules"
    projections = LoraExperts.projections(base)
    names = [w.parameter_name for w in chain]
    if any(n not in projections for n in names) or len(set(names)) != len(names):
        return f"LoRA on {names} of {type(base).__name__}; fastlora computes LoRA on {projections}"
    if any("forward" in w.__dict__ for w in chain[1:]) or _has_hooks(base):
        return "hooks or a replaced forward inside the wrappers (accelerate offloading, DeepSpeed ZeRO-3, ...)"
    if "forward" in chain[0].__dict__:
        return "the layer's forward was already replaced on the instance"
    return None


def _experts_active(chain: list[nn.Module]) -> tuple[str | None, str | None]:
    """``(adapter, None)`` when every wrapper of the chain runs the same single plain adapter, ``(None, None)`` when
    none is active (the module's own forward), else ``(None, reason)``."""
    active = {a for w in chain for a in w.active_adapters if a in w.lora_A}
    if not active:
        return None, None
    if len(active) > 1:
        return None, f"{len(active)} active adapters {tuple(sorted(active))} on the experts"
    adapter = next(iter(active))
    for w in chain:
        if adapter not in w.lora_A:
            return None, f"adapter {adapter!r} adapts only some of the experts' parameters in this layer"
        issue = _adapter_issue(w, adapter)
        if issue is None and type(w.lora_dropout[adapter]) is not nn.Identity:
            issue = f"adapter {adapter!r}: dropout on a parameter's LoRA"
        if issue is not None:
            return None, issue
    return adapter, None


def _fastlora_experts_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """The forward of the outermost PEFT ``ParamWrapper`` around a fused-experts module: fastlora's grouped op for the
    chain's adapters (``experts_forward``), or PEFT's forward when it would not compute the call exactly."""
    from peft.tuners.lora.layer import ParamWrapper

    chain, base = _param_chain(self, ParamWrapper)
    reason = None
    if any(w.disable_adapters or w.merged for w in chain):
        adapter = None
    elif kwargs.get("adapter_names") is not None:
        adapter, reason = None, "a mixed-adapter batch (adapter_names=)"
    elif len(args) != 2 or any(k not in _PEFT_CALL_KWARGS or v is not None for k, v in kwargs.items()):
        adapter, reason = None, "arguments other than (hidden_states, top_k_index, top_k_weights)"
    else:
        adapter, reason = _experts_active(chain)
    if adapter is not None:
        reason = _experts_tensor_issue(x, base, chain, adapter)
        if reason is None:
            adapters = {}
            for w in chain:
                weight = getattr(base, w.parameter_name)
                E = weight.shape[0]
                lora_A, lora_B = w.lora_A[adapter].weight, w.lora_B[adapter].weight
                r = lora_A.shape[0] // E
                # PEFT's interleaved B (expert e in columns k·E + e) as [E, out, r], copied so the kernels read B_e's
                # rows contiguously; the copy is differentiable, so the gradient lands in PEFT's parameter.
                a = lora_A.view(E, r, lora_A.shape[1])
                b = lora_B.view(lora_B.shape[0], r, E).permute(2, 0, 1).contiguous()
                adapters[w.parameter_name] = (a, b, w.scaling[adapter])
            return experts_forward(base, x, *args, lora_projection(base, adapters, 0.0, False))
    if reason is not None:
        self._fastlora_call_log.record(reason)
    return type(self).forward(self, x, *args, **kwargs)


def _experts_tensor_issue(x: torch.Tensor, base: nn.Module, chain: list[nn.Module], adapter: str) -> str | None:
    """Why these tensors are outside what the grouped op takes, or None."""
    weights = [getattr(base, w.parameter_name) for w in chain]
    loras = [t for w in chain for t in (w.lora_A[adapter].weight, w.lora_B[adapter].weight)]
    if any(type(t) not in _PLAIN_TENSOR_TYPES for t in (x, *weights, *loras)):
        return "a tensor subclass among the input and weights"
    if any(t.device != x.device for t in (*weights, *loras)):
        return "the input and weights are on different devices"
    backend = resolve_backend(x.device)
    allowed = TRITON_DTYPES if backend == "triton" else TORCH_DTYPES
    if any(t.dtype not in allowed for t in (x, *weights, *loras)):
        return f"dtypes outside fastlora's {backend} backend {allowed}"
    for w, weight in zip(chain, weights):
        a, b = w.lora_A[adapter].weight, w.lora_B[adapter].weight
        if a.dtype != b.dtype or a.dtype not in (weight.dtype, torch.float32):
            return f"LoRA weights of {w.parameter_name} in {a.dtype}/{b.dtype} with experts in {weight.dtype}"
    biases = [expert_weights(base, w.parameter_name)[1] for w in chain]
    if any(t is not None and t.requires_grad for t in (*weights, *biases)):
        return "the expert weights or biases require grad (fastlora's grouped op trains only the LoRA weights)"
    return None


_PATCHED_FORWARDS = (_fastlora_forward, _fastlora_forward_4bit, _fastlora_experts_forward)


def _is_patched(module: nn.Module) -> bool:
    return getattr(module.__dict__.get("forward"), "__func__", None) in _PATCHED_FORWARDS


# ----------------------------------------------------------------------------------------------- public API


def _lora_layers(model, caller: str) -> list[tuple[str, nn.Module]]:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError as e:
        raise ImportError(f"fastlora.{caller} needs peft: pip install 'fastlora[integration]'") from e
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastlora.{caller}: expected a peft.PeftModel (an nn.Module), got {type(model).__name__}")
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]
    if not layers:
        raise ValueError(
            f"fastlora.{caller}: {type(model).__name__} has no PEFT LoRA layers; expected a model made by "
            "peft.get_peft_model (or PeftModel.from_pretrained) with a LoraConfig"
        )
    return layers


def _warn_skipped(skipped: dict[str, str], total: int) -> None:
    by_reason: dict[str, list[str]] = {}
    for name, reason in skipped.items():
        by_reason.setdefault(reason, []).append(name)
    lines = []
    for reason, names in by_reason.items():
        shown = ", ".join(names[:_SHOWN_PER_REASON])
        more = f" and {len(names) - _SHOWN_PER_REASON} more" if len(names) > _SHOWN_PER_REASON else ""
        lines.append(f"  {reason}: {shown}{more}")
    warnings.warn(
        f"fastlora.patch_peft: {len(skipped)} of {total} LoRA layers run PEFT's forward "
        "(the full list is in model.fastlora_patch_summary.skipped):\n" + "\n".join(lines),
        stacklevel=3,
    )


def patch_peft(peft_model: nn.Module, *, return_summary: bool = False):
    """Make the LoRA linear layers of a PEFT model run fastlora's fused op, in place.

    Every PEFT ``lora.Linear`` over an ``nn.Linear`` or transformers ``Conv1D``, and every PEFT QLoRA layer over a
    bitsandbytes ``Linear4bit``, gets an instance-level ``forward`` that checks each call and runs either
    ``fastlora.lora_linear`` or PEFT's own forward (see the module docstring). The model stays a PEFT model:
    parameters, state dict, adapters and PEFT's methods are untouched.
    Patching again is a no-op for layers already patched (and patches layers added since); ``unpatch_peft`` undoes it.

    Returns ``peft_model``, or ``(peft_model, summary)`` with ``return_summary=True``. The ``PatchSummary`` is also
    stored as ``peft_model.fastlora_patch_summary``, and a warning lists the layers that run PEFT's forward, with
    why. Calls that fall back at run time for a reason fastlora could not foresee (several adapters activated
    later, mixed-adapter batches, an unsupported dtype) are counted per reason in
    ``peft_model.fastlora_fallback_counts`` and warned about once per reason.
    """
    from peft.tuners.lora.layer import Linear as PeftLoraLinear
    from peft.tuners.lora.layer import ParamWrapper

    layers = _lora_layers(peft_model, "patch_peft")
    linear4bit = _peft_linear4bit_class()
    log = peft_model.__dict__.get("_fastlora_call_log") or _CallLog()
    patched, skipped = [], {}
    inner = {id(m.base_layer) for _, m in layers if type(m) is ParamWrapper}
    for name, layer in layers:
        if type(layer) is ParamWrapper:
            if id(layer) in inner:
                continue  # computed by the outermost wrapper of its chain
            chain, base = _param_chain(layer, ParamWrapper)
            names = [name + ".base_layer" * i for i in range(len(chain))]
            forward = _fastlora_experts_forward
            structural = functools.partial(_experts_structural_issue, chain, base)
            active = functools.partial(_experts_active, chain)
        elif (linear4bit is not None and type(layer) is linear4bit) or (
            type(layer) is PeftLoraLinear and is_bnb_4bit(layer.base_layer)
        ):
            # PEFT's QLoRA layer, or its plain lora.Linear over a bitsandbytes layer (what PEFT makes when the model
            # does not say it is_loaded_in_4bit): the same math either way.
            names, forward = [name], _fastlora_forward_4bit
            structural = functools.partial(_structural_issue_4bit, layer)
            active = functools.partial(_active_issue, layer)
        else:
            names, forward = [name], _fastlora_forward
            structural = functools.partial(_structural_issue, layer, PeftLoraLinear)
            active = functools.partial(_active_issue, layer)
        if not _is_patched(layer):
            issue = structural()
            if issue is not None:
                skipped.update(dict.fromkeys(names, issue))
                continue
            layer._fastlora_call_log = log
            layer.forward = types.MethodType(forward, layer)
        _, issue = active()
        if issue is None:
            patched.extend(names)
        else:
            skipped.update(dict.fromkeys(names, issue))
            log.warned.add(issue)  # warned about below; not again at call time
    summary = PatchSummary(patched=tuple(patched), skipped=skipped)
    peft_model._fastlora_call_log = log
    peft_model.fastlora_fallback_counts = log.counts
    peft_model.fastlora_patch_summary = summary
    if skipped:
        _warn_skipped(skipped, len(layers))
    return (peft_model, summary) if return_summary else peft_model


def unpatch_peft(peft_model: nn.Module):
    """Undo ``patch_peft``: every patched layer gets back its class's forward (PEFT's), and the summary and counters
    are removed. A model that was not patched is returned unchanged. Returns ``peft_model``."""
    layers = _lora_layers(peft_model, "unpatch_peft")
    replaced = [name for name, m in layers if "_fastlora_call_log" in m.__dict__ and not _is_patched(m)]
    if replaced:
        raise RuntimeError(
            f"fastlora.unpatch_peft: the forward of {replaced[:_SHOWN_PER_REASON]} was replaced after patch_peft "
            "(a hook added since?); remove that first, nothing was changed"
        )
    for _, layer in layers:
        if _is_patched(layer):
            del layer.forward
            del layer._fastlora_call_log
            layer.__dict__.pop("_fastlora_bnb_weight", None)
    for attr in ("_fastlora_call_log", "fastlora_fallback_counts", "fastlora_patch_summary"):
        peft_model.__dict__.pop(attr, None)
    return peft_model
