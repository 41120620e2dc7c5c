"""``BatchMeta``: which adapter each token of a batch uses, in the form the multi-adapter kernels read.

Built once per forward from per-token adapter slots (``-1`` = base model only) and shared by every adapted layer,
so the grouping work (a stable sort by slot, segment boundaries) is paid once per batch, not once per layer.

For ``T`` tokens in input order and a pool of ``num_slots`` slots:

- ``token_slots [T]``: each token's slot, ``-1`` for none;
- ``sorted_token_ids [T_active]``: the tokens that use an adapter, grouped by slot (stable: input order within a
  slot); tokens with slot ``-1`` are left out, so they cost nothing beyond the base GEMM;
- ``seg_offsets [S + 1]`` and ``seg_slots [S]``: segment ``s`` is ``sorted_token_ids[seg_offsets[s]:seg_offsets[s+1]]``,
  all of slot ``seg_slots[s]``; one segment per distinct slot in the batch, in increasing slot order;
- ``slot_ranks [num_slots]`` / ``slot_scalings [num_slots]``: each slot's rank and ``lora_alpha / r`` (the pool's
  defaults; a layer whose ranks or scalings differ passes its own to ``multi_lora_linear``);
- ``token_scales [T]`` or None: an optional per-token multiplier of the LoRA term (per-request adapter strength).

Host-side integers (``num_tokens``, ``num_segments``, ``max_segment_len``, ``max_rank``) size the kernels' grids, so
no layer synchronises with the device. The grouping is done on the host (the slots come from the host: one adapter
name per request) and copied with ``non_blocking=True``: a copy from pageable memory is staged at once and does not
wait for the device's queue. Index tensors are int32 on the batch's device.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import torch


class KernelArgs(NamedTuple):
    """The batch as the multi-adapter kernels read it: the trailing arguments of every launcher of
    ``fastlora.kernels.multi_lora``, in this order, and of the ``fastlora::multi_lora_linear`` op."""

    token_slots: torch.Tensor  # [T] int32, -1 = no adapter
    sorted_token_ids: torch.Tensor  # [T_active] int32
    seg_offsets: torch.Tensor  # [S + 1] int32
    seg_slots: torch.Tensor  # [S] int32
    token_scales: torch.Tensor | None  # [T] float32
    num_segments: int
    max_segment_len: int
    max_rank: int


@dataclasses.dataclass(frozen=True)
class BatchMeta:
    token_slots: torch.Tensor  # [T] int32, -1 = no adapter
    sorted_token_ids: torch.Tensor  # [T_active] int32
    seg_offsets: torch.Tensor  # [S + 1] int32
    seg_slots: torch.Tensor  # [S] int32
    slot_ranks: torch.Tensor  # [num_slots] int32
    slot_scalings: torch.Tensor  # [num_slots] float32
    token_scales: torch.Tensor | None  # [T] float32
    num_tokens: int
    num_segments: int
    max_segment_len: int
    max_rank: int  # the largest rank among the slots this batch uses (0 when no token has an adapter)
    # The distinct slots used, increasing (= seg_slots on the host); None for the fixed-size metadata of a
    # ``StaticBatch``, whose host side does not depend on which slots a batch uses.
    active_slots: tuple[int, ...] | None

    @classmethod
    def build(
        cls,
        token_slots: torch.Tensor | Sequence[int],
        slot_ranks: torch.Tensor | Sequence[int],
        slot_scalings: torch.Tensor | Sequence[float],
        token_scales: torch.Tensor | Sequence[float] | None = None,
        device: torch.device | str | None = None,
    ) -> BatchMeta:
        """Group ``token_slots`` (``[T]``, ``-1`` = none) by slot. ``slot_ranks`` / ``slot_scalings`` have one entry
        per pool slot. ``device`` defaults to ``token_slots``' device (CPU for a list). One host round trip."""
        if device is None:
            device = token_slots.device if isinstance(token_slots, torch.Tensor) else torch.device("cpu")
        device = torch.device(device)
        slots_host, ranks_host, scalings, token_scales = _host_batch(
            token_slots, slot_ranks, slot_scalings, token_scales
        )
        if token_scales is not None:
            token_scales = token_scales.to(device, non_blocking=True)
        sorted_ids, seg_slots, counts = _group(slots_host, ranks_host)
        seg_offsets = torch.zeros(seg_slots.numel() + 1, dtype=torch.int64)
        seg_offsets[1:] = torch.cumsum(counts, 0)

        def on_device(t: torch.Tensor) -> torch.Tensor:
            return t.to(dtype=torch.int32).to(device, non_blocking=True)

        return cls(
            token_slots=on_device(slots_host),
            sorted_token_ids=on_device(sorted_ids),
            seg_offsets=on_device(seg_offsets),
            seg_slots=on_device(seg_slots),
            slot_ranks=on_device(ranks_host),
            slot_scalings=scalings.to(device, non_blocking=True),
            token_scales=token_scales,
            num_tokens=slots_host.numel(),
            num_segments=seg_slots.numel(),
            max_segment_len=int(counts.max()) if counts.numel() else 0,
            max_rank=int(ranks_host[seg_slots].max()) if seg_slots.numel() else 0,
            active_slots=tuple(int(s) for s in seg_slots),
        )

    @classmethod
    def from_rows(
        cls,
        row_slots: Sequence[int],
        seq_len: int,
        slot_ranks: torch.Tensor | Sequence[int],
        slot_scalings: torch.Tensor | Sequence[float],
        row_scales: Sequence[float] | None = None,
        device: torch.device | str | None = None,
    ) -> BatchMeta:
        """Meta for a ``[B, seq_len]`` batch whose row ``b`` uses slot ``row_slots[b]`` for all its tokens (tokens are
        flattened row-major, as ``x.view(-1, K)`` of a ``[B, L, K]`` activation)."""
        rows = torch.as_tensor(list(row_slots), dtype=torch.int64)
        token_slots = rows.repeat_interleave(seq_len)
        token_scales = None
        if row_scales is not None:
            token_scales = torch.as_tensor(list(row_scales), dtype=torch.float32).repeat_interleave(seq_len)
        return cls.build(token_slots, slot_ranks, slot_scalings, token_scales, device=device)

    def kernel_args(self) -> KernelArgs:
        """What the kernels read of this batch, as the trailing arguments of their launchers (``*meta.kernel_args()``).
        The per-slot ranks and scalings are not among them: each layer passes its own (``multi_lora_linear``)."""
        return KernelArgs(
            self.token_slots, self.sorted_token_ids, self.seg_offsets, self.seg_slots, self.token_scales,
            self.num_segments, self.max_segment_len, self.max_rank,
        )  # fmt: skip

    @property
    def has_lora_tokens(self) -> bool:
        return self.num_segments > 0


