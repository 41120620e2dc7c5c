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
    active_slots: tuple[int, ...]  # the distinct slots used, increasing (= seg_slots on the host)

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
        slots_host = torch.as_tensor(token_slots, dtype=torch.int64).detach().to("cpu").reshape(-1)
        if device is None:
            device = token_slots.device if isinstance(token_slots, torch.Tensor) else torch.device("cpu")
        device = torch.device(device)
        ranks_host = torch.as_tensor(slot_ranks, dtype=torch.int64).detach().to("cpu").reshape(-1)
        scalings = torch.as_tensor(slot_scalings, dtype=torch.float32).reshape(-1)
        num_slots = ranks_host.numel()
        if scalings.numel() != num_slots:
            raise ValueError(f"BatchMeta: slot_scalings has {scalings.numel()} entries but slot_ranks has {num_slots}")
        T = slots_host.numel()
        if T and (slots_host.min() < -1 or slots_host.max() >= num_slots):
            bad = slots_host[(slots_host < -1) | (slots_host >= num_slots)][0].item()
            raise ValueError(f"BatchMeta: token slot {bad} is out of range [-1, {num_slots}) for a pool of {num_slots}")
        if token_scales is not None:
            token_scales = torch.as_tensor(token_scales, dtype=torch.float32).reshape(-1)
            if token_scales.numel() != T:
                raise ValueError(f"BatchMeta: token_scales has {token_scales.numel()} entries for {T} tokens")
            token_scales = token_scales.to(device, non_blocking=True)

        active = slots_host >= 0
        ids = torch.nonzero(active).reshape(-1)
        order = torch.sort(slots_host[ids], stable=True).indices
        sorted_ids = ids[order]
        seg_slots, counts = torch.unique_consecutive(slots_host[sorted_ids], return_counts=True)
        used = ranks_host[seg_slots]
        if (used < 1).any():
            empty = seg_slots[used < 1][0].item()
            raise ValueError(f"BatchMeta: slot {empty} is used by a token but holds no adapter (rank 0)")
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
            num_tokens=T,
            num_segments=seg_slots.numel(),
            max_segment_len=int(counts.max()) if counts.numel() else 0,
            max_rank=int(used.max()) if used.numel() else 0,
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
