"""What every suite shares: the device and its environment, timing, peak memory, progress, and the ``Suite`` record.

Timing: on CUDA, ``triton.testing.do_bench`` (25 ms of warm-up, repetitions for about 100 ms and at least 10, L2
flushed before each by writing a 256 MB buffer, CUDA events around each call); on CPU,
``torch.utils.benchmark.Timer.blocked_autorange`` after one warm-up call. Both give the median and the 20% / 80%
quantiles in milliseconds.

Host time of a call (``host_us``): the device is synchronised, then ``HOST_CALLS`` calls are issued back to back and
the wall clock read before the next synchronisation, so the figure is the time Python, autograd and the launches take
on the CPU while the device runs behind (the calls queue far fewer launches than the driver's queue holds). The median
of ``HOST_REPEATS`` such runs, in microseconds per call (fewer calls per run when a time limit is given and a call is
slow). On a CPU the device is the CPU, so the figure is the whole call.

Peak memory of a step: the most bytes allocated at once during the call, above what was allocated when it started.
On CUDA, ``torch.cuda.max_memory_allocated`` (the caching allocator's own count). On CPU, torch keeps no such
statistic, so the allocator's events recorded by ``torch.profiler`` (``profile_memory=True``: every allocation and
free with its size, in order) are summed and their running maximum taken. Both count tensors as allocated, without
the caching allocator's rounding or reserve.

Agreement: before contenders are timed side by side, ``assert_close`` checks that they compute the same thing, with
the one tolerance table of ``fastlora.reference`` (relative to the largest magnitude of the expected result, grown
with the length of the sums that make it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

import torch
import triton

from ..ops import resolve_backend
from ..reference import tolerance

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CPU_DISCLAIMER = (
    "CPU figures (torch backend) say nothing about kernel speed, nor about the kernels' peak memory; they prove the "
    "suites run. Bytes saved for backward are counted exactly on any device."
)
QUANTILES = (0.5, 0.2, 0.8)
HOST_CALLS = 20
HOST_REPEATS = 5
ENV_KEYS = (
    "device", "device_type", "torch", "triton", "fastlora", "cuda", "backend", "timestamp", "quick", "headline",
)  # fmt: skip

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


def environment(device: torch.device | None = None, quick: bool = False, headline: bool = False) -> dict:
    """What a row needs to be read later: device name, versions, the fastlora backend, a UTC timestamp, and whether
    the run was a smoke run (``quick``) or of the headline cases (``headline``)."""
    device = device or bench_device()
    return {
        "device": _device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "fastlora": version("fastlora"),
        "cuda": torch.version.cuda,
        "backend": bench_backend(device),
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "quick": quick,
        "headline": headline,
    }


def device_slug(device: torch.device | None = None) -> str:
    """A folder name for the device: ``nvidia-h100-80gb-hbm3``, or ``cpu`` for every CPU."""
    device = device or bench_device()
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", _device_name(device).lower()).strip("-")


def default_out_dir(device: torch.device | None = None, headline: bool = False) -> Path:
    """``benchmarks/results/<device>/``, and its ``headline/`` folder for headline runs (kept apart from the full
    suites' rows)."""
    folder = Path("benchmarks") / "results" / device_slug(device)
    return folder / "headline" if headline else folder


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


def without_grad(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """``fn`` run under ``torch.no_grad``: an inference call, timed as a server makes it."""

    def call() -> torch.Tensor:
        with torch.no_grad():
            return fn()

    return call


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Build modules with ``dtype`` parameters: a model is built in its dtype, never in fp32 and then cast."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def free_memory(device: torch.device) -> None:
    """Let go of what the last case or contender left behind before the next one is built (suites keep one model in
    memory at a time)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


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


def host_us(fn: Callable[[], object], device: torch.device, max_run_time: float | None = None) -> float:
    """Host time per call of ``fn`` in microseconds (see the module docstring). ``max_run_time`` (seconds) bounds the
    measurement when a call is slow (a CPU running the whole call): each run then issues fewer calls, at least one."""

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    synchronize()
    start = time.perf_counter()
    fn()  # warm-up: lazy initialisation, autotuning and compilation stay out of the figure
    synchronize()
    calls = HOST_CALLS
    if max_run_time is not None:
        first = time.perf_counter() - start
        calls = max(1, min(HOST_CALLS, int(max_run_time / (HOST_REPEATS * max(first, 1e-9)))))
    runs = []
    for _ in range(HOST_REPEATS):
        synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        runs.append((time.perf_counter() - start) / calls * 1e6)
        synchronize()
    return statistics.median(runs)


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
    """A benchmark suite as the runner sees it. ``run(device, quick, progress_bar, headline)`` returns rows (flat dicts:
    ``suite``, ``contender``, the case's fields, ``shape``, ``dtype``, measurements); with ``headline`` it runs only
    the cases that the README's targets are read from (``fastlora.bench.targets``), none if it feeds no target; ``markdown(rows)`` returns the
    lines of its section of results.md (its tables); ``plots(rows, out_dir)`` writes its PNGs and returns their
    paths. ``plot_names`` are the file names ``plots`` may write, so that a rerun can remove stale ones."""

    name: str
    run: Callable[..., list[dict]]
    markdown: Callable[[list[dict]], list[str]]
    plots: Callable[[list[dict], Path], list[Path]]
    plot_names: tuple[str, ...]


def multilevel_suite(name: str, levels: tuple[Suite, ...]) -> Suite:
    """One suite measured at several levels (each a ``Suite`` named for its level): its rows are the levels' in turn,
    each marked with ``suite`` = ``name`` and ``level`` = the level's name, so that results.json and results.md show
    one suite; its tables and plots are each level's, drawn from that level's rows."""

    def of(level: Suite, rows: list[dict]) -> list[dict]:
        return [row for row in rows if row["level"] == level.name]

    def run(
        device: torch.device, quick: bool = False, progress_bar: bool = False, headline: bool = False
    ) -> list[dict]:
        return [
            {"suite": name, "level": level.name, **row}
            for level in levels
            for row in level.run(device, quick, progress_bar, headline)
        ]

    def markdown(rows: list[dict]) -> list[str]:
        lines: list[str] = []
        for level in levels:
            if own := of(level, rows):
                lines += [*([""] if lines else []), *level.markdown(own)]
        return lines

    def plots(rows: list[dict], out_dir: Path) -> list[Path]:
        return [path for level in levels if (own := of(level, rows)) for path in level.plots(own, out_dir)]

    return Suite(name, run, markdown, plots, tuple(plot for level in levels for plot in level.plot_names))


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


def assert_close(
    got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, reduce_len: int, what: str,
    want_dtype: torch.dtype | None = None,
) -> None:  # fmt: skip
    """``|got - want| <= tol · max|want|`` elementwise, with ``tol = fastlora.reference.tolerance(dtype, reduce_len)``:
    ``got`` is a result of ``dtype`` whose every element sums ``reduce_len`` products along its longest chain of
    reductions. ``want_dtype`` says that ``want`` is no fp64 reference but another approximation, computed in
    ``want_dtype`` over the same sums: both may be off, so the sum of their tolerances is allowed. Raises
    ``BenchmarkMismatch`` naming ``what``."""
    tol = tolerance(dtype, reduce_len)
    if want_dtype is not None:
        tol += tolerance(want_dtype, reduce_len)
    got, want = got.detach().double(), want.detach().double()
    scale = want.abs().max().item() or 1.0
    try:
        torch.testing.assert_close(got, want, rtol=0.0, atol=tol * scale)
    except AssertionError as e:
        raise BenchmarkMismatch(f"{what}; not timing it ({dtype}, reduction {reduce_len}).\n{e}") from None


def fmt_bytes(n: float | None) -> str:
    """``n`` bytes in MiB (KiB below one MiB) for tables."""
    if n is None:
        return "n/a"
    if abs(n) < 2**20:
        return f"{n / 2**10:.1f} KiB"
    return f"{n / 2**20:.1f} MiB"


def fmt_ratio(value: float | None) -> str:
    """A ratio for tables (``1.23×``), or nothing when there is none."""
    return "" if value is None else f"{value:.2f}×"


def md_table(header: list[str], lines: Iterable[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join(["---:"] * len(header)) + " |"]
    out += ["| " + " | ".join(map(str, line)) + " |" for line in lines]
    return out


def by_case(rows: list[dict], fields: list[str]) -> dict[tuple, dict[str, dict]]:
    """``rows`` grouped for a table with a line per case: ``{values of fields: {contender: row}}``, in row order."""
    out: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        out.setdefault(tuple(row.get(f, "") for f in fields), {})[row["contender"]] = row  # older rows may lack a field
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


def grouped_bars(ax, groups: list, contenders: list[str], heights: dict[tuple, float]) -> list:
    """A group of bars at x = 0, 1, ... for each of ``groups``, a bar per contender side by side, ``heights[(group,
    contender)]`` high (0 where it has none); returns each contender's bars."""
    width = 0.8 / max(len(contenders), 1)
    bars = []
    for i, name in enumerate(contenders):
        offset = (i - (len(contenders) - 1) / 2) * width
        xs = [j + offset for j in range(len(groups))]
        bars.append(ax.bar(xs, [heights.get((group, name), 0) for group in groups], width, label=name))
    return bars


def save_plot(fig, path: Path) -> Path:
    """Write ``fig`` as a PNG at ``path`` and free it (pyplot keeps every open figure alive)."""
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path
