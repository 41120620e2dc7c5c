"""``MultiLoraModel``: one transformers causal LM serving many LoRA adapters at once, a different one per row.

The wrapper swaps each target ``nn.Linear`` / GPT-2 ``Conv1D`` of the model for a ``MultiLoraLinear`` over the
layer's slice of an ``AdapterPool`` (in place; module paths and the base state dict are unchanged). A call or a
``generate`` with ``adapter_names=[...]`` (one per row, None for the base model)

1. acquires the rows' adapters from the pool (uploading the ones not resident, evicting least recently used slots
   no running batch needs) and pins them for the whole call: every forward of a ``generate`` uses the same slots;
2. sets, for the duration of the call and in this thread's context only, which slot each row uses (a
   ``ContextVar`` the ``MultiLoraLinear`` layers read);
3. in every forward of the wrapped model (the prefill and every decode step with the KV cache), each
   ``MultiLoraLinear`` asks for the ``BatchMeta`` of its own input's ``[B, L]`` shape: it is built once per distinct
   shape in the call and shared by every layer of that shape (decode steps reuse theirs). Layers may see fewer
   positions than the input: the output head of a causal LM sees one per row in ``generate`` (``logits_to_keep``);
4. releases the adapters.

Rows may mix adapters of different ranks, scalings and target modules in any order. ``generate`` expansions of the
batch (``num_return_sequences``, beam search) repeat each row's adapter to its copies, as transformers repeats rows.
Calling the wrapped model directly, outside the wrapper, computes the base model.

Mixture-of-experts models (transformers' fused experts: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, GPT-OSS, ...) are served
with expert and router LoRA through ``target_parameters`` (PEFT's ``LoraConfig.target_parameters``, with its
transformers-v5 rewrite of old recipes and of ``"all-linear"``): the experts module becomes a ``MultiLoraExperts``,
which takes the tokens in row order with the router's choice and adds each routed row's own adapter's expert update
(segments per adapter × expert, ``fastlora.serving.experts``), and a router's weight a ``MultiLoraParameter``. Their
decode steps run eagerly (``cuda_graphs`` is off for such models).

Limits: inference only (calls run under ``torch.no_grad``); each row uses one adapter for all its tokens. A linear
layer must see its tokens row-major, rows in the batch's order: models that reorder or regroup tokens before a target
layer (token packing, experts held as a module list of ``nn.Linear``) are not supported, as their rows would get other
rows' adapters. Both ends are guarded. At construction, a layer inside routed experts held as a module list named
``experts`` (custom models in the style of transformers v4's ``block_sparse_moe.experts.N.w1``) is refused when
``target_modules`` names it, and left out with a warning under ``"all-linear"`` (the routers see every token in order
and are served). At
run time, every forward of the wrapped model records its ``[B, L]`` (``input_ids`` / ``inputs_embeds``), and a layer
input must be ``[B, l, ...]`` with ``l <= L``, or the ``B·L`` tokens flattened (``[B]`` only when ``L`` is 1):
anything else raises ``ValueError`` rather than serve rows with other rows' adapters. Compiled forwards (the whole
model under ``torch.compile``) and replayed decode steps skip the run-time check; their metadata is built for the
call's own shapes.

``unwrap()`` gives the model back; the wrapper then refuses every call (``RuntimeError``) rather than silently serve
the base model, and a second ``unwrap()`` returns the same model and changes nothing.

Decode steps run from CUDA graphs by default (``cuda_graphs``; ``fastlora.serving.graphs``): ``generate`` keeps a static
KV cache per batch size and replays each decode step, whose adapter metadata sits in fixed-size device buffers
(``fastlora.ops.StaticBatch``) rewritten before the step; a serving loop gets the same from ``__call__`` over
``static_cache()``. ``compile()`` compiles the model (or some of its layers) and makes calls prepare the fixed-size
metadata the compiled layers read, so they trace without graph breaks.
"""

from __future__ import annotations

import math
import numbers
import os
import warnings
from collections.abc import Hashable, Mapping, Sequence
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn

