"""The ``fastlora`` command: ``fastlora bench`` runs the benchmark suites, ``fastlora info`` prints versions, the
backend, and the static GPU check (every kernel compiled for real NVIDIA targets, no GPU needed): a row per compile
(registers, shared memory, spills, MMA kind, TMA, ptxas performance advisories) and a line per kernel."""

from __future__ import annotations

import argparse
import os
from importlib.metadata import version
from pathlib import Path

import torch
import triton

from . import bench, static_check
from .kernels import is_interpreting
from .ops import resolve_backend


def _bench(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else bench.default_out_dir(headline=args.headline)
    rows, written = bench.run(suite=args.suite, quick=args.quick, out=out, headline=args.headline)
    print(bench.format_markdown(rows))
    if written.targets is not None:
        print(written.targets.read_text())
    files = [written.json, written.markdown, *written.plots, *([written.targets] if written.targets else [])]
    print("wrote " + ", ".join(map(str, files)))
    return 0


def _versions() -> list[str]:
    try:
        cpu_backend = resolve_backend(torch.device("cpu"))
    except (ValueError, RuntimeError) as e:
        cpu_backend = f"none ({e})"
    cuda = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) or "no"
    return [
        f"fastlora {version('fastlora')}",
        f"torch {torch.__version__} ({f'CUDA {torch.version.cuda}' if torch.version.cuda else 'CPU-only build'}), "
        f"CUDA devices: {cuda}",
        f"triton {triton.__version__}, interpreter (TRITON_INTERPRET) {'on' if is_interpreting() else 'off'}",
        f"backend for CPU tensors: {cpu_backend} (FASTLORA_BACKEND={os.environ.get('FASTLORA_BACKEND', 'auto')})",
    ]


def _info(args: argparse.Namespace) -> int:
    print("\n".join(_versions()))
    archs = tuple(args.arch or static_check.ARCHS)
    print(
        f"\nstatic GPU check: compiling {'all kernels' if args.kernels is None else ', '.join(args.kernels)} for "
        f"{', '.join(f'sm_{a}' for a in archs)} ...",
        flush=True,
    )
    results = static_check.run_static_check(archs=archs, kernels=args.kernels, workers=args.workers)
    print(static_check.format_table(results))
    print("\n" + static_check.format_summary(results))
    failed = sum(not r.ok for r in results)
    print(f"\n{len(results)} compiles, {failed} failed" if failed else f"\n{len(results)} compiles, all ok")
    return 1 if failed else 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastlora", description="LoRA for PyTorch with fused Triton kernels.")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("bench", help="run the benchmark suites; write results.json, results.md and plots")
    p.add_argument("--suite", choices=[*bench.SUITES, "all"], default="all",
                   help="which suite to run (default: all); the others' results already in the folder are kept")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="a few cases only: a smoke test of the suite")
    p.add_argument("--headline", action="store_true",
                   help="only the cases of the README's performance targets; also writes targets.md (met or missed)")  # fmt: skip
    p.add_argument("--out", help="output folder (default: benchmarks/results/<device>/, or its headline/ folder)")
    p.set_defaults(func=_bench)

    p = commands.add_parser("info", help="versions, backend, and the static GPU check of every kernel")
    p.add_argument("--arch", type=int, action="append", choices=static_check.ARCHS,
                   help="compute capability to compile for, repeatable (default: all)")  # fmt: skip
    p.add_argument("--kernels", nargs="+", action="extend", metavar="NAME",
                   choices=[spec.name for spec in static_check.kernel_specs()],
                   help="only these kernels (default: all)")  # fmt: skip
    p.add_argument("--workers", type=int, help="compile processes (default: one per CPU)")
    p.set_defaults(func=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fastlora`` console script; returns the exit code."""
    args = _parser().parse_args(argv)
    return args.func(args)
