"""The ``moe`` benchmark suite on CPU: its quick run's rows, tables and plots; the agreement checks that guard its
timings (they pass for the real contenders and catch one that computes something else); the cases it picks per device;
and targets P11 to P13 read from its rows. Expected figures come from the rows and shapes, never from a run."""

import dataclasses
import json

import pytest
import torch

from fastlora import bench
from fastlora.bench import moe, targets

CPU = torch.device("cpu")
GPU = torch.device("cuda")
BLOCK_FIELDS = {f.name for f in dataclasses.fields(moe.MoeBlockCase)}
TRAIN_FIELDS = {f.name for f in dataclasses.fields(moe.MoeTrainCase)}


@pytest.fixture(scope="module")
def quick_rows() -> list[dict]:
    """The rows ``fastlora bench --quick --suite moe`` measures on CPU (the environment left out)."""
    return bench.SUITES["moe"].run(CPU, quick=True)


def test_quick_run_has_every_contender_and_figure(quick_rows):
    by_level: dict[str, list[dict]] = {}
    for row in quick_rows:
        assert row["suite"] == "moe" and row["status"] == "ok", row
        by_level.setdefault(row["level"], []).append(row)
    assert set(by_level) == {"block", "train"}
    (block_case,) = moe.moe_block_cases(CPU, quick=True)
    (train_case,) = moe.moe_train_cases(CPU, quick=True)
    block, train = by_level["block"], by_level["train"]
    assert [row["contender"] for row in block] == list(moe.BLOCK_CONTENDERS)
    assert [row["contender"] for row in train] == list(moe.TRAIN_CONTENDERS)
    for rows, case in ((block, block_case), (train, train_case)):
        for row in rows:
            assert {k: row[k] for k in dataclasses.asdict(case)} == dataclasses.asdict(case), row
            assert row["shape"] == case.shape and 0 < row["p20_ms"] <= row["median_ms"] <= row["p80_ms"], row
            assert row["tokens_per_s"] == pytest.approx(case.tokens / row["median_ms"] * 1e3), row
    named = {row["contender"]: row for row in block}
    frozen, peft = named[moe.FROZEN_BLOCK], named[moe.PEFT_MODEL]
    for row in block:
        assert row["peak_bytes"] > 0, row
        assert row["ratio_to_frozen"] == pytest.approx(row["median_ms"] / frozen["median_ms"]), row
        assert row["speedup_over_peft"] == pytest.approx(peft["median_ms"] / row["median_ms"]), row
        assert row["peak_over_peft"] == pytest.approx(row["peak_bytes"] / peft["peak_bytes"]), row
    assert frozen["ratio_to_frozen"] == peft["speedup_over_peft"] == peft["peak_over_peft"] == 1.0
    for row in train:
        assert row["params"] > 0 and row["state_bytes"] > 0 and row["peak_step_bytes"] > 0, row
        assert row["speedup_over_peft"] > 0 and row["peak_over_peft"] > 0, row
    json.dumps(quick_rows)  # results.json takes them as they are


def test_tables_and_plots(quick_rows, tmp_path):
    env = bench.environment(CPU, quick=True)
    rows = [{**row, **env} for row in quick_rows]
    written = bench.write_results(rows, tmp_path, merge=False)
    assert {path.name for path in written.plots} == {moe.BLOCK_PLOT, moe.TRAIN_PLOT}
    markdown = written.markdown.read_text()
    assert "\n## moe\n" in markdown and "\n### block\n" in markdown and "\n### train\n" in markdown
    for name in (*moe.BLOCK_CONTENDERS, *moe.TRAIN_CONTENDERS, "speedup over PEFT", "peak / PEFT", "/ frozen"):
        assert name in markdown, name
    lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    headers = [line for line in lines if line.startswith(("| size |", "| ---"))]
    assert len(lines) - len(headers) == len(rows)  # a line per (case, contender)
    for plot in written.plots:
        assert plot.read_bytes()[:4] == b"\x89PNG" and f"]({plot.name})" in markdown


@pytest.fixture(scope="module")
def block_setup():
    """The quick CPU block case, its base block and inputs, and PEFT's results on them."""
    (case,) = moe.moe_block_cases(CPU, quick=True)
    base, inputs = moe.build_block(case, CPU), moe.make_block_inputs(case, CPU)
    with bench.forced_backend("torch"):
        expected = moe.block_results(moe.block_contender(base, case, moe.PEFT_MODEL), inputs)
    return case, base, inputs, expected


