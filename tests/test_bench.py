"""The measuring parts of ``fastlora.bench``: what counts as saved for backward, peak memory, the agreement checks
that guard the timings, and the choice of sizes. Expected figures are computed from shapes, never copied from a run."""

import dataclasses

import pytest
import torch
from torch import nn

from fastlora import bench
from fastlora.bench import linear, memory, train

CPU = torch.device("cpu")


def _rows(case: bench.MemoryCase) -> dict[str, dict]:
    with bench.forced_backend("torch"):
        return {row["contender"]: row for row in memory.measure_case(case, CPU)}


def test_saved_for_backward_counts_storages_once_and_skips_parameters():
    x = torch.randn(32, 16, requires_grad=True)
    w = nn.Parameter(torch.randn(16, 8))
    # x·w saves x and w; x·xᵀ saves x twice (two views of one storage); sin saves its input, a new tensor
    saved = bench.saved_for_backward(lambda: (x @ w).sum() + (x @ x.t()).sum() + (x * 2).sin().sum(), x, [w])
    assert saved.input_bytes == x.numel() * x.element_size()
    assert saved.beyond_input_bytes == x.numel() * x.element_size()  # the sin input (x·2), same size as x
    with_w = bench.saved_for_backward(lambda: (x @ w).sum(), x, [])
    assert with_w.saved_bytes == (x.numel() + w.numel()) * 4 and with_w.input_bytes == x.numel() * 4


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_fastlora_saves_no_dropout_copy_and_peft_does(dtype):
    case = bench.MemoryCase(M=96, K=64, N=48, r=4, dtype=dtype, dropout=0.1)
    x_elems, lora_item = case.M * case.K, 4  # LoRA weights are fp32 for fp32 and bf16 activations
    rows = _rows(case)
    ours, patched, peft = rows[bench.FASTLORA], rows[bench.PATCHED], rows[bench.PEFT]
    # fastlora keeps x, xs = s·D(x)·Aᵀ [M, r] and the seed (one int64): nothing else of size M·K
    assert ours["input_bytes"] == x_elems * case.torch_dtype.itemsize
    assert ours["saved_bytes"] - ours["saved_beyond_input_bytes"] == ours["input_bytes"]
    assert ours["saved_beyond_input_bytes"] <= case.M * case.r * lora_item + 8
    assert patched["saved_bytes"] == ours["saved_bytes"]
    # PEFT keeps the dropped copy of x in the adapter's dtype and the M·K keep-mask
    assert peft["saved_beyond_input_bytes"] >= x_elems * lora_item + x_elems
    assert peft["x_copies"] > 1 > ours["x_copies"]


def test_dropout_costs_fastlora_one_seed_and_peft_a_copy():
    at = {p: _rows(bench.MemoryCase(M=64, K=80, N=32, r=8, dtype="fp32", dropout=p)) for p in (0.0, 0.1)}
    growth = {name: at[0.1][name]["saved_bytes"] - at[0.0][name]["saved_bytes"] for name in memory.CONTENDERS}
    assert growth[bench.FROZEN] == 0
    assert 0 <= growth[bench.FASTLORA] <= 8 and growth[bench.PATCHED] == growth[bench.FASTLORA]
    assert growth[bench.PEFT] >= 64 * 80 * 4  # at least a dropped copy of x


def test_peft_keeps_an_fp32_copy_of_half_precision_inputs():
    """bf16 activations with fp32 adapters: PEFT casts x for the LoRA branch and autograd keeps the cast copy."""
    case = bench.MemoryCase(M=64, K=48, N=32, r=4, dtype="bf16", dropout=0.0)
    rows = _rows(case)
    assert rows[bench.PEFT]["saved_beyond_input_bytes"] >= case.M * case.K * 4
    assert rows[bench.FASTLORA]["saved_beyond_input_bytes"] <= case.M * case.r * 4 + 8


