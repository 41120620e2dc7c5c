"""``AdapterPool``: the LoRA weights of many adapters, in a fixed number of device slots over a CPU tier.

One pool serves one model. For every adapted layer (``in_features = K``, ``out_features = N``) it owns

- ``a_pool [max_adapters, max_rank, K]`` and ``b_pool [max_adapters, N, max_rank]`` on the model's device: slot
  ``s`` holds an adapter's ``lora_A`` in ``a_pool[s, :r]`` and its ``lora_B`` in ``b_pool[s, :, :r]``; the padding
  beyond ``r`` is zero;
- ``slot_ranks [max_adapters]`` (int32) and ``slot_scalings [max_adapters]`` (float32) on the device: that layer's
  own rank and ``lora_alpha / r`` (or ``/ sqrt(r)``) per slot, from the adapter's ``rank_pattern`` /
  ``alpha_pattern``; a layer the adapter does not target has rank 0 in its slot, so the kernels skip it.

Model-wide, each slot has a rank (the adapter's largest over its layers) and a default scaling for ``BatchMeta``.

**Tiers.** ``register`` validates an adapter and keeps it in host memory (the CPU tier; pinned when the pool is on a
CUDA device, so uploads are asynchronous copies), already cast to the pool's dtype. ``acquire(names)`` makes a
batch's adapters resident: each one not in a slot is uploaded into a free slot or, when none is free, into the least
recently used slot that no running batch pins. The batch's slots stay pinned (reference counted) until its lease is
released; a batch asking for more distinct adapters than ``max_adapters`` is an error, and a batch that fits but finds
too many slots pinned by other batches waits for them (``timeout`` to bound the wait).

**Fairness.** Waiting batches are served in arrival order: a batch that has to wait takes a place in a queue, and a
later batch waits behind it even if it could be served now (otherwise a batch needing many slots could wait forever
while small batches keep taking them). A batch that can be served when nobody waits goes at once; a batch of base
rows only pins nothing and never waits.

**Leases.** A lease unpins its slots when released, and also when it is garbage collected while still held: an
exception (``KeyboardInterrupt`` included) that lands between a grant and the caller's ``try`` cannot leak a pin once
the lease is dropped. Each slot keeps the set of leases pinning it, so releasing is idempotent step by step: an
interrupted ``release`` leaves the lease held and releasable, never marked released while still pinning a slot.

**Validation.** ``register`` checks the adapter completely before the pool changes (``fastlora.serving.validation``):
a bad adapter raises and leaves the pool, its slots and every registered adapter exactly as they were. The pool
copies what it keeps, so the caller's tensors can change afterwards without reaching the served adapter.

**Threads.** One lock guards the pool's state. Weights are written into a slot only while no batch pins it: a running
forward never sees its adapters change. ``unregister`` (and ``register(..., replace=True)``) of an adapter that a
running batch pins takes effect at once for new batches, while the running ones keep the old weights until they
release; its slot is freed then. On CUDA, every release records an event on the releasing thread's current stream
and an upload into that slot first waits for those events (the latest on each stream, which completes after the
earlier ones), and a batch that uses an adapter uploaded by another thread waits for the upload's event: batches on
different streams never race with uploads.

Limits: inference only (the pool tensors hold no gradients); one dtype for all adapters of a pool; an upload runs
under the pool's lock, so another thread's ``acquire`` waits for it (an asynchronous copy on CUDA, short).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import numbers
import threading
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from ..config import LoraConfig
from ..peft_format import listing
from .validation import AdapterSource, Aliases, BaseWeight, LayerWeights, read_adapter_source, validate_adapter

# The name of "no adapter" in a mixed batch (PEFT's ``adapter_names=[..., "__base__", ...]``): never an adapter's name.
BASE = "__base__"


def timeout_seconds(timeout: Any, where: str) -> float | None:
    """``timeout`` checked as a wait bound: None (no bound) or a real number of seconds ``>= 0`` (``inf``: no bound)."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
        raise TypeError(f"{where}: timeout must be None or a number of seconds, got {timeout!r}")
    value = float(timeout)
    if math.isnan(value) or value < 0:
        raise ValueError(f"{where}: timeout must be None or a number of seconds >= 0, got {timeout!r}")
    return None if math.isinf(value) else value


