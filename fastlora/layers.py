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
from collections.abc import Callable

import torch
from torch import nn

from .config import lora_scaling
from .ops import Routing, grouped_linear, grouped_lora_linear, lora_linear, route

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
