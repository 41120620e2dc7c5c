"""Compiling fastlora's kernels for NVIDIA GPUs on a machine without one: the driver of the static check
(``fastlora.static_check``) and of the AOT build (``fastlora.aot``).

A compile is one kernel of ``fastlora.kernels.GPU_KERNELS``, one call ``Site`` (the pointer dtypes by role, the strides
the launcher passes as 1, the constexpr switches), one autotune config and one architecture:

- ``kernel_signature`` builds Triton's signature, constexprs and alignment attributes as the JIT would at that call;
- ``compile_kernel`` runs ``triton.compile`` for a ``GPUTarget`` (no GPU and no CUDA driver needed);
- ``resources`` reads registers and spilled bytes from the cubin with the ``cuobjdump`` shipped in the Triton wheel;
- ``map_in_workers`` runs compiles in spawned processes with the interpreter off.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor

import triton

ARCHS = (80, 90)
ELEM_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}


@dataclasses.dataclass(frozen=True)
class Site:
    """One way a launcher calls a kernel: its pointer dtypes (by role), its unit strides, its switches."""

    name: str
    pointers: dict[str, str]  # argument -> "act" | "lora" | "fp32" | "i32" | "i64"
    unit_strides: tuple[str, ...]  # strides equal to 1, which Triton specialises as constants
    constexprs: dict[str, object]


def kernel_signature(fn, site: Site, act: str, lora: str, config: triton.Config) -> tuple[dict, dict, dict]:
    """Triton signature, constexprs and alignment attributes of the jit function ``fn`` for one compile, as the JIT
    would build them; ``act`` and ``lora`` are the dtypes of the pointers with those roles."""
    roles = {"act": act, "lora": lora, "fp32": "fp32", "i32": "i32", "i64": "i64"}
    constexprs = {**site.constexprs, **config.kwargs}
    signature, attrs = {}, {}
    for index, arg in enumerate(fn.arg_names):
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg in site.unit_strides:
            signature[arg] = "constexpr"
            constexprs[arg] = 1
        elif arg in site.pointers:
            signature[arg] = "*" + roles[site.pointers[arg]]
            attrs[(index,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
        elif arg.startswith("stride_") or arg in ("K", "N", "Q", "chunk"):
            signature[arg] = "i32"
            attrs[(index,)] = [["tt.divisibility", 16]]  # hidden sizes are multiples of 16 in practice
        elif arg in ("scale", "scaling", "keep_scale"):
            signature[arg] = "fp32"
        else:
            signature[arg] = "i32"
    return signature, constexprs, attrs


def config_name(config: triton.Config) -> str:
    """``64x64 w4 s4``: the config's tile sizes, warps and stages."""
    blocks = "x".join(str(v) for k, v in config.kwargs.items() if k.startswith("BLOCK"))
    return f"{blocks} w{config.num_warps} s{config.num_stages}"


def compile_kernel(fn, signature: dict, constexprs: dict, attrs: dict, config: triton.Config, arch: int):
    """``triton.compile`` of ``fn`` (with ``kernel_signature``'s three dicts) for ``sm_<arch>`` with ``config``'s warps
    and stages: the compiled kernel, whose ``asm`` holds the PTX and the cubin and ``metadata`` the shared memory."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def resources(cubin: bytes) -> tuple[int, int]:
    """``(registers, spilled bytes)`` from ``cuobjdump --dump-resource-usage``."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run(
            [tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    regs = int(re.search(r"REG:(\d+)", text).group(1))
    local = int(re.search(r"LOCAL:(\d+)", text).group(1))
    stack = int(re.search(r"STACK:(\d+)", text).group(1))
    return regs, local + stack


def map_in_workers(
    fn: Callable, jobs: Iterable, workers: int, env: dict[str, str] | None = None, chunksize: int = 1
) -> list:
    """``[fn(job) for job in jobs]``, computed in ``workers`` spawned processes whose environment has ``env`` set and
    ``TRITON_INTERPRET`` unset: when this process runs the interpreter, its ``@triton.jit`` functions were replaced at
    import and cannot be compiled for a GPU target, but a fresh import can."""
    changes = env or {}
    saved = {name: os.environ.get(name) for name in [*changes, "TRITON_INTERPRET"]}
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.update(changes)
    try:  # a spawned worker inherits the environment as it is when the worker starts
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            return list(pool.map(fn, jobs, chunksize=chunksize))
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
