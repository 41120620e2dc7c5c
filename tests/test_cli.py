"""The ``fastlora`` command, called in-process: ``bench`` writes its result files, ``info`` runs the static check."""

import contextlib
import dataclasses
import io
import json
import shutil

import matplotlib.image
import pytest

from fastlora import bench
from fastlora.bench import memory, multi_batch, multi_layer, multi_model, overhead, train
from fastlora.cli import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_all(tmp_path_factory):
    """``fastlora bench --quick --suite all --out DIR``, run once for the tests below: (DIR, its stdout)."""
    out = tmp_path_factory.mktemp("bench")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["bench", "--quick", "--suite", "all", "--out", str(out)]) == 0
    return out, stdout.getvalue()


def _expected_rows() -> dict[str, set]:
    """Per suite, the (case fields..., contender) keys a quick run must write, from the suites' own case lists."""
    device = bench.bench_device()
    backend = bench.bench_backend(device)
    return {
        "linear": {
            (*dataclasses.astuple(case), name)
            for case in bench.linear_cases(device, quick=True)
            for name in bench.linear_contender_names(case, backend)
        },
        "memory": {
            (*dataclasses.astuple(case), name)
            for case in bench.memory_cases(device, quick=True)
            for name in memory.CONTENDERS
        },
        "train": {
            (*dataclasses.astuple(case), name)
            for case in bench.train_cases(device, quick=True)
            for name in train.CONTENDERS
        },
        "overhead": {
            (*dataclasses.astuple(case), name)
            for case in overhead.overhead_cases(device, quick=True)
            for name in overhead.CONTENDERS
        },
        "multi": {
            ("layer", *dataclasses.astuple(case), name)
            for case in bench.layer_cases(device, quick=True)
            for name in multi_layer.layer_contender_names(case, backend)
        }
        | {
            ("model", *dataclasses.astuple(case), name)
            for case in bench.model_cases(device, quick=True)
            for name in multi_model.model_contender_names(case)
        },
    }


CASE_TYPES = {
    "linear": bench.LinearCase, "memory": bench.MemoryCase, "train": bench.TrainCase, "overhead": overhead.OverheadCase,
}  # fmt: skip
MULTI_CASE_TYPES = {"layer": bench.MultiCase, "model": bench.MultiModelCase}


def _row_key(row: dict) -> tuple:
    """A row's case fields and contender, as ``_expected_rows`` writes them (the multi suite's rows lead with their
    level, whose case type they follow)."""
    if row["suite"] == "multi":
        fields = [f.name for f in dataclasses.fields(MULTI_CASE_TYPES[row["level"]])]
        return (row["level"], *(row[f] for f in fields), row["contender"])
    return (*(row[f.name] for f in dataclasses.fields(CASE_TYPES[row["suite"]])), row["contender"])


def test_bench_quick_all_writes_every_suites_rows(quick_all):
    out, stdout = quick_all
    results = json.loads((out / "results.json").read_text())
    device = bench.bench_device()
    assert results["environment"]["backend"] == bench.bench_backend(device)
    assert results["environment"]["quick"] is True
    assert set(results["suites"]) == set(bench.SUITES)
    rows = results["rows"]
    for suite, expected in _expected_rows().items():
        got = [_row_key(row) for row in rows if row["suite"] == suite]
        assert set(got) == expected and len(got) == len(expected), suite
    for row in rows:
        for key in ("device", "torch", "triton", "fastlora", "timestamp", "shape", "dtype"):
            assert row[key], (key, row)
        assert row["device"] == results["environment"]["device"]
        if row["suite"] in ("linear", "train", "multi"):
            assert 0 < row["p20_ms"] <= row["median_ms"] <= row["p80_ms"], row
    for row in (r for r in rows if r["suite"] == "linear"):
        assert row["tflops"] > 0 and row["ratio_to_frozen"] > 0, row
        assert row["speedup_over_naive"] > 0 and row["speedup_over_peft"] > 0, row
    for row in (r for r in rows if r["suite"] == "memory"):
        assert 0 <= row["saved_beyond_input_bytes"] <= row["saved_bytes"] and row["peak_step_bytes"] > 0, row
    for row in (r for r in rows if r["suite"] == "train"):
        assert row["status"] == "ok" and row["tokens_per_s"] > 0 and row["peak_step_bytes"] > 0, row
    for row in (r for r in rows if r["suite"] == "overhead"):
        assert row["host_us_fwd"] > 0 and row["host_us_fwd_bwd"] > 0, row
        # a frozen layer keeps only W0 (a parameter, not counted) to give x its gradient
        assert (row["saved_bytes"] > 0) == (row["contender"] != bench.FROZEN), row
        assert (row["launches"] is None) == (device.type == "cpu"), row
    multi_rows = [r for r in rows if r["suite"] == "multi"]
    for row in multi_rows:
        assert row["tokens_per_s"] > 0, row
        if row["level"] == "layer" or row["sweep"] == "contenders":
            assert row["ratio_to_base"] > 0 and row["speedup_over_peft"] > 0, row
            base = multi_layer.BASE_ONLY if row["level"] == "layer" else multi_model.BASE_MODEL
            assert (row["ratio_to_base"] == 1.0) == (row["contender"] == base), row
    sweep = [r for r in multi_rows if r["level"] == "model" and r["sweep"] == "registered"]
    assert len({r["registered"] for r in sweep}) >= 2  # a sweep, not a point
    fewest = min(r["registered"] for r in sweep)
    for row in sweep:
        assert row["contender"] == multi_model.MULTI_MODEL and row["throughput_vs_fewest_registered"] > 0, row
        assert (row["throughput_vs_fewest_registered"] == 1.0) == (row["registered"] == fewest), row
    assert str(out / "results.json") in stdout


