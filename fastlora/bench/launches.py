"""Launch accounting: the kernel launches and host syncs of one call, and the bytes each launch must move.

``count_launches(fn, device)`` runs ``fn`` (once; twice on CUDA) and returns a ``LaunchCount``:

- ``launches``: device work items of the call. On CUDA, the device-side events of a ``torch.profiler`` trace
  (kernels, memsets, copies). Elsewhere, counted at the launchers: every Triton launch (``fastlora.kernels``'
  ``recording_launches``) plus every aten op that would launch a device kernel, seen through a
  ``TorchDispatchMode``. Ops that launch nothing on a GPU are left out: views, allocations without a fill
  (``empty``, ``empty_like``, ...), shape and stride queries, ops whose outputs have no element. Composite ops are
  split into the ops they run, and custom ops (``torch.library``) into the ops of their implementation, so a launch
  is counted where it happens, once.
- ``host_syncs``: points where the host waits for the device. On CUDA, the synchronising runtime calls of the same
  trace (``SYNC_CALLS``; the trace's own closing synchronisation left out). Elsewhere, the aten ops that make the
  host read device data on a GPU (``SYNC_OPS``: ``.item()``, ``nonzero``, ``masked_select``, ``unique``, indexing by
  a boolean mask, ...) and copies from a device to the CPU. A sync op is a launch too, as the copy it makes is on
  CUDA. (``.tolist()`` of a CPU tensor reads its memory without an op: it is not seen.)
- ``kernels``: ``(name, bytes)`` for each launch as the host issues it, in order: a Triton launcher's name and the
  bytes its ``Launch`` record says it must move, or an aten op (``aten::addmm``) and the bytes of its distinct input
  and output tensors. On CUDA the list comes from a second call of ``fn``, and a library call may run more than one
  device kernel, so ``launches`` may exceed its length there.

Under Triton's interpreter a launch runs on the host and copies its arguments with aten ops of its own; those are
part of the launch, not launches, and are left out.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..kernels import is_interpreting, recording_launches

# Runtime calls after which the host has waited for the device.
SYNC_CALLS = ("cudaDeviceSynchronize", "cudaStreamSynchronize", "cudaEventSynchronize", "cudaMemcpy")
# Aten ops that read device data on the host (their result's size or value): a sync on a GPU.
SYNC_OPS = frozenset({
    "aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::_unique", "aten::_unique2",
    "aten::unique_dim", "aten::unique_consecutive", "aten::unique_dim_consecutive", "aten::equal",
    "aten::bincount", "aten::histc",
})  # fmt: skip
# Aten ops that are no views and still launch nothing: allocations without a fill, metadata, storage plumbing.
NO_LAUNCH_OPS = frozenset({
    "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::new_empty", "aten::new_empty_strided",
    "aten::_unsafe_view", "aten::resize_", "aten::set_", "aten::sym_size", "aten::sym_stride", "aten::sym_numel",
    "aten::sym_storage_offset", "aten::is_same_size", "aten::_has_compatible_shallow_copy_type", "aten::record_stream",
})  # fmt: skip
# Ops that sync when an index is a boolean mask (they take its nonzero positions first).
MASK_INDEX_OPS = frozenset({"aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"})


@dataclasses.dataclass(frozen=True)
class LaunchCount:
    """What one call launches: ``launches`` and ``host_syncs`` (see the module docstring), and ``kernels``: each
    launch's name and the bytes it must move, in order."""

    launches: int
    host_syncs: int
    kernels: tuple[tuple[str, int], ...]

    @property
    def bytes(self) -> int:
        """The bytes every launch of ``kernels`` must move, together."""
        return sum(n for _, n in self.kernels)

    def names(self) -> list[str]:
        return [name for name, _ in self.kernels]


def count_launches(fn: Callable[[], object], device: torch.device | str = "cpu", kernels: bool = True) -> LaunchCount:
    """Launches, host syncs and the per-launch list of one call of ``fn`` whose tensors live on ``device`` (see the
    module docstring). Call ``fn`` once before: autotuning and lazy initialisation launch work of their own. On CUDA
    ``fn`` is called twice (the profile, then the list), or once without ``kernels`` (the list is then empty)."""
    device = torch.device(device)
    if device.type == "cuda":
        launches, syncs = _profiled_work(fn, device)
        return LaunchCount(launches, syncs, _counted_at_launchers(fn)[2] if kernels else ())
    return LaunchCount(*_counted_at_launchers(fn))


