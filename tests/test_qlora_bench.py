"""The ``qlora`` benchmark suite on CPU: its quick run's rows, tables and plots; the agreement checks that guard its
timings; the bitsandbytes rows when bitsandbytes is missing or broken (a status, no figure, nothing measured against
them); the cases it picks per device; targets P14 to P16 read from made-up rows; and ``fastlora bench --suite qlora
--headline``. Expected figures come from the rows and shapes, never from a run."""

import contextlib
import dataclasses
import importlib.util
import io
import json

import pytest
import torch

from fastlora import bench, nf4
from fastlora.bench import qlora, targets, train
from fastlora.bench.multi_batch import cpu_threads
from fastlora.cli import main

CPU = torch.device("cpu")
GPU = torch.device("cuda")
BNB = qlora.bnb_issue("cpu") is None  # bitsandbytes runs its 4-bit layers on this CPU


@pytest.fixture(autouse=True)
def one_thread():
    """One CPU thread, as the suite runs: the small shapes' calls are too short to share between threads."""
    with cpu_threads(CPU, 1):
        yield


@pytest.fixture(scope="module")
def quick_rows() -> list[dict]:
    """The rows ``fastlora bench --quick --suite qlora`` measures on CPU (the environment left out)."""
    return bench.SUITES["qlora"].run(CPU, quick=True)


def test_quick_run_has_every_contender_and_figure(quick_rows):
    by_level: dict[str, list[dict]] = {}
    for row in quick_rows:
        runs = BNB or row["contender"] not in qlora.BNB_CONTENDERS
        assert row["suite"] == "qlora" and row["status"] == ("ok" if runs else qlora.bnb_issue("cpu")), row
        by_level.setdefault(row["level"], []).append(row)
    assert set(by_level) == {"layer", "train"}
    layer_cases, (train_case,) = qlora.qlora_layer_cases(CPU, quick=True), qlora.qlora_train_cases(CPU, quick=True)
    assert [row["contender"] for row in by_level["layer"]] == list(qlora.LAYER_CONTENDERS) * len(layer_cases)
    assert [row["contender"] for row in by_level["train"]] == list(qlora.TRAIN_CONTENDERS)
    assert {row["mode"] for row in by_level["layer"]} == set(qlora.MODES)
    for case in layer_cases:
        rows = [row for row in by_level["layer"] if row["M"] == case.M and row["mode"] == case.mode]
        assert all({k: row[k] for k in dataclasses.asdict(case)} == dataclasses.asdict(case) for row in rows)
        named = {row["contender"]: row for row in rows if row["status"] == "ok"}
        frozen, lora, peft = named[bench.FROZEN], named[qlora.LORA], named.get(qlora.BNB_PEFT)
        for row in named.values():
            assert 0 < row["p20_ms"] <= row["median_ms"] <= row["p80_ms"] and row["peak_bytes"] > 0, row
            assert row["ratio_to_frozen"] == pytest.approx(row["median_ms"] / frozen["median_ms"]), row
            assert row["ratio_to_lora"] == pytest.approx(row["median_ms"] / lora["median_ms"]), row
            if peft:
                assert row["speedup_over_peft"] == pytest.approx(peft["median_ms"] / row["median_ms"]), row
        # 4 bits per weight, a byte per 64-weight block, the nested scales and the code tables
        four_bit = case.N * case.K // 2 + case.N * case.K // 64
        assert frozen["weight_bytes"] == lora["weight_bytes"] == case.N * case.K * 2
        for name in (qlora.QLORA, qlora.FROZEN_4BIT, qlora.BNB_PEFT):
            if name in named:
                assert four_bit < named[name]["weight_bytes"] < four_bit + 2048, name
    ok = [row for row in by_level["train"] if row["status"] == "ok"]
    lora = next(row for row in ok if row["contender"] == qlora.LORA)
    for row in ok:
        assert row["tokens_per_s"] == pytest.approx(train_case.tokens / row["median_ms"] * 1e3), row
        assert row["params"] == lora["params"] and row["peak_step_bytes"] > 0, row  # 4-bit weights counted as weights
        assert row["ratio_to_lora"] == pytest.approx(row["median_ms"] / lora["median_ms"]), row
        if row["contender"] != qlora.LORA:  # the 4-bit weights, buffers or not, are counted: fewer bytes than bf16
            assert 0 < row["state_bytes"] < lora["state_bytes"], row
    json.dumps(quick_rows)  # results.json takes them as they are


