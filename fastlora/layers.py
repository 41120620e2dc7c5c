"""``LoraLinear``: a frozen linear layer plus a trainable low-rank update, computed by one fused op.

``AdaptedLinear`` is what every linear layer fastlora wraps is (``LoraLinear`` here, ``MultiLoraLinear`` in
``fastlora.serving``): the base layer's own weight and bias, its features and layout, and the module to hand back.
Model transforms count an ``AdaptedLinear`` as the linear layer it wraps.

Parameters follow PEFT's shapes (``lora_A [r, in_features]``, ``lora_B [out_features, r]``) and its
initialisation, so adapters move between the two without conversion. The base weight is the very
``nn.Parameter`` of the wrapped layer: ``from_linear`` never copies it.

QLoRA: ``Nf4Linear`` is a frozen 4-bit (NF4 / FP4) linear layer in bitsandbytes' format that needs no bitsandbytes,
and ``LoraLinear4bit`` puts LoRA over it or over bitsandbytes' own ``Linear4bit``, reading the 4-bit weight in place
(``fastlora.nf4``) and handing it to the same fused op, whose kernels dequantize it tile by tile. Layers of other
quantization libraries are recognised (``quantization_issue``) so that model transforms can refuse them by name.
bitsandbytes is never imported here: a bitsandbytes layer is recognised only once bitsandbytes is loaded.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import sys
import warnings
from collections.abc import Callable

import torch
from torch import nn

from . import nf4
from .config import lora_scaling
from .nf4 import QuantizedWeight
from .ops import Routing, grouped_linear, grouped_lora_linear, lora_linear, quant_linear, route

INIT_CHOICES = (True, False, "gaussian")


class AdaptedLinear(nn.Module):
    """A linear layer fastlora has wrapped: ``weight`` and ``bias`` are the base layer's own (shared, not copied),
    ``[out, in]``, or ``[in, out]`` with ``fan_in_fan_out=True`` (GPT-2 ``Conv1D``). A 4-bit base layer's packed
    ``weight`` says nothing of its shape: ``features`` gives ``(out_features, in_features)`` then."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        fan_in_fan_out: bool = False,
        features: tuple[int, int] | None = None,
    ):
        super().__init__()
        if features is None:
            if not weight.dtype.is_floating_point:
                raise TypeError(
                    f"{type(self).__name__}: the base weight is {weight.dtype} (a quantized layer); fastlora "
                    "wraps 4-bit layers as LoraLinear4bit (bitsandbytes Linear4bit, Nf4Linear) and no other quantized "
                    "layer"
                )
            if weight.dim() != 2:
                raise ValueError(f"{type(self).__name__}: weight must be 2-D, got shape {tuple(weight.shape)}")
            features = tuple(weight.shape[::-1] if fan_in_fan_out else weight.shape)
        self.fan_in_fan_out = fan_in_fan_out
        self.out_features, self.in_features = features
        if isinstance(weight, nn.Parameter):
            self.weight = weight
        else:
            self.register_buffer("weight", weight)  # ``Nf4Linear``'s packed weight is a buffer
        self.bias = bias

    def weight_nk(self) -> torch.Tensor:
        """``W0`` as ``[out, in]`` (a view), whichever way it is stored."""
        return self.weight.t() if self.fan_in_fan_out else self.weight

    def _keep_base_module(self, module: nn.Module) -> None:
        # Kept outside the module tree (its parameters are this layer's), so ``unwrap`` can hand back the very module
        # type the model had: nn.Linear, a GPT-2 Conv1D, ...
        object.__setattr__(self, "_base_module", module)

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The wrapped layer's own output, ``x·W0ᵀ + b``."""
        return nn.functional.linear(x, self.weight_nk(), self.bias)


