"""LoraLinear: wrapping without copies, PEFT's initialisation, merge / unmerge / to_linear, and extra_repr."""

import math

import pytest
import torch
from tolerances import assert_close
from torch import nn

import fastlora
from fastlora import LoraLinear


def _linear(K=40, N=24, bias=True, dtype=torch.float32, device="cpu"):
    torch.manual_seed(0)
    return nn.Linear(K, N, bias=bias).to(device=device, dtype=dtype)


def test_from_linear_shares_the_frozen_weight(device):
    linear = _linear(device=device)
    layer = LoraLinear.from_linear(linear, r=8, lora_alpha=16)
    assert layer.weight is linear.weight and layer.bias is linear.bias
    assert layer.weight.data_ptr() == linear.weight.data_ptr()
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad
    assert layer.lora_A.shape == (8, 40) and layer.lora_B.shape == (24, 8)
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B"}


def test_default_init_starts_as_the_base_layer(device):
    """PEFT's default: B = 0, so the wrapped layer computes exactly what the linear layer did."""
    linear = _linear(device=device)
    layer = LoraLinear.from_linear(linear, r=4)
    x = torch.randn(5, 40, device=device)
    assert torch.count_nonzero(layer.lora_B) == 0
    bound = 1 / math.sqrt(40)  # kaiming-uniform with a=√5 on [r, in] is U(-1/√in, 1/√in)
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.5 * bound
    assert_close(layer(x), linear(x).double(), torch.float32, 40, "default init output")


def test_gaussian_and_random_init(device):
    torch.manual_seed(0)
    g = LoraLinear.from_linear(_linear(K=512, device=device), r=16, init_lora_weights="gaussian")
    assert abs(g.lora_A.std().item() - 1 / 16) < 0.01 and torch.count_nonzero(g.lora_B) == 0
    f = LoraLinear.from_linear(_linear(device=device), r=4, init_lora_weights=False)
    assert torch.count_nonzero(f.lora_B) == f.lora_B.numel()
    assert f.lora_B.abs().max() <= 1 / math.sqrt(4)


@pytest.mark.parametrize("use_rslora, expected", [(False, 32 / 16), (True, 32 / 4)])
def test_scaling(use_rslora, expected):
    layer = LoraLinear.from_linear(_linear(), r=16, lora_alpha=32, use_rslora=use_rslora)
    assert layer.scaling == pytest.approx(expected)


def _trained_layer(fan_in_fan_out=False, dtype=torch.float32, device="cpu", bias=True):
    linear = _linear(bias=bias, dtype=dtype, device=device)
    if fan_in_fan_out:  # a GPT-2 Conv1D stores the weight [in, out]
        weight = nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=False)
        layer = LoraLinear(weight, linear.bias, r=8, lora_alpha=16, fan_in_fan_out=True)
    else:
        layer = LoraLinear.from_linear(linear, r=8, lora_alpha=16)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
    return layer


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_merge_unmerge_to_linear_are_equivalent(fan_in_fan_out, device):
    layer = _trained_layer(fan_in_fan_out, device=device)
    x = torch.randn(3, 7, 40, device=device)
    w0 = layer.weight.detach().clone()
    y = layer(x)
    linear = layer.to_linear()
    assert isinstance(linear, nn.Linear) and linear.weight.shape == (24, 40)
    assert torch.equal(layer.weight, w0), "to_linear must not modify the layer"
    assert_close(linear(x), y.double(), torch.float32, 48, "to_linear")
    layer.merge()
    assert layer.merged and not torch.equal(layer.weight, w0)
    assert_close(layer(x), y.double(), torch.float32, 48, "merged")
    assert_close(layer.to_linear()(x), y.double(), torch.float32, 48, "to_linear after merge")
    layer.unmerge()
    assert not layer.merged
    assert_close(layer.weight, w0.double(), torch.float32, 8, "unmerged weight")
    assert_close(layer(x), y.double(), torch.float32, 48, "unmerged")


def test_merge_accumulates_in_fp32(device):
    """In bf16 the merged weight is W0 + s·B·A computed in fp32 and rounded once."""
    layer = _trained_layer(dtype=torch.bfloat16, device=device)
    expected = (layer.weight.float() + layer.delta_weight()).to(torch.bfloat16)
    layer.merge()
    assert torch.equal(layer.weight, expected)


def test_merge_refuses_non_finite_and_changes_nothing(device):
    layer = _trained_layer(dtype=torch.float16, device=device)
    with torch.no_grad():
        layer.lora_B.fill_(1e6)  # s·B·A is finite in fp32 but overflows fp16
    w0 = layer.weight.detach().clone()
    with pytest.raises(ValueError, match="non-finite"):
        layer.merge()
    assert not layer.merged and torch.equal(layer.weight, w0)
    with torch.no_grad():
        layer.lora_B.fill_(float("nan"))
    with pytest.raises(ValueError, match="non-finite"):
        layer.merge()
    assert torch.equal(layer.weight, w0)


def test_merge_twice_and_unmerge_unmerged_are_errors():
    layer = _trained_layer()
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()
    layer.merge()
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()


def test_training_step_updates_only_lora(device):
    layer = _trained_layer(device=device)
    w0, b0 = layer.weight.detach().clone(), layer.bias.detach().clone()
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    a0 = layer.lora_A.detach().clone()
    layer(torch.randn(6, 40, device=device)).square().mean().backward()
    opt.step()
    assert torch.equal(layer.weight, w0) and torch.equal(layer.bias, b0)
    assert not torch.equal(layer.lora_A, a0)


def test_lora_weight_dtype_follows_peft(device):
    """Adapters of a half-precision base are kept in fp32, as PEFT does; lora_dtype overrides it."""
    assert LoraLinear.from_linear(_linear(dtype=torch.bfloat16, device=device), r=4).lora_A.dtype == torch.float32
    layer = LoraLinear.from_linear(_linear(dtype=torch.bfloat16, device=device), r=4, lora_dtype=torch.bfloat16)
    assert layer.lora_A.dtype == torch.bfloat16
    assert layer(torch.randn(2, 40, device=device, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_extra_repr():
    text = repr(LoraLinear.from_linear(_linear(), r=8, lora_alpha=16, lora_dropout=0.05))
    for part in ["in_features=40", "out_features=24", "r=8", "lora_alpha=16", "scaling=2", "lora_dropout=0.05",
                 "merged=False"]:  # fmt: skip
        assert part in text, text


def test_functional_and_module_agree(device):
    layer = _trained_layer(device=device)
    x = torch.randn(4, 40, device=device)
    y = fastlora.lora_linear(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling)
    assert torch.equal(layer(x), y)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"r": 0}, "rank r"),
        ({"r": 4, "lora_dropout": 1.0}, "lora_dropout"),
        ({"r": 4, "init_lora_weights": "pissa"}, "init_lora_weights"),
    ],
)
def test_bad_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoraLinear.from_linear(_linear(), **kwargs)