def test_peak_memory_on_cpu_follows_allocations_and_frees():
    n = 1000

    def step():
        a = torch.ones(n)
        b = torch.ones(2 * n)
        del a
        c = torch.ones(n // 2)
        return b, c

    assert bench.peak_memory_bytes(step, CPU) == 3 * n * 4  # a and b alive together, c fits where a was
    assert bench.peak_memory_bytes(lambda: None, CPU) == 0


def test_linear_agreement_check_catches_wrong_math(monkeypatch):
    case = bench.LinearCase(M=8, K=32, N=16, r=4, dtype="fp32", dropout=0.0, mode="fwd+bwd")
    inputs = bench.make_linear_inputs(case, CPU)
    bench.check_agreement(case, inputs, "torch")  # the real contenders agree
    real = linear.lora_linear
    monkeypatch.setattr(linear, "lora_linear", lambda x, w, b, A, B, s, **kw: real(x, w, b, A, B, 1.5 * s, **kw))
    with pytest.raises(bench.BenchmarkMismatch, match="fastlora != naive torch in y"):
        bench.check_agreement(case, inputs, "torch")


def test_peft_contender_is_a_real_peft_layer_on_the_same_tensors():
    from peft.tuners.lora.layer import Linear as PeftLinear

    inputs = bench.make_linear_inputs(bench.LinearCase(4, 16, 8, 2, "bf16", 0.1, "fwd"), CPU)
    layer = bench.peft_lora_linear(inputs.weight, inputs.bias, inputs.lora_A, inputs.lora_B, inputs.scaling, 0.1)
    assert type(layer) is PeftLinear and layer.training
    assert layer.lora_A["default"].weight is inputs.lora_A and layer.lora_B["default"].weight is inputs.lora_B
    assert layer.base_layer.weight.data_ptr() == inputs.weight.data_ptr() and not layer.base_layer.weight.requires_grad
    assert layer.lora_dropout["default"].p == 0.1 and layer.scaling["default"] == inputs.scaling


def test_memory_agreement_check_catches_a_wrong_adapter(monkeypatch):
    case = bench.MemoryCase(M=8, K=32, N=16, r=4, dtype="fp32", dropout=0.0)
    inputs = bench.make_linear_inputs(case.as_linear(), CPU)
    real = memory.memory_modules

    def wrong_scaling(inputs, dropout):
        modules = real(inputs, dropout)
        modules[bench.FASTLORA].scaling *= 2
        return modules

    monkeypatch.setattr(memory, "memory_modules", wrong_scaling)
    with bench.forced_backend("torch"), pytest.raises(bench.BenchmarkMismatch, match="fastlora != PEFT"):
        memory.check_memory_agreement(case, inputs)


def test_train_models_start_equal_and_the_check_compares_them():
    case = train.train_cases(CPU, quick=True)[0]
    batch = train.make_batch(case, CPU)
    with bench.forced_backend("torch"):
        values = {name: train.reference_values(train.build_model(case, name, CPU), batch) for name in train.CONTENDERS}
        expected = values.pop(train.PEFT_MODEL)
        for name, got in values.items():
            train.check_train_agreement(case, name, got, expected)
        wrong = {**expected, "loss": expected["loss"] * 1.01}
        with pytest.raises(bench.BenchmarkMismatch, match="loss"):
            train.check_train_agreement(case, train.APPLY_LORA, wrong, expected)
    model = train.build_model(case, train.APPLY_LORA, CPU)
    pairs = train.lora_weights(model)
    assert len(pairs) == 7 * case.layers and all(B.abs().sum() > 0 for _, B in pairs)  # every linear, B non-zero


@pytest.mark.parametrize("gib", [16, 80, 141])
def test_gpu_train_sizes_fit_the_device(monkeypatch, gib):
    """Each GPU size runs with the largest batch (up to its own) whose estimate fits, or not at all."""
    limit = 0.8 * gib * 2**30
    monkeypatch.setattr(train, "device_memory", lambda device: gib * 2**30)
    cases = {(c.size, c.dropout): c for c in train.train_cases(torch.device("cuda"))}
    assert cases
    for size in train._GPU_SIZES:
        for p in (0.0, 0.1):
            full = train.TrainCase(*size, 16, "bf16", p)
            case = cases.get((full.size, p))
            if case is None:
                assert train.estimated_bytes(dataclasses.replace(full, batch=1)) > limit
                continue
            assert train.estimated_bytes(case) <= limit and case.batch <= full.batch
            if case.batch < full.batch:
                assert train.estimated_bytes(dataclasses.replace(case, batch=case.batch * 2)) > limit