class LoraLinear(AdaptedLinear):
    """``y = x·W0ᵀ + b + s·B(A·dropout(x))`` with frozen ``W0``/``b`` and trainable ``A``/``B``.

    ``weight`` is ``[out, in]``, or ``[in, out]`` with ``fan_in_fan_out=True`` (GPT-2 ``Conv1D``).
    While ``merged``, ``W0`` holds ``W0 + s·B·A`` and the forward is the plain linear layer.
    """

    def __init__(
        self,
        weight: nn.Parameter,
        bias: nn.Parameter | None,
        r: int,
        lora_alpha: float = 8.0,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        init_lora_weights: bool | str = True,
        fan_in_fan_out: bool = False,
        lora_dtype: torch.dtype | None = None,
    ):
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise ValueError(f"LoraLinear: rank r must be an integer >= 1, got {r!r}")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"LoraLinear: lora_dropout must be in [0, 1), got {lora_dropout!r}")
        if init_lora_weights not in INIT_CHOICES:
            raise ValueError(f"LoraLinear: init_lora_weights must be one of {INIT_CHOICES}, got {init_lora_weights!r}")
        if not isinstance(use_rslora, bool):
            raise TypeError(f"LoraLinear: use_rslora must be a bool, got {type(use_rslora).__name__} {use_rslora!r}")
        if (
            not isinstance(lora_alpha, numbers.Real)
            or isinstance(lora_alpha, bool)
            or not math.isfinite(float(lora_alpha))
        ):
            raise TypeError(f"LoraLinear: lora_alpha must be a finite real number, got {lora_alpha!r}")
        if lora_dtype is not None and not (isinstance(lora_dtype, torch.dtype) and lora_dtype.is_floating_point):
            raise TypeError(
                f"LoraLinear: lora_dtype must be a floating-point torch.dtype (such as torch.float32) or None, got "
                f"{lora_dtype!r}"
            )
        super().__init__(weight, bias, fan_in_fan_out)
        # PEFT keeps adapter weights in fp32 unless told otherwise; the kernels take either.
        dtype = lora_dtype or (torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype)
        self._init_adapter(r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, weight.device, dtype)

    def _init_adapter(self, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, device, dtype) -> None:
        """The adapter's settings and its ``lora_A [r, in]`` / ``lora_B [out, r]``, initialised as PEFT does."""
        self.r = r
        self.lora_alpha = lora_alpha
        self.lora_dropout = float(lora_dropout)
        self.use_rslora = use_rslora
        self.scaling = lora_scaling(r, lora_alpha, use_rslora)
        self.merged = False
        self.disabled = False  # set by fastlora.disable_adapters: the forward is the base layer's
        # Set by fastlora.apply_lora when ``weight`` is also another module's parameter (an lm_head tied to the input
        # embedding): merging then writes into a copy, never through the tie.
        self.shared_weight = False
        self.init_lora_weights = init_lora_weights
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, device=device, dtype=dtype))
        self.reset_lora_parameters(init_lora_weights)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        r: int,
        lora_alpha: float = 8.0,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        init_lora_weights: bool | str = True,
        fan_in_fan_out: bool = False,
        lora_dtype: torch.dtype | None = None,
    ) -> LoraLinear:
        """Wrap ``linear``: an ``nn.Linear``, a GPT-2 ``Conv1D`` (with ``fan_in_fan_out=True``), or another linear
        layer, that is a module with a 2-D ``weight`` and a ``bias`` attribute (``None`` allowed). Anything else (an
        ``nn.Embedding``, a convolution) raises ``TypeError``. Its parameters are shared, not copied, and frozen. A
        4-bit layer (bitsandbytes ``Linear4bit``, ``Nf4Linear``) gives a ``LoraLinear4bit``."""
        if is_4bit_linear(linear) or issubclass(cls, LoraLinear4bit):
            if fan_in_fan_out:
                raise ValueError(
                    "LoraLinear4bit: fan_in_fan_out=True does not apply to a 4-bit layer ([out, in] codes)"
                )
            layer = LoraLinear4bit(linear, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, lora_dtype)
            if linear.bias is not None:
                linear.bias.requires_grad_(False)
            return layer
        weight = getattr(linear, "weight", None)
        if not (
            isinstance(linear, nn.Module)
            and isinstance(weight, torch.Tensor)
            and weight.dim() == 2
            and hasattr(linear, "bias")
            and not isinstance(linear, (nn.Embedding, nn.EmbeddingBag))
        ):
            raise TypeError(
                f"LoraLinear.from_linear: expected a linear layer (nn.Linear, transformers Conv1D, or a module with a "
                f"2-D weight and a bias attribute), got {type(linear).__name__}"
            )
        layer = cls(
            linear.weight, linear.bias, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, fan_in_fan_out,
            lora_dtype,
        )  # fmt: skip
        # Frozen only once the arguments are accepted: a refused call leaves the layer as it was.
        linear.weight.requires_grad_(False)
        if linear.bias is not None:
            linear.bias.requires_grad_(False)
        layer._keep_base_module(linear)
        return layer

    @torch.no_grad()
    def reset_lora_parameters(self, init_lora_weights: bool | str = True) -> None:
        """PEFT's initialisation: ``True``: A kaiming-uniform (a=√5), B zero, so the layer starts as ``W0``;
        ``"gaussian"``: A ~ N(0, 1/r), B zero; ``False``: both with ``nn.Linear``'s default init (random)."""
        if init_lora_weights == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if init_lora_weights is False:
            nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
        else:
            nn.init.zeros_(self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self.disabled:
            return self.base_forward(x)
        return lora_linear(
            x, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling, self.lora_dropout, self.training,
            fan_in_fan_out=self.fan_in_fan_out,
        )  # fmt: skip

    def delta_weight(self) -> torch.Tensor:
        """``s·B·A`` as ``[out, in]`` in fp32."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    @torch.no_grad()
    def merged_weight(self, sign: float = 1.0) -> torch.Tensor:
        """``W0 + sign·s·B·A`` as ``[out, in]``, accumulated in fp32 and rounded once to the weight's dtype (a new
        tensor; this layer is left as it is)."""
        return (self.weight_nk().float() + sign * self.delta_weight()).to(self.weight.dtype)

    @torch.no_grad()
    def _checked_merged_weight(self, sign: float) -> torch.Tensor:
        new = self.merged_weight(sign)
        if not torch.isfinite(new).all():
            raise ValueError(
                "LoraLinear: merging would put non-finite values into the weight (overflow in "
                f"{self.weight.dtype}, or NaN/Inf in the adapter); the weight is left unchanged"
            )
        return new

    @torch.no_grad()
    def _untied_copy(self, new: torch.Tensor) -> nn.Parameter:
        """A new parameter laid out as ``weight`` holding ``new`` (``[out, in]``)."""
        copy = torch.empty_like(self.weight)
        (copy.t() if self.fan_in_fan_out else copy).copy_(new)
        return nn.Parameter(copy, requires_grad=self.weight.requires_grad)

    def merge(self) -> None:
        """``W0 += s·B·A``, accumulated in fp32 and rounded once to the weight's dtype. Refuses (and changes
        nothing) if the result would not be finite.

        A ``shared_weight`` layer (its weight is also another module's, as a tied ``lm_head``'s is the input
        embedding's) merges into a new parameter of its own, with a ``UserWarning`` that the tie is broken: the other
        module keeps its values, so the model computes what it computed unmerged. ``unmerge`` puts the shared
        parameter back."""
        if self.merged:
            raise RuntimeError("LoraLinear.merge: the adapter is already merged")
        new = self._checked_merged_weight(+1.0)
        if self.shared_weight:
            warnings.warn(
                "LoraLinear.merge: this layer's weight is shared with another module (tied embeddings); the merged "
                "weight goes into a copy of its own, so the tie is broken while merged and the other module keeps "
                "its values. After merge_and_unload, set config.tie_word_embeddings=False before saving or "
                "reloading the model with transformers (merge_and_unload does it for the output embedding)",
                UserWarning,
                stacklevel=2,
            )
            # Kept off the module tree: the tied original is the other module's parameter, not this layer's.
            object.__setattr__(self, "_tied_weight", self.weight)
            self.weight = self._untied_copy(new)
        else:
            self.weight_nk().copy_(new)
        self.merged = True

    def unmerge(self) -> None:
        """``W0 -= s·B·A`` in fp32. Exact in fp32 up to rounding; in fp16/bf16 the weight may differ from the
        original by a rounding step, as with any merge that is not stored separately. A ``shared_weight`` layer gets
        its shared parameter back, exactly."""
        if not self.merged:
            raise RuntimeError("LoraLinear.unmerge: the adapter is not merged")
        tied = self.__dict__.get("_tied_weight")
        if tied is not None:
            self.weight = tied
            del self.__dict__["_tied_weight"]
        else:
            self.weight_nk().copy_(self._checked_merged_weight(-1.0))
        self.merged = False

    @torch.no_grad()
    def commit_merge(self) -> None:
        """Make the base weight ``W0 + s·B·A`` for good (merging first if needed) and re-initialise A and B as at
        creation: a fresh adapter on the updated base (Chain-of-LoRA). A ``shared_weight`` layer keeps its merged copy
        and is no longer tied."""
        if not self.merged:
            self.merge()
        self.__dict__.pop("_tied_weight", None)
        self.shared_weight = False
        self.merged = False
        self.reset_lora_parameters(self.init_lora_weights)

    def unwrap(self, merge: bool = False) -> nn.Module:
        """The wrapped base module (the one given to ``from_linear``, else an ``nn.Linear``) holding this layer's
        weight: with ``merge``, ``W0 + s·B·A``; without, ``W0`` (unmerged first if needed)."""
        if merge and not self.merged:
            self.merge()
        elif not merge and self.merged:
            self.unmerge()
        base = getattr(self, "_base_module", None)
        if base is None:
            return self.to_linear()
        base.weight = self.weight  # the parameters may have been replaced since (``.to()``, sharding)
        base.bias = self.bias
        return base

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` whose weight is ``W0 + s·B·A`` (this layer is left as it is)."""
        weight = self.weight_nk()
        merged = weight if self.merged else self.merged_weight()
        if not torch.isfinite(merged).all():
            raise ValueError("LoraLinear.to_linear: the merged weight is not finite")
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=weight.device, dtype=weight.dtype)  # fmt: skip
        linear.weight.copy_(merged)
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"lora_alpha={self.lora_alpha}, scaling={self.scaling:g}, lora_dropout={self.lora_dropout}, "
            f"bias={self.bias is not None}, fan_in_fan_out={self.fan_in_fan_out}, merged={self.merged}, "
            f"dtype={self.weight.dtype}, lora_dtype={self.lora_A.dtype}"
        )


