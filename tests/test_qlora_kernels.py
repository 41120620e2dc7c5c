"""QLoRA's kernels (Triton; the interpreter on CPU): ``fastlora.lora_linear`` and ``fastlora.ops.quant_linear`` over a
4-bit ``QuantizedWeight`` against the fp64 reference of the dequantized math, and what a CPU can prove of them: no
full-precision copy of W0 is ever made, the launch budget and the bytes saved for the backward are the dense layer's.

The reference dequantizes W0 to the activations' dtype (``QuantizedWeight.dequantize``, bit-exact with bitsandbytes:
``tests/test_nf4.py``), as the kernels do tile by tile in registers, then runs ``lora_linear_reference`` in fp64; the
remaining difference is the GEMMs' accumulation, held to the tolerance table.
"""

import itertools
import random

import pytest
import torch
from tolerances import assert_close
from torch.utils._python_dispatch import TorchDispatchMode

import fastlora
from fastlora import nf4
from fastlora.bench.launches import count_launches
from fastlora.bench.memory import saved_for_backward
from fastlora.ops import quant_linear
from fastlora.reference import lora_linear_reference

# Ragged everywhere: M = 1 and a row count past the one-pass limit, K and N not multiples of the block size (so blocks
# span rows), an odd K (rows start in the low nibble of a byte), r = 1 and a rank past the rank tile.
SHAPES = [(1, 64, 40, 8), (5, 80, 24, 1), (70, 72, 33, 16), (9, 45, 32, 4), (66, 128, 64, 70)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
QUANTS = [
    ("nf4", 64, True),
    ("nf4", 64, False),
    ("fp4", 128, True),
    ("nf4", 128, False),
    ("fp4", 64, False),
    ("nf4", 32, True),
]
IMPLS = ["onepass", "split"]


def quantized(N: int, K: int, quant, device, seed: int = 0) -> nf4.QuantizedWeight:
    quant_type, blocksize, nested = quant
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(seed)) * K**-0.5
    return nf4.quantize(w.to(device), blocksize=blocksize, quant_type=quant_type, double_quant=nested)


def _cases():
    """Each shape under every dtype and both forward shapes; the quantization and dropout are drawn from a fixed-seed
    generator so they mix with every other axis."""
    rng = random.Random(0)
    for shape, dtype, impl in itertools.product(SHAPES, DTYPES, IMPLS):
        if impl == "onepass" and shape[3] > fastlora.kernels.ONEPASS_MAX_RANK:
            continue
        quant = rng.choice(QUANTS)
        p = rng.choice([0.0, 0.1])
        name = f"{shape}-{str(dtype)[6:]}-{impl}-{quant[0]}{quant[1]}{'-dq' if quant[2] else ''}-p{p}"
        yield pytest.param(*shape, dtype, impl, quant, p, id=name)


@pytest.mark.parametrize("M, K, N, r, dtype, impl, quant, dropout_p", list(_cases()))
def test_lora_linear_over_4bit_matches_reference(M, K, N, r, dtype, impl, quant, dropout_p, device):
    g = torch.Generator().manual_seed(M + K)
    qw = quantized(N, K, quant, device)
    x = torch.randn(M, K, generator=g).to(dtype).to(device).requires_grad_()
    bias = torch.randn(N, generator=g).to(dtype).to(device)
    lora_A = (torch.randn(r, K, generator=g) * K**-0.5).to(device).requires_grad_()
    lora_B = (torch.randn(N, r, generator=g) * r**-0.5).to(device).requires_grad_()
    seed = torch.tensor([7 + M], dtype=torch.int64, device=device)
    before = [t.clone() for t in qw.tensors()]

    y = fastlora.lora_linear(x, qw, bias, lora_A, lora_B, 2.0 / r, dropout_p, True, forward_impl=impl, seed=seed)
    dy = torch.randn(y.shape, generator=g).to(dtype).to(device)
    y.backward(dy)

    w64 = qw.dequantize(dtype).double()
    x64, a64, b64 = (t.detach().double().requires_grad_() for t in (x, lora_A, lora_B))
    y64 = lora_linear_reference(x64, w64, bias.double(), a64, b64, 2.0 / r, dropout_p, seed)
    y64.backward(dy.double())
    assert y.dtype == dtype and y.shape == (M, N)
    assert_close(y, y64, dtype, K + r, "y")
    assert_close(x.grad, x64.grad, dtype, N + r, "dx")
    assert_close(lora_A.grad, a64.grad, dtype, M, "dA")
    assert_close(lora_B.grad, b64.grad, dtype, M, "dB")
    assert all(torch.equal(t, t0) for t, t0 in zip(qw.tensors(), before)), "the 4-bit weight was modified"


