"""fastlora.ops.torch_linear (the torch backend's forward and backward) against the formula in fp64 under the same
mask, and the mask itself: a pure function of the seed that keeps each element with probability 1 - p."""

import itertools

import pytest
import torch
from tolerances import assert_close

from fastlora.ops import torch_linear

# (M, K, N, r): a single token with odd K and N and a rank of 1 (a mask small enough for the bernoulli path), then masks
# of the int16-lanes path with K a multiple of the four lanes per word and not.
SHAPES = [(1, 33, 17, 1), (37, 64, 45, 8), (70, 33, 96, 16)]
DTYPE_PAIRS = [
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float32),
    (torch.float16, torch.float16),
]
BIASES = ["none", "x", "fp32"]
LAYOUTS = ["nk", "kn"]


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def make_inputs(M, K, N, r, dtype, lora_dtype, layout, bias_kind, device, seed=0):
    """Inputs scaled so outputs are O(1). ``wt`` is the ``[K, N]`` view of ``W0`` stored ``[N, K]`` (``"nk"``, as
    ``nn.Linear``) or a ``[K, N]`` tensor (``"kn"``, as GPT-2's ``Conv1D``)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, dt, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dt).to(device)

    x = rand(M, K, dt=dtype)
    wt = rand(N, K, dt=dtype, scale=K**-0.5).t() if layout == "nk" else rand(K, N, dt=dtype, scale=K**-0.5)
    bias = None if bias_kind == "none" else rand(N, dt=dtype if bias_kind == "x" else torch.float32)
    lora_A = rand(r, K, dt=lora_dtype, scale=K**-0.5)
    lora_B = rand(N, r, dt=lora_dtype, scale=r**-0.5)
    dy = rand(M, N, dt=dtype)
    return x, wt, bias, lora_A, lora_B, dy


def formula64(x, wt, bias, lora_A, lora_B, dy, scaling, p, keep):
    """The layer and its gradients written out in fp64 (DESIGN.md), with the given bool mask (or None)."""
    x, wt, A, B, dy = (t.double() for t in (x, wt, lora_A, lora_B, dy))
    xd = x if keep is None else x * keep / (1.0 - p)
    xa = xd @ A.t()
    y = x @ wt + scaling * xa @ B.t()
    if bias is not None:
        y = y + bias.double()
    dxa = scaling * dy @ B
    low = dxa @ A
    low = low if keep is None else low * keep / (1.0 - p)
    dx = dy @ wt.t() + low
    return {"y": y, "xs": scaling * xa, "dx": dx, "dA": dxa.t() @ xd, "dB": dy.t() @ (scaling * xa)}


def _cases():
    for shape, (dtype, lora_dtype), layout, bias_kind, p in itertools.product(
        SHAPES, DTYPE_PAIRS, LAYOUTS, BIASES, (0.0, 0.3)
    ):
        if bias_kind == "fp32" and dtype == torch.float32:
            continue  # the same as "x"
        name = f"{shape}-{_name(dtype)}-lora_{_name(lora_dtype)}-{layout}-bias_{bias_kind}-p{p}"
        yield pytest.param(*shape, dtype, lora_dtype, layout, bias_kind, p, id=name)


@pytest.mark.parametrize("M, K, N, r, dtype, lora_dtype, layout, bias_kind, p", list(_cases()))
def test_matches_formula(M, K, N, r, dtype, lora_dtype, layout, bias_kind, p, device):
    x, wt, bias, lora_A, lora_B, dy = make_inputs(M, K, N, r, dtype, lora_dtype, layout, bias_kind, device)
    scaling = 2.0 / r
    seed = 20261123 + M
    before = [t.clone() for t in (x, wt, lora_A, lora_B, dy)]

    y, xs = torch_linear.forward(x, wt, bias, lora_A, lora_B, scaling, p, seed if p else None, need_xs=True)
    dx, dA, dB = torch_linear.backward(dy, x, wt, lora_A, lora_B, xs, scaling, p, seed if p else None, need_dx=True)

    keep = torch_linear.keep_mask(seed, (M, K), p, device) if p else None
    want = formula64(x, wt, bias, lora_A, lora_B, dy, scaling, p, keep)
    # dA / dB with fp32 LoRA weights reduce 16-bit activations and gradients: the activations' tolerance throughout.
    assert_close(y, want["y"], dtype, K + r, "y")
    assert_close(xs, want["xs"], lora_dtype, K, "xs")
    assert_close(dx, want["dx"], dtype, N + r, "dx")
    assert_close(dA, want["dA"], dtype, N + M, "dA")
    assert_close(dB, want["dB"], dtype, K + M, "dB")

    assert y.dtype == dtype and y.shape == (M, N) and y.is_contiguous()
    assert xs.dtype == lora_dtype and xs.shape == (M, r)
    assert dx.dtype == dtype and dx.shape == (M, K) and dx.is_contiguous()
    assert dA.dtype == lora_dtype and dA.shape == (r, K) and dA.is_contiguous()
    assert dB.dtype == lora_dtype and dB.shape == (N, r) and dB.is_contiguous()
    for t, t0 in zip((x, wt, lora_A, lora_B, dy), before):
        assert torch.equal(t, t0), "an input was modified"


def test_optional_outputs_and_strided_inputs(device):
    """``need_xs`` / ``need_dx`` False give None and leave the rest unchanged; ``x`` and ``wt`` with strides that are
    neither layout (every other column of wider buffers) give the same results as contiguous copies."""
    M, K, N, r, p, seed, scaling = 9, 40, 24, 4, 0.3, 7, 0.5
    g = torch.Generator().manual_seed(3)
    x = torch.randn(M, 2 * K, generator=g).to(device)[:, ::2]
    wt = torch.randn(K, 2 * N, generator=g).to(device)[:, ::2] * K**-0.5
    bias = torch.randn(N, generator=g).to(device)
    lora_A = torch.randn(r, K, generator=g).to(device) * K**-0.5
    lora_B = torch.randn(N, r, generator=g).to(device)
    dy = torch.randn(M, 2 * N, generator=g).to(device)[:, ::2]

    y, xs = torch_linear.forward(x, wt, bias, lora_A, lora_B, scaling, p, seed, need_xs=True)
    y_only, none = torch_linear.forward(x, wt, bias, lora_A, lora_B, scaling, p, seed, need_xs=False)
    assert none is None and torch.equal(y_only, y)
    dense = [t.contiguous() for t in (x, wt, dy)]
    y_dense, xs_dense = torch_linear.forward(dense[0], dense[1], bias, lora_A, lora_B, scaling, p, seed, True)
    torch.testing.assert_close(y, y_dense, rtol=1e-6, atol=1e-6)

    dx, dA, dB = torch_linear.backward(dy, x, wt, lora_A, lora_B, xs, scaling, p, seed, need_dx=True)
    no_dx, dA2, dB2 = torch_linear.backward(dy, x, wt, lora_A, lora_B, xs, scaling, p, seed, need_dx=False)
    assert no_dx is None and torch.equal(dA2, dA) and torch.equal(dB2, dB)
    dx_d, dA_d, dB_d = torch_linear.backward(dense[2], dense[0], dense[1], lora_A, lora_B, xs_dense, scaling, p, seed,
                                             need_dx=True)  # fmt: skip
    for got, want in ((dx, dx_d), (dA, dA_d), (dB, dB_d)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # Column-major x (the mask must not follow x's memory layout).
    x_cm = dense[0].t().contiguous().t()
    y_cm, _ = torch_linear.forward(x_cm, wt, bias, lora_A, lora_B, scaling, p, seed, need_xs=False)
    torch.testing.assert_close(y_cm, y_dense, rtol=1e-6, atol=1e-6)
    dx_cm, dA_cm, _ = torch_linear.backward(dy, x_cm, wt, lora_A, lora_B, xs, scaling, p, seed, need_dx=True)
    torch.testing.assert_close(dx_cm, dx_d, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dA_cm, dA_d, rtol=1e-6, atol=1e-6)


def test_dropout_needs_a_seed(device):
    x, wt, bias, lora_A, lora_B, dy = make_inputs(3, 8, 5, 2, torch.float32, torch.float32, "nk", "x", device)
    with pytest.raises(ValueError, match="seed"):
        torch_linear.forward(x, wt, bias, lora_A, lora_B, 1.0, 0.1, None, need_xs=True)


# ----------------------------------------------------------------------------------------------- the mask


def _check_rate(groups: dict, p: float):
    """The kept fraction of n elements is Binomial(n, 1-p)/n, of standard deviation sd = sqrt(p(1-p)/n): allow six
    of them (a false alarm once in 5·10⁸ seeds, and the seeds are fixed) plus the 2**-17 of the threshold's rounding."""
    for what, part in groups.items():
        n = part.numel()
        bound = 6 * (p * (1 - p) / n) ** 0.5 + 2**-17
        frac = part.float().mean().item()
        assert abs(frac - (1 - p)) <= bound, f"{what}: kept {frac:.6f}, expected {1 - p:.6f} ± {bound:.6f}"


