"""Benchmark suites: fastlora side by side with a frozen ``nn.Linear`` (the floor), naive PyTorch LoRA and HF PEFT.

Suites (``SUITES``; each a ``Suite`` of ``fastlora.bench.common``, in a module of its own, ``multi`` in one per
level):

- ``linear``: one LoRA layer, forward and forward+backward, timed (``fastlora.bench.linear``);
- ``memory``: bytes saved for backward per adapted module and peak memory of its training step
  (``fastlora.bench.memory``);
- ``train``: one optimizer step of a Llama-style model: tokens per second and peak memory (``fastlora.bench.train``);
- ``multi``: many adapters in one batch (serving) against a base-only forward and PEFT's mixed batch, by distinct
  adapters, tokens, rank mix and adapters registered, at two levels: ``multi_lora_linear`` over one projection
  (``fastlora.bench.multi_layer``) and ``MultiLoraModel`` over a whole model (``fastlora.bench.multi_model``); what
  the levels share about mixed batches is in ``fastlora.bench.multi_batch``. ``--suite multi`` runs both levels as one
  suite: its rows carry ``level`` (``layer`` or ``model``), and results.md has one ``## multi`` section with each
  level's tables (``common.multilevel_suite``);
- ``overhead``: what one layer call costs beyond its GEMMs: kernel launches and host syncs per forward+backward, host
  time per call, bytes saved for backward (``fastlora.bench.overhead``);
- ``moe``: LoRA on mixture-of-experts experts (PEFT's ``target_parameters``) against PEFT, at two levels in one module
  (``fastlora.bench.moe``, joined by ``common.multilevel_suite``): ``block``, one sparse MoE block's forward+backward
  against the frozen block, and ``train``, one optimizer step of a small Qwen3-MoE-style model;
- ``qlora``: LoRA over a frozen 4-bit NF4 base weight (QLoRA) against bitsandbytes + PEFT and fastlora's own bf16 LoRA,
  at two levels in one module (``fastlora.bench.qlora``): ``layer``, one linear layer's forward+backward and decode
  forward, and ``train``, one optimizer step of a small Llama-style model quantized to NF4.

Headline runs (``run(headline=True)``, ``fastlora bench --headline``) measure only the cases that the README's
performance targets are read from, and write ``targets.md``: each target, the value measured, met or missed
(``fastlora.bench.targets``).

The whole-model suites (``train`` and the model level of ``multi``) share their Llama-style shapes and model building
(``fastlora.bench.llama``).

A suite runs as ``run(device, quick, progress_bar, headline) -> rows`` and draws its own tables and plots; a row is a flat dict
(suite, contender, the case's fields, ``shape``, ``dtype``, measurements, environment) so that tables and plots are
drawn from rows, never from live measurements. ``run`` picks the cases for the device, measures every contender of a
case in the same process on the same inputs, after checking that they compute the same thing, and writes
``results.json``, ``results.md`` and PNG plots (``fastlora.bench.report``). The CPU suites run the torch backend on
small shapes: their timings say nothing about kernel speed, they prove the suites run; bytes saved for backward are
counted exactly on any device. Contenders that compute the same thing are checked against each other before they are
timed, with the one tolerance table of ``fastlora.reference`` (``common.assert_close``).

A new suite is a module with a ``SUITE`` record (or, measured at several levels, a module per level with a ``LEVEL``
record, joined by ``multilevel_suite``), added to the tuple that builds ``SUITES``: ``fastlora bench --suite`` and
``all`` pick it up from there.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from . import linear, memory, moe, multi_layer, multi_model, overhead, qlora, report, targets, train
from .common import (
    CPU_DISCLAIMER,
    DTYPES,
    FASTLORA,
    FROZEN,
    NAIVE,
    PATCHED,
    PEFT,
    QUANTILES,
    BenchmarkMismatch,
    Suite,
    bench_backend,
    bench_device,
    default_out_dir,
    device_slug,
    environment,
    forced_backend,
    multilevel_suite,
    peak_memory_bytes,
    synchronized,
    time_ms,
    with_backend,
)
from .linear import (
    MODES,
    LinearCase,
    LinearInputs,
    check_agreement,
    linear_cases,
    linear_contender_names,
    linear_contenders,
    linear_flops,
    make_linear_inputs,
    peft_lora_linear,
)
from .memory import MemoryCase, SavedTensors, memory_cases, saved_for_backward
from .moe import MoeBlockCase, MoeTrainCase, moe_block_cases, moe_train_cases
from .multi_layer import MultiCase, layer_cases
from .multi_model import MultiModelCase, model_cases
from .qlora import QloraLayerCase, qlora_layer_cases, qlora_train_cases
from .report import Written, read_rows
from .train import TrainCase, train_cases

MULTI_SUITE = multilevel_suite("multi", (multi_layer.LEVEL, multi_model.LEVEL))
SUITES: dict[str, Suite] = {
    suite.name: suite
    for suite in (linear.SUITE, memory.SUITE, train.SUITE, MULTI_SUITE, overhead.SUITE, moe.SUITE, qlora.SUITE)
}

__all__ = [
    "CPU_DISCLAIMER", "DTYPES", "FASTLORA", "FROZEN", "MODES", "NAIVE", "PATCHED", "PEFT", "QUANTILES", "SUITES",
    "BenchmarkMismatch", "LinearCase", "LinearInputs", "MemoryCase", "MoeBlockCase", "MoeTrainCase", "MultiCase",
    "MultiModelCase", "QloraLayerCase", "SavedTensors", "Suite", "TrainCase", "Written", "bench_backend",
    "bench_device", "check_agreement", "default_out_dir", "device_slug", "environment", "forced_backend",
    "format_markdown", "layer_cases", "linear_cases", "linear_contender_names", "linear_contenders", "linear_flops",
    "make_linear_inputs", "memory_cases", "model_cases", "moe_block_cases", "moe_train_cases", "peak_memory_bytes",
    "peft_lora_linear", "qlora_layer_cases", "qlora_train_cases", "read_rows", "run", "saved_for_backward",
    "synchronized", "time_ms", "train_cases", "with_backend", "write_results",
]  # fmt: skip


def suite_names(suite: str) -> list[str]:
    """The suites ``suite`` names: itself, or every registered one for ``"all"``."""
    if suite != "all" and suite not in SUITES:
        raise ValueError(f"fastlora.bench: suite must be one of {(*SUITES, 'all')}, got {suite!r}")
    return list(SUITES) if suite == "all" else [suite]


def format_markdown(rows: list[dict]) -> str:
    """results.md for ``rows``: the device, the CPU disclaimer when it applies, a section of tables per suite."""
    return report.format_markdown(rows, SUITES)


def write_results(rows: list[dict], out_dir: str | Path, merge: bool = True) -> Written:
    """Write results.json, results.md and the plots into ``out_dir``, keeping other suites' rows already there
    (see ``fastlora.bench.report``)."""
    return report.write_results(rows, out_dir, SUITES, merge=merge)


def _require_packages() -> None:
    """Every suite measures PEFT and draws plots: fail before measuring anything when a package is missing."""
    import importlib.util

    missing = [name for name in ("peft", "transformers", "matplotlib") if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"fastlora bench needs {', '.join(missing)}: pip install 'fastlora[bench,integration]'")


def run(
    suite: str = "all",
    quick: bool = False,
    out: str | Path | None = None,
    progress: bool = True,
    headline: bool = False,
) -> tuple[list[dict], Written]:
    """Run ``suite`` (a key of ``SUITES``, or ``"all"``) on this machine's device and write the results into ``out``
    (default ``benchmarks/results/<device_slug>/``); returns the rows measured and the files written.

    ``headline``: only the cases the README's targets are read from (a suite that feeds no target runs none), into
    ``benchmarks/results/<device_slug>/headline/`` by default, and ``targets.md`` beside the results: each target,
    its measured value, met or missed (``fastlora.bench.targets``). ``quick`` then keeps one case per target."""
    names = suite_names(suite)
    _require_packages()
    device = bench_device()
    qlora.bnb_issue(device.type)  # imports bitsandbytes quietly, where it runs, before a suite's PEFT imports it
    env = environment(device, quick=quick, headline=headline)
    rows = [{**row, **env} for name in names for row in SUITES[name].run(device, quick, progress, headline)]
    out_dir = Path(default_out_dir(device, headline) if out is None else out)
    written = write_results(rows, out_dir)
    if headline:
        written = dataclasses.replace(written, targets=targets.write_targets(list(written.rows), out_dir))
    return rows, written
