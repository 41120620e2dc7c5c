"""Whole-model transforms on tiny Llama / GPT-2 models: what ``apply_lora`` freezes (checked against PEFT), that it
is all-or-nothing, that merge / unload / disable give back the right function, and the training helpers.

The LoRA layers run the Triton kernels (through the interpreter on CPU), so the models are tiny and the batches
short. Logits are compared with the tolerance table against the same model run in fp64 on the torch backend.
"""

import contextlib
import copy
import functools
import io

import pytest
import torch
from tolerances import assert_close
from torch import nn

import fastlora
from fastlora.layers import LoraLinear
from fastlora.model import lora_layers
from fastlora.recipes import freeze_bottom_layers, llrd_param_groups, merge_and_reinit, transformer_layers

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
Conv1D = transformers.pytorch_utils.Conv1D

IDS = torch.tensor([[1, 5, 9, 33, 2, 64, 100, 7], [3, 3, 80, 12, 127, 0, 44, 18]])
from tiny_models import HIDDEN, tiny_llama  # noqa: E402 (after importorskip)
from tiny_models import tiny_gpt2 as _gpt2  # noqa: E402 (after importorskip)

_llama = functools.partial(tiny_llama, num_hidden_layers=3)


MODELS = {"llama": _llama, "gpt2": _gpt2}
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_proj", "c_fc"]}


def _config(model_name: str = "llama", **kwargs) -> fastlora.LoraConfig:
    return fastlora.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": TARGETS[model_name], **kwargs})


def _peft_model(model: nn.Module, kwargs: dict):
    return peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**copy.deepcopy(kwargs)))


@torch.no_grad()
def _logits(model: nn.Module) -> torch.Tensor:
    return model(IDS).logits


@torch.no_grad()
def _fp64_logits(model: nn.Module, monkeypatch) -> torch.Tensor:
    """The same model in fp64 on the torch backend: the oracle for fp32 logits."""
    with monkeypatch.context() as patch:
        patch.setenv("FASTLORA_BACKEND", "torch")
        return copy.deepcopy(model).double()(IDS).logits


def _assert_logits_close(actual: torch.Tensor, expected_fp64: torch.Tensor, name: str):
    assert_close(actual, expected_fp64, torch.float32, reduce_len=4 * HIDDEN, name=name)


@torch.no_grad()
def _randomise_lora(model: nn.Module) -> None:
    generator = torch.Generator().manual_seed(1)
    for _, layer in lora_layers(model):
        layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=generator) * 0.2)
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.2)


def _snapshot(model: nn.Module) -> dict:
    """Everything a failed transform must leave as it was."""
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "types": {n: type(m) for n, m in model.named_modules()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "config": getattr(model, "fastlora_config", None),
    }


def _assert_unchanged(model: nn.Module, before: dict):
    after = _snapshot(model)
    assert after["types"] == before["types"]
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key
    assert after["requires_grad"] == before["requires_grad"]
    assert after["config"] is before["config"]


# ----------------------------------------------------------------------------------------------- freezing


def test_only_lora_weights_trainable_by_default():
    model = fastlora.apply_lora(_llama(), _config())
    targets = [n for n, _ in lora_layers(model)]
    assert len(targets) == 9
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{t}.{w}" for t in targets for w in ("lora_A", "lora_B")}
    assert model.fastlora_config.target_modules == TARGETS["llama"]


TRAINABLE_CASES = [
    ("llama", dict(target_modules=["q_proj", "v_proj", "down_proj"])),
    ("llama", dict(target_modules="all-linear", r=2)),
    ("llama", dict(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])),
    ("llama-bias", dict(target_modules=["q_proj", "up_proj"], bias="all")),
    ("llama-bias", dict(target_modules=["q_proj", "up_proj"], bias="lora_only")),
    ("gpt2", dict(target_modules=["c_attn", "c_fc"], bias="all")),
    ("gpt2", dict(target_modules=["c_attn", "c_fc"], bias="lora_only")),
    ("gpt2", dict(target_modules=["c_attn"], rank_pattern={"h.1.attn.c_attn": 8})),
]


def _make(model_name: str) -> nn.Module:
    if model_name == "llama-bias":
        return _llama(attention_bias=True, mlp_bias=True)
    return MODELS[model_name]()


