"""The ``overhead`` suite: what one LoRA layer call costs beyond its two GEMMs, for the contenders of ``linear``.

Per contender and case (a training forward and backward of one layer, ``x`` requiring grad, ``W0`` frozen):

- ``launches``: device work items (kernels, memsets, copies) of one forward+backward, counted by ``torch.profiler``
  on CUDA (``fastlora.bench.launches``); a frozen ``nn.Linear`` needs 2. None on a CPU, where this suite runs the torch
  backend: the Triton kernels' launches are counted on CPU by the tests, through the interpreter, and the ``linear``
  suite reports every contender's on every device.
- ``host_syncs``: calls in that forward+backward that make the host wait for the device (``cudaDeviceSynchronize``,
  ``cudaStreamSynchronize``, ``cudaEventSynchronize``, a blocking ``cudaMemcpy``), from the same profile.
- ``host_us_fwd`` / ``host_us_fwd_bwd``: host time per call in eager mode, in microseconds (``common.host_us``): the
  time Python, autograd and the launches take on the CPU while the device runs behind. On a CPU the device is the CPU,
  so the figure is the whole call.
- ``saved_bytes`` / ``saved_beyond_input_bytes``: what autograd keeps for the backward, as the ``memory`` suite counts
  it (exact on every device).

Targets P3, P9 and P10 of the README are read from this suite's headline rows (``fastlora.bench.targets``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from .common import (
    FASTLORA,
    FROZEN,
    NAIVE,
    PEFT,
    Case,
    Suite,
    bench_backend,
    fmt_bytes,
    free_memory,
    host_us,
    md_table,
    progress,
)
from .launches import count_launches
from .linear import LinearCase, check_agreement, linear_contenders, make_linear_inputs
from .memory import saved_for_backward

CONTENDERS = (FROZEN, NAIVE, PEFT, FASTLORA)


@dataclasses.dataclass(frozen=True)
class OverheadCase(Case):
    """One layer: ``x [M, K]``, ``W0 [N, K]``, rank ``r``, activation dtype (LoRA weights fp32 for half precision, as
    PEFT keeps them), LoRA dropout probability."""

    M: int
    K: int
    N: int
    r: int
    dtype: str
    dropout: float

    @property
    def shape(self) -> str:
        return f"M={self.M} K={self.K} N={self.N} r={self.r}"

    @property
    def label(self) -> str:
        return f"M{self.M}-K{self.K}-N{self.N}-r{self.r}-{self.dtype}-p{self.dropout}"

    def as_linear(self, mode: str) -> LinearCase:
        return LinearCase(self.M, self.K, self.N, self.r, self.dtype, self.dropout, mode)


def overhead_cases(device: torch.device, quick: bool = False, headline: bool = False) -> list[OverheadCase]:
    """On CUDA a K = N = 4096 bf16 layer at r = 16 over 16 tokens (decode: the one-pass forward) and 4096 tokens (a
    training batch: shrink, then GEMM), dropout 0.1 (the most launches) and, outside headline and quick runs, 0. On
    CPU a K = N = 256 fp32 layer over 16 and 256 tokens. Headline and quick runs: dropout 0.1 only."""
    Ms, KN, r, dtype = ((16, 4096), 4096, 16, "bf16") if device.type == "cuda" else ((16, 256), 256, 8, "fp32")
    dropouts = (0.1,) if headline or quick else (0.1, 0.0)
    return [OverheadCase(M, KN, KN, r, dtype, p) for p in dropouts for M in Ms]


def measure_case(case: OverheadCase, device: torch.device) -> list[dict]:
    """One row per contender; the contenders are checked to compute the same thing first (as in ``linear``)."""
    backend = bench_backend(device)
    train = case.as_linear("fwd+bwd")
    inputs = make_linear_inputs(train, device)
    check_agreement(train, inputs, backend, forward_shapes=False)
    forward = linear_contenders(case.as_linear("fwd"), inputs, backend, forward_shapes=False)
    step = linear_contenders(train, inputs, backend, forward_shapes=False)
    params = [inputs.weight, inputs.bias, inputs.lora_A, inputs.lora_B]
    rows = []
    for name in CONTENDERS:
        step[name]()  # warm-up before the profile: autotuning launches kernels of its own
        launches = syncs = None
        if device.type == "cuda":
            count = count_launches(step[name], device, kernels=False)
            launches, syncs = count.launches, count.host_syncs
        saved = saved_for_backward(forward[name], inputs.x, params)
        rows.append({
            "suite": "overhead", "contender": name, **dataclasses.asdict(case), "shape": case.shape,
            "launches": launches, "host_syncs": syncs, "host_us_fwd": host_us(forward[name], device),
            "host_us_fwd_bwd": host_us(step[name], device), "saved_bytes": saved.saved_bytes,
            "saved_beyond_input_bytes": saved.beyond_input_bytes,
        })  # fmt: skip
        inputs.clear_grads()
    return rows


def overhead_suite(
    device: torch.device, quick: bool = False, progress_bar: bool = False, headline: bool = False
) -> list[dict]:
    rows = []
    for case in progress(overhead_cases(device, quick, headline), "overhead", progress_bar):
        rows.extend(measure_case(case, device))
        free_memory(device)
    return rows


# ----------------------------------------------------------------------------------------------- report


def overhead_markdown(rows: list[dict]) -> list[str]:
    lines = [
        "What one training call of a layer costs beyond its GEMMs. *Launches*: device kernels, memsets and copies of "
        "one forward+backward (CUDA only; a frozen layer needs 2). *Host syncs*: calls in it that wait for the device. "
        "*Host µs*: host time per call in eager mode, the device running behind. *Saved beyond x*: bytes autograd "
        "keeps for the backward, leaving out the input and the parameters.",
    ]
    header = ["M", "K", "N", "r", "dtype", "dropout", "contender", "launches", "host syncs", "host µs fwd",
              "host µs fwd+bwd", "saved beyond x"]  # fmt: skip
    table = [
        [row["M"], row["K"], row["N"], row["r"], row["dtype"], row["dropout"], row["contender"],
         "n/a" if row["launches"] is None else row["launches"], "n/a" if row["host_syncs"] is None else row["host_syncs"],
         f"{row['host_us_fwd']:.1f}", f"{row['host_us_fwd_bwd']:.1f}", fmt_bytes(row["saved_beyond_input_bytes"])]
        for row in rows
    ]  # fmt: skip
    return [*lines, "", *md_table(header, table)]


def overhead_plots(rows: list[dict], out_dir: Path) -> list[Path]:
    """No plot: the table is the figure."""
    return []


SUITE = Suite("overhead", overhead_suite, overhead_markdown, overhead_plots, ())
