"""fastlora.grouped_lora_linear (the grouped Triton kernels; the interpreter on CPU) against the fp64 reference:
forward and every gradient, over routings with empty experts, one token, a token routed twice to one expert, odd
sizes, both weight layouts, bias, dropout and every dtype; determinism, the tile list, launches and errors."""

import pytest
import torch
from tolerances import assert_close

from fastlora import kernels
from fastlora.ops import grouped_lora_linear, route
from fastlora.reference import grouped_lora_linear_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def routing_for(case: str, T: int, E: int, top_k: int, g: torch.Generator) -> torch.Tensor:
    """``top_k_index [T, top_k]`` for a named routing pattern."""
    if case == "random":
        return torch.stack([torch.randperm(E, generator=g)[:top_k] for _ in range(T)])
    if case == "empty-experts":  # only experts 1 and E-2 get rows
        return torch.tensor([[1, E - 2][(t + k) % 2] for t in range(T) for k in range(top_k)]).view(T, top_k)
    if case == "duplicate":  # every token picks expert 0 twice
        return torch.zeros((T, top_k), dtype=torch.int64)
    if case == "skewed":  # most rows on one expert, a few elsewhere
        idx = torch.full((T, top_k), E - 1, dtype=torch.int64)
        idx[:2, 0] = 0
        return idx
    raise ValueError(case)


def make_inputs(T, K, N, E, r, top_k, case, dtype, lora_dtype, transposed, has_bias, device, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, dt, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dt).to(device)

    top_k_index = routing_for(case, T, E, top_k, g).to(device)
    routing = route(top_k_index, E)
    x = rand(T, K, dt=dtype)[routing.rows]  # [S, K]: the routed rows, sorted by expert
    weight = rand(*((E, K, N) if transposed else (E, N, K)), dt=dtype, scale=K**-0.5)
    bias = rand(E, N, dt=dtype) if has_bias else None
    lora_A = rand(E, r, K, dt=lora_dtype, scale=K**-0.5).requires_grad_()
    lora_B = rand(E, N, r, dt=lora_dtype, scale=r**-0.5).requires_grad_()
    return x.requires_grad_(), weight, bias, lora_A, lora_B, routing


CASES = [
    # T, K, N, E, r, top_k, routing
    (1, 16, 33, 4, 1, 1, "random"),
    (9, 33, 20, 6, 3, 2, "empty-experts"),
    (5, 40, 24, 3, 16, 2, "duplicate"),
    (23, 24, 65, 8, 8, 2, "random"),
    (40, 48, 16, 5, 4, 2, "skewed"),
    (17, 20, 36, 16, 70, 4, "random"),
]


def _cases():
    for i, case in enumerate(CASES):
        # The rank above the rank tile (70) runs its extra rank tiles and loop steps in fp32 only: the loops do not
        # depend on the dtype, and each interpreted case costs seconds.
        for j, dtype in enumerate(DTYPES if case[4] <= 64 else DTYPES[:1]):
            lora_dtype = torch.float32 if dtype == torch.float32 or (i + j) % 2 else dtype
            transposed = (i + j) % 2 == 1
            p = [0.0, 0.1][(i + 2 * j) % 2]
            has_bias = (i + j) % 3 != 0
            name = f"{case[-1]}-T{case[0]}-K{case[1]}-N{case[2]}-E{case[3]}-r{case[4]}-k{case[5]}-{str(dtype)[6:]}-" \
                   f"{str(lora_dtype)[6:]}-{'t' if transposed else 'n'}-p{p}-{'b' if has_bias else 'nb'}"  # fmt: skip
            yield pytest.param(*case, dtype, lora_dtype, transposed, p, has_bias, id=name)