def _host_batch(token_slots, slot_ranks, slot_scalings, token_scales):
    """The batch on the host, checked: ``(token slots, slot ranks)`` as int64, slot scalings and token scales (or
    None) as float32, all 1-D."""
    slots_host = torch.as_tensor(token_slots, dtype=torch.int64).detach().to("cpu").reshape(-1)
    ranks_host = torch.as_tensor(slot_ranks, dtype=torch.int64).detach().to("cpu").reshape(-1)
    scalings = torch.as_tensor(slot_scalings, dtype=torch.float32).detach().to("cpu").reshape(-1)
    num_slots = ranks_host.numel()
    if scalings.numel() != num_slots:
        raise ValueError(f"BatchMeta: slot_scalings has {scalings.numel()} entries but slot_ranks has {num_slots}")
    # Checked here, once per batch on the host: a layer reads these on the device, where a check would synchronise.
    _check_finite(scalings, "slot_scalings", "slot")
    T = slots_host.numel()
    if T and (slots_host.min() < -1 or slots_host.max() >= num_slots):
        bad = slots_host[(slots_host < -1) | (slots_host >= num_slots)][0].item()
        raise ValueError(f"BatchMeta: token slot {bad} is out of range [-1, {num_slots}) for a pool of {num_slots}")
    if token_scales is not None:
        token_scales = torch.as_tensor(token_scales, dtype=torch.float32).detach().to("cpu").reshape(-1)
        if token_scales.numel() != T:
            raise ValueError(f"BatchMeta: token_scales has {token_scales.numel()} entries for {T} tokens")
        _check_finite(token_scales, "token_scales", "token")
    return slots_host, ranks_host, scalings, token_scales


