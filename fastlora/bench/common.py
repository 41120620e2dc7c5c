"""What every suite shares: the device and its environment, timing, peak memory, progress, and the ``Suite`` record.

Timing: on CUDA, ``triton.testing.do_bench`` (25 ms of warm-up, repetitions for about 100 ms and at least 10, L2
flushed before each by writing a 256 MB buffer, CUDA events around each call); on CPU, ``torch.utils.benchmark.Timer.blocked_autorange``
after one warm-up call. Both give the median and the 20% / 80% quantiles in milliseconds.

Peak memory of a step: the most bytes allocated at once during the call, above what was allocated when it started.
On CUDA, ``torch.cuda.max_memory_allocated`` (the caching allocator's own count). On CPU, torch keeps no such
statistic, so the allocator's events recorded by ``torch.profiler`` (``profile_memory=True``: every allocation and
free with its size, in order) are summed and their running maximum taken. Both count tensors as allocated, without
the caching allocator's rounding or reserve.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path

import torch
import triton

from .. import __version__
from ..ops import resolve_backend

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CPU_DISCLAIMER = (
    "CPU figures (torch backend) say nothing about kernel speed, nor about the kernels' peak memory; they prove the "
    "suites run. Bytes saved for backward are counted exactly on any device."
)
QUANTILES = (0.5, 0.2, 0.8)
ENV_KEYS = ("device", "device_type", "torch", "triton", "fastlora", "cuda", "backend", "timestamp", "quick")

# Contender names shared by the suites.
FROZEN = "frozen nn.Linear"
NAIVE = "naive torch"
PEFT = "PEFT lora.Linear"
PATCHED = "PEFT + fastlora.patch_peft"
FASTLORA = "fastlora"


class Case:
    """Base of every suite's case dataclass: its ``dtype`` field names a key of ``DTYPES`` (checked when the case
    is made; subclasses that check more call ``super().__post_init__()``)."""

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"{type(self).__name__}: dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


class BenchmarkMismatch(AssertionError):
    """Two contenders that compute the same thing disagree: timing them side by side would be meaningless."""


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


def environment(device: torch.device | None = None, quick: bool = False) -> dict:
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
        "quick": quick,
    }


def device_slug(device: torch.device | None = None) -> str:
    """A folder name for the device: ``nvidia-h100-80gb-hbm3``, or ``cpu`` for every CPU."""
    device = device or bench_device()
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", _device_name(device).lower()).strip("-")


def default_out_dir(device: torch.device | None = None) -> Path:
    return Path("benchmarks") / "results" / device_slug(device)


def device_memory(device: torch.device) -> int | None:
    """Total memory of a CUDA device in bytes (None on CPU), to pick sizes that fit."""
    return torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None


@contextlib.contextmanager
def forced_backend(backend: str) -> Iterator[None]:
    """Run fastlora layers that pick their backend themselves (``LoraLinear``, ``patch_peft``) on ``backend``."""
    old = os.environ.get("FASTLORA_BACKEND")
    os.environ["FASTLORA_BACKEND"] = backend
    try:
        yield
    finally:
        if old is None:
            del os.environ["FASTLORA_BACKEND"]
        else:
            os.environ["FASTLORA_BACKEND"] = old


def with_backend(fn: Callable[[], object], backend: str) -> Callable[[], object]:
    """``fn`` run under ``forced_backend(backend)``, wherever it is called from (the suites or pytest-benchmark)."""

    def call():
        with forced_backend(backend):
            return fn()

    return call


# ----------------------------------------------------------------------------------------------- measuring


def time_ms(
    fn: Callable[[], object], device: torch.device, min_run_time: float = 0.5, min_reps: int = 10
) -> tuple[float, float, float]:
    """``(median, 20% quantile, 80% quantile)`` of one call of ``fn`` in milliseconds. ``min_run_time`` (seconds of
    repetitions) applies on CPU. On CUDA ``do_bench`` warms up for 25 ms and repeats for 100 ms, or for ``min_reps``
    calls when a call is slower than 100 ms / ``min_reps`` (a training step of a large model), so that the
    quantiles are never those of a handful of samples."""
    if device.type == "cuda":
        import triton.testing

        estimate = triton.testing.do_bench(fn, warmup=0, rep=1, return_mode="median")  # also a first warm-up
        rep = max(100.0, min_reps * estimate)
        return tuple(triton.testing.do_bench(fn, warmup=max(25.0, estimate), rep=rep, quantiles=list(QUANTILES)))
    from torch.utils.benchmark import Timer

    fn()  # warm-up: first calls pay for lazy initialisation
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


@contextlib.contextmanager
def _quiet_fd2() -> Iterator[None]:
    """Silence file descriptor 2 at the C level: kineto writes a line when a profile starts and stops, and no
    setting turns those lines off. Python's own ``sys.stderr`` is flushed first and restored after."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """The most bytes allocated at once while ``fn`` runs, above those allocated when it starts (see the module
    docstring for how, per device). Call ``fn`` once before, so that lazy initialisation is not counted."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with _quiet_fd2(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [
        e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type() == DeviceType.CPU
    ]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()  # negative for a free
        peak = max(peak, live)
    return peak


