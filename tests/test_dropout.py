"""Dropout on the LoRA branch: Philox masks regenerated from a seed, the same on every backend.

The mask (``kernels/philox.py``): element ``(row, col)`` is kept iff word ``col % 4`` of Philox4x32-10 with key
``seed`` at counter ``(col // 4, row, 0, 0)`` is at least ``floor(p * 2**32)``.
"""

import pytest
import torch
import triton
import triton.language as tl
from tolerances import assert_close

import fastlora
from fastlora import kernels, reference

# Random123's known-answer vectors for Philox4x32-10 (kat_vectors): counter (c0, c1, c2, c3), key (k0, k1), and the
# four output words.
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


def test_reference_philox_known_answers():
    for counter, (k0, k1), words in PHILOX_KAT:
        got = reference.philox4x32_10(k0 | k1 << 32, *(torch.tensor(c, dtype=torch.int64) for c in counter))
        assert tuple(int(w) for w in got) == words


@triton.jit
def _philox_kat_kernel(counter_ptr, key_ptr, out_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    w0, w1, w2, w3 = kernels.philox.philox4x32_10(
        tl.load(key_ptr + offs * 2).to(tl.uint32),
        tl.load(key_ptr + offs * 2 + 1).to(tl.uint32),
        tl.load(counter_ptr + offs * 4).to(tl.uint32),
        tl.load(counter_ptr + offs * 4 + 1).to(tl.uint32),
        tl.load(counter_ptr + offs * 4 + 2).to(tl.uint32),
        tl.load(counter_ptr + offs * 4 + 3).to(tl.uint32),
    )
    tl.store(out_ptr + offs * 4, w0.to(tl.int64))
    tl.store(out_ptr + offs * 4 + 1, w1.to(tl.int64))
    tl.store(out_ptr + offs * 4 + 2, w2.to(tl.int64))
    tl.store(out_ptr + offs * 4 + 3, w3.to(tl.int64))


def test_kernel_philox_known_answers(device):
    """The kernels' Philox rounds, run as Triton code, give the published words."""
    n = 4  # the vectors, padded to a power of two with a repeat
    cases = (PHILOX_KAT * 2)[:n]
    counters = torch.tensor([c for c, _, _ in cases], dtype=torch.int64, device=device)
    keys = torch.tensor([k for _, k, _ in cases], dtype=torch.int64, device=device)
    out = torch.empty(n, 4, dtype=torch.int64, device=device)
    _philox_kat_kernel[(1,)](counters, keys, out, N=n)
    assert [tuple(row) for row in out.cpu().tolist()] == [w for _, _, w in cases]


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


def test_mask_is_the_documented_philox_words():
    """Each element of the reference mask, recomputed from its own Philox call: word ``col % 4`` at counter
    ``(col // 4, row, 0, 0)``, compared with the threshold (ragged K, a seed above 2**32)."""
    seed, p, (M, K) = 0x1234_5678_9ABC, 0.37, (5, 11)
    threshold = int(p * 2**32)
    mask = reference.dropout_mask(seed, (M, K), p)
    zero = torch.tensor(0)
    for row in range(M):
        for col in range(K):
            words = reference.philox4x32_10(seed, torch.tensor(col // 4), torch.tensor(row), zero, zero)
            assert bool(mask[row, col]) == (int(words[col % 4]) >= threshold), (row, col)


def _z(observed: float, expected: float, n: int, var: float) -> float:
    return abs(observed - expected) / (var / n) ** 0.5


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_mask_rows_columns_and_words_are_independent(p):
    """Philox keyed on (row, col // 4), four words per call: every word keeps 1 - p of its elements, and
    neighbouring columns (in one Philox call or across two), rows and shifted copies are uncorrelated."""
    M, K = 256, 1024
    keep = reference.dropout_mask(42, (M, K), p).double()
    q = 1 - p
    assert _z(keep.mean().item(), q, keep.numel(), p * q) < 5
    for j in range(4):  # the four words of each call
        word = keep[:, j::4]
        assert _z(word.mean().item(), q, word.numel(), p * q) < 5, f"word {j}"

    def correlation(a, b):
        a, b = a - a.mean(), b - b.mean()
        return ((a * b).mean() / (a.std() * b.std())).item()

    groups = keep.reshape(M, K // 4, 4)
    for name, a, b in [
        ("columns 4g + j, 4g + j + 1 (one call)", groups[..., :3], groups[..., 1:]),
        ("columns 4g + 3, 4g + 4 (next call)", keep[:, 3:-1:4], keep[:, 4::4]),
        ("columns c, c + 4 (same word, next call)", keep[:, :-4], keep[:, 4:]),
        ("rows", keep[:-1], keep[1:]),
        ("diagonal shift", keep[:-1, :-1], keep[1:, 1:]),
    ]:
        # Without correlation the sample correlation has standard deviation 1 / sqrt(pairs).
        assert abs(correlation(a, b)) < 5 / a.numel() ** 0.5, name


@pytest.mark.parametrize("impl", ["onepass", "split"])
@pytest.mark.parametrize(
    "M, K, seed", [(1, 5, 3), (1, 64, 2**40 + 1), (7, 19, -(2**40) - 12345), (20, 70, 2**62 + 7), (33, 36, 12345)]
)
def test_every_kernel_draws_the_reference_mask(impl, M, K, seed, device):
    """With W0 = 0 and A = B = I (r = N = K) the layer exposes each kernel's mask, ragged tiles included
    (M = 1, K not a multiple of 4 or 16), for seeds whose high word is zero, set or negative: the forward's in
    y = D(x), the backward's in dx = D'(dy), and with dy = [I 0] the weight gradient's in dA[:M] = D(x)."""
    p = 0.4
    seed = torch.tensor([seed], dtype=torch.int64, device=device)
    expected = reference.dropout_mask(seed.cpu(), (M, K), p)
    g = torch.Generator().manual_seed(M * 1000 + K)
    x = (torch.rand(M, K, generator=g) + 1.0).to(device).requires_grad_()  # no zeros: a zero is a dropped element
    eye = torch.eye(K, device=device)
    lora_A = eye.clone().requires_grad_()
    y = fastlora.lora_linear(x, torch.zeros(K, K, device=device), None, lora_A, eye, 1.0, p, True,
                             forward_impl=impl, seed=seed)  # fmt: skip
    assert torch.equal((y != 0).cpu(), expected), "forward"
    dy = (torch.rand(M, K, generator=g) + 1.0).to(device)
    (dx,) = torch.autograd.grad(y, x, dy, retain_graph=True)
    assert torch.equal((dx != 0).cpu(), expected), "backward dx"
    if M <= K:
        dy = torch.eye(M, K, device=device)
        (dA,) = torch.autograd.grad(y, lora_A, dy)
        assert torch.equal((dA[:M] != 0).cpu(), expected), "backward dA"
        assert not dA[M:].any()


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
