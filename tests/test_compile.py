"""torch.compile(fullgraph=True) traces a stack of fastlora layers without graph breaks, forward and backward."""

import pytest
import torch
from multi_lora_cases import expected, make_case
from tolerances import assert_close
from torch import nn

from fastlora import LoraLinear


def _stack(device, dropout):
    torch.manual_seed(0)
    layers = []
    for k, n in [(32, 48), (48, 48), (48, 24)]:
        layer = LoraLinear.from_linear(nn.Linear(k, n).to(device), r=8, lora_alpha=16, lora_dropout=dropout)
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.2)
        layers += [layer, nn.GELU()]
    return nn.Sequential(*layers[:-1]).train()


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_matches_eager(backend, device):
    torch._dynamo.reset()
    model = _stack(device, dropout=0.0)
    x = torch.randn(2, 5, 32, device=device)
    y_eager = model(x)
    y_eager.square().mean().backward()
    grads_eager = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()

    compiled = torch.compile(model, fullgraph=True, backend=backend)
    y = compiled(x)
    y.square().mean().backward()
    assert_close(y, y_eager.double(), torch.float32, 48, "compiled forward")
    for g, g_eager in zip((p.grad for p in model.parameters() if p.requires_grad), grads_eager):
        assert_close(g, g_eager.double(), torch.float32, 10, "compiled gradient")


def test_compile_fullgraph_with_dropout(device):
    torch._dynamo.reset()
    model = _stack(device, dropout=0.1)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 32, device=device)
    compiled(x).sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    torch.manual_seed(1)
    a = compiled(x)
    torch.manual_seed(1)
    b = compiled(x)
    assert torch.equal(a, b)


@pytest.mark.parametrize("impl", ["fused", "segmented"])
def test_compile_fullgraph_multi_lora_linear(impl, device):
    """The multi-adapter op is one custom op: a compiled function over a batch's metadata traces without breaks."""
    from fastlora import multi_lora_linear

    torch._dynamo.reset()
    x, w, b, a_pool, b_pool, meta = make_case(
        9, 24, 40, [4, 16, 0, 8], [1, -1, 0, 3, 1, 0, -1, 3, 1], torch.float32, token_scales=True, device=device
    )

    def two_layers(x):
        h = multi_lora_linear(x, w, b, a_pool, b_pool, meta, impl=impl)
        return multi_lora_linear(h[:, :24].contiguous(), w, b, a_pool, b_pool, meta, impl=impl)

    with torch.no_grad():
        eager = two_layers(x)
        compiled = torch.compile(two_layers, fullgraph=True, backend="aot_eager")(x)
    assert torch.equal(compiled, eager)
    h = expected(x, w, b, a_pool, b_pool, meta)
    assert_close(eager, expected(h[:, :24].float().contiguous(), w, b, a_pool, b_pool, meta), torch.float32, 48)


class _Experts(nn.Module):
    """A fused-experts module as transformers' ``@use_experts_implementation`` builds them (the flags and the two 3-D
    projections ``LoraExperts`` reads), without transformers."""

    num_experts, has_gate, has_bias, is_transposed = 4, True, False, False

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.gate_up_proj = nn.Parameter(torch.randn(4, 2 * 24, 32, generator=g) * 0.2)
        self.down_proj = nn.Parameter(torch.randn(4, 32, 24, generator=g) * 0.2)
        self.act_fn = nn.SiLU()

    def _apply_gate(self, gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        return self.act_fn(gate) * up


def test_compile_fullgraph_lora_experts(device):
    """Mixture-of-experts LoRA (routing, the grouped op as a custom op, dropout) traces without graph breaks and
    computes what eager mode computes, gradients included."""
    from fastlora import LoraExperts

    torch._dynamo.reset()
    layer = LoraExperts(_Experts().to(device), {"gate_up_proj": (4, 8.0), "down_proj": (2, 4.0)}, lora_dropout=0.1,
                        init_lora_weights=False).train()  # fmt: skip
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(10, 32, generator=g).to(device)
    index = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(10)]).to(device)
    weights = torch.rand(10, 2, generator=g).to(device)
    results = []
    for fn in (layer, torch.compile(layer, fullgraph=True, backend="aot_eager")):
        layer.zero_grad()
        torch.manual_seed(3)
        y = fn(hidden, index, weights)
        y.square().sum().backward()
        results.append([y.detach(), *(p.grad.clone() for p in layer.parameters() if p.requires_grad)])
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-6)