from ..config import LoraConfig
from ..io import peft_keys
from ..layers import expert_layout, is_4bit_linear, is_fused_experts
from ..model import (
    adapted_modules,
    adapted_parameters,
    adapter_layers,
    find_targets,
    is_conv1d,
    moe_config,
    set_submodule,
)
from ..ops import BatchMeta, StaticBatch
from .experts import MultiLoraExperts, MultiLoraParameter
from .graphs import DecodeGraphs
from .linear import MultiLoraLinear, MultiLoraLinear4bit, reset_batch_meta, set_batch_meta
from .pool import BASE, AdapterInfo, AdapterLease, AdapterPool, PoolLayer, timeout_seconds

# The name of the module list holding a mixture-of-experts block's routed experts, in transformers' models (Mixtral's
# ``block_sparse_moe.experts``, Qwen2-MoE's ``mlp.experts``) and the custom models that follow them.
EXPERTS = "experts"


class _Rows:
    """The adapter of each row of the running call, and the ``BatchMeta`` built for each layer input shape: the
    ``BatchSource`` (``fastlora.serving.linear``) of a ``MultiLoraModel`` call.

    Two kinds of metadata: the exact one (``BatchMeta.build``: grids sized for this batch), built on first use per
    shape, for eager layers; and fixed-size metadata (``StaticBatch``: grids sized for the batch's size only) for
    decode steps that are captured or replayed in CUDA graphs (``use_static``) and for layers under
    ``torch.compile`` (prebuilt by ``prebuild``: a compiled region cannot build it without a graph break)."""

    def __init__(self, model: MultiLoraModel, lease: AdapterLease, row_scales: tuple[float, ...] | None):
        self.model = model
        self.layers = model.pool.layers
        self.lease = lease
        self.row_slots = lease.row_slots
        self.row_scales = row_scales
        self.base_only = all(slot < 0 for slot in self.row_slots)
        self.forward_shape: tuple[int, int] | None = None  # [B, L] of the wrapped model's running forward
        self.metas: dict[tuple[int, int, torch.device], BatchMeta] = {}
        self.static: dict[tuple[int, int, torch.device], BatchMeta] = {}

    def meta_for(self, pool: PoolLayer, shape: tuple[int, ...], device: torch.device) -> BatchMeta | None:
        """The meta of a layer input ``[B', L', ...]`` (``[B']``: one position per row): ``B'`` is the call's rows,
        each repeated ``B' / rows`` times, with ``L' · ...`` positions each. None when no row has an adapter."""
        if self.base_only or self.layers.get(pool.name) is not pool:
            # A layer of another pool: a second wrapped model run inside this call (an assistant model in assisted
            # generation) computes its base model, as it would outside any call.
            return None
        if self.forward_shape is not None and not torch.compiler.is_compiling():
            self._check_layout(pool, shape)
        key = (shape[0] if shape else 1, math.prod(shape[1:]), device)
        meta = self.static.get(key)
        if meta is not None:
            return meta
        if torch.compiler.is_compiling():
            return self._static_meta(pool, key)
        meta = self.metas.get(key)
        if meta is None:
            slots, scales = self._token_rows(pool, key)
            meta = BatchMeta.build(slots, self.lease.slot_ranks, self.lease.slot_scalings, scales, device=device)
            self.metas[key] = meta
        return meta

    def _check_layout(self, pool: PoolLayer, shape: tuple[int, ...]) -> None:
        """Refuse a layer input that is not the running forward's rows in order: ``[B, l, ...]`` with ``l <= L``, or
        its ``B·L`` tokens flattened. A 1-D input of ``B`` tokens in a forward of more than one position could be one
        position per row or ``B`` routed tokens, so it is refused too."""
        batch, length = self.forward_shape
        if len(shape) >= 2:
            ok = shape[0] == batch and math.prod(shape[1:]) <= length
        else:
            ok = math.prod(shape) == batch * length
        if not ok:
            raise ValueError(
                f"MultiLoraModel: layer {pool.name!r} sees {math.prod(shape)} tokens (leading shape {list(shape)}) "
                f"in a forward of [{batch}, {length}]: they are not the forward's rows in order (routed or packed "
                "tokens are not supported: rows would get other rows' adapters); leave this layer out of "
                "target_modules"
            )

    def _token_rows(self, pool: PoolLayer, key: tuple[int, int, torch.device]) -> tuple[list[int], list[float] | None]:
        """The slot (and scale) of every token of a layer input of ``key``'s rows and positions."""
        batch, positions, _ = key
        rows = len(self.row_slots)
        if batch % rows:
            raise ValueError(
                f"MultiLoraModel: layer {pool.name!r} sees {batch} rows in a call for {rows} rows (adapter_names has "
                "one entry per row; generate may only repeat rows, as num_return_sequences and beam search do)"
            )
        repeat = batch // rows  # transformers expands row i to rows i*repeat ... i*repeat + repeat - 1
        slots = [s for s in self.row_slots for _ in range(repeat * positions)]
        scales = None
        if self.row_scales is not None:
            scales = [s for s in self.row_scales for _ in range(repeat * positions)]
        return slots, scales

    def _rank_bucket(self) -> int:
        """The ``max_rank`` of fixed-size metadata: the rows' largest rank rounded up to a power of two (at least 16,
        at most the pool's ``max_rank``), so that graphs and compiled code are shared by batches of similar ranks."""
        used = max(self.lease.slot_ranks[s] for s in self.row_slots if s >= 0)
        return min(self.model.pool.max_rank, max(16, 1 << (used - 1).bit_length()))

    @torch.compiler.disable
    def _static_meta(
        self, pool: PoolLayer, key: tuple[int, int, torch.device], buffers: StaticBatch | None = None
    ) -> BatchMeta:
        """Fixed-size metadata for ``key``, written into ``buffers`` (default: buffers of its own). Outside
        ``prebuild`` and ``use_static``, a compiled layer asked for a shape nobody prepared: a graph break, or an
        error under ``fullgraph=True``."""
        batch, positions, device = key
        slots, scales = self._token_rows(pool, key)
        if buffers is None:
            buffers = StaticBatch(batch * positions, len(self.lease.slot_ranks), self._rank_bucket(), device,
                                  token_scales=scales is not None)  # fmt: skip
        self.static[key] = meta = buffers.update(slots, self.lease.slot_ranks, self.lease.slot_scalings, scales)
        return meta

    def prebuild(self, shapes: list[tuple[int, int]]) -> None:
        """Fixed-size metadata for layer inputs of these ``(rows, positions)``, for compiled layers."""
        if self.base_only:
            return
        pool = next(iter(self.layers.values()))
        for batch, positions in shapes:
            key = (batch, positions, self.model.device)
            if key not in self.static and batch % len(self.row_slots) == 0:
                self._static_meta(pool, key)

    def use_static(self, rows: int, device: torch.device) -> Hashable:
        """Make the decode step of ``rows`` rows (one position each) read this call's rows from the model's
        persistent fixed-size buffers for that size, written now; returns what a graph of the step is keyed by."""
        if self.base_only:
            return "base"
        key = (rows, 1, device)
        meta = self.static.get(key)
        if meta is None:
            buffers = self.model._static_batch(rows, self._rank_bucket(), self.row_scales is not None, device)
            meta = self._static_meta(next(iter(self.layers.values())), key, buffers)
        return rows, meta.max_rank, meta.token_scales is not None