class UnknownAdapterError(KeyError):
    """A batch or an unload names an adapter that is not registered."""

    def __str__(self) -> str:  # KeyError's own __str__ would print the message as a quoted repr
        return str(self.args[0]) if self.args else ""


@dataclasses.dataclass(frozen=True)
class PoolLayer:
    """The pool tensors of one adapted layer (shared with its ``MultiLoraLinear``; written only by the pool)."""

    name: str
    in_features: int  # K
    out_features: int  # N
    a_pool: torch.Tensor  # [max_adapters, max_rank, K]; [max_adapters, E, max_rank, K] for experts
    b_pool: torch.Tensor  # [max_adapters, N, max_rank]; [max_adapters, E, N, max_rank] for experts
    slot_ranks: torch.Tensor  # [max_adapters] int32, 0 = this layer has no adapter in the slot
    slot_scalings: torch.Tensor  # [max_adapters] float32
    num_experts: int = 0  # E of a fused-experts parameter (its adapter is one A_e / B_e pair per expert); 0: a layer


@dataclasses.dataclass(eq=False)
class _Entry:
    """A registered adapter. ``slot`` is where it is resident (None: CPU tier only)."""

    name: str
    config: LoraConfig
    layers: dict[str, LayerWeights]
    rank: int  # the largest rank over its layers: the slot's model-wide rank
    scaling: float  # config.scaling: the slot's default scaling
    version: int  # increases with every registration, so a replaced adapter is told apart from its successor
    slot: int | None = None
    removed: bool = False  # unregistered (or replaced) while pinned: its slot is freed at the last release
    ready: Any = None  # CUDA event recorded after its upload

    @property
    def nbytes(self) -> int:
        return sum(w.lora_A.nbytes + w.lora_B.nbytes for w in self.layers.values())


@dataclasses.dataclass(frozen=True)
class AdapterInfo:
    """What ``AdapterPool.info`` reports about a registered adapter."""

    name: str
    rank: int
    layer_ranks: dict[str, int]
    layer_scalings: dict[str, float]
    slot: int | None
    nbytes: int
    version: int


class AdapterLease:
    """The slots of one batch's adapters, pinned from ``AdapterPool.acquire`` until ``release`` (or the end of a
    ``with`` block). ``row_slots[i]`` is the slot of the ``i``-th requested name (``-1`` for None);
    ``slot_ranks`` / ``slot_scalings`` are the model-wide per-slot values to build ``BatchMeta`` with, as they were
    when the lease was taken (the pinned slots cannot change while it is held)."""

    def __init__(self, pool: AdapterPool, row_slots, slots, slot_ranks, slot_scalings, versions):
        self.pool = pool
        self.row_slots: tuple[int, ...] = row_slots
        self.slots: dict[str, int] = slots
        self.slot_ranks: tuple[int, ...] = slot_ranks
        self.slot_scalings: tuple[float, ...] = slot_scalings
        self.versions: dict[str, int] = versions  # which registration of each name the batch runs
        self._released = False
        # What the pool's slots hold for this lease: a plain object, so that the safety net below does not keep the
        # lease alive. It is set up before the pool pins anything, so a pin can never outlive a dropped lease.
        self._token = object()
        self._pinned = tuple(sorted(set(slots.values())))
        self._finalizer = weakref.finalize(self, pool._orphaned, self._token, self._pinned)
        self._finalizer.atexit = False

    @property
    def released(self) -> bool:
        return self._released

    def release(self) -> None:
        """Unpin the batch's slots (idempotent, also when threads release the same lease at once, and after a
        release interrupted part way: the lease is marked released only once every slot is unpinned)."""
        with self.pool._cond:
            if self._released:
                return
            self.pool._unpin(self._token, self._pinned)
            self._released = True
            self._finalizer.detach()

    def __enter__(self) -> AdapterLease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "released" if self._released else "held"
        return f"AdapterLease({self.slots}, {state})"


