"""The measuring parts of ``fastlora.bench``: what counts as saved for backward, peak memory, the agreement checks
that guard the timings, and the choice of sizes. Expected figures are computed from shapes, never copied from a run."""

import dataclasses
import itertools
import json

import pytest
import torch
from torch import nn

from fastlora import bench
from fastlora.bench import linear, memory, multi_batch, multi_layer, multi_model, targets, train

CPU = torch.device("cpu")
GPU = torch.device("cuda")


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


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_dropout_path_is_checked_against_the_reference_before_timing(monkeypatch, backend, mode):
    """At dropout > 0 every fastlora forward shape is compared with fastlora.reference under one seed; a kernel that
    drops other elements (here: another seed) is caught."""
    case = bench.LinearCase(M=70, K=40, N=24, r=4, dtype="fp32", dropout=0.25, mode=mode)
    inputs = bench.make_linear_inputs(case, CPU)
    bench.check_agreement(case, inputs, backend)
    real = linear.lora_linear
    monkeypatch.setattr(linear, "lora_linear", lambda *a, seed=None, **kw: real(*a, seed=seed + 1, **kw))
    with pytest.raises(bench.BenchmarkMismatch, match="with dropout in y"):
        linear.check_dropout_agreement(case, inputs, backend)


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_linear_rows_count_launches_and_dispatch_time(mode):
    case = bench.LinearCase(M=8, K=32, N=16, r=4, dtype="fp32", dropout=0.1, mode=mode)
    rows = {row["contender"]: row for row in linear.measure_linear_case(case, CPU, "torch", min_run_time=0.01)}
    assert set(rows) == set(bench.linear_contender_names(case, "torch"))
    for row in rows.values():
        assert row["launches"] >= 1 and row["host_syncs"] >= 0 and row["dispatch_us"] > 0, row
        assert row["launches"] == len(row["launch_kernels"]), row  # on CPU the list is the count
        assert row["launch_bytes"] == sum(n for _, n in row["launch_kernels"]) > 0, row
        assert all(isinstance(name, str) and n >= 0 for name, n in row["launch_kernels"]), row
    json.dumps(list(rows.values()))  # results.json takes them as they are
    frozen = rows[bench.FROZEN]
    assert frozen["launches"] == (2 if mode == "fwd+bwd" else 1) and frozen["host_syncs"] == 0, frozen
    assert rows[bench.NAIVE]["launches"] > frozen["launches"]
    markdown = "\n".join(linear.linear_markdown(list(rows.values())))
    assert f"{bench.FASTLORA}: launches · dispatch" in markdown and f"| {frozen['launches']} · " in markdown


def test_linear_cases_compare_fp32_and_half_precision_adapters():
    """Every case with 16-bit activations runs with fp32 LoRA weights (PEFT's default) and with LoRA weights in the
    activations' dtype; fp32 activations with fp32 ones."""
    gpu = torch.device("cuda")
    for cases in (linear.gpu_linear_cases(), linear.gpu_linear_cases(quick=True), linear.linear_cases(gpu, headline=True),
                  linear.linear_cases(gpu, quick=True, headline=True), linear.linear_cases(CPU, headline=True)):  # fmt: skip
        loras = {}
        for case in cases:
            loras.setdefault(dataclasses.replace(case, lora_dtype=case.dtype), set()).add(case.lora_dtype)
        half = [(case, got) for case, got in loras.items() if case.dtype != "fp32"]
        assert half and all(got == {"fp32", case.dtype} for case, got in half if case.mode == "fwd+bwd"), half
    assert {c.lora_dtype for c in linear.cpu_linear_cases()} == {"fp32"}


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
    for size in train.GPU_SIZES:
        for p in (0.0, 0.1):
            full = train.TrainCase(*size, 16, "bf16", p)
            case = cases.get((full.size, p))
            if case is None:
                assert train.estimated_bytes(dataclasses.replace(full, batch=1)) > limit
                continue
            assert train.estimated_bytes(case) <= limit and case.batch <= full.batch
            if case.batch < full.batch:
                assert train.estimated_bytes(dataclasses.replace(case, batch=case.batch * 2)) > limit


# ----------------------------------------------------------------------------------------------- multi