# The running call's rows, whichever model it is for: calls do not nest, not even calls of two models.
_ROWS: ContextVar[_Rows | None] = ContextVar("fastlora_rows", default=None)


class MultiLoraModel:
    """Serve many LoRA adapters over one transformers causal LM; each row of a batch may use a different adapter.

    ``target_modules``: the layers adapters may adapt, as in ``LoraConfig`` (names or suffixes, a regex, or
    ``"all-linear"``); ``target_parameters``: the parameters they may adapt (PEFT's ``target_parameters``: the fused
    expert projections and router weights of mixture-of-experts models); an adapter may target any subset of them.
    As in PEFT, ``target_modules=None`` with ``target_parameters`` adds PEFT's default modules for the model's type
    (``q_proj`` / ``v_proj`` for Mixtral), and old expert recipes and ``"all-linear"`` are rewritten for transformers
    v5's fused experts (``fastlora.config.moe_recipe``).
    Linear layers inside a module list of routed experts are refused (left out, with a warning, under
    ``"all-linear"``; module docstring). ``max_adapters``: device slots (adapters resident
    at once; a batch may use at most this many distinct adapters). ``max_rank``: the largest rank an adapter may
    have. ``dtype``: the dtype of the adapter pool (default: the model's dtype; see ``AdapterPool``). The pool lives
    on the model's device: move the model before wrapping it. ``acquire_timeout``: how long a call waits for slots
    pinned by other threads' calls before ``TimeoutError``: None (the default) or ``inf``, as long as it takes; calls
    that wait are served first come, first served (``AdapterPool.acquire``).

    ``model`` is modified in place (its target layers become ``MultiLoraLinear``); ``unwrap()`` restores it. Memory:
    ``max_adapters · max_rank · (K + N)`` elements of ``dtype`` per target layer, plus the CPU tier.
    """

    def __init__(
        self,
        model: nn.Module,
        target_modules: list[str] | str | None,
        max_adapters: int = 8,
        max_rank: int = 64,
        dtype: torch.dtype | None = None,
        acquire_timeout: float | None = None,
        cuda_graphs: bool = True,
        target_parameters: list[str] | None = None,
    ):
        if dtype is not None and not isinstance(dtype, torch.dtype):
            raise TypeError(
                f"MultiLoraModel: dtype must be a torch.dtype (such as torch.float16) or None, got {dtype!r}"
            )
        timeout_seconds(acquire_timeout, "MultiLoraModel: acquire_timeout")
        served = (MultiLoraLinear, MultiLoraExperts, MultiLoraParameter)
        if any(isinstance(m, served) for m in model.modules()) or any(True for _ in adapter_layers(model)):
            raise ValueError("MultiLoraModel: the model already has LoRA layers; unload or unwrap them first")
        config = moe_config(model, LoraConfig(target_modules=target_modules, target_parameters=target_parameters))
        parameters = adapted_parameters(model, config)
        targets = _unrouted(model, find_targets(model, config, parameters), config.all_linear)
        modules = {name: model.get_submodule(name) for name in [*targets, *parameters]}
        devices = {
            t.device for m in modules.values() for t in (*m.parameters(recurse=False), *m.buffers(recurse=False))
        }
        if len(devices) != 1:
            raise ValueError(f"MultiLoraModel: the target layers are on several devices ({sorted(map(str, devices))})")
        shapes: dict[str, tuple[int, ...]] = {}
        for name in targets:
            module = modules[name]
            if is_4bit_linear(module):  # the packed weight says nothing of the layer's shape
                out_features, in_features = module.out_features, module.in_features
            else:
                out_features, in_features = module.weight.shape[::-1] if is_conv1d(module) else module.weight.shape
            shapes[name] = (in_features, out_features)
        self._parameter_layers = _parameter_layer_shapes(modules, parameters, shapes)
        first = next(iter(modules.values()))
        self.model = model
        self.target_modules = config.target_modules
        self.target_parameters = config.target_parameters
        self.acquire_timeout = acquire_timeout
        # A 4-bit layer's own tensors are its packed codes: the pools then take the dtype of the model's first
        # floating-point tensor (its embeddings, in a quantized model).
        model_dtype = next(
            t.dtype for t in (*first.parameters(recurse=False), *model.parameters()) if t.dtype.is_floating_point
        )
        self.pool = AdapterPool(
            shapes, max_adapters=max_adapters, max_rank=max_rank, device=devices.pop(),
            dtype=dtype or model_dtype, select=self._selected, base_weight=self._base_weight,
            aliases=self._aliases, alias_prefixes=self._alias_prefixes(),
        )  # fmt: skip
        for name in targets:
            module = modules[name]
            if is_4bit_linear(module):
                layer = MultiLoraLinear4bit(module, self.pool.layers[name])
            else:
                layer = MultiLoraLinear.from_linear(module, self.pool.layers[name], fan_in_fan_out=is_conv1d(module))
            set_submodule(model, name, layer)
        for name, params in self._parameter_layers.items():
            module = modules[name]
            pools = {p: self.pool.layers[f"{name}.{p}"] for p in params}
            if is_fused_experts(module):
                set_submodule(model, name, MultiLoraExperts(module, pools))
            else:
                (param,) = params
                set_submodule(model, name, MultiLoraParameter(module, param, pools[param]))
        # The per-(adapter, expert) grouping of a mixture-of-experts layer is built per call: its decode steps run
        # eagerly, not from CUDA graphs.
        cuda_graphs = cuda_graphs and not self._parameter_layers
        self.cuda_graphs = cuda_graphs
        self.graphs = DecodeGraphs(model, prepare=self._prepare_decode)
        self._static: dict[tuple[int, int, bool, torch.device], StaticBatch] = {}
        self._compiled = False
        self._unwrapped = False
        self._forward_hook = model.register_forward_pre_hook(self._record_forward, with_kwargs=True)

    # -------------------------------------------------------------------------------------------- adapters

    def load_adapter(
        self,
        name: str,
        path_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor],
        config: LoraConfig | Mapping[str, Any] | None = None,
        *,
        replace: bool = False,
        allow_pickle: bool = False,
    ) -> AdapterInfo:
        """Register an adapter (a PEFT-format directory or weights file, or a state dict with PEFT's keys plus
        ``config``); it is validated against the model first and uploaded on first use. See
        ``AdapterPool.register``. A copy of an adapted layer's base weight in the adapter (PEFT saves
        ``lm_head.base_layer.weight`` with an adapter of the output head) must equal the model's own."""
        self._check_wrapped("load_adapter")
        if name == BASE:
            raise ValueError(f"MultiLoraModel.load_adapter: {BASE!r} means 'no adapter' in adapter_names")
        return self.pool.register(name, path_or_state_dict, config=config, replace=replace, allow_pickle=allow_pickle)

    def unload_adapter(self, name: str) -> None:
        """Remove an adapter; calls already running with it finish with it (``AdapterPool.unregister``)."""
        self.pool.unregister(name)

    @property
    def adapters(self) -> list[str]:
        return self.pool.adapters

    @property
    def device(self) -> torch.device:
        return self.pool.device

    # ------------------------------------------------------------------------------------------------ calls

    def __call__(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        adapter_names: Sequence[str | None] | str | None = None,
        adapter_scales: Sequence[float | None] | None = None,
        cuda_graphs: bool | None = None,
        **kwargs,
    ):
        """The wrapped model's forward (its output, e.g. ``CausalLMOutputWithPast``) with row ``i`` computed with
        adapter ``adapter_names[i]`` (None or ``"__base__"``: the base model; a single str: every row; omitted:
        every row is base). ``adapter_scales[i]`` multiplies row ``i``'s LoRA term (default 1).

        The decode-step API of a serving loop: a call of one position per row (``input_ids [B, 1]``) over a
        transformers ``StaticCache`` (``static_cache``), with every other tensor argument of a fixed shape, is
        replayed from a CUDA graph captured for its batch size (``DecodeGraphs``; ``cuda_graphs`` overrides the
        model's default for this call). The rows' adapters may change from step to step, and adapters may be loaded,
        unloaded and evicted between steps: the graph reads the batch's metadata and the pool's slots in place."""
        self._check_wrapped("__call__")
        batch = _batch_size(input_ids, kwargs.get("inputs_embeds"))
        with (
            self._rows(adapter_names, adapter_scales, batch, [(batch, _positions(input_ids, kwargs))]),
            torch.no_grad(),
        ):
            if self.cuda_graphs if cuda_graphs is None else cuda_graphs:
                return self.graphs(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def generate(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        adapter_names: Sequence[str | None] | str | None = None,
        adapter_scales: Sequence[float | None] | None = None,
        cuda_graphs: bool | None = None,
        **generate_kwargs,
    ):
        """``model.generate`` with each row's adapter (as in ``__call__``) pinned for the whole generation. The rows'
        adapters stay resident until it returns.

        With CUDA graphs (the model's ``cuda_graphs``, or this call's) the generation runs over a static KV cache kept
        per batch size and length bucket, and every decode step after the first of a batch size is replayed from a
        CUDA graph (``DecodeGraphs``); the tokens are those of the eager run. Beam search, assisted generation and a
        cache passed in by the caller run eagerly (a caller's ``StaticCache`` is still replayed over). On a CPU the
        same static cache and fixed-size metadata run eagerly."""
        self._check_wrapped("generate")
        batch = _batch_size(input_ids, generate_kwargs.get("inputs_embeds"))
        positions = _positions(input_ids, generate_kwargs)
        copies = max(generate_kwargs.get("num_return_sequences") or 1, generate_kwargs.get("num_beams") or 1)
        shapes = [(batch * copies, positions), (batch * copies, 1)]
        with self._rows(adapter_names, adapter_scales, batch, shapes):
            kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs)
            if self.cuda_graphs if cuda_graphs is None else cuda_graphs:
                return self.graphs.generate(**kwargs)
            return self.model.generate(**kwargs)

    def static_cache(self, max_cache_len: int):
        """A transformers ``StaticCache`` for the wrapped model, ``max_cache_len`` positions per row, for a serving
        loop that calls the model step by step (see ``__call__``)."""
        self._check_wrapped("static_cache")
        return self.graphs.static_cache(max_cache_len)

    def compile(self, *module_names: str, **compile_kwargs) -> None:
        """``torch.compile`` the wrapped model in place (``nn.Module.compile``), or only the submodules named (e.g.
        its decoder layers, ``"model.layers.0"``), with ``compile_kwargs``; every call then prepares the fixed-size
        metadata its compiled layers read, so that they trace without graph breaks (``fullgraph=True`` works) and
        a batch of another adapter mix but the same sizes reuses the compiled code."""
        self._check_wrapped("compile")
        modules = [self.model.get_submodule(name) for name in module_names] or [self.model]
        for module in modules:
            module.compile(**compile_kwargs)
        self._compiled = True

    def unwrap(self) -> nn.Module:
        """Put the model's original layers back and return it. The wrapper is unusable afterwards: its calls,
        ``generate``, ``load_adapter``, ``static_cache`` and ``compile`` raise ``RuntimeError``. Unwrapping again
        returns the same model and changes nothing (it may have been wrapped anew meanwhile)."""
        if self._unwrapped:
            return self.model
        for name, module in list(self.model.named_modules()):
            if isinstance(module, MultiLoraLinear) and module.pool is self.pool.layers.get(name):
                set_submodule(self.model, name, module.unwrap())
            elif isinstance(module, (MultiLoraExperts, MultiLoraParameter)) and name in self._parameter_layers:
                set_submodule(self.model, name, module.unwrap())
        self._forward_hook.remove()
        self.graphs.clear()
        self._unwrapped = True
        return self.model

    def __repr__(self) -> str:
        return f"MultiLoraModel({type(self.model).__name__}, {self.pool!r})"

    # ------------------------------------------------------------------------------------------------ internals

    def _check_wrapped(self, what: str) -> None:
        if self._unwrapped:
            raise RuntimeError(
                f"MultiLoraModel: the model was unwrapped; {what} would compute the base model only. Wrap the model "
                "in a new MultiLoraModel to serve adapters again"
            )

    def _record_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook of the wrapped model: the ``[B, L]`` of the forward that the running call makes, which its
        layer inputs are checked against (``_Rows._check_layout``). Compiled forwards skip it: a compiled graph
        cannot read the context variable, and their metadata is prepared for the call's own shapes."""
        if torch.compiler.is_compiling():
            return
        rows = _ROWS.get()
        if rows is None or rows.model is not self:
            return
        ids = kwargs.get("input_ids")
        if ids is None and args:
            ids = args[0]
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        is_tokens = isinstance(ids, torch.Tensor) and ids.dim() >= 2
        rows.forward_shape = (ids.shape[0], ids.shape[1]) if is_tokens else None

    def _base_weight(self, module: str, which: str) -> torch.Tensor | None:
        """The base model's ``weight`` / ``bias`` of the adapted layer ``module`` (validation compares copies with it)."""
        return getattr(self.model.get_submodule(module), which, None)

    def _selected(self, config: LoraConfig) -> list[str]:
        """The pool layers PEFT would adapt in the model for ``config``: the modules (its ``MultiLoraLinear`` layers
        count as the linear layers they wrap) and the parameters (``<module>.<parameter>``) it targets."""
        config = moe_config(self.model, config)
        params = adapted_parameters(self.model, config)
        return [*adapted_modules(self.model, config), *(f"{m}.{p}" for m, ps in params.items() for p in ps)]

    def _aliases(self, selected) -> dict[str, str]:
        """The saved key prefix of each parameter layer among ``selected``: PEFT's nesting of the parameters an adapter
        targets in one module (``fastlora.io.peft_keys``)."""
        aliases = {}
        for name, params in self._parameter_layers.items():
            chosen = [p for p in params if f"{name}.{p}" in selected]
            aliases.update({key: f"{name}.{p}" for p, key in peft_keys(name, chosen).items()})
        return aliases

    def _alias_prefixes(self) -> set[str]:
        return {name + ".base_layer" * i for name, params in self._parameter_layers.items() for i in range(len(params))}

    def _rows(self, adapter_names, adapter_scales, batch: int, shapes: list[tuple[int, int]]):
        names = _row_names(adapter_names, batch)
        scales = _row_scales(adapter_scales, batch)
        return _RowsContext(self, names, scales, shapes if self._compiled else [])

    def _prepare_decode(self, rows: int, device: torch.device) -> Hashable | None:
        """``DecodeGraphs``' hook before a decode step: the running call's rows into fixed-size buffers."""
        current = _ROWS.get()
        if current is None or current.model is not self:
            return None
        return current.use_static(rows, device)

    def _static_batch(self, rows: int, max_rank: int, scaled: bool, device: torch.device) -> StaticBatch:
        """The persistent fixed-size metadata buffers of a decode step of ``rows`` rows (what its graph reads)."""
        key = (rows, max_rank, scaled, device)
        buffers = self._static.get(key)
        if buffers is None:
            buffers = StaticBatch(rows, self.pool.max_adapters, max_rank, device, token_scales=scaled)
            self._static[key] = buffers
        return buffers