@pytest.mark.parametrize("model_name, kwargs", TRAINABLE_CASES, ids=[f"{m}-{kw}" for m, kw in TRAINABLE_CASES])
def test_trainable_parameters_match_peft(model_name, kwargs):
    base = _make(model_name)
    peft_model = _peft_model(base, kwargs)
    peft_trainable, peft_total = peft_model.get_nb_trainable_parameters()

    model = fastlora.apply_lora(copy.deepcopy(base), fastlora.LoraConfig(**copy.deepcopy(kwargs)))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == peft_trainable

    # Names too: PEFT's trainable parameters, with its prefixes and adapter names taken out.
    def strip(name: str) -> str:
        name = name.removeprefix("base_model.model.")
        for peft_part, ours in ((".lora_A.default.weight", ".lora_A"), (".lora_B.default.weight", ".lora_B")):
            name = name.replace(peft_part, ours)
        return name.replace(".modules_to_save.default.", ".").replace(".base_layer.", ".")

    peft_names = {strip(n) for n, p in peft_model.named_parameters() if p.requires_grad}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == peft_names

    if not kwargs.get("modules_to_save"):  # PEFT keeps a second copy of modules_to_save, so totals differ there
        expected = io.StringIO()
        with contextlib.redirect_stdout(expected):
            peft_model.print_trainable_parameters()
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            counts = fastlora.print_trainable_parameters(model)
        assert printed.getvalue() == expected.getvalue()
        assert counts == (peft_trainable, peft_total)


def test_print_trainable_parameters_format(capsys):
    model = fastlora.apply_lora(_llama(), _config(target_modules=["q_proj"]))
    trainable, total = fastlora.print_trainable_parameters(model)
    assert trainable == 3 * 4 * (HIDDEN + HIDDEN)
    assert total == sum(p.numel() for p in _llama().parameters()) + trainable
    line = capsys.readouterr().out
    assert (
        line
        == f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}\n"
    )
    assert "," in line.split("||")[1]  # thousands separators, as PEFT prints them


# ----------------------------------------------------------------------------------------------- the swap


@pytest.mark.parametrize("model_name", ["llama", "gpt2"])
def test_state_dict_keys_unchanged_plus_lora(model_name):
    base = MODELS[model_name]()
    base_state = base.state_dict()
    base_ptrs = {k: v.data_ptr() for k, v in base_state.items()}
    model = fastlora.apply_lora(base, _config(model_name))
    targets = [n for n, _ in lora_layers(model)]
    state = model.state_dict()
    lora_keys = {f"{t}.{w}" for t in targets for w in ("lora_A", "lora_B")}
    assert set(state) == set(base_state) | lora_keys
    assert not set(base_state) & lora_keys
    for key in base_state:
        assert state[key].data_ptr() == base_ptrs[key], f"{key} was copied"
    for name, module in model.named_modules():
        if name in targets:
            assert type(module) is LoraLinear


def test_no_target_raises_listing_available_modules():
    model = _llama()
    before = _snapshot(model)
    with pytest.raises(ValueError) as info:
        fastlora.apply_lora(model, fastlora.LoraConfig(target_modules=["qproj"]))
    message = str(info.value)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.2.mlp.down_proj", "lm_head"):
        assert name in message
    _assert_unchanged(model, before)


def test_embedding_target_raises_not_implemented():
    model = _llama()
    before = _snapshot(model)
    with pytest.raises(NotImplementedError, match="embed_tokens.*Embedding"):
        fastlora.apply_lora(model, fastlora.LoraConfig(target_modules=["q_proj", "embed_tokens"]))
    _assert_unchanged(model, before)


def test_missing_modules_to_save_leaves_model_unchanged():
    model = _llama()
    before = _snapshot(model)
    with pytest.raises(ValueError, match="score"):
        fastlora.apply_lora(model, _config(modules_to_save=["score"]))
    _assert_unchanged(model, before)


def test_apply_twice_raises():
    model = fastlora.apply_lora(_llama(), _config())
    before = _snapshot(model)
    with pytest.raises(ValueError, match="already"):
        fastlora.apply_lora(model, _config())
    with pytest.raises(ValueError, match="already"):
        fastlora.apply_lora(model, fastlora.LoraConfig(target_modules=["k_proj"]))
    _assert_unchanged(model, before)


def test_failure_midway_leaves_model_unchanged(monkeypatch):
    """A failure while wrapping the third target (e.g. out of memory allocating its A/B) changes nothing: not the
    modules, not the weights, not which parameters are trainable."""
    model = _llama()
    before = _snapshot(model)
    original = LoraLinear.from_linear.__func__
    calls = []

    def failing_from_linear(cls, linear, *args, **kwargs):
        calls.append(linear)
        if len(calls) == 3:
            raise RuntimeError("simulated allocation failure")
        return original(cls, linear, *args, **kwargs)

    monkeypatch.setattr(LoraLinear, "from_linear", classmethod(failing_from_linear))
    with pytest.raises(RuntimeError, match="simulated"):
        fastlora.apply_lora(model, _config())
    assert len(calls) == 3
    _assert_unchanged(model, before)


# ----------------------------------------------------------------------------------------------- merge / unload