@pytest.mark.parametrize("T, K, N, E, r, top_k, case, dtype, lora_dtype, transposed, dropout_p, has_bias", _cases())
def test_matches_reference(T, K, N, E, r, top_k, case, dtype, lora_dtype, transposed, dropout_p, has_bias, device):
    x, weight, bias, lora_A, lora_B, routing = make_inputs(
        T, K, N, E, r, top_k, case, dtype, lora_dtype, transposed, has_bias, device
    )
    scaling = 2.0 / r
    seed = torch.tensor([77 + T], dtype=torch.int64, device=device)
    before = [t.detach().clone() for t in (x, weight, lora_A, lora_B)]
    y = grouped_lora_linear(x, weight, bias, lora_A, lora_B, routing, scaling, dropout_p, True, transposed, seed)
    assert y.dtype == dtype and y.shape == (T * top_k, N)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype).to(device)
    y.backward(dy)

    x64, a64, b64 = (t.detach().double().requires_grad_() for t in (x, lora_A, lora_B))
    bias64 = None if bias is None else bias.double()
    y64 = grouped_lora_linear_reference(
        x64, weight.double(), bias64, a64, b64, routing.offsets, scaling, dropout_p, seed, transposed
    )
    y64.backward(dy.double())
    rows = max(T * top_k, 1)
    assert_close(y, y64, dtype, K + r, "y")
    assert_close(x.grad, x64.grad, dtype, N + r, "dx")
    grad_dtype = lora_dtype if lora_dtype == dtype else dtype
    assert_close(lora_A.grad, a64.grad, grad_dtype, rows, "dA")
    assert_close(lora_B.grad, b64.grad, grad_dtype, rows, "dB")
    assert lora_A.grad.dtype == lora_dtype and lora_B.grad.dtype == lora_dtype
    for t, t0 in zip((x, weight, lora_A, lora_B), before):
        assert torch.equal(t.detach(), t0), "an input was modified"
    # Experts without rows get exactly zero gradients.
    counts = (routing.offsets[1:] - routing.offsets[:-1]).cpu()
    for e in torch.nonzero(counts == 0).reshape(-1).tolist():
        assert not lora_A.grad[e].any() and not lora_B.grad[e].any()


def test_peft_layout_views(device):
    """PEFT's ``lora_A [r·E, K]`` and interleaved ``lora_B [N, r·E]`` (expert e in columns k·E + e), passed as strided
    views without a copy, give the same result and the gradients land in PEFT's layout."""
    T, K, N, E, r = 11, 24, 20, 4, 4
    x, weight, _, A, B, routing = make_inputs(T, K, N, E, r, 2, "random", torch.float32, torch.float32, False, False,
                                              device)  # fmt: skip
    a_peft = A.detach().reshape(E * r, K).clone().requires_grad_()
    b_peft = B.detach().permute(1, 2, 0).reshape(N, r * E).clone().requires_grad_()
    y = grouped_lora_linear(x, weight, None, A, B, routing, 0.5)
    y_peft = grouped_lora_linear(
        x, weight, None, a_peft.view(E, r, K), b_peft.view(N, r, E).permute(2, 0, 1), routing, 0.5
    )
    assert torch.equal(y, y_peft)
    y.sum().backward()
    y_peft.sum().backward()
    assert torch.equal(a_peft.grad.view(E, r, K), A.grad)
    assert torch.equal(b_peft.grad.view(N, r, E).permute(2, 0, 1), B.grad)


def test_deterministic(device):
    """Two runs with the same seed give bitwise-equal outputs and gradients (no atomics, fixed-order sums)."""
    results = []
    for _ in range(2):
        x, weight, bias, A, B, routing = make_inputs(30, 40, 36, 4, 8, 2, "random", torch.bfloat16, torch.float32,
                                                     False, True, device)  # fmt: skip
        seed = torch.tensor([5], dtype=torch.int64, device=device)
        y = grouped_lora_linear(x, weight, bias, A, B, routing, 1.5, 0.2, True, False, seed)
        y.backward(torch.ones_like(y))
        results.append([y.detach(), x.grad, A.grad, B.grad])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_dropout_mask_regenerated(device):
    """With dropout the forward's mask is the dense layer's over the sorted rows, and a different seed drops
    different elements; what is saved for the backward is x, the weights, xa and the seed, never a mask."""
    x, weight, _, A, B, routing = make_inputs(16, 32, 16, 2, 4, 1, "random", torch.float32, torch.float32, False,
                                              False, device)  # fmt: skip
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y1 = grouped_lora_linear(x, weight, None, A, B, routing, 1.0, 0.5, True, seed=1)
    y2 = grouped_lora_linear(x, weight, None, A, B, routing, 1.0, 0.5, True, seed=2)
    assert not torch.equal(y1, y2)
    big = {t.data_ptr() for t in saved if t.numel() >= x.numel()}
    assert big <= {x.data_ptr(), weight.data_ptr()}, [tuple(t.shape) for t in saved]


