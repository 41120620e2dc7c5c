"""Benchmark suites: fastlora side by side with a frozen ``nn.Linear`` (the floor) and naive PyTorch LoRA.

A suite is a function ``(device, quick, progress) -> rows`` registered by name in ``SUITES``; a row is a flat dict
(suite, contender, the case's fields, timings, derived figures, environment) so that tables and plots are drawn
from rows, never from live measurements. ``run`` picks the cases for the device, measures every contender of a case
in the same process on the same inputs, and writes ``results.json`` and ``results.md``.

Timing: on CUDA, ``triton.testing.do_bench`` (warm-up, repetitions for about 100 ms, L2 flushed between them);
on CPU, ``torch.utils.benchmark.Timer.blocked_autorange``. The CPU suite runs the torch backend on small shapes:
its figures say nothing about kernel speed, they prove the suite runs.

The linear suite measures one LoRA linear layer in training (``training=True``, autograd recording):

- ``fwd``: the forward alone;
- ``fwd+bwd``: the forward, then ``backward`` of a fixed upstream gradient, with the inputs' ``.grad`` set to None
  at the start of every call (inside the timed region, the same for every contender).

``x`` requires grad in every contender (a layer inside a network receives activations that do), ``W0`` and the bias
are frozen, ``lora_A``/``lora_B`` are trainable and fp32 when the activations are bf16/fp16, as PEFT keeps them.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import platform
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from . import __version__
from .kernels import ONEPASS_MAX_RANK
from .ops import lora_linear, resolve_backend

MODES = ("fwd", "fwd+bwd")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FROZEN = "frozen nn.Linear"
NAIVE = "naive torch"
FASTLORA = "fastlora"
CPU_DISCLAIMER = "CPU figures (torch backend) say nothing about kernel speed; they prove the suite runs."
QUANTILES = (0.5, 0.2, 0.8)
# fastlora must match naive PyTorch LoRA at dropout 0 before it is timed. Loose on purpose: this catches wrong
# math, not rounding; errors are relative to the largest magnitude of the expected tensor. fp32 allows for the
# kernels' TF32 dots against cuBLAS fp32.
_AGREEMENT_TOL = {torch.float32: 5e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2}
ENV_KEYS = ("device", "device_type", "torch", "triton", "fastlora", "cuda", "backend", "timestamp")


# ----------------------------------------------------------------------------------------------- environment


def bench_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def bench_backend(device: torch.device) -> str:
    """The fastlora backend the suites run on ``device``. Always ``torch`` on CPU: ``auto`` would pick the Triton
    interpreter when ``TRITON_INTERPRET=1`` is set, which is far too slow to time, and CPU figures are a smoke test."""
    return resolve_backend(device) if device.type == "cuda" else "torch"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu {platform.processor() or platform.machine()}".strip()


def environment(device: torch.device | None = None) -> dict:
    """What a row needs to be read later: device name, versions, the fastlora backend, a UTC timestamp."""
    device = device or bench_device()
    return {
        "device": _device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "fastlora": __version__,
        "cuda": torch.version.cuda,
        "backend": bench_backend(device),
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def device_slug(device: torch.device | None = None) -> str:
    """A folder name for the device: ``nvidia-h100-80gb-hbm3``, or ``cpu`` for every CPU."""
    device = device or bench_device()
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", _device_name(device).lower()).strip("-")


def default_out_dir(device: torch.device | None = None) -> Path:
    return Path("benchmarks") / "results" / device_slug(device)


# ----------------------------------------------------------------------------------------------- the linear suite


@dataclasses.dataclass(frozen=True)
class LinearCase:
    """One shape of the linear suite: ``x [M, K]``, ``W0 [N, K]``, rank ``r``, activation dtype (a key of
    ``DTYPES``), LoRA dropout probability, and ``mode`` (``"fwd"`` or ``"fwd+bwd"``)."""

    M: int
    K: int
    N: int
    r: int
    dtype: str
    dropout: float
    mode: str

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"LinearCase: dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        if self.mode not in MODES:
            raise ValueError(f"LinearCase: mode must be one of {MODES}, got {self.mode!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def label(self) -> str:
        return f"M{self.M}-K{self.K}-N{self.N}-r{self.r}-{self.dtype}-p{self.dropout}-{self.mode}"


def _sweep(Ms, K, N, ranks, dtype) -> list[LinearCase]:
    return [
        LinearCase(M, K, N, r, dtype, p, mode)
        for mode, r, p, M in itertools.product(MODES, ranks, (0.0, 0.1), Ms)
    ]  # fmt: skip


def _quick(Ms, K, N, r, dtype) -> list[LinearCase]:
    """Both modes and both dropout settings once each, over a small and a larger ``M``."""
    small, large = Ms
    picks = ((small, 0.0, "fwd"), (large, 0.1, "fwd"), (small, 0.1, "fwd+bwd"), (large, 0.0, "fwd+bwd"))
    return [LinearCase(M, K, N, r, dtype, p, mode) for M, p, mode in picks]


def gpu_linear_cases(quick: bool = False) -> list[LinearCase]:
    """Llama-sized projections (K = N = 4096) in bf16, from one decode token to a 16k-token training batch."""
    if quick:
        return _quick((16, 4096), 4096, 4096, 16, "bf16")
    return _sweep((1, 16, 512, 4096, 16384), 4096, 4096, (16, 64), "bf16")


def cpu_linear_cases(quick: bool = False) -> list[LinearCase]:
    """Small fp32 shapes: enough to prove on CPU that every contender runs, in seconds."""
    if quick:
        return _quick((1, 64), 256, 256, 8, "fp32")
    return _sweep((1, 64, 512), 256, 256, (8, 16), "fp32")


def linear_cases(device: torch.device, quick: bool = False) -> list[LinearCase]:
    return gpu_linear_cases(quick) if device.type == "cuda" else cpu_linear_cases(quick)


def linear_flops(case: LinearCase) -> int:
    """The LoRA layer's work as it is trained, ``W0`` frozen. Forward: ``2·M·N·K`` (base) ``+ 2·M·K·r + 2·M·r·N``
    (LoRA). Backward: ``2·M·N·K`` for ``dx`` through ``W0`` (no ``dW``), plus ``dxa``, the LoRA part of ``dx``, ``dA``
    and ``dB``, each ``2·M·r·(N or K)``. Every contender of a case is credited with the same flops."""
    M, K, N, r = case.M, case.K, case.N, case.r
    forward = 2 * M * N * K + 2 * M * K * r + 2 * M * r * N
    backward = 2 * M * N * K + 2 * (2 * M * r * N + 2 * M * r * K)
    return forward + (backward if case.mode == "fwd+bwd" else 0)


@dataclasses.dataclass
class LinearInputs:
    """One set of inputs shared by every contender of a case."""

    x: torch.Tensor  # [M, K], requires grad
    weight: torch.Tensor  # [N, K], frozen
    bias: torch.Tensor  # [N], frozen
    lora_A: torch.Tensor  # [r, K], trainable
    lora_B: torch.Tensor  # [N, r], trainable
    dy: torch.Tensor  # [M, N], the fixed upstream gradient of fwd+bwd
    scaling: float

    @property
    def leaves(self) -> tuple[torch.Tensor, ...]:
        return self.x, self.lora_A, self.lora_B


def make_linear_inputs(case: LinearCase, device: torch.device, seed: int = 0) -> LinearInputs:
    """Random inputs scaled so outputs are O(1). ``lora_B`` is random, not PEFT's zero init, so that the LoRA branch
    contributes to the output and the agreement check means something."""
    g = torch.Generator(device=device).manual_seed(seed)
    dtype = case.torch_dtype
    lora_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype

    def randn(*shape, dt, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * scale).to(dt)

    return LinearInputs(
        x=randn(case.M, case.K, dt=dtype).requires_grad_(),
        weight=randn(case.N, case.K, dt=dtype, scale=case.K**-0.5),
        bias=randn(case.N, dt=dtype),
        lora_A=randn(case.r, case.K, dt=lora_dtype, scale=case.K**-0.5).requires_grad_(),
        lora_B=randn(case.N, case.r, dt=lora_dtype, scale=case.r**-0.5).requires_grad_(),
        dy=randn(case.M, case.N, dt=dtype),
        scaling=2.0,  # lora_alpha = 2·r, a common choice
    )


def linear_contender_names(case: LinearCase, backend: str) -> list[str]:
    """The contenders of a case; the forward shapes ``onepass``/``split`` exist on the Triton backend only."""
    names = [FROZEN, NAIVE, FASTLORA]
    if backend == "triton":
        if case.r <= ONEPASS_MAX_RANK:
            names.append("fastlora onepass")
        names.append("fastlora split")
    return names


def _linear_forward(name: str, case: LinearCase, inputs: LinearInputs, backend: str) -> Callable[[], torch.Tensor]:
    x, w, b, A, B, s, p = (inputs.x, inputs.weight, inputs.bias, inputs.lora_A, inputs.lora_B, inputs.scaling,
                           case.dropout)  # fmt: skip
    if name == FROZEN:
        return lambda: F.linear(x, w, b)
    if name == NAIVE:

        def naive() -> torch.Tensor:
            # PEFT's lora.Linear.forward: the LoRA branch in the adapter's dtype, nn.Identity when p == 0, the sum
            # cast back to the activation dtype.
            xl = x.to(A.dtype)
            if p > 0.0:
                xl = F.dropout(xl, p, training=True)
            return (F.linear(x, w, b) + F.linear(F.linear(xl, A), B) * s).to(x.dtype)

        return naive
    impl = name.removeprefix(FASTLORA).strip() or "auto"
    return functools.partial(
        lora_linear, x, w, b, A, B, s, dropout_p=p, training=True, forward_impl=impl, backend=backend
    )


def _step(forward: Callable[[], torch.Tensor], inputs: LinearInputs, mode: str) -> Callable[[], torch.Tensor]:
    if mode == "fwd":
        return forward

    def forward_backward() -> torch.Tensor:
        for t in inputs.leaves:
            t.grad = None
        y = forward()
        y.backward(inputs.dy)
        return y

    return forward_backward


def linear_contenders(case: LinearCase, inputs: LinearInputs, backend: str) -> dict[str, Callable[[], torch.Tensor]]:
    """Name -> the callable to time: one forward (``fwd``) or forward and backward (``fwd+bwd``); returns ``y``."""
    return {
        name: _step(_linear_forward(name, case, inputs, backend), inputs, case.mode)
        for name in linear_contender_names(case, backend)
    }


class BenchmarkMismatch(AssertionError):
    """fastlora disagrees with naive PyTorch LoRA: its timings would be meaningless."""


def check_agreement(case: LinearCase, inputs: LinearInputs, backend: str) -> None:
    """Every fastlora contender must match naive PyTorch LoRA at dropout 0 (output and, for ``fwd+bwd``, the
    gradients of ``x``, ``lora_A``, ``lora_B``) on these inputs; raises ``BenchmarkMismatch`` otherwise."""
    contenders = linear_contenders(dataclasses.replace(case, dropout=0.0), inputs, backend)
    results = {}
    for name, fn in contenders.items():
        if name == FROZEN:
            continue
        out = {"y": fn().detach()}
        if case.mode == "fwd+bwd":
            out.update(dx=inputs.x.grad, dA=inputs.lora_A.grad, dB=inputs.lora_B.grad)
        results[name] = out
    for t in inputs.leaves:
        t.grad = None
    tol = _AGREEMENT_TOL[case.torch_dtype]
    expected = results.pop(NAIVE)
    for name, out in results.items():
        for key, want in expected.items():
            want = want.float()
            try:
                torch.testing.assert_close(out[key].float(), want, rtol=tol, atol=tol * want.abs().max().item())
            except AssertionError as e:
                raise BenchmarkMismatch(f"{name} != {NAIVE} in {key} for {case.label}; not timing it.\n{e}") from None


def time_ms(fn: Callable[[], object], device: torch.device, min_run_time: float = 0.5) -> tuple[float, float, float]:
    """``(median, 20% quantile, 80% quantile)`` of one call of ``fn`` in milliseconds. ``min_run_time`` (seconds of
    repetitions) applies on CPU; on CUDA ``do_bench`` repeats for about 100 ms after 25 ms of warm-up."""
    if device.type == "cuda":
        import triton.testing

        return tuple(triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=list(QUANTILES)))
    from torch.utils.benchmark import Timer

    timer = Timer(stmt="fn()", globals={"fn": fn})
    times = torch.tensor(timer.blocked_autorange(min_run_time=min_run_time).times, dtype=torch.float64) * 1e3
    return tuple(times.quantile(torch.tensor(QUANTILES, dtype=torch.float64)).tolist())


def synchronized(fn: Callable[[], object], device: torch.device) -> Callable[[], None]:
    """``fn`` followed by a device synchronisation, for timers that read the wall clock (pytest-benchmark)."""
    if device.type != "cuda":
        return fn

    def call():
        fn()
        torch.cuda.synchronize(device)

    return call


def _linear_rows(case: LinearCase, timings: dict[str, tuple[float, float, float]]) -> list[dict]:
    flops = linear_flops(case)
    frozen, naive = timings[FROZEN][0], timings[NAIVE][0]
    return [
        {
            "suite": "linear",
            "contender": name,
            **dataclasses.asdict(case),
            "median_ms": median,
            "p20_ms": p20,
            "p80_ms": p80,
            "tflops": flops / (median * 1e-3) / 1e12,
            "ratio_to_frozen": median / frozen,
            "speedup_over_naive": naive / median,
        }
        for name, (median, p20, p80) in timings.items()
    ]


def _progress(cases: list[LinearCase], desc: str, enabled: bool) -> Iterable[LinearCase]:
    if not enabled:
        return cases
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _print_progress(cases, desc)
    return tqdm(cases, desc=desc)


def _print_progress(cases: list[LinearCase], desc: str) -> Iterator[LinearCase]:
    for i, case in enumerate(cases, 1):
        print(f"{desc} [{i}/{len(cases)}] {case.label}", file=sys.stderr, flush=True)
        yield case


def linear_suite(device: torch.device, quick: bool = False, progress: bool = False) -> list[dict]:
    """Every contender of every linear case, timed side by side; one row per (case, contender)."""
    backend = bench_backend(device)
    min_run_time = 0.05 if quick else 0.5
    rows = []
    for case in _progress(linear_cases(device, quick), "linear", progress):
        inputs = make_linear_inputs(case, device)
        check_agreement(case, inputs, backend)
        contenders = linear_contenders(case, inputs, backend)
        rows.extend(_linear_rows(case, {name: time_ms(fn, device, min_run_time) for name, fn in contenders.items()}))
    return rows


SUITES: dict[str, Callable[..., list[dict]]] = {"linear": linear_suite}


# ----------------------------------------------------------------------------------------------- results


def _environment_of(rows: list[dict]) -> dict:
    if not rows:
        raise ValueError("fastlora.bench: no rows to write")
    return {key: rows[0][key] for key in ENV_KEYS}


def _table(rows: list[dict]) -> list[str]:
    """One markdown table: a line per case, a column of median times per contender, then fastlora's figures."""
    case_fields = [f.name for f in dataclasses.fields(LinearCase) if f.name != "mode"]
    contenders = list(dict.fromkeys(row["contender"] for row in rows))
    by_case: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        by_case.setdefault(tuple(row[f] for f in case_fields), {})[row["contender"]] = row
    header = [*case_fields, *(f"{name} (ms)" for name in contenders), "fastlora TFLOP/s", "fastlora / frozen",
              "fastlora speedup over naive"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(["---:"] * len(header)) + " |"]
    for key, cells in by_case.items():
        ours = cells.get(FASTLORA)
        figures = ["", "", ""] if ours is None else [
            f"{ours['tflops']:.3g}", f"{ours['ratio_to_frozen']:.2f}×", f"{ours['speedup_over_naive']:.2f}×"
        ]  # fmt: skip
        times = [f"{cells[name]['median_ms']:.4g}" if name in cells else "" for name in contenders]
        lines.append("| " + " | ".join([*map(str, key), *times, *figures]) + " |")
    return lines


