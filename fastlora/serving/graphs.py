"""``DecodeGraphs``: a transformers causal LM's decode step captured in CUDA graphs and replayed.

A decode step of a served model is a few hundred small kernels; launched one by one from Python it takes longer on
the host than on the GPU. ``DecodeGraphs`` captures the step once per batch size (and per anything else that shapes
its launches) and replays it: one launch per step, no Python on the critical path.

What can be replayed: a forward of one new position per row (``input_ids [B, 1]``) over a transformers
``StaticCache`` whose layers are all plain ``StaticLayer`` (fixed key/value buffers and a device-side length, so a
replayed step reads and writes the same memory as the captured one and finds its position on the device). Every
tensor argument of the step (ids, the attention mask, positions) is copied into the captured graph's own input buffer
before the replay; every other argument is part of the graph's key, as are the cache's buffers (their addresses) and
whatever the ``prepare`` hook returns (``MultiLoraModel`` passes one that writes the batch's adapter metadata into
fixed-size device buffers, ``fastlora.ops.StaticBatch``, and returns their sizes). Anything else runs eagerly: the
prefill, steps over a dynamic cache, beam search (it reorders the cache into new tensors), sliding-window layers (they
keep their length on the host), and any step whose capture failed (it is not tried again; a warning says why).

``generate`` runs ``model.generate`` over a static cache that ``DecodeGraphs`` keeps per batch size and length bucket
(``cache_len_multiple``) and resets between calls, so that the graphs captured in one call are replayed in the next.
The first decode step of a new key runs eagerly (warming up the autotuners), then is captured; replays start at the
next step. Captured graphs share one memory pool. ``max_graphs`` bounds how many are kept (least recently used go).

On a CPU nothing is captured: the same steps run eagerly over the same static cache and metadata, which is how the
fixed-size path is tested without a GPU. Decode steps through one ``DecodeGraphs`` run one at a time (a lock): a graph's
input buffers and the metadata buffers are shared by every call that replays it; so do whole ``generate`` calls (they
route the model's forward through it for their duration). Other calls run concurrently.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

# The generate options under which a decode step is not a plain forward of one position per row over one cache.
_EAGER_GENERATE_OPTIONS = ("assistant_model", "prompt_lookup_num_tokens", "custom_generate")


class _Graph:
    """One captured step: its graph, the input buffers its kernels read, the output they write."""

    __slots__ = ("graph", "inputs", "output")

    def __init__(self, graph: torch.cuda.CUDAGraph, inputs: dict[str, torch.Tensor], output: Any):
        self.graph, self.inputs, self.output = graph, inputs, output


class DecodeGraphs:
    """CUDA graphs of ``model``'s decode step (a transformers causal LM), one per batch size and key.

    ``prepare(rows, device)``, when given, runs before every decode step, eager, captured or replayed, and returns a
    hashable that joins the graph's key (None: no part). ``enabled=False`` runs every step eagerly (``generate`` then
    is plain ``model.generate``). ``cache_len_multiple`` rounds the length of the static caches ``generate`` keeps.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        prepare: Callable[[int, torch.device], Hashable | None] | None = None,
        enabled: bool = True,
        max_graphs: int = 32,
        cache_len_multiple: int = 256,
    ):
        self.model = model
        self.prepare = prepare
        self.enabled = enabled
        self.max_graphs = max_graphs
        self.cache_len_multiple = cache_len_multiple
        self.captures = 0  # graphs captured so far
        self.replays = 0  # steps replayed so far
        self._graphs: OrderedDict[Hashable, _Graph | None] = OrderedDict()  # None: the key cannot be captured
        self._caches: OrderedDict[tuple[int, int], Any] = OrderedDict()
        self._pool = None
        self._lock = threading.RLock()
        params = inspect.signature(model.forward).parameters
        # Newer transformers versions name the forward's cache argument ``cache``, older ones ``past_key_values``.
        self.cache_arg = "cache" if "cache" in params else "past_key_values"

    def __repr__(self) -> str:
        return (
            f"DecodeGraphs(enabled={self.enabled}, graphs={sum(g is not None for g in self._graphs.values())}, "
            f"captures={self.captures}, replays={self.replays})"
        )

    def clear(self) -> None:
        """Drop every captured graph and kept cache (their memory goes back to PyTorch's allocator)."""
        with self._lock:
            self._graphs.clear()
            self._caches.clear()
            self._pool = None

    # ------------------------------------------------------------------------------------------- entry points

    def __call__(self, **kwargs) -> Any:
        """``model(**kwargs)``, replayed from a graph when it is a decode step over a static cache (see the module).
        The tensors of a replayed step's output are copies: the next replay does not change them."""
        return self._step(self.model, kwargs, copy=True)

    def generate(self, input_ids: torch.Tensor | None = None, **kwargs) -> Any:
        """``model.generate(input_ids, **kwargs)`` with its decode steps replayed. Unless ``kwargs`` bring their own
        cache (or ``cache_implementation``), it runs over a static cache kept for this batch size and length bucket;
        transformers' own compilation of the decode step is turned off (``disable_compile=True``)."""
        with self._lock:
            if not self.enabled or any(kwargs.get(k) is not None for k in _EAGER_GENERATE_OPTIONS):
                return self.model.generate(input_ids=input_ids, **kwargs)
            config = self.model.generation_config
            beams = kwargs.get("num_beams") or config.num_beams or 1
            if beams > 1:  # beam search reorders the cache into new tensors each step
                return self.model.generate(input_ids=input_ids, **kwargs)
            if kwargs.get(self.cache_arg) is None and kwargs.get("cache_implementation") is None:
                cache = self._cache_for(input_ids, kwargs)
                if cache is not None:
                    kwargs[self.cache_arg] = cache
            kwargs.setdefault("disable_compile", True)
            with self._installed():
                return self.model.generate(input_ids=input_ids, **kwargs)

    def static_cache(self, max_cache_len: int) -> Any:
        """A new transformers ``StaticCache`` for this model holding ``max_cache_len`` positions per row (its batch
        size is set by the first forward that fills it), for a serving loop that calls ``model`` step by step."""
        from transformers import StaticCache

        config = self.model.config.get_text_config(decoder=True)
        return StaticCache(config=config, max_cache_len=max_cache_len)

    # ---------------------------------------------------------------------------------------------- internals

    @contextlib.contextmanager
    def _installed(self) -> Iterator[None]:
        """Route ``model.forward`` through ``_step`` (an instance attribute shadowing the class's method)."""
        forward = self.model.forward
        self.model.forward = lambda *args, **kwargs: (
            self._step(forward, kwargs) if not args else forward(*args, **kwargs)
        )
        try:
            yield
        finally:
            del self.model.forward

    def _cache_for(self, input_ids: torch.Tensor | None, kwargs: dict) -> Any:
        """The kept static cache for this call's rows and length (reset), or None when the length is not known."""
        if input_ids is None or input_ids.dim() != 2:
            return None
        config = self.model.generation_config
        new = kwargs.get("max_new_tokens", config.max_new_tokens)
        length = input_ids.shape[1] + new if new is not None else kwargs.get("max_length", config.max_length)
        if not length:
            return None
        copies = kwargs.get("num_return_sequences") or config.num_return_sequences or 1
        rows = input_ids.shape[0] * copies
        size = -(-length // self.cache_len_multiple) * self.cache_len_multiple
        key = (rows, size)
        cache = self._caches.pop(key, None)
        if cache is None:
            cache = self.static_cache(size)
            while len(self._caches) >= 4:
                self._caches.popitem(last=False)
        else:
            cache.reset()
        self._caches[key] = cache
        return cache

    def _plan(self, kwargs: dict) -> tuple[int, torch.device, Hashable] | None:
        """``(rows, device, key)`` when this step can be replayed, else None."""
        if not self.enabled:
            return None
        ids = kwargs.get("input_ids")
        if (
            not isinstance(ids, torch.Tensor)
            or ids.dim() != 2
            or ids.shape[1] != 1
            or kwargs.get("inputs_embeds") is not None
        ):
            return None
        cache = kwargs.get(self.cache_arg)
        buffers = _static_buffers(cache)
        if buffers is None:
            return None
        tensors, others = [], []
        for name, value in sorted(kwargs.items()):
            if name == self.cache_arg:
                continue
            if isinstance(value, torch.Tensor):
                tensors.append((name, tuple(value.shape), value.dtype, value.device))
            elif value is None or isinstance(value, (bool, int, float, str)):
                others.append((name, value))
            else:
                return None  # an argument the key cannot describe
        return ids.shape[0], ids.device, (tuple(tensors), tuple(others), buffers)

    def _step(self, forward: Callable[..., Any], kwargs: dict, copy: bool = False) -> Any:
        plan = self._plan(kwargs)
        if plan is None:
            return forward(**kwargs)
        with self._lock:  # the step's metadata buffers and the graph's inputs and outputs are shared by every caller
            output = self._static_step(forward, kwargs, *plan)
            if copy and isinstance(output, Mapping):  # a ModelOutput: the same fields, tensors copied
                output = type(output)(**{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in output.items()})
            return output

    def _static_step(self, forward: Callable[..., Any], kwargs: dict, rows: int, device, key: Hashable) -> Any:
        extra = self.prepare(rows, device) if self.prepare is not None else None
        if device.type != "cuda":
            return forward(**kwargs)
        key = (key, extra)
        if key in self._graphs:
            graph = self._graphs[key]
            if graph is None:
                return forward(**kwargs)
            self._graphs.move_to_end(key)
            for name, buffer in graph.inputs.items():
                buffer.copy_(kwargs[name], non_blocking=True)
            graph.graph.replay()
            self.replays += 1
            return graph.output
        output = self._warm_up(forward, kwargs)
        self._graphs[key] = self._capture(forward, kwargs)
        while len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)
        return output

    def _warm_up(self, forward: Callable[..., Any], kwargs: dict) -> Any:
        """The step, eagerly on a side stream (as PyTorch advises before a capture): it tunes every kernel the capture
        will launch and is this step's result."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            output = forward(**kwargs)
        torch.cuda.current_stream().wait_stream(stream)
        return output

    def _capture(self, forward: Callable[..., Any], kwargs: dict) -> _Graph | None:
        inputs = {name: value.clone() for name, value in kwargs.items() if isinstance(value, torch.Tensor)}
        static = {**kwargs, **inputs}
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        try:
            with torch.cuda.graph(graph, pool=self._pool):
                output = forward(**static)
        except Exception as error:  # noqa: BLE001 - any failure leaves the step eager, with the reason
            warnings.warn(
                f"DecodeGraphs: the decode step of {inputs['input_ids'].shape[0]} rows could not be captured in a "
                f"CUDA graph and runs eagerly: {type(error).__name__}: {error}",
                RuntimeWarning,
                stacklevel=4,
            )
            return None
        self.captures += 1
        return _Graph(graph, inputs, output)


def _static_buffers(cache: Any) -> tuple | None:
    """The addresses of a filled ``StaticCache``'s buffers (what a graph captured over it reads and writes), or None
    when ``cache`` is not one whose every layer keeps its state in fixed device buffers."""
    layers = getattr(cache, "layers", None)
    if not layers or not getattr(cache, "is_compileable", False):
        return None
    try:
        from transformers.cache_utils import StaticLayer
    except ImportError:
        return None
    out = []
    for layer in layers:
        if type(layer) is not StaticLayer or not layer.is_initialized:
            return None
        length = layer.cumulative_length
        if not isinstance(length, torch.Tensor):
            return None
        out.append((layer.keys.data_ptr(), layer.values.data_ptr(), length.data_ptr(), tuple(layer.keys.shape)))
    return tuple(out)