@pytest.mark.parametrize("p", [0.01, 0.1, 0.3, 0.5, 0.9])
def test_keep_rate(p, device):
    """One large mask (n = 2**21, sd at most 3.5e-4). The bound also holds per column residue mod 4 (the four int16
    lanes of the 64-bit words the mask is cut from: a biased lane shows there) and per half of the rows."""
    M, K = 2048, 1024
    keep = torch_linear.keep_mask(12345, (M, K), p, device)
    assert keep.dtype == torch.bool and keep.shape == (M, K)
    groups = {"all": keep, "top rows": keep[: M // 2], "bottom rows": keep[M // 2 :]}
    groups.update({f"cols = {j} mod 4": keep[:, j::4] for j in range(4)})
    _check_rate(groups, p)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_keep_rate_small_masks(p, device):
    """Masks of a few tokens (the bernoulli path): 2048 seeds of a [4, 256] mask, again n = 2**21 in all, and per
    column. Consecutive seeds give unrelated masks: two of them agree on a fraction p² + (1-p)² of the elements."""
    masks = torch.stack([torch_linear.keep_mask(seed, (4, 256), p, device) for seed in range(2048)])
    _check_rate({"all": masks, "first column": masks[..., 0], "last column": masks[..., -1]}, p)
    agree = (masks[1:] == masks[:-1]).float().mean().item()
    n = masks[1:].numel()
    want = p * p + (1 - p) ** 2
    assert abs(agree - want) <= 6 * (want * (1 - want) / n) ** 0.5, f"neighbouring seeds agree on {agree:.4f}"


def test_threshold_is_within_2_to_the_minus_17():
    """Lanes are uniform over the 2**16 int16 values; those ``>= threshold`` are kept."""
    for p in [i / 997 for i in range(997)] + [1e-9, 2**-17, 0.5 + 2**-18, 1 - 2**-16]:
        t = torch_linear._threshold(p)
        assert -(2**15) <= t < 2**15
        kept = (2**15 - t) / 2**16
        assert abs(kept - (1 - p)) <= 2**-17, p


@pytest.mark.parametrize("shape", [(3, 77), (33, 77)], ids=["bernoulli-path", "lanes-path"])
def test_mask_is_a_function_of_the_seed(shape, device):
    p = 0.4
    a = torch_linear.keep_mask(99, shape, p, device)
    assert a.dtype == torch.bool and a.shape == shape
    assert torch.equal(torch_linear.keep_mask(99, shape, p, device), a)
    assert torch.equal(torch_linear.keep_mask(99, shape, p, torch.device(device)), a)
    assert not torch.equal(torch_linear.keep_mask(100, shape, p, device), a)
    assert not torch.equal(torch_linear.keep_mask(99 + 2**32, shape, p, device), a), "high seed bits ignored"
    # Draws from the global generator in between change nothing.
    torch.rand(1000)
    assert torch.equal(torch_linear.keep_mask(99, shape, p, device), a)


@pytest.mark.parametrize("M", [23, 150], ids=["bernoulli-path", "lanes-path"])
def test_forward_and_backward_apply_keep_mask(M, device):
    """Read the mask off the layer (W0 = 0, A = B = I, s = 1 give y = D(x), and dx = D'(dy)): both are keep_mask."""
    K, p, seed = 16, 0.3, 4242
    x = torch.rand(M, K, device=device) + 1.0  # no zeros: a zero output is a dropped element
    eye = torch.eye(K, device=device)
    zero = torch.zeros(K, K, device=device)
    y, xs = torch_linear.forward(x, zero, None, eye, eye, 1.0, p, seed, need_xs=True)
    keep = torch_linear.keep_mask(seed, (M, K), p, device)
    assert torch.equal(y != 0, keep)
    torch.testing.assert_close(y[keep], x[keep] / (1 - p))
    dx, _, _ = torch_linear.backward(x, x, zero, eye, eye, xs, 1.0, p, seed, need_dx=True)
    assert torch.equal(dx != 0, keep)


def test_draw_seed_reproducible_and_fresh():
    torch.manual_seed(5)
    first = [torch_linear.draw_seed() for _ in range(4)]
    torch.manual_seed(5)
    again = [torch_linear.draw_seed() for _ in range(4)]
    assert first == again
    assert all(isinstance(s, int) and 0 <= s < 2**62 for s in first)
    assert len(set(first)) == len(first)
    torch.manual_seed(6)
    assert torch_linear.draw_seed() != first[0]


# ----------------------------------------------------------------------------------------------- autograd


class _LoraFunction(torch.autograd.Function):
    """The layer as autograd sees it: ``forward`` saves ``x``, the weights, ``xs`` and the int seed."""

    @staticmethod
    def forward(ctx, x, wt, bias, lora_A, lora_B, scaling, p, seed):
        y, xs = torch_linear.forward(x, wt, bias, lora_A, lora_B, scaling, p, seed, need_xs=True)
        ctx.save_for_backward(x, wt, lora_A, lora_B, xs)
        ctx.scaling, ctx.p, ctx.seed = scaling, p, seed
        return y

    @staticmethod
    def backward(ctx, dy):
        x, wt, lora_A, lora_B, xs = ctx.saved_tensors
        dx, dA, dB = torch_linear.backward(
            dy, x, wt, lora_A, lora_B, xs, ctx.scaling, ctx.p, ctx.seed, need_dx=ctx.needs_input_grad[0]
        )
        db = dy.sum(0) if ctx.needs_input_grad[2] else None
        return dx, None, db, dA, dB, None, None, None


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("M, K, N, r", [(6, 11, 7, 3), (70, 33, 3, 2)], ids=["bernoulli-path", "lanes-path"])
def test_gradcheck(M, K, N, r, p, layout, device):
    """fp64 gradients of x, bias, lora_A and lora_B against finite differences, with dropout on each mask path (the
    large shape in gradcheck's fast mode: random projections of the Jacobian instead of all its columns)."""
    x, wt, bias, lora_A, lora_B, _ = make_inputs(M, K, N, r, torch.float64, torch.float64, layout, "x", device)
    leaves = [t.requires_grad_() for t in (x, bias, lora_A, lora_B)]
    seed = 77 if p else None

    def fn(x, bias, lora_A, lora_B):
        return _LoraFunction.apply(x, wt, bias, lora_A, lora_B, 0.75, p, seed)

    assert torch.autograd.gradcheck(fn, leaves, fast_mode=M * K > 1000)