@pytest.mark.parametrize("M", [3, 70])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quant", [("nf4", 32, True), ("fp4", 64, False), ("nf4", 256, True)])
def test_quant_linear_matches_reference(M, dtype, quant, device):
    """The frozen 4-bit layer alone, both forward shapes: ``y`` and the ``dx`` that flows through it. The block sizes
    give tiles that span several blocks (32), one (64) and part of one (256, which does not divide K = 96: the
    element-by-element path)."""
    qw = quantized(40, 96, quant, device)
    g = torch.Generator().manual_seed(M)
    x = torch.randn(2, M, 96, generator=g).to(dtype).to(device).requires_grad_()
    bias = torch.randn(40, generator=g).to(device)  # an fp32 bias, as a bitsandbytes layer may keep it
    y = quant_linear(x, qw, bias)
    dy = torch.randn(y.shape, generator=g).to(dtype).to(device)
    y.backward(dy)
    x64 = x.detach().double().requires_grad_()
    y64 = x64 @ qw.dequantize(dtype).double().t() + bias.double()
    y64.backward(dy.double())
    assert y.shape == (2, M, 40) and y.dtype == dtype
    assert_close(y, y64, dtype, 96, "y")
    assert_close(x.grad, x64.grad, dtype, 40, "dx")
    with torch.no_grad():
        assert torch.equal(quant_linear(x, qw, bias), y.detach())