class _RowsContext:
    """Acquire the rows' adapters, make them this context's rows; undo both on exit, also after an error."""

    def __init__(self, model: MultiLoraModel, names: list[str | None], scales: tuple[float, ...] | None, shapes):
        self.model, self.names, self.scales, self.shapes = model, names, scales, shapes

    def __enter__(self) -> _Rows:
        if _ROWS.get() is not None:
            raise RuntimeError("MultiLoraModel: a call is already running in this thread (calls do not nest)")
        # An exception (KeyboardInterrupt included) between the grant and the ``try`` drops the lease with this frame,
        # and a lease collected while held unpins itself (``AdapterLease``).
        lease = self.model.pool.acquire(self.names, timeout=self.model.acquire_timeout)
        try:
            rows = _Rows(self.model, lease, self.scales)
            rows.prebuild(self.shapes)
            rows_token = _ROWS.set(rows)
            try:
                meta_token = set_batch_meta(rows)
            except BaseException:
                _ROWS.reset(rows_token)
                raise
        except BaseException:
            lease.release()
            raise
        self.rows, self.tokens = rows, (rows_token, meta_token)
        return rows

    def __exit__(self, *exc) -> None:
        rows_token, meta_token = self.tokens
        try:
            reset_batch_meta(meta_token)
            _ROWS.reset(rows_token)
        finally:
            self.rows.lease.release()