# --- 4-bit base layers ---------------------------------------------------------------------------------------------


def _bnb_class(name: str) -> type | None:
    """``bitsandbytes.nn.<name>`` when bitsandbytes is already imported, else None. A model holding a bitsandbytes
    layer has imported it, so a layer is recognised without ever importing bitsandbytes here."""
    bnb_nn = getattr(sys.modules.get("bitsandbytes"), "nn", None)
    return getattr(bnb_nn, name, None)


def is_bnb_4bit(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes ``Linear4bit`` (``LinearNF4`` / ``LinearFP4`` included)."""
    cls = _bnb_class("Linear4bit")
    return cls is not None and isinstance(module, cls)


def is_4bit_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a frozen 4-bit linear layer fastlora puts LoRA over: ``Nf4Linear`` or bitsandbytes'
    ``Linear4bit``."""
    return isinstance(module, Nf4Linear) or is_bnb_4bit(module)


def quantization_issue(module: nn.Module) -> str | None:
    """The quantization of ``module`` that fastlora cannot put LoRA over, in words (bitsandbytes 8-bit, HQQ, torchao,
    GPTQ/AWQ-style packed ``qweight``, integer or fp8 weights, an unknown ``quant_state``), or None for a layer with a
    floating-point weight or a 4-bit one fastlora reads (``is_4bit_linear``). Looks only at the module's own
    attributes: nothing is imported."""
    if is_4bit_linear(module) or isinstance(module, AdaptedLinear):
        return None
    weight = getattr(module, "weight", None)
    int8 = _bnb_class("Linear8bitLt")
    if (int8 is not None and isinstance(module, int8)) or type(weight).__name__ == "Int8Params":
        return "bitsandbytes 8-bit (LLM.int8(), Linear8bitLt)"
    if hasattr(module, "W_q") or type(module).__module__.split(".")[0] == "hqq":
        return "HQQ"
    if isinstance(weight, torch.Tensor) and type(weight).__module__.split(".")[0] == "torchao":
        return f"torchao ({type(weight).__name__} weight)"
    if isinstance(getattr(module, "qweight", None), torch.Tensor):
        return "a packed qweight (GPTQ / AWQ-style)"
    if isinstance(weight, torch.Tensor):
        quant_state = getattr(weight, "quant_state", None)
        if quant_state is not None:
            return f"a weight with a quant_state fastlora does not know ({type(quant_state).__name__})"
        if not (weight.dtype.is_floating_point or weight.dtype.is_complex):
            return f"an integer weight ({weight.dtype})"
        if weight.dtype.itemsize == 1:
            return f"an 8-bit floating-point weight ({weight.dtype})"
    return None


# The ``QuantizedWeight`` fields ``Nf4Linear`` keeps as buffers (under these names), in this order.
_NF4_TENSORS = ("data", "absmax", "code", "nested_absmax", "nested_code", "offset")
_NF4_BUFFERS = ("weight", "absmax", "code", "nested_absmax", "nested_code", "offset")


class Nf4Linear(nn.Module):
    """A frozen linear layer whose weight is stored in 4 bits (NF4 or FP4), in bitsandbytes' format, without
    bitsandbytes: ``y = x·dequant(W0)ᵀ + b``.

    The ``QuantizedWeight``'s tensors are buffers (``weight``: the packed codes, ``absmax``, ``code`` and, when the
    block scales are themselves quantized, ``nested_absmax``, ``nested_code``, ``offset``), so ``.to(device)``,
    ``state_dict`` and device moves work as for any module; ``bias`` is an ordinary parameter. The fp32 ones are held
    as their int32 bit patterns, so that casting a model (``.half()``, ``.to(torch.bfloat16)``) casts the bias and
    leaves the format alone, as it leaves bitsandbytes' quantization state alone. The forward computes in
    ``compute_dtype`` (None: the input's dtype) and returns the input's dtype, as bitsandbytes' ``Linear4bit`` does,
    through ``fastlora.ops.quant_linear``: fused kernels that dequantize tiles of ``W0`` in registers on the Triton
    backend.
    """

    def __init__(
        self,
        weight: QuantizedWeight,
        bias: torch.Tensor | None = None,
        compute_dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if not isinstance(weight, QuantizedWeight):
            raise TypeError(f"Nf4Linear: weight must be a fastlora.QuantizedWeight, got {type(weight).__name__}")
        if weight.transposed:
            raise ValueError("Nf4Linear: weight must be stored [out_features, in_features] (transposed=False)")
        if compute_dtype is not None and not (
            isinstance(compute_dtype, torch.dtype) and compute_dtype.is_floating_point
        ):
            raise TypeError(
                f"Nf4Linear: compute_dtype must be a floating-point torch.dtype or None, got {compute_dtype!r}"
            )
        if bias is not None:
            if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.out_features,):
                shape = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
                raise ValueError(f"Nf4Linear: bias must be a tensor of shape ({weight.out_features},), got {shape}")
            if not isinstance(bias, nn.Parameter):
                bias = nn.Parameter(bias, requires_grad=False)
        self.out_features, self.in_features = weight.out_features, weight.in_features
        self.compute_dtype = compute_dtype
        self.set_quantized_weight(weight)
        self.bias = bias

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        blocksize: int = 64,
        quant_type: str = "nf4",
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
    ) -> Nf4Linear:
        """Quantize ``linear``'s weight (``nf4.quantize``: bit-exact with bitsandbytes' ``quantize_4bit``); the bias is
        shared, not copied. ``linear`` itself is left as it was."""
        if not isinstance(linear, nn.Linear) or quantization_issue(linear) is not None or is_bnb_4bit(linear):
            raise TypeError(
                f"Nf4Linear.from_linear: expected an nn.Linear with a floating-point weight, got {linear!r}"
            )
        weight = nf4.quantize(linear.weight.detach(), blocksize=blocksize, quant_type=quant_type,
                              double_quant=double_quant)  # fmt: skip
        return cls(weight, linear.bias, compute_dtype)

    def set_quantized_weight(self, weight: QuantizedWeight) -> None:
        """Hold ``weight``'s tensors (replacing the current ones): what merging writes."""
        if (weight.out_features, weight.in_features) != (self.out_features, self.in_features):
            raise ValueError(
                f"Nf4Linear: the weight is ({weight.out_features}, {weight.in_features}), the layer "
                f"({self.out_features}, {self.in_features})"
            )
        for field, name in zip(_NF4_TENSORS, _NF4_BUFFERS):
            tensor = getattr(weight, field)
            if tensor is not None and tensor.dtype == torch.float32:
                tensor = tensor.view(torch.int32)  # no other field is int32: ``quantized_weight`` views it back
            self.register_buffer(name, tensor)
        # Every other field (block sizes, dtype, quant type): what the buffers alone do not say.
        self._quant_meta = {
            f.name: getattr(weight, f.name) for f in dataclasses.fields(weight) if f.name not in _NF4_TENSORS
        }
        self.__dict__.pop("_quantized_weight", None)

    def quantized_weight(self) -> QuantizedWeight:
        """The layer's ``QuantizedWeight``, built from its current buffers (again only after they change: ``.to()``
        replaces them)."""
        buffers = tuple(self._buffers[name] for name in _NF4_BUFFERS)
        cached = self.__dict__.get("_quantized_weight")
        if cached is not None and all(a is b for a, b in zip(cached[0], buffers)):
            return cached[1]
        tensors = {
            field: t.view(torch.float32) if t is not None and t.dtype == torch.int32 else t
            for field, t in zip(_NF4_TENSORS, buffers)
        }
        weight = QuantizedWeight(**self._quant_meta, **tensors)
        self.__dict__["_quantized_weight"] = (buffers, weight)
        return weight

    @property
    def quant_type(self) -> str:
        return self._quant_meta["quant_type"]

    @property
    def blocksize(self) -> int:
        return self._quant_meta["blocksize"]

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``W0`` as a dense ``[out, in]`` tensor of ``dtype`` (default: the dtype the weight was quantized from)."""
        return self.quantized_weight().dequantize(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantized_base_forward(x, self.quantized_weight(), self.bias, self.compute_dtype or x.dtype)

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the dequantized weight (in the dtype it was quantized from)."""
        weight = self.dequantize()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=weight.device,
                           dtype=weight.dtype)  # fmt: skip
        linear.weight.copy_(weight)
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        nested = self._quant_meta.get("nested_blocksize") if self._buffers["nested_absmax"] is not None else None
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"quant_type={self.quant_type}, blocksize={self.blocksize}, double_quant={nested is not None}, "
            f"compute_dtype={self.compute_dtype}"
        )


