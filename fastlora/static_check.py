"""Static GPU check: compile every kernel with every shipped config for real NVIDIA targets, without a GPU.

Each kernel is compiled with ``triton.compile`` for sm_80 (A100) and sm_90 (H100) at every call site (the unit
strides and feature switches the launchers really pass) and every dtype combination, with each autotune config
that the launcher's shared-memory pruning keeps for that dtype. From the tools shipped in the Triton wheel, each
compile gets:

- its registers and spilled bytes (``cuobjdump`` on the cubin) and its shared memory (Triton's metadata);
- on sm_90, ptxas's performance advisories (``C75xx``): the PTX re-assembled as Triton assembles it, with ``-v``.
  C7515, for one, says the wgmma of a loop are serialised, so the tensor cores never overlap;
- its MMA instructions (``HGMMA``, ``HMMA`` or none) and whether it uses TMA, read from the SASS (``nvdisasm``).

A compile passes when it compiles, spills nothing to local memory, fits the architecture's shared memory and draws
no performance advisory, and when a GEMM-sized kernel (``KernelSpec.gemm_min_block_m``) issues HGMMA on sm_90.
``fastlora info`` prints the table and a summary per kernel; the test suite asserts it. The compiles themselves are
``fastlora.gpu_compile``'s, which the AOT build shares. A new kernel joins the check as one ``KernelSpec`` in
``kernel_specs``.
"""

from __future__ import annotations

import dataclasses
import os
import re

from .gpu_compile import (
    ARCHS,
    ELEM_BYTES,
    MMA_KINDS,
    Site,
    advisories,
    compile_kernel,
    config_name,
    disassemble,
    kernel_signature,
    map_in_workers,
    mma_kind,
    ptxas_log,
    resources,
    uses_tma,
)
from .kernels import SMEM_LIMIT, GpuKernel, backward, expand, grouped, multi_lora, onepass, shrink, smem_limit, wgrad

# (activation dtype, LoRA weight dtype): fp16 behaves as bf16 for registers and shared memory.
DTYPES = (("bf16", "fp32"), ("bf16", "bf16"), ("fp32", "fp32"))
# Where the PTX is re-assembled for ptxas's performance advisories. They all concern wgmma and setmaxnreg, which only
# sm_90a and later have, so sm_80 has none to report and its compiles skip the extra ptxas run.
ADVISORY_ARCHS = (90,)
# Where a GEMM-sized kernel must issue HGMMA: Hopper's warpgroup MMA, the only path to its tensor-core peak.
HGMMA_ARCHS = (90,)
# One advisory: its code and the reason, without the preamble or the function and PTX line it names.
_ADVISORY = re.compile(r"\((C75\d\d)\)\s*(?:Potential Performance Loss:\s*)?(.*?)(?:\s+in the function '.*)?$")


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """A kernel and the call sites its launchers compile it at.

    ``gemm_min_block_m`` marks a GEMM-sized kernel: one whose main loop runs a full GEMM tile (the base layer's
    ``x·W0ᵀ``), which at large ``M`` is bound by the tensor cores. On sm_90 each of its configs with ``BLOCK_M`` at
    least this must issue HGMMA; below it, a tile too short for wgmma's 64 rows per warpgroup may run HMMA. ``None``
    for the thin kernels, whose other side is a rank of at most 64: they stream their operands once and are bound by
    memory, so HMMA serves them as well.
    """

    kernel: GpuKernel
    sites: tuple[Site, ...]
    gemm_min_block_m: int | None = None
    # Switches the launcher sets from the GPU it runs on, over each site's own: arch -> constexprs.
    arch_constexprs: dict[int, dict[str, object]] = dataclasses.field(default_factory=dict)

    def site_at(self, index: int, arch: int) -> Site:
        """Site ``index`` as the launcher calls it on ``sm_<arch>``."""
        site = self.sites[index]
        return dataclasses.replace(site, constexprs={**site.constexprs, **self.arch_constexprs.get(arch, {})})

    @property
    def name(self) -> str:
        return self.kernel.name

    @property
    def fn(self):
        return self.kernel.fn

    @property
    def configs(self) -> list:
        return self.kernel.configs

    def needs_hgmma(self, config, arch: int) -> bool:
        """Whether ``config`` compiled for ``sm_<arch>`` must issue HGMMA."""
        return (
            arch in HGMMA_ARCHS
            and self.gemm_min_block_m is not None
            and config.kwargs["BLOCK_M"] >= self.gemm_min_block_m
        )