def test_tables_and_plots(quick_rows, tmp_path):
    env = bench.environment(CPU, quick=True)
    rows = [{**row, **env} for row in quick_rows]
    written = bench.write_results(rows, tmp_path, merge=False)
    assert {path.name for path in written.plots} == {qlora.LAYER_PLOT, qlora.TRAIN_PLOT}
    markdown = written.markdown.read_text()
    assert "\n## qlora\n" in markdown and "\n### layer\n" in markdown and "\n### train\n" in markdown
    assert bench.CPU_DISCLAIMER in markdown
    for name in (*qlora.LAYER_CONTENDERS, *qlora.TRAIN_CONTENDERS, f"speedup over {qlora.BNB_PEFT}", "/ LoRA"):
        assert name in markdown, name
    lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    headers = [line for line in lines if line.startswith(("| M |", "| size |", "| ---"))]
    assert len(lines) - len(headers) == len(rows)  # a line per (case, contender)
    for plot in written.plots:
        assert plot.read_bytes()[:4] == b"\x89PNG" and f"]({plot.name})" in markdown


@pytest.fixture(scope="module")
def layer_setup():
    """The quick fwd+bwd CPU layer case, its inputs, its 4-bit weight and that weight dequantized."""
    case = next(c for c in qlora.qlora_layer_cases(CPU, quick=True) if c.mode == "fwd+bwd")
    inputs = bench.make_linear_inputs(case.as_linear(), CPU)
    qweight = nf4.quantize(inputs.weight, **qlora.QUANTIZATION)
    return case, inputs, qweight, qweight.dequantize(case.torch_dtype)


def test_layer_contenders_share_the_weights_and_agree(layer_setup):
    """Every contender holds the case's own LoRA factors and 4-bit bytes (bitsandbytes' too: ``nf4.to_bnb``), and
    passes its agreement check; the adapter and the quantization both change the output."""
    case, inputs, qweight, dequantized = layer_setup
    for name in qlora.LAYER_CONTENDERS[1:]:
        if name == qlora.BNB_PEFT and not BNB:
            continue
        contender = qlora.layer_contender(name, case, inputs, qweight, "torch")
        qlora.check_layer_agreement(case, inputs, dequantized, name, contender.forward)
    if BNB:
        layer = qlora.peft_qlora_linear(qlora.bnb_linear4bit(qweight, inputs.bias, case.torch_dtype), inputs.lora_A,
                                        inputs.lora_B, inputs.scaling)  # fmt: skip
        assert layer.lora_A["default"].weight is inputs.lora_A and layer.lora_B["default"].weight is inputs.lora_B
        assert layer.get_base_layer().weight.data_ptr() == qweight.data.data_ptr()
    results = {
        (weight is dequantized, lora): qlora.layer_results(case, inputs, qlora.formula(case, inputs, weight, lora))["y"]
        for weight in (inputs.weight, dequantized)
        for lora in (False, True)
    }
    scale = results[False, False].abs().max()
    assert (results[False, True] - results[False, False]).abs().max() > 0.05 * scale  # the adapter matters
    assert (results[True, False] - results[False, False]).abs().max() > 0.01 * scale  # so does the quantization


@pytest.mark.parametrize("wrong", ["no adapter", "other factors"])
def test_layer_agreement_check_catches_a_contender_computing_something_else(layer_setup, wrong):
    """QLoRA without its adapter, or with other LoRA factors, is refused."""
    case, inputs, qweight, dequantized = layer_setup
    if wrong == "no adapter":
        forward = qlora.layer_contender(qlora.FROZEN_4BIT, case, inputs, qweight, "torch").forward
    else:
        other = dataclasses.replace(inputs, lora_A=torch.nn.Parameter(inputs.lora_A.detach().roll(1, 0)))
        forward = qlora.layer_contender(qlora.QLORA, case, other, qweight, "torch").forward
    with pytest.raises(bench.BenchmarkMismatch, match=f"{qlora.QLORA} != PEFT's formula over its weight in y"):
        qlora.check_layer_agreement(case, inputs, dequantized, qlora.QLORA, forward)


@pytest.mark.skipif(not BNB, reason="bitsandbytes does not run 4-bit layers here")
def test_train_contenders_agree_and_the_check_catches_other_weights():
    """bitsandbytes + PEFT (PEFT's QLoRA layers, over the same bytes), patched or not, and fastlora QLoRA compute the
    same step; other LoRA weights are refused."""
    from peft.tuners.lora.bnb import Linear4bit

    (case,) = qlora.qlora_train_cases(CPU, quick=True)
    batch = train.make_batch(case, CPU)
    with bench.forced_backend("torch"):
        peft_model = qlora.build_qlora_model(case, qlora.BNB_PEFT, CPU)
        assert sum(isinstance(m, Linear4bit) for m in peft_model.modules()) == case.layers * len(qlora.ADAPTED)
        expected = qlora.reference_values(peft_model, batch)
        model = qlora.build_qlora_model(case, qlora.QLORA, CPU)
        assert set(qlora.lora_factors(model)) == set(qlora.lora_factors(peft_model))
        train.check_train_agreement(case, qlora.QLORA, qlora.reference_values(model, batch), expected)
        qlora.set_lora_weights(model, seed=7)
        got = qlora.reference_values(model, batch)
    with pytest.raises(bench.BenchmarkMismatch, match=f"{qlora.QLORA} != PEFT"):
        train.check_train_agreement(case, qlora.QLORA, got, expected)