def quantized_base_forward(
    x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None, compute_dtype: torch.dtype
) -> torch.Tensor:
    """bitsandbytes' ``Linear4bit`` forward: ``x`` and the bias cast to ``compute_dtype``, the product cast back to
    ``x.dtype``. A bias being trained (``bias="all"``) is added outside the op, which keeps the base layer frozen."""
    if bias is not None and bias.dtype != compute_dtype:
        bias = bias.to(compute_dtype)
    if bias is not None and bias.requires_grad and torch.is_grad_enabled():
        return (quant_linear(x.to(compute_dtype), weight) + bias).to(x.dtype)
    return quant_linear(x.to(compute_dtype), weight, bias).to(x.dtype)


def bnb_quantized_weight(holder: dict, weight: torch.Tensor) -> QuantizedWeight:
    """``nf4.from_bnb(weight)`` for a bitsandbytes ``Params4bit``, cached in ``holder`` (an instance ``__dict__``) and
    read again only when the parameter, its data or its ``quant_state`` changed: bitsandbytes replaces them in place
    (its CPU repacking on the first eval forward, ``.to()``, a merge), and a call must cost no more than a few
    attribute reads."""
    state = weight.quant_state
    absmax = state.absmax
    key = (weight.data_ptr(), weight._version, absmax._version, bool(getattr(state, "packing_format_for_cpu", False)))
    cached = holder.get("_fastlora_bnb_weight")
    if cached is not None and cached[0] is weight and cached[1] is state and cached[2] is absmax and cached[3] == key:
        return cached[4]
    quantized = nf4.from_bnb(weight)
    holder["_fastlora_bnb_weight"] = (weight, state, absmax, key, quantized)
    return quantized


def bnb_compute_dtype(base: nn.Module, x: torch.Tensor) -> torch.dtype:
    """The dtype a bitsandbytes ``Linear4bit`` computes ``x`` in, with its rule: its ``compute_dtype`` once set, and
    when none was given, set from the first input (fp32 and bf16 inputs compute in their own dtype)."""
    if not base.compute_type_is_set:
        base.set_compute_type(x)
        base.compute_type_is_set = True
    return base.compute_dtype or x.dtype