def _positions(input_ids: torch.Tensor | None, kwargs: dict) -> int:
    ids = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
    return ids.shape[1] if ids is not None and ids.dim() >= 2 else 1


def _batch_size(input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> int:
    ids = input_ids if input_ids is not None else inputs_embeds
    if ids is None or ids.dim() < 2:
        raise ValueError("MultiLoraModel: pass input_ids [B, L] (or inputs_embeds [B, L, H])")
    return ids.shape[0]


def _row_names(adapter_names, batch: int) -> list[str | None]:
    if adapter_names is None:
        return [None] * batch
    if isinstance(adapter_names, str):
        adapter_names = [adapter_names] * batch
    if not isinstance(adapter_names, (list, tuple)):
        raise TypeError(
            "MultiLoraModel: adapter_names must be a list or tuple with one entry per row (or one str for every row), "
            f"got {type(adapter_names).__name__}: rows need an order"
        )
    names = list(adapter_names)
    if len(names) != batch:
        raise ValueError(f"MultiLoraModel: adapter_names has {len(names)} entries for a batch of {batch} rows")
    for name in names:
        if name is not None and not isinstance(name, str):
            raise TypeError(f"MultiLoraModel: adapter_names entries must be str or None, got {name!r}")
    return [None if name == BASE else name for name in names]


def _row_scales(adapter_scales, batch: int) -> tuple[float, ...] | None:
    if adapter_scales is None:
        return None
    if not isinstance(adapter_scales, (list, tuple)):
        raise TypeError(
            "MultiLoraModel: adapter_scales must be a list or tuple with one entry per row, got "
            f"{type(adapter_scales).__name__}"
        )
    for scale in adapter_scales:
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)):
            raise TypeError(f"MultiLoraModel: adapter_scales entries must be numbers or None, got {scale!r}")
    scales = [1.0 if s is None else float(s) for s in adapter_scales]
    if len(scales) != batch:
        raise ValueError(f"MultiLoraModel: adapter_scales has {len(scales)} entries for a batch of {batch} rows")
    if not all(map(_finite, scales)):
        raise ValueError(f"MultiLoraModel: adapter_scales must be finite, got {scales}")
    return None if all(s == 1.0 for s in scales) else tuple(scales)