def test_bnb_issue_says_why(monkeypatch):
    """Not installed, or installed but failing on the device: the reason, never an exception."""
    find_spec = importlib.util.find_spec
    qlora.bnb_issue.cache_clear()
    try:
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else
                            find_spec(name, *a))  # fmt: skip
        assert qlora.bnb_issue("cpu") == qlora.BNB_MISSING == "bitsandbytes not installed"
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
        qlora.bnb_issue.cache_clear()

        def broken(*args):
            raise RuntimeError("no kernel for this device")

        monkeypatch.setattr(qlora, "bnb_linear4bit", broken)
        issue = qlora.bnb_issue("cpu")
        assert (
            issue.startswith("bitsandbytes does not run on cpu (RuntimeError: no kernel") and issue != qlora.BNB_MISSING
        )
    finally:
        qlora.bnb_issue.cache_clear()


def test_without_bitsandbytes_its_rows_say_so_and_nothing_is_measured_against_them(monkeypatch, tmp_path):
    """A decode case and the train case with bitsandbytes missing: its rows carry the status and no figure, every
    ratio to them is None, the tables say so and the plots leave them out."""
    monkeypatch.setattr(qlora, "bnb_issue", lambda device_type: qlora.BNB_MISSING)
    case = next(c for c in qlora.qlora_layer_cases(CPU, quick=True) if c.mode == "decode")
    (train_case,) = qlora.qlora_train_cases(CPU, quick=True)
    with bench.forced_backend("torch"):
        rows = [{"suite": "qlora", "level": "layer", **row} for row in qlora.measure_layer_case(case, CPU, 0.01)]
        rows += [{"suite": "qlora", "level": "train", **row} for row in qlora.measure_train_case(train_case, CPU, 0.01)]
    missing = [row for row in rows if row["contender"] in qlora.BNB_CONTENDERS]
    assert len(missing) == 3 and all(row["status"] == qlora.BNB_MISSING for row in missing)
    assert not any(key in row for row in missing for key in ("median_ms", "peak_bytes", "tokens_per_s"))
    assert all(row["status"] == "ok" and row["speedup_over_peft"] is None for row in rows if row not in missing)
    assert all(row.get("peak_over_peft") is None for row in rows)
    assert all(row["ratio_to_lora"] is not None for row in rows if row not in missing)
    written = bench.write_results([{**row, **bench.environment(CPU)} for row in rows], tmp_path, merge=False)
    markdown = written.markdown.read_text()
    assert markdown.count(f"| {qlora.BNB_MISSING} |") == 3 and len(written.plots) == 2
    outcomes = {o.target.id: o for o in targets.evaluate([{**row, "headline": True, "device_type": "cuda"}
                                                          for row in rows])}  # fmt: skip
    assert outcomes["P14"].status == targets.NOT_MEASURED and outcomes["P16"].value is not None


def _row(contender: str, mode: str = "fwd+bwd", M: int = 4096, **figures) -> dict:
    case = dataclasses.asdict(qlora.QloraLayerCase(M, 4096, 4096, 16, "bf16", mode))
    return {"suite": "qlora", "level": "layer", "contender": contender, **case, "headline": True, "device": "a GPU",
            "device_type": "cuda", "status": "ok", **figures}  # fmt: skip