# ----------------------------------------------------------------------------------------------- suites


@dataclasses.dataclass(frozen=True)
class Suite:
    """A benchmark suite as the runner sees it. ``run(device, quick, progress_bar)`` returns rows (flat dicts: ``suite``,
    ``contender``, the case's fields, ``shape``, ``dtype``, measurements); ``markdown(rows)`` returns the lines of
    its section of results.md (its tables); ``plots(rows, out_dir)`` writes its PNGs and returns their paths.
    ``plot_names`` are the file names ``plots`` may write, so that a rerun can remove stale ones."""

    name: str
    run: Callable[..., list[dict]]
    markdown: Callable[[list[dict]], list[str]]
    plots: Callable[[list[dict], Path], list[Path]]
    plot_names: tuple[str, ...]


def progress(items: list, desc: str, enabled: bool) -> Iterable:
    """``items`` with a tqdm bar (or one line per item on stderr without tqdm) when ``enabled``."""
    if not enabled:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _print_progress(items, desc)
    return tqdm(items, desc=desc)


def _print_progress(items: list, desc: str) -> Iterator:
    for i, item in enumerate(items, 1):
        print(f"{desc} [{i}/{len(items)}] {getattr(item, 'label', item)}", file=sys.stderr, flush=True)
        yield item


def assert_close(got: torch.Tensor, want: torch.Tensor, tol: float, what: str) -> None:
    """Relative to the largest magnitude of ``want``: catches wrong math, not rounding. Raises
    ``BenchmarkMismatch`` naming ``what``."""
    got, want = got.detach().float(), want.detach().float()
    try:
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item())
    except AssertionError as e:
        raise BenchmarkMismatch(f"{what}; not timing it.\n{e}") from None


def fmt_bytes(n: float | None) -> str:
    """``n`` bytes in MiB (KiB below one MiB) for tables."""
    if n is None:
        return "n/a"
    if abs(n) < 2**20:
        return f"{n / 2**10:.1f} KiB"
    return f"{n / 2**20:.1f} MiB"


def md_table(header: list[str], lines: Iterable[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join(["---:"] * len(header)) + " |"]
    out += ["| " + " | ".join(map(str, line)) + " |" for line in lines]
    return out


def plot_title(title: str, rows: list[dict]) -> str:
    """``title`` with the device, and a warning on the torch backend, whose timings are no kernel's."""
    warning = "\n(torch backend: says nothing about kernel speed)" if rows[0]["backend"] == "torch" else ""
    return f"{title}, {rows[0]['device']}{warning}"


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_plot(fig, path: Path) -> Path:
    """Write ``fig`` as a PNG at ``path`` and free it (pyplot keeps every open figure alive)."""
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path