def _parameter_layer_shapes(
    modules: dict[str, nn.Module], parameters: dict[str, list[str]], shapes: dict[str, tuple[int, ...]]
) -> dict[str, list[str]]:
    """Add the pool shapes of the targeted parameters to ``shapes`` (``<module>.<parameter>``: ``(in, out, experts)``
    for a fused-experts projection, ``(in, out)`` for a router's weight); returns ``parameters`` checked: what
    ``MultiLoraExperts`` / ``MultiLoraParameter`` serve, and nothing else."""
    for name, params in parameters.items():
        module = modules[name]
        dims = {p: getattr(module, p).dim() for p in params}
        if is_fused_experts(module) and all(d == 3 for d in dims.values()):
            for p in params:
                E, k, n = expert_layout(module, p)
                shapes[f"{name}.{p}"] = (k, n, E)
        elif len(params) == 1 and dims[params[0]] == 2:
            out_features, in_features = getattr(module, params[0]).shape
            shapes[f"{name}.{params[0]}"] = (in_features, out_features)
        else:
            raise NotImplementedError(
                f"MultiLoraModel: target_parameters selects {params} of {name!r} ({type(module).__name__}); served are "
                "the 3-D projections of transformers' fused experts and one 2-D parameter per module (a router's weight)"
            )
    return parameters


