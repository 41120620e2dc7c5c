"""PEFT parity where a model's heads are involved: tied embeddings, task heads, embedding targets, and the layout flag;
all-or-nothing merges and the refusals around them. Each case runs real PEFT on the same tiny model and config."""

import copy
import json
import re
import time
import warnings

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from torch import nn

import fastlora
from fastlora.layers import LoraLinear
from fastlora.model import lora_layers
from fastlora.recipes import merge_and_reinit

VOCAB = 64
IDS = torch.tensor([[1, 5, 9, 33, 2, 60], [3, 3, 40, 12, 63, 7]])


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    monkeypatch.setenv("FASTLORA_BACKEND", "torch")  # the kernels are not the point here, and interpreted they are slow


def _llama(tie=False, cls=transformers.LlamaForCausalLM, dtype=torch.float32, layers=1):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=tie, pad_token_id=0, num_labels=3,
    )  # fmt: skip
    return cls(config).to(dtype).eval()


def _bert(cls=transformers.BertForSequenceClassification):
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
        max_position_embeddings=32, num_labels=3,
    )  # fmt: skip
    return cls(config).eval()


def _distilbert():
    torch.manual_seed(0)
    config = transformers.DistilBertConfig(
        vocab_size=VOCAB, dim=16, n_layers=1, n_heads=2, hidden_dim=24, max_position_embeddings=32, num_labels=3
    )
    return transformers.DistilBertForSequenceClassification(config).eval()


def _gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=32)
    return transformers.GPT2LMHeadModel(config).eval()


def _trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _randomize(model: nn.Module, seed: int) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn_like(param) * 0.3)