def test_block_contenders_share_weights_and_agree(block_setup):
    """Every adapted block holds the base block's own weight tensors and the same LoRA weights (in the common
    layout); its output and gradients match PEFT's, and the adapters change the output."""
    case, base, inputs, expected = block_setup
    base_weights = {name: param.data_ptr() for name, param in base.named_parameters()}
    with bench.forced_backend("torch"):
        frozen = moe.block_results(moe.block_contender(base, case, moe.FROZEN_BLOCK), inputs)
        factors = {}
        for name in (moe.PEFT_MODEL, moe.APPLY_LORA, moe.PATCHED):
            block = moe.block_contender(base, case, name)
            pairs = moe.lora_pairs(block)
            assert set(pairs) == {f"experts.{p}" for p in moe.EXPERT_PARAMETERS}
            factors[name] = {key: pair.common(pair.lora_A, pair.lora_B) for key, pair in pairs.items()}
            weights = {n.rpartition(".")[2]: p.data_ptr() for n, p in block.named_parameters() if not p.requires_grad}
            assert set(weights.values()) == set(base_weights.values()), name
            if name != moe.PEFT_MODEL:
                moe.check_block_agreement(case, name, moe.block_results(block, inputs), expected)
    for got in factors.values():
        for key, (a, b) in got.items():
            assert b.abs().sum() > 0
            assert torch.equal(a, factors[moe.PEFT_MODEL][key][0]) and torch.equal(b, factors[moe.PEFT_MODEL][key][1])
    assert (expected["y"] - frozen["y"]).abs().max() > 0.05 * frozen["y"].abs().max()  # the adapters matter
    assert set(expected) == {"y", "dx", *(f"experts.{p} lora_{f}" for p in moe.EXPERT_PARAMETERS for f in "AB")}


@pytest.mark.parametrize("wrong", ["other weights", "experts rolled"])
def test_block_agreement_check_catches_a_contender_computing_something_else(block_setup, wrong):
    """fastlora with other LoRA weights, or with each expert's adapter moved to the next expert, is refused."""
    case, base, inputs, expected = block_setup
    with bench.forced_backend("torch"):
        block = moe.block_contender(base, case, moe.APPLY_LORA)
        if wrong == "other weights":
            moe.set_lora_weights(block, seed=7)
        else:
            with torch.no_grad():
                for pair in moe.lora_pairs(block).values():
                    pair.lora_A.copy_(pair.lora_A.roll(1, 0))
        got = moe.block_results(block, inputs)
    with pytest.raises(bench.BenchmarkMismatch, match=f"{moe.APPLY_LORA} != {moe.PEFT_MODEL} in y"):
        moe.check_block_agreement(case, moe.APPLY_LORA, got, expected)
    missing = {key: value for key, value in expected.items() if "down_proj" not in key}
    with pytest.raises(bench.BenchmarkMismatch, match="adapts"):
        moe.check_block_agreement(case, moe.APPLY_LORA, missing, expected)


def test_train_agreement_check_catches_other_weights():
    (case,) = moe.moe_train_cases(CPU, quick=True)
    batch = moe.make_batch(case, CPU)
    with bench.forced_backend("torch"):
        expected = moe.reference_values(moe.build_moe_model(case, moe.PEFT_MODEL, CPU), batch)
        model = moe.build_moe_model(case, moe.APPLY_LORA, CPU)
        pairs = moe.lora_pairs(model)
        assert len(pairs) == case.layers * (len(moe.ATTENTION) + len(moe.EXPERT_PARAMETERS))
        moe.check_train_agreement(case, moe.APPLY_LORA, moe.reference_values(model, batch), expected)
        moe.set_lora_weights(model, seed=7)
        got = moe.reference_values(model, batch)
    with pytest.raises(bench.BenchmarkMismatch, match=f"{moe.APPLY_LORA} != {moe.PEFT_MODEL}"):
        moe.check_train_agreement(case, moe.APPLY_LORA, got, expected)


@pytest.mark.parametrize("gib", [24, 80, 139])
def test_gpu_cases_cover_the_issue_grid_and_fit(monkeypatch, gib):
    """bf16, r = 16, E in {8, 64, 128}, top-k in {2, 8}, H 2048 to 4096, I 768 to 14336, 4096 to 8192 tokens; a case
    whose estimate exceeds 80% of the device is left out; quick and headline runs pick their cases from the same."""
    monkeypatch.setattr(moe, "device_memory", lambda device: gib * 2**30)
    cases = moe.moe_block_cases(GPU)
    fits = [moe.MoeBlockCase(*size, 16, "bf16") for size in moe.GPU_BLOCKS]
    assert cases == [c for c in fits if moe.block_bytes(c) <= 0.8 * gib * 2**30]
    if gib >= 80:
        assert cases == fits
        assert {c.experts for c in cases} == {8, 64, 128} and {c.top_k for c in cases} == {2, 8}
        assert {c.hidden for c in cases} == {2048, 4096} and {c.tokens for c in cases} == {4096, 8192}
        assert min(c.intermediate for c in cases) == 768 and max(c.intermediate for c in cases) == 14336
    else:
        assert all(c.size != "Mixtral-8x7B" for c in cases)
    assert all((c.r, c.dtype) == (16, "bf16") for c in cases)
    (quick,) = moe.moe_block_cases(GPU, quick=True)
    assert quick.size == "Qwen3-30B-A3B" and quick.tokens == 4096
    headline = moe.moe_block_cases(GPU, headline=True)
    assert [c.size for c in headline] == ["Qwen3-30B-A3B", "Mixtral-8x7B"][: len(headline)]
    assert moe.moe_block_cases(GPU, quick=True, headline=True) == [quick]
    assert moe.moe_train_cases(GPU, headline=True) == moe.moe_train_cases(CPU, headline=True) == []
    (train,) = moe.moe_train_cases(GPU)
    assert (train.experts, train.top_k, train.r, train.dtype) == (32, 4, 16, "bf16")


