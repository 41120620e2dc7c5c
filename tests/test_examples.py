"""The examples run end to end as a user runs them: in a fresh interpreter, from the command line."""

import os
import re
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_finetune_example_learns_and_peft_reads_its_adapter(tmp_path):
    # Without the interpreter the LoRA layers of a CPU model take the PyTorch backend, which keeps this fast.
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTLORA_BACKEND")}
    out = tmp_path / "adapter"
    command = [sys.executable, str(EXAMPLES / "finetune.py"), "--steps", "40", "--out", str(out), "--device", "cpu"]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output

    assert "fastlora backend torch" in proc.stdout, output
    loss = re.search(r"^loss (\S+) -> (\S+) .*: fell$", proc.stdout, re.MULTILINE)
    assert loss is not None, output
    first, last = map(float, loss.groups())
    assert last < 0.5 * first, output
    logits = re.search(r"PEFT\| = (\S+) \(tolerance (\S+);.*: match$", proc.stdout, re.MULTILINE)
    assert logits is not None, output
    diff, tolerance = map(float, logits.groups())
    assert diff <= tolerance, output
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()


def test_serve_many_example_serves_mixed_batches_like_rows_alone():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTLORA_BACKEND")}
    command = [sys.executable, str(EXAMPLES / "serve_many.py"), "--adapters", "5", "--max-adapters", "3",
               "--batches", "3", "--max-new-tokens", "6", "--device", "cpu"]  # fmt: skip
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "every row matches generating alone" in proc.stdout, output
    served = re.findall(r"^  row \d+: served by (\S+)", proc.stdout, re.MULTILINE)
    assert len(served) == 3 * 4, output
    assert len(set(served)) >= 4, output  # several adapters (and the base model) across the batches
    assert len(re.findall(r"^registered adapter\d-r\d+: rank", proc.stdout, re.MULTILINE)) == 5, output