def test_qlora_targets_read_the_qlora_layer_rows():
    """P14 and P15 read fastlora QLoRA's fwd+bwd rows, P16 its decode rows (strictly under 1×), never another
    contender or level; without a bitsandbytes figure P14 is not measured, never met or missed."""
    rows = [
        _row(bench.FROZEN, speedup_over_peft=9.0, ratio_to_lora=0.5),
        _row(qlora.LORA, speedup_over_peft=3.0, ratio_to_lora=1.0),
        _row(qlora.QLORA, speedup_over_peft=2.4, ratio_to_lora=1.2),
        _row(qlora.FROZEN_4BIT, speedup_over_peft=0.1, ratio_to_lora=9.0),
        _row(qlora.BNB_PEFT, speedup_over_peft=1.0, ratio_to_lora=4.0),
        _row(qlora.QLORA, "decode", 16, speedup_over_peft=5.0, ratio_to_lora=0.6),
        {**_row(qlora.QLORA, speedup_over_peft=0.1, ratio_to_lora=0.1), "level": "train"},
    ]
    outcomes = {o.target.id: o for o in targets.evaluate(rows)}
    got = {id_: (outcomes[id_].value, outcomes[id_].status) for id_ in ("P14", "P15", "P16")}
    assert got == {"P14": (2.4, targets.MET), "P15": (1.2, targets.MISSED), "P16": (0.6, targets.MET)}
    assert outcomes["P14"].where == "M=4096 K=4096 N=4096 r=16 mode=fwd+bwd"
    assert outcomes["P16"].where.startswith("M=16 ") and outcomes["P1"].status == targets.NOT_MEASURED

    even = [_row(qlora.QLORA, "decode", 16, ratio_to_lora=1.0)]
    assert {o.target.id: o.status for o in targets.evaluate(even)}["P16"] == targets.MISSED  # not faster: missed
    no_bnb = [{**row, "speedup_over_peft": None} for row in rows if row["contender"] != qlora.BNB_PEFT]
    no_bnb.append({**_row(qlora.BNB_PEFT), "status": qlora.BNB_MISSING})
    statuses = {o.target.id: o.status for o in targets.evaluate(no_bnb)}
    assert statuses["P14"] == targets.NOT_MEASURED and statuses["P15"] == targets.MISSED
    cpu = {o.target.id: o.status for o in targets.evaluate([{**row, "device_type": "cpu"} for row in rows])}
    assert cpu["P14"] == cpu["P15"] == cpu["P16"] == targets.NOT_GPU
    earlier = {o.target.id: o.status for o in targets.evaluate([{**row, "headline": False} for row in rows])}
    assert earlier["P14"] == earlier["P16"] == targets.NOT_MEASURED
    table = dict(targets.parse_targets_table(targets.format_targets(no_bnb)))
    assert table["P14"][2:4] == ["", targets.NOT_MEASURED] and table["P16"][2] == "0.600×"


@pytest.mark.parametrize("gib", [24, 139])
def test_gpu_cases(monkeypatch, gib):
    """K = N = 4096 bf16 at r = 16: fwd+bwd over 16 and 4096 tokens and decode over 16; quick and headline runs the
    targets' two; the train level is one small Llama-style model, in no headline run."""
    monkeypatch.setattr(qlora, "device_memory", lambda device: gib * 2**30)
    cases = qlora.qlora_layer_cases(GPU)
    assert [(c.M, c.mode) for c in cases] == [(16, "fwd+bwd"), (4096, "fwd+bwd"), (16, "decode")]
    assert {(c.K, c.N, c.r, c.dtype, c.lora_dtype) for c in cases} == {(4096, 4096, 16, "bf16", "fp32")}
    assert qlora.qlora_layer_cases(GPU, headline=True) == qlora.qlora_layer_cases(GPU, quick=True) == cases[1:]
    (case,) = qlora.qlora_train_cases(GPU)
    assert (case.hidden, case.layers, case.r, case.dtype, case.dropout, case.seq) == (2048, 4, 16, "bf16", 0.0, 1024)
    assert case.batch == (4 if gib > 24 else train.fit_batch(case, gib * 2**30).batch) and case.batch >= 1
    assert qlora.qlora_train_cases(GPU, quick=True)[0].seq == 512
    assert qlora.qlora_train_cases(GPU, headline=True) == qlora.qlora_train_cases(CPU, headline=True) == []


def test_cli_headline_run_measures_the_target_cases(tmp_path):
    """``fastlora bench --suite qlora --quick --headline``: the layer level's two target cases without the 4-bit
    frozen layer, which no target reads; no train rows, no plot (``./dev gpu`` brings back at most 8 files);
    targets.md with P14 to P16 valued on CPU but not decided."""
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["bench", "--suite", "qlora", "--quick", "--headline", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert {row["level"] for row in rows} == {"layer"} and all(row["headline"] for row in rows)
    assert [row["contender"] for row in rows] == list(qlora.HEADLINE_CONTENDERS) * 2  # no 4-bit frozen layer
    assert not list(tmp_path.glob("*.png"))
    assert "\n## qlora\n" in stdout.getvalue() and str(tmp_path / "targets.md") in stdout.getvalue()
    table = dict(targets.parse_targets_table((tmp_path / "targets.md").read_text()))
    for id_ in ("P14", "P15", "P16") if BNB else ("P15", "P16"):
        assert table[id_][2] and table[id_][3] == targets.NOT_GPU, table[id_]
