"""Inputs of the multi-adapter op and their fp64 reference, shared by the tests of the op and of its compiled form."""

import torch

from fastlora.ops import BatchMeta
from fastlora.reference import multi_lora_linear_reference


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
