"""pytest-benchmark over the memory suite's quick cases: one test per (case, contender) that times the module's
training step (forward + backward) and records what autograd saves for the backward in ``extra_info``.
``fastlora bench --suite memory`` writes the tables."""

import functools

import pytest
from bench_params import contender_params

from fastlora import bench
from fastlora.bench import memory

DEVICE = bench.bench_device()
BACKEND = bench.bench_backend(DEVICE)
CASES = bench.memory_cases(DEVICE, quick=True)


@functools.cache
def modules(case: bench.MemoryCase) -> tuple[bench.LinearInputs, dict]:
    """Inputs and modules of a case, checked against PEFT once for all its contenders."""
    inputs = bench.make_linear_inputs(case.as_linear(), DEVICE)
    with bench.forced_backend(BACKEND):
        memory.check_memory_agreement(case, inputs)
    return inputs, memory.memory_modules(inputs, case.dropout)


@pytest.mark.parametrize("case, name", contender_params(CASES, lambda case: memory.CONTENDERS))
def test_memory(benchmark, case, name):
    inputs, mods = modules(case)
    module = mods[name]
    with bench.forced_backend(BACKEND):
        saved = bench.saved_for_backward(lambda: module(inputs.x), inputs.x, list(module.parameters()))
    benchmark.group = f"memory-{case.label}"
    benchmark.extra_info.update(
        backend=BACKEND, saved_bytes=saved.saved_bytes, saved_beyond_input_bytes=saved.beyond_input_bytes
    )
    step = bench.with_backend(memory.make_step(module, inputs), BACKEND)
    benchmark(bench.synchronized(step, DEVICE))