def _out(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def _assert_close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def _snapshot(model: nn.Module) -> tuple[dict, dict]:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return state, {n: p.requires_grad for n, p in model.named_parameters()}


def _assert_unchanged(model: nn.Module, snapshot) -> None:
    state, flags = snapshot
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], v) for k, v in state.items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def _peft_model(base: nn.Module, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(base, peft.LoraConfig(lora_dropout=0.0, **kwargs))


def _peft_save(peft_model, directory) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model.save_pretrained(directory)


def _peft_load(base: nn.Module, directory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(base, directory).eval()


# ------------------------------------------------------------------------------- modules_to_save on a tied lm_head


def test_tied_lm_head_to_save_trains_a_copy_like_peft():
    base = _llama(tie=True)
    embedding = base.model.embed_tokens.weight.detach().clone()
    peft_model = _peft_model(copy.deepcopy(base), r=2, target_modules=["q_proj"], modules_to_save=["lm_head"],
                             init_lora_weights=False)  # fmt: skip
    model = fastlora.apply_lora(
        copy.deepcopy(base), fastlora.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
    )
    assert model.lm_head.weight is not model.model.embed_tokens.weight and model.lm_head.weight.requires_grad
    assert _trainable(model) == peft_model.get_nb_trainable_parameters()[0]
    with torch.no_grad():  # the same (random) LoRA init in both
        for name, layer in lora_layers(model):
            peft_layer = peft_model.base_model.model.get_submodule(name)
            layer.lora_A.copy_(peft_layer.lora_A["default"].weight)
            layer.lora_B.copy_(peft_layer.lora_B["default"].weight)

    for m in (model, peft_model):
        optimizer = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
        nn.functional.cross_entropy(m(IDS).logits.flatten(0, 1), IDS.flatten()).backward()
        optimizer.step()
    _assert_close(_out(model), _out(peft_model))
    assert torch.equal(model.model.embed_tokens.weight, embedding)
    assert torch.equal(peft_model.base_model.model.model.embed_tokens.weight, embedding)
    assert not torch.equal(model.lm_head.weight, embedding)

    # disable_adapters computes the base model (the shared original), as PEFT's wrapper does.
    with fastlora.disable_adapters(model):
        _assert_close(_out(model), _out(base))
    with peft_model.disable_adapter():
        _assert_close(_out(peft_model), _out(base))

    # unload keeps the trained copy, as PEFT's does, and the model's config no longer ties the embeddings.
    trained = model.lm_head.weight.detach().clone()
    with pytest.warns(UserWarning, match="tie_word_embeddings is set to False"):
        unloaded = fastlora.unload(model)
    peft_unloaded = peft_model.unload()
    assert torch.equal(unloaded.lm_head.weight, trained)
    _assert_close(unloaded.lm_head.weight, peft_unloaded.lm_head.weight)
    assert torch.equal(unloaded.model.embed_tokens.weight, embedding)
    assert unloaded.config.tie_word_embeddings is False


def test_peft_adapter_with_tied_lm_head_to_save_loads_without_touching_the_embedding(tmp_path):
    peft_model = _peft_model(_llama(tie=True), r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
    _randomize(peft_model, seed=1)
    _peft_save(peft_model, tmp_path)

    model = _llama(tie=True)
    embedding = model.model.embed_tokens.weight.detach().clone()
    fastlora.load_adapter(model, tmp_path)
    _assert_close(_out(model), _out(peft_model))
    assert torch.equal(model.model.embed_tokens.weight, embedding)


# -------------------------------------------------------------------------------------------------- task heads

SEQ_CLS = {
    "bert": (_bert, dict(r=2, target_modules=["query", "value"], task_type="SEQ_CLS")),
    "llama": (
        lambda: _llama(cls=transformers.LlamaForSequenceClassification),
        dict(r=2, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS"),
    ),
}


@pytest.mark.parametrize("arch", SEQ_CLS)
def test_seq_cls_head_is_trained_and_adapters_cross_load(arch, tmp_path):
    build, kwargs = SEQ_CLS[arch]
    peft_model = _peft_model(build(), **copy.deepcopy(kwargs))
    config = fastlora.LoraConfig(**kwargs)
    model = fastlora.apply_lora(build(), config)
    assert _trainable(model) == peft_model.get_nb_trainable_parameters()[0]
    assert config.modules_to_save is None  # the caller's config is left alone

    _randomize(peft_model, seed=2)
    _peft_save(peft_model, tmp_path / "peft")
    loaded = fastlora.load_adapter(build(), tmp_path / "peft")
    _assert_close(_out(loaded), _out(peft_model))

    _randomize(model, seed=3)
    fastlora.save_adapter(model, tmp_path / "fastlora")
    saved = json.loads((tmp_path / "fastlora" / "adapter_config.json").read_text())
    assert (
        saved["modules_to_save"]
        == json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["modules_to_save"]
    )
    _assert_close(_out(_peft_load(build(), tmp_path / "fastlora")), _out(model))


@pytest.mark.parametrize(
    "cls, task",
    [
        (transformers.BertForTokenClassification, "TOKEN_CLS"),
        (transformers.BertForQuestionAnswering, "QUESTION_ANS"),
    ],
)
def test_other_task_heads_match_peft(cls, task):
    kwargs = dict(r=2, target_modules=["query", "value"], task_type=task)
    peft_model = _peft_model(_bert(cls), **copy.deepcopy(kwargs))
    model = fastlora.apply_lora(_bert(cls), fastlora.LoraConfig(**kwargs))
    assert _trainable(model) == peft_model.get_nb_trainable_parameters()[0]


def test_all_linear_seq_cls_trains_the_head_without_lora():
    kwargs = dict(r=2, target_modules="all-linear", task_type="SEQ_CLS")
    peft_model = _peft_model(_bert(), **copy.deepcopy(kwargs))
    model = fastlora.apply_lora(_bert(), fastlora.LoraConfig(**kwargs))
    peft_adapted = {
        n.removeprefix("base_model.model.")
        for n, m in peft_model.named_modules()
        if isinstance(m, peft.tuners.lora.LoraLayer)
    }
    assert {n for n, _ in lora_layers(model)} == peft_adapted
    assert "classifier" not in peft_adapted and model.classifier.weight.requires_grad
    assert _trainable(model) == peft_model.get_nb_trainable_parameters()[0]


def test_modules_to_save_matches_name_suffixes_like_peft(tmp_path):
    """PEFT's rule is a plain suffix: ``"classifier"`` also saves DistilBERT's ``pre_classifier``."""
    kwargs = dict(r=2, target_modules=["q_lin"], modules_to_save=["classifier"])
    peft_model = _peft_model(_distilbert(), **copy.deepcopy(kwargs))
    model = fastlora.apply_lora(_distilbert(), fastlora.LoraConfig(**kwargs))
    assert _trainable(model) == peft_model.get_nb_trainable_parameters()[0]
    assert model.pre_classifier.weight.requires_grad and model.classifier.weight.requires_grad

    _randomize(peft_model, seed=4)
    _peft_save(peft_model, tmp_path)
    assert any(
        k.startswith("base_model.model.pre_classifier.") for k in load_file(tmp_path / "adapter_model.safetensors")
    )
    loaded = fastlora.load_adapter(_distilbert(), tmp_path)
    _assert_close(_out(loaded), _out(peft_model))


def test_nested_modules_to_save_match_peft_and_round_trip(tmp_path):
    """``"dense"`` names modules inside the saved ``pooler`` too: trained once, saved under PEFT's keys."""
    kwargs = dict(r=2, target_modules=["query"], modules_to_save=["pooler", "dense"])
    peft_model = _peft_model(_bert(), **copy.deepcopy(kwargs))
    model = fastlora.apply_lora(_bert(), fastlora.LoraConfig(**kwargs))
    assert _trainable(model) == peft_model.get_nb_trainable_parameters()[0]
    _peft_save(peft_model, tmp_path / "peft")
    _randomize(model, seed=8)
    fastlora.save_adapter(model, tmp_path / "fastlora")
    saved = {d: sorted(load_file(tmp_path / d / "adapter_model.safetensors")) for d in ("peft", "fastlora")}
    assert saved["fastlora"] == saved["peft"]
    _assert_close(_out(fastlora.load_adapter(_bert(), tmp_path / "fastlora")), _out(model))


def test_all_linear_leaves_every_module_to_save_out_of_lora():
    """PEFT's dot-bounded exclusion puts LoRA on ``pre_classifier``, then fails to wrap it; fastlora trains it fully."""
    kwargs = dict(r=2, target_modules="all-linear", modules_to_save=["classifier"])
    with pytest.raises(TypeError, match="modules_to_save cannot be applied"):
        _peft_model(_distilbert(), **copy.deepcopy(kwargs))
    model = fastlora.apply_lora(_distilbert(), fastlora.LoraConfig(**kwargs))
    adapted = {n for n, _ in lora_layers(model)}
    assert adapted and not any("classifier" in n for n in adapted)
    assert all(p.requires_grad for m in (model.pre_classifier, model.classifier) for p in m.parameters())


def test_modules_to_save_entry_matching_nothing_is_refused():
    """PEFT ignores such an entry silently (here it trains the LoRA weights only); fastlora names it."""
    kwargs = dict(r=2, target_modules=["query"], modules_to_save=["clasifier"])
    peft_model = _peft_model(_bert(), **copy.deepcopy(kwargs))
    lora_only = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    assert peft_model.get_nb_trainable_parameters()[0] == lora_only
    model = _bert()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"modules_to_save names modules the model lacks: \['clasifier'\]"):
        fastlora.apply_lora(model, fastlora.LoraConfig(**kwargs))
    _assert_unchanged(model, before)
    assert not hasattr(model, "fastlora_config")


# ------------------------------------------------------------------------------------------ lm_head as a target


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_lm_head_target_saves_and_loads_like_peft(tie, tmp_path):
    kwargs = dict(r=2, target_modules=["q_proj", "lm_head"])
    peft_model = _peft_model(_llama(tie=tie), **kwargs)
    _randomize(peft_model, seed=5)
    _peft_save(peft_model, tmp_path / "peft")
    peft_keys = sorted(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    assert "base_model.model.lm_head.base_layer.weight" in peft_keys

    model = fastlora.load_adapter(_llama(tie=tie), tmp_path / "peft")  # strict: the base weight is an accepted key
    _assert_close(_out(model), _out(peft_model))
    fastlora.save_adapter(model, tmp_path / "fastlora")
    ours = load_file(tmp_path / "fastlora" / "adapter_model.safetensors")
    assert sorted(ours) == peft_keys
    _assert_close(_out(_peft_load(_llama(tie=tie), tmp_path / "fastlora")), _out(model))


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_saved_lm_head_base_weight_that_differs_is_loaded_without_touching_the_embedding(tie, tmp_path):
    model = fastlora.apply_lora(_llama(tie=tie), fastlora.LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    fastlora.save_adapter(model, tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    head = tensors["base_model.model.lm_head.base_layer.weight"] + 0.25
    tensors["base_model.model.lm_head.base_layer.weight"] = head
    save_file(tensors, path, metadata={"format": "pt"})

    fresh = _llama(tie=tie)
    embedding = fresh.model.embed_tokens.weight.detach().clone()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fastlora.load_adapter(fresh, tmp_path)
    assert torch.equal(fresh.lm_head.weight, head)
    assert torch.equal(fresh.model.embed_tokens.weight, embedding)
    assert any("tie is broken" in str(w.message) for w in caught) is tie


# --------------------------------------------------------------------------------------------- fan_in_fan_out


@pytest.mark.parametrize(
    "build, targets, flag, message",
    [
        (_llama, ["q_proj"], True, "fan_in_fan_out is set to True but the target module is `torch.nn.Linear`"),
        (_gpt2, ["c_attn"], False, "fan_in_fan_out is set to False but the target module is `Conv1D`"),
    ],
    ids=["linear", "conv1d"],
)
def test_fan_in_fan_out_is_corrected_like_peft(build, targets, flag, message, tmp_path):
    peft_config = peft.LoraConfig(r=2, target_modules=targets, fan_in_fan_out=flag)
    with pytest.warns(UserWarning, match=message):
        peft_model = peft.get_peft_model(build(), peft_config)
    _peft_save(peft_model, tmp_path / "peft")

    config = fastlora.LoraConfig(r=2, target_modules=targets, fan_in_fan_out=flag)
    with pytest.warns(UserWarning, match=re.escape(message)):
        model = fastlora.apply_lora(build(), config)
    assert config.fan_in_fan_out is flag  # the caller's object is left alone (PEFT corrects it in place)
    assert model.fastlora_config.fan_in_fan_out is not flag
    fastlora.save_adapter(model, tmp_path / "fastlora")
    ours, theirs = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("fastlora", "peft"))
    assert ours["fan_in_fan_out"] == theirs["fan_in_fan_out"] == (not flag)


# ------------------------------------------------------------------------------------------------------ merges


def test_merge_and_reinit_is_all_or_nothing():
    model = fastlora.apply_lora(
        _llama(dtype=torch.float16, layers=2), fastlora.LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
    )
    _randomize(model, seed=6)
    last = "model.layers.1.self_attn.v_proj"
    with torch.no_grad():
        model.get_submodule(last).lora_B.fill_(1e6)  # s·B·A far past fp16's 65504
    before = _snapshot(model)
    with pytest.raises(ValueError, match=rf"merging layer '{last}' would put non-finite values.*no layer was changed"):
        merge_and_reinit(model)
    _assert_unchanged(model, before)
    assert not any(layer.merged for _, layer in lora_layers(model))


def test_merging_a_tied_lm_head_unties_it_instead_of_changing_the_embedding():
    kwargs = dict(r=2, target_modules=["q_proj", "lm_head"])
    model = fastlora.apply_lora(_llama(tie=True), fastlora.LoraConfig(**kwargs))
    _randomize(model, seed=7)
    embedding = model.model.embed_tokens.weight.detach().clone()
    unmerged = _out(model)
    assert model.lm_head.shared_weight

    shared = model.lm_head.weight
    with pytest.warns(UserWarning, match="tie is broken"):
        model.lm_head.merge()
    assert model.lm_head.weight is not shared and torch.equal(model.model.embed_tokens.weight, embedding)
    _assert_close(_out(model), unmerged)
    model.lm_head.unmerge()
    assert model.lm_head.weight is shared is model.model.embed_tokens.weight

    with pytest.warns(UserWarning, match="tie_word_embeddings"):
        merged = fastlora.merge_and_unload(model)
    assert isinstance(merged.lm_head, nn.Linear) and merged.lm_head.weight is not merged.model.embed_tokens.weight
    assert torch.equal(merged.model.embed_tokens.weight, embedding)
    assert merged.config.tie_word_embeddings is False
    _assert_close(_out(merged), unmerged)

    # PEFT merges into the tied tensor: its embedding changes too (the difference documented here).
    peft_model = _peft_model(_llama(tie=True), **kwargs)
    _randomize(peft_model, seed=7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_merged = peft_model.merge_and_unload()
    assert not torch.equal(peft_merged.model.embed_tokens.weight, embedding)


# ---------------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(use_rslora="yes"), TypeError, "use_rslora must be a bool"),
        (dict(lora_alpha="8"), TypeError, "lora_alpha must be a finite real number"),
        (dict(lora_alpha=True), TypeError, "lora_alpha must be a finite real number"),
        (dict(lora_alpha=float("inf")), TypeError, "lora_alpha must be a finite real number"),
        (dict(lora_dtype="float16"), TypeError, "lora_dtype must be a floating-point torch.dtype"),
        (dict(lora_dtype=torch.int8), TypeError, "lora_dtype must be a floating-point torch.dtype"),
        (dict(init_lora_weights="pissa"), ValueError, "init_lora_weights must be one of"),
    ],
)
def test_lora_linear_arguments_are_checked(kwargs, error, match):
    linear = nn.Linear(8, 4)
    before = _snapshot(linear)
    with pytest.raises(error, match=match):
        LoraLinear.from_linear(linear, r=2, **kwargs)
    with pytest.raises(error, match=match):
        LoraLinear(linear.weight, linear.bias, r=2, **kwargs)
    _assert_unchanged(linear, before)


@pytest.mark.parametrize("module", [nn.Embedding(10, 4), nn.Conv2d(2, 3, 1), nn.LayerNorm(4)])
def test_from_linear_refuses_modules_that_are_not_linear(module):
    before = _snapshot(module)
    with pytest.raises(TypeError, match=f"expected a linear layer.*got {type(module).__name__}"):
        LoraLinear.from_linear(module, r=2)
    _assert_unchanged(module, before)


def test_oversized_rank_is_refused_before_anything_is_allocated(tmp_path):
    save_file({}, tmp_path / "adapter_model.safetensors")
    model = _llama()
    before = _snapshot(model)
    config = fastlora.LoraConfig(r=5_000_000, target_modules=["q_proj"])
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"q_proj.*rank r=5000000, more than max\(in_features, out_features\) = 32"):
        fastlora.load_adapter(model, tmp_path / "adapter_model.safetensors", config=config, strict=False)
    assert time.perf_counter() - start < 1.0
    _assert_unchanged(model, before)
    assert not any(True for _ in lora_layers(model)) and not hasattr(model, "fastlora_config")
