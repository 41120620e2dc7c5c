"""What autograd keeps for the backward: with dropout, nothing of size M·K besides x itself."""

import torch
from torch import nn

import fastlora
from fastlora import LoraLinear


def _saved_tensors(fn):
    """Every tensor autograd packs for the backward while ``fn`` runs."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return saved, out


def _large_saved(saved, x, M, K):
    """Saved tensors with at least M·K elements that are not ``x`` (same storage and shape) or a parameter."""
    return [
        t for t in saved
        if t.numel() >= M * K and not isinstance(t, nn.Parameter)
        and not (t.data_ptr() == x.data_ptr() and t.shape == x.shape)
    ]  # fmt: skip


def test_lora_linear_with_dropout_saves_no_activation_copy(device):
    M, K, N = 96, 32, 16  # M·K is larger than every weight, so size alone singles activations out
    torch.manual_seed(0)
    linear = nn.Linear(K, N).to(device)
    layer = LoraLinear.from_linear(linear, r=8, lora_dropout=0.1).train()
    x = torch.randn(2, M // 2, K, device=device, requires_grad=True)
    saved, y = _saved_tensors(lambda: layer(x))
    assert _large_saved(saved, x, M, K) == []
    assert sum(t.numel() for t in saved if not isinstance(t, nn.Parameter) and t is not x) <= M * 8 + 1
    y.sum().backward()  # and the backward still runs from what was kept
    assert x.grad is not None and layer.lora_A.grad is not None


def test_the_check_catches_a_stored_dropout_copy(device):
    """The same check flags the naive formula, which stores D(x) (as PEFT does): the test can fail."""
    M, K, N = 96, 32, 16
    torch.manual_seed(0)
    weight = torch.randn(N, K, device=device)
    lora_A = torch.randn(8, K, device=device, requires_grad=True)
    lora_B = torch.randn(N, 8, device=device, requires_grad=True)
    x = torch.randn(M, K, device=device, requires_grad=True)

    def naive():
        return x @ weight.t() + nn.functional.dropout(x, 0.1, training=True) @ lora_A.t() @ lora_B.t()

    saved, _ = _saved_tensors(naive)
    assert len(_large_saved(saved, x, M, K)) >= 1


def test_shared_input_is_not_duplicated(device):
    """q/k/v projections of one input: three layers, and still no M·K tensor besides x."""
    M, K = 64, 32
    torch.manual_seed(0)
    layers = [LoraLinear.from_linear(nn.Linear(K, 16).to(device), r=4, lora_dropout=0.05).train() for _ in range(3)]
    x = torch.randn(M, K, device=device, requires_grad=True)
    saved, _ = _saved_tensors(lambda: [layer(x) for layer in layers])
    assert _large_saved(saved, x, M, K) == []
    assert fastlora.lora_linear is not None
