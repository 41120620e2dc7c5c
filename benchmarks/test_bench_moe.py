"""pytest-benchmark over the moe suite's quick cases: one test per contender that times a forward+backward of one
sparse MoE block (LoRA on its experts) or one optimizer step of a small Qwen3-MoE-style model, after checking it
against PEFT's. ``fastlora bench --suite moe`` writes the tables."""

import functools

import pytest
from bench_params import contender_params

from fastlora import bench
from fastlora.bench import moe, train

DEVICE = bench.bench_device()
BACKEND = bench.bench_backend(DEVICE)
BLOCK_CASES = bench.moe_block_cases(DEVICE, quick=True)
TRAIN_CASES = bench.moe_train_cases(DEVICE, quick=True)


@functools.cache
def block_setup(case: bench.MoeBlockCase) -> tuple:
    """The case's base block and inputs, built once for all its contenders, and PEFT's results on them."""
    base, inputs = moe.build_block(case, DEVICE), moe.make_block_inputs(case, DEVICE)
    with bench.forced_backend(BACKEND):
        expected = moe.block_results(moe.block_contender(base, case, moe.PEFT_MODEL), inputs)
    return base, inputs, expected


@pytest.mark.parametrize("case, name", contender_params(BLOCK_CASES, lambda case: moe.BLOCK_CONTENDERS))
def test_moe_block(benchmark, case, name):
    base, inputs, expected = block_setup(case)
    with bench.forced_backend(BACKEND):
        block = moe.block_contender(base, case, name)
        if name != moe.FROZEN_BLOCK:
            moe.check_block_agreement(case, name, moe.block_results(block, inputs), expected)
    benchmark.group = f"moe-block-{case.label}"
    benchmark.extra_info.update(backend=BACKEND, tokens=case.tokens)
    benchmark(bench.synchronized(bench.with_backend(moe.make_block_step(block, inputs), BACKEND), DEVICE))


@functools.cache
def peft_reference(case: bench.MoeTrainCase) -> dict:
    with bench.forced_backend(BACKEND):
        model = moe.build_moe_model(case, moe.PEFT_MODEL, DEVICE)
        return moe.reference_values(model, moe.make_batch(case, DEVICE))


@pytest.mark.parametrize("case, name", contender_params(TRAIN_CASES, lambda case: moe.TRAIN_CONTENDERS))
def test_moe_train(benchmark, case, name):
    batch = moe.make_batch(case, DEVICE)
    with bench.forced_backend(BACKEND):
        model = moe.build_moe_model(case, name, DEVICE)
        moe.check_train_agreement(case, name, moe.reference_values(model, batch), peft_reference(case))
    benchmark.group = f"moe-train-{case.label}"
    benchmark.extra_info.update(backend=BACKEND, tokens=case.tokens)
    step = bench.with_backend(train.make_step(model, train.optimizer(model), batch), BACKEND)
    benchmark(bench.synchronized(step, DEVICE))