class Base4bit:
    """What a layer over a frozen 4-bit base layer (bitsandbytes ``Linear4bit`` or ``Nf4Linear``) shares, mixed into an
    ``AdaptedLinear``: the base layer's weight, bias and (for an ``Nf4Linear``) quantization buffers held as this
    layer's own (shared, not copied: the model's state-dict keys do not change, and ``.to()`` moves them), ``W0`` read
    from them as a ``QuantizedWeight``, and the base layer's compute dtype, by its own rule."""

    def _hold_base(self, base: nn.Module) -> None:
        AdaptedLinear.__init__(self, base.weight, base.bias, features=(base.out_features, base.in_features))
        if isinstance(base, Nf4Linear):
            for name in _NF4_BUFFERS[1:]:
                self.register_buffer(name, base._buffers[name])
        self._keep_base_module(base)

    @property
    def base_module(self) -> nn.Module:
        """The wrapped 4-bit layer, holding this layer's current weight, bias and buffers (``.to()`` and merges
        replace them here)."""
        base = self.__dict__["_base_module"]
        for name, tensor in (*self._parameters.items(), *self._buffers.items()):
            if name in ("lora_A", "lora_B"):
                continue
            store = base._parameters if name in base._parameters else base._buffers
            if store.get(name) is not tensor:
                store[name] = tensor
        return base

    def quantized_weight(self) -> QuantizedWeight:
        """``W0`` as a ``QuantizedWeight`` (the base layer's tensors, read in place; rebuilt only when they change)."""
        if isinstance(self.__dict__["_base_module"], Nf4Linear):
            return self.base_module.quantized_weight()
        return bnb_quantized_weight(self.__dict__, self.weight)

    def compute_dtype_for(self, x: torch.Tensor) -> torch.dtype:
        """The dtype the base layer computes ``x`` in (bitsandbytes' rule for its layers, ``Nf4Linear``'s for ours)."""
        base = self.__dict__["_base_module"]
        if isinstance(base, Nf4Linear):
            return base.compute_dtype or x.dtype
        return bnb_compute_dtype(base, x)

    def compute_bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        """The bias in ``dtype``, as the base layer adds it."""
        return self.bias if self.bias is None or self.bias.dtype == dtype else self.bias.to(dtype)

    def weight_nk(self) -> torch.Tensor:
        raise TypeError(f"{type(self).__name__}: the base weight is 4-bit; use quantized_weight() or dequantize()")

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``W0`` (merged, while merged) as a dense ``[out, in]`` tensor (default: the dtype it was quantized from)."""
        return self.quantized_weight().dequantize(dtype)

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantized_base_forward(x, self.quantized_weight(), self.bias, self.compute_dtype_for(x))


class LoraLinear4bit(Base4bit, LoraLinear):
    """LoRA over a frozen 4-bit base layer, QLoRA: ``y = x·dequant(W0)ᵀ + b + s·B(A·dropout(x))``.

    The base is bitsandbytes' ``Linear4bit`` (its ``Params4bit`` read in place through ``nf4.from_bnb``, NF4 or FP4,
    with or without double quantization) or an ``Nf4Linear``; its weight, bias and buffers are this layer's (shared,
    not copied), so the model's state-dict keys are unchanged (a bitsandbytes base's quantization entries included).
    The forward is ``lora_linear(x.to(compute_dtype), W0, ...)`` cast back to ``x.dtype``, where ``compute_dtype`` is
    the base layer's, by its own rule: on the Triton backend the kernels dequantize tiles of ``W0`` in registers and
    never hold a dense ``W0``; the torch backend (CPU) dequantizes it per call. The LoRA weights are fp32 unless
    ``lora_dtype`` says otherwise, as in PEFT.

    Merging is PEFT's: a warning that rounding may change generations, then ``W0`` dequantized (in the dtype it was
    quantized from), ``s·B·A`` added, and the sum quantized again with the same settings (block size, NF4/FP4, double
    quantization), bit-exact with bitsandbytes' quantizer: a bitsandbytes base gets a new ``Params4bit``, an
    ``Nf4Linear`` new buffers. Unmerging subtracts the same way, so it restores ``W0`` only up to that rounding.
    """

    def __init__(
        self,
        base: nn.Module,
        r: int,
        lora_alpha: float = 8.0,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        init_lora_weights: bool | str = True,
        lora_dtype: torch.dtype | None = None,
    ):
        where = f"LoraLinear4bit({type(base).__name__})"
        if not is_4bit_linear(base):
            raise TypeError(f"{where}: expected a bitsandbytes Linear4bit or a fastlora Nf4Linear")
        if is_bnb_4bit(base) and getattr(base.weight, "quant_state", None) is None:
            raise ValueError(
                f"{where}: the bitsandbytes weight is not quantized yet (bitsandbytes quantizes it when the layer is "
                "moved to a device: call .to(device) first)"
            )
        _check_adapter_args(where, r, lora_alpha, lora_dropout, init_lora_weights, use_rslora, lora_dtype)
        self._hold_base(base)
        device = base.weight.device
        self._init_adapter(
            r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, device, lora_dtype or torch.float32
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self.disabled:
            return self.base_forward(x)
        dtype = self.compute_dtype_for(x)
        y = lora_linear(
            x.to(dtype), self.quantized_weight(), self.compute_bias(dtype), self.lora_A, self.lora_B, self.scaling, self.lora_dropout,
            self.training,
        )  # fmt: skip
        return y.to(x.dtype)

    @torch.no_grad()
    def merged_weight(self, sign: float = 1.0) -> torch.Tensor:
        """``dequant(W0) + sign·s·B·A`` as a dense ``[out, in]`` tensor, as PEFT computes it before quantizing again:
        ``W0`` in the dtype it was quantized from, ``s·B·A`` in fp32, the sum in the wider of the two."""
        return self.dequantize() + sign * self.delta_weight()

    @torch.no_grad()
    def _requantize(self, dense: torch.Tensor) -> None:
        """Quantize ``dense`` with the base weight's settings and make it the base weight."""
        old = self.quantized_weight()
        base = self.__dict__["_base_module"]
        # bitsandbytes' own setting, as PEFT requantizes with it: a weight bitsandbytes repacked for its CPU kernel has
        # its double quantization undone, but is still a double-quantized layer.
        nested = bool(self.weight.compress_statistics) if is_bnb_4bit(base) else old.nested
        new = nf4.quantize(dense, blocksize=old.blocksize, quant_type=old.quant_type, double_quant=nested)
        if isinstance(base, Nf4Linear):
            base.set_quantized_weight(new)
            for name in _NF4_BUFFERS:
                self._buffers[name] = base._buffers[name]
            return
        previous = self.weight
        param = nf4.to_bnb(new)
        storage = getattr(previous, "quant_storage", torch.uint8)
        if storage != torch.uint8:
            # The same bytes seen as the storage dtype bitsandbytes was given (FSDP keeps 4-bit weights in bf16).
            param.data = param.data.reshape(-1).view(storage).unsqueeze(1)
            param.quant_storage = storage
        param.module = base
        base.quant_state = param.quant_state
        self.weight = param
        base.weight = param
        self.__dict__.pop("_fastlora_bnb_weight", None)

    def merge(self) -> None:
        """PEFT's 4-bit merge (see the class docstring): warns, then ``W0 ← quantize(dequant(W0) + s·B·A)``. Refuses
        (and changes nothing) if the sum is not finite."""
        if self.merged:
            raise RuntimeError("LoraLinear4bit.merge: the adapter is already merged")
        warnings.warn("Merge lora module to 4-bit linear may get different generations due to rounding errors.",
                      UserWarning, stacklevel=2)  # fmt: skip
        self._requantize(self._checked_merged_weight(+1.0))
        self.merged = True

    def unmerge(self) -> None:
        """PEFT's 4-bit unmerge: warns, then ``W0 ← quantize(dequant(W0) - s·B·A)``: ``W0`` comes back only up to the
        rounding of two quantizations."""
        if not self.merged:
            raise RuntimeError("LoraLinear4bit.unmerge: the adapter is not merged")
        warnings.warn("Unmerge lora module to 4-bit linear may get different generations due to rounding errors.",
                      UserWarning, stacklevel=2)  # fmt: skip
        self._requantize(self._checked_merged_weight(-1.0))
        self.merged = False

    def unwrap(self, merge: bool = False) -> nn.Module:
        """The wrapped 4-bit layer (bitsandbytes ``Linear4bit`` or ``Nf4Linear``) holding ``W0`` merged with the
        adapter (``merge``) or not (unmerged first if needed)."""
        if merge and not self.merged:
            self.merge()
        elif not merge and self.merged:
            self.unmerge()
        return self.base_module

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding ``dequant(W0) + s·B·A`` (this layer is left as it is)."""
        merged = self.dequantize() if self.merged else self.merged_weight()
        if not torch.isfinite(merged).all():
            raise ValueError("LoraLinear4bit.to_linear: the merged weight is not finite")
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=merged.device,
                           dtype=merged.dtype)  # fmt: skip
        linear.weight.copy_(merged)
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        base = self.base_module
        if isinstance(base, Nf4Linear):
            return super()._save_to_state_dict(destination, prefix, keep_vars)
        # bitsandbytes' own entries (the packed weight and its quantization state), under the base layer's keys.
        base._save_to_state_dict(destination, prefix, keep_vars)
        for name in ("lora_A", "lora_B"):
            param = self._parameters[name]
            destination[prefix + name] = param if keep_vars else param.detach()

    def extra_repr(self) -> str:
        weight = self.quantized_weight()
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"lora_alpha={self.lora_alpha}, scaling={self.scaling:g}, lora_dropout={self.lora_dropout}, "
            f"bias={self.bias is not None}, base={type(self.__dict__['_base_module']).__name__}, "
            f"quant_type={weight.quant_type}, blocksize={weight.blocksize}, merged={self.merged}, "
            f"lora_dtype={self.lora_A.dtype}"
        )


# --- mixture-of-experts layers -------------------------------------------------------------------------------------


def _init_lora_pair(lora_A: torch.Tensor, lora_B: torch.Tensor, r: int, init_lora_weights: bool | str) -> None:
    """PEFT's initialisation of one adapter (see ``LoraLinear.reset_lora_parameters``), with the fan-in of PEFT's
    matrices: ``lora_A`` as ``[rows, in]`` and ``lora_B`` as ``[out, r]``, or for experts (3-D) as PEFT's
    ``[out, r·E]``, whose fan-in is ``r·E``."""
    a2d = lora_A.view(-1, lora_A.shape[-1])
    if init_lora_weights == "gaussian":
        nn.init.normal_(a2d, std=1.0 / r)
    else:
        nn.init.kaiming_uniform_(a2d, a=math.sqrt(5))
    if init_lora_weights is not False:
        nn.init.zeros_(lora_B)
    elif lora_B.dim() == 2:
        nn.init.kaiming_uniform_(lora_B, a=math.sqrt(5))
    else:
        E, out_features, rank = lora_B.shape
        peft_b = torch.empty(out_features, rank * E, device=lora_B.device, dtype=lora_B.dtype)
        nn.init.kaiming_uniform_(peft_b, a=math.sqrt(5))
        lora_B.copy_(peft_b.view(out_features, rank, E).permute(2, 0, 1))


def _check_adapter_args(where: str, r, lora_alpha, lora_dropout, init_lora_weights, use_rslora, lora_dtype) -> None:
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"{where}: rank r must be an integer >= 1, got {r!r}")
    if not isinstance(lora_alpha, numbers.Real) or isinstance(lora_alpha, bool) or not math.isfinite(float(lora_alpha)):
        raise TypeError(f"{where}: lora_alpha must be a finite real number, got {lora_alpha!r}")
    if not isinstance(lora_dropout, numbers.Real) or not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"{where}: lora_dropout must be in [0, 1), got {lora_dropout!r}")
    if init_lora_weights not in INIT_CHOICES:
        raise ValueError(f"{where}: init_lora_weights must be one of {INIT_CHOICES}, got {init_lora_weights!r}")
    if not isinstance(use_rslora, bool):
        raise TypeError(f"{where}: use_rslora must be a bool, got {type(use_rslora).__name__} {use_rslora!r}")
    if lora_dtype is not None and not (isinstance(lora_dtype, torch.dtype) and lora_dtype.is_floating_point):
        raise TypeError(f"{where}: lora_dtype must be a floating-point torch.dtype or None, got {lora_dtype!r}")


def _default_lora_dtype(weight: torch.Tensor, lora_dtype: torch.dtype | None) -> torch.dtype:
    """fp32 adapters on a 16-bit base, as ``LoraLinear`` keeps them, unless ``lora_dtype`` says otherwise."""
    return lora_dtype or (torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype)


class SharedBase(nn.Module):
    """A module that stands in for ``base`` in the model: it holds ``base``'s own parameters, buffers and children
    under their own names (shared, not copied), so the model's state-dict keys and ``.to()`` are unchanged, and keeps
    ``base`` itself off the module tree, to call its code and to hand it back (``unwrap``).

    Merging writes ``W ± ΔW`` into ``base``'s own parameters; a subclass says how (``_write_merge``), how to check it
    first (``check_merge``) and how to start a fresh adapter (``reset_lora_parameters``)."""

    merged: bool

    def check_merge(self, sign: float = 1.0) -> None:
        """Raise ``ValueError`` if merging (``sign = -1``: unmerging) would put a non-finite value into a weight;
        changes nothing."""
        raise NotImplementedError

    def _write_merge(self, sign: float) -> None:
        """Write ``W + sign·ΔW`` into the base module's parameters, all or nothing."""
        raise NotImplementedError

    def reset_lora_parameters(self) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def merge(self) -> None:
        """``W += ΔW`` in the base module's parameters (fp32 accumulation, rounded once), all or nothing."""
        if self.merged:
            raise RuntimeError(f"{type(self).__name__}.merge: LoRA is already merged")
        self._write_merge(+1.0)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            raise RuntimeError(f"{type(self).__name__}.unmerge: LoRA is not merged")
        self._write_merge(-1.0)
        self.merged = False

    @torch.no_grad()
    def commit_merge(self) -> None:
        """Make the base weights ``W + ΔW`` for good (merging first if needed) and start a fresh adapter."""
        if not self.merged:
            self.merge()
        self.merged = False
        self.reset_lora_parameters()

    def unwrap(self, merge: bool = False) -> nn.Module:
        """The module given at creation, holding ``W + ΔW`` with ``merge``, else ``W`` (unmerged first if needed)."""
        if merge and not self.merged:
            self.merge()
        elif not merge and self.merged:
            self.unmerge()
        return self.base_module

    def _adopt(self, base: nn.Module) -> None:
        object.__setattr__(self, "_base_module", base)
        for name, param in base.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for name, buf in base.named_buffers(recurse=False):
            self.register_buffer(name, buf, persistent=name not in base._non_persistent_buffers_set)
        for name, child in base.named_children():
            self.add_module(name, child)

    @property
    def base_module(self) -> nn.Module:
        base = self.__dict__["_base_module"]
        # The parameters may have been replaced since (``.to()`` with parameter swapping, sharding), and ``.to()``
        # always replaces buffers: the base module computes with this module's current ones.
        for name, param in self._parameters.items():
            if name in base._parameters and base._parameters[name] is not param:
                base._parameters[name] = param
        for name, buf in self._buffers.items():
            if name in base._buffers and base._buffers[name] is not buf:
                base._buffers[name] = buf
        return base