def test_default_init_gives_base_logits(monkeypatch):
    base = _llama()
    expected = _fp64_logits(base, monkeypatch)
    model = fastlora.apply_lora(copy.deepcopy(base), _config(target_modules="all-linear"))
    assert all(torch.count_nonzero(layer.lora_B) == 0 for _, layer in lora_layers(model))
    _assert_logits_close(_logits(model), expected, "default init")


@pytest.mark.parametrize("model_name", ["llama", "gpt2"])
def test_merge_and_unload_keeps_lora_function(model_name, monkeypatch):
    base = MODELS[model_name]()
    base_logits = _logits(base)
    base_types = {n: type(m) for n, m in base.named_modules()}
    model = fastlora.apply_lora(base, _config(model_name))
    _randomise_lora(model)
    lora_logits = _logits(model)
    expected = _fp64_logits(model, monkeypatch)
    _assert_logits_close(lora_logits, expected, "lora model")
    assert (lora_logits - base_logits).abs().max() > 1e-2 * base_logits.abs().max(), "the adapter must matter"

    merged = fastlora.merge_and_unload(model)
    assert merged is model
    assert {n: type(m) for n, m in merged.named_modules()} == base_types
    assert not any(True for _ in lora_layers(merged))
    assert getattr(merged, "fastlora_config", None) is None
    if model_name == "gpt2":
        assert type(merged.transformer.h[0].attn.c_attn) is Conv1D
        assert merged.transformer.h[0].attn.c_attn.weight.shape == (HIDDEN, 3 * HIDDEN)
    _assert_logits_close(_logits(merged), expected, "merged")
    # Unloaded cleanly: LoRA can be applied again.
    fastlora.apply_lora(merged, _config(model_name))


@pytest.mark.parametrize("model_name", ["llama", "gpt2"])
def test_unload_gives_back_base_exactly(model_name):
    base = MODELS[model_name]()
    base_logits = _logits(base)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    base_types = {n: type(m) for n, m in base.named_modules()}
    model = fastlora.apply_lora(base, _config(model_name))
    _randomise_lora(model)
    assert not torch.allclose(_logits(model), base_logits)

    unloaded = fastlora.unload(model)
    assert {n: type(m) for n, m in unloaded.named_modules()} == base_types
    state = unloaded.state_dict()
    assert state.keys() == base_state.keys()
    assert all(torch.equal(state[k], v) for k, v in base_state.items())
    assert torch.equal(_logits(unloaded), base_logits)


def test_disable_adapters(monkeypatch):
    base = _llama()
    base_logits = _logits(base)
    base_fp64 = _fp64_logits(base, monkeypatch)
    model = fastlora.apply_lora(base, _config())
    _randomise_lora(model)
    lora_logits = _logits(model)
    lora_fp64 = _fp64_logits(model, monkeypatch)

    with fastlora.disable_adapters(model) as inside:
        assert inside is model
        assert torch.equal(_logits(model), base_logits)
    assert torch.equal(_logits(model), lora_logits)

    # With merged layers: unmerged inside the block, merged again after it.
    layers = [layer for _, layer in lora_layers(model)]
    for layer in layers[::2]:
        layer.merge()
    with fastlora.disable_adapters(model):
        assert not any(layer.merged for layer in layers)
        _assert_logits_close(_logits(model), base_fp64, "disabled, was merged")
    assert [layer.merged for layer in layers] == [i % 2 == 0 for i in range(len(layers))]
    _assert_logits_close(_logits(model), lora_fp64, "merged again")

    # An exception inside the block still re-enables the adapters.
    with pytest.raises(KeyError), fastlora.disable_adapters(model):
        raise KeyError("inside")
    assert not any(layer.disabled for layer in layers)
    assert [layer.merged for layer in layers] == [i % 2 == 0 for i in range(len(layers))]


def test_disable_adapters_gpt2(monkeypatch):
    base = _gpt2()
    base_fp64 = _fp64_logits(base, monkeypatch)
    model = fastlora.apply_lora(base, _config("gpt2"))
    _randomise_lora(model)
    lora_logits = _logits(model)
    with fastlora.disable_adapters(model):
        _assert_logits_close(_logits(model), base_fp64, "gpt2 disabled")
    assert torch.equal(_logits(model), lora_logits)


# ----------------------------------------------------------------------------------------------- training helpers


def test_transformer_layers_finds_the_block_stack():
    assert transformer_layers(_llama()) is not None and len(transformer_layers(_llama())) == 3
    gpt2 = _gpt2()
    assert transformer_layers(gpt2) is gpt2.transformer.h


def test_freeze_bottom_layers_freezes_exactly_layer_zero():
    model = fastlora.apply_lora(_llama(), _config(modules_to_save=["lm_head"]))
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    frozen = freeze_bottom_layers(model, 1)
    layer0 = {n for n in before if n.startswith("model.layers.0.")}
    assert layer0 and any(before[n] for n in layer0)
    assert set(frozen) == layer0
    after = {n: p.requires_grad for n, p in model.named_parameters()}
    assert all(not after[n] for n in layer0)
    assert {n: g for n, g in after.items() if n not in layer0} == {n: g for n, g in before.items() if n not in layer0}
    with pytest.raises(ValueError):
        freeze_bottom_layers(model, 4)


