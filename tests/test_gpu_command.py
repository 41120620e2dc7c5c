"""``./dev gpu`` proven on a machine without a GPU: it refuses at once and offline, its headline cases cover every
target of the README, and a rehearsal of the whole run (``FASTLORA_GPU_REHEARSAL=1``: the same steps on the CPU)
writes the flat, small folder it promises, whose files parse."""

import dataclasses
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastlora.bench import common, linear, moe, multi_layer, multi_model, overhead, qlora, targets, train, warm

ROOT = Path(__file__).resolve().parent.parent
GPU = torch.device("cuda")
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="proves the behaviour without a CUDA device")


def _readme_targets() -> list[tuple[str, list[str]]]:
    return targets.parse_targets_table((ROOT / "README.md").read_text())


def test_without_cuda_it_says_so_and_touches_no_network(tmp_path):
    """Every command the script's Python runs is logged by a wrapper: only the script itself ran, never pip, and
    nothing was written."""
    calls = tmp_path / "calls.txt"
    wrapper = tmp_path / "python"
    wrapper.write_text(f'#!/bin/sh\necho "$@" >> {calls}\nexec {sys.executable} "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "FASTLORA_GPU_REHEARSAL"}
    env.update(PYTHON=str(wrapper), PIP_INDEX_URL="http://127.0.0.1:9/simple", PIP_NO_INDEX="1")
    done = subprocess.run(
        [str(ROOT / "dev"), "gpu", "--out", str(out)], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 3, done.stderr
    assert "needs a CUDA device" in done.stderr and "sees no CUDA device" in done.stderr
    assert calls.read_text().split("\n")[:-1] == [f"scripts/gpu.py --out {out}"]
    assert not out.exists()


def test_the_readme_table_is_the_targets_in_code():
    """The same ids in the same order, and each bound of ``fastlora.bench.targets`` is the README's (P2 has two)."""
    readme = dict(_readme_targets())
    assert list(readme) == list(dict.fromkeys(t.id for t in targets.TARGETS))
    for target in targets.TARGETS:
        cell = readme[target.id][1]
        assert target.target in cell, f"{target.id}: README says {cell!r}, fastlora.bench.targets {target.target!r}"


def _case_rows(suite: str, cases: list, contenders: list[str], **extra) -> list[dict]:
    return [
        {
            "suite": suite,
            "contender": name,
            **dataclasses.asdict(case),
            "headline": True,
            "device_type": "cuda",
            **extra,
        }
        for case in cases
        for name in contenders
    ]


def test_headline_cases_cover_every_target_of_the_readme(monkeypatch):
    """Rows shaped as the GPU headline cases would give them, with placeholder figures: every README target reads at
    least one of them, and the cases have the sizes the table states."""
    monkeypatch.setattr(train, "device_memory", lambda device: 141 * 2**30)
    monkeypatch.setattr(moe, "device_memory", lambda device: 141 * 2**30)
    lin = linear.linear_cases(GPU, headline=True)
    assert {(c.K, c.N, c.dtype, c.mode) for c in lin} == {(4096, 4096, "bf16", "fwd+bwd")}
    assert (
        {c.M for c in lin} == {4096, 16384} and {c.r for c in lin} == {16, 64} and {c.dropout for c in lin} == {0, 0.1}
    )
    assert {c.lora_dtype for c in lin} == {"fp32", "bf16"}
    (step,) = train.train_cases(GPU, headline=True)
    assert (step.size, step.seq, step.dropout) == ("1.1B", 2048, 0.05)
    (layer,) = multi_layer.layer_cases(GPU, headline=True)
    assert (layer.T, layer.adapters, layer.ranks, layer.K) == (32, 32, "16", 4096)
    models = multi_model.model_cases(GPU, headline=True)
    assert {c.registered for c in models if c.sweep == "registered"} == {8, 512}
    calls = overhead.overhead_cases(GPU, headline=True)
    assert all(c.dropout > 0 for c in calls) and {c.K for c in calls} == {4096}
    blocks = moe.moe_block_cases(GPU, headline=True)
    assert {(c.experts, c.top_k, c.hidden, c.intermediate, c.tokens) for c in blocks} == {
        (128, 8, 2048, 768, 8192), (8, 2, 4096, 14336, 4096)
    } and {(c.r, c.dtype) for c in blocks} == {(16, "bf16")}  # fmt: skip
    qlora_layers = qlora.qlora_layer_cases(GPU, headline=True)
    assert {(c.M, c.mode) for c in qlora_layers} == {(4096, "fwd+bwd"), (16, "decode")}
    assert {(c.K, c.N, c.r, c.dtype, c.lora_dtype) for c in qlora_layers} == {(4096, 4096, 16, "bf16", "fp32")}

    figures = {"ratio_to_frozen": 1.0, "speedup_over_peft": 1.0, "peak_over_peft": 1.0, "ratio_to_base": 1.0,
               "throughput_vs_fewest_registered": 1.0, "fewest_registered": 8, "launches": 2, "host_us_fwd": 1.0, "M": 1, "r": 1,
               "saved_beyond_input_bytes": 16, "ratio_to_lora": 1.0}  # fmt: skip
    rows = _case_rows("linear", lin, [common.FASTLORA, common.PEFT])
    rows += _case_rows("train", [step], list(train.CONTENDERS))
    rows += _case_rows("multi", [layer], [multi_layer.MULTI], level="layer")
    rows += _case_rows("multi", models, list(multi_model.MODEL_CONTENDERS), level="model")
    rows += _case_rows("overhead", calls, list(overhead.CONTENDERS))
    rows += _case_rows("moe", blocks, list(moe.BLOCK_CONTENDERS), level="block")
    rows += _case_rows("qlora", qlora_layers, list(qlora.HEADLINE_CONTENDERS), level="layer")
    rows = [{**figures, **row} for row in rows]
    for id_, _ in _readme_targets():
        readers = [t for t in targets.TARGETS if t.id == id_]
        assert readers and all(any(t.select(row) for row in rows) for t in readers), f"no headline case feeds {id_}"


def test_warm_compiles_every_kernel_specialisation_of_the_headline_layers():
    """One warm-up case per specialisation the headline layers launch (the measured runs then find every kernel in
    Triton's cache), each run once per config index; a job runs (here on the torch backend: no GPU to compile for)."""
    cases = warm.warm_cases(GPU)
    layers = linear.linear_cases(GPU, headline=True) + [
        c.as_linear("fwd+bwd") for c in overhead.overhead_cases(GPU, headline=True)
    ]
    assert {warm._specialisation(c) for c in cases} == {warm._specialisation(c) for c in layers}
    assert len(cases) == len({warm._specialisation(c) for c in cases})
    assert {c.lora_dtype for c in cases} == {"fp32", "bf16"} and any(c.M <= 64 for c in cases)
    small = dataclasses.replace(linear.linear_cases(torch.device("cpu"), headline=True)[0], M=8)
    assert warm._run_job((small, 3)) > 0
    assert warm.warm() == (0, 0.0)  # nothing to compile without a GPU


def test_pinned_configs_run_one_config_and_restore_the_autotuners(monkeypatch):
    """The lora_shrink autotuner with its GPU configs: pinned to index i it offers only the i-th (modulo the number)
    of the configs its pruning keeps, and afterwards it prunes and caches as before."""
    from fastlora.kernels import shrink

    tuner = shrink._lora_shrink_kernel
    monkeypatch.setattr(tuner, "configs", shrink.gpu_configs())
    monkeypatch.setattr(tuner, "nargs", {"x_ptr": torch.empty(1, dtype=torch.bfloat16), "wt_ptr": torch.empty(1)},
                        raising=False)  # fmt: skip
    kwargs = {"BLOCK_R": 16, "DROPOUT": False}
    cache = tuner.cache
    everything = tuner.prune_configs(kwargs)
    assert len(everything) > 2
    with warm.pinned_configs(len(everything) + 1):
        assert tuner.prune_configs(kwargs) == [everything[1]] and tuner.cache == {}
    assert tuner.prune_configs(kwargs) == everything and tuner.cache is cache


def test_targets_verdicts_take_the_worst_case():
    rows = [
        {"suite": "overhead", "contender": common.FASTLORA, "dropout": 0.1, "M": 16, "r": 16, "launches": n,
         "host_us_fwd": us, "saved_beyond_input_bytes": 4 * 16 * 16 + 8, "headline": True, "device_type": "cuda"}
        for n, us in ((5, 20.0), (7, 25.0))
    ]  # fmt: skip
    outcomes = {o.target.id: o for o in targets.evaluate(rows)}
    assert (outcomes["P9"].value, outcomes["P9"].status) == (7, targets.MISSED)
    assert (outcomes["P10"].value, outcomes["P10"].status) == (25.0, targets.MET)
    assert (outcomes["P3"].value, outcomes["P3"].status) == (4.0, targets.MET)
    assert outcomes["P1"].status == targets.NOT_MEASURED
    cpu = [{**row, "device_type": "cpu"} for row in rows]
    assert {o.target.id: o.status for o in targets.evaluate(cpu)}["P9"] == targets.NOT_GPU
    assert all(o.status == targets.NOT_MEASURED for o in targets.evaluate([{**r, "headline": False} for r in rows]))


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    """``./dev gpu --quick`` rehearsed on the CPU with the test suite's Python."""
    out = tmp_path_factory.mktemp("gpu")
    env = {**os.environ, "FASTLORA_GPU_REHEARSAL": "1", "PYTHON": sys.executable}
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run([str(ROOT / "dev"), "gpu", "--quick", "--out", str(out)], env=env, capture_output=True,
                          text=True, timeout=900)  # fmt: skip
    return out, done


def test_rehearsal_runs_every_step_and_passes(rehearsal):
    out, done = rehearsal
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    log = (out / "gpu.log").read_text()
    assert "a rehearsal without a GPU" in log
    for step in ("CUDA tests (pytest -m gpu): passed", *(f"bench --headline --suite {s}: passed" for s in
                 ("overhead", "multi", "linear", "train", "moe", "qlora"))):  # fmt: skip
        assert step in log, step
    assert " passed, 0 failed" in log  # the CUDA tests ran in their CPU dry-run mode, none skipped into passing


def test_rehearsal_output_is_flat_small_and_parses(rehearsal):
    out, _ = rehearsal
    files = sorted(out.iterdir())
    assert len(files) <= 8 and all(f.is_file() and f.stat().st_size <= 16 * 2**20 for f in files), files
    names = {f.name for f in files}
    assert {"results.json", "results.md", "targets.md", "gpu.log"} <= names and any(n.endswith(".png") for n in names)
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert rows and all(row["headline"] for row in rows)
    assert {row["suite"] for row in rows} == {"overhead", "multi", "linear", "train", "moe", "qlora"}
    table = dict(targets.parse_targets_table((out / "targets.md").read_text()))
    assert set(table) == {id_ for id_, _ in _readme_targets()}
    statuses = {cells[3] for cells in table.values()}
    assert statuses <= {targets.NOT_GPU, targets.NOT_MEASURED}  # a CPU decides no target
    assert table["P9"][3] == targets.NOT_MEASURED  # launches are counted on CUDA only
    assert all(cells[2] for id_, cells in table.items() if id_ != "P9"), table  # every other target got a value
    assert "## Environment" in (out / "targets.md").read_text()
