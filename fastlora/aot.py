"""Ahead-of-time build of fastlora's kernels for C and C++ engines: cubins embedded in C sources.

``python -m fastlora.aot --arch 80 --arch 90 --out build/aot`` compiles a declared, small set of specialisations
of the Triton kernels with ``triton.compile`` for each architecture (no GPU and no CUDA driver needed) and writes:

- ``fastlora_kernels_data.c``: every cubin as a byte array, and the kernel table ``fl_kernels[]`` the C library's
  dispatchers pick from (``csrc/kernel_table.h`` defines the row);
- ``fastlora_kernel_args.h``: per kernel, the index of every argument of its ``@triton.jit`` signature, so the C
  launchers fill arguments by name and stop compiling when a kernel's signature changes;
- ``manifest.json`` (what was declared and built) and ``manifest.tsv`` (the same, one kernel a line, for the C test).

What is declared (``VARIANTS``), for activation dtypes fp16 and bf16 and LoRA weights in the activation dtype:

| op | site | kernel | used by |
| --- | --- | --- | --- |
| onepass | fwd, rank tile 16 / 64, with / without bias | ``_lora_onepass_kernel`` | forward, M <= 64, r <= 64 |
| shrink | fwd: ``xs = s·x·Aᵀ`` | ``_lora_shrink_kernel`` | forward, M > 64 or r > 64 |
| expand | fwd: ``y = x·W0ᵀ + xs·Bᵀ + b``, two tiles | ``_lora_expand_kernel`` | forward, M > 64 or r > 64 |
| shrink | bwd: ``dxa = s·dy·B`` | ``_lora_shrink_kernel`` | backward |
| expand | bwd: ``dx = dy·W0 + dxa·A`` | ``_lora_expand_kernel`` | backward |
| wgrad | dA: ``dxaᵀ·x``; dB: ``(xsᵀ·dy)ᵀ`` written as ``[N, r]`` | ``_lora_wgrad_kernel`` | backward |
| wgrad | reduce (fp32): the split partials summed as ``onesᵀ·P`` | ``_lora_wgrad_kernel`` | backward, large M |
| multi_shrink | seg: ``xa[t] = x[t]·A_sᵀ``, rank tile 16 / 64 | ``_multi_shrink_kernel`` | many adapters |
| multi_expand | seg / seg_scales: ``y[t] += round(c[t]·xa[t])·B_sᵀ`` | ``_multi_expand_kernel`` | many adapters |

That is 70 compiles for two archs (about 50 s on two cores with a cold Triton cache). No dropout (the C API serves inference and
dropout-free fine-tuning); no fused multi-adapter decode kernel (engines run their own base GEMM, then the
segmented shrink and expand). Each site fixes, as the static check does:

- unit strides (``x``, ``y``, ``W0`` ``[N, K]``, ``A`` ``[r, K]``, ``B`` ``[N, r]`` and the pools row-major) as
  ``constexpr 1``;
- 16-element divisibility of the other strides and of ``K`` / ``N`` (``tt.divisibility`` 16, as the JIT would
  assume), except the strides that equal a rank or ``r_max`` and the row stride of the fp32 ``xa`` (``free_ints``),
  which may be anything;
- 16-byte aligned pointers.

The table records, per kernel, which arguments were compiled as unit and which as divisible by 16; the C dispatcher
checks the runtime values against exactly those lists and returns ``FASTLORA_STATUS_UNSUPPORTED`` (naming the
argument) instead of launching a kernel on values it was not compiled for.

Kernel ABI. A Triton cubin's entry takes the non-constexpr arguments in signature order (pointers as 64-bit,
``i32`` as 32-bit, ``fp32`` as 32-bit float), then one trailing pointer per scratch buffer that this Triton version
appends (global scratch and profile scratch in Triton 3.9). The trailing count is read from the PTX ``.entry`` and
recorded; every declared kernel must need no scratch (``global_scratch_size == profile_scratch_size == 0``), so the
launcher passes null pointers there, as Triton's own launcher does.

Architectures and drivers. sm_80 cubins run on every 8.x GPU; Triton compiles sm_90 as sm_90a, which runs on 9.0
only. Triton 3.9 assembles sm_80 with the CUDA 12.9 ``ptxas`` of its wheel and sm_90 with its CUDA 13.x one, and a
CUDA 13 cubin loads only on an R580+ driver. By default (``--ptxas cuda12``) every arch is assembled with the
CUDA 12.9 ``ptxas``, so the library runs on any CUDA 12 driver (R525+, CUDA's minor-version compatibility);
``--ptxas triton`` keeps Triton's own choice. The manifest records each cubin's ``ptxas`` version. In the ELF header
the SM is ``e_flags & 0xff`` for ptxas 12.x (ELF ABI version 7) and ``(e_flags >> 8) & 0xff`` for ptxas 13.x
(ABI version 8); the C library reads both, and the ctest checks every embedded cubin against the manifest that way.

Dispatch rules (in ``csrc/fastlora_kernels.c``): the forward takes the one-pass kernel for ``M <= 64`` and
``r <= 64`` (rank tile 16 for ``r <= 16``), else shrink then GEMM, with 128x128 tiles once they make at least 256
programs and 64x64 below; the backward splits the weight-gradient reduction exactly as ``kernels/wgrad.py`` does
and sums the partials with the fp32 ``reduce`` kernel; the multi-adapter shrink takes rank tile 16 when the batch's
largest rank is at most 16, else 64. The library does not autotune.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import sys
import time

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
from .kernels import GPU_KERNELS, SMEM_LIMIT, GpuKernel

DTYPES = ("fp16", "bf16")
# C enum values of ``fastlora_dtype`` in include/fastlora_kernels.h.
DTYPE_ENUM = {"fp16": 0, "bf16": 1, "fp32": 2}
# Grid rules of the C launchers (``fl_grid`` in csrc/kernel_table.h).
GRIDS = {"tiles_mn": 0, "rows_by_rank": 1, "wgrad": 2, "segments_by_rank": 3, "segments_by_cols": 4}
_PTX_TYPES = {"*": ".u64", "i32": ".u32", "fp32": ".f32"}


@dataclasses.dataclass(frozen=True)
class Variant:
    """One declared specialisation of one kernel, before the dtype and the architecture are chosen."""

    op: str  # the C dispatcher's name for the kernel family: onepass, shrink, expand, wgrad
    site: str  # the call it serves: fwd, fwd_nobias, bwd, dA, dB, reduce
    kernel: str  # a ``fastlora.kernels.GPU_KERNELS`` name
    pointers: dict[str, str]  # pointer argument -> role (act, lora, fp32, i64, u8)
    unit_strides: tuple[str, ...]  # compiled as constexpr 1
    free_ints: tuple[str, ...]  # int arguments equal to the rank: no divisibility assumed
    constexprs: dict[str, object]
    config: int  # index into the kernel's GPU config list
    grid: str
    dtypes: tuple[str, ...] = DTYPES
    rank_tile: int = 0  # R_PAD / BLOCK_R, 0 where the kernel loops over the rank
    precision: str = "tf32"  # only fp32 operands read it


_NO_DROPOUT = {"UPCAST": False, "DROPOUT": False}
# A dense W0: the kernels' 4-bit quantization state (read only with QBLOCK > 0, which the C API does not build).
_DENSE_W = {"wq_absmax_ptr": "fp32", "wq_code_ptr": "fp32", "wq_absmax2_ptr": "fp32", "wq_code2_ptr": "fp32",
            "wq_offset_ptr": "fp32"}  # fmt: skip
_ONEPASS_PTRS = {"x_ptr": "act", "wt_ptr": "act", "at_ptr": "lora", "bt_ptr": "lora", "bias_ptr": "act",
                 "y_ptr": "act", "xs_ptr": "lora", "seed_ptr": "i64", **_DENSE_W}  # fmt: skip
_SHRINK_PTRS = {"x_ptr": "act", "wt_ptr": "lora", "out_ptr": "lora", "seed_ptr": "i64"}
_EXPAND_PTRS = {"x_ptr": "act", "wt_ptr": "act", "l_ptr": "lora", "rt_ptr": "lora", "bias_ptr": "act",
                "out_ptr": "act", "seed_ptr": "i64", **_DENSE_W}  # fmt: skip
_WGRAD_PTRS = {"u_ptr": "lora", "v_ptr": "act", "out_ptr": "fp32", "seed_ptr": "i64"}
_META_PTRS = {"sorted_ids_ptr": "i32", "seg_offsets_ptr": "i32", "seg_slots_ptr": "i32", "ranks_ptr": "i32"}
_MULTI_SHRINK_PTRS = {"x_ptr": "act", "a_ptr": "lora", "xa_ptr": "fp32", **_META_PTRS}
_MULTI_EXPAND_PTRS = {"xa_ptr": "fp32", "b_ptr": "lora", "y_ptr": "act", "scalings_ptr": "fp32",
                      "token_scales_ptr": "fp32", **_META_PTRS}  # fmt: skip
# Tile configs, by index into each kernel's GPU list: onepass (16, 64, 64) w4 s5; shrink (64, 64) w4 s4;
# expand (128, 128, 64) w8 s4 for large M and (64, 64, 64) w4 s4 below; wgrad (64, 64) w4 s4; multi-adapter
# shrink (32, 128) w4 s4 and expand (32, 128, 16) w4 s3, sized for segments of a few to a few hundred tokens.
_ONEPASS_CFG, _SHRINK_CFG, _EXPAND_CFGS, _WGRAD_CFG = 3, 1, (0, 4), 0
_MULTI_SHRINK_CFG, _MULTI_EXPAND_CFG = 2, 1


def _onepass(rank_tile: int, bias: bool) -> Variant:
    # A [r, K] and B [N, r] row-major: at = Aᵀ has unit stride along K, bt = Bᵀ along r, and Bᵀ's other stride
    # is r itself. xs is not stored (STORE_XS off), so its strides are constant-folded away.
    return Variant(
        "onepass", "fwd" if bias else "fwd_nobias", "lora_onepass", _ONEPASS_PTRS,
        ("stride_xk", "stride_wk", "stride_ak", "stride_br", "stride_yn", "stride_sr"), ("stride_bn", "stride_sm"),
        {**_NO_DROPOUT, "HAS_BIAS": bias, "STORE_XS": False, "R_PAD": rank_tile}, _ONEPASS_CFG, "tiles_mn",
        rank_tile=rank_tile,
    )  # fmt: skip


def _expand_fwd(bias: bool, config: int) -> Variant:
    return Variant(
        "expand", "fwd" if bias else "fwd_nobias", "lora_expand", _EXPAND_PTRS,
        ("stride_xk", "stride_wk", "stride_lr", "stride_rr", "stride_on"), ("stride_lm", "stride_rn"),
        {**_NO_DROPOUT, "HAS_BIAS": bias, "BLOCK_R": 64}, config, "tiles_mn",
    )  # fmt: skip


VARIANTS: tuple[Variant, ...] = (
    *(_onepass(rank_tile, bias) for rank_tile in (16, 64) for bias in (True, False)),
    Variant("shrink", "fwd", "lora_shrink", _SHRINK_PTRS, ("stride_xk", "stride_wk", "stride_or"), ("stride_om",),
            {**_NO_DROPOUT, "BLOCK_R": 64}, _SHRINK_CFG, "rows_by_rank"),
    *(_expand_fwd(bias, config) for bias in (True, False) for config in _EXPAND_CFGS),
    Variant("shrink", "bwd", "lora_shrink", _SHRINK_PTRS, ("stride_xk", "stride_wr", "stride_or"),
            ("stride_wk", "stride_om"), {**_NO_DROPOUT, "BLOCK_R": 64}, _SHRINK_CFG, "rows_by_rank"),
    Variant("expand", "bwd", "lora_expand", _EXPAND_PTRS, ("stride_xk", "stride_wn", "stride_lr", "stride_rn",
            "stride_on"), ("stride_lm",), {**_NO_DROPOUT, "HAS_BIAS": False, "BLOCK_R": 64}, _EXPAND_CFGS[0],
            "tiles_mn"),
    Variant("wgrad", "dA", "lora_wgrad", _WGRAD_PTRS, ("stride_ur", "stride_vq", "stride_oq"), ("stride_um",),
            {**_NO_DROPOUT, "BLOCK_R": 64}, _WGRAD_CFG, "wgrad"),
    # dB = (xsᵀ·dy)ᵀ: the [r, N] result is stored through transposed strides straight into B's [N, r] layout.
    Variant("wgrad", "dB", "lora_wgrad", _WGRAD_PTRS, ("stride_ur", "stride_vq", "stride_or"),
            ("stride_um", "stride_oq"), {**_NO_DROPOUT, "BLOCK_R": 64}, _WGRAD_CFG, "wgrad"),
    # The split partials P [SPLIT, Q] summed in a fixed order as onesᵀ·P (M = SPLIT, R = 1), in exact fp32.
    Variant("wgrad", "reduce", "lora_wgrad", {**_WGRAD_PTRS, "v_ptr": "fp32"}, ("stride_um", "stride_ur", "stride_vq",
            "stride_oq"), (), {**_NO_DROPOUT, "BLOCK_R": 16, "PRECISION": "ieee"}, _WGRAD_CFG, "wgrad",
            dtypes=("fp32",), precision="ieee"),
    # Many adapters: xa [T, R] = x·A_sᵀ per segment (fp32, unscaled), then y += round(c·xa)·B_sᵀ. Pools are
    # a_pool [slots, r_max, K] and b_pool [slots, N, r_max], contiguous; xa's row stride and r_max may be anything.
    # One K split and ordinary launches (SPLIT_K 1, no programmatic dependent launch), as the C launchers run them.
    *(Variant("multi_shrink", "seg", "multi_lora_shrink", _MULTI_SHRINK_PTRS, ("stride_xk", "stride_ak", "stride_or"),
              ("stride_os", "stride_om"), {"UPCAST": False, "SPLIT_K": 1, "USE_PDL": False, "BLOCK_R": rank_tile},
              _MULTI_SHRINK_CFG, "segments_by_rank", rank_tile=rank_tile) for rank_tile in (16, 64)),
    *(Variant("multi_expand", "seg_scales" if scales else "seg", "multi_lora_expand", _MULTI_EXPAND_PTRS,
              ("stride_or", "stride_br", "stride_yn"), ("stride_om", "stride_bn"),
              {"UPCAST": False, "HAS_TOKEN_SCALES": scales, "SPLIT_K": 1}, _MULTI_EXPAND_CFG, "segments_by_cols")
      for scales in (False, True)),
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Job:
    variant: int  # index into VARIANTS
    dtype: str
    arch: int


def jobs(archs=ARCHS, dtypes=DTYPES, ops=None) -> list[Job]:
    """Every compile of the declared set: variant x activation dtype x architecture."""
    out = []
    for vi, v in enumerate(VARIANTS):
        if ops is not None and v.op not in ops:
            continue
        for dtype in v.dtypes if v.dtypes != DTYPES else dtypes:
            out.extend(Job(vi, dtype, arch) for arch in archs)
    return out


def _kernel(variant: Variant) -> GpuKernel:
    for kernel in GPU_KERNELS:
        if kernel.name == variant.kernel:
            return kernel
    raise LookupError(f"fastlora.aot declares {variant.kernel!r}, which fastlora.kernels.GPU_KERNELS no longer has")


def compile_signature(variant: Variant, dtype: str):
    """``(kernel, config, signature, constexprs, attrs, div16 argument names)`` for one compile.

    Built as the static check builds it (``gpu_compile.kernel_signature``: the same unit strides and divisibility the
    JIT would assume), then the rank-valued integers lose their divisibility: a rank need not be a multiple of 16.
    """
    kernel = _kernel(variant)
    config = kernel.configs[variant.config]
    constexprs = {"PRECISION": variant.precision, **variant.constexprs}
    if not kernel.config_ok(config, ELEM_BYTES[dtype], ELEM_BYTES[dtype], **({"R_PAD": 0} | constexprs)):
        raise ValueError(f"{variant.op}/{variant.site}: config {config} is one the Python launcher prunes for {dtype}")
    site = Site(variant.site, variant.pointers, variant.unit_strides, constexprs)
    lora = "fp32" if dtype == "fp32" else dtype
    signature, constexprs, attrs = kernel_signature(kernel.fn, site, dtype, lora, config)
    names = kernel.fn.arg_names
    for index, name in enumerate(names):
        if name in variant.free_ints:
            attrs.pop((index,), None)
    div16 = [names[i] for (i,) in attrs if not signature[names[i]].startswith("*")]
    return kernel, config, signature, constexprs, attrs, div16


def ptx_entry_params(ptx: str) -> tuple[str, list[str]]:
    """``(entry name, ['.u64', '.u32', '.f32', ...])``: the kernel's parameter list as the PTX declares it."""
    match = re.search(r"\.entry\s+(\w+)\s*\((.*?)\)", ptx, re.S)
    if match is None:
        raise ValueError("no .entry in the PTX")
    return match.group(1), re.findall(r"\.param\s+(\.\w+)", match.group(2))


