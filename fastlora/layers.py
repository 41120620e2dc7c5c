"""``LoraLinear``: a frozen linear layer plus a trainable low-rank update, computed by one fused op.
``MultiLoraLinear``: a frozen linear layer plus, per token, the adapter of its slot in an adapter pool.

Parameters follow PEFT's shapes (``lora_A [r, in_features]``, ``lora_B [out_features, r]``) and its
initialisation, so adapters move between the two without conversion. The base weight is the very
``nn.Parameter`` of the wrapped layer: ``from_linear`` never copies it.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

from . import ops
from .ops import lora_linear

if TYPE_CHECKING:
    from .serving.meta import BatchMeta
    from .serving.pool import PoolLayer

INIT_CHOICES = (True, False, "gaussian")


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool = False) -> float:
    """``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rank-stabilised LoRA."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


class LoraLinear(nn.Module):
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
        super().__init__()
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise ValueError(f"LoraLinear: rank r must be an integer >= 1, got {r!r}")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"LoraLinear: lora_dropout must be in [0, 1), got {lora_dropout!r}")
        if init_lora_weights not in INIT_CHOICES:
            raise ValueError(f"LoraLinear: init_lora_weights must be one of {INIT_CHOICES}, got {init_lora_weights!r}")
        if weight.dim() != 2:
            raise ValueError(f"LoraLinear: weight must be 2-D, got shape {tuple(weight.shape)}")
        self.fan_in_fan_out = fan_in_fan_out
        out_features, in_features = weight.shape[::-1] if fan_in_fan_out else weight.shape
        self.in_features, self.out_features = in_features, out_features
        self.weight = weight
        self.bias = bias
        self.r = r
        self.lora_alpha = lora_alpha
        self.lora_dropout = float(lora_dropout)
        self.use_rslora = use_rslora
        self.scaling = lora_scaling(r, lora_alpha, use_rslora)
        self.merged = False
        self.disabled = False  # set by fastlora.disable_adapters: the forward is the base layer's
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
        """Wrap ``linear`` (an ``nn.Linear``, or any module with ``weight``/``bias``; a GPT-2 ``Conv1D`` with
        ``fan_in_fan_out=True``). Its parameters are shared, not copied, and frozen."""
        if not isinstance(getattr(linear, "weight", None), torch.Tensor):
            raise TypeError(
                f"LoraLinear.from_linear: expected a linear layer with a weight, got {type(linear).__name__}"
            )
        linear.weight.requires_grad_(False)
        if linear.bias is not None:
            linear.bias.requires_grad_(False)
        layer = cls(
            linear.weight, linear.bias, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, fan_in_fan_out,
            lora_dtype,
        )  # fmt: skip
        # Kept outside the module tree (its parameters are this layer's), so ``unwrap`` can hand back the very
        # module type the model had: nn.Linear, a GPT-2 Conv1D, ...
        object.__setattr__(layer, "_base_module", linear)
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
            return nn.functional.linear(x, self._weight_nk(), self.bias)
        return lora_linear(
            x, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling, self.lora_dropout, self.training,
            fan_in_fan_out=self.fan_in_fan_out,
        )  # fmt: skip

    def _weight_nk(self) -> torch.Tensor:
        return self.weight.t() if self.fan_in_fan_out else self.weight

    def delta_weight(self) -> torch.Tensor:
        """``s·B·A`` as ``[out, in]`` in fp32."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    @torch.no_grad()
    def _apply_delta(self, sign: float) -> None:
        delta = self.delta_weight()
        new = (self._weight_nk().float() + sign * delta).to(self.weight.dtype)
        if not torch.isfinite(new).all():
            raise ValueError(
                "LoraLinear: merging would put non-finite values into the weight (overflow in "
                f"{self.weight.dtype}, or NaN/Inf in the adapter); the weight is left unchanged"
            )
        self._weight_nk().copy_(new)

    def merge(self) -> None:
        """``W0 += s·B·A``, accumulated in fp32 and rounded once to the weight's dtype. Refuses (and changes
        nothing) if the result would not be finite."""
        if self.merged:
            raise RuntimeError("LoraLinear.merge: the adapter is already merged")
        self._apply_delta(+1.0)
        self.merged = True

    def unmerge(self) -> None:
        """``W0 -= s·B·A`` in fp32. Exact in fp32 up to rounding; in fp16/bf16 the weight may differ from the
        original by a rounding step, as with any merge that is not stored separately."""
        if not self.merged:
            raise RuntimeError("LoraLinear.unmerge: the adapter is not merged")
        self._apply_delta(-1.0)
        self.merged = False

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
        weight = self._weight_nk()
        merged = weight if self.merged else (weight.float() + self.delta_weight()).to(weight.dtype)
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


class BatchSource(Protocol):
    """What the ``MultiLoraLinear`` layers of a model read their batch from: ``meta_for(pool, shape, device)`` is the
    ``BatchMeta`` for a layer over ``pool`` whose input has the leading shape ``shape`` (``x.shape[:-1]``: ``[B, L]``,
    or ``[B]`` for one position per row) on ``device``, or None when that layer is not part of the batch (it then
    computes the base layer). Layers see different shapes within one forward (the output head of a causal LM often
    sees one position per row), so each asks for its own; a source should cache what it builds per shape."""

    def meta_for(self, pool: PoolLayer, shape: tuple[int, ...], device: torch.device) -> BatchMeta | None: ...


class _FixedMeta:
    """A ``BatchSource`` giving one ``BatchMeta`` to every layer, whatever its input shape (``batch_meta(meta)``)."""

    __slots__ = ("meta",)

    def __init__(self, meta: BatchMeta):
        self.meta = meta

    def meta_for(self, pool: PoolLayer, shape: tuple[int, ...], device: torch.device) -> BatchMeta:
        return self.meta


# The batch being computed, for every MultiLoraLinear of a model. A ContextVar rather than an attribute of the
# layers: each thread (and each asyncio task) sees its own value, so concurrent forwards of one model in different
# threads each read their own batch's metadata.
_BATCH: contextvars.ContextVar[BatchSource | None] = contextvars.ContextVar("fastlora_batch", default=None)


def _as_source(batch: BatchMeta | BatchSource | None) -> BatchSource | None:
    return batch if batch is None or hasattr(batch, "meta_for") else _FixedMeta(batch)


def current_batch_meta() -> BatchMeta | BatchSource | None:
    """What the ``MultiLoraLinear`` layers compute in this thread / context: the ``BatchMeta`` given to
    ``batch_meta`` / ``set_batch_meta``, or the ``BatchSource`` given instead (``MultiLoraModel`` sets one per call);
    None: the base model only."""
    source = _BATCH.get()
    return source.meta if isinstance(source, _FixedMeta) else source


def set_batch_meta(batch: BatchMeta | BatchSource | None) -> contextvars.Token:
    """Set the current batch for this context (a ``BatchMeta`` for every layer, or a ``BatchSource``); returns the
    token for ``reset_batch_meta``."""
    return _BATCH.set(_as_source(batch))


def reset_batch_meta(token: contextvars.Token) -> None:
    _BATCH.reset(token)


@contextlib.contextmanager
def batch_meta(batch: BatchMeta | BatchSource | None):
    """``with batch_meta(meta): model(...)``: the ``MultiLoraLinear`` layers compute ``meta``'s batch (every layer
    must then see all of its tokens; pass a ``BatchSource`` for layers that see fewer)."""
    token = _BATCH.set(_as_source(batch))
    try:
        yield batch
    finally:
        _BATCH.reset(token)


class MultiLoraLinear(nn.Module):
    """A frozen linear layer whose tokens each add the LoRA update of their adapter slot:
    ``y[t] = x[t]·W0ᵀ + b + scale[t]·s_slot·(x[t]·A_slotᵀ)·B_slotᵀ`` (``fastlora.multi_lora_linear``).

    ``weight`` / ``bias`` are the wrapped layer's own parameters (shared, not copied; ``[out, in]``, or ``[in, out]``
    with ``fan_in_fan_out=True`` for GPT-2 ``Conv1D``). The adapter weights are not this module's: ``pool`` is the
    layer's slice of an ``AdapterPool`` (``a_pool``, ``b_pool``, per-slot ranks and scalings), written only by the
    pool. Which slot each token uses comes from the batch current in this context (``batch_meta``; a
    ``BatchSource`` set by ``MultiLoraModel`` for each call), asked for the ``BatchMeta`` of this layer's input
    shape; with none set, the layer is the plain base layer. Inference only.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, pool: PoolLayer, fan_in_fan_out: bool = False):
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"MultiLoraLinear: weight must be 2-D, got shape {tuple(weight.shape)}")
        out_features, in_features = weight.shape[::-1] if fan_in_fan_out else weight.shape
        if (in_features, out_features) != (pool.in_features, pool.out_features):
            raise ValueError(
                f"MultiLoraLinear: the pool layer {pool.name!r} is {pool.in_features} -> {pool.out_features}, the "
                f"weight is {in_features} -> {out_features}"
            )
        self.in_features, self.out_features = in_features, out_features
        self.fan_in_fan_out = fan_in_fan_out
        self.weight = weight
        self.bias = bias
        # A plain attribute, not a buffer: the pool owns these tensors (and state_dict should not save them).
        object.__setattr__(self, "pool", pool)

    @classmethod
    def from_linear(cls, linear: nn.Module, pool: PoolLayer, fan_in_fan_out: bool = False) -> MultiLoraLinear:
        """Wrap ``linear`` (``nn.Linear``; GPT-2 ``Conv1D`` with ``fan_in_fan_out=True``), sharing its parameters.
        ``unwrap`` hands the very module back."""
        if not isinstance(getattr(linear, "weight", None), torch.Tensor):
            raise TypeError(f"MultiLoraLinear.from_linear: expected a linear layer, got {type(linear).__name__}")
        layer = cls(linear.weight, linear.bias, pool, fan_in_fan_out)
        object.__setattr__(layer, "_base_module", linear)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        source = _BATCH.get()
        meta = None if source is None else source.meta_for(self.pool, tuple(x.shape[:-1]), x.device)
        if meta is None:
            weight = self.weight.t() if self.fan_in_fan_out else self.weight
            return nn.functional.linear(x, weight, self.bias)
        if x.numel() != meta.num_tokens * self.in_features:
            raise ValueError(
                f"MultiLoraLinear {self.pool.name!r}: the input {tuple(x.shape)} holds "
                f"{x.numel() // max(self.in_features, 1)} tokens, the batch metadata {meta.num_tokens}"
            )
        pool = self.pool
        return ops.multi_lora_linear(
            x, self.weight, self.bias, pool.a_pool, pool.b_pool, meta, slot_ranks=pool.slot_ranks,
            slot_scalings=pool.slot_scalings, fan_in_fan_out=self.fan_in_fan_out,
        )  # fmt: skip

    def unwrap(self) -> nn.Module:
        """The wrapped base module (the one given to ``from_linear``: an ``nn.Linear``, a GPT-2 ``Conv1D``, ...;
        else an ``nn.Linear``), holding this layer's weight and bias as frozen parameters."""
        base = getattr(self, "_base_module", None)
        if base is None:
            if self.fan_in_fan_out:
                raise ValueError("MultiLoraLinear.unwrap: no base module to restore a fan_in_fan_out layer into")
            # On the meta device: its own parameters are replaced below, so allocating and initialising them is waste.
            base = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        base.weight = _frozen_parameter(self.weight)
        base.bias = None if self.bias is None else _frozen_parameter(self.bias)
        return base

    def extra_repr(self) -> str:
        pool = self.pool
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"fan_in_fan_out={self.fan_in_fan_out}, max_adapters={pool.a_pool.shape[0]}, "
            f"max_rank={pool.a_pool.shape[1]}, dtype={self.weight.dtype}, lora_dtype={pool.a_pool.dtype}"
        )


def _frozen_parameter(tensor: torch.Tensor) -> nn.Parameter:
    # Modules hold their weights as Parameters (a plain tensor is refused by nn.Linear's __setattr__); a layer built
    # from plain tensors hands them back wrapped, sharing storage.
    return tensor if isinstance(tensor, nn.Parameter) else nn.Parameter(tensor, requires_grad=False)
