"""Static GPU check: compile every kernel with every shipped config for real NVIDIA targets, without a GPU.

Each kernel is compiled with ``triton.compile`` for sm_80 (A100) and sm_90 (H100) at every call site (the unit
strides and feature switches the launchers really pass) and every dtype combination, with each autotune config
that the launcher's shared-memory pruning keeps for that dtype. The cubin's resource usage is read with the
``cuobjdump`` shipped in the Triton wheel. A kernel passes when it compiles, spills nothing to local memory and
fits the architecture's shared memory. ``fastlora info`` prints the table; the test suite asserts it.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import re
import subprocess
import tempfile
from concurrent.futures import ProcessPoolExecutor

import triton

from .kernels import expand, multi_lora, onepass, shrink, wgrad
from .kernels._common import SMEM_LIMIT

ARCHS = (80, 90)
# (activation dtype, LoRA weight dtype): fp16 behaves as bf16 for registers and shared memory.
DTYPES = (("bf16", "fp32"), ("bf16", "bf16"), ("fp32", "fp32"))
_ELEM_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}


@dataclasses.dataclass(frozen=True)
class Site:
    """One way a launcher calls a kernel: its pointer dtypes (by role), its unit strides, its switches."""

    name: str
    pointers: dict[str, str]  # argument -> "act" | "lora" | "fp32" | "i32" | "i64"
    unit_strides: tuple[str, ...]  # strides equal to 1, which Triton specialises as constants
    constexprs: dict[str, object]


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    name: str
    fn: object  # the JITFunction under the autotuner
    configs: list
    sites: tuple[Site, ...]
    config_ok: object  # (config, act_bytes, lora_bytes, **constexprs) -> whether the launcher's pruning keeps it


@dataclasses.dataclass
class Result:
    kernel: str
    site: str
    dtypes: str
    config: str
    arch: int
    registers: int = -1
    shared: int = -1
    spills: int = -1
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and self.spills == 0 and 0 <= self.shared <= SMEM_LIMIT[self.arch]


def kernel_specs() -> list[KernelSpec]:
    """Every kernel, its GPU configs (never the interpreter's single config) and its call sites."""
    common = {"UPCAST": False, "PRECISION": "tf32"}
    shrink_spec = KernelSpec(
        "lora_shrink",
        shrink._lora_shrink_kernel.fn,
        shrink._shrink_gpu_configs(),
        (
            Site("fwd xs=s·D(x)·Aᵀ", {"x_ptr": "act", "wt_ptr": "lora", "out_ptr": "lora", "seed_ptr": "i64"},
                 ("stride_xk", "stride_wk", "stride_or"), {**common, "DROPOUT": True, "BLOCK_R": 64}),
            Site("bwd dxa=s·dy·B", {"x_ptr": "act", "wt_ptr": "lora", "out_ptr": "lora", "seed_ptr": "i64"},
                 ("stride_xk", "stride_wr", "stride_or"), {**common, "DROPOUT": False, "BLOCK_R": 64}),
        ),
        shrink.config_ok,
    )  # fmt: skip
    expand_ptrs = {"x_ptr": "act", "wt_ptr": "act", "l_ptr": "lora", "rt_ptr": "lora", "bias_ptr": "act",
                   "out_ptr": "act", "seed_ptr": "i64"}  # fmt: skip
    expand_spec = KernelSpec(
        "lora_expand",
        expand._lora_expand_kernel.fn,
        expand._expand_gpu_configs(),
        (
            Site("fwd y=x·W0ᵀ+xs·Bᵀ+b", expand_ptrs, ("stride_xk", "stride_wk", "stride_lr", "stride_rr", "stride_on"),
                 {**common, "HAS_BIAS": True, "DROPOUT": False, "BLOCK_R": 64}),
            Site("bwd dx=dy·W0+D'(dxa·A)", expand_ptrs, ("stride_xk", "stride_wn", "stride_lr", "stride_rn", "stride_on"),
                 {**common, "HAS_BIAS": False, "DROPOUT": True, "BLOCK_R": 64}),
        ),
        expand.config_ok,
    )  # fmt: skip
    onepass_spec = KernelSpec(
        "lora_onepass",
        onepass._lora_onepass_kernel.fn,
        onepass._onepass_gpu_configs(),
        tuple(
            Site(f"fwd r<={r_pad}", {"x_ptr": "act", "wt_ptr": "act", "at_ptr": "lora", "bt_ptr": "lora",
                                    "bias_ptr": "act", "y_ptr": "act", "xs_ptr": "lora", "seed_ptr": "i64"},
                 ("stride_xk", "stride_wk", "stride_ak", "stride_br", "stride_yn", "stride_sr"),
                 {**common, "HAS_BIAS": True, "DROPOUT": True, "STORE_XS": True, "R_PAD": r_pad})
            for r_pad in (16, 64, onepass.MAX_RANK)
        ),
        onepass.config_ok,
    )  # fmt: skip
    wgrad_spec = KernelSpec(
        "lora_wgrad",
        wgrad._lora_wgrad_kernel.fn,
        wgrad._wgrad_gpu_configs(),
        (
            Site("dA=dxaᵀ·D(x)", {"u_ptr": "lora", "v_ptr": "act", "out_ptr": "fp32", "seed_ptr": "i64"},
                 ("stride_ur", "stride_vq", "stride_oq"), {**common, "DROPOUT": True, "BLOCK_R": 64}),
            Site("dBᵀ=xsᵀ·dy", {"u_ptr": "lora", "v_ptr": "act", "out_ptr": "fp32", "seed_ptr": "i64"},
                 ("stride_ur", "stride_vq", "stride_oq"), {**common, "DROPOUT": False, "BLOCK_R": 64}),
        ),
        wgrad.config_ok,
    )  # fmt: skip
    meta_ptrs = {"sorted_ids_ptr": "i32", "seg_offsets_ptr": "i32", "seg_slots_ptr": "i32", "ranks_ptr": "i32",
                 "scalings_ptr": "fp32", "token_scales_ptr": "fp32", "token_slots_ptr": "i32"}  # fmt: skip
    multi_shrink_spec = KernelSpec(
        "multi_lora_shrink",
        multi_lora._multi_shrink_kernel.fn,
        multi_lora._shrink_gpu_configs(),
        tuple(
            Site(name, {"x_ptr": "act", "a_ptr": "lora", "xa_ptr": "fp32", **meta_ptrs},
                 ("stride_xk", "stride_ak", "stride_or"), {**common, "SPLIT_K": split_k, "BLOCK_R": block_r})
            for name, split_k, block_r in (("decode r<=16 split 8", 8, 16), ("prefill r<=64", 1, 64))
        ),
        multi_lora.shrink_config_ok,
    )  # fmt: skip
    multi_expand_spec = KernelSpec(
        "multi_lora_expand",
        multi_lora._multi_expand_kernel.fn,
        multi_lora._expand_gpu_configs(),
        (
            Site("y+=c·xa·Bᵀ", {"xa_ptr": "fp32", "b_ptr": "lora", "y_ptr": "act", **meta_ptrs},
                 ("stride_or", "stride_br", "stride_yn"), {**common, "HAS_TOKEN_SCALES": True}),
        ),
        multi_lora.expand_config_ok,
    )  # fmt: skip
    fused_ptrs = {"x_ptr": "act", "wt_ptr": "act", "bias_ptr": "act", "xa_ptr": "fp32", "b_ptr": "lora",
                  "y_ptr": "act", **meta_ptrs}  # fmt: skip
    multi_fused_spec = KernelSpec(
        "multi_lora_fused",
        multi_lora._multi_fused_kernel.fn,
        multi_lora._fused_gpu_configs(),
        (
            Site("decode W0 [N,K] split 8", fused_ptrs, ("stride_xk", "stride_wk", "stride_or", "stride_br", "stride_yn"),
                 {**common, "HAS_BIAS": True, "HAS_TOKEN_SCALES": True, "SPLIT_K": 8}),
            Site("decode W0 [K,N] split 1", fused_ptrs, ("stride_xk", "stride_wn", "stride_or", "stride_br", "stride_yn"),
                 {**common, "HAS_BIAS": True, "HAS_TOKEN_SCALES": False, "SPLIT_K": 1}),
        ),
        multi_lora.fused_config_ok,
    )  # fmt: skip
    return [shrink_spec, expand_spec, onepass_spec, wgrad_spec, multi_shrink_spec, multi_expand_spec, multi_fused_spec]


def _signature(spec: KernelSpec, site: Site, act: str, lora: str, config) -> tuple[dict, dict, dict]:
    """Triton signature, constexprs and alignment attributes for one compile, as the JIT would build them."""
    roles = {"act": act, "lora": lora, "fp32": "fp32", "i32": "i32", "i64": "i64"}
    constexprs = {**site.constexprs, **config.kwargs}
    signature, attrs = {}, {}
    for index, arg in enumerate(spec.fn.arg_names):
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


def _config_name(config) -> str:
    blocks = "x".join(str(v) for k, v in config.kwargs.items() if k.startswith("BLOCK"))
    return f"{blocks} w{config.num_warps} s{config.num_stages}"


def _resources(cubin: bytes) -> tuple[int, int]:
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


def _compile_one(job) -> Result:
    spec_index, site_index, config_index, act, lora, arch = job
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    spec = kernel_specs()[spec_index]
    site, config = spec.sites[site_index], spec.configs[config_index]
    result = Result(spec.name, site.name, f"{act}/{lora}", _config_name(config), arch)
    signature, constexprs, attrs = _signature(spec, site, act, lora, config)
    try:
        source = ASTSource(fn=spec.fn, signature=signature, constexprs=constexprs, attrs=attrs)
        options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
        result.shared = int(compiled.metadata.shared)
        result.registers, result.spills = _resources(compiled.asm["cubin"])
    except Exception as e:  # noqa: BLE001 - every failure is a row in the report
        result.error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"[:300]
    return result


def jobs(archs=ARCHS, dtypes=DTYPES, kernels=None) -> list[tuple]:
    """Every (kernel, site, config, dtypes, arch) the launchers can run, after shared-memory pruning."""
    out = []
    for si, spec in enumerate(kernel_specs()):
        if kernels is not None and spec.name not in kernels:
            continue
        for ti, site in enumerate(spec.sites):
            for act, lora in dtypes:
                for ci, config in enumerate(spec.configs):
                    if not spec.config_ok(config, _ELEM_BYTES[act], _ELEM_BYTES[lora], **site.constexprs):
                        continue  # the launcher prunes it for these dtypes and switches, so it never runs
                    out.extend((si, ti, ci, act, lora, arch) for arch in archs)
    return out


def run_static_check(archs=ARCHS, dtypes=DTYPES, kernels=None, workers: int | None = None) -> list[Result]:
    """Compile everything (or the named ``kernels``) in worker processes; one ``Result`` per compile.

    Workers are spawned with ``TRITON_INTERPRET`` unset: when this process runs the interpreter, its ``@triton.jit``
    functions were replaced at import and cannot be compiled for a GPU target, but a fresh import can.
    """
    todo = jobs(archs, dtypes, kernels)
    workers = workers or max(1, os.cpu_count() or 1)
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:  # a spawned worker inherits the environment as it is when the worker starts
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            return list(pool.map(_compile_one, todo, chunksize=4))
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved


def format_table(results: list[Result]) -> str:
    """A markdown table: one row per compile."""
    lines = [
        "| kernel | site | dtypes (act/lora) | config | arch | registers | shared (B) | spills (B) | status |",
        "| --- | --- | --- | --- | --- | ---: | ---: | ---: | --- |",
    ]
    for r in results:
        status = "ok" if r.ok else (r.error or ("spills" if r.spills else "shared memory over the limit"))
        lines.append(
            f"| {r.kernel} | {r.site} | {r.dtypes} | {r.config} | sm_{r.arch} | {r.registers} | {r.shared} | "
            f"{r.spills} | {status} |"
        )
    return "\n".join(lines)
