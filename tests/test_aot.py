"""The AOT step behind libfastlora_kernels: the declared set is complete and consistent, and the generated sources
embed every declared kernel with the parameter list its PTX really declares.

The full build (both archs, every kernel) runs in ``scripts/cmake_ci.sh``; here one arch, one dtype and two kernel
families keep it to a few compiles.
"""

import json
import re

import pytest

from fastlora import aot, static_check


def test_declared_set_is_complete():
    """Every kernel the C API launches is declared for both dtypes and both archs, each config is one the Python
    launcher keeps, and no specialisation is declared twice."""
    todo = aot.jobs()
    keys = [(aot.VARIANTS[j.variant], j.dtype, j.arch) for j in todo]
    assert len({(v.op, v.site, v.rank_tile, v.config, d, a) for v, d, a in keys}) == len(keys)
    declared = {(v.op, v.site, d, a) for v, d, a in keys}
    wanted = [("onepass", s) for s in ("fwd", "fwd_nobias")] + [("expand", s) for s in ("fwd", "fwd_nobias", "bwd")]
    wanted += [("shrink", "fwd"), ("shrink", "bwd"), ("wgrad", "dA"), ("wgrad", "dB")]
    wanted += [("multi_shrink", "seg"), ("multi_expand", "seg"), ("multi_expand", "seg_scales")]
    for op, site in wanted:
        for dtype in aot.DTYPES:
            for arch in aot.ARCHS:
                assert (op, site, dtype, arch) in declared, (op, site, dtype, arch)
    assert all(("wgrad", "reduce", "fp32", arch) in declared for arch in aot.ARCHS)
    assert len(todo) < 90, "keep the AOT step within the CI time budget"
    for v in aot.VARIANTS:
        for dtype in v.dtypes:
            aot.compile_signature(v, dtype)  # raises if the launcher would prune the config


def test_rank_valued_strides_carry_no_divisibility():
    """Strides equal to the rank (any value) are compiled without ``tt.divisibility``; the other integer strides and
    the sizes K / N keep it, exactly as the dispatcher then checks them."""
    for v in aot.VARIANTS:
        spec, _, signature, constexprs, attrs, div16 = aot.compile_signature(v, v.dtypes[0])
        for name in v.free_ints:
            assert name not in div16 and signature[name] == "i32", (v.op, v.site, name)
        for name in v.unit_strides:
            assert signature[name] == "constexpr" and constexprs[name] == 1
        for name in div16:
            assert name.startswith("stride_") or name in ("K", "N", "Q", "chunk"), (v.op, v.site, name)


def test_ptx_entry_parser():
    ptx = """
.visible .entry _k(
	.param .u64 .ptr .global .align 1 _k_param_0,
	.param .u32 _k_param_1,
	.param .f32 _k_param_2,
	.param .u64 .ptr .global .align 1 _k_param_3
)
.reqntid 128, 1, 1
{"""
    assert aot.ptx_entry_params(ptx) == ("_k", [".u64", ".u32", ".f32", ".u64"])


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot")
    rows = aot.build(archs=(80,), dtypes=("fp16",), ops=("shrink", "wgrad"))
    aot.write_sources(rows, str(out))
    return out, rows


def test_generated_sources_embed_every_declared_kernel(generated):
    out, rows = generated
    expected = aot.jobs(archs=(80,), dtypes=("fp16",), ops=("shrink", "wgrad"))
    manifest = json.loads((out / "manifest.json").read_text())["kernels"]
    assert len(manifest) == len(rows) == len(expected) == 5
    assert [(m["op"], m["site"]) for m in manifest] == [
        (aot.VARIANTS[j.variant].op, aot.VARIANTS[j.variant].site) for j in expected
    ]
    source = (out / "fastlora_kernels_data.c").read_text()
    assert f"const int fl_num_kernels = {len(rows)};" in source
    for i, m in enumerate(manifest):
        # The cubin embedded in the C source is the one the manifest describes, and it is a CUDA ELF.
        body = re.search(rf"image_{i}\[\] = \{{\n(.*?)\}};", source, re.S).group(1)
        cubin = bytes(int(b) for b in body.replace("\n", "").split(","))
        assert len(cubin) == m["cubin_bytes"] and cubin[:4] == b"\x7fELF"
        assert int.from_bytes(cubin[18:20], "little") == 190  # EM_CUDA
        assert m["name"].encode() + b"\0" in cubin
        assert m["arch"] == 80 and m["spills"] == 0


def test_parameter_lists_match_the_ptx(generated):
    """What the C launcher passes (the non-constexpr arguments in order, then null scratch pointers) is exactly the
    ``.entry`` parameter list of the PTX."""
    out, rows = generated
    arg_names = {spec.name: spec.fn.arg_names for spec in static_check.kernel_specs()}
    header = (out / "fastlora_kernel_args.h").read_text()
    for row in rows:
        types = {"*": ".u64", "i32": ".u32", "fp32": ".f32"}
        assert row["ptx_params"][: len(row["params"])] == [types[t] for t in row["param_types"]]
        assert row["scratch_params"] == len(row["ptx_params"]) - len(row["params"]) >= 0
        assert all(t == ".u64" for t in row["ptx_params"][len(row["params"]) :])
        names = arg_names[row["kernel"]]
        assert row["params"] == [n for n in names if n in row["params"]]  # signature order
        assert not set(row["params"]) & set(row["unit"])  # unit strides are compiled in, never passed
        for index, name in enumerate(names):
            assert f"FL_ARG_{row['kernel']}_{name} = {index}" in header
