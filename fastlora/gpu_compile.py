"""Compiling fastlora's kernels for NVIDIA GPUs on a machine without one: the driver of the static check
(``fastlora.static_check``) and of the AOT build (``fastlora.aot``).

A compile is one kernel of ``fastlora.kernels.GPU_KERNELS``, one call ``Site`` (the pointer dtypes by role, the strides
the launcher passes as 1, the constexpr switches), one autotune config and one architecture:

- ``kernel_signature`` builds Triton's signature, constexprs and alignment attributes as the JIT would at that call;
- ``compile_kernel`` runs ``triton.compile`` for a ``GPUTarget`` (no GPU and no CUDA driver needed);
- ``resources`` reads registers and spilled bytes from the cubin with the ``cuobjdump`` shipped in the Triton wheel;
- ``ptxas_log`` re-assembles the PTX as Triton does, with the wheel's ``ptxas -v``, for what Triton's own compile does
  not show: ``advisories`` picks ptxas's performance advisories from it (``C75xx``, e.g. C7515: wgmma serialised);
- ``disassemble`` reads the SASS of many cubins with one ``nvdisasm`` run; ``mma_kind`` and ``uses_tma`` classify it;
- ``map_in_workers`` runs compiles in spawned processes with the interpreter off.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import inspect
import io
import itertools
import multiprocessing
import os
import re
import struct
import subprocess
import tempfile
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor

import triton

ARCHS = (80, 90)
ELEM_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}
MMA_KINDS = ("HGMMA", "HMMA", "none")

# The CUDA tools shipped in the Triton wheel.
_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
# A ptxas performance advisory, from its code to the end of the line: ``(C7515) Potential Performance Loss: ...``.
_ADVISORY = re.compile(r"\(C75\d\d\).*")
# One instruction of nvdisasm's output: ``/*0a30*/   @P0 HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24 ;``.
_SASS_LINE = re.compile(r"/\*([0-9a-f]+)\*/\s*(.*)")
_TMA = re.compile(r"\b(UTMALDG|UTMASTG|UTMAREDG|UBLKCP)\b")


@dataclasses.dataclass(frozen=True)
class Site:
    """One way a launcher calls a kernel: its pointer dtypes (by role), its unit strides, its switches."""

    name: str
    pointers: dict[str, str]  # argument -> "act" | "lora" | "fp32" | "i32" | "i64" | "u8"
    unit_strides: tuple[str, ...]  # strides equal to 1, which Triton specialises as constants
    constexprs: dict[str, object]
    # The (activation, LoRA) dtype pairs compiled at this site, when not every pair the check runs.
    dtypes: tuple[tuple[str, str], ...] | None = None


def kernel_signature(fn, site: Site, act: str, lora: str, config: triton.Config) -> tuple[dict, dict, dict]:
    """Triton signature, constexprs and alignment attributes of the jit function ``fn`` for one compile, as the JIT
    would build them; ``act`` and ``lora`` are the dtypes of the pointers with those roles."""
    roles = {"act": act, "lora": lora, "fp32": "fp32", "i32": "i32", "i64": "i64", "u8": "u8"}
    constexprs = {**site.constexprs, **config.kwargs}
    signature, attrs = {}, {}
    # The Python function under the JIT (or the interpreter's) wrapper: its defaults and annotations.
    params = inspect.signature(getattr(fn, "fn", fn)).parameters
    for index, arg in enumerate(fn.arg_names):
        param = params[arg]
        if arg not in constexprs and param.default is not param.empty and "constexpr" in str(param.annotation):
            constexprs[arg] = param.default  # a switch the site leaves at its default (a dense W0: QBLOCK = 0)
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
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=_options(config))


def _options(config: triton.Config) -> dict:
    """The compile options of ``config``: its warps and stages."""
    return {"num_warps": config.num_warps, "num_stages": config.num_stages}


def resources(cubin: bytes) -> tuple[int, int]:
    """``(registers, spilled bytes)`` from ``cuobjdump --dump-resource-usage``."""
    tool = os.path.join(_BIN, "cuobjdump")
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


def ptxas_log(ptx: str, config: triton.Config, arch: int) -> str:
    """ptxas's ``-v`` output for ``ptx`` (compiled for ``sm_<arch>`` with ``config``), which Triton prints only on
    request: the PTX re-assembled by Triton's own backend (``make_cubin``), so with the ptxas, the target (``sm_90a``
    for 90) and the flags of the compile itself. The flags matter: register allocation, and with it some advisories,
    depends on them."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    backend = make_backend(GPUTarget("cuda", arch, 32))
    log = io.StringIO()
    with knobs.nvidia.scope(), contextlib.redirect_stdout(log):
        knobs.nvidia.dump_ptxas_log = True
        backend.make_cubin(ptx, {}, backend.parse_options(_options(config)), arch)
    return log.getvalue()


def advisories(log: str) -> list[str]:
    """Every performance advisory in ptxas's ``-v`` output, each from its code on: ``(C7515) Potential Performance
    Loss: wgmma.mma_async instructions are serialized due to ...``."""
    return [match.group(0).strip() for match in _ADVISORY.finditer(log)]


def _code(cubin: bytes) -> bytes:
    """The machine code of a cubin: its ``.text*`` sections (the kernel and any function it calls), in file order."""
    (sections_at,) = struct.unpack_from("<Q", cubin, 0x28)  # ELF64 header: e_shoff
    entry_size, count, names_index = struct.unpack_from("<HHH", cubin, 0x3A)  # e_shentsize, e_shnum, e_shstrndx
    # Each section header: sh_name, sh_type, sh_flags, sh_addr, sh_offset, sh_size.
    sections = [struct.unpack_from("<IIQQQQ", cubin, sections_at + i * entry_size) for i in range(count)]
    names_at = sections[names_index][4]
    return b"".join(
        cubin[offset : offset + size]
        for name, _, _, _, offset, size in sections
        if cubin.startswith(b".text", names_at + name)
    )


def disassemble(cubins: list[bytes], arch: int) -> list[str]:
    """The SASS of each cubin (all for ``sm_<arch>``), one instruction a line: their code laid end to end and read by
    one ``nvdisasm`` run, then split at each cubin's first address. The disassembler takes about 0.25 s of CPU to
    start, more than it spends on a kernel, so one run serves many."""
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    if not cubins:
        return []
    codes = [_code(cubin) for cubin in cubins]
    with tempfile.NamedTemporaryFile(suffix=".bin") as f:
        f.write(b"".join(codes))
        f.flush()
        text = subprocess.run(
            [os.path.join(_BIN, "nvdisasm"), "--binary", "SM" + sm_arch_from_capability(arch)[3:], f.name],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    ends = list(itertools.accumulate(len(code) for code in codes))
    lines = [[] for _ in codes]
    for match in _SASS_LINE.finditer(text):
        lines[bisect.bisect_right(ends, int(match.group(1), 16))].append(match.group(2))
    return ["\n".join(kernel) for kernel in lines]


def mma_kind(sass: str) -> str:
    """The tensor-core instructions a kernel issues: ``"HGMMA"`` (Hopper's warpgroup MMA, wgmma) if any, else ``"HMMA"``
    (the warp-level MMA of sm_80, which sm_90 also runs) if any, else ``"none"`` (e.g. an fp32 dot as FFMA)."""
    for kind in ("HGMMA", "HMMA"):
        if re.search(rf"\b{kind}\b", sass):
            return kind
    return "none"


def uses_tma(sass: str) -> bool:
    """Whether a kernel moves tiles with the Tensor Memory Accelerator (bulk tensor loads, stores or copies)."""
    return _TMA.search(sass) is not None


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
