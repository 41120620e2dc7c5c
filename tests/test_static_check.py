"""Every kernel, with every config its launcher can run, compiles for sm_80 and sm_90 with no spills, shared memory
within the architecture's limit, no ptxas performance advisory (C75xx) on sm_90, and HGMMA on sm_90 where the kernel
is GEMM-sized: the kernels are real GPU kernels, not only interpreter programs, and Hopper's tensor cores overlap."""

import json
import os
import subprocess
import sys

import pytest

from fastlora import gpu_compile, static_check


@pytest.fixture(scope="module")
def results():
    return static_check.run_static_check()


def test_every_compile_passes_the_static_gates(results):
    """No compile error, no spill, shared memory within the limit, no C75xx advisory, HGMMA where required."""
    bad = [r for r in results if not r.ok]
    assert not bad, "\n" + static_check.format_table(bad)


def test_every_kernel_site_dtype_and_arch_is_covered(results):
    """The check really compiled every kernel at every call site, on both archs, for each dtype pair the launcher runs
    there (a site whose every config the launcher prunes for a dtype pair, such as the backward's fused dA with fp32
    activations, is one the launcher never takes), and every site for at least one dtype pair."""
    covered = {(r.kernel, r.site, r.dtypes, r.arch) for r in results}
    specs = static_check.kernel_specs()
    expected = {
        (specs[si].name, specs[si].sites[ti].name, f"{act}/{lora}", arch)
        for si, ti, _, act, lora, arch in static_check.jobs()
    }
    assert covered == expected
    for spec in specs:
        for site in spec.sites:
            for arch in static_check.ARCHS:
                assert any(k[:2] == (spec.name, site.name) and k[3] == arch for k in covered), (
                    spec.name,
                    site.name,
                    arch,
                )
    assert all(r.registers > 0 and r.shared > 0 and r.mma in gpu_compile.MMA_KINDS for r in results)


def test_gemm_sized_kernels_require_hgmma_on_sm90(results):
    """The base-GEMM kernels are held to HGMMA on sm_90 (tiles of 64 rows or more), and the SASS reading is not
    vacuous: their sm_80 compiles run HMMA, never HGMMA."""
    specs = {spec.name: spec for spec in static_check.kernel_specs()}
    assert {name for name, spec in specs.items() if spec.gemm_min_block_m} >= {"lora_expand", "multi_lora_fused"}
    required = [r for r in results if r.needs_hgmma]
    assert {r.kernel for r in required} >= {"lora_expand", "multi_lora_fused"}
    assert all(r.arch == 90 for r in required)
    assert {r.mma for r in results if r.arch == 80 and specs[r.kernel].gemm_min_block_m and not r.error} == {"HMMA"}


_SPILLING = """
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fastlora.gpu_compile import resources

@triton.jit
def spilling_kernel(x_ptr, BLOCK: tl.constexpr):
    # A 128x128 fp32 tile held across a reduction in one warp: 512 live values per thread, over the 255 registers.
    rows = tl.arange(0, BLOCK)
    offs = rows[:, None] * BLOCK + rows[None, :]
    x = tl.load(x_ptr + offs)
    tl.store(x_ptr + offs, x - tl.sum(x, axis=0)[None, :])

src = ASTSource(fn=spilling_kernel, signature={"x_ptr": "*fp32", "BLOCK": "constexpr"}, constexprs={"BLOCK": 128})
compiled = triton.compile(src, target=GPUTarget("cuda", 80, 32), options={"num_warps": 1})
print(*resources(compiled.asm["cubin"]))
"""


