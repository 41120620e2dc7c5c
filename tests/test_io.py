"""Adapter files: PEFT and fastlora read each other's adapters (same logits, same keys, shapes, dtypes and config),
bad adapters raise and leave the model untouched, and a fastlora save/load round trip is exact.

Tiny Llama / GPT-2 models; the LoRA layers run the Triton kernels (through the interpreter on CPU). Logits are
compared with the tolerance table against the PEFT model run in fp64.
"""

import copy
import dataclasses
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tolerances import assert_close
from torch import nn

import fastlora
from fastlora.model import lora_layers

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

IDS = torch.tensor([[1, 5, 9, 33, 2, 64, 100, 7], [3, 3, 80, 12, 127, 0, 44, 18]])
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]
LLAMA_KWARGS = dict(
    r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, use_rslora=True, init_lora_weights=False,
    rank_pattern={"v_proj": 2, "layers.1.mlp.down_proj": 6}, alpha_pattern={"k_proj": 3, "o_proj": 16},
)  # fmt: skip
GPT2_KWARGS = dict(
    r=4, lora_alpha=8, target_modules=GPT2_TARGETS, fan_in_fan_out=True, init_lora_weights=False, bias="lora_only",
    rank_pattern={"c_fc": 3},
)  # fmt: skip
from tiny_models import HIDDEN  # noqa: E402 (after importorskip)
from tiny_models import tiny_gpt2 as _gpt2  # noqa: E402 (after importorskip)
from tiny_models import tiny_llama as _llama  # noqa: E402 (after importorskip)

MODELS = {"llama": (_llama, LLAMA_KWARGS), "gpt2": (_gpt2, GPT2_KWARGS)}


@torch.no_grad()
def _logits(model: nn.Module) -> torch.Tensor:
    return model(IDS).logits


def _peft_fp64_logits(peft_model: nn.Module, monkeypatch) -> torch.Tensor:
    """The PEFT model in fp64: the oracle for fastlora's fp32 logits."""
    with monkeypatch.context() as m:
        m.setenv("FASTLORA_BACKEND", "torch")
        return _logits(copy.deepcopy(peft_model).double())


def _assert_logits_close(actual: torch.Tensor, expected_fp64: torch.Tensor, name: str):
    assert_close(actual, expected_fp64, torch.float32, reduce_len=4 * HIDDEN, name=name)


@torch.no_grad()
def _randomize(params) -> None:
    for param in params:
        param.copy_(torch.randn_like(param) * 0.1)


def _trained_llama() -> transformers.LlamaForCausalLM:
    """A LoRA Llama whose trainable tensors differ from what ``apply_lora`` draws on a fresh ``_llama()``."""
    model = fastlora.apply_lora(_llama(), fastlora.LoraConfig(**copy.deepcopy(LLAMA_KWARGS)))
    torch.manual_seed(5)
    _randomize(p for p in model.parameters() if p.requires_grad)
    return model


def _saved(directory) -> dict[str, torch.Tensor]:
    return load_file(directory / "adapter_model.safetensors")


def _assert_same_tensors(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]):
    assert sorted(actual) == sorted(expected)
    for key, tensor in expected.items():
        assert actual[key].dtype == tensor.dtype and actual[key].shape == tensor.shape, key
        assert torch.equal(actual[key], tensor), key


