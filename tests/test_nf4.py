"""fastlora.nf4: bitsandbytes' 4-bit format in pure torch, bit-exact with bitsandbytes on CPU.

The tests that compare with bitsandbytes skip without it; the format's own properties (nibble order, padding, nearest
code, error bound, views, validation) are checked without it.
"""

import ast
import dataclasses
import inspect
import sys

import pytest
import torch

from fastlora import nf4

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Odd sizes: blocks that span rows ([24, 40], [64, 96]), an odd element count ([7, 9]) and a short last block.
SHAPES = ((24, 40), (7, 9), (64, 96), (64, 128))


def _weight(shape, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator) * 0.02).to(dtype)


def _nibbles(qw: nf4.QuantizedWeight) -> torch.Tensor:
    """The 4-bit indices of the flattened weight, from the documented layout (even element in the high nibble)."""
    packed = qw.data.reshape(-1).long()
    return torch.stack((packed >> 4, packed & 0xF), dim=-1).reshape(-1)[: qw.out_features * qw.in_features]


def _reference_dequantize(qw: nf4.QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    """``code[q[i]] * absmax[i // blocksize]`` element by element in fp32, rounded once to ``dtype``."""
    n = qw.out_features * qw.in_features
    scale = qw.absmax_fp32()[torch.arange(n) // qw.blocksize]
    return (qw.code[_nibbles(qw)] * scale).to(dtype).view(qw.out_features, qw.in_features)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Every tensor here is tiny: worker threads (torch's, and bnb's OpenMP ones) would only contend for the CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def bnb(monkeypatch):
    bnb = pytest.importorskip("bitsandbytes")
    # bnb's pure-torch fallback (taken for an odd in_features) is wrapped in torch.compile, which would compile once
    # per shape and dtype; eager mode computes the same values.
    monkeypatch.setattr(torch._dynamo.config, "disable", True)
    return bnb


# bitsandbytes comparisons


def test_code_tables_match_bnb(bnb):
    functional = bnb.functional
    assert torch.equal(torch.tensor(nf4.NF4_CODE), functional.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(torch.tensor(nf4.FP4_CODE), functional.get_4bit_type("fp4", device="cpu"))
    qw = nf4.quantize(_weight((8, 64)))
    assert torch.equal(qw.nested_code, functional.create_dynamic_map())


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", nf4.QUANT_TYPES)
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_quantize_matches_bnb(bnb, shape, dtype, blocksize, quant_type, double_quant):
    weight = _weight(shape, dtype)
    data, state = bnb.functional.quantize_4bit(
        weight, blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant
    )
    qw = nf4.quantize(weight, blocksize=blocksize, quant_type=quant_type, double_quant=double_quant)

    assert torch.equal(qw.data, data)
    assert torch.equal(qw.absmax, state.absmax)
    assert torch.equal(qw.code, state.code)
    assert qw.dtype == state.dtype and qw.shape == tuple(state.shape) and qw.nested == double_quant
    if double_quant:
        assert torch.equal(qw.nested_absmax, state.state2.absmax)
        assert torch.equal(qw.nested_code, state.state2.code)
        assert torch.equal(qw.offset, state.offset)
        assert qw.nested_blocksize == state.state2.blocksize
        expected = bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
        assert torch.equal(qw.absmax_fp32(), expected)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", nf4.QUANT_TYPES)
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_dequantize_matches_bnb(bnb, shape, blocksize, quant_type, double_quant):
    qw = nf4.quantize(_weight(shape), blocksize=blocksize, quant_type=quant_type, double_quant=double_quant)
    state = nf4.to_bnb(qw).quant_state
    # bnb's AVX-512 CPU kernel (taken when K % 16 == 0) reads absmax per row, which is wrong when a block spans rows;
    # there the documented element-by-element formula is the reference.
    bnb_cpu_reads_rows = shape[1] % 16 == 0 and shape[1] % blocksize != 0
    for dtype in DTYPES:
        state.dtype = dtype
        out = qw.dequantize(dtype)
        assert out.dtype == dtype and out.shape == shape and out.is_contiguous()
        assert torch.equal(out, _reference_dequantize(qw, dtype))
        if not bnb_cpu_reads_rows:
            assert torch.equal(out, bnb.functional.dequantize_4bit(qw.data, state))


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", nf4.QUANT_TYPES)
def test_special_values_match_bnb(bnb, quant_type, double_quant):
    code = torch.tensor(nf4.NF4_CODE if quant_type == "nf4" else nf4.FP4_CODE).sort().values
    midpoints = (code[:-1] + code[1:]) / 2
    # A block of 128 whose absmax is 1: values exactly halfway between codes, just either side, and FP4's two zeros.
    ties = torch.cat(
        (
            torch.tensor([1.0, 0.0, -0.0, 1e-3, -1e-3, 2.6e-3, -2.6e-3]),
            midpoints,
            -midpoints,
            midpoints.nextafter(torch.tensor(2.0)),
            midpoints.nextafter(torch.tensor(-2.0)),
        )
    )
    weight = _weight((9, 128), seed=1)
    weight[0, : ties.numel()] = ties
    weight[1] = 0  # an all-zero block
    weight[2, 5] = float("inf")
    weight[3, 7] = float("-inf")
    weight[4, 9] = float("nan")
    weight[5] *= 1e-40  # subnormal
    short_tail = torch.cat((weight.reshape(-1), torch.zeros(7))).view(1, -1)  # an all-zero short last block

    for w in (weight, short_tail):
        data, state = bnb.functional.quantize_4bit(
            w, blocksize=128, quant_type=quant_type, compress_statistics=double_quant
        )
        qw = nf4.quantize(w, blocksize=128, quant_type=quant_type, double_quant=double_quant)
        assert torch.equal(qw.data, data)
        assert _equal_nan(qw.absmax, state.absmax)
        if double_quant:
            assert _equal_nan(qw.nested_absmax, state.state2.absmax)
            assert _equal_nan(qw.offset, state.offset)


def test_nested_absmax_follows_bnb_cpu_table(bnb):
    # 2048 blocks of 32: enough absmax values that bnb's 65536-point table picks, for some, another code than the
    # exactly nearest one.
    weight = _weight((256, 256), seed=3) * torch.rand(256, 1, generator=torch.Generator().manual_seed(4))
    data, state = bnb.functional.quantize_4bit(weight, blocksize=32, quant_type="nf4", compress_statistics=True)
    qw = nf4.quantize(weight, blocksize=32)
    assert torch.equal(qw.absmax, state.absmax) and torch.equal(qw.nested_absmax, state.state2.absmax)

    plain = nf4.quantize(weight, blocksize=32, double_quant=False).absmax
    group = torch.arange(plain.numel()) // 256
    scaled = (plain - qw.offset) * (1.0 / qw.nested_absmax[group])
    nearest = ((scaled.unsqueeze(1) - qw.nested_code).abs()).argmin(1)
    assert not torch.equal(nearest.to(torch.uint8), qw.absmax)


def _equal_nan(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and bool(((a == b) | (a.isnan() & b.isnan())).all())


def _linear4bit(bnb, quant_type, double_quant, quant_storage, out_features=64, in_features=128):
    torch.manual_seed(0)
    module = bnb.nn.Linear4bit(
        in_features,
        out_features,
        bias=False,
        compute_dtype=torch.float32,
        compress_statistics=double_quant,
        quant_type=quant_type,
        quant_storage=quant_storage,
    )
    original = module.weight.data.clone()
    return module.to("cpu"), original


def _snapshot(weight) -> dict:
    """Copies of a bnb weight's data and every attribute of its quant state (and nested state)."""

    def items(state, prefix):
        for key, value in vars(state).items():
            if hasattr(value, "absmax"):
                yield from items(value, f"{prefix}{key}.")
            else:
                yield prefix + key, value.clone() if isinstance(value, torch.Tensor) else value

    # Bytes, not values: bf16 storage holds arbitrary bit patterns, NaNs among them.
    return {"data": weight.data.view(torch.uint8).clone(), **dict(items(weight.quant_state, ""))}


def _assert_unchanged(weight, before: dict):
    after = _snapshot(weight)
    assert after.keys() == before.keys()
    for key, value in after.items():
        same = torch.equal(value, before[key]) if isinstance(value, torch.Tensor) else value == before[key]
        assert same, key


@pytest.mark.parametrize("quant_storage", [torch.uint8, torch.bfloat16], ids=str)
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", nf4.QUANT_TYPES)
def test_from_bnb_reads_linear4bit_in_place(bnb, quant_type, double_quant, quant_storage):
    module, original = _linear4bit(bnb, quant_type, double_quant, quant_storage)
    module.train()
    module(torch.randn(2, 128))  # a training forward leaves bnb's layout alone
    before = _snapshot(module.weight)

    qw = nf4.from_bnb(module.weight)
    state = module.weight.quant_state
    assert qw.data.data_ptr() == module.weight.data.data_ptr() and qw.data.dtype == torch.uint8
    assert qw.absmax is state.absmax and qw.code is state.code
    if double_quant:
        assert qw.nested_absmax is state.state2.absmax and qw.offset is state.offset
    assert qw.shape == (64, 128) and qw.dtype == torch.float32 and qw.nested == double_quant

    expected = nf4.quantize(original, quant_type=quant_type, double_quant=double_quant)
    assert torch.equal(qw.data.reshape(-1), expected.data.reshape(-1))
    assert torch.equal(qw.dequantize(), expected.dequantize())
    assert torch.equal(qw.dequantize(), bnb.functional.dequantize_4bit(module.weight.data, state))
    _assert_unchanged(module.weight, before)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", nf4.QUANT_TYPES)
def test_from_bnb_unpacks_cpu_repacked_weight(bnb, quant_type, double_quant):
    if not bnb.functional.has_avx512bf16():
        pytest.skip("bitsandbytes repacks for CPU only with AVX512-BF16")
    module, original = _linear4bit(bnb, quant_type, double_quant, torch.uint8)
    expected = nf4.quantize(original, quant_type=quant_type, double_quant=double_quant)
    module.eval()
    with torch.no_grad():
        module(torch.randn(2, 128))
    state = module.weight.quant_state
    assert state.packing_format_for_cpu and tuple(module.weight.data.shape) == (64, 64)
    before = _snapshot(module.weight)

    qw = nf4.from_bnb(module.weight)
    # The nibbles come back exactly; the absmax is the bf16 copy bnb now computes with, its double quantization gone.
    assert torch.equal(qw.data, expected.data)
    assert torch.equal(qw.absmax, expected.absmax_fp32().bfloat16().float())
    assert not qw.nested and qw.dtype == torch.float32 and qw.shape == (64, 128)
    _assert_unchanged(module.weight, before)


@pytest.mark.parametrize("double_quant", [False, True])
def test_to_bnb_round_trip(bnb, double_quant):
    qw = nf4.quantize(_weight((24, 40), torch.bfloat16), quant_type="fp4", double_quant=double_quant)
    param = nf4.to_bnb(qw)
    assert isinstance(param, bnb.nn.Params4bit) and not param.requires_grad
    assert param.data.data_ptr() == qw.data.data_ptr() and param.quant_state.absmax is qw.absmax
    assert torch.equal(bnb.functional.dequantize_4bit(param.data, param.quant_state), qw.dequantize())

    back = nf4.from_bnb(param)
    assert back.data.data_ptr() == qw.data.data_ptr() and back.data.shape == qw.data.shape
    for name in ("absmax", "code", "nested_absmax", "nested_code", "offset"):
        assert getattr(back, name) is getattr(qw, name), name
    fields = ("blocksize", "out_features", "in_features", "dtype", "quant_type", "nested_blocksize")
    assert all(getattr(back, name) == getattr(qw, name) for name in fields)

    # The state dict bnb writes loads back into the same weight.
    saved = param.quant_state.as_dict(packed=True)
    loaded = bnb.nn.Params4bit.from_prequantized(param.data.clone(), saved, device="cpu")
    assert torch.equal(nf4.from_bnb(loaded).dequantize(), qw.dequantize())

    with pytest.raises(ValueError, match="untransposed"):
        nf4.to_bnb(qw.t())


def test_from_bnb_rejects_other_things(bnb):
    with pytest.raises(TypeError, match="got Tensor"):
        nf4.from_bnb(torch.zeros(4, 1, dtype=torch.uint8))
    with pytest.raises(TypeError, match="got Int8Params"):
        nf4.from_bnb(bnb.nn.Int8Params(torch.zeros(4, 4)))
    module, _ = _linear4bit(bnb, "nf4", True, torch.uint8)
    with pytest.raises(TypeError, match=r"Linear4bit \(pass the module's .weight\)"):
        nf4.from_bnb(module)
    unquantized = bnb.nn.Params4bit(torch.zeros(4, 4), quant_type="nf4")
    with pytest.raises(TypeError, match="not quantized yet"):
        nf4.from_bnb(unquantized)


# The format without bitsandbytes


def test_nibble_order_and_padding():
    # -1 is index 0 in NF4 (11 in FP4), +1 index 15 (3 in FP4): the first element sits in the high nibble.
    weight = torch.tensor([[-1.0, 1.0, 0.0]])
    for quant_type, zero in (("nf4", 7), ("fp4", 0)):
        qw = nf4.quantize(weight, quant_type=quant_type, double_quant=False)
        first = 0x0F if quant_type == "nf4" else (11 << 4) | 3
        # Two bytes for three elements: the odd count is padded with the index of 0.0.
        assert qw.data.tolist() == [[first], [(zero << 4) | zero]]
        assert qw.data.shape == (2, 1) and qw.absmax.tolist() == [1.0]
        assert qw.dequantize().tolist() == weight.tolist()


def test_blocks_run_over_the_flattened_weight():
    # [3, 40] with blocksize 32: block 1 covers the end of row 0 and the start of row 1.
    weight = torch.zeros(3, 40)
    weight[0, 35] = 2.0
    weight[1, 3] = -4.0
    qw = nf4.quantize(weight, blocksize=32, double_quant=False)
    assert qw.num_blocks == 4
    assert qw.absmax.tolist() == [0.0, 4.0, 0.0, torch.tensor(1e-38).item()]
    assert qw.dequantize()[1, 3] == -4.0 and qw.dequantize()[0, 35] == pytest.approx(4.0 * nf4.NF4_CODE[12])


def test_zero_blocks():
    weight = torch.zeros(2, 40)  # a full block of 64 zeros and a short last block of 16 zeros
    qw = nf4.quantize(weight, double_quant=False)
    # bnb keeps 0 for a full block but stores the 1e-38 floor it divided by for the short last one.
    assert qw.absmax.tolist() == [0.0, torch.tensor(1e-38).item()]
    assert torch.all(qw.data == 0x77) and torch.equal(qw.dequantize(), weight)
    nested = nf4.quantize(weight)
    assert torch.equal(nested.dequantize(), weight)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", nf4.QUANT_TYPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantize_picks_the_nearest_code(dtype, quant_type, double_quant):
    weight = _weight((33, 70), dtype, seed=2)
    qw = nf4.quantize(weight, blocksize=64, quant_type=quant_type, double_quant=double_quant)
    n = weight.numel()
    flat = weight.reshape(-1).double()
    exact_absmax = torch.nn.functional.pad(flat, (0, qw.num_blocks * 64 - n)).view(-1, 64).abs().amax(1)
    block = torch.arange(n) // 64
    code = qw.code.double()

    chosen = code[_nibbles(qw)]
    distance = (flat / exact_absmax[block]).unsqueeze(1) - code
    assert torch.all((chosen - flat / exact_absmax[block]).abs() <= distance.abs().amin(1) + 1e-6)

    # |w - code * absmax'| <= absmax * half the widest code gap + |absmax - absmax'|.
    half_gap = code.sort().values.diff().max() / 2
    scale = qw.absmax_fp32().double()
    bound = exact_absmax * half_gap + (scale - exact_absmax).abs()
    error = (qw.dequantize(torch.float32).double().reshape(-1) - flat).abs()
    assert torch.all(error <= bound[block] * (1 + 1e-6))
    assert qw.dequantize().dtype == dtype


def test_double_quant_absmax_is_close():
    qw = nf4.quantize(_weight((64, 256)), double_quant=True)
    plain = nf4.quantize(_weight((64, 256)), double_quant=False)
    assert qw.absmax.dtype == torch.uint8 and qw.nested_blocksize == 256 and qw.offset.numel() == 1
    assert qw.nested_absmax.shape == (1,) and qw.nested_code.shape == (256,)
    assert torch.equal(qw.data, plain.data)
    relative = ((qw.absmax_fp32() - plain.absmax) / plain.absmax).abs().max()
    assert relative < 0.01


def test_quantize_accepts_any_layout():
    weight = _weight((40, 24)).t()
    assert not weight.is_contiguous()
    assert torch.equal(nf4.quantize(weight).data, nf4.quantize(weight.contiguous()).data)
    grad_weight = _weight((8, 64)).requires_grad_()
    qw = nf4.quantize(grad_weight)
    assert not any(t.requires_grad for t in qw.tensors())


def test_views_strides_and_shapes():
    qw = nf4.quantize(_weight((24, 40)))
    assert qw.shape == (24, 40) and qw.size() == (24, 40) and qw.size(0) == 24 and qw.size(-1) == 40
    assert qw.dim() == 2 and qw.stride() == (40, 1) and qw.stride(0) == 40 and qw.stride(1) == 1
    qt = qw.t()
    assert qt.transposed and qt.shape == (40, 24) and qt.stride() == (1, 40) and qt.stride(-1) == 40
    assert qt.data is qw.data and qt.absmax is qw.absmax
    assert qt.t().shape == qw.shape and not qt.t().transposed
    dense = qw.dequantize()
    assert torch.equal(qt.dequantize(), dense.t())
    assert qt.dequantize().stride() == dense.t().stride()
    assert qw.dequantize(torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        qw.dequantize(torch.int8)


def test_tensors_nbytes_and_moves():
    qw = nf4.quantize(_weight((24, 40)), double_quant=True)
    assert len(qw.tensors()) == 6
    # 480 bytes of nibbles, 15 uint8 absmax, the 16- and 256-entry tables, 1 nested absmax and the offset.
    assert qw.nbytes == 480 + 15 + 16 * 4 + 256 * 4 + 4 + 4
    assert nf4.quantize(_weight((24, 40)), double_quant=False).nbytes == 480 + 15 * 4 + 16 * 4
    assert qw.to("cpu") is qw and qw.device == torch.device("cpu")
    meta = qw.t().to("meta")
    assert meta.device.type == "meta" and all(t.is_meta for t in meta.tensors()) and meta.transposed
    assert "nf4" in repr(qw) and "[24, 40]" in repr(qw)


def _bad_fields(qw):
    nested = {"nested_absmax": None, "nested_code": None, "offset": None, "nested_blocksize": 0}
    return [
        ({"data": qw.data[:-1]}, "data has 479 elements, want 480"),
        ({"data": qw.data.float()}, "data must be torch.uint8"),
        ({"data": torch.zeros(2, 480, dtype=torch.uint8)[:, 0]}, "data has 2 elements"),
        ({"data": torch.zeros(480, 2, dtype=torch.uint8)[:, 0]}, "data must be contiguous"),
        ({"absmax": qw.absmax[:-1]}, "absmax has 14 elements, want 15"),
        ({"absmax": qw.absmax.float()}, "absmax must be torch.uint8"),
        ({**nested, "absmax": qw.absmax}, "absmax must be torch.float32"),
        ({"code": qw.code[:8]}, "code has 8 elements, want 16"),
        ({"offset": None}, r"\['offset'\] missing"),
        ({"nested_blocksize": 100}, "nested_blocksize must be one of"),
        ({**nested, "absmax": qw.absmax.float(), "nested_blocksize": 256}, "without double quantization"),
        ({"nested_absmax": torch.ones(2)}, "nested_absmax has 2 elements, want 1"),
        ({"nested_code": qw.nested_code[:255]}, "nested_code has 255 elements"),
        ({"quant_type": "int4"}, "quant_type must be one of"),
        ({"blocksize": 48}, "blocksize must be one of"),
        ({"blocksize": 128}, "absmax has 15 elements, want 8"),
        ({"dtype": torch.int8}, "dtype must be float32, float16 or bfloat16"),
        ({"out_features": 0}, "out_features must be a positive int"),
        ({"in_features": 40.0}, "in_features must be a positive int"),
        ({"transposed": 1}, "transposed must be a bool"),
        ({"offset": torch.zeros(1, device="meta")}, "all tensors must be on one device"),
    ]


def test_validate_names_the_problem():
    qw = nf4.quantize(_weight((24, 40)))
    for changes, message in _bad_fields(qw):
        with pytest.raises(ValueError, match=message):
            dataclasses.replace(qw, **changes)
    qw.validate()


def test_quantize_rejects_bad_input():
    weight = _weight((8, 64))
    with pytest.raises(TypeError, match="expects a tensor"):
        nf4.quantize(weight.tolist())
    with pytest.raises(ValueError, match="2-D"):
        nf4.quantize(weight.view(2, 4, 64))
    with pytest.raises(ValueError, match="non-empty"):
        nf4.quantize(torch.zeros(0, 64))
    with pytest.raises(ValueError, match="got torch.float64"):
        nf4.quantize(weight.double())
    with pytest.raises(ValueError, match="blocksize must be one of"):
        nf4.quantize(weight, blocksize=48)
    with pytest.raises(ValueError, match="quant_type must be one of"):
        nf4.quantize(weight, quant_type="int4")
    with pytest.raises(ValueError, match="nested_blocksize must be one of"):
        nf4.quantize(weight, nested_blocksize=100)


def test_to_bnb_without_bitsandbytes(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` raise ImportError
    with pytest.raises(ImportError, match=r"pip install fastlora\[qlora\]"):
        nf4.to_bnb(nf4.quantize(_weight((8, 64))))


def test_imports_only_torch_and_the_standard_library():
    tree = ast.parse(inspect.getsource(nf4))
    to_bnb = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "to_bnb")
    lazy = {id(node) for node in ast.walk(to_bnb)}
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom) and id(node) not in lazy:
            names = [node.module] if isinstance(node, ast.ImportFrom) else [alias.name for alias in node.names]
            imported.update(name.split(".")[0] for name in names)
    assert imported <= {"__future__", "dataclasses", "math", "torch"}, imported