def _compile(job: Job) -> dict:
    """Compile one job in a worker process; returns the table row, the cubin and the PTX parameter list."""
    from triton.backends.nvidia.compiler import get_ptxas

    variant = VARIANTS[job.variant]
    kernel, config, signature, constexprs, attrs, div16 = compile_signature(variant, job.dtype)
    compiled = compile_kernel(kernel.fn, signature, constexprs, attrs, config, job.arch)
    md = compiled.metadata
    registers, spills = resources(compiled.asm["cubin"])
    entry, ptx_params = ptx_entry_params(compiled.asm["ptx"])
    params = [name for name in kernel.fn.arg_names if signature[name] != "constexpr"]
    return {
        "op": variant.op,
        "site": variant.site,
        "kernel": kernel.name,
        "arch": job.arch,
        "dtype": job.dtype,
        "config": config_name(config),
        "blocks": {k: v for k, v in config.kwargs.items() if k.startswith(("BLOCK", "GROUP"))}
        | {k: v for k, v in variant.constexprs.items() if k in ("BLOCK_R", "R_PAD")},
        "rank_tile": variant.rank_tile,
        "has_bias": bool(variant.constexprs.get("HAS_BIAS", False)),
        "grid": variant.grid,
        "num_warps": config.num_warps,
        "num_stages": config.num_stages,
        "shared": int(md.shared),
        "registers": registers,
        "ptxas": get_ptxas(job.arch).version,
        "spills": spills,
        "name": md.name,
        "ptx_entry": entry,
        "ptx_params": ptx_params,
        "params": params,
        "param_types": [signature[p] if not signature[p].startswith("*") else "*" for p in params],
        "unit": list(variant.unit_strides),
        "div16": div16,
        "global_scratch_size": int(md.global_scratch_size),
        "profile_scratch_size": int(getattr(md, "profile_scratch_size", 0)),
        "cubin": compiled.asm["cubin"],
    }