# -------------------------------------------------------------------------------------------------- PEFT <-> fastlora


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_peft_adapter_loads_into_fastlora(arch, tmp_path, monkeypatch):
    make, kwargs = MODELS[arch]
    peft_model = peft.get_peft_model(make(), peft.LoraConfig(**copy.deepcopy(kwargs)))
    # Not PEFT's initial values: apply_lora would draw the very same ones from the same seed.
    torch.manual_seed(1)
    _randomize(p for p in peft_model.parameters() if p.requires_grad)
    peft_model.save_pretrained(tmp_path)

    model = fastlora.load_adapter(make(), tmp_path)

    expected_ranks = {n.removeprefix("base_model.model."): m.r["default"] for n, m in peft_model.named_modules()
                      if isinstance(m, peft.tuners.lora.LoraLayer)}  # fmt: skip
    assert {n: layer.r for n, layer in lora_layers(model)} == expected_ranks
    assert model.fastlora_config.rank_pattern == kwargs["rank_pattern"]
    _assert_logits_close(_logits(model), _peft_fp64_logits(peft_model, monkeypatch), f"{arch}: PEFT -> fastlora")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fastlora_adapter_loads_into_peft_and_matches_peft_save(arch, tmp_path, monkeypatch):
    make, kwargs = MODELS[arch]
    kwargs = {**kwargs, "modules_to_save": ["lm_head"]} if arch == "llama" else kwargs
    model = fastlora.apply_lora(make(), fastlora.LoraConfig(**copy.deepcopy(kwargs)))
    torch.manual_seed(2)
    _randomize(p for p in model.parameters() if p.requires_grad)
    fastlora.save_adapter(model, tmp_path / "fastlora")

    loaded = peft.PeftModel.from_pretrained(make(), tmp_path / "fastlora")
    _assert_logits_close(_logits(model), _peft_fp64_logits(loaded, monkeypatch), f"{arch}: fastlora -> PEFT")

    # PEFT's own save of the same weights: same keys, shapes, dtypes, values, metadata and config.
    peft_model = peft.get_peft_model(make(), peft.LoraConfig(**copy.deepcopy(kwargs)))
    ours = _saved(tmp_path / "fastlora")
    peft_keys = peft.get_peft_model_state_dict(peft_model).keys()
    assert sorted(peft_keys) == sorted(ours)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            key = name.replace(".default", "").replace(".modules_to_save", "")
            if param.requires_grad:
                param.copy_(ours[key])
    peft_model.save_pretrained(tmp_path / "peft")
    _assert_same_tensors(ours, _saved(tmp_path / "peft"))
    # PEFT's metadata, plus (ours only) the record of the config fields the weights were saved with.
    with safe_open(tmp_path / "peft" / "adapter_model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
    with safe_open(tmp_path / "fastlora" / "adapter_model.safetensors", "pt") as f:
        metadata = f.metadata()
    assert metadata.pop(fastlora.peft_format.SAVED_CONFIG_KEY) and metadata == {"format": "pt"}
    ours_config = json.loads((tmp_path / "fastlora" / "adapter_config.json").read_text())
    peft_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    # PEFT holds target_modules as a set, so its order in the file is arbitrary.
    peft_config["target_modules"] = sorted(peft_config["target_modules"])
    assert {k: peft_config.get(k) for k in ours_config} == ours_config


def test_save_adds_patterns_for_ranks_the_config_does_not_give(tmp_path, monkeypatch):
    """Saved with a config that lacks the rank/alpha patterns the layers were built with, the file still rebuilds
    the same layers, in PEFT and in fastlora."""
    model = _trained_llama()
    config = model.fastlora_config
    fastlora.save_adapter(model, tmp_path, config=dataclasses.replace(config, rank_pattern={}, alpha_pattern={}))

    saved = fastlora.LoraConfig.from_peft_dict(json.loads((tmp_path / "adapter_config.json").read_text()))
    for name, layer in lora_layers(model):
        assert (saved.rank_for(name), saved.alpha_for(name)) == (layer.r, layer.lora_alpha), name
    peft_model = peft.PeftModel.from_pretrained(_llama(), tmp_path)
    for name, module in peft_model.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            layer = model.get_submodule(name.removeprefix("base_model.model."))
            assert (module.r["default"], module.scaling["default"]) == (layer.r, pytest.approx(layer.scaling)), name
    _assert_logits_close(_logits(model), _peft_fp64_logits(peft_model, monkeypatch), "patterns added on save")


def test_peft_bias_all_with_modules_to_save_loads(tmp_path, monkeypatch):
    """PEFT's file then also holds the wrapper's ``original_module`` / ``modules_to_save`` biases."""
    kwargs = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], bias="all", modules_to_save=["o_proj"])
    peft_model = peft.get_peft_model(_llama(attention_bias=True), peft.LoraConfig(**kwargs))
    torch.manual_seed(4)
    _randomize(p for p in peft_model.parameters() if p.requires_grad)
    peft_model.save_pretrained(tmp_path)
    assert any(".original_module.bias" in k for k in _saved(tmp_path))

    model = fastlora.load_adapter(_llama(attention_bias=True), tmp_path)
    _assert_logits_close(_logits(model), _peft_fp64_logits(peft_model, monkeypatch), "bias=all, modules_to_save")


