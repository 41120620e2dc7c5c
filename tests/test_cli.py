"""The ``fastlora`` command, called in-process: ``bench`` writes its result files, ``info`` runs the static check."""

import dataclasses
import json

from fastlora import bench
from fastlora.cli import main


def test_bench_quick_writes_results(tmp_path, capsys):
    assert main(["bench", "--quick", "--out", str(tmp_path)]) == 0

    results = json.loads((tmp_path / "results.json").read_text())
    device = bench.bench_device()
    backend = bench.bench_backend(device)
    assert results["environment"]["backend"] == backend
    rows = results["rows"]
    cases = bench.linear_cases(device, quick=True)
    fields = [f.name for f in dataclasses.fields(bench.LinearCase)]
    expected = {
        (*dataclasses.astuple(case), name) for case in cases for name in bench.linear_contender_names(case, backend)
    }
    got = {(*(row[f] for f in fields), row["contender"]) for row in rows}
    assert got == expected and len(rows) == len(expected)
    for row in rows:
        assert 0 < row["p20_ms"] <= row["median_ms"] <= row["p80_ms"], row
        assert row["tflops"] > 0 and row["ratio_to_frozen"] > 0 and row["speedup_over_naive"] > 0, row
        assert row["device"] == results["environment"]["device"]

    markdown = (tmp_path / "results.md").read_text()
    if device.type == "cpu":
        assert bench.CPU_DISCLAIMER in markdown
    for name in (bench.FROZEN, bench.NAIVE, bench.FASTLORA):
        assert name in markdown
    assert str(tmp_path / "results.json") in capsys.readouterr().out


def test_info_static_check_subset(capsys):
    assert main(["info", "--kernels", "lora_wgrad", "--arch", "90", "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "fastlora" in out and "triton" in out
    table = [line for line in out.splitlines() if line.startswith("| lora_wgrad")]
    assert table and all("sm_90" in line and line.endswith("| ok |") for line in table)