def test_llrd_param_groups():
    base_lr, decay, n_layers = 1e-3, 0.5, 3
    model = fastlora.apply_lora(_llama(), _config(modules_to_save=["embed_tokens", "lm_head"]))
    groups = llrd_param_groups(model, base_lr, decay)

    expected_lr = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.startswith("model.layers."):
            layer = int(name.split(".")[2])
            expected_lr[name] = base_lr * decay ** (n_layers - 1 - layer)
        elif name.startswith("model.embed_tokens."):
            expected_lr[name] = base_lr * decay**n_layers
        else:
            assert name.startswith("lm_head."), name
            expected_lr[name] = base_lr
    names = {id(p): n for n, p in model.named_parameters()}
    seen = [names[id(p)] for group in groups for p in group["params"]]
    assert sorted(seen) == sorted(expected_lr), "every trainable parameter exactly once, no frozen one"
    for group in groups:
        for param in group["params"]:
            assert group["lr"] == pytest.approx(expected_lr[names[id(param)]], rel=1e-12), names[id(param)]

    # The optimizer honours the groups: AdamW's first step moves each parameter by its group's lr (unit gradients).
    optimizer = torch.optim.AdamW(groups, lr=123.0, weight_decay=0.0, eps=1e-12)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for param in model.parameters():
        if param.requires_grad:
            param.grad = torch.ones_like(param)
    optimizer.step()
    for name, param in model.named_parameters():
        if param.requires_grad:
            step = before[name] - param.detach()
            torch.testing.assert_close(step, torch.full_like(step, expected_lr[name]), rtol=1e-4, atol=0)

    # Frozen blocks contribute nothing.
    freeze_bottom_layers(model, 1)
    frozen_groups = llrd_param_groups(model, base_lr, decay)
    assert not any(names[id(p)].startswith("model.layers.0.") for g in frozen_groups for p in g["params"])
    with pytest.raises(ValueError):
        llrd_param_groups(model, base_lr, 0.0)


def test_merge_and_reinit(monkeypatch):
    model = fastlora.apply_lora(_llama(), _config())
    _randomise_lora(model)
    lora_fp64 = _fp64_logits(model, monkeypatch)
    layers = dict(lora_layers(model))
    old = {
        name: (layer.weight.detach().clone(), layer.delta_weight(), layer.lora_A.detach().clone())
        for name, layer in layers.items()
    }

    assert merge_and_reinit(model) == len(layers)
    for name, layer in layers.items():
        weight, delta, lora_A = old[name]
        assert not layer.merged
        assert torch.count_nonzero(layer.lora_B) == 0
        assert not torch.equal(layer.lora_A, lora_A), f"{name}: A was not re-initialised"
        assert layer.lora_A.requires_grad and layer.lora_B.requires_grad
        assert not layer.weight.requires_grad
        expected = weight.double() + delta.double()
        assert_close(layer.weight.detach(), expected, torch.float32, reduce_len=layer.r, name=name)
    _assert_logits_close(_logits(model), lora_fp64, "after merge_and_reinit")

    # Default init B = 0: a second round changes nothing.
    logits = _logits(model)
    weights = {name: layer.weight.detach().clone() for name, layer in layers.items()}
    merge_and_reinit(model)
    assert all(torch.equal(layers[n].weight, w) for n, w in weights.items())
    assert torch.equal(_logits(model), logits)


def test_training_steps_reduce_loss():
    base = _llama()
    model = fastlora.apply_lora(copy.deepcopy(base), _config())
    model.train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    losses = []
    for _ in range(4):
        optimizer.zero_grad()
        loss = model(IDS, labels=IDS).loss
        loss.backward()
        for name, layer in lora_layers(model):
            assert layer.lora_B.grad is not None and torch.isfinite(layer.lora_B.grad).all(), name
        optimizer.step()
        losses.append(loss.item())
    final = model(IDS, labels=IDS).loss.item()
    assert final < losses[0] - 0.05, losses + [final]
    assert losses == sorted(losses, reverse=True), losses
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_weight_layout_follows_the_module_type_as_in_peft():
    """PEFT ignores fan_in_fan_out=True on nn.Linear (it warns and resets it): so does apply_lora."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 20))
    fastlora.apply_lora(model, fastlora.LoraConfig(r=4, target_modules=["0"], fan_in_fan_out=True))
    layer = model[0]
    assert not layer.fan_in_fan_out
    assert layer.lora_A.shape == (4, 12) and layer.lora_B.shape == (20, 4)
    assert model(torch.randn(3, 12)).shape == (3, 20)