def format_markdown(rows: list[dict]) -> str:
    """The report: environment, then a table per suite and mode."""
    env = _environment_of(rows)
    lines = [
        f"# fastlora benchmarks: {env['device']}",
        "",
        f"torch {env['torch']}, triton {env['triton']}, fastlora {env['fastlora']}, backend `{env['backend']}`, "
        f"measured {env['timestamp']}.",
    ]
    if env["device_type"] != "cuda":
        lines += ["", f"**{CPU_DISCLAIMER}**"]
    lines += [
        "",
        "Median time per call in ms (20% and 80% quantiles in results.json). `fwd+bwd` is a training step of the "
        "layer: forward, then backward of a fixed upstream gradient. TFLOP/s count the LoRA layer's flops "
        "(`fastlora.bench.linear_flops`: the frozen weight gets no gradient). fastlora / frozen is its time over the frozen layer's (1.00× is the floor).",
    ]
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["suite"], row["mode"]), []).append(row)
    for (suite, mode), group in groups.items():
        lines += ["", f"## {suite}, {mode}", "", *_table(group)]
    return "\n".join(lines) + "\n"


def write_results(rows: list[dict], out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``results.json`` (environment and rows) and ``results.md`` into ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "results.json", out_dir / "results.md"
    json_path.write_text(json.dumps({"environment": _environment_of(rows), "rows": rows}, indent=2) + "\n")
    md_path.write_text(format_markdown(rows))
    return json_path, md_path


def run(suite: str = "linear", quick: bool = False, out: str | Path | None = None, progress: bool = True) -> list[dict]:
    """Run ``suite`` (a key of ``SUITES``, or ``"all"``) on this machine's device and write the results to ``out``
    (default ``benchmarks/results/<device_slug>/``); returns the rows."""
    if suite != "all" and suite not in SUITES:
        raise ValueError(f"fastlora.bench: suite must be one of {(*SUITES, 'all')}, got {suite!r}")
    device = bench_device()
    env = environment(device)
    rows = [
        {**row, **env}
        for name in (SUITES if suite == "all" else [suite])
        for row in SUITES[name](device, quick=quick, progress=progress)
    ]
    write_results(rows, default_out_dir(device) if out is None else out)
    return rows
