"""Many adapters over a mixture-of-experts layer: ``MultiLoraExperts`` (the fused experts) and ``MultiLoraParameter``
(a router's weight), each row of a batch with its own adapter while its tokens are routed to experts.

Both read the batch of the running call as ``MultiLoraLinear`` does (``fastlora.serving.linear``): the
``BatchMeta`` of their input's tokens, which come to them in row order (``[B·L, H]``, flattened by the block).

- ``MultiLoraExperts`` runs transformers' grouped-GEMM experts forward (``fastlora.layers.experts_forward``) and adds,
  to each adapted projection, the LoRA term of every routed row's own adapter and expert
  (``fastlora.ops.multi_expert_lora_``): rows are grouped per (adapter slot, expert), one segment per pair, and run
  through the grouped shrink and expand kernels. Rows without an adapter cost nothing beyond the base GEMMs.
- ``MultiLoraParameter`` runs the router's own forward (its softmax, top-k and normalisation are the model's code)
  and adds, to the ``F.linear`` it makes with its weight (or with a cast of it, as DeepSeek-V3's fp32 router does),
  each row's LoRA term (a ``TorchFunctionMode`` catches that one call). A router whose forward with adapters in the
  batch does not call ``F.linear`` on its weight exactly once cannot take per-row adapters: it raises rather than
  serve the base router silently.

Limits: eager forwards only (``torch.compile`` and CUDA-graph decode steps of these layers are not supported: the
per-(slot, expert) grouping is built on the device per call, and ``MultiLoraModel`` runs decode steps of models with
these layers eagerly); inference only.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..layers import SharedBase, expert_weights, experts_forward
from ..ops import grouped_linear, multi_expert_lora_, multi_lora_linear
from .linear import _BATCH
from .pool import PoolLayer


class MultiLoraExperts(SharedBase):
    """The fused experts of a mixture-of-experts layer, each routed row adding its own adapter's expert update.

    ``pools`` maps each served projection (``gate_up_proj``, ``down_proj``) to its ``PoolLayer`` (named
    ``<module>.<parameter>``; ``a_pool [slots, E, r_max, in]``, ``b_pool [slots, E, out, r_max]``). The base module's
    parameters are shared, not copied; ``unwrap`` hands the module back."""

    def __init__(self, base: nn.Module, pools: dict[str, PoolLayer]):
        super().__init__()
        self._adopt(base)
        object.__setattr__(self, "pools", dict(pools))

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        base = self.base_module
        source = _BATCH.get()
        pool = next(iter(self.pools.values()))
        meta = None if source is None else source.meta_for(pool, tuple(hidden_states.shape[:-1]), hidden_states.device)
        if meta is None:
            return base(hidden_states, top_k_index, top_k_weights)
        if meta.num_tokens != hidden_states.shape[0]:
            raise ValueError(
                f"MultiLoraExperts {pool.name!r}: the input {tuple(hidden_states.shape)} holds "
                f"{hidden_states.shape[0]} tokens, the batch metadata {meta.num_tokens}"
            )

        def project(name: str, x: torch.Tensor, routing) -> torch.Tensor:
            weight, bias = expert_weights(base, name)
            y = grouped_linear(x.to(weight.dtype), weight, bias, routing, transposed=base.is_transposed)
            layer = self.pools.get(name)
            if layer is not None and meta.max_rank > 0:
                multi_expert_lora_(
                    y, x.to(weight.dtype), routing, meta.token_slots, meta.token_scales, layer.a_pool, layer.b_pool,
                    layer.slot_scalings, min(meta.max_rank, layer.a_pool.shape[2]),
                )  # fmt: skip
            return y

        return experts_forward(base, hidden_states, top_k_index, top_k_weights, project)

    def unwrap(self) -> nn.Module:
        return self.base_module

    def extra_repr(self) -> str:
        return f"projections={list(self.pools)}"


# The tensor methods a router may cast its weight with before its ``F.linear`` (DeepSeek-V3's and GLM-4-MoE's compute
# the router in fp32: ``F.linear(x.float(), self.weight.float())``).
_CASTS = {torch.Tensor.float, torch.Tensor.to, torch.Tensor.type, torch.Tensor.double, torch.Tensor.half,
          torch.Tensor.bfloat16, torch.Tensor.contiguous}  # fmt: skip


class _LinearOf(TorchFunctionMode):
    """Adds ``lora(x)`` to the ``F.linear`` calls made with ``weight`` (or a cast of it, made inside the mode); counts
    them."""

    def __init__(self, weight: torch.Tensor, lora):
        super().__init__()
        self.lora, self.calls = lora, 0
        self.weights = {id(weight): weight}  # the weight and its casts, kept alive while the mode is on

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _CASTS and args and id(args[0]) in self.weights and isinstance(out, torch.Tensor):
            self.weights[id(out)] = out
        elif func is nn.functional.linear and len(args) >= 2 and id(args[1]) in self.weights:
            self.calls += 1
            out = out + self.lora(args[0]).to(out.dtype)
        return out


class MultiLoraParameter(SharedBase):
    """A router (a module whose forward computes ``F.linear(x, weight[, bias])``, possibly on a cast of its weight, then
    its own routing), each token adding its row's adapter: ``logits[t] = x[t]·Wᵀ + s_slot·(x[t]·A_slotᵀ)·B_slotᵀ``.

    The router's own ``F.linear`` runs as the model wrote it; the LoRA term is ``fastlora.multi_lora_linear`` over the
    pool with a zero base weight (the router's size, ``E·H``, allocated once per dtype), in the pool's dtype."""

    def __init__(self, base: nn.Module, parameter_name: str, pool: PoolLayer):
        super().__init__()
        self._adopt(base)
        self.parameter_name = parameter_name
        object.__setattr__(self, "pool", pool)
        object.__setattr__(self, "_zeros", {})

    def forward(self, *args, **kwargs):
        base = self.base_module
        source = _BATCH.get()
        hidden = args[0] if args else next(iter(kwargs.values()), None)
        pool = self.pool
        if source is None or not isinstance(hidden, torch.Tensor):
            return base(*args, **kwargs)
        if source.meta_for(pool, tuple(hidden.shape[:-1]), hidden.device) is None:
            return base(*args, **kwargs)  # no row of this batch has an adapter here

        def lora(x: torch.Tensor) -> torch.Tensor:
            meta = source.meta_for(pool, tuple(x.shape[:-1]), x.device)
            dtype = pool.a_pool.dtype
            zeros = self._zeros.get((dtype, x.device))
            if zeros is None:
                zeros = torch.zeros(pool.out_features, pool.in_features, dtype=dtype, device=x.device)
                self._zeros[(dtype, x.device)] = zeros
            return multi_lora_linear(
                x.to(dtype), zeros, None, pool.a_pool, pool.b_pool, meta, slot_ranks=pool.slot_ranks,
                slot_scalings=pool.slot_scalings,
            )  # fmt: skip

        mode = _LinearOf(getattr(base, self.parameter_name), lora)
        with mode:
            out = base(*args, **kwargs)
        if mode.calls != 1:
            raise RuntimeError(
                f"MultiLoraParameter {pool.name!r}: the forward of {type(base).__name__} called "
                f"torch.nn.functional.linear with its {self.parameter_name!r} {mode.calls} times, not once, so per-row "
                "adapters cannot be applied to it; leave it out of target_parameters"
            )
        return out

    def unwrap(self) -> nn.Module:
        return self.base_module

    def extra_repr(self) -> str:
        return f"parameter={self.parameter_name}, pool={self.pool.name!r}"
