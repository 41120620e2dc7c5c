"""What the two levels of the ``multi`` suite (``multi_layer``, ``multi_model``) share: how a batch mixes adapters.

A case names a rank mix (``"16"``, or ``"8,16,32,64"`` cycled over the batch's adapters), ``D`` distinct adapters in
the batch, spread over a pool of registered adapters (not its first slots), and gives each token (layer) or row
(model) one of them in shuffled order, every adapter equally often to within one. PEFT's mixed batch is the
contender both levels measure fastlora against.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

PEFT_MIXED = "PEFT mixed batch"
UNIFORM, MIXED = "16", "8,16,32,64"


def parse_ranks(ranks: str) -> tuple[int, ...]:
    """``"8,16,32,64"`` -> ``(8, 16, 32, 64)``: the ranks the batch's adapters cycle through."""
    return tuple(int(r) for r in ranks.split(","))


def check_mix(where: str, ranks: str, adapters: int, pool: int, pool_name: str) -> None:
    """A case's rank mix and ``adapters`` distinct adapters out of ``pool`` registered ones (``pool_name``, its
    field) make sense; raises ``ValueError`` naming ``where`` otherwise."""
    if not ranks or any(r < 1 for r in parse_ranks(ranks)):
        raise ValueError(f"{where}: ranks must be positive integers separated by commas, got {ranks!r}")
    if not 1 <= adapters <= pool:
        raise ValueError(f"{where}: adapters ({adapters}) must be between 1 and {pool_name} ({pool})")


def spread(count: int, total: int) -> list[int]:
    """``count`` indices spread evenly over ``range(total)``: the batch's adapters sit all over the pool, not in its
    first slots."""
    return [i * total // count for i in range(count)]


def shuffled_assignment(items: int, groups: int, seed: int) -> list[int]:
    """For each of ``items`` tokens (or rows), one of ``groups`` groups: every group equally often (to within one),
    in a seeded random order."""
    g = torch.Generator().manual_seed(seed)
    return [i % groups for i in torch.randperm(items, generator=g).tolist()]


@contextlib.contextmanager
def cpu_threads(device: torch.device, threads: int) -> Iterator[None]:
    """On CPU, run torch on ``threads`` threads: the tiny CPU shapes are dozens of small ops per layer, where a
    thread pool's barriers cost more than they share, and on a loaded machine a spinning thread waiting for a busy
    core turns microseconds into milliseconds. CUDA runs are left alone."""
    if device.type == "cuda":
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)