@dataclasses.dataclass
class Result:
    """One compile: what the cubin, ptxas and the SASS say about it."""

    kernel: str
    site: str
    dtypes: str
    config: str
    arch: int
    needs_hgmma: bool = False
    registers: int = -1
    shared: int = -1
    spills: int = -1
    advisories: list[str] = dataclasses.field(default_factory=list)  # ptxas's C75xx lines (``ADVISORY_ARCHS`` only)
    mma: str = ""  # one of ``MMA_KINDS``; empty when it did not compile
    tma: bool = False
    error: str = ""

    @property
    def problems(self) -> list[str]:
        """Why the compile fails the check; empty when it passes."""
        if self.error:
            return [self.error]
        problems = []
        if self.spills != 0:
            problems.append("spills")
        if not 0 <= self.shared <= SMEM_LIMIT[self.arch]:
            problems.append("shared memory over the limit")
        problems.extend(dict.fromkeys(" ".join(_ADVISORY.match(line).groups()) for line in self.advisories))
        if self.needs_hgmma and self.mma != "HGMMA":
            problems.append("no HGMMA")
        return problems

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def status(self) -> str:
        return "; ".join(self.problems) or "ok"


def kernel_specs() -> list[KernelSpec]:
    """Every kernel, its GPU configs (never the interpreter's single config) and its call sites."""
    common = {"UPCAST": False, "PRECISION": "tf32"}
    # W0's 4-bit quantization state: unread with a dense W0 (the pointers only fill the signature); with a 4-bit one
    # (QLoRA), packed codes, a double-quantized uint8 absmax and its fp32 block scales (``load_w_tile``).
    dense_w = {"wq_absmax_ptr": "fp32", "wq_code_ptr": "fp32", "wq_absmax2_ptr": "fp32", "wq_code2_ptr": "fp32",
               "wq_offset_ptr": "fp32"}  # fmt: skip
    nf4_w = {"wt_ptr": "u8", "w_ptr": "u8", "wq_absmax_ptr": "u8", "wq_code_ptr": "fp32", "wq_absmax2_ptr": "fp32",
             "wq_code2_ptr": "fp32", "wq_offset_ptr": "fp32"}  # fmt: skip
    # Every real model's rows hold whole blocks (K % 64 == 0): its tiles are read as bytes, along the rows of the
    # forward's W0ᵀ view (QPACKED 2) and along the columns of the backward's W0 (QPACKED 1).
    nf4 = {"QBLOCK": 64, "QBLOCK2": 256, "QPACKED": 2}
    # QLoRA computes in bf16 or in fp32 (bitsandbytes' default compute dtype) with fp32 adapters (PEFT's); the 4-bit
    # tile's code is the same beside bf16 adapters, which the dense sites compile.
    nf4_dtypes = (("bf16", "fp32"), ("fp32", "fp32"))
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
                   "out_ptr": "act", "seed_ptr": "i64", **dense_w}  # fmt: skip
    # GEMM-sized: the base GEMM with the LoRA terms in its K loop or epilogue (lora_expand, lora_onepass,
    # multi_lora_fused). Thin: lora_shrink and multi_lora_shrink (N is the rank), lora_wgrad (the output is
    # rank × hidden, reduced over tokens: its tiles' BLOCK_M is the reduction), multi_lora_expand (K is the rank).
    expand_spec = KernelSpec(
        expand.GPU_KERNEL,
        (
            Site("fwd y=x·W0ᵀ+xs·Bᵀ+b", expand_ptrs, ("stride_xk", "stride_wk", "stride_lr", "stride_rr", "stride_on"),
                 {**common, "HAS_BIAS": True, "DROPOUT": False, "BLOCK_R": 64}),
            # Ranks up to 32 also run the widest tiles (``expand.config_ok``).
            Site("fwd r<=32 W0 [K,N]", expand_ptrs, ("stride_xk", "stride_wn", "stride_lr", "stride_rr", "stride_on"),
                 {**common, "HAS_BIAS": False, "DROPOUT": False, "BLOCK_R": 32}),
            # QLoRA: W0 in NF4 ([N, K] read as its transpose), its tiles dequantized in the K loop.
            Site("fwd nf4 W0", {**expand_ptrs, **nf4_w}, ("stride_xk", "stride_wk", "stride_lr", "stride_rr",
                                                         "stride_on"),
                 {**common, "HAS_BIAS": False, "DROPOUT": False, "BLOCK_R": 16, **nf4}, dtypes=nf4_dtypes),
            # A K that is no multiple of the block size: element by element (bf16 compute only).
            Site("fwd nf4 W0 K%block!=0", {**expand_ptrs, **nf4_w}, ("stride_xk", "stride_wk", "stride_lr",
                                                                      "stride_rr", "stride_on"),
                 {**common, "HAS_BIAS": False, "DROPOUT": False, "BLOCK_R": 16, **nf4, "QPACKED": 0},
                 dtypes=nf4_dtypes[:1]),
        ),
        gemm_min_block_m=64,
    )  # fmt: skip
    onepass_ptrs = {"x_ptr": "act", "wt_ptr": "act", "at_ptr": "lora", "bt_ptr": "lora", "bias_ptr": "act",
                    "y_ptr": "act", "xs_ptr": "lora", "seed_ptr": "i64", **dense_w}  # fmt: skip
    onepass_spec = KernelSpec(
        onepass.GPU_KERNEL,
        tuple(
            Site(f"fwd r<={r_pad}", onepass_ptrs,
                 ("stride_xk", "stride_wk", "stride_ak", "stride_br", "stride_yn", "stride_sr"),
                 {**common, "HAS_BIAS": True, "DROPOUT": True, "STORE_XS": True, "R_PAD": r_pad})
            for r_pad in (16, 64, onepass.MAX_RANK)
        ) + (
            # Inference and the AOT build: no dropout, nothing stored for the backward.
            Site("fwd r<=32 eval", onepass_ptrs,
                 ("stride_xk", "stride_wk", "stride_ak", "stride_br", "stride_yn", "stride_sr"),
                 {**common, "HAS_BIAS": True, "DROPOUT": False, "STORE_XS": False, "R_PAD": 32}),
            # QLoRA decode and training: reads the NF4 weight, with dropout and xs for the backward.
            Site("fwd nf4 r<=16", {**onepass_ptrs, **nf4_w},
                 ("stride_xk", "stride_wk", "stride_ak", "stride_br", "stride_yn", "stride_sr"),
                 {**common, "HAS_BIAS": False, "DROPOUT": True, "STORE_XS": True, "R_PAD": 16, **nf4},
                 dtypes=nf4_dtypes),
        ),
        gemm_min_block_m=64,
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
    # The training backward (``kernels/backward.py``): dy, W0, x in the activation dtype; A, B, xs in the LoRA dtype.
    dy_spec = KernelSpec(
        backward.DY_GPU_KERNEL,
        tuple(
            Site(f"dxa, dB rows {block_m}", {"dy_ptr": "act", "b_ptr": "lora", "xs_ptr": "lora", "dxa_ptr": "fp32",
                                            "db_ptr": "fp32"},
                 ("stride_dn", "stride_br", "stride_sr", "stride_ar", "stride_bbr"),
                 {**common, "BLOCK_M": block_m, "BLOCK_R": 64})
            for block_m in (64, 128)
        ),
    )  # fmt: skip
    dx_ptrs = {"dy_ptr": "act", "w_ptr": "act", "dxa_ptr": "fp32", "a_ptr": "lora", "x_ptr": "act", "dx_ptr": "act",
               "da_ptr": "fp32", "seed_ptr": "i64", **dense_w}  # fmt: skip
    dx_spec = KernelSpec(
        backward.DX_GPU_KERNEL,
        tuple(
            Site(name, dx_ptrs, ("stride_dn", unit_w, "stride_ar", "stride_ak", "stride_xk", "stride_ok", "stride_dak"),
                 {**common, "COMPUTE_DX": dx, "COMPUTE_DA": da, "DROPOUT": True, "BLOCK_R": block_r})
            for name, unit_w, dx, da, block_r in (
                ("dx+D'(dxa·A), dA r<=32", "stride_wk", True, True, backward.MAX_FUSED_RANK),
                ("dx+D'(dxa·A) r<=64 W0 [K,N]", "stride_wn", True, False, 64),
                ("dA=dxaᵀ·D(x) r<=64", "stride_wk", False, True, 64),
            )
        ) + (
            # QLoRA: dx = dy·dequant(W0) from the NF4 weight, dA in the same epilogue.
            Site("nf4 dx+D'(dxa·A), dA r<=16", {**dx_ptrs, **nf4_w},
                 ("stride_dn", "stride_wk", "stride_ar", "stride_ak", "stride_xk", "stride_ok", "stride_dak"),
                 {**common, "COMPUTE_DX": True, "COMPUTE_DA": True, "DROPOUT": True, "BLOCK_R": 16, **nf4,
                  "QPACKED": 1}, dtypes=nf4_dtypes),
        ),
        gemm_min_block_m=64,
    )  # fmt: skip
    meta_ptrs = {"sorted_ids_ptr": "i32", "seg_offsets_ptr": "i32", "seg_slots_ptr": "i32", "ranks_ptr": "i32",
                 "scalings_ptr": "fp32", "token_scales_ptr": "fp32", "token_slots_ptr": "i32"}  # fmt: skip
    # Programmatic dependent launch (griddepcontrol) exists from sm_90 on: the decode launchers use it there.
    pdl = {90: {"USE_PDL": True}}
    multi_shrink_spec = KernelSpec(
        multi_lora.SHRINK_GPU_KERNEL,
        tuple(
            Site(name, {"x_ptr": "act", "a_ptr": "lora", "xa_ptr": "fp32", **meta_ptrs},
                 ("stride_xk", "stride_ak", "stride_or"),
                 {**common, "SPLIT_K": split_k, "USE_PDL": False, "BLOCK_R": block_r})
            for name, split_k, block_r in (("decode r<=16 split 8", 8, 16), ("prefill r<=64", 1, 64),
                                           ("prefill r<=64 split 8", 8, 64))
        ),
        arch_constexprs=pdl,
    )  # fmt: skip
    multi_expand_spec = KernelSpec(
        multi_lora.EXPAND_GPU_KERNEL,
        tuple(
            Site(name, {"xa_ptr": "fp32", "b_ptr": "lora", "y_ptr": "act", **meta_ptrs},
                 ("stride_or", "stride_br", "stride_yn"), {**common, "HAS_TOKEN_SCALES": True, "SPLIT_K": split_k})
            for name, split_k in (("y+=c·xa·Bᵀ", 1), ("y+=c·Σxa·Bᵀ split 8", 8))
        ),
    )  # fmt: skip
    fused_ptrs = {"x_ptr": "act", "wt_ptr": "act", "bias_ptr": "act", "xa_ptr": "fp32", "b_ptr": "lora",
                  "y_ptr": "act", **meta_ptrs, **dense_w}  # fmt: skip
    # EVEN_R: whole rank chunks of B (vector loads, r_max a multiple of EPI_R) at one site, the bounded ones at the other.
    multi_fused_spec = KernelSpec(
        multi_lora.FUSED_GPU_KERNEL,
        (
            Site("decode W0 [N,K] split 8", fused_ptrs, ("stride_xk", "stride_wk", "stride_or", "stride_br", "stride_yn"),
                 {**common, "HAS_BIAS": True, "HAS_TOKEN_SCALES": True, "SPLIT_K": 8, "USE_PDL": False,
                  "EVEN_R": True}),
            Site("decode W0 [K,N] split 1 odd r_max", fused_ptrs,
                 ("stride_xk", "stride_wn", "stride_or", "stride_br", "stride_yn"),
                 {**common, "HAS_BIAS": True, "HAS_TOKEN_SCALES": False, "SPLIT_K": 1, "USE_PDL": False,
                  "EVEN_R": False}),
            # Serving over an NF4 base.
            Site("decode nf4 W0 split 8", {**fused_ptrs, **nf4_w},
                 ("stride_xk", "stride_wk", "stride_or", "stride_br", "stride_yn"),
                 {**common, "HAS_BIAS": False, "HAS_TOKEN_SCALES": False, "SPLIT_K": 8, "USE_PDL": False,
                  "EVEN_R": True, **nf4}, dtypes=nf4_dtypes),
        ),
        gemm_min_block_m=64,
        arch_constexprs=pdl,
    )  # fmt: skip
    # Mixture-of-experts layers (``kernels/grouped.py``): rows sorted by expert, one expert per tile; BLOCK_M comes from
    # the tile list (16, 32 or 64 rows; 32 at most under dropout). The backward reads B and A through transposed views.
    tiles = {"tile_expert_ptr": "i32", "tile_start_ptr": "i32", "offsets_ptr": "i32", "seed_ptr": "i64"}
    grouped_shrink_spec = KernelSpec(
        grouped.SHRINK_GPU_KERNEL,
        tuple(
            Site(name, {"x_ptr": "act", "w_ptr": "lora", "out_ptr": "fp32", **tiles}, unit,
                 {**common, "DROPOUT": dropout, "BLOCK_M": block_m, "BLOCK_R": block_r})
            for name, unit, dropout, block_m, block_r in (
                ("fwd xa=D(x)·A_eᵀ rows 32", ("stride_xk", "stride_wk", "stride_or"), True, 32, 16),
                ("fwd xa=x·A_eᵀ rows 64", ("stride_xk", "stride_wk", "stride_or"), False, 64, 64),
                ("bwd dxa=s·dy·B_e rows 16", ("stride_xk", "stride_wr", "stride_or"), False, 16, 16),
            )
        ),
    )  # fmt: skip
    grouped_expand_spec = KernelSpec(
        grouped.EXPAND_GPU_KERNEL,
        tuple(
            Site(name, {"u_ptr": "fp32", "v_ptr": "lora", "y_ptr": "act", "bias_ptr": "act", **tiles}, unit,
                 {**common, "HAS_BIAS": bias, "DROPOUT": dropout, "BLOCK_M": block_m, "BLOCK_R": block_r})
            for name, unit, bias, dropout, block_m, block_r in (
                ("fwd y+=s·xa·B_eᵀ+b_e rows 64", ("stride_ur", "stride_vr", "stride_yn", "stride_bn"), True, False,
                 64, 64),
                ("fwd y+=s·xa·B_eᵀ rows 16", ("stride_ur", "stride_vr", "stride_yn", "stride_bn"), False, False, 16,
                 16),
                ("bwd dx+=D'(dxa·A_e) rows 32", ("stride_ur", "stride_vn", "stride_yn", "stride_bn"), False, True, 32,
                 16),
            )
        ),
    )  # fmt: skip
    grouped_wgrad_spec = KernelSpec(
        grouped.WGRAD_GPU_KERNEL,
        (
            Site("dA_e=dxa_eᵀ·D(x_e)", {"u_ptr": "fp32", "v_ptr": "act", "out_ptr": "lora", "offsets_ptr": "i32",
                                       "seed_ptr": "i64"},
                 ("stride_ur", "stride_vh", "stride_oh"), {**common, "DROPOUT": True, "BLOCK_R": 16}),
            Site("dB_eᵀ=s·xa_eᵀ·dy_e", {"u_ptr": "fp32", "v_ptr": "act", "out_ptr": "lora", "offsets_ptr": "i32",
                                       "seed_ptr": "i64"},
                 ("stride_ur", "stride_vh", "stride_or"), {**common, "DROPOUT": False, "BLOCK_R": 64}),
        ),
    )  # fmt: skip
    return [
        shrink_spec, expand_spec, onepass_spec, wgrad_spec, dy_spec, dx_spec, multi_shrink_spec, multi_expand_spec,
        multi_fused_spec, grouped_shrink_spec, grouped_expand_spec, grouped_wgrad_spec,
    ]  # fmt: skip


def _compile_one(job) -> tuple[Result, bytes | None]:
    """One compile's ``Result`` and its cubin (``None`` when it failed)."""
    spec_index, site_index, config_index, act, lora, arch = job
    spec = kernel_specs()[spec_index]
    site, config = spec.site_at(site_index, arch), spec.configs[config_index]
    result = Result(spec.name, site.name, f"{act}/{lora}", config_name(config), arch, spec.needs_hgmma(config, arch))
    try:
        compiled = compile_kernel(spec.fn, *kernel_signature(spec.fn, site, act, lora, config), config, arch)
        result.shared = int(compiled.metadata.shared)
        result.registers, result.spills = resources(compiled.asm["cubin"])
        if arch in ADVISORY_ARCHS:
            result.advisories = advisories(ptxas_log(compiled.asm["ptx"], config, arch))
    except Exception as e:  # noqa: BLE001 - every failure is a row in the report
        result.error = _error(e)
        return result, None
    return result, compiled.asm["cubin"]


def _compile_batch(batch: list[tuple]) -> list[Result]:
    """``_compile_one`` of each job, then the MMA kind and TMA use of every cubin from one disassembly per arch."""
    compiled = [_compile_one(job) for job in batch]
    for arch in {result.arch for result, _ in compiled}:
        done = [(result, cubin) for result, cubin in compiled if result.arch == arch and cubin is not None]
        try:
            sass = disassemble([cubin for _, cubin in done], arch)
        except Exception as e:  # noqa: BLE001 - every failure is a row in the report
            for result, _ in done:
                result.error = _error(e)
            continue
        for (result, _), text in zip(done, sass):
            result.mma, result.tma = mma_kind(text), uses_tma(text)
    return [result for result, _ in compiled]


def _error(e: Exception) -> str:
    """An exception as one short line: its type and the last line of its message."""
    return f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"[:300]


def jobs(archs=ARCHS, dtypes=DTYPES, kernels=None) -> list[tuple]:
    """Every (kernel, site, config, dtypes, arch) the launchers can run, after shared-memory pruning."""
    out = []
    for si, spec in enumerate(kernel_specs()):
        if kernels is not None and spec.name not in kernels:
            continue
        for ti in range(len(spec.sites)):
            site_dtypes = spec.sites[ti].dtypes
            for act, lora in dtypes if site_dtypes is None else [d for d in dtypes if d in site_dtypes]:
                for ci, config in enumerate(spec.configs):
                    for arch in archs:
                        # The launcher prunes against the shared memory of the GPU it runs on.
                        with smem_limit(SMEM_LIMIT[arch]):
                            constexprs = spec.site_at(ti, arch).constexprs
                            if spec.kernel.config_ok(config, ELEM_BYTES[act], ELEM_BYTES[lora], **constexprs):
                                out.append((si, ti, ci, act, lora, arch))
    return out


def run_static_check(archs=ARCHS, dtypes=DTYPES, kernels=None, workers: int | None = None) -> list[Result]:
    """Compile everything (or the named ``kernels``) in worker processes, with the interpreter off; one ``Result``
    per compile."""
    workers = workers or max(1, os.cpu_count() or 1)
    todo = jobs(archs, dtypes, kernels)
    # Batches of consecutive jobs (both archs, alternating): up to 16 share a disassembler start, and each worker gets
    # about four batches, so none sits idle while another finishes a long one.
    size = max(1, min(16, -(-len(todo) // (4 * workers))))
    batches = [todo[i : i + size] for i in range(0, len(todo), size)]
    return [result for batch in map_in_workers(_compile_batch, batches, workers) for result in batch]


def format_table(results: list[Result]) -> str:
    """A markdown table: one row per compile."""
    lines = [
        "| kernel | site | dtypes (act/lora) | config | arch | registers | shared (B) | spills (B) | mma | tma | "
        "advisories | status |",
        "| --- | --- | --- | --- | --- | ---: | ---: | ---: | --- | --- | --- | --- |",
    ]
    for r in results:
        codes = ", ".join(dict.fromkeys(_ADVISORY.match(line).group(1) for line in r.advisories)) or "-"
        lines.append(
            f"| {r.kernel} | {r.site} | {r.dtypes} | {r.config} | sm_{r.arch} | {r.registers} | {r.shared} | "
            f"{r.spills} | {r.mma or '-'} | {'yes' if r.tma else 'no'} | {codes} | {r.status} |"
        )
    return "\n".join(lines)


def format_summary(results: list[Result]) -> str:
    """One line per kernel: compiles (failed), compiles with advisories or spills, the MMA kinds per arch, TMA use,
    the most registers and shared memory any of its compiles takes."""
    lines = []
    for name in dict.fromkeys(r.kernel for r in results):
        rows = [r for r in results if r.kernel == name]
        compiled = [r for r in rows if not r.error]
        codes = ", ".join(sorted({_ADVISORY.match(line).group(1) for r in rows for line in r.advisories}))
        mma = ", ".join(
            f"sm_{arch} "
            + "/".join(kind for kind in MMA_KINDS if any(r.mma == kind for r in compiled if r.arch == arch))
            for arch in sorted({r.arch for r in compiled})
        )
        lines.append(
            f"{name}: {len(rows)} compiles ({sum(not r.ok for r in rows)} failed), "
            f"{sum(bool(r.advisories) for r in rows)} with advisories{f' ({codes})' if codes else ''}, "
            f"{sum(r.spills > 0 for r in rows)} spilling, MMA {mma or '-'}, TMA in {sum(r.tma for r in rows)}, "
            f"max {max((r.registers for r in rows), default=-1)} registers, "
            f"max {max((r.shared for r in rows), default=-1)} B shared"
        )
    return "\n".join(lines)