def test_bench_markdown_has_every_table(quick_all):
    out, _ = quick_all
    markdown = (out / "results.md").read_text()
    if bench.bench_device().type == "cpu":
        assert bench.CPU_DISCLAIMER in markdown
    headings = ("## linear", "### fwd", "### fwd+bwd", "## memory", "## train", "## multi", "### layer", "### model",
                "### registered adapters", "## overhead", "## moe", "### block", "### train", "## qlora",
                "### layer")  # fmt: skip
    for heading in headings:
        assert f"\n{heading}\n" in markdown
    names = (bench.FROZEN, bench.NAIVE, bench.PEFT, bench.FASTLORA, bench.PATCHED, train.APPLY_LORA,
             multi_layer.BASE_ONLY, multi_batch.PEFT_MIXED, multi_layer.MULTI, multi_model.BASE_MODEL,
             multi_model.MULTI_MODEL)  # fmt: skip
    for name in names:
        assert name in markdown
    for header in ("speedup over PEFT", "fastlora TFLOP/s", "fastlora / frozen", "saved for backward", "tokens/s",
                   "fastlora / base", "vs fewest registered"):  # fmt: skip
        assert header in markdown
    rows = json.loads((out / "results.json").read_text())["rows"]
    # a line per linear and per multi case (its contenders side by side), a line per memory and per train row
    linear_cases = {
        (r["M"], r["K"], r["N"], r["r"], r["dtype"], r["lora_dtype"], r["dropout"], r["mode"])
        for r in rows
        if r["suite"] == "linear"
    }
    multi_cases = {_row_key(r)[:-1] for r in rows if r["suite"] == "multi"}
    rowwise = ("memory", "train", "overhead", "moe", "qlora")
    expected = len(linear_cases) + len(multi_cases) + sum(r["suite"] in rowwise for r in rows)
    lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    headers = [line for line in lines if line.startswith(("| M |", "| size |", "| T |", "| ---"))]
    assert len(lines) - len(headers) == expected


def test_bench_plots_are_pngs(quick_all):
    out, stdout = quick_all
    plots = sorted(out.glob("*.png"))
    expected = {name for suite in bench.SUITES.values() for name in suite.plot_names}
    assert {p.name for p in plots} == expected
    for path in plots:
        assert path.read_bytes()[:8] == PNG_SIGNATURE and str(path) in stdout
        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
        assert f"]({path.name})" in (out / "results.md").read_text()


def test_bench_rerun_of_one_suite_keeps_the_others(quick_all, tmp_path):
    """A rerun replaces its own suite's rows and keeps the rest; rows of another device replace everything."""
    out, _ = quick_all
    shutil.copytree(out, tmp_path, dirs_exist_ok=True)
    rows = json.loads((out / "results.json").read_text())["rows"]
    memory_rows = [{**row, "timestamp": "rerun"} for row in rows if row["suite"] == "memory"]
    bench.write_results(memory_rows, tmp_path)
    merged = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r for r in merged if r["suite"] != "memory"] == [r for r in rows if r["suite"] != "memory"]
    assert [r for r in merged if r["suite"] == "memory"] == memory_rows
    assert {p.name for p in tmp_path.glob("*.png")} == {p.name for p in out.glob("*.png")}

    elsewhere = [{**row, "device": "another device"} for row in memory_rows]
    written = bench.write_results(elsewhere, tmp_path)
    assert json.loads((tmp_path / "results.json").read_text())["rows"] == elsewhere
    assert {p.name for p in tmp_path.glob("*.png")} == {p.name for p in written.plots} == {memory.PLOT}
    assert "## linear" not in (tmp_path / "results.md").read_text()


def test_bench_rejects_an_unknown_suite(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--suite", "nope"])
    with pytest.raises(ValueError, match="suite must be one of"):
        bench.run(suite="nope")


def test_info_static_check_subset(capsys):
    assert main(["info", "--kernels", "lora_wgrad", "--arch", "90", "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "fastlora" in out and "triton" in out
    table = [line for line in out.splitlines() if line.startswith("| lora_wgrad")]
    assert table and all("sm_90" in line and line.endswith("| ok |") for line in table)
