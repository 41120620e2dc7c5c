"""``MultiLoraLinear``: a frozen linear layer plus, per token, the adapter of its slot in an adapter pool; and the
batch context its layers read (which ``BatchMeta`` each layer computes, per thread).

The batch context is a ``ContextVar``: each thread (and each asyncio task) sees its own value, so concurrent forwards
of one model in different threads each read their own batch's metadata. ``batch_meta(meta)`` gives one ``BatchMeta``
to every layer; ``MultiLoraModel`` sets a ``BatchSource`` that builds the meta of each layer input shape once per call.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

from ..layers import AdaptedLinear, Base4bit, is_4bit_linear
from ..ops import BatchMeta, multi_lora_linear

if TYPE_CHECKING:
    from .pool import PoolLayer


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


# What compiled layers read instead: dynamo cannot trace ``ContextVar.get``, so the calls that set the context variable
# (``batch_meta``, ``set_batch_meta``, ``MultiLoraModel``'s calls) set this process-wide value with it, and a layer
# under ``torch.compile`` reads it. Dynamo guards on the type and the host integers of what it reads, not on the
# object, so a new batch of the same sizes reuses the compiled graph; compiled layers of one process must not run
# concurrently in several threads.
_COMPILED_SOURCE: BatchSource | None = None


def _set_source(source: BatchSource | None) -> tuple[contextvars.Token, BatchSource | None]:
    global _COMPILED_SOURCE
    previous, _COMPILED_SOURCE = _COMPILED_SOURCE, source
    return _BATCH.set(source), previous


def _reset_source(tokens: tuple[contextvars.Token, BatchSource | None]) -> None:
    global _COMPILED_SOURCE
    token, _COMPILED_SOURCE = tokens
    _BATCH.reset(token)


def _as_source(batch: BatchMeta | BatchSource | None) -> BatchSource | None:
    return batch if batch is None or hasattr(batch, "meta_for") else _FixedMeta(batch)


def current_batch_meta() -> BatchMeta | BatchSource | None:
    """What the ``MultiLoraLinear`` layers compute in this thread / context: the ``BatchMeta`` given to
    ``batch_meta`` / ``set_batch_meta``, or the ``BatchSource`` given instead (``MultiLoraModel`` sets one per call);
    None: the base model only."""
    source = _BATCH.get()
    return source.meta if isinstance(source, _FixedMeta) else source


def set_batch_meta(batch: BatchMeta | BatchSource | None) -> tuple:
    """Set the current batch for this context (a ``BatchMeta`` for every layer, or a ``BatchSource``); returns the
    token for ``reset_batch_meta``."""
    return _set_source(_as_source(batch))


def reset_batch_meta(token: tuple) -> None:
    _reset_source(token)


@contextlib.contextmanager
def batch_meta(batch: BatchMeta | BatchSource | None):
    """``with batch_meta(meta): model(...)``: the ``MultiLoraLinear`` layers compute ``meta``'s batch (every layer
    must then see all of its tokens; pass a ``BatchSource`` for layers that see fewer)."""
    token = _set_source(_as_source(batch))
    try:
        yield batch
    finally:
        _reset_source(token)


class MultiLoraLinear(AdaptedLinear):
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
        super().__init__(weight, bias, fan_in_fan_out)
        self._check_pool(pool)
        # A plain attribute, not a buffer: the pool owns these tensors (and state_dict should not save them).
        object.__setattr__(self, "pool", pool)

    def _check_pool(self, pool: PoolLayer) -> None:
        if (self.in_features, self.out_features) != (pool.in_features, pool.out_features):
            raise ValueError(
                f"MultiLoraLinear: the pool layer {pool.name!r} is {pool.in_features} -> {pool.out_features}, the "
                f"weight is {self.in_features} -> {self.out_features}"
            )

    @classmethod
    def from_linear(cls, linear: nn.Module, pool: PoolLayer, fan_in_fan_out: bool = False) -> MultiLoraLinear:
        """Wrap ``linear`` (``nn.Linear``; GPT-2 ``Conv1D`` with ``fan_in_fan_out=True``), sharing its parameters.
        ``unwrap`` hands the very module back."""
        if not isinstance(getattr(linear, "weight", None), torch.Tensor):
            raise TypeError(f"MultiLoraLinear.from_linear: expected a linear layer, got {type(linear).__name__}")
        layer = cls(linear.weight, linear.bias, pool, fan_in_fan_out)
        layer._keep_base_module(linear)
        return layer

    def batch_for(self, x: torch.Tensor) -> BatchMeta | None:
        """The ``BatchMeta`` this layer computes for input ``x`` (None: the base layer alone)."""
        source = _COMPILED_SOURCE if torch.compiler.is_compiling() else _BATCH.get()
        meta = None if source is None else source.meta_for(self.pool, tuple(x.shape[:-1]), x.device)
        if meta is not None and x.numel() != meta.num_tokens * self.in_features:
            raise ValueError(
                f"MultiLoraLinear {self.pool.name!r}: the input {tuple(x.shape)} holds "
                f"{x.numel() // max(self.in_features, 1)} tokens, the batch metadata {meta.num_tokens}"
            )
        return meta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        meta = self.batch_for(x)
        if meta is None:
            return self.base_forward(x)
        pool = self.pool
        return multi_lora_linear(
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


class MultiLoraLinear4bit(Base4bit, MultiLoraLinear):
    """``MultiLoraLinear`` over a frozen 4-bit base layer (bitsandbytes ``Linear4bit`` or ``Nf4Linear``, NF4 or FP4):
    the base layer's weight is read in place as a ``QuantizedWeight`` and the multi-adapter kernels dequantize its
    tiles in registers (the fused decode kernel; the segmented path's base GEMM). Inputs are computed in the base
    layer's compute dtype, by its own rule, and the output is returned in the input's dtype, as the base layer does.
    """

    def __init__(self, base: nn.Module, pool: PoolLayer):
        if not is_4bit_linear(base):
            raise TypeError(f"MultiLoraLinear4bit: expected a 4-bit linear layer, got {type(base).__name__}")
        self._hold_base(base)
        self._check_pool(pool)
        object.__setattr__(self, "pool", pool)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        meta = self.batch_for(x)
        if meta is None:
            return self.base_forward(x)
        pool = self.pool
        dtype = self.compute_dtype_for(x)
        y = multi_lora_linear(
            x.to(dtype), self.quantized_weight(), self.compute_bias(dtype), pool.a_pool, pool.b_pool, meta,
            slot_ranks=pool.slot_ranks, slot_scalings=pool.slot_scalings,
        )  # fmt: skip
        return y.to(x.dtype)

    def unwrap(self) -> nn.Module:
        """The wrapped 4-bit layer, holding this layer's (possibly moved) tensors."""
        return self.base_module

    def extra_repr(self) -> str:
        pool = self.pool
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"4-bit base={type(self.__dict__['_base_module']).__name__}, max_adapters={pool.a_pool.shape[0]}, "
            f"max_rank={pool.a_pool.shape[1]}, lora_dtype={pool.a_pool.dtype}"
        )


def _frozen_parameter(tensor: torch.Tensor) -> nn.Parameter:
    # Modules hold their weights as Parameters (a plain tensor is refused by nn.Linear's __setattr__); a layer built
    # from plain tensors hands them back wrapped, sharing storage.
    return tensor if isinstance(tensor, nn.Parameter) else nn.Parameter(tensor, requires_grad=False)
