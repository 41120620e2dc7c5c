"""pytest-benchmark over the train suite's quick case: one test per contender that times one optimizer step of a
small Llama-style model, after checking its loss and LoRA-gradient norm against PEFT's. ``fastlora bench --suite
train`` writes the tables."""

import functools

import pytest
from bench_params import contender_params

from fastlora import bench
from fastlora.bench import train

DEVICE = bench.bench_device()
BACKEND = bench.bench_backend(DEVICE)
CASES = bench.train_cases(DEVICE, quick=True)


@functools.cache
def peft_reference(case: bench.TrainCase) -> dict:
    with bench.forced_backend(BACKEND):
        model = train.build_model(case, train.PEFT_MODEL, DEVICE)
        return train.reference_values(model, train.make_batch(case, DEVICE))


@pytest.mark.parametrize("case, name", contender_params(CASES, lambda case: train.CONTENDERS))
def test_train(benchmark, case, name):
    batch = train.make_batch(case, DEVICE)
    with bench.forced_backend(BACKEND):
        model = train.build_model(case, name, DEVICE)
        train.check_train_agreement(case, name, train.reference_values(model, batch), peft_reference(case))
    benchmark.group = f"train-{case.label}"
    benchmark.extra_info.update(backend=BACKEND, tokens=case.tokens)
    step = bench.with_backend(train.make_step(model, train.optimizer(model), batch), BACKEND)
    benchmark(bench.synchronized(step, DEVICE))