class AdapterPool:
    """Device slots for up to ``max_adapters`` LoRA adapters of rank ``<= max_rank`` over the layers ``layers``
    (``{module name: (in_features, out_features)}``; ``(in_features, out_features, experts)`` for a fused-experts
    parameter of a mixture-of-experts model, named ``<module>.<parameter>``, whose slots hold one ``A_e`` / ``B_e`` pair
    per expert), plus a CPU tier of registered adapters (module docstring).

    ``dtype`` is the dtype of the pool tensors (the LoRA dtype the kernels see): ``MultiLoraModel`` passes the model's
    dtype, so a bf16 model's adapters are rounded to bf16 once, at registration (PEFT keeps them in fp32 and computes
    the LoRA branch in fp32; pass ``dtype=torch.float32`` to do the same at twice the pool memory). ``select`` maps a
    config to the module names it adapts in the model (PEFT's matching over the model's linear layers); modules it
    selects outside ``layers`` make an adapter invalid. By default only ``layers`` are considered.

    ``base_weight(module, "weight" | "bias")`` gives the base model's tensor of an adapted layer (None: it has none):
    with it, an adapter may carry copies of its layers' base weights (PEFT saves ``lm_head.base_layer.weight`` with an
    adapter of the output head) as long as they equal the model's. Without it such keys are refused.

    ``aliases`` (with ``alias_prefixes``, every prefix it may give) maps the layers an adapter selects to the key
    prefixes PEFT saves their weights under when they are not the layer's name (``target_parameters`` layers: see
    ``fastlora.serving.validation.Aliases``).
    """

    def __init__(
        self,
        layers: Mapping[str, tuple[int, int] | tuple[int, int, int]],
        *,
        max_adapters: int,
        max_rank: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        select: Callable[[LoraConfig], Iterable[str]] | None = None,
        base_weight: BaseWeight | None = None,
        aliases: Aliases | None = None,
        alias_prefixes: Iterable[str] = (),
    ):
        for arg, value in (("max_adapters", max_adapters), ("max_rank", max_rank)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"AdapterPool: {arg} must be an integer >= 1, got {value!r}")
        if not layers:
            raise ValueError("AdapterPool: no layers to adapt")
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"AdapterPool: dtype must be a torch.dtype (such as torch.float16), got {dtype!r}")
        if not dtype.is_floating_point:
            raise ValueError(f"AdapterPool: dtype must be floating point, got {dtype}")
        self.max_adapters = max_adapters
        self.max_rank = max_rank
        self.device = torch.device(device)
        self.dtype = dtype
        self._select = select or (lambda config: [name for name in layers if config.matches(name)])
        self._base_weight = base_weight
        self._shapes = {name: tuple(shape) for name, shape in layers.items()}
        self._aliases = aliases
        self._key_prefixes = {*self._shapes, *alias_prefixes}
        # Every layer's per-slot ranks and scalings are rows of one [layers, slots] tensor, so an upload sets a slot's
        # column for all layers with one copy instead of two small writes per layer.
        self._layer_ranks = torch.zeros(len(layers), max_adapters, device=self.device, dtype=torch.int32)
        self._layer_scalings = torch.zeros(len(layers), max_adapters, device=self.device, dtype=torch.float32)
        self.layers: dict[str, PoolLayer] = {}
        for i, (name, shape) in enumerate(layers.items()):
            in_features, out_features, *experts = shape
            lead = (max_adapters, *experts)
            self.layers[name] = PoolLayer(
                name, in_features, out_features,
                a_pool=torch.zeros(*lead, max_rank, in_features, device=self.device, dtype=dtype),
                b_pool=torch.zeros(*lead, out_features, max_rank, device=self.device, dtype=dtype),
                slot_ranks=self._layer_ranks[i],
                slot_scalings=self._layer_scalings[i],
                num_experts=experts[0] if experts else 0,
            )  # fmt: skip
        self._cond = threading.Condition(threading.RLock())
        self._entries: dict[str, _Entry] = {}
        self._slot_entry: list[_Entry | None] = [None] * max_adapters
        # Per slot, the tokens of the leases pinning it: a set, so that unpinning a lease twice (a release interrupted
        # and retried, or the safety net after it) removes it once.
        self._holders: list[set[object]] = [set() for _ in range(max_adapters)]
        self._waiting: deque[object] = deque()  # tickets of the acquires that wait, first come first served
        self._orphans: deque[tuple[object, tuple[int, ...]]] = deque()  # leases collected while held
        self._lru: OrderedDict[int, None] = OrderedDict()  # occupied slots, least recently used first
        self._slot_ranks = [0] * max_adapters
        self._slot_scalings = [0.0] * max_adapters
        # Per slot, the CUDA event of the latest release on each stream since its upload: events on one stream
        # complete in order, so the latest stands for all earlier ones and a resident slot keeps one per stream (streams
        # compare equal by their handle).
        self._slot_events: list[dict[torch.cuda.Stream, torch.cuda.Event]] = [{} for _ in range(max_adapters)]
        self._versions = itertools.count(1)
        self._pin_host = self.device.type == "cuda"

    # ---------------------------------------------------------------------------------------------- inspection

    @property
    def adapters(self) -> list[str]:
        """Registered adapter names, in registration order."""
        with self._cond:
            return list(self._entries)

    @property
    def resident(self) -> dict[str, int]:
        """``{name: slot}`` of the registered adapters that are in a device slot."""
        with self._cond:
            return {name: e.slot for name, e in self._entries.items() if e.slot is not None}

    @property
    def pinned(self) -> dict[int, int]:
        """``{slot: number of running batches pinning it}`` for the pinned slots."""
        with self._cond:
            self._drain_orphans()
            return {s: len(h) for s, h in enumerate(self._holders) if h}

    @property
    def waiting(self) -> int:
        """How many ``acquire`` calls wait for their turn or for slots."""
        with self._cond:
            return len(self._waiting)

    def info(self, name: str) -> AdapterInfo:
        with self._cond:
            return self._info(self._entry(name))

    def _info(self, entry: _Entry) -> AdapterInfo:
        return AdapterInfo(
            entry.name, entry.rank, {n: w.rank for n, w in entry.layers.items()},
            {n: w.scaling for n, w in entry.layers.items()}, entry.slot, entry.nbytes, entry.version,
        )  # fmt: skip

    def __contains__(self, name: object) -> bool:
        with self._cond:
            return name in self._entries

    def __len__(self) -> int:
        with self._cond:
            return len(self._entries)

    def __repr__(self) -> str:
        with self._cond:
            return (
                f"AdapterPool(layers={len(self.layers)}, max_adapters={self.max_adapters}, max_rank={self.max_rank}, "
                f"dtype={self.dtype}, device={self.device}, registered={len(self._entries)}, "
                f"resident={sum(e is not None for e in self._slot_entry)}, pinned={sum(map(bool, self._holders))})"
            )

    # -------------------------------------------------------------------------------------------- registration

    def register(
        self,
        name: str,
        adapter: AdapterSource,
        *,
        config: LoraConfig | Mapping[str, Any] | None = None,
        replace: bool = False,
        allow_pickle: bool = False,
    ) -> AdapterInfo:
        """Validate an adapter and add it to the CPU tier under ``name``; it is uploaded on first use.

        ``adapter``: a PEFT-format directory (``adapter_config.json`` + ``adapter_model.safetensors``) or weights
        file, read with ``fastlora.peft_format.read_adapter`` (``config`` then overrides the file's config); or a state dict
        with PEFT's keys (``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight``; module-relative keys and
        the adapter-name infix ``lora_A.<name>.weight`` are accepted too) together with ``config``: a
        ``LoraConfig``, or a dict of PEFT config fields (``{"r": 8, "lora_alpha": 16}``; ``target_modules`` defaults
        to the modules of the keys). A name already registered is an error unless ``replace=True``. Raises
        (``ValueError``, ``FileNotFoundError``, ``NotImplementedError``) before anything changes.
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"AdapterPool.register: the adapter name must be a non-empty str, got {name!r}")
        if name == BASE:
            raise ValueError(f"AdapterPool.register: {BASE!r} is reserved: it means 'no adapter' in a batch's names")
        self._check_new_name(name, replace)
        config, tensors, origin = read_adapter_source(adapter, config, allow_pickle, self._key_prefixes)
        config = copy.deepcopy(config)  # the caller's config may change later; the served scalings must not
        layers = validate_adapter(
            name, config, tensors, origin, shapes=self._shapes, select=self._select, max_rank=self.max_rank,
            dtype=self.dtype, pin=self._pin_host, base_weight=self._base_weight, aliases=self._aliases,
        )  # fmt: skip
        entry = _Entry(
            name, config, layers, rank=max(w.rank for w in layers.values()), scaling=config.scaling, version=0
        )
        with self._cond:
            self._check_new_name(name, replace)
            entry.version = next(self._versions)
            old = self._entries.pop(name, None)
            if old is not None:
                self._retire(old)
            self._entries[name] = entry
            self._cond.notify_all()
            return self._info(entry)

    def unregister(self, name: str) -> None:
        """Remove ``name`` from the pool. New batches cannot use it from now on; batches already running with it
        keep its weights until they release, and its slot is freed then."""
        with self._cond:
            entry = self._entry(name)
            del self._entries[name]
            self._retire(entry)
            self._cond.notify_all()

    def _check_new_name(self, name: str, replace: bool) -> None:
        with self._cond:
            if name in self._entries and not replace:
                raise ValueError(
                    f"AdapterPool: an adapter named {name!r} is already registered (unload it first, or pass "
                    "replace=True)"
                )

    # ------------------------------------------------------------------------------------------------- batches

    def acquire(self, names: Sequence[str | None], *, timeout: float | None = None) -> AdapterLease:
        """Make the adapters of a batch resident and pin them; returns a lease whose ``row_slots`` gives each
        requested name's slot (``-1`` for None). Release it (or use it as a context manager) when the batch is done.

        ``names``: a list or tuple of adapter names (None: a base row). Raises ``UnknownAdapterError`` (a
        ``KeyError``) for an unknown name and ``ValueError`` when the batch needs more distinct adapters than
        ``max_adapters``. When it fits but other batches pin too many slots, or earlier batches wait, waits its turn
        (first come, first served) for at most ``timeout`` seconds (None or ``inf``: no bound), then
        ``TimeoutError``.
        """
        if isinstance(names, (str, bytes)) or not isinstance(names, Sequence):
            raise TypeError(
                "AdapterPool.acquire: names must be a list or tuple of adapter names (str) or None, one per row, got "
                f"{type(names).__name__} {names!r}"
            )
        names = list(names)
        for name in names:
            if name is not None and not isinstance(name, str):
                raise TypeError(f"AdapterPool.acquire: names must be str or None, got {name!r}")
        wait = timeout_seconds(timeout, "AdapterPool.acquire")
        wanted = list(dict.fromkeys(n for n in names if n is not None))
        if len(wanted) > self.max_adapters:
            raise ValueError(
                f"AdapterPool.acquire: the batch uses {len(wanted)} distinct adapters but the pool has "
                f"max_adapters={self.max_adapters} slots; split the batch or build the pool with more slots"
            )
        deadline = None if wait is None else time.monotonic() + wait
        ticket = None
        with self._cond:
            try:
                while True:
                    self._drain_orphans()
                    entries = [self._entry(n) for n in wanted]
                    missing = [e for e in entries if e.slot is None]
                    free = [s for s, e in enumerate(self._slot_entry) if e is None]
                    using = {e.slot for e in entries}
                    evictable = [s for s in self._lru if not self._holders[s] and s not in using]
                    # A batch of base rows pins nothing, so it cannot take a slot from a waiting batch.
                    turn = not entries or (self._waiting[0] is ticket if self._waiting else True)
                    if turn and len(missing) <= len(free) + len(evictable):
                        break
                    if ticket is None:
                        ticket = object()
                        self._waiting.append(ticket)
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise TimeoutError(
                            f"AdapterPool.acquire: waited {timeout} s for {len(missing)} free slots; running batches "
                            f"pin {sum(map(bool, self._holders))} of {self.max_adapters}, "
                            f"{len(self._waiting) - 1} earlier batches wait"
                        )
                    self._cond.wait(None if remaining is None else min(remaining, threading.TIMEOUT_MAX))
                for entry in missing:
                    slot = free.pop(0) if free else self._evict(evictable.pop(0))
                    self._upload(entry, slot)
                slots = {e.name: e.slot for e in entries}
                lease = AdapterLease(
                    self, tuple(-1 if n is None else slots[n] for n in names), slots, tuple(self._slot_ranks),
                    tuple(self._slot_scalings), {e.name: e.version for e in entries},
                )  # fmt: skip
                for entry in entries:
                    self._holders[entry.slot].add(lease._token)
                    self._lru.move_to_end(entry.slot)
                    if entry.ready is not None:
                        torch.cuda.current_stream(self.device).wait_event(entry.ready)
                return lease
            finally:
                if ticket is not None:
                    # Served, timed out or failed: the next batch in line may be served now.
                    self._waiting.remove(ticket)
                    self._cond.notify_all()

    def _unpin(self, token: object, slots: tuple[int, ...]) -> None:
        """Remove the lease ``token`` from ``slots``' holders. Every step can be repeated: a release interrupted part
        way and retried, or followed by the lease's safety net, unpins each slot once."""
        with self._cond:
            stream = event = None
            if self.device.type == "cuda" and any(token in self._holders[s] for s in slots):
                stream = torch.cuda.current_stream(self.device)
                event = torch.cuda.Event()
                event.record(stream)
            for slot in slots:
                holders = self._holders[slot]
                if token in holders:
                    if event is not None:
                        self._slot_events[slot][stream] = event
                    holders.discard(token)
                entry = self._slot_entry[slot]
                if not holders and entry is not None and entry.removed:
                    self._free(slot)
            self._cond.notify_all()

    def _orphaned(self, token: object, slots: tuple[int, ...]) -> None:
        """A lease was garbage collected while still held. The collector may run this in the middle of the pool's own
        locked code (in this thread): the lease is then queued and unpinned at the next safe point."""
        self._orphans.append((token, slots))
        # ``Condition._is_owned``: whether this thread holds the pool's lock (what ``Condition.wait`` checks too).
        if not self._cond._is_owned():
            with self._cond:
                self._drain_orphans()

    def _drain_orphans(self) -> None:
        while self._orphans:
            self._unpin(*self._orphans.popleft())

    # --------------------------------------------------------------------------------------- slots (locked)

    def _entry(self, name: str) -> _Entry:
        entry = self._entries.get(name)
        if entry is None:
            raise UnknownAdapterError(
                f"AdapterPool: no adapter named {name!r} is registered (registered: {listing(self._entries) or 'none'})"
            )
        return entry

    def _retire(self, entry: _Entry) -> None:
        """``entry`` leaves the registry: free its slot now, or at the last release of the batches pinning it."""
        entry.removed = True
        if entry.slot is not None and not self._holders[entry.slot]:
            self._free(entry.slot)

    def _free(self, slot: int) -> None:
        # Only the host-side rank is reset: no lease can hand out a rank-0 slot, and the device tensors of the slot
        # are rewritten in full at its next upload (writing them now could race with kernels still reading them).
        entry = self._slot_entry[slot]
        entry.slot = None
        self._slot_entry[slot] = None
        self._slot_ranks[slot] = 0
        self._slot_scalings[slot] = 0.0
        self._lru.pop(slot, None)

    def _evict(self, slot: int) -> int:
        self._free(slot)
        return slot

    @torch.no_grad()
    def _upload(self, entry: _Entry, slot: int) -> None:
        """Write ``entry`` into ``slot`` (unpinned and unoccupied), every layer, padding zeroed."""
        if self.device.type == "cuda":
            stream = torch.cuda.current_stream(self.device)
            for event in self._slot_events[slot].values():
                stream.wait_event(event)  # kernels of earlier batches may still read this slot
        self._slot_events[slot].clear()
        ranks, scalings = [], []
        for name, layer in self.layers.items():
            weights = entry.layers.get(name)
            if weights is None:
                layer.a_pool[slot].zero_()
                layer.b_pool[slot].zero_()
                ranks.append(0)
                scalings.append(0.0)
            else:
                rank = weights.rank
                # ``...``: the experts' dimension of a fused-experts parameter, when the layer has one.
                layer.a_pool[slot, ..., :rank, :].copy_(weights.lora_A, non_blocking=True)
                layer.a_pool[slot, ..., rank:, :].zero_()
                layer.b_pool[slot, ..., :rank].copy_(weights.lora_B, non_blocking=True)
                layer.b_pool[slot, ..., rank:].zero_()
                ranks.append(rank)
                scalings.append(weights.scaling)
        # Asynchronous: a copy from pageable memory is staged at once, without waiting for the device's queue (a
        # blocking copy would wait, under the lock, for every kernel queued on the stream).
        self._layer_ranks[:, slot].copy_(torch.tensor(ranks, dtype=torch.int32), non_blocking=True)
        self._layer_scalings[:, slot].copy_(torch.tensor(scalings, dtype=torch.float32), non_blocking=True)
        if self.device.type == "cuda":
            entry.ready = torch.cuda.Event()
            entry.ready.record(torch.cuda.current_stream(self.device))
        entry.slot = slot
        self._slot_entry[slot] = entry
        self._slot_ranks[slot] = entry.rank
        self._slot_scalings[slot] = entry.scaling
        self._lru[slot] = None
