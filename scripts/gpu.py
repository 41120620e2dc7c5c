"""``./dev gpu [--out DIR] [--quick]``: everything only a GPU can show, measured in one offline run.

It runs with the Python it is given (``$PYTHON``, else ``python3``) as it is: no virtual environment and no network.
Before anything else it checks that torch and triton import and that torch sees a CUDA device; without one it says
so and exits with status 3, having run and installed nothing. Then:

1. installs the project without a package index (``pip install --no-deps --no-build-isolation --no-index -e .``,
   which needs setuptools and wheel in that Python), unless this checkout is already what ``import fastlora`` finds;
   where that install fails, runs it in place instead (``in_place``), changing nothing in that Python;
2. records the environment (GPU, driver, clocks, versions);
3. the CUDA test run, ``pytest -m gpu`` (in up to 8 processes with pytest-xdist; ``tests/test_gpu.py``: every kernel against the fp64 reference at real
   shapes, bitwise-equal gradients over two identical steps, the multi-adapter kernels and ``MultiLoraModel`` against
   PEFT), then, where cmake and a C compiler are present, the C library's build and ctest (its GPU test included);
4. the headline benchmark cases: first their layers' kernels are compiled with every config, in parallel processes
   (``python -m fastlora.bench.warm``), then each suite runs in turn (``fastlora bench --headline --suite S``), so
   that a suite that runs out of time costs only its own rows;
5. ``targets.md``: each target of the README's table, the value measured, met or missed, with the environment and
   the outcome of every step.

A rehearsal on a machine without a GPU (``FASTLORA_GPU_REHEARSAL=1``) runs the same steps there: the CUDA tests in
their CPU dry-run mode (``FASTLORA_GPU_TESTS_ON_CPU=1``: the same test bodies, small shapes, Triton's interpreter),
the benchmarks on the CPU, the same files; it proves the run works end to end before GPU minutes are spent on it, and
measures nothing. Its budgets are four times longer. It leaves out the CUDA tests' serving loops (the decode-graph
tests, most of the dry run's time), whose bodies CI dry-runs with every other CUDA test (``pytest -m gpu``).

Every step has a time budget inside the run's (9¾ minutes, 4 with ``--quick``); Triton compiles each kernel once
across the steps (``TRITON_CACHE_DIR`` under ``build/gpu``) and the benchmarks autotune each key once across the
suites (``TRITON_CACHE_AUTOTUNING=1``); each step's line says how many compiles and searches it made. DIR stays flat
and small: results.json, results.md, targets.md, gpu.log (the environment and every step's output) and the plots, at most
8 files. The exit status is 0 when every step passed (a missed target is a finding, not a failure), else 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NO_DEVICE = 3
BUDGET_S = {"full": 585.0, "quick": 240.0}
MAX_FILES, MAX_FILE_BYTES = 8, 16 * 2**20
LOG = "gpu.log"
OUTPUTS = ("results.json", "results.md", "targets.md", LOG)  # and the plots
# (suite, seconds of the full run's budget, of the quick run's): the cheap suites first; moe and qlora last, as they
# compile (and autotune, one config after another) the grouped kernels and the 4-bit specialisations of the LoRA
# kernels, which `fastlora.bench.warm` does not compile ahead. qlora's quick run measures its full run's two cases.
BENCH_STEPS = (
    ("overhead", 20, 10), ("multi", 80, 30), ("linear", 60, 20), ("train", 50, 20), ("moe", 45, 25), ("qlora", 60, 40),
)  # fmt: skip
TEST_BUDGET_S = {"full": 150.0, "quick": 60.0}
REHEARSAL_TESTS = "not decode_graphs and not decode_step_api"  # a rehearsal's -k: see the module docstring
CMAKE_BUDGET_S = 50.0
WARM_BUDGET_S = {"full": 70.0, "quick": 35.0}


def cuda_problem() -> str | None:
    """Why this Python cannot run the GPU steps (torch or triton missing, or no CUDA device), or None. Creates no CUDA
    context: ``is_available`` only counts devices."""
    try:
        import torch
    except Exception as e:  # noqa: BLE001 - any import failure means the same thing here
        return f"torch does not import ({type(e).__name__}: {e})"
    try:
        import triton  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return f"triton does not import ({type(e).__name__}: {e})"
    if not torch.cuda.is_available():
        build = f"a CUDA {torch.version.cuda} build" if torch.version.cuda else "a CPU-only build"
        return f"torch {torch.__version__} ({build}) sees no CUDA device"
    return None


REHEARSAL = "FASTLORA_GPU_REHEARSAL"
REHEARSAL_SLOWDOWN = 4.0


def default_out_dir(device_name: str) -> Path:
    """``benchmarks/results/<device>/gpu``, the device named as ``fastlora.bench.device_slug`` names it."""
    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")
    return ROOT / "benchmarks" / "results" / slug / "gpu"


@dataclasses.dataclass
class Step:
    name: str
    status: str  # "passed", "failed", "timed out", "skipped"
    seconds: float
    detail: str = ""


class Run:
    """The log, the deadline and the environment the steps share."""

    def __init__(self, out: Path, budget_s: float, python: str, rehearsal: bool = False):
        self.out = out
        self.python = python
        self.rehearsal = rehearsal
        self.slowdown = REHEARSAL_SLOWDOWN if rehearsal else 1.0
        self.start = time.monotonic()
        self.deadline = self.start + budget_s * self.slowdown
        self.steps: list[Step] = []
        out.mkdir(parents=True, exist_ok=True)
        self.log = (out / LOG).open("w")
        cache = ROOT / "build" / "gpu"
        self.env = {
            **{k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTLORA_BACKEND")},
            "PYTHONUNBUFFERED": "1",
            "TRITON_CACHE_DIR": str(cache / "triton-cache"),
            "PIP_NO_INDEX": "1",
            "HF_HUB_OFFLINE": "1",
            **({"FASTLORA_GPU_TESTS_ON_CPU": "1"} if rehearsal else {}),
        }

    def say(self, text: str) -> None:
        print(text, flush=True)
        self.log.write(text + "\n")
        self.log.flush()

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def triton_cache(self) -> tuple[int, int]:
        """``(compiled kernels, autotune results)`` in the run's Triton cache: the cubins, and the searches that
        ``TRITON_CACHE_AUTOTUNING`` saved."""
        root = Path(self.env["TRITON_CACHE_DIR"])
        if not root.exists():
            return 0, 0
        return sum(1 for _ in root.rglob("*.cubin")), sum(1 for _ in root.rglob("*.autotune.json"))

    def command(self, name: str, cmd: list[str], budget_s: float, cwd: Path = ROOT, env: dict | None = None) -> Step:
        """Run ``cmd``, its output into the log and onto stdout, killed (with its children) past ``budget_s`` or the
        run's deadline, whichever comes first."""
        budget = min(budget_s * self.slowdown, self.left())
        if budget < 5:  # a step the budget left out fails the run, unlike one skipped for a missing tool
            step = Step(name, "not run", 0.0, "no time left in the run's budget")
            self.say(f"\n=== {name}: not run, no time left")
            self.steps.append(step)
            return step
        self.say(f"\n=== {name} (budget {budget:.0f} s): {' '.join(cmd)}")
        started, cached = time.monotonic(), self.triton_cache()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env or self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace", start_new_session=True)  # fmt: skip
        timed_out = threading.Event()

        def kill() -> None:
            timed_out.set()
            os.killpg(proc.pid, signal.SIGKILL)

        timer = threading.Timer(budget, kill)
        timer.start()
        last = ""
        for line in proc.stdout:
            sys.stdout.write(line)
            self.log.write(line)
            last = line.strip() or last
        rc = proc.wait()
        timer.cancel()
        self.log.flush()
        seconds = time.monotonic() - started
        status = "timed out" if timed_out.is_set() else ("passed" if rc == 0 else "failed")
        compiled, searched = (now - before for now, before in zip(self.triton_cache(), cached))
        work = [f"{compiled} Triton compiles" if compiled else "", f"{searched} autotune searches" if searched else ""]
        failure = f"exit {rc}: {last[:160]}" if status == "failed" else ""
        detail = ", ".join(filter(None, [failure, *work]))
        step = Step(name, status, seconds, detail)
        self.say(f"=== {name}: {status} in {seconds:.0f} s{f' ({detail})' if detail else ''}")
        self.steps.append(step)
        return step