def _check_finite(values: torch.Tensor, name: str, what: str) -> None:
    """``values`` (a host tensor, one entry per slot or token) are all finite; else a ValueError naming the first bad
    entry."""
    finite = torch.isfinite(values)
    if not finite.all():
        i = int(torch.nonzero(~finite)[0])
        raise ValueError(f"BatchMeta: {name}[{i}] (the {what} {i}) is {values[i].item()}; it must be finite")


def _group(slots_host: torch.Tensor, ranks_host: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(sorted_token_ids, seg_slots, counts)``: the tokens with an adapter grouped by slot (stable), the slot of each
    segment (increasing) and its token count. Raises when a token uses a slot of rank 0 (no adapter)."""
    ids = torch.nonzero(slots_host >= 0).reshape(-1)
    sorted_ids = ids[torch.sort(slots_host[ids], stable=True).indices]
    seg_slots, counts = torch.unique_consecutive(slots_host[sorted_ids], return_counts=True)
    used = ranks_host[seg_slots]
    if (used < 1).any():
        empty = seg_slots[used < 1][0].item()
        raise ValueError(f"BatchMeta: slot {empty} is used by a token but holds no adapter (rank 0)")
    return sorted_ids, seg_slots, counts


class StaticBatch:
    """A batch's ``BatchMeta`` in fixed-size device buffers, rewritten in place for every batch of the same size: what
    a CUDA graph (or a region compiled by ``torch.compile``) captures once and then replays over new batches.

    For ``num_tokens`` tokens over a pool of ``num_slots`` slots, ``meta`` is a ``BatchMeta`` whose host integers depend
    only on the sizes (``num_segments = min(num_tokens, num_slots)``, ``max_segment_len = num_tokens``, ``max_rank``
    as given) and whose tensors are views of two device buffers that never move. ``update`` groups a new batch on the
    host and writes it with one asynchronous copy per buffer (int32: token slots, sorted tokens, segment offsets and
    slots, slot ranks; float32: slot scalings and, with ``token_scales=True``, per-token scales), from pinned staging
    buffers used in turn; no device synchronisation. The unused segments are empty (their offsets repeat the count of tokens with an adapter), so
    their programs return at once; tokens with slot ``-1`` (padding rows included) cost only the base GEMM on the fused
    path and are in no segment. The grids are sized for the worst case the sizes allow: the same launches every batch.

    Updates are ordered with the kernels on the device's current stream, so a batch written after a replay was queued
    does not change what that replay reads. One ``StaticBatch`` serves one stream of batches at a time.
    """

    def __init__(
        self,
        num_tokens: int,
        num_slots: int,
        max_rank: int,
        device: torch.device | str,
        *,
        token_scales: bool = False,
    ):
        for arg, value in (("num_tokens", num_tokens), ("num_slots", num_slots), ("max_rank", max_rank)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"StaticBatch: {arg} must be an integer >= 1, got {value!r}")
        T, S = num_tokens, num_slots
        segments = min(T, S)
        self.num_tokens, self.num_slots, self.max_rank = T, S, max_rank
        self.device = torch.device(device)
        # int32 buffer: token_slots [T] | sorted_token_ids [T] | seg_offsets [segments + 1] | seg_slots [segments] |
        # slot_ranks [S]; float32 buffer: slot_scalings [S] | token_scales [T]
        sizes = (T, T, segments + 1, segments, S)
        floats = S + (T if token_scales else 0)
        # On CUDA, two pinned staging buffers used in turn: a copy from pinned memory never waits for the device, and
        # the buffer written now was last copied from two updates ago (its event says whether that copy is done).
        pin = self.device.type == "cuda"
        self._staging = [
            (torch.zeros(sum(sizes), dtype=torch.int32, pin_memory=pin), torch.zeros(floats, pin_memory=pin))
            for _ in range(2 if pin else 1)
        ]
        self._copied: list[torch.cuda.Event | None] = [None] * len(self._staging)
        self._turn = 0
        self._ints = torch.zeros(sum(sizes), dtype=torch.int32, device=self.device)
        self._floats = torch.zeros(floats, dtype=torch.float32, device=self.device)
        token_slots, sorted_ids, seg_offsets, seg_slots, slot_ranks = self._ints.split(sizes)
        self.meta = BatchMeta(
            token_slots=token_slots, sorted_token_ids=sorted_ids, seg_offsets=seg_offsets, seg_slots=seg_slots,
            slot_ranks=slot_ranks, slot_scalings=self._floats[:S], token_scales=self._floats[S:] if token_scales else None,
            num_tokens=T, num_segments=segments, max_segment_len=T, max_rank=max_rank, active_slots=None,
        )  # fmt: skip
        self._sizes = sizes

    @property
    def has_token_scales(self) -> bool:
        return self.meta.token_scales is not None

    def update(
        self,
        token_slots: torch.Tensor | Sequence[int],
        slot_ranks: torch.Tensor | Sequence[int],
        slot_scalings: torch.Tensor | Sequence[float],
        token_scales: torch.Tensor | Sequence[float] | None = None,
    ) -> BatchMeta:
        """Write a batch of exactly ``num_tokens`` tokens (``-1`` = no adapter) into the buffers; returns ``meta``.
        Checks as ``BatchMeta.build`` does, and that no slot the batch uses has a rank above ``max_rank``; raises
        before writing anything."""
        slots, ranks, scalings, scales = _host_batch(token_slots, slot_ranks, slot_scalings, token_scales)
        where = "StaticBatch.update"
        if slots.numel() != self.num_tokens:
            raise ValueError(f"{where}: the batch has {slots.numel()} tokens, the buffers hold {self.num_tokens}")
        if ranks.numel() != self.num_slots:
            raise ValueError(f"{where}: {ranks.numel()} slot ranks for buffers built for {self.num_slots} slots")
        if (scales is not None) != self.has_token_scales:
            raise ValueError(
                f"{where}: the buffers were built with token_scales={self.has_token_scales}, the batch "
                f"{'has' if scales is not None else 'has no'} token scales"
            )
        sorted_ids, seg_slots, counts = _group(slots, ranks)
        used = int(ranks[seg_slots].max()) if seg_slots.numel() else 0
        if used > self.max_rank:
            raise ValueError(f"{where}: the batch uses rank {used}, above the buffers' max_rank={self.max_rank}")
        S = self.num_slots
        self._turn = (self._turn + 1) % len(self._staging)
        ints, floats = self._staging[self._turn]
        if self._copied[self._turn] is not None:
            self._copied[self._turn].synchronize()
        host_slots, host_ids, host_offsets, host_seg_slots, host_ranks = ints.split(self._sizes)
        host_slots.copy_(slots)
        host_ids.zero_()
        host_ids[: sorted_ids.numel()] = sorted_ids
        host_offsets.fill_(sorted_ids.numel())
        host_offsets[0] = 0
        host_offsets[1 : counts.numel() + 1] = torch.cumsum(counts, 0)
        host_seg_slots.zero_()
        host_seg_slots[: seg_slots.numel()] = seg_slots
        host_ranks.copy_(ranks)
        floats[:S] = scalings
        if scales is not None:
            floats[S:] = scales
        self._ints.copy_(ints, non_blocking=True)
        self._floats.copy_(floats, non_blocking=True)
        if self.device.type == "cuda":
            self._copied[self._turn] = torch.cuda.Event()
            self._copied[self._turn].record(torch.cuda.current_stream(self.device))
        return self.meta
