"""``LoraLinear``: a frozen linear layer plus a trainable low-rank update, computed by one fused op.

``AdaptedLinear`` is what every linear layer fastlora wraps is (``LoraLinear`` here, ``MultiLoraLinear`` in
``fastlora.serving``): the base layer's own weight and bias, its features and layout, and the module to hand back.
Model transforms count an ``AdaptedLinear`` as the linear layer it wraps.

Parameters follow PEFT's shapes (``lora_A [r, in_features]``, ``lora_B [out_features, r]``) and its
initialisation, so adapters move between the two without conversion. The base weight is the very
``nn.Parameter`` of the wrapped layer: ``from_linear`` never copies it.
"""

from __future__ import annotations

import math
import numbers
import warnings

import torch
from torch import nn

from .config import lora_scaling
from .ops import lora_linear

INIT_CHOICES = (True, False, "gaussian")


class AdaptedLinear(nn.Module):
    """A linear layer fastlora has wrapped: ``weight`` and ``bias`` are the base layer's own (shared, not copied),
    ``[out, in]``, or ``[in, out]`` with ``fan_in_fan_out=True`` (GPT-2 ``Conv1D``)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, fan_in_fan_out: bool = False):
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"{type(self).__name__}: weight must be 2-D, got shape {tuple(weight.shape)}")
        self.fan_in_fan_out = fan_in_fan_out
        self.out_features, self.in_features = weight.shape[::-1] if fan_in_fan_out else weight.shape
        self.weight = weight
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
        in_features, out_features = self.in_features, self.out_features
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
        # PEFT keeps adapter weights in fp32 unless told otherwise; the kernels take either.
        dtype = lora_dtype or (torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=weight.device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, device=weight.device, dtype=dtype))
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
        ``nn.Embedding``, a convolution) raises ``TypeError``. Its parameters are shared, not copied, and frozen."""
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
