"""Bad input gets a clear error naming the problem, and changes nothing."""

import os
import subprocess
import sys

import pytest
import torch

import fastlora


def _ok(device="cpu", dtype=torch.float32, lora_dtype=torch.float32):
    return dict(
        x=torch.randn(4, 16, device=device, dtype=dtype),
        weight=torch.randn(8, 16, device=device, dtype=dtype),
        bias=torch.randn(8, device=device, dtype=dtype),
        lora_A=torch.randn(2, 16, device=device, dtype=lora_dtype),
        lora_B=torch.randn(8, 2, device=device, dtype=lora_dtype),
        scaling=1.0,
    )


def test_valid_inputs_run(device):
    assert fastlora.lora_linear(**_ok(device)).shape == (4, 8)


@pytest.mark.parametrize(
    "change, error, match",
    [
        ({"x": torch.randn(4, 15)}, ValueError, "x has K=15"),
        ({"weight": torch.randn(8, 15)}, ValueError, "weight .* has K=15"),
        ({"weight": torch.randn(8, 16, 1)}, ValueError, "weight must be 2-D"),
        ({"lora_A": torch.randn(2, 15)}, ValueError, "lora_A must be"),
        ({"lora_A": torch.randn(0, 16), "lora_B": torch.randn(8, 0)}, ValueError, "rank r >= 1"),
        ({"lora_B": torch.randn(8, 3)}, ValueError, "lora_B must be"),
        ({"lora_B": torch.randn(7, 2)}, ValueError, "lora_B must be"),
        ({"bias": torch.randn(7)}, ValueError, "bias must be"),
        ({"weight": torch.randn(8, 16, dtype=torch.float16)}, TypeError, "weight.dtype"),
        ({"lora_B": torch.randn(8, 2, dtype=torch.float16)}, TypeError, "lora_A.dtype .* and lora_B.dtype"),
        ({"x": torch.randint(0, 3, (4, 16))}, TypeError, "x.dtype"),
        ({"x": torch.randn(4, 16, dtype=torch.float64), "weight": torch.randn(8, 16, dtype=torch.float64)},
         TypeError, "x.dtype"),
        ({"dropout_p": 1.0, "training": True}, ValueError, "dropout_p"),
        ({"dropout_p": -0.1}, ValueError, "dropout_p"),
        ({"forward_impl": "fused"}, ValueError, "forward_impl"),
        ({"backend": "cuda"}, ValueError, "backend"),
    ],
)  # fmt: skip
def test_bad_inputs(change, error, match):
    """Each bad argument is named; the triton (interpreter) backend is the one under test on CPU."""
    kwargs = {**_ok(), **change}
    with pytest.raises(error, match=match):
        fastlora.lora_linear(**kwargs)


def test_devices_must_match():
    kwargs = _ok()
    kwargs["bias"] = torch.randn(8, device="meta")
    with pytest.raises(ValueError, match="one device"):
        fastlora.lora_linear(**kwargs)


def test_fp64_runs_on_the_torch_backend_only():
    kwargs = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in _ok().items()}
    assert fastlora.lora_linear(**kwargs, backend="torch").dtype == torch.float64


def test_onepass_rank_limit():
    kwargs = _ok()
    kwargs["lora_A"], kwargs["lora_B"] = torch.randn(129, 16), torch.randn(8, 129)
    with pytest.raises(ValueError, match="r <= 128"):
        fastlora.lora_linear(**kwargs, forward_impl="onepass")
    assert fastlora.lora_linear(**kwargs, forward_impl="split", backend="torch").shape == (4, 8)


def _run(code: str, **env_changes) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTLORA_BACKEND")}
    env.update(env_changes)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)


_CALL = """
import torch, fastlora
x, w, a, b = torch.randn(2, 16), torch.randn(8, 16), torch.randn(2, 16), torch.randn(8, 2)
print(fastlora.ops.resolve_backend(x.device))
fastlora.lora_linear(x, w, None, a, b, 1.0)
print("ran")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only dispatch")
def test_forcing_triton_on_cpu_without_interpreter_is_a_clear_error():
    proc = _run(_CALL, FASTLORA_BACKEND="triton")
    assert proc.returncode != 0
    assert "TRITON_INTERPRET=1" in proc.stderr and "backend 'triton'" in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only dispatch")
def test_cpu_tensors_default_to_the_torch_backend():
    proc = _run(_CALL)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["torch", "ran"]
    proc = _run(_CALL, FASTLORA_BACKEND="bogus")
    assert proc.returncode != 0 and "FASTLORA_BACKEND" in proc.stderr
