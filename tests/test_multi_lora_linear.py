"""fastlora.multi_lora_linear (Triton kernels; the interpreter on CPU) against the fp64 reference: mixed ranks and
adapters in one batch, unsorted slots, tokens without an adapter, per-token scales, per-layer rank/scaling overrides,
both kernel paths (fused decode, segmented), odd shapes, both weight layouts, and garbage beyond each slot's rank."""

import torch
from tolerances import assert_close

from fastlora import ops
from fastlora.reference import multi_lora_linear_reference
from fastlora.serving import BatchMeta


def make_case(T, K, N, ranks, token_slots, dtype, lora_dtype=None, *, r_max=None, token_scales=False,
              fan_in_fan_out=False, bias=True, pad=float("nan"), device="cpu", seed=0):  # fmt: skip
    """Inputs with outputs O(1). ``ranks[s]`` is slot ``s``'s rank (0 = empty); pool entries beyond a slot's rank hold
    ``pad`` (NaN by default), which no output may see."""
    lora_dtype = lora_dtype or dtype
    g = torch.Generator().manual_seed(seed)
    r_max = r_max or max(max(ranks), 1)

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    x = rand(T, K).to(dtype).to(device)
    weight = rand(*((K, N) if fan_in_fan_out else (N, K)), scale=K**-0.5).to(dtype).to(device)
    b = rand(N).to(dtype).to(device) if bias else None
    a_pool = torch.full((len(ranks), r_max, K), pad, dtype=torch.float64)
    b_pool = torch.full((len(ranks), N, r_max), pad, dtype=torch.float64)
    for s, r in enumerate(ranks):
        a_pool[s, :r] = rand(r, K, scale=K**-0.5)
        b_pool[s, :, :r] = rand(N, r, scale=r**-0.5 if r else 1.0)
    scalings = [0.5 + 0.25 * s for s in range(len(ranks))]
    scales = (0.5 + torch.rand(T, generator=g)).tolist() if token_scales else None
    meta = BatchMeta.build(token_slots, ranks, scalings, scales, device=device)
    return x, weight, b, a_pool.to(lora_dtype).to(device), b_pool.to(lora_dtype).to(device), meta


def expected(x, weight, bias, a_pool, b_pool, meta, slot_ranks=None, slot_scalings=None, fan_in_fan_out=False):
    """The reference in fp64."""
    ranks = meta.slot_ranks if slot_ranks is None else slot_ranks
    scalings = meta.slot_scalings if slot_scalings is None else slot_scalings
    scales = None if meta.token_scales is None else meta.token_scales.double()
    return multi_lora_linear_reference(
        x.double(), weight.double(), None if bias is None else bias.double(), a_pool.double(), b_pool.double(),
        meta.token_slots, ranks, scalings.double(), scales, fan_in_fan_out=fan_in_fan_out,
    )  # fmt: skip


def test_reference_matches_a_per_token_loop():
    """The reference (a loop over slots with masked pools) is the formula, token by token."""
    ranks = [3, 0, 5]
    slots = [2, -1, 0, 2, 0, -1]
    x, w, b, a_pool, b_pool, meta = make_case(6, 11, 7, ranks, slots, torch.float64, token_scales=True)
    y = expected(x, w, b, a_pool, b_pool, meta)
    for t, s in enumerate(slots):
        row = x[t] @ w.t() + b
        if s >= 0:
            r = ranks[s]
            scale = meta.slot_scalings[s].item() * meta.token_scales[t].item()
            row = row + scale * (x[t] @ a_pool[s, :r].t()) @ b_pool[s, :, :r].t()
        torch.testing.assert_close(y[t], row, rtol=1e-12, atol=1e-12)


def test_torch_backend_against_reference():
    ranks = [1, 8, 16]
    slots = [2, -1, 0, 1, 2, 0, -1]
    case = make_case(len(slots), 33, 17, ranks, slots, torch.float32, token_scales=True)
    y = ops.multi_lora_linear(*case, backend="torch")
    assert y.dtype == torch.float32 and y.shape == (len(slots), 17)
    assert_close(y, expected(*case), torch.float32, 33 + 16, "y")
