"""Dropout on the LoRA branch: Philox masks regenerated from a seed, the same on every backend."""

import pytest
import torch
from tolerances import assert_close

import fastlora
from fastlora import reference


def _layer_inputs(M, K, N, r, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(device)
    weight = (torch.randn(N, K, generator=g) / K**0.5).to(device)
    lora_A = (torch.randn(r, K, generator=g) / K**0.5).to(device)
    lora_B = torch.randn(N, r, generator=g).to(device)
    return x, weight, lora_A, lora_B


def test_reproducible_under_manual_seed(device):
    x, weight, lora_A, lora_B = _layer_inputs(16, 48, 24, 8, device)
    outs = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        outs.append(fastlora.lora_linear(x, weight, None, lora_A, lora_B, 1.0, 0.5, training=True))
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])
    # Two calls in one run draw different seeds: no two layers or steps share a mask.
    torch.manual_seed(1)
    a = fastlora.lora_linear(x, weight, None, lora_A, lora_B, 1.0, 0.5, training=True)
    b = fastlora.lora_linear(x, weight, None, lora_A, lora_B, 1.0, 0.5, training=True)
    assert not torch.equal(a, b)


def test_eval_mode_has_no_dropout(device):
    x, weight, lora_A, lora_B = _layer_inputs(8, 32, 16, 4, device)
    y_eval = fastlora.lora_linear(x, weight, None, lora_A, lora_B, 1.0, 0.9, training=False)
    y_none = fastlora.lora_linear(x, weight, None, lora_A, lora_B, 1.0, 0.0, training=True)
    assert torch.equal(y_eval, y_none)


@pytest.mark.parametrize("impl", ["onepass", "split"])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_mask_keeps_about_one_minus_p(impl, p, device):
    """With W0 = 0, A = B = I and s = 1 the layer returns D(x) itself: read the kernel's mask off it."""
    M, K = 96, 64
    x = torch.rand(M, K, device=device) + 1.0  # no zeros, so a zero output is a dropped element
    eye = torch.eye(K, device=device)
    seed = torch.tensor([12345], dtype=torch.int64, device=device)
    y = fastlora.lora_linear(x, torch.zeros(K, K, device=device), None, eye, eye, 1.0, p, True,
                             forward_impl=impl, seed=seed)  # fmt: skip
    kept = y != 0
    n = kept.numel()
    frac = kept.float().mean().item()
    sd = (p * (1 - p) / n) ** 0.5
    assert abs(frac - (1 - p)) < 5 * sd, f"kept {frac:.4f}, expected {1 - p:.4f} ± {5 * sd:.4f}"
    torch.testing.assert_close(y[kept], x[kept] / (1 - p), rtol=1e-6, atol=0)
    # The very mask the reference regenerates from the seed.
    assert torch.equal(kept.cpu(), reference.dropout_mask(seed, (M, K), p))


def test_mask_rows_and_columns_are_independent():
    """Philox keyed on (row, col): neighbouring rows and columns are not copies or shifts of each other."""
    mask = reference.dropout_mask(42, (64, 64), 0.5)
    assert not torch.equal(mask[0], mask[1]) and not torch.equal(mask[:, 0], mask[:, 1])
    assert not torch.equal(mask[1:, :-1], mask[:-1, 1:])
    assert abs(mask.float().mean().item() - 0.5) < 0.05


@pytest.mark.parametrize("impl", ["onepass", "split"])
def test_gradients_use_the_forward_mask(impl, device):
    """For a fixed seed the layer is affine in x, in A and in B, so a finite difference along any direction
    equals the directional derivative exactly (up to rounding): the backward used the forward's mask."""
    M, K, N, r, s, p = 24, 40, 32, 8, 0.75, 0.3
    x, weight, lora_A, lora_B = _layer_inputs(M, K, N, r, device)
    seed = torch.tensor([777], dtype=torch.int64, device=device)
    dy = torch.randn(M, N, generator=torch.Generator().manual_seed(5)).to(device)

    def f(x, lora_A, lora_B):
        return fastlora.lora_linear(x, weight, None, lora_A, lora_B, s, p, True, forward_impl=impl, seed=seed)

    leaves = [t.clone().requires_grad_() for t in (x, lora_A, lora_B)]
    f(*leaves).backward(dy)
    g = torch.Generator().manual_seed(9)
    for i, leaf in enumerate(leaves):
        v = torch.randn(leaf.shape, generator=g).to(device)
        args_plus = [t.detach() + (v if j == i else 0) for j, t in enumerate(leaves)]
        args_minus = [t.detach() - (v if j == i else 0) for j, t in enumerate(leaves)]
        with torch.no_grad():
            fd = ((f(*args_plus) - f(*args_minus)) * dy).sum().item() / 2
        analytic = (leaf.grad * v).sum().item()
        assert abs(fd - analytic) <= 1e-4 * (abs(analytic) + 1.0), f"input {i}: {fd} vs {analytic}"
    # A wrong mask in the backward would be caught: the gradient of x without dropout differs.
    x0 = x.clone().requires_grad_()
    fastlora.lora_linear(x0, weight, None, lora_A, lora_B, s, 0.0, True, forward_impl=impl).backward(dy)
    assert not torch.allclose(x0.grad, leaves[0].grad, atol=1e-3)


def test_mean_over_seeds_is_the_undropped_output(device):
    """Inverted dropout is unbiased: averaged over many seeds the output tends to the p = 0 output."""
    M, K, N, r, p, n_seeds = 4, 32, 16, 4, 0.2, 400
    x, weight, lora_A, lora_B = _layer_inputs(M, K, N, r, device)
    lora_B = lora_B * 4  # make the LoRA branch dominate, so the check is about it
    y0 = fastlora.lora_linear(x, weight, None, lora_A, lora_B, 1.0)
    ys = torch.stack([
        fastlora.lora_linear(x, weight, None, lora_A, lora_B, 1.0, p, True,
                             seed=torch.tensor([s], dtype=torch.int64, device=device))
        for s in range(n_seeds)
    ])  # fmt: skip
    mean, sd = ys.mean(0), ys.std(0)
    # Each element's sample mean lies within a few standard errors of the expectation.
    z = (mean - y0).abs() / (sd / n_seeds**0.5 + 1e-6)
    assert z.max().item() < 5.0, f"max z-score {z.max().item():.2f}"
    assert (sd > 0).all()  # the dropout did act
    assert_close(mean, y0.double(), torch.bfloat16, name="mean over seeds")
