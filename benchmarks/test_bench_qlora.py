"""pytest-benchmark over the qlora suite's quick cases: one test per contender that times one call of a QLoRA layer
(forward+backward, or a decode forward) or one optimizer step of a small Llama-style model over an NF4 base, after
checking it. A bitsandbytes contender that cannot run here is skipped with the reason. ``fastlora bench --suite
qlora`` writes the tables."""

import functools

import pytest
from bench_params import contender_params

from fastlora import bench, nf4
from fastlora.bench import qlora, train
from fastlora.bench.multi_batch import cpu_threads

DEVICE = bench.bench_device()
BACKEND = bench.bench_backend(DEVICE)
LAYER_CASES = bench.qlora_layer_cases(DEVICE, quick=True)
TRAIN_CASES = bench.qlora_train_cases(DEVICE, quick=True)


@pytest.fixture(autouse=True)
def one_thread():
    """One CPU thread, as the suite runs: a small layer's calls are too short to share between threads."""
    with cpu_threads(DEVICE, 1):
        yield


def skip_without_bitsandbytes(name: str) -> None:
    if name in qlora.BNB_CONTENDERS and (issue := qlora.bnb_issue(DEVICE.type)):
        pytest.skip(issue)


@functools.cache
def layer_setup(case: bench.QloraLayerCase) -> tuple:
    """The case's inputs, the 4-bit weight and its dequantization, built once for all its contenders."""
    inputs = bench.make_linear_inputs(case.as_linear(), DEVICE)
    qweight = nf4.quantize(inputs.weight, **qlora.QUANTIZATION)
    return inputs, qweight, qweight.dequantize(case.torch_dtype)


@pytest.mark.parametrize("case, name", contender_params(LAYER_CASES, lambda case: qlora.LAYER_CONTENDERS))
def test_qlora_layer(benchmark, case, name):
    skip_without_bitsandbytes(name)
    inputs, qweight, dequantized = layer_setup(case)
    contender = qlora.layer_contender(name, case, inputs, qweight, BACKEND)
    if name != bench.FROZEN:
        qlora.check_layer_agreement(case, inputs, dequantized, name, contender.forward)
    benchmark.group = f"qlora-layer-{case.label}"
    benchmark.extra_info.update(backend=BACKEND, weight_bytes=contender.weight_bytes)
    step = bench.with_backend(qlora.layer_step(contender.forward, inputs, case.mode), BACKEND)
    benchmark(bench.synchronized(step, DEVICE))


@functools.cache
def first_reference(case: bench.TrainCase) -> dict:
    """The loss and LoRA-gradient norm the 4-bit contenders are checked against: bitsandbytes + PEFT's, or fastlora
    QLoRA's where bitsandbytes cannot run."""
    name = qlora.QLORA if qlora.bnb_issue(DEVICE.type) else qlora.BNB_PEFT
    with bench.forced_backend(BACKEND):
        model = qlora.build_qlora_model(case, name, DEVICE)
        return qlora.reference_values(model, train.make_batch(case, DEVICE))


@pytest.mark.parametrize("case, name", contender_params(TRAIN_CASES, lambda case: qlora.TRAIN_CONTENDERS))
def test_qlora_train(benchmark, case, name):
    skip_without_bitsandbytes(name)
    batch = train.make_batch(case, DEVICE)
    with bench.forced_backend(BACKEND):
        model = qlora.build_qlora_model(case, name, DEVICE)
        if name != qlora.LORA:  # the bf16 model computes over another weight
            train.check_train_agreement(case, name, qlora.reference_values(model, batch), first_reference(case))
    benchmark.group = f"qlora-train-{case.label}"
    benchmark.extra_info.update(backend=BACKEND, tokens=case.tokens)
    step = bench.with_backend(train.make_step(model, train.optimizer(model), batch), BACKEND)
    benchmark(bench.synchronized(step, DEVICE))