# ------------------------------------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_round_trip_restores_every_trainable_tensor(bias, tmp_path):
    kwargs = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], bias=bias, modules_to_save=["lm_head"])
    model = fastlora.apply_lora(_llama(attention_bias=True), fastlora.LoraConfig(**kwargs))
    torch.manual_seed(3)
    _randomize(p for p in model.parameters() if p.requires_grad)
    fastlora.save_adapter(model, tmp_path)

    # The keys are PEFT's for the same config (biases under ``base_layer`` for adapted modules only).
    peft_model = peft.get_peft_model(_llama(attention_bias=True), peft.LoraConfig(**kwargs))
    assert sorted(peft.get_peft_model_state_dict(peft_model)) == sorted(_saved(tmp_path))

    loaded = fastlora.load_adapter(_llama(attention_bias=True), tmp_path)
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    restored = {n: p for n, p in loaded.named_parameters() if p.requires_grad}
    assert sorted(trained) == sorted(restored)
    for name, param in trained.items():
        assert torch.equal(restored[name], param), name


def test_reads_keys_with_adapter_name_and_without_prefix_and_a_file_path(tmp_path):
    model = _trained_llama()
    fastlora.save_adapter(model, tmp_path)
    state = _saved(tmp_path)
    renamed = {
        k.removeprefix("base_model.model.").replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): v
        for k, v in state.items()
    }  # fmt: skip
    save_file(renamed, tmp_path / "adapter_model.safetensors", metadata={"format": "pt"})

    config, tensors = fastlora.io.read_adapter(tmp_path)
    assert config.to_peft_dict() == model.fastlora_config.to_peft_dict()
    assert sorted(tensors) == sorted(k.removeprefix("base_model.model.") for k in state)

    loaded = fastlora.load_adapter(_llama(), tmp_path / "adapter_model.safetensors")
    for (name, layer), (_, original) in zip(lora_layers(loaded), lora_layers(model), strict=True):
        assert torch.equal(layer.lora_A, original.lora_A) and torch.equal(layer.lora_B, original.lora_B), name


def test_pickle_adapter_loads_only_when_allowed(tmp_path):
    model = _trained_llama()
    fastlora.save_adapter(model, tmp_path)
    torch.save(_saved(tmp_path), tmp_path / "adapter_model.bin")
    (tmp_path / "adapter_model.safetensors").unlink()

    with pytest.raises(ValueError, match="adapter_model.bin.*allow_pickle=True"):
        fastlora.load_adapter(_llama(), tmp_path)
    loaded = fastlora.load_adapter(_llama(), tmp_path, allow_pickle=True)
    for (name, layer), (_, original) in zip(lora_layers(loaded), lora_layers(model), strict=True):
        assert torch.equal(layer.lora_A, original.lora_A) and torch.equal(layer.lora_B, original.lora_B), name


