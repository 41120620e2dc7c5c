"""Static GPU check: compile every kernel with every shipped config for real NVIDIA targets, without a GPU.

Each kernel is compiled with ``triton.compile`` for sm_80 (A100) and sm_90 (H100) at every call site (the unit
strides and feature switches the launchers really pass) and every dtype combination, with each autotune config
that the launcher's shared-memory pruning keeps for that dtype. The cubin's resource usage is read with the
``cuobjdump`` shipped in the Triton wheel. A kernel passes when it compiles, spills nothing to local memory and
fits the architecture's shared memory. ``fastlora info`` prints the table; the test suite asserts it. The compiles
themselves are ``fastlora.gpu_compile``'s, which the AOT build shares.
"""

from __future__ import annotations

import dataclasses
import os

from .gpu_compile import (
    ARCHS,
    ELEM_BYTES,
    Site,
    compile_kernel,
    config_name,
    kernel_signature,
    map_in_workers,
    resources,
)
from .kernels import SMEM_LIMIT, GpuKernel, expand, multi_lora, onepass, shrink, wgrad

# (activation dtype, LoRA weight dtype): fp16 behaves as bf16 for registers and shared memory.
DTYPES = (("bf16", "fp32"), ("bf16", "bf16"), ("fp32", "fp32"))


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """A kernel and the call sites its launchers compile it at."""

    kernel: GpuKernel
    sites: tuple[Site, ...]

    @property
    def name(self) -> str:
        return self.kernel.name

    @property
    def fn(self):
        return self.kernel.fn

    @property
    def configs(self) -> list:
        return self.kernel.configs


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
        shrink.GPU_KERNEL,
        (
            Site("fwd xs=s·D(x)·Aᵀ", {"x_ptr": "act", "wt_ptr": "lora", "out_ptr": "lora", "seed_ptr": "i64"},
                 ("stride_xk", "stride_wk", "stride_or"), {**common, "DROPOUT": True, "BLOCK_R": 64}),
            Site("bwd dxa=s·dy·B", {"x_ptr": "act", "wt_ptr": "lora", "out_ptr": "lora", "seed_ptr": "i64"},
                 ("stride_xk", "stride_wr", "stride_or"), {**common, "DROPOUT": False, "BLOCK_R": 64}),
        ),
    )  # fmt: skip
    expand_ptrs = {"x_ptr": "act", "wt_ptr": "act", "l_ptr": "lora", "rt_ptr": "lora", "bias_ptr": "act",
                   "out_ptr": "act", "seed_ptr": "i64"}  # fmt: skip
    expand_spec = KernelSpec(
        expand.GPU_KERNEL,
        (
            Site("fwd y=x·W0ᵀ+xs·Bᵀ+b", expand_ptrs, ("stride_xk", "stride_wk", "stride_lr", "stride_rr", "stride_on"),
                 {**common, "HAS_BIAS": True, "DROPOUT": False, "BLOCK_R": 64}),
            Site("bwd dx=dy·W0+D'(dxa·A)", expand_ptrs, ("stride_xk", "stride_wn", "stride_lr", "stride_rn", "stride_on"),
                 {**common, "HAS_BIAS": False, "DROPOUT": True, "BLOCK_R": 64}),
        ),
    )  # fmt: skip
    onepass_spec = KernelSpec(
        onepass.GPU_KERNEL,
        tuple(
            Site(f"fwd r<={r_pad}", {"x_ptr": "act", "wt_ptr": "act", "at_ptr": "lora", "bt_ptr": "lora",
                                    "bias_ptr": "act", "y_ptr": "act", "xs_ptr": "lora", "seed_ptr": "i64"},
                 ("stride_xk", "stride_wk", "stride_ak", "stride_br", "stride_yn", "stride_sr"),
                 {**common, "HAS_BIAS": True, "DROPOUT": True, "STORE_XS": True, "R_PAD": r_pad})
            for r_pad in (16, 64, onepass.MAX_RANK)
        ),
    )  # fmt: skip
    wgrad_spec = KernelSpec(
        wgrad.GPU_KERNEL,
        (
            Site("dA=dxaᵀ·D(x)", {"u_ptr": "lora", "v_ptr": "act", "out_ptr": "fp32", "seed_ptr": "i64"},
                 ("stride_ur", "stride_vq", "stride_oq"), {**common, "DROPOUT": True, "BLOCK_R": 64}),
            Site("dBᵀ=xsᵀ·dy", {"u_ptr": "lora", "v_ptr": "act", "out_ptr": "fp32", "seed_ptr": "i64"},
                 ("stride_ur", "stride_vq", "stride_oq"), {**common, "DROPOUT": False, "BLOCK_R": 64}),
        ),
    )  # fmt: skip
    meta_ptrs = {"sorted_ids_ptr": "i32", "seg_offsets_ptr": "i32", "seg_slots_ptr": "i32", "ranks_ptr": "i32",
                 "scalings_ptr": "fp32", "token_scales_ptr": "fp32", "token_slots_ptr": "i32"}  # fmt: skip
    multi_shrink_spec = KernelSpec(
        multi_lora.SHRINK_GPU_KERNEL,
        tuple(
            Site(name, {"x_ptr": "act", "a_ptr": "lora", "xa_ptr": "fp32", **meta_ptrs},
                 ("stride_xk", "stride_ak", "stride_or"), {**common, "SPLIT_K": split_k, "BLOCK_R": block_r})
            for name, split_k, block_r in (("decode r<=16 split 8", 8, 16), ("prefill r<=64", 1, 64))
        ),
    )  # fmt: skip
    multi_expand_spec = KernelSpec(
        multi_lora.EXPAND_GPU_KERNEL,
        (
            Site("y+=c·xa·Bᵀ", {"xa_ptr": "fp32", "b_ptr": "lora", "y_ptr": "act", **meta_ptrs},
                 ("stride_or", "stride_br", "stride_yn"), {**common, "HAS_TOKEN_SCALES": True}),
        ),
    )  # fmt: skip
    fused_ptrs = {"x_ptr": "act", "wt_ptr": "act", "bias_ptr": "act", "xa_ptr": "fp32", "b_ptr": "lora",
                  "y_ptr": "act", **meta_ptrs}  # fmt: skip
    multi_fused_spec = KernelSpec(
        multi_lora.FUSED_GPU_KERNEL,
        (
            Site("decode W0 [N,K] split 8", fused_ptrs, ("stride_xk", "stride_wk", "stride_or", "stride_br", "stride_yn"),
                 {**common, "HAS_BIAS": True, "HAS_TOKEN_SCALES": True, "SPLIT_K": 8}),
            Site("decode W0 [K,N] split 1", fused_ptrs, ("stride_xk", "stride_wn", "stride_or", "stride_br", "stride_yn"),
                 {**common, "HAS_BIAS": True, "HAS_TOKEN_SCALES": False, "SPLIT_K": 1}),
        ),
    )  # fmt: skip
    return [shrink_spec, expand_spec, onepass_spec, wgrad_spec, multi_shrink_spec, multi_expand_spec, multi_fused_spec]


def _compile_one(job) -> Result:
    spec_index, site_index, config_index, act, lora, arch = job
    spec = kernel_specs()[spec_index]
    site, config = spec.sites[site_index], spec.configs[config_index]
    result = Result(spec.name, site.name, f"{act}/{lora}", config_name(config), arch)
    try:
        compiled = compile_kernel(spec.fn, *kernel_signature(spec.fn, site, act, lora, config), config, arch)
        result.shared = int(compiled.metadata.shared)
        result.registers, result.spills = resources(compiled.asm["cubin"])
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
                    if not spec.kernel.config_ok(config, ELEM_BYTES[act], ELEM_BYTES[lora], **site.constexprs):
                        continue  # the launcher prunes it for these dtypes and switches, so it never runs
                    out.extend((si, ti, ci, act, lora, arch) for arch in archs)
    return out


def run_static_check(archs=ARCHS, dtypes=DTYPES, kernels=None, workers: int | None = None) -> list[Result]:
    """Compile everything (or the named ``kernels``) in worker processes, with the interpreter off; one ``Result``
    per compile."""
    workers = workers or max(1, os.cpu_count() or 1)
    return map_in_workers(_compile_one, jobs(archs, dtypes, kernels), workers, chunksize=4)


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