def check_row(row: dict) -> None:
    """The launch ABI the C library will use must be the one the PTX declares; raise if not."""
    where = f"{row['name']} ({row['op']}/{row['site']}, {row['dtype']}, sm_{row['arch']})"
    if row["spills"] or row["shared"] > SMEM_LIMIT[row["arch"]]:
        raise RuntimeError(f"{where} spills {row['spills']} B or needs {row['shared']} B of shared memory")
    if row["global_scratch_size"] or row["profile_scratch_size"]:
        raise RuntimeError(f"{where} needs scratch memory, which the C launcher does not allocate")
    if row["ptx_entry"] != row["name"]:
        raise RuntimeError(f"{where}: PTX entry {row['ptx_entry']} differs from the metadata name")
    expected = [_PTX_TYPES[t] for t in row["param_types"]]
    declared = row["ptx_params"]
    scratch = declared[len(expected) :]
    if declared[: len(expected)] != expected or any(t != ".u64" for t in scratch):
        raise RuntimeError(f"{where}: PTX parameters {declared} do not start with the arguments {expected}")


PTXAS = ("cuda12", "triton")


def _worker_env(ptxas: str) -> dict[str, str]:
    """Environment changes for the compile workers (spawned workers inherit the environment at their start)."""
    # Triton 3.9 warns once per process that its FP-fusion default will change; pin today's default explicitly.
    env = {"TRITON_DEFAULT_FP_FUSION": os.environ.get("TRITON_DEFAULT_FP_FUSION", "1")}
    if ptxas == "cuda12":
        from triton import knobs

        legacy = knobs.nvidia.ptxas  # the CUDA 12.x ptxas Triton uses below sm_90
        if legacy is None or not legacy.version.startswith("12."):
            raise RuntimeError("--ptxas cuda12: this Triton ships no CUDA 12 ptxas; use --ptxas triton")
        env["TRITON_PTXAS_BLACKWELL_PATH"] = legacy.path  # the one Triton uses from sm_90 on
    elif ptxas != "triton":
        raise ValueError(f"ptxas must be one of {PTXAS}, got {ptxas!r}")
    return env


