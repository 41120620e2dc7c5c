"""pytest-benchmark over the linear suite: the contenders and quick cases of ``fastlora.bench``, one test per
(case, contender), grouped by case. ``pytest benchmarks/ --benchmark-disable`` runs each once as a smoke test;
``pytest benchmarks/`` times them. ``fastlora bench`` is the full sweep and writes the result tables."""

import functools

import pytest
from bench_params import contender_params

from fastlora import bench

DEVICE = bench.bench_device()
BACKEND = bench.bench_backend(DEVICE)
CASES = bench.linear_cases(DEVICE, quick=True)


@functools.cache
def contenders(case: bench.LinearCase) -> dict:
    """The case's inputs are built, and every LoRA contender (PEFT, fastlora) checked against the naive formula,
    once for all its contenders."""
    inputs = bench.make_linear_inputs(case, DEVICE)
    bench.check_agreement(case, inputs, BACKEND)
    return bench.linear_contenders(case, inputs, BACKEND)


@pytest.mark.parametrize(
    "case, name", contender_params(CASES, lambda case: bench.linear_contender_names(case, BACKEND))
)
def test_linear(benchmark, case, name):
    benchmark.group = case.label
    benchmark.extra_info.update(backend=BACKEND, flops=bench.linear_flops(case))
    benchmark(bench.synchronized(contenders(case)[name], DEVICE))
