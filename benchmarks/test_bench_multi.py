"""pytest-benchmark over the multi suite's quick cases: one test per (case, contender) of the multi-adapter layer
(base-only GEMM, PEFT's mixed batch, ``multi_lora_linear`` and its forced paths on Triton) and of the model (the
base model and ``MultiLoraModel``, each eager and with CUDA graphs, and PEFT's mixed batch; in forward, ``generate``
and decode-step cases), each fastlora contender checked against PEFT first and every call made once untimed (the
graph contenders capture their graphs then). ``fastlora bench --suite multi`` writes the tables."""

import functools

import pytest
from bench_params import contender_params

from fastlora import bench
from fastlora.bench import multi_batch, multi_layer, multi_model

DEVICE = bench.bench_device()
BACKEND = bench.bench_backend(DEVICE)
LAYER_CASES = bench.layer_cases(DEVICE, quick=True)
MODEL_CASES = bench.model_cases(DEVICE, quick=True)


@pytest.fixture(autouse=True, scope="module")
def _threads():
    """As ``fastlora bench`` runs the suite: on CPU, one torch thread (see ``multi_batch.cpu_threads``)."""
    with multi_batch.cpu_threads(DEVICE, 1):
        yield


@functools.cache
def layer_contenders(case: bench.MultiCase) -> dict:
    """The case's inputs and contenders, built and checked against PEFT's mixed batch once for all contenders."""
    contenders = multi_layer.layer_contenders(case, multi_layer.make_multi_inputs(case, DEVICE), BACKEND)
    multi_layer.check_layer_agreement(case, contenders)
    return contenders


@functools.cache
def peft_logits(case: bench.MultiModelCase):
    with bench.forced_backend(BACKEND):
        return multi_model.peft_reference(case, DEVICE, multi_model.make_ids(case, DEVICE))


@pytest.mark.parametrize(
    "case, name", contender_params(LAYER_CASES, lambda case: multi_layer.layer_contender_names(case, BACKEND))
)
def test_multi_layer(benchmark, case, name):
    benchmark.group = f"multi-{case.label}"
    benchmark.extra_info.update(backend=BACKEND, tokens=case.T, adapters=case.adapters)
    benchmark(bench.synchronized(layer_contenders(case)[name], DEVICE))


@pytest.mark.parametrize("case, name", contender_params(MODEL_CASES, multi_model.model_contender_names))
def test_multi_model(benchmark, case, name):
    ids = multi_model.make_ids(case, DEVICE)
    with bench.forced_backend(BACKEND):
        model = multi_model.build_model(case, name, DEVICE)
        if name in multi_model.MULTI_MODELS:
            logits = multi_model.forward_logits(model, case, name, ids)
            multi_model.check_model_agreement(case, logits, peft_logits(case), name)
        step = bench.with_backend(multi_model.model_step(model, case, name, ids), BACKEND)
    benchmark.group = f"multi-{case.label}"
    benchmark.extra_info.update(backend=BACKEND, tokens=case.tokens, registered=case.registered)
    step()  # pytest-benchmark does not warm up: graphs are captured here, the timed calls replay them
    benchmark(bench.synchronized(step, DEVICE))