def test_multi_layer_inputs_spread_adapters_over_the_pool_and_mix_ranks():
    case = bench.MultiCase(T=48, K=32, N=24, adapters=4, ranks=multi_batch.MIXED, slots=16, dtype="fp32")
    inputs = multi_layer.make_multi_inputs(case, CPU)
    mix = multi_batch.parse_ranks(case.ranks)
    assert inputs.batch_slots == [0, 4, 8, 12]
    assert [inputs.slot_ranks[s] for s in inputs.batch_slots] == list(mix)  # every rank of the mix in the batch
    counts = {s: inputs.token_slots.count(s) for s in inputs.batch_slots}
    assert set(inputs.token_slots) == set(inputs.batch_slots) and set(counts.values()) == {case.T // case.adapters}
    assert inputs.token_slots != sorted(inputs.token_slots)  # shuffled, not one contiguous run per adapter
    assert inputs.meta.num_segments == case.adapters and inputs.meta.max_rank == max(mix)
    for s, r in enumerate(inputs.slot_ranks):
        assert inputs.a_pool[s, :r].abs().sum() > 0 and inputs.b_pool[s, :, :r].abs().sum() > 0
        assert not inputs.a_pool[s, r:].any() and not inputs.b_pool[s, :, r:].any()


def test_multi_peft_layer_holds_the_batch_adapters():
    from peft.tuners.lora.layer import Linear as PeftLinear

    case = bench.MultiCase(T=8, K=16, N=12, adapters=3, ranks="2,4", slots=6, dtype="fp32")
    inputs = multi_layer.make_multi_inputs(case, CPU)
    layer, names = multi_layer.peft_mixed_linear(inputs)
    assert type(layer) is PeftLinear and not layer.training
    assert names == [f"slot{s}" for s in inputs.token_slots]
    assert set(layer.lora_A) == {f"slot{s}" for s in inputs.batch_slots}
    for s in inputs.batch_slots:
        r = inputs.slot_ranks[s]
        assert torch.equal(layer.lora_A[f"slot{s}"].weight, inputs.a_pool[s, :r])
        assert torch.equal(layer.lora_B[f"slot{s}"].weight, inputs.b_pool[s, :, :r])
        assert layer.scaling[f"slot{s}"] == inputs.scaling
    assert layer.base_layer.weight.data_ptr() == inputs.weight.data_ptr()


def test_multi_layer_agreement_check_catches_a_wrong_slot(monkeypatch):
    case = bench.MultiCase(T=16, K=32, N=16, adapters=4, ranks=multi_batch.MIXED, slots=8, dtype="fp32")
    inputs = multi_layer.make_multi_inputs(case, CPU)
    contenders = multi_layer.layer_contenders(case, inputs, "torch")
    multi_layer.check_layer_agreement(case, contenders)  # the real contenders agree
    base, peft = contenders[multi_layer.BASE_ONLY](), contenders[multi_batch.PEFT_MIXED]()
    assert (peft - base).abs().max() > 0.1 * base.abs().max()  # the adapters matter: the check has teeth
    real = multi_layer.multi_lora_linear

    def shifted(x, w, b, a_pool, b_pool, meta, **kw):  # every token reads the next slot's adapter
        return real(x, w, b, a_pool.roll(1, 0), b_pool.roll(1, 0), meta, **kw)

    monkeypatch.setattr(multi_layer, "multi_lora_linear", shifted)
    with pytest.raises(bench.BenchmarkMismatch, match="fastlora multi_lora_linear != PEFT mixed batch"):
        multi_layer.check_layer_agreement(case, multi_layer.layer_contenders(case, inputs, "torch"))


def test_multi_model_adapters_and_rows():
    case = next(c for c in multi_model.cpu_model_cases(quick=True) if c.ranks == multi_batch.MIXED)
    names = multi_model.batch_adapters(case)
    assert len(names) == case.adapters == len(set(names))
    mix = multi_batch.parse_ranks(case.ranks)
    assert [multi_model.adapter_rank(case, n) for n in names] == list(mix)[: case.adapters]
    rows = multi_model.row_adapters(case)
    assert len(rows) == case.batch and set(rows) == set(names)
    wide = dataclasses.replace(case, registered=64, sweep="registered")
    spread = [int(n.removeprefix("adapter")) for n in multi_model.batch_adapters(wide)]
    assert spread == sorted(spread) and spread[-1] >= wide.registered // 2  # over the whole pool, not its first slots
    with pytest.raises(ValueError, match="distinct adapters need as many rows"):
        dataclasses.replace(case, adapters=case.batch + 1, registered=case.batch + 1)
    with pytest.raises(ValueError, match="between 1 and registered"):
        dataclasses.replace(case, registered=case.adapters - 1)


def test_multi_model_matches_peft_and_the_check_compares_them():
    case = next(c for c in multi_model.cpu_model_cases(quick=True) if c.sweep == "registered")
    ids = multi_model.make_ids(case, CPU)
    with bench.forced_backend("torch"):
        want = multi_model.peft_reference(case, CPU, ids)
        mm = multi_model.build_model(case, multi_model.MULTI_MODEL, CPU)
        got = multi_model.forward_logits(mm, case, multi_model.MULTI_MODEL, ids)
        base_model = multi_model.build_model(case, multi_model.BASE_MODEL, CPU)
        base = multi_model.forward_logits(base_model, case, multi_model.BASE_MODEL, ids)
    assert sorted(mm.pool.resident) == sorted(multi_model.adapter_names(case))  # every registered adapter in a slot
    assert mm.pool.max_adapters == case.registered and not mm.pool.pinned
    multi_model.check_model_agreement(case, got, want)
    assert (want - base).abs().max() > 1e-3  # the adapters change the logits
    with pytest.raises(bench.BenchmarkMismatch, match="in logits"):
        multi_model.check_model_agreement(case, base, want)


@pytest.fixture(scope="module")
def model_rows() -> list[dict]:
    """The model level's quick CPU cases (those of ``fastlora bench --quick``), each contender timed briefly."""
    with bench.forced_backend("torch"), multi_batch.cpu_threads(CPU, 1):
        cases = multi_model.model_cases(CPU, quick=True)
        rows = [row for case in cases for row in multi_model.measure_model_case(case, CPU, min_run_time=0.01)]
    multi_model.add_registered_spread(rows)
    return rows


def test_multi_model_rows_have_every_contender_and_the_decode_step(model_rows):
    """Generate and decode-step cases time both base models and both MultiLoraModels (eager, CUDA graphs) and PEFT; a
    forward the eager ones; the registered sweep the one with CUDA graphs. Decode-step rows carry the step's time and
    host time; graph rows their counts (on a CPU nothing is captured, nothing replayed)."""
    graphs, eager = set(multi_model.GRAPH_CONTENDERS), {multi_model.BASE_MODEL, multi_batch.PEFT_MIXED,
                                                        multi_model.MULTI_EAGER}  # fmt: skip
    contenders: dict[tuple, set] = {}
    for row in model_rows:
        contenders.setdefault((row["sweep"], row["mode"]), set()).add(row["contender"])
    assert contenders == {
        ("contenders", "generate"): eager | graphs, ("contenders", "decode-step"): eager | graphs,
        ("contenders", "forward"): eager, ("registered", "generate"): {multi_model.MULTI_MODEL},
    }  # fmt: skip
    steps = [row for row in model_rows if row["mode"] == "decode-step"]
    for row in steps:
        assert row["tokens"] == row["batch"] and row["step_us"] == pytest.approx(row["median_ms"] * 1e3), row
        assert row["host_us"] > 0 and row["tokens_per_s"] == pytest.approx(row["batch"] / row["median_ms"] * 1e3)
    for row in model_rows:
        if row["contender"] in graphs:
            assert (row["captures_warmup"], row["captures_timed"], row["replays_timed"]) == (0, 0, 0), row
        else:
            assert "captures_timed" not in row, row
        if row["sweep"] == "contenders":
            assert (row["ratio_to_base"] == 1.0) == (row["contender"] == multi_model.BASE_MODEL), row
            assert row["speedup_over_peft"] > 0, row
            if row["mode"] == "forward":
                assert row["ratio_to_base_graphs"] is None, row
            else:
                assert (row["ratio_to_base_graphs"] == 1.0) == (row["contender"] == multi_model.BASE_GRAPHS), row
    markdown = "\n".join(multi_model.model_markdown(model_rows))
    for heading in ("### model", "### decode step", "### registered adapters"):
        assert f"\n{heading}\n" in f"\n{markdown}"
    for name in multi_model.MODEL_CONTENDERS:
        assert f"{name} (tokens/s)" in markdown and f"{name} (µs / step · host µs)" in markdown
    assert all(header in markdown for header in multi_model.FIGURES_HEADER)
    step_lines = [line for line in markdown.splitlines() if line.startswith("| tiny | decode-step |")]
    assert len(step_lines) == sum(c.mode == "decode-step" for c in multi_model.model_cases(CPU, quick=True)) == 1


def test_multi_serving_targets_read_the_cuda_graphs_rows(model_rows):
    """P8: ``MultiLoraModel`` with CUDA graphs over the base model with CUDA graphs in ``generate``; P7: its
    registered sweep."""
    rows = [{**row, "suite": "multi", "level": "model", "headline": True, "device_type": "cpu"} for row in model_rows]
    outcomes = {o.target.id: o for o in targets.evaluate(rows)}
    (ours,) = (r for r in rows if r["contender"] == multi_model.MULTI_MODEL and r["mode"] == "generate"
               and r["sweep"] == "contenders")  # fmt: skip
    assert outcomes["P8"].value == pytest.approx(100.0 / ours["ratio_to_base_graphs"])
    most = max((r for r in rows if r["sweep"] == "registered"), key=lambda r: r["registered"])
    assert outcomes["P7"].value == pytest.approx(100.0 * (1.0 - most["throughput_vs_fewest_registered"]))
    assert outcomes["P7"].status == outcomes["P8"].status == targets.NOT_GPU


def test_multi_decode_steps_use_the_rows_adapters_and_cycle_over_the_same_positions():
    """A decode step of each fastlora contender matches PEFT's; after ``new_tokens`` steps the cache is rewound to the
    prompt, so the next step repeats the first (and the steps never overflow the cache)."""
    case = next(c for c in multi_model.model_cases(CPU, quick=True) if c.mode == "decode-step")
    ids = multi_model.make_ids(case, CPU)
    first = {}
    with bench.forced_backend("torch"):
        for name in (multi_batch.PEFT_MIXED, *multi_model.MULTI_MODELS, multi_model.BASE_MODEL):
            step = multi_model.model_step(multi_model.build_model(case, name, CPU), case, name, ids)
            logits = [step().clone() for _ in range(2 * case.new_tokens + 1)]
            assert logits[0].shape == (case.batch, 1, case.vocab)
            assert not torch.equal(logits[0], logits[1])  # the next position, not the same step again
            assert torch.equal(logits[case.new_tokens], logits[0]) and torch.equal(logits[-1], logits[0])
            first[name] = logits[0]
    for name in multi_model.MULTI_MODELS:
        multi_model.check_model_agreement(case, first[name], first[multi_batch.PEFT_MIXED], name)
    assert (first[multi_batch.PEFT_MIXED] - first[multi_model.BASE_MODEL]).abs().max() > 1e-3  # the adapters count


def test_multi_registered_spread_is_relative_to_the_fewest():
    def row(registered, tokens_per_s, **over):
        return {"level": "model", "sweep": "registered", "size": "s", "mode": "generate", "batch": 4, "seq": 8,
                "new_tokens": 4, "adapters": 2, "ranks": "16", "dtype": "fp32", "registered": registered,
                "tokens_per_s": tokens_per_s, **over}  # fmt: skip

    rows = [row(64, 90.0), row(8, 100.0), row(512, 96.0), row(8, 50.0, batch=8), row(32, 55.0, batch=8)]
    other = {"level": "model", "sweep": "contenders", "tokens_per_s": 1.0}
    multi_model.add_registered_spread([*rows, other])
    assert [r["throughput_vs_fewest_registered"] for r in rows] == [0.9, 1.0, 0.96, 1.0, 1.1]
    assert "throughput_vs_fewest_registered" not in other


def test_multi_gpu_cases_cover_the_issue_sizes():
    layer = multi_layer.gpu_layer_cases()
    assert {(c.K, c.N, c.dtype) for c in layer} == {(4096, 4096, "bf16")}
    main = [c for c in layer if c.slots == 128]
    decode = {(c.T, c.adapters, c.ranks) for c in main if c.phase == "decode"}
    for T, D, ranks in itertools.product((32, 64, 128, 256), (1, 8, 32, 128), (multi_batch.UNIFORM, multi_batch.MIXED)):
        assert ((T, D, ranks) in decode) == (D <= T)
    assert {(c.adapters, c.ranks) for c in main if c.T == 4096} == set(
        itertools.product((1, 8, 32, 128), (multi_batch.UNIFORM, multi_batch.MIXED))
    )
    assert {c.slots for c in layer} == {8, 32, 128, 512}
    target = multi_layer.MultiCase(32, 4096, 4096, 32, multi_batch.UNIFORM, 128, "bf16")
    assert target in layer and target in multi_layer.gpu_layer_cases(quick=True)
    sweep = [c for c in multi_model.gpu_model_cases() if c.sweep == "registered"]
    assert {c.registered for c in sweep} == {8, 32, 128, 512}
    assert len({dataclasses.replace(c, registered=512) for c in sweep}) == 1  # only the number registered changes
    assert {c.mode for c in multi_model.gpu_model_cases() if c.sweep == "contenders"} == set(multi_model.MODES)
    steps = [c for c in multi_model.gpu_model_cases() if c.mode == "decode-step"]
    assert {c.size for c in steps} == {"160M", "1.1B"}
    assert {(c.batch, c.seq, c.new_tokens, c.adapters) for c in steps} == {(32, 128, 32, 32)}
    assert any(c.mode == "decode-step" for c in multi_model.gpu_model_cases(quick=True))
    for headline in multi_model.model_cases(GPU, headline=True):  # what P7 and P8 read, nothing else
        want = [multi_model.MULTI_MODEL] if headline.sweep == "registered" else list(multi_model.GRAPH_CONTENDERS)
        assert multi_model.model_contender_names(headline, headline=True) == want