def test_resource_report_detects_spills(tmp_path):
    """The cuobjdump parser is not vacuous: a kernel that must spill is reported with spilled bytes."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = tmp_path / "spill.py"
    script.write_text(_SPILLING)
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, check=True).stdout
    registers, spills = map(int, out.split()[-2:])
    assert registers > 0 and spills > 0


def test_serving_kernels_are_checked():
    """The multi-adapter kernels are in the check, at decode (K split) and prefill sites."""
    specs = {spec.name: spec for spec in static_check.kernel_specs()}
    for name in ("multi_lora_shrink", "multi_lora_expand", "multi_lora_fused"):
        assert name in specs and specs[name].sites and specs[name].configs, name
    assert {site.constexprs["SPLIT_K"] for site in specs["multi_lora_fused"].sites} == {1, 8}


# ptxas -v output captured from re-assembling _lora_shrink_kernel (forward, bf16 x with fp32 LoRA, 64x128 w8 s3) for
# sm_90a, and from a kernel without an advisory.
_PTXAS_C7515 = """\
ptxas-blackwell info    : 0 bytes gmem
ptxas-blackwell info    : Compiling entry function '_lora_shrink_kernel' for 'sm_90a'
ptxas-blackwell info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized due to non \
wgmma instructions defining accumulator registers of a wgmma between start and end of the pipeline stage in the \
function '_lora_shrink_kernel' in line 3512
ptxas-blackwell info    : Function properties for _lora_shrink_kernel
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas-blackwell info    : Used 194 registers, used 1 barriers
ptxas-blackwell info    : Compile time = 412.118 ms
"""
_PTXAS_CLEAN = """\
ptxas-blackwell info    : 0 bytes gmem
ptxas-blackwell info    : Compiling entry function '_lora_expand_kernel' for 'sm_90a'
ptxas-blackwell info    : Function properties for _lora_expand_kernel
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas-blackwell info    : Used 180 registers, used 1 barriers
ptxas-blackwell info    : Compile time = 226.707 ms
"""


def test_advisory_parser():
    (line,) = gpu_compile.advisories(_PTXAS_C7515)
    assert line.startswith("(C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized")
    assert line.endswith("in line 3512")
    assert gpu_compile.advisories(_PTXAS_CLEAN) == []


def test_an_advisory_or_a_missing_hgmma_fails_the_row():
    row = {"kernel": "k", "site": "s", "dtypes": "bf16/bf16", "config": "64x64 w4 s4", "arch": 90}
    resources = {"registers": 128, "shared": 1024, "spills": 0}
    assert static_check.Result(**row, **resources, mma="HMMA").ok
    serialised = static_check.Result(**row, **resources, mma="HGMMA", advisories=gpu_compile.advisories(_PTXAS_C7515))
    assert not serialised.ok
    assert serialised.status.startswith("C7515 wgmma.mma_async instructions are serialized due to non wgmma")
    assert "_lora_shrink_kernel" not in serialised.status
    no_hgmma = static_check.Result(**row, **resources, mma="HMMA", needs_hgmma=True)
    assert not no_hgmma.ok and no_hgmma.status == "no HGMMA"
    assert static_check.Result(**row, **resources, mma="HGMMA", needs_hgmma=True).ok
    assert "| C7515 |" in static_check.format_table([serialised])


# nvdisasm output captured from Triton kernels: a pipelined wgmma loop on sm_90 with TMA loads, an mma.sync tile on
# sm_80, and an fp32 dot with ieee precision on sm_90.
_SASS_HGMMA_TMA = """\
        /*13c0*/                   @UP3 UTMALDG.2D [UR8], [UR6] ;
        /*13d0*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*1780*/               @P2 IADD3 R7, P0, R2, 0x80, RZ ;
        /*1790*/                   WARPGROUP.ARRIVE ;
        /*17b0*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR12].tnspB, R24 ;
        /*19b0*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR12].tnspB, R24, gsb0 ;
        /*1a10*/                   WARPGROUP.DEPBAR.LE gsb0, 0x1 ;
"""
_SASS_HMMA = """\
        /*0660*/                   LDSM.16.MT88.4 R48, [R59+0x1000] ;
        /*0670*/                   LDSM.16.M88.4 R16, [R62] ;
        /*0690*/                   HMMA.16816.F32.BF16 R32, R68.reuse, R52, RZ ;
        /*06a0*/                   HMMA.16816.F32.BF16 R40, R68, R24.reuse, RZ ;
        /*06d0*/                   LOP3.LUT R60, R60, 0x60, RZ, 0x3c, !PT ;
"""
_SASS_FFMA = """\
        /*0540*/                   MOV R76, R4 ;
        /*0550*/                   FFMA R12, R28.reuse, R82, RZ ;
        /*0570*/                   LDS.128 R32, [R0+UR4+0x100] ;
        /*0590*/                   FFMA R14, R28.reuse, R81, RZ ;
"""


def test_sass_classifier():
    assert gpu_compile.mma_kind(_SASS_HGMMA_TMA) == "HGMMA"
    assert gpu_compile.mma_kind(_SASS_HGMMA_TMA + _SASS_HMMA) == "HGMMA"
    assert gpu_compile.mma_kind(_SASS_HMMA) == "HMMA"
    assert gpu_compile.mma_kind(_SASS_FFMA) == "none"
    assert gpu_compile.uses_tma(_SASS_HGMMA_TMA)
    assert not gpu_compile.uses_tma(_SASS_HMMA) and not gpu_compile.uses_tma(_SASS_FFMA)


_PIPELINE = """
import json, re
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fastlora.gpu_compile import advisories, disassemble, mma_kind, ptxas_log

@triton.jit
def dot_kernel(x_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    x = tl.load(x_ptr + offs)
    tl.store(x_ptr + offs, tl.dot(x, x).to(tl.bfloat16))

@triton.jit
def add_kernel(x_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs) + 1)

config = triton.Config({}, num_warps=4, num_stages=3)

def build(fn, arch):
    src = ASTSource(fn=fn, signature={"x_ptr": "*bf16", "BLOCK": "constexpr"}, constexprs={"BLOCK": 64})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4, "num_stages": 3})

out = {}
for arch in (80, 90):
    dot, add = build(dot_kernel, arch), build(add_kernel, arch)
    sass = disassemble([add.asm["cubin"], dot.asm["cubin"], add.asm["cubin"]], arch)
    out[f"mma {arch}"] = [mma_kind(kernel) for kernel in sass]
    log = ptxas_log(dot.asm["ptx"], config, arch)
    target = re.search(r"function 'dot_kernel' for '(\\w+)'", log).group(1)
    out[f"ptxas {arch}"] = [target, "Used" in log, advisories(log)]
print(json.dumps(out))
"""


def test_one_disassembly_and_the_ptxas_log_of_real_compiles(tmp_path):
    """``disassemble`` splits one nvdisasm run over several cubins back into each cubin's SASS, and ``ptxas_log``
    captures the re-assembly's ``-v`` output (sm_90a for 90): neither reading can pass vacuously."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = tmp_path / "pipeline.py"
    script.write_text(_PIPELINE)
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, check=True).stdout
    assert json.loads(out.splitlines()[-1]) == {
        "mma 80": ["none", "HMMA", "none"],
        "mma 90": ["none", "HGMMA", "none"],
        "ptxas 80": ["sm_80", True, []],
        "ptxas 90": ["sm_90a", True, []],
    }
