"""fastlora.lora_linear (Triton kernels; the interpreter on CPU) against the fp64 reference: forward and every
gradient, over odd shapes, ranks, dtypes, both weight layouts, both forward shapes and several input layouts."""

import itertools
import random

import pytest
import torch
from tolerances import assert_close

import fastlora
from fastlora.reference import lora_linear_reference

# Every M, K, N and r of the sweep appears at least once, with ragged tiles everywhere (M=1, r=1, K=N=33,
# primes), a rank above K, and a rank above the rank tile.
SHAPES = [
    (1, 16, 33, 1),
    (7, 33, 96, 4),
    (64, 96, 257, 16),
    (300, 257, 16, 64),
    (7, 257, 33, 16),
    (64, 16, 96, 64),
    (300, 33, 257, 1),
    (1, 96, 16, 4),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
IMPLS = ["onepass", "split"]
INPUT_FORMS = ["2d", "3d", "strided", "transposed"]


def make_inputs(M, K, N, r, dtype, lora_dtype, fan_in_fan_out, form, device, bias_grad=True, seed=0):
    """Inputs scaled so outputs are O(1); ``x`` in the requested memory layout, all leaves."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, dt, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dt).to(device)

    if form == "2d":
        x = rand(M, K, dt=dtype)
    elif form == "3d":
        x = rand(1, M, K, dt=dtype) if M % 2 else rand(2, M // 2, K, dt=dtype)
    elif form == "strided":  # every other column of a wider buffer: K stride 2
        x = rand(M, 2 * K, dt=dtype)[:, ::2]
    else:  # sequence-major activations seen batch-major: leading dims that do not collapse into one
        x = rand(M // 2, 2, K, dt=dtype).transpose(0, 1) if M % 2 == 0 else rand(M, 1, K, dt=dtype).transpose(0, 1)
    w_shape = (K, N) if fan_in_fan_out else (N, K)
    weight = rand(*w_shape, dt=dtype, scale=K**-0.5)
    bias = rand(N, dt=dtype).requires_grad_(bias_grad)
    lora_A = rand(r, K, dt=lora_dtype, scale=K**-0.5).requires_grad_()
    lora_B = rand(N, r, dt=lora_dtype, scale=r**-0.5).requires_grad_()
    return x.requires_grad_(), weight, bias, lora_A, lora_B


def check_against_reference(M, K, N, r, dtype, lora_dtype, impl, fan_in_fan_out, form, dropout_p, device):
    x, weight, bias, lora_A, lora_B = make_inputs(M, K, N, r, dtype, lora_dtype, fan_in_fan_out, form, device)
    scaling = 2.0 / r
    seed = torch.tensor([20251122 + M], dtype=torch.int64, device=device)
    before = [t.detach().clone() for t in (x, weight, bias, lora_A, lora_B)]

    y = fastlora.lora_linear(
        x, weight, bias, lora_A, lora_B, scaling, dropout_p, training=True,
        fan_in_fan_out=fan_in_fan_out, forward_impl=impl, seed=seed,
    )  # fmt: skip
    assert y.dtype == dtype and y.shape == (*x.shape[:-1], N) and y.is_contiguous()
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype).to(device)
    y.backward(dy)

    leaves64 = [t.detach().double().requires_grad_() for t in (x, bias, lora_A, lora_B)]
    x64, b64, a64, bb64 = leaves64
    y64 = lora_linear_reference(x64, weight.double(), b64, a64, bb64, scaling, dropout_p, seed, fan_in_fan_out)
    y64.backward(dy.double())

    assert_close(y, y64, dtype, K + r, "y")
    assert_close(x.grad, x64.grad, dtype, N + r, "dx")
    assert_close(bias.grad, b64.grad, dtype, M, "dbias")
    assert_close(lora_A.grad, a64.grad, lora_dtype if lora_dtype == dtype else dtype, M, "dA")
    assert_close(lora_B.grad, bb64.grad, lora_dtype if lora_dtype == dtype else dtype, M, "dB")
    assert x.grad.dtype == dtype and lora_A.grad.dtype == lora_dtype and lora_B.grad.dtype == lora_dtype
    assert x.grad.shape == x.shape and lora_A.grad.is_contiguous() and lora_B.grad.is_contiguous()
    for t, t0 in zip((x, weight, bias, lora_A, lora_B), before):
        assert torch.equal(t.detach(), t0), "an input was modified"


def _cases():
    """Each shape under every dtype and both forward shapes; weight layout, input layout, dropout and LoRA dtype
    are drawn from a fixed-seed generator so they mix with every other axis. The full product runs with
    ``-m slow``."""
    rng = random.Random(0)
    for shape, dtype, impl in itertools.product(SHAPES, DTYPES, IMPLS):
        fan_in_fan_out = rng.random() < 0.5
        form = rng.choice(INPUT_FORMS)
        p = rng.choice([0.0, 0.1])
        lora_dtype = torch.float32 if dtype == torch.float32 or rng.random() < 0.5 else dtype
        name = f"{shape}-{str(dtype)[6:]}-{str(lora_dtype)[6:]}-{impl}-{'kn' if fan_in_fan_out else 'nk'}-{form}-p{p}"
        yield pytest.param(*shape, dtype, lora_dtype, impl, fan_in_fan_out, form, p, id=name)


@pytest.mark.parametrize("M, K, N, r, dtype, lora_dtype, impl, fan_in_fan_out, form, dropout_p", list(_cases()))
def test_matches_reference(M, K, N, r, dtype, lora_dtype, impl, fan_in_fan_out, form, dropout_p, device):
    check_against_reference(M, K, N, r, dtype, lora_dtype, impl, fan_in_fan_out, form, dropout_p, device)


@pytest.mark.slow
@pytest.mark.parametrize(
    "M, K, N, r", list(itertools.product([1, 7, 64, 300], [16, 33, 96, 257], [16, 33, 96, 257], [1, 4, 16, 64]))
)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", IMPLS)
def test_matches_reference_full_sweep(M, K, N, r, dtype, impl, device):
    for fan_in_fan_out, form, p in [(False, "2d", 0.0), (True, "strided", 0.1)]:
        check_against_reference(M, K, N, r, dtype, torch.float32, impl, fan_in_fan_out, form, p, device)


@pytest.mark.parametrize("impl", IMPLS)
def test_no_bias_and_frozen_inputs(impl, device):
    """Without bias, and with only some inputs requiring grad, the other gradients are still right."""
    x, weight, _, lora_A, lora_B = make_inputs(9, 40, 24, 8, torch.float32, torch.float32, False, "2d", device)
    x.requires_grad_(False)
    lora_A.requires_grad_(False)
    y = fastlora.lora_linear(x, weight, None, lora_A, lora_B, 0.5, forward_impl=impl)
    y.sum().backward()
    bb64 = lora_B.detach().double().requires_grad_()
    lora_linear_reference(x.double(), weight.double(), None, lora_A.double(), bb64, 0.5).sum().backward()
    assert x.grad is None and lora_A.grad is None
    assert_close(lora_B.grad, bb64.grad, torch.float32, 9, "dB")


def test_weight_gradient_when_requested(device):
    """A caller who leaves W0 trainable gets its gradient (not fused, but correct)."""
    x, weight, bias, lora_A, lora_B = make_inputs(5, 24, 12, 4, torch.float32, torch.float32, True, "2d", device)
    weight.requires_grad_()
    fastlora.lora_linear(x, weight, bias, lora_A, lora_B, 1.0, fan_in_fan_out=True).square().sum().backward()
    w64 = weight.detach().double().requires_grad_()
    lora_linear_reference(x.double(), w64, bias.double(), lora_A.double(), lora_B.double(), 1.0,
                          fan_in_fan_out=True).square().sum().backward()  # fmt: skip
    assert_close(weight.grad, w64.grad, torch.float32, 5, "dW")


@pytest.mark.parametrize("impl", IMPLS)
def test_inference_matches_training_forward(impl, device):
    """Under no_grad nothing is kept for the backward, and the output is the same."""
    x, weight, bias, lora_A, lora_B = make_inputs(33, 48, 40, 8, torch.float16, torch.float32, False, "2d", device)
    y_train = fastlora.lora_linear(x, weight, bias, lora_A, lora_B, 0.25, forward_impl=impl)
    with torch.no_grad():
        y_eval = fastlora.lora_linear(x, weight, bias, lora_A, lora_B, 0.25, forward_impl=impl)
    assert torch.equal(y_train.detach(), y_eval)


def test_forward_shapes_agree(device):
    """The one-pass and the shrink-then-GEMM forward round ``s·xa`` the same way: equal up to accumulation order."""
    x, weight, bias, lora_A, lora_B = make_inputs(40, 80, 72, 16, torch.bfloat16, torch.bfloat16, False, "2d", device)
    y1 = fastlora.lora_linear(x, weight, bias, lora_A, lora_B, 0.5, forward_impl="onepass")
    y2 = fastlora.lora_linear(x, weight, bias, lora_A, lora_B, 0.5, forward_impl="split")
    assert_close(y1.float(), y2.double(), torch.bfloat16, 80, "onepass vs split")


def test_gradients_are_deterministic(device):
    """Two identical backward passes give bitwise-equal gradients (no atomics; fixed reduction order)."""
    grads = []
    for _ in range(2):
        x, weight, bias, lora_A, lora_B = make_inputs(
            300, 96, 64, 16, torch.bfloat16, torch.float32, False, "2d", device
        )
        seed = torch.tensor([7], dtype=torch.int64, device=device)
        y = fastlora.lora_linear(x, weight, bias, lora_A, lora_B, 0.5, 0.1, True, seed=seed)
        y.backward(torch.ones_like(y))
        grads.append([t.grad.clone() for t in (x, bias, lora_A, lora_B)])
    for g1, g2 in zip(*grads):
        assert torch.equal(g1, g2)


def test_torch_backend_matches_triton(device):
    """Without dropout both backends compute the same layer and gradients."""
    outs = []
    for backend in ["torch", "auto"]:
        x, weight, bias, lora_A, lora_B = make_inputs(20, 48, 32, 8, torch.float32, torch.float32, False, "3d", device)
        y = fastlora.lora_linear(x, weight, bias, lora_A, lora_B, 0.5, 0.3, False, backend=backend)
        y.backward(torch.ones_like(y))
        outs.append([y.detach(), x.grad, lora_A.grad, lora_B.grad])
    for a, b in zip(*outs):
        assert_close(a, b.double(), torch.float32, 48, "torch vs triton backend")


def test_torch_backend_dropout_uses_its_mask(device):
    """With dropout the torch backend draws its own mask (``torch_linear.keep_mask``, not the kernels' Philox bits)
    from the seed, and its forward and gradients are the layer's formula under that mask."""
    from fastlora.ops import torch_linear

    M, K, N, r, p = 20, 48, 32, 8, 0.3
    x, weight, bias, lora_A, lora_B = make_inputs(M, K, N, r, torch.float32, torch.float32, False, "2d", "cpu")
    y = fastlora.lora_linear(x, weight, bias, lora_A, lora_B, 0.5, p, True, seed=torch.tensor([99]), backend="torch")
    y.backward(torch.ones_like(y))
    keep = torch_linear.keep_mask(99, (M, K), p, "cpu")
    assert 0 < keep.sum() < keep.numel()
    leaves = [t.detach().double().requires_grad_() for t in (x, lora_A, lora_B)]
    x64, a64, b64 = leaves
    xd = torch.where(keep, x64 / (1 - p), 0.0)
    y64 = x64 @ weight.double().t() + bias.double() + 0.5 * (xd @ a64.t()) @ b64.t()
    y64.backward(torch.ones_like(y64))
    assert_close(y, y64, torch.float32, K, "y")
    for got, want, name in zip((x.grad, lora_A.grad, lora_B.grad), (x64.grad, a64.grad, b64.grad), "x A B".split()):
        assert_close(got, want, torch.float32, max(M, N), f"d{name}")


def test_torch_backend_gradcheck():
    """The torch backend's hand-written backward (the CPU path) passes autograd's numerical check in fp64,
    dropout included."""
    g = torch.Generator().manual_seed(3)
    x, bias, lora_A, lora_B = (torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)
                               for s in [(2, 3, 7), (5,), (3, 7), (5, 3)])  # fmt: skip
    weight = torch.randn(5, 7, generator=g, dtype=torch.float64)
    seed = torch.tensor([5], dtype=torch.int64)

    def f(x, bias, lora_A, lora_B):
        return fastlora.lora_linear(x, weight, bias, lora_A, lora_B, 0.7, 0.4, True, seed=seed, backend="torch")

    assert torch.autograd.gradcheck(f, (x, bias, lora_A, lora_B))


@pytest.mark.parametrize("need_dx", [True, False])
@pytest.mark.parametrize("r", [16, 100])
def test_backward_without_dx_and_above_the_fused_rank(r, need_dx, device):
    """The backward's dA runs inside the dx GEMM up to rank ``MAX_FUSED_RANK`` and on its own above it, or when ``x``
    needs no gradient; every combination gives the reference's gradients under dropout."""
    M, K, N = 130, 40, 300  # several row blocks, row chunks and dy column splits
    x, weight, bias, lora_A, lora_B = make_inputs(M, K, N, r, torch.bfloat16, torch.float32, False, "2d", device)
    x.requires_grad_(need_dx)
    seed = torch.tensor([31], dtype=torch.int64, device=device)
    y = fastlora.lora_linear(x, weight, bias, lora_A, lora_B, 0.5, 0.2, True, seed=seed)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    y.backward(dy.to(y.dtype).to(device))
    x64, a64, b64 = (t.detach().double().requires_grad_() for t in (x, lora_A, lora_B))
    y64 = lora_linear_reference(x64, weight.double(), bias.double(), a64, b64, 0.5, 0.2, seed)
    y64.backward(dy.to(y.dtype).double())
    assert (x.grad is not None) == need_dx
    if need_dx:
        assert_close(x.grad, x64.grad, torch.bfloat16, N + r, "dx")
    assert_close(lora_A.grad, a64.grad, torch.bfloat16, M, "dA")
    assert_close(lora_B.grad, b64.grad, torch.bfloat16, M, "dB")


def test_auto_forward_avoids_rereading_a_wide_a():
    """``auto`` takes the one-pass forward for few tokens only when ``A`` is narrow: a low rank in the activation
    dtype; fp32 adapters on a 16-bit model, or rank 64, take the shrink-then-GEMM path."""
    choose = fastlora.ops.choose_forward_impl
    assert choose(16, 16, "auto") == "onepass"
    assert choose(16, 16, "auto", lora_is_wide=True) == "split"
    assert choose(16, 64, "auto") == "split"
    assert choose(65, 8, "auto") == "split"
    assert choose(16, 64, "onepass", lora_is_wide=True) == "onepass"


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_batch(impl, device):
    """Zero tokens: an empty output and zero LoRA gradients, no kernel launched on an empty grid."""
    x, weight, bias, lora_A, lora_B = make_inputs(1, 24, 16, 4, torch.float32, torch.float32, False, "2d", device)
    x = x.detach()[:0].requires_grad_()
    y = fastlora.lora_linear(x, weight, bias, lora_A, lora_B, 1.0, 0.1, True, forward_impl=impl)
    assert y.shape == (0, 16)
    y.sum().backward()
    assert x.grad.shape == (0, 24)
    assert torch.count_nonzero(lora_A.grad) == 0 and torch.count_nonzero(lora_B.grad) == 0
