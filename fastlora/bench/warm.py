"""Compile ahead, in parallel: the kernels the headline cases launch, with every config their autotuners may time.

Triton compiles a kernel once per specialisation and config, in the process that first launches it, one compile
after another, and an autotuner compiles every config that survives its pruning before it times them: a headline
run would spend minutes compiling on one CPU core. ``warm`` spreads those compiles over worker processes instead:
each job runs one fastlora training step (forward and backward) of a headline case with every autotuned kernel
pinned to one config (``pinned_configs``), so the compiled kernels land in Triton's on-disk cache
(``TRITON_CACHE_DIR``), where the measured runs that follow find them. Jobs are the headline layer cases of
``linear`` and ``overhead``, one per kernel specialisation (LoRA dtype, rank tile, dropout, forward shape), and the
``qlora`` headline cases (the 4-bit kernels), times every config index; the training step of ``train`` launches the
same specialisations. Nothing is timed or kept.

``python -m fastlora.bench.warm [--quick] [--workers N]`` (``./dev gpu`` runs it before the benchmarks). On a CPU
there is nothing to compile: it says so and returns.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import multiprocessing
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor

import torch

from .. import nf4
from ..kernels import GPU_KERNELS, rank_tile
from .common import FASTLORA, bench_backend, bench_device
from .linear import LinearCase, linear_cases, linear_contenders, make_linear_inputs
from .overhead import overhead_cases
from .qlora import QLORA, QloraLayerCase, layer_contender, layer_step, qlora_layer_cases


def autotuners() -> list:
    """Every autotuned kernel of ``fastlora.kernels`` (the ``triton.autotune`` objects the launchers call)."""
    from triton.runtime.autotuner import Autotuner

    from ..kernels import backward, expand, grouped, multi_lora, onepass, shrink, wgrad

    modules = (shrink, expand, onepass, backward, wgrad, multi_lora, grouped)
    return [v for m in modules for v in vars(m).values() if isinstance(v, Autotuner)]


@contextlib.contextmanager
def pinned_configs(index: int | None) -> Iterator[None]:
    """Inside, every autotuned kernel runs the ``index``-th of the configs that survive its pruning (modulo their
    number) without timing any; ``None`` leaves the autotuners alone. The choices made inside are forgotten after,
    and those made before are not used inside."""
    if index is None:
        yield
        return
    saved = []
    for tuner in autotuners():
        prune = tuner.prune_configs

        def pick(kwargs, prune=prune):
            configs = prune(kwargs)
            return [configs[index % len(configs)]]

        saved.append((tuner, tuner.cache))
        tuner.cache = {}
        tuner.prune_configs = pick
    try:
        yield
    finally:
        for tuner, cache in saved:
            del tuner.prune_configs
            tuner.cache = cache


def _specialisation(case: LinearCase) -> tuple:
    """What decides which kernels a training step of ``case`` compiles (sizes aside, all multiples of 16 here)."""
    return case.dtype, case.lora_dtype, rank_tile(case.r), case.dropout > 0, case.M <= 64, case.M == 1


def warm_cases(device: torch.device, quick: bool = False) -> list[LinearCase]:
    """One headline layer case (``linear`` and ``overhead``, as a training step) per kernel specialisation."""
    cases = linear_cases(device, quick, headline=True)
    cases += [case.as_linear("fwd+bwd") for case in overhead_cases(device, quick, headline=True)]
    unique: dict[tuple, LinearCase] = {}
    for case in sorted(cases, key=lambda c: c.M):
        unique.setdefault(_specialisation(case), dataclasses.replace(case, mode="fwd+bwd"))
    return list(unique.values())


def _qlora_step(case: QloraLayerCase, device: torch.device) -> Callable[[], object]:
    """The QLoRA contender's timed call of a ``qlora`` headline case (its 4-bit kernels), as that suite builds it."""
    inputs = make_linear_inputs(case.as_linear(), device)
    qweight = nf4.quantize(inputs.weight)
    forward = layer_contender(QLORA, case, inputs, qweight, bench_backend(device)).forward
    return layer_step(forward, inputs, case.mode)


def _run_job(job: tuple[LinearCase | QloraLayerCase, int]) -> float:
    """One training step of the case (a ``qlora`` case: its timed call) with every kernel pinned to config ``index``;
    returns its seconds."""
    case, index = job
    start = time.perf_counter()
    device = bench_device()
    if isinstance(case, QloraLayerCase):
        step = _qlora_step(case, device)
    else:
        inputs = make_linear_inputs(case, device)
        step = linear_contenders(case, inputs, bench_backend(device), forward_shapes=False)[FASTLORA]
    with pinned_configs(index):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def warm(quick: bool = False, workers: int = 8) -> tuple[int, float]:
    """Compile every job's kernels in ``workers`` processes; returns ``(jobs, seconds)``. ``(0, 0.0)`` on a CPU."""
    device = bench_device()
    if device.type != "cuda":
        return 0, 0.0
    configs = max(len(kernel.configs) for kernel in GPU_KERNELS)
    cases = [*warm_cases(device, quick), *qlora_layer_cases(device, quick, headline=True)]
    jobs = [(case, index) for case in cases for index in range(configs)]
    start = time.perf_counter()
    context = multiprocessing.get_context("spawn")  # CUDA cannot be used in a forked child
    with ProcessPoolExecutor(max_workers=max(1, workers), mp_context=context) as pool:
        list(pool.map(_run_job, jobs))
    return len(jobs), time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastlora.bench.warm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the cases of a quick headline run")
    parser.add_argument("--workers", type=int, default=8, help="compile processes (default: 8)")
    args = parser.parse_args(argv)
    jobs, seconds = warm(args.quick, args.workers)
    if not jobs:
        print("fastlora.bench.warm: no CUDA device, nothing to compile")
    else:
        print(
            f"fastlora.bench.warm: {jobs} training steps, each with its kernels pinned to one config, in {seconds:.0f} s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