class _Allocations(TorchDispatchMode):
    """The largest floating-point tensor any op produced inside the block (the kernels' interpreter runs as torch and
    numpy operations on tiles, so a dequantized W0 written anywhere would show here)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("impl", IMPLS)
def test_no_full_precision_copy_of_w0(impl, device):
    """A training step over a 4-bit W0 [N, K] creates no floating-point tensor of N·K elements or more: the weight is
    dequantized tile by tile inside the kernels. The torch backend, which dequantizes for each call, does."""
    N, K, M, r = 96, 128, 8, 4
    qw = quantized(N, K, ("nf4", 64, True), device)
    x = torch.randn(M, K, device=device, requires_grad=True)
    lora_A = torch.randn(r, K, device=device, requires_grad=True)
    lora_B = torch.randn(N, r, device=device, requires_grad=True)

    def step(backend):
        y = fastlora.lora_linear(x, qw, None, lora_A, lora_B, 1.0, 0.1, True, forward_impl=impl, backend=backend)
        y.backward(torch.ones_like(y))
        quant_linear(x, qw, backend=backend).sum().backward()

    step("triton")  # warm-up: the interpreter's first launch builds what it caches
    with _Allocations() as seen:
        step("triton")
    assert seen.largest < N * K, f"a tensor of {seen.largest} elements (W0 has {N * K}) was created"
    with _Allocations() as seen:
        step("torch")
    assert seen.largest >= N * K  # the check above can see a dequantized W0


@pytest.mark.parametrize("dropout", [0.1, 0.0])
def test_launches_and_saved_bytes_match_the_dense_layer(dropout, device):
    """The budget of PERF.md holds over a 4-bit W0: at most 6 launches per training step with dropout (5 without), no
    host sync, and nothing saved for the backward beyond ``x`` but ``xs`` ([M, r]) and the seed."""
    M, K, N, r = 256, 64, 64, 8
    qw = quantized(N, K, ("nf4", 64, True), device)
    x = torch.randn(M, K, device=device, dtype=torch.bfloat16, requires_grad=True)
    lora_A = torch.nn.Parameter(torch.randn(r, K, device=device) * 0.1)
    lora_B = torch.nn.Parameter(torch.randn(N, r, device=device) * 0.1)

    def forward():
        return fastlora.lora_linear(x, qw, None, lora_A, lora_B, 2.0, dropout, True)

    dy = torch.ones(M, N, device=device, dtype=torch.bfloat16)

    def step():
        for t in (x, lora_A, lora_B):
            t.grad = None
        forward().backward(dy)

    step()
    count = count_launches(step, device)
    assert count.host_syncs == 0
    assert count.launches <= (6 if dropout else 5), count.kernels
    saved = saved_for_backward(forward, x, [lora_A, lora_B])
    assert saved.beyond_input_bytes <= 4 * M * r + 8, saved


def test_frozen_4bit_layer_launches_one_kernel_each_way(device):
    qw = quantized(64, 64, ("nf4", 64, True), device)
    x = torch.randn(256, 64, device=device, requires_grad=True)

    dy = torch.ones(256, 64, device=device)

    def step():
        x.grad = None
        quant_linear(x, qw).backward(dy)

    step()
    count = count_launches(step, device)
    assert count.launches == 2 and count.host_syncs == 0, count.kernels


def test_errors_name_the_problem(device):
    qw = quantized(16, 32, ("nf4", 64, True), device)
    lora_A, lora_B = torch.zeros(4, 32, device=device), torch.zeros(16, 4, device=device)
    x = torch.randn(3, 32, device=device)
    with pytest.raises(ValueError, match=r"\[16, 32\], but x has K=40"):
        fastlora.lora_linear(torch.randn(3, 40, device=device), qw, None, lora_A, lora_B, 1.0)
    with pytest.raises(ValueError, match="fan_in_fan_out"):
        fastlora.lora_linear(x, qw, None, lora_A, lora_B, 1.0, fan_in_fan_out=True)
    with pytest.raises(ValueError, match="transposed"):
        fastlora.lora_linear(x, qw.t(), None, lora_A, lora_B, 1.0)
    with pytest.raises(TypeError, match="x.dtype"):
        quant_linear(x.double(), qw)
    with pytest.raises(ValueError, match="bias"):
        quant_linear(x, qw, torch.zeros(15, device=device))
    with pytest.raises(TypeError, match="QuantizedWeight"):
        quant_linear(x, torch.zeros(16, 32, device=device))


@pytest.mark.parametrize("impl", ["fused", "segmented"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_multi_lora_over_4bit_matches_reference(impl, dtype, device):
    """Serving over a 4-bit base: tokens of three adapters of different ranks and tokens with none, both paths (the
    fused decode kernel and the segmented one, whose base GEMM is the fused GEMM with no low-rank term)."""
    from multi_lora_cases import expected, make_case

    T, K, N = 11, 72, 40
    slots = [0, -1, 2, 1, 0, 2, -1, 1, 1, 0, 2]
    x, _, bias, a_pool, b_pool, meta = make_case(T, K, N, [4, 16, 1], slots, dtype, torch.float32, device=device)
    qw = quantized(N, K, ("nf4", 64, True), device)
    with torch.no_grad():
        y = fastlora.multi_lora_linear(x, qw, bias, a_pool, b_pool, meta, impl=impl)
        y_torch = fastlora.multi_lora_linear(x, qw, bias, a_pool, b_pool, meta, backend="torch")
    y64 = expected(x, qw.dequantize(dtype), bias, a_pool, b_pool, meta)
    assert_close(y, y64, dtype, K + 16, "y")
    assert_close(y_torch, y64, dtype, K + 16, "y (torch backend)")