class ExpertAdapter(nn.Module):
    """One adapter on a fused 3-D expert parameter: ``lora_A [E, r, in]``, ``lora_B [E, out, r]``, ``ΔW_e = s·B_e·A_e``.

    The same numbers as PEFT's ``lora_A.weight [r·E, in]`` (expert ``e``: rows ``e·r .. e·r + r - 1``) and
    ``lora_B.weight [out, r·E]`` (expert ``e``: columns ``k·E + e``); ``to_peft`` / ``from_peft`` convert."""

    def __init__(self, num_experts: int, in_features: int, out_features: int, r: int, lora_alpha: float,
                 use_rslora: bool, init_lora_weights: bool | str, device, dtype):  # fmt: skip
        super().__init__()
        self.r, self.lora_alpha, self.use_rslora = r, lora_alpha, use_rslora
        self.scaling = lora_scaling(r, lora_alpha, use_rslora)
        self.lora_A = nn.Parameter(torch.empty(num_experts, r, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(num_experts, out_features, r, device=device, dtype=dtype))
        self.init_lora_weights = init_lora_weights
        with torch.no_grad():
            _init_lora_pair(self.lora_A, self.lora_B, r, init_lora_weights)

    def to_peft(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lora_A.weight, lora_B.weight)`` in PEFT's layout (new tensors)."""
        E, r, k = self.lora_A.shape
        return self.lora_A.detach().reshape(E * r, k).clone(), self.lora_B.detach().permute(1, 2, 0).reshape(-1, r * E)

    @staticmethod
    def from_peft(lora_A: torch.Tensor, lora_B: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
        """PEFT's ``lora_A.weight [r·E, in]`` and ``lora_B.weight [out, r·E]`` as ``[E, r, in]`` and ``[E, out, r]``."""
        rows, k = lora_A.shape
        r = rows // num_experts
        return lora_A.reshape(num_experts, r, k), lora_B.reshape(lora_B.shape[0], r, num_experts).permute(2, 0, 1)

    def delta_weight(self) -> torch.Tensor:
        """``s·B_e·A_e`` for every expert, ``[E, out, in]`` in fp32."""
        return torch.bmm(self.lora_B.float(), self.lora_A.float()) * self.scaling

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        _init_lora_pair(self.lora_A, self.lora_B, self.r, self.init_lora_weights)

    def extra_repr(self) -> str:
        E, r, k = self.lora_A.shape
        return (f"experts={E}, in_features={k}, out_features={self.lora_B.shape[1]}, r={r}, "
                f"lora_alpha={self.lora_alpha}, scaling={self.scaling:g}, lora_dtype={self.lora_A.dtype}")  # fmt: skip


# The flags transformers' ``use_experts_implementation`` sets on a fused-experts module, which its forward reads.
_EXPERT_FLAGS = ("has_gate", "has_bias", "is_transposed")


def expert_layout(module: nn.Module, name: str) -> tuple[int, int, int]:
    """``(experts, in_features, out_features)`` of the 3-D parameter ``name`` of a fused-experts module: ``[E, out,
    in]``, or ``[E, in, out]`` when the module ``is_transposed`` (GPT-OSS)."""
    E, d1, d2 = getattr(module, name).shape
    return (E, d1, d2) if getattr(module, "is_transposed", False) else (E, d2, d1)


Projection = Callable[[str, torch.Tensor, Routing], torch.Tensor]


def experts_forward(
    base: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    project: Projection,
) -> torch.Tensor:
    """transformers' grouped-GEMM forward of the fused-experts module ``base`` (``hidden_states [T, H]``,
    ``top_k_index`` / ``top_k_weights [T, k]``), with each projection computed by ``project(name, x, routing)``: the
    rows ``x`` sorted by expert (``routing``) through the parameter ``name``, bias included."""
    T = hidden_states.shape[0]
    routing = route(top_k_index, base.num_experts)
    up, down = LoraExperts.projections(base)
    h = project(up, hidden_states[routing.rows], routing)
    h = base._apply_gate(h) if base.has_gate else base.act_fn(h)
    out = project(down, h, routing)
    if getattr(base, "has_post_expert_norm", False):
        out = base.post_expert_norm(out)
    out = out * top_k_weights.reshape(-1)[routing.order].unsqueeze(-1)
    out = out[routing.inverse].view(T, routing.top_k, out.shape[-1]).sum(dim=1)
    return out.to(hidden_states.dtype)


def expert_weights(base: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The 3-D parameter ``name`` of a fused-experts module and its bias (GPT-OSS's ``<name>_bias``), or None."""
    return getattr(base, name), getattr(base, f"{name}_bias", None) if base.has_bias else None


def lora_projection(
    base: nn.Module, adapters: dict[str, tuple[torch.Tensor, torch.Tensor, float]], lora_dropout: float, training: bool
) -> Projection:
    """The ``project`` of ``experts_forward`` with ``adapters`` (projection name -> ``(lora_A [E, r, in], lora_B [E,
    out, r], scaling)``, any strides) added by ``grouped_lora_linear``; a projection without one runs the base GEMM."""

    def project(name: str, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        weight, bias = expert_weights(base, name)
        x = x.to(weight.dtype)
        if name not in adapters:
            return grouped_linear(x, weight, bias, routing, transposed=base.is_transposed)
        lora_A, lora_B, scaling = adapters[name]
        return grouped_lora_linear(
            x, weight, bias, lora_A, lora_B, routing, scaling, lora_dropout, training, transposed=base.is_transposed
        )

    return project


def is_fused_experts(module: nn.Module) -> bool:
    """Whether ``module`` is one of transformers' fused-experts modules that ``experts_forward`` computes."""
    has_flags = all(hasattr(module, flag) for flag in (*_EXPERT_FLAGS, "num_experts"))
    return has_flags and not getattr(module, "_is_expert_parallel", False)


class LoraExperts(SharedBase):
    """The experts of a mixture-of-experts layer with LoRA on some of their fused 3-D parameters.

    ``base`` is one of transformers' fused-experts modules (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, GPT-OSS, ...:
    ``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]``, or GPT-OSS's transposed ``[E, H, 2I]`` / ``[E, I, H]`` with
    biases), called as ``experts(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k])``. ``targets`` maps a
    parameter name to ``(r, lora_alpha)``.

    The forward is transformers' grouped-GEMM experts forward with the LoRA terms added by
    ``fastlora.grouped_lora_linear``: the routed rows are sorted by expert once (``route``, from the router's own
    ``top_k_index``), each projection runs the base grouped GEMM and adds ``s·(D(x_e)·A_eᵀ)·B_eᵀ`` into its output, the
    gate/activation is the module's own (``_apply_gate`` or ``act_fn``), and the rows are weighted and summed back per
    token. ``ΔW_e`` is never formed. Dropout applies to each projection's input on the LoRA branch only, with the
    dense layer's regenerated masks (PEFT refuses dropout here). While ``merged`` or ``disabled`` the module's own
    forward runs (with whichever ``config._experts_implementation`` the model chose)."""

    def __init__(
        self,
        base: nn.Module,
        targets: dict[str, tuple[int, float]],
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        init_lora_weights: bool | str = True,
        lora_dtype: torch.dtype | None = None,
    ):
        super().__init__()
        where = f"LoraExperts({type(base).__name__})"
        missing = [flag for flag in _EXPERT_FLAGS if not hasattr(base, flag)]
        if missing or not hasattr(base, "num_experts"):
            raise NotImplementedError(
                f"{where}: not a fused-experts module fastlora knows (transformers' @use_experts_implementation "
                f"experts: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, GPT-OSS, ...); it lacks "
                f"{missing or ['num_experts']}"
            )
        if getattr(base, "_is_expert_parallel", False):
            raise NotImplementedError(f"{where}: expert-parallel experts are not supported")
        if not targets:
            raise ValueError(f"{where}: no parameter to adapt")
        for name, (r, alpha) in targets.items():
            _check_adapter_args(where, r, alpha, lora_dropout, init_lora_weights, use_rslora, lora_dtype)
            param = getattr(base, name, None)
            if name not in dict(base.named_parameters(recurse=False)) or param.dim() != 3:
                raise ValueError(f"{where}: {name!r} is not a 3-D parameter of the module")
            if name not in self.projections(base):
                raise NotImplementedError(
                    f"{where}: LoRA on {name!r} is not supported; the experts' projections are {self.projections(base)}"
                )
        self._adopt(base)
        self.lora_dropout = float(lora_dropout)
        self.merged = False
        self.disabled = False
        self.lora = nn.ModuleDict()
        # In the module's registration order: PEFT's nesting of several adapted parameters (``fastlora.io.peft_keys``).
        order = [name for name, _ in base.named_parameters(recurse=False) if name in targets]
        for name in order:
            r, alpha = targets[name]
            weight = getattr(base, name)
            E, k, n = expert_layout(base, name)
            dtype = _default_lora_dtype(weight, lora_dtype)
            self.lora[name] = ExpertAdapter(E, k, n, r, alpha, use_rslora, init_lora_weights, weight.device, dtype)
        for param in base.parameters(recurse=False):
            param.requires_grad_(False)

    @staticmethod
    def projections(base: nn.Module) -> tuple[str, str]:
        """The names of the up (or gate-up) and down projections of a fused-experts module."""
        return ("gate_up_proj" if base.has_gate else "up_proj", "down_proj")

    @property
    def num_experts(self) -> int:
        return self.base_module.num_experts

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        base = self.base_module
        if self.merged or self.disabled:
            return base(hidden_states, top_k_index, top_k_weights)
        adapters = {name: (a.lora_A, a.lora_B, a.scaling) for name, a in self.lora.items()}
        project = lora_projection(base, adapters, self.lora_dropout, self.training)
        return experts_forward(base, hidden_states, top_k_index, top_k_weights, project)

    @torch.no_grad()
    def _merged_expert(self, name: str, e: int, sign: float) -> torch.Tensor:
        """Expert ``e``'s slice of parameter ``name`` with ``sign·s·B_e·A_e`` added, in fp32 and rounded once (a new
        tensor, one expert's size: merging never holds an fp32 copy of the whole expert stack)."""
        base, adapter = self.base_module, self.lora[name]
        weight = getattr(base, name)[e]
        delta = (adapter.lora_B[e].float() @ adapter.lora_A[e].float()) * adapter.scaling
        if base.is_transposed:
            delta = delta.t()
        return (weight.float() + sign * delta).to(weight.dtype)

    @torch.no_grad()
    def check_merge(self, sign: float = 1.0) -> None:
        """Raise ``ValueError`` if merging (``sign = -1``: unmerging) would put a non-finite value into a weight;
        changes nothing. One expert at a time."""
        for name in self.lora:
            for e in range(self.num_experts):
                if not torch.isfinite(self._merged_expert(name, e, sign)).all():
                    raise ValueError(
                        f"LoraExperts: merging would put non-finite values into {name} (expert {e}; overflow in "
                        f"{getattr(self.base_module, name).dtype}, or NaN/Inf in the adapter); the weights are left "
                        "unchanged"
                    )

    @torch.no_grad()
    def _write_merge(self, sign: float) -> None:
        """``W_e += sign·s·B_e·A_e`` for every adapted parameter, every expert checked first."""
        self.check_merge(sign)
        for name in self.lora:
            weight = getattr(self.base_module, name)
            for e in range(self.num_experts):
                weight[e].copy_(self._merged_expert(name, e, sign))

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        for adapter in self.lora.values():
            adapter.reset_lora_parameters()

    def extra_repr(self) -> str:
        return f"lora_dropout={self.lora_dropout}, merged={self.merged}"


class LoraParameter(SharedBase):
    """LoRA on a 2-D parameter of a module that is not a linear layer: a mixture-of-experts router's ``weight [E, H]``
    (PEFT's ``target_parameters`` on ``mlp.gate.weight``). ``lora_A [r, in]``, ``lora_B [out, r]`` as PEFT's.

    The module's own forward runs with ``W + s·B·A`` in place of the parameter (``torch.func.functional_call``): a
    router's code (softmax, top-k, bias) is the model's, and ``ΔW`` is the size of the router, ``E·H``, next to the
    experts' ``E·3·H·I``. Dropout cannot reach the router's input that way, so ``lora_dropout > 0`` is refused."""

    def __init__(
        self,
        base: nn.Module,
        name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        init_lora_weights: bool | str = True,
        lora_dtype: torch.dtype | None = None,
    ):
        super().__init__()
        where = f"LoraParameter({type(base).__name__}.{name})"
        _check_adapter_args(where, r, lora_alpha, lora_dropout, init_lora_weights, use_rslora, lora_dtype)
        param = dict(base.named_parameters(recurse=False)).get(name)
        if param is None or param.dim() != 2:
            raise ValueError(f"{where}: {name!r} is not a 2-D parameter of the module")
        if lora_dropout > 0.0:
            raise ValueError(
                f"{where}: lora_dropout={lora_dropout} cannot apply to LoRA on a parameter (the module's own forward "
                "computes with it); set lora_dropout=0, or leave this parameter out of target_parameters"
            )
        self._adopt(base)
        self.parameter_name = name
        self.r, self.lora_alpha, self.use_rslora = r, lora_alpha, use_rslora
        self.scaling = lora_scaling(r, lora_alpha, use_rslora)
        self.init_lora_weights = init_lora_weights
        self.merged = False
        self.disabled = False
        out_features, in_features = param.shape
        dtype = _default_lora_dtype(param, lora_dtype)
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=param.device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, device=param.device, dtype=dtype))
        self.reset_lora_parameters()
        param.requires_grad_(False)

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        _init_lora_pair(self.lora_A, self.lora_B, self.r, self.init_lora_weights)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def forward(self, *args, **kwargs):
        base = self.base_module
        if self.merged or self.disabled:
            return base(*args, **kwargs)
        weight = getattr(base, self.parameter_name)
        delta = (self.lora_B @ self.lora_A) * self.scaling
        return torch.func.functional_call(base, {self.parameter_name: weight + delta.to(weight.dtype)}, args, kwargs)

    @torch.no_grad()
    def merged_weight(self, sign: float = 1.0) -> torch.Tensor:
        """The parameter with ``sign·s·B·A`` added, in fp32 and rounded once (a new tensor); refuses when not finite."""
        weight = getattr(self.base_module, self.parameter_name)
        new = (weight.float() + sign * self.delta_weight()).to(weight.dtype)
        if not torch.isfinite(new).all():
            raise ValueError(f"LoraParameter: merging would put non-finite values into {self.parameter_name}; the "
                             "weight is left unchanged")  # fmt: skip
        return new

    def check_merge(self, sign: float = 1.0) -> None:
        self.merged_weight(sign)

    @torch.no_grad()
    def _write_merge(self, sign: float) -> None:
        getattr(self.base_module, self.parameter_name).copy_(self.merged_weight(sign))

    def extra_repr(self) -> str:
        return (f"parameter={self.parameter_name}, r={self.r}, lora_alpha={self.lora_alpha}, "
                f"scaling={self.scaling:g}, merged={self.merged}, lora_dtype={self.lora_A.dtype}")  # fmt: skip