def _finite(value: float) -> bool:
    return value == value and abs(value) != float("inf")


def _unrouted(model: nn.Module, targets: list[str], all_linear: bool) -> list[str]:
    """``targets`` without the layers inside routed experts (module docstring): refused when named, skipped with a
    warning under ``"all-linear"``."""
    routed = [name for name in targets if _in_routed_experts(model, name)]
    if not routed:
        return targets
    if not all_linear:
        raise NotImplementedError(
            f"MultiLoraModel: target module {routed[0]!r} sits inside routed experts (a module list named "
            f"{EXPERTS!r}; {len(routed)} such targets): each expert sees only the tokens routed to it, not the batch's "
            "rows in order, so their adapters cannot be served per row; leave the experts out of target_modules"
        )
    kept = [name for name in targets if name not in set(routed)]
    if not kept:
        raise ValueError("MultiLoraModel: every linear layer of the model sits inside routed experts; nothing to serve")
    warnings.warn(
        f"MultiLoraModel: target_modules='all-linear' leaves out {len(routed)} layers inside routed experts (such as "
        f"{routed[0]!r}): their tokens are routed, not the batch's rows in order; adapters that target them are refused",
        UserWarning,
        stacklevel=3,
    )
    return kept


def _in_routed_experts(model: nn.Module, name: str) -> bool:
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == EXPERTS and isinstance(
            model.get_submodule(".".join(parts[: i + 1])), (nn.ModuleList, nn.ModuleDict)
        ):
            return True
    return False