def _profiled_work(fn: Callable[[], object], device: torch.device) -> tuple[int, int]:
    """``(launches, host_syncs)`` of one call of ``fn`` from a ``torch.profiler`` trace of CPU and CUDA activity."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize(device)
    events = prof.profiler.kineto_results.events()
    launches = sum(1 for e in events if e.device_type() == DeviceType.CUDA)
    syncs = sum(
        1
        for e in events
        if e.device_type() == DeviceType.CPU and e.name().startswith(SYNC_CALLS) and not e.name().endswith("Async")
    )
    # The profile's own closing synchronisation is one of them.
    return launches, max(syncs - 1, 0)


def _counted_at_launchers(fn: Callable[[], object]) -> tuple[int, int, tuple[tuple[str, int], ...]]:
    with recording_launches() as triton_launches, _LaunchCounter(triton_launches) as counter:
        fn()
    counter.take_triton_launches()
    return len(counter.kernels), counter.syncs, tuple(counter.kernels)


def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in tree_leaves(tree) if isinstance(t, torch.Tensor)]


def _distinct_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of ``tensors``, each tensor once (an in-place op returns its input)."""
    seen = {id(t): t for t in tensors}
    return sum(t.numel() * t.element_size() for t in seen.values())


def _keys_below_python(tensors: list[torch.Tensor]) -> torch._C.DispatchKeySet:
    """The dispatch keys of ``tensors`` below the Python key: where a custom op's implementation runs."""
    keys = torch._C._dispatch_keyset_full_after(torch._C.DispatchKey.Python)
    found = None
    for t in tensors:
        found = torch._C._dispatch_keys(t) if found is None else found | torch._C._dispatch_keys(t)
    return keys if found is None else found & keys


def _is_sync(name: str, args, kwargs, outputs: list[torch.Tensor]) -> bool:
    if name in SYNC_OPS:
        return True
    if name in MASK_INDEX_OPS:  # the indices come second
        return any(t.dtype in (torch.bool, torch.uint8) for t in _tensors(args[1:2]))
    if name == "aten::repeat_interleave":  # sizes its output from the repeats unless told
        return isinstance(args[0], torch.Tensor) and kwargs.get("output_size") is None
    if name in ("aten::_to_copy", "aten::copy_"):  # device to host
        sources = _tensors(args[1:2] if name == "aten::copy_" else args[:1])
        targets = outputs[:1] if name == "aten::_to_copy" else _tensors(args[:1])
        return any(s.device.type != "cpu" for s in sources) and any(t.device.type == "cpu" for t in targets)
    return False


class _LaunchCounter(TorchDispatchMode):
    """Records every aten op that would launch a device kernel, interleaved with the Triton launches that
    ``triton_launches`` (a ``recording_launches`` log) receives meanwhile."""

    def __init__(self, triton_launches: list):
        super().__init__()
        self.triton_launches = triton_launches
        self.taken = 0
        self.kernels: list[tuple[str, int]] = []
        self.syncs = 0
        self.interpreter_file = None
        if is_interpreting():
            import triton.runtime.interpreter

            self.interpreter_file = os.path.normcase(triton.runtime.interpreter.__file__)

    def take_triton_launches(self) -> None:
        """Append the Triton launches recorded since the last call, so the list keeps the order of the calls."""
        for launch in self.triton_launches[self.taken :]:
            self.kernels.append((launch.kernel, launch.bytes))
        self.taken = len(self.triton_launches)

    def _inside_interpreted_launch(self) -> bool:
        if self.interpreter_file is None:
            return False
        frame = sys._getframe(2)
        while frame is not None:
            if os.path.normcase(frame.f_code.co_filename) == self.interpreter_file:
                return True
            frame = frame.f_back
        return False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._inside_interpreted_launch():
            return func(*args, **kwargs)
        # Composite ops (``to``, ``contiguous``, ``reshape``, ...) are counted by the ops they run.
        if torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "CompositeImplicitAutograd"):
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        if func.namespace != "aten":
            # A custom op: its implementation runs here, below the Python key, with this mode seeing its ops.
            with self:
                return func.redispatch(_keys_below_python(_tensors((args, kwargs))), *args, **kwargs)
        self.take_triton_launches()
        out = func(*args, **kwargs)
        name = func._schema.name
        outputs = _tensors(out)
        sync = _is_sync(name, args, kwargs, outputs)
        self.syncs += sync
        if sync or not (func.is_view or name in NO_LAUNCH_OPS or (outputs and all(t.numel() == 0 for t in outputs))):
            self.kernels.append((name, _distinct_bytes(_tensors((args, kwargs)) + outputs)))
        return out