def test_tile_list_covers_every_row_once():
    """Every row of every expert falls in exactly one tile of its own expert; tiles past the real count carry -1."""
    g = torch.Generator().manual_seed(3)
    for E, S, block_m in [(8, 100, 16), (64, 7, 32), (3, 0, 16), (5, 64, 64)]:
        counts = torch.multinomial(torch.ones(E), S, replacement=True, generator=g).bincount(minlength=E) if S else \
            torch.zeros(E, dtype=torch.int64)  # fmt: skip
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]).to(torch.int32)
        expert, start = kernels.tile_list(offsets, S, block_m)
        owner = torch.full((S,), -1)
        for e, s in zip(expert.tolist(), start.tolist()):
            if e < 0:
                continue
            hi = min(s + block_m, int(offsets[e + 1]))
            assert int(offsets[e]) <= s < hi
            assert (owner[s:hi] == -1).all()
            owner[s:hi] = e
        assert (owner == torch.repeat_interleave(torch.arange(E), counts)).all()


def test_launch_count(device):
    """Three launches forward (shrink, expand, and the base GEMM outside the kernels), five backward."""
    x, weight, bias, A, B, routing = make_inputs(12, 16, 16, 4, 4, 2, "random", torch.float32, torch.float32, False,
                                                 True, device)  # fmt: skip
    routing.tiles(False)
    with kernels.recording_launches() as fwd:
        y = grouped_lora_linear(x, weight, bias, A, B, routing, 1.0)
    with kernels.recording_launches() as bwd:
        y.sum().backward()
    assert [launch.kernel for launch in fwd] == ["grouped_shrink", "grouped_expand"]
    assert sorted(launch.kernel for launch in bwd) == ["grouped_expand", "grouped_shrink", "grouped_wgrad",
                                                       "grouped_wgrad"]  # fmt: skip


def test_errors(device):
    x, weight, bias, A, B, routing = make_inputs(6, 16, 12, 4, 4, 2, "random", torch.float32, torch.float32, False,
                                                 True, device)  # fmt: skip
    with pytest.raises(ValueError, match="x has 11 rows"):
        grouped_lora_linear(x[:11], weight, bias, A, B, routing, 1.0)
    with pytest.raises(ValueError, match=r"weight must be \[E, N, K\] with E=4"):
        grouped_lora_linear(x, weight[:3], bias, A, B, routing, 1.0)
    with pytest.raises(ValueError, match="has K=16"):
        grouped_lora_linear(x, weight, bias, A, B, routing, 1.0, transposed=True)
    with pytest.raises(ValueError, match=r"lora_B must be \[E, N, r\]"):
        grouped_lora_linear(x, weight, bias, A, B[:, :, :2], routing, 1.0)
    with pytest.raises(ValueError, match="weight requires grad"):
        grouped_lora_linear(x, weight.clone().requires_grad_(), bias, A, B, routing, 1.0)
    with pytest.raises(TypeError, match="routing must be"):
        grouped_lora_linear(x, weight, bias, A, B, routing.offsets, 1.0)
    with pytest.raises(ValueError, match="scaling must be finite"):
        grouped_lora_linear(x, weight, bias, A, B, routing, float("nan"))
    with pytest.raises(TypeError, match="integer expert ids"):
        route(torch.zeros(3, 2), 4)