def fastlora_location(python: str, env: dict | None = None) -> str:
    """Where ``import fastlora`` finds the package (its kernels subpackage too), asked from outside the checkout."""
    code = "import fastlora, fastlora.kernels, pathlib; print(pathlib.Path(fastlora.__file__).resolve().parent)"
    with tempfile.TemporaryDirectory() as elsewhere:
        done = subprocess.run([python, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else ""


def in_place(run: Run) -> bool:
    """Run the checkout without installing it: a folder on ``PYTHONPATH`` holds ``fastlora`` (links to the checkout's
    files, with ``kernels/`` linked in as ``fastlora.kernels``, as ``pyproject.toml`` maps it) and its metadata, and
    ``PYTHONSAFEPATH=1`` keeps the checkout's own ``fastlora/`` folder (no kernels inside) off every child's path."""
    site = ROOT / "build" / "gpu" / "site"
    shutil.rmtree(site, ignore_errors=True)
    package = site / "fastlora"
    package.mkdir(parents=True)
    for entry in (ROOT / "fastlora").iterdir():
        if entry.name != "__pycache__":
            (package / entry.name).symlink_to(entry)
    (package / "kernels").symlink_to(ROOT / "kernels")
    found = re.search(r'^version\s*=\s*"([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    version = found[1] if found else "0+unknown"
    info = site / f"fastlora-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: fastlora\nVersion: {version}\n")
    env = {**run.env, "PYTHONPATH": os.pathsep.join(filter(None, [str(site), run.env.get("PYTHONPATH")])),
           "PYTHONSAFEPATH": "1"}  # fmt: skip
    if fastlora_location(run.python, env) != str(ROOT / "fastlora"):
        return False
    run.env = env
    run.say(f"fastlora: running this checkout in place ({site} on PYTHONPATH)")
    return True


def install(run: Run) -> bool:
    if fastlora_location(run.python) == str(ROOT / "fastlora"):
        run.say("fastlora: this checkout is installed already")
        return True
    cmd = [run.python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-e", str(ROOT)]
    step = run.command("install (offline)", cmd, 120)
    if step.status == "passed" and fastlora_location(run.python) == str(ROOT / "fastlora"):
        return True
    run.say("The offline install failed (it needs setuptools and wheel in this Python); running in place instead.")
    if in_place(run):
        step.status, step.detail = "skipped", "pip could not install offline; ran in place"
        return True
    run.say("fastlora could not be imported in place either.")
    return False


ENV_PROBE = r"""
import json, os, platform, sys
from importlib.metadata import PackageNotFoundError, version
import torch
cuda = torch.cuda.is_available()
props = torch.cuda.get_device_properties(0) if cuda else None
def v(name):
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"
print(json.dumps({
    "gpu": torch.cuda.get_device_name(0) if cuda else "none (a rehearsal on the CPU)",
    "capability": f"{props.major}.{props.minor}" if cuda else "-",
    "multiprocessors": props.multi_processor_count if cuda else 0,
    "memory_gib": round(props.total_memory / 2**30, 1) if cuda else 0,
    "l2_mib": round(getattr(props, "L2_cache_size", 0) / 2**20, 1) if cuda else 0,
    "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
    "python": platform.python_version(), "cpus": os.cpu_count(),
    **{name: v(name) for name in ("triton", "fastlora", "transformers", "peft", "bitsandbytes", "numpy",
                                  "safetensors")},
}))
"""
SMI_FIELDS = ("name,driver_version,pstate,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.draw,power.limit,"
              "temperature.gpu,memory.used,memory.total")  # fmt: skip


def environment(run: Run) -> list[str]:
    """One line per fact: the GPU and its driver and clocks (nvidia-smi), the versions, the commit."""
    lines = []
    probe = subprocess.run([run.python, "-c", ENV_PROBE], env=run.env, capture_output=True, text=True)
    if probe.returncode == 0:
        facts = json.loads(probe.stdout.strip().splitlines()[-1])
        if facts["multiprocessors"]:
            lines.append(
                f"GPU: {facts['gpu']} (compute capability {facts['capability']}, {facts['multiprocessors']} SMs, "
                f"{facts['memory_gib']} GiB, L2 {facts['l2_mib']} MiB)"
            )
        else:
            lines.append(f"GPU: {facts['gpu']}")
        lines.append(f"torch {facts['torch']} (CUDA {facts['cuda']}, cuDNN {facts['cudnn']}), triton {facts['triton']}")
        lines.append(
            f"fastlora {facts['fastlora']}, transformers {facts['transformers']}, peft {facts['peft']}, bitsandbytes "
            f"{facts['bitsandbytes']}, numpy {facts['numpy']}, safetensors {facts['safetensors']}; Python "
            f"{facts['python']}, {facts['cpus']} CPUs"
        )
    else:
        lines.append(f"environment probe failed: {probe.stderr.strip().splitlines()[-1:]}")
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi", f"--query-gpu={SMI_FIELDS}", "--format=csv"], capture_output=True,
                             text=True)  # fmt: skip
        if smi.returncode == 0:
            names, *values = [line.strip() for line in smi.stdout.strip().splitlines()]
            lines += [f"nvidia-smi: {', '.join(f'{n.strip()} = {v.strip()}' for n, v in zip(names.split(','), row.split(',')))}"
                      for row in values]  # fmt: skip
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    lines.append(f"commit: {commit.stdout.strip() if commit.returncode == 0 else 'unknown (no git checkout)'}")
    return lines


def junit_summary(path: Path) -> str:
    """``N passed, N failed, N skipped`` (and errors) from a pytest JUnit XML file, or why there is none."""
    try:
        root = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError):
        return "no test report"
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    passed = total["tests"] - total["failures"] - total["errors"] - total["skipped"]
    text = f"{passed} passed, {total['failures']} failed, {total['skipped']} skipped"
    return text + (f", {total['errors']} errors" if total["errors"] else "")


def test_workers(run: Run) -> int:
    """Processes for the CUDA tests: up to 8 with pytest-xdist (compiles dominate the run, and each process compiles
    its own tests' kernels), else 1. They share the GPU; the tests check results, and time nothing."""
    has_xdist = subprocess.run([run.python, "-c", "import xdist"], env=run.env, capture_output=True).returncode == 0
    return min(8, os.cpu_count() or 1) if has_xdist else 1


def cuda_tests(run: Run, quick: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        cmd = [run.python, "-m", "pytest", "-m", "gpu", "tests", "-q", "-p", "no:cacheprovider", f"--junitxml={report}"]
        workers = test_workers(run)
        cmd += ["-n", str(workers)] if workers > 1 else []
        cmd += ["-k", REHEARSAL_TESTS] if run.rehearsal else []
        env = {**run.env, **({"FASTLORA_GPU_TESTS_QUICK": "1"} if quick else {})}
        step = run.command("CUDA tests (pytest -m gpu)", cmd, TEST_BUDGET_S["quick" if quick else "full"], env=env)
        step.detail = ", ".join(filter(None, [junit_summary(report), step.detail]))


def c_library(run: Run) -> None:
    """The C library's CMake build (its AOT step compiles the kernels) and ctest, GPU test included."""
    missing = [tool for tool in ("cmake", "ctest") if not shutil.which(tool)]
    if not (shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")):
        missing.append("a C compiler")
    if missing:
        run.steps.append(Step("C library (cmake, ctest)", "skipped", 0.0, f"no {', '.join(missing)}"))
        run.say(f"\n=== C library: skipped, no {', '.join(missing)}")
        return
    build, jobs = ROOT / "build" / "gpu" / "cmake", str(os.cpu_count() or 2)
    generator = ["-G", "Ninja"] if shutil.which("ninja") and not (build / "CMakeCache.txt").exists() else []
    script = (
        f"cmake -S {ROOT} -B {build} {' '.join(generator)} -DCMAKE_BUILD_TYPE=Release -DFASTLORA_PYTHON={run.python} "
        f"-DFASTLORA_AOT_WORKERS={jobs} -DFASTLORA_WERROR=OFF && cmake --build {build} --parallel {jobs} && "
        f"ctest --test-dir {build} --output-on-failure"
    )
    run.command("C library (cmake, ctest)", ["bash", "-c", script], CMAKE_BUDGET_S)


def headline_bench(run: Run, quick: bool) -> None:
    """The headline cases a suite at a time. Their autotune searches are saved (``TRITON_CACHE_AUTOTUNING``) and so
    made once across the suites; the CUDA tests' are not, as they time each config briefly."""
    warm = [run.python, "-m", "fastlora.bench.warm", "--workers", str(min(16, os.cpu_count() or 1))]
    run.command("compile ahead (fastlora.bench.warm)", warm + (["--quick"] if quick else []),
                WARM_BUDGET_S["quick" if quick else "full"])  # fmt: skip
    env = {**run.env, "TRITON_CACHE_AUTOTUNING": "1"}
    for suite, full_s, quick_s in BENCH_STEPS:
        cmd = [run.python, "-m", "fastlora", "bench", "--headline", "--suite", suite, "--out", str(run.out)]
        cmd += ["--quick"] if quick else []
        run.command(f"bench --headline --suite {suite}", cmd, quick_s if quick else full_s, env=env)


def step_lines(steps: list[Step]) -> list[str]:
    return [f"{s.name}: {s.status} in {s.seconds:.0f} s{f' ({s.detail})' if s.detail else ''}" for s in steps]


def report_lines(environment_lines: list[str], steps: list[Step], elapsed_s: float, quick: bool) -> list[str]:
    """The environment section of targets.md: the facts, the command and its wall time, every step's outcome."""
    lines = [*environment_lines, f"`./dev gpu{' --quick' if quick else ''}`: {elapsed_s:.0f} s of wall time in all"]
    return lines + [f"step {line}" for line in step_lines(steps)]


def write_targets(out: Path, lines: list[str]) -> Path:
    """``targets.md`` from the headline rows in ``out`` (none if the bench did not run), with ``lines`` as its
    environment section; returns its path."""
    from fastlora.bench import read_rows, targets

    return targets.write_targets(read_rows(out), out, lines)


def write_targets_in_child(run: Run, lines: list[str]) -> Path:
    """``write_targets`` in a new process of ``run.python``: a project installed during this run is importable only
    from processes started after the install."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"out": str(run.out), "lines": lines}, f)
    try:
        subprocess.run([run.python, __file__, "--write-targets", f.name], env=run.env, check=True)
    finally:
        os.unlink(f.name)
    return run.out / "targets.md"


def check_outputs(out: Path) -> list[str]:
    """What makes ``out`` unfit to bring back: more than ``MAX_FILES`` files, a folder, a file over ``MAX_FILE_BYTES``."""
    entries = sorted(out.iterdir())
    problems = [f"{e.name} is a folder" for e in entries if e.is_dir()]
    problems += [
        f"{e.name} is {e.stat().st_size} B" for e in entries if e.is_file() and e.stat().st_size > MAX_FILE_BYTES
    ]
    if len(entries) > MAX_FILES:
        problems.append(f"{len(entries)} entries, over {MAX_FILES}: {', '.join(e.name for e in entries)}")
    return problems


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="./dev gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="output folder (default: benchmarks/results/<device>/gpu)")
    parser.add_argument("--quick", action="store_true", help="a smoke run, budgeted at 4 minutes")
    parser.add_argument("--write-targets", type=Path, help=argparse.SUPPRESS)  # the last step, in a child process
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.write_targets:
        job = json.loads(args.write_targets.read_text())
        write_targets(Path(job["out"]), job["lines"])
        return 0
    problem = cuda_problem()
    rehearsal = os.environ.get(REHEARSAL) == "1"
    if problem is not None and not rehearsal:
        print(f"./dev gpu needs a CUDA device: {problem}. Nothing was installed or run.", file=sys.stderr)
        return NO_DEVICE
    import torch

    device_name = torch.cuda.get_device_name(0) if problem is None else "cpu-rehearsal"
    out = (args.out or default_out_dir(device_name)).resolve()
    mode = "quick" if args.quick else "full"
    if (out / "results.json").exists():  # an earlier run's folder: its files would mix with this run's
        for stale in [*OUTPUTS, *(p.name for p in out.glob("*.png"))]:
            (out / stale).unlink(missing_ok=True)
    run = Run(out, BUDGET_S[mode], sys.executable, rehearsal=problem is not None)
    what = f"a rehearsal without a GPU ({problem}): nothing here is a GPU figure" if run.rehearsal else mode
    run.say(f"./dev gpu ({what}): writing to {out}, {BUDGET_S[mode] * run.slowdown:.0f} s budget")
    if not install(run):
        return 1
    env_lines = environment(run)
    for line in env_lines:
        run.say(line)
    cuda_tests(run, args.quick)
    if not args.quick and not run.rehearsal:
        c_library(run)
    headline_bench(run, args.quick)
    elapsed = time.monotonic() - run.start
    path = write_targets_in_child(run, report_lines(env_lines, run.steps, elapsed, args.quick))
    run.say("\n" + path.read_text())
    run.say("\n".join(["steps:", *step_lines(run.steps), f"{elapsed:.0f} s in all"]))
    problems = check_outputs(out)
    for problem in problems:
        run.say(f"output folder: {problem}")
    run.log.close()
    failed = [s for s in run.steps if s.status not in ("passed", "skipped")] + problems
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