def test_interrupted_save_leaves_the_previous_adapter(tmp_path, monkeypatch):
    model = _trained_llama()
    fastlora.save_adapter(model, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def interrupted(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half an adapt")
        raise KeyboardInterrupt

    monkeypatch.setattr(fastlora.io, "save_file", interrupted)
    with torch.no_grad():
        next(lora_layers(model))[1].lora_A.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        fastlora.save_adapter(model, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_save_refuses_a_model_without_lora_or_a_config_that_does_not_describe_it(tmp_path):
    with pytest.raises(ValueError, match="fastlora_config"):
        fastlora.save_adapter(_llama(), tmp_path)
    model = _trained_llama()
    other = dataclasses.replace(model.fastlora_config, target_modules=["q_proj"])
    with pytest.raises(ValueError, match=r"LoRA layers it misses: .*k_proj"):
        fastlora.save_adapter(model, tmp_path, config=other)
    assert not any(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------------------- bad adapters


def _write_state(directory, state):
    save_file(state, directory / "adapter_model.safetensors", metadata={"format": "pt"})


def _edit_config(directory, **changes):
    path = directory / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _truncate(directory):
    path = directory / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


KEY_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


def _wrong_shape(directory):
    state = _saved(directory)
    state[KEY_A] = torch.zeros(5, HIDDEN)
    _write_state(directory, state)


def _unknown_module(directory):
    state = _saved(directory)
    state["base_model.model.model.layers.0.self_attn.nope_proj.lora_A.weight"] = torch.zeros(4, HIDDEN)
    _write_state(directory, state)


def _missing_key(directory):
    state = _saved(directory)
    del state[KEY_A]
    _write_state(directory, state)


def _pickled(directory):
    torch.save(_saved(directory), directory / "adapter_model.bin")
    (directory / "adapter_model.safetensors").unlink()


BAD_ADAPTERS = {
    "truncated": (_truncate, ValueError, r"adapter_model\.safetensors.*truncated"),
    "wrong shape": (_wrong_shape, ValueError, r"q_proj\.lora_A\.weight.*shape \(5, 64\).*expects \(4, 64\)"),
    "unknown module": (_unknown_module, ValueError, r"unexpected keys: .*nope_proj\.lora_A\.weight"),
    "missing key": (_missing_key, ValueError, r"missing keys: .*layers\.0\.self_attn\.q_proj\.lora_A\.weight"),
    "config names missing modules": (
        lambda d: _edit_config(d, target_modules=["nope_proj"], rank_pattern={}, alpha_pattern={}),
        ValueError,
        r"nope_proj",
    ),
    "unsupported option": (lambda d: _edit_config(d, use_dora=True), NotImplementedError, r"adapter_config\.json.*use_dora"),
    "pickle": (_pickled, ValueError, r"adapter_model\.bin.*allow_pickle"),
    "no weights file": (lambda d: (d / "adapter_model.safetensors").unlink(), FileNotFoundError, r"adapter_model"),
    "no config file": (lambda d: (d / "adapter_config.json").unlink(), FileNotFoundError, r"adapter_config\.json"),
    "not json": (lambda d: (d / "adapter_config.json").write_text("{"), ValueError, r"adapter_config\.json"),
}  # fmt: skip


def _snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "modules": [(n, type(m)) for n, m in model.named_modules()],
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "config": getattr(model, "fastlora_config", None),
    }


def _assert_unchanged(model: nn.Module, before: dict):
    after = _snapshot(model)
    assert after["state"].keys() == before["state"].keys()
    for key, tensor in before["state"].items():
        assert torch.equal(after["state"][key], tensor), key
    assert after["modules"] == before["modules"]
    assert after["requires_grad"] == before["requires_grad"]
    assert after["config"] is before["config"]


@pytest.fixture
def good_adapter(tmp_path):
    model = _trained_llama()
    fastlora.save_adapter(model, tmp_path)
    return tmp_path


@pytest.mark.parametrize("has_lora", [False, True], ids=["plain", "lora"])
@pytest.mark.parametrize("case", BAD_ADAPTERS)
def test_bad_adapter_raises_and_changes_nothing(case, has_lora, good_adapter):
    spoil, error, message = BAD_ADAPTERS[case]
    spoil(good_adapter)
    model = _llama()
    if has_lora:
        fastlora.apply_lora(model, fastlora.LoraConfig(**copy.deepcopy(LLAMA_KWARGS)))
    before = _snapshot(model)
    with pytest.raises(error, match=message):
        fastlora.load_adapter(model, good_adapter)
    _assert_unchanged(model, before)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({**LLAMA_KWARGS, "rank_pattern": {}}, r"r=4.*r=2"),
        ({**LLAMA_KWARGS, "use_rslora": False}, r"scaling"),
        ({**LLAMA_KWARGS, "target_modules": ["q_proj"]}, r"does not match the model's LoRA layers"),
    ],
    ids=["rank", "scaling", "targets"],
)
def test_incompatible_lora_model_raises_and_changes_nothing(kwargs, message, good_adapter):
    model = fastlora.apply_lora(_llama(), fastlora.LoraConfig(**copy.deepcopy(kwargs)))
    before = _snapshot(model)
    with pytest.raises(ValueError, match=message):
        fastlora.load_adapter(model, good_adapter)
    _assert_unchanged(model, before)


def test_missing_path_raises(tmp_path):
    model = _llama()
    before = _snapshot(model)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fastlora.load_adapter(model, tmp_path / "nowhere")
    _assert_unchanged(model, before)


def test_strict_false_loads_what_fits(good_adapter):
    _missing_key(good_adapter)
    _unknown_module(good_adapter)
    with pytest.warns(UserWarning, match="nope_proj"):
        model = fastlora.load_adapter(_llama(), good_adapter, strict=False)
    assert len(list(lora_layers(model))) == 2 * len(LLAMA_TARGETS)