def _row(contender: str, **figures) -> dict:
    case = dataclasses.asdict(moe.MoeBlockCase(*moe.QWEN3_30B_A3B, 16, "bf16"))
    return {"suite": "moe", "level": "block", "contender": contender, **case, "headline": True, "device": "a GPU",
            "device_type": "cuda", "status": "ok", **figures}  # fmt: skip


def test_moe_targets_take_the_worst_fastlora_row():
    """P11 to P13 read both fastlora contenders of the block level (never the frozen block, PEFT or the train level):
    the worst value decides, met or missed on CUDA rows, no verdict on CPU rows, nothing from non-headline rows."""
    rows = [
        _row(moe.FROZEN_BLOCK, speedup_over_peft=9.0, peak_over_peft=0.1, ratio_to_frozen=1.0),
        _row(moe.PEFT_MODEL, speedup_over_peft=1.0, peak_over_peft=1.0, ratio_to_frozen=4.0),
        _row(moe.APPLY_LORA, speedup_over_peft=2.5, peak_over_peft=0.5, ratio_to_frozen=1.1),
        _row(moe.PATCHED, speedup_over_peft=1.8, peak_over_peft=0.6, ratio_to_frozen=1.2),
        {**_row(moe.APPLY_LORA, speedup_over_peft=0.1, peak_over_peft=9.0), "level": "train"},
    ]
    outcomes = {o.target.id: o for o in targets.evaluate(rows)}
    got = {id_: (outcomes[id_].value, outcomes[id_].status) for id_ in ("P11", "P12", "P13")}
    assert got == {"P11": (1.8, targets.MISSED), "P12": (0.6, targets.MET), "P13": (1.2, targets.MISSED)}
    assert f"contender={moe.PATCHED}" in outcomes["P11"].where and "size=Qwen3-30B-A3B" in outcomes["P11"].where
    assert outcomes["P12"].where.endswith(f"contender={moe.PATCHED}")
    assert outcomes["P1"].status == targets.NOT_MEASURED
    cpu = {o.target.id: o.status for o in targets.evaluate([{**row, "device_type": "cpu"} for row in rows])}
    assert cpu["P11"] == cpu["P12"] == cpu["P13"] == targets.NOT_GPU
    earlier = targets.evaluate([{**row, "headline": False} for row in rows])
    assert {o.target.id: o.status for o in earlier}["P11"] == targets.NOT_MEASURED
    table = dict(targets.parse_targets_table(targets.format_targets(rows)))
    assert table["P11"][2] == "1.800×" and table["P12"][3] == targets.MET


def test_headline_run_measures_the_block_cases_and_feeds_the_targets(tmp_path):
    """A quick headline run on CPU: the block level's one case, no train rows, no plot (``./dev gpu`` brings back at
    most 8 files), and P11 to P13 get values with no verdict."""
    env = bench.environment(CPU, quick=True, headline=True)
    rows = [{**row, **env} for row in bench.SUITES["moe"].run(CPU, quick=True, headline=True)]
    assert {row["level"] for row in rows} == {"block"} and len(rows) == len(moe.BLOCK_CONTENDERS)
    written = bench.write_results(rows, tmp_path, merge=False)
    assert written.plots == () and moe.BLOCK_PLOT not in written.markdown.read_text()
    outcomes = {o.target.id: o for o in targets.evaluate(list(written.rows))}
    for id_ in ("P11", "P12", "P13"):
        assert outcomes[id_].value is not None and outcomes[id_].status == targets.NOT_GPU, outcomes[id_]


def test_a_patched_block_that_falls_back_to_peft_is_refused(block_setup, monkeypatch):
    """``PEFT + fastlora.patch_peft`` must run fastlora's op: a call that falls back to PEFT's forward fails the
    agreement call instead of being timed under fastlora's name."""
    from fastlora import peft_compat

    case, base, inputs, _ = block_setup
    monkeypatch.setattr(peft_compat, "_experts_tensor_issue", lambda *args: "a reason fastlora did not foresee")
    with bench.forced_backend("torch"):
        block = moe.block_contender(base, case, moe.PATCHED)
        with pytest.raises(UserWarning, match="runs PEFT's forward for a call: a reason fastlora did not foresee"):
            moe.block_results(block, inputs)
    inputs.x.grad = None