def build(archs=ARCHS, dtypes=DTYPES, ops=None, workers: int = 2, ptxas: str = "cuda12") -> list[dict]:
    """Compile every job in spawned workers with ``TRITON_INTERPRET`` unset (``gpu_compile.map_in_workers``)."""
    rows = map_in_workers(_compile, jobs(archs, dtypes, ops), workers, env=_worker_env(ptxas))
    for row in rows:
        row["scratch_params"] = len(row["ptx_params"]) - len(row["params"])
        check_row(row)
    return rows


def _kernel_arg_names() -> dict[str, list[str]]:
    return {kernel.name: list(kernel.fn.arg_names) for kernel in GPU_KERNELS}


def _c_bytes(data: bytes) -> str:
    return ",\n".join(",".join(str(b) for b in data[i : i + 40]) for i in range(0, len(data), 40))


def write_sources(rows: list[dict], out: str) -> dict[str, str]:
    """Write the generated C sources and manifests into ``out``; returns their paths."""
    from .kernels import wgrad
    from .ops import ONEPASS_MAX_TOKENS

    os.makedirs(out, exist_ok=True)
    arg_names = _kernel_arg_names()
    paths = {name: os.path.join(out, name) for name in
             ("fastlora_kernel_args.h", "fastlora_kernels_data.c", "manifest.json", "manifest.tsv")}  # fmt: skip

    header = ["/* Generated by python -m fastlora.aot: argument indices of each Triton kernel's signature. */",
              "#ifndef FASTLORA_KERNEL_ARGS_H", "#define FASTLORA_KERNEL_ARGS_H", "",
              f"#define FL_ONEPASS_MAX_TOKENS {ONEPASS_MAX_TOKENS}",
              f"#define FL_WGRAD_CHUNK_ALIGN {wgrad.CHUNK_ALIGN}",
              f"#define FL_WGRAD_TARGET_PROGRAMS {wgrad.TARGET_PROGRAMS}", ""]  # fmt: skip
    max_args = max(len(v) for v in arg_names.values())
    for kernel, names in sorted(arg_names.items()):
        header.append(f"enum {{ {', '.join(f'FL_ARG_{kernel}_{n} = {i}' for i, n in enumerate(names))} }};")
    header += ["", f"#define FL_MAX_KERNEL_ARGS {max_args}", "", "#endif", ""]

    c = ["/* Generated by python -m fastlora.aot: the embedded cubins and the kernel table. Do not edit. */",
         '#include "kernel_table.h"', ""]  # fmt: skip
    for kernel in sorted({row["kernel"] for row in rows}):
        names = arg_names[kernel]
        c.append(f"static const char *const arg_names_{kernel}[] = {{{', '.join(json.dumps(n) for n in names)}}};")
    c.append("")
    entries = []
    for i, row in enumerate(rows):
        names = arg_names[row["kernel"]]
        index = {n: k for k, n in enumerate(names)}
        params = [index[p] for p in row["params"]] + [255] * row["scratch_params"]
        types = [{"*": "FL_PARAM_PTR", "i32": "FL_PARAM_I32", "fp32": "FL_PARAM_F32"}[t] for t in row["param_types"]]
        types += ["FL_PARAM_PTR"] * row["scratch_params"]
        c.append(f"static const unsigned char image_{i}[] = {{\n{_c_bytes(row['cubin'])}}};")
        c.append(f"static const unsigned char params_{i}[] = {{{', '.join(map(str, params))}}};")
        c.append(f"static const unsigned char types_{i}[] = {{{', '.join(types)}}};")
        for key in ("unit", "div16"):
            values = [index[n] for n in row[key]] or [255]
            c.append(f"static const unsigned char {key}_{i}[] = {{{', '.join(map(str, values))}}};")
        blocks = row["blocks"]
        entries.append(
            f"    {{{json.dumps(row['op'])}, {json.dumps(row['site'])}, {json.dumps(row['name'])}, "
            f"{json.dumps(row['config'])}, {row['arch']}, {DTYPE_ENUM[row['dtype']]}, {row['rank_tile']}, "
            f"{int(row['has_bias'])}, {GRIDS[row['grid']]}, {blocks.get('BLOCK_M', 0)}, "
            f"{blocks.get('BLOCK_N', blocks.get('BLOCK_Q', 0))}, {blocks.get('BLOCK_R', blocks.get('R_PAD', 0))}, "
            f"{blocks.get('GROUP_M', 0)}, {row['num_warps']}, {row['shared']}, image_{i}, sizeof(image_{i}), "
            f"{len(params)}, params_{i}, types_{i}, {len(row['unit'])}, unit_{i}, {len(row['div16'])}, div16_{i}, "
            f"arg_names_{row['kernel']}, {json.dumps(','.join(row['params'] + ['scratch'] * row['scratch_params']))}}},"
        )
    c += ["", "const fl_kernel fl_kernels[] = {", *entries, "};", "",
          f"const int fl_num_kernels = {len(rows)};", ""]  # fmt: skip

    manifest = [{k: v for k, v in row.items() if k != "cubin"} | {
        "index": i, "cubin_bytes": len(row["cubin"]), "cubin_sha256": hashlib.sha256(row["cubin"]).hexdigest()}
        for i, row in enumerate(rows)]  # fmt: skip
    tsv = [f"{r['name']}\t{r['arch']}\t{r['dtype']}\t{r['op']}\t{r['site']}\t{r['config']}\t{len(r['params'])}"
           f"\t{r['scratch_params']}\t{r['rank_tile']}" for r in rows]  # fmt: skip

    _write_if_changed(paths["fastlora_kernel_args.h"], "\n".join(header))
    _write_if_changed(paths["fastlora_kernels_data.c"], "\n".join(c))
    _write_if_changed(paths["manifest.json"], json.dumps({"kernels": manifest}, indent=1) + "\n")
    _write_if_changed(paths["manifest.tsv"], "\n".join(tsv) + "\n")
    return paths


def _write_if_changed(path: str, text: str) -> None:
    """Leave an unchanged file's timestamp alone, so the C build does not recompile it."""
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            if f.read() == text:
                return
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastlora.aot", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append", choices=ARCHS, help="SM architecture (repeatable)")
    parser.add_argument("--dtype", action="append", choices=DTYPES, help="activation dtype (repeatable)")
    parser.add_argument("--op", action="append", help="only these kernel families (onepass, shrink, expand, wgrad)")
    parser.add_argument("--out", required=True, help="directory for the generated sources")
    parser.add_argument("--ptxas", choices=PTXAS, default="cuda12",
                        help="cuda12: assemble every arch with the CUDA 12 ptxas (loads on R525+ drivers); "
                             "triton: Triton's own choice per arch")  # fmt: skip
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    rows = build(tuple(args.arch or ARCHS), tuple(args.dtype or DTYPES), args.op, args.workers, args.ptxas)
    write_sources(rows, args.out)
    print(f"fastlora.aot: {len(rows)} kernels for sm_{'/sm_'.join(map(str, args.arch or ARCHS))} in "
          f"{time.perf_counter() - start:.1f} s -> {args.out}", file=sys.stderr)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
