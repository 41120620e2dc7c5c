"""``patch_peft``: PEFT models whose LoRA linear layers run fastlora's op, and stay PEFT models in every other way.

Tiny Llama and GPT-2 models with non-zero LoRA weights. Patched results are compared with the same PEFT model,
unpatched, run in fp64 (the oracle), with the tolerance table; where a layer must stay on PEFT's forward, the
patched result must equal unpatched PEFT exactly (the same code runs). A spy on the op proves which path ran.
"""

import copy
import json
import warnings

import pytest
import torch
from tolerances import assert_close
from torch import nn

import fastlora
from fastlora import peft_compat

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

HIDDEN = 64
IDS = torch.tensor([[1, 5, 9, 33, 2, 64, 100, 7], [3, 3, 80, 12, 127, 0, 44, 18]])
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
N_LLAMA_LAYERS = 2 * len(LLAMA_TARGETS)


def _llama() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=HIDDEN, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval()


def _lora_config(**overrides):
    kwargs = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LLAMA_TARGETS, init_lora_weights=False)
    return peft.LoraConfig(**{**kwargs, **overrides})


def _peft_llama(**overrides):
    """A PEFT Llama with random (non-zero) LoRA weights; the same weights on every call."""
    base = _llama()
    torch.manual_seed(1)
    return peft.get_peft_model(base, _lora_config(**overrides)).eval()  # get_peft_model leaves train mode on


def _add_second_adapter(model, **overrides) -> None:
    torch.manual_seed(2)
    model.add_adapter("second", _lora_config(**{"r": 4, "lora_alpha": 4, **overrides}))


def _patched_pair(unpatched):
    """``(patched, unpatched)``: a patched deep copy next to the original, with nothing warned."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        patched = fastlora.patch_peft(copy.deepcopy(unpatched))
    return patched, unpatched


def _lora_layer_names(model) -> set[str]:
    return {name for name, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}


@torch.no_grad()
def _logits(model, **kwargs) -> torch.Tensor:
    return model(IDS, **kwargs).logits


@torch.no_grad()
def _fp64_logits(unpatched) -> torch.Tensor:
    """The oracle: the unpatched PEFT model, run in fp64."""
    return copy.deepcopy(unpatched).double()(IDS).logits


def _assert_logits_close(actual: torch.Tensor, expected_fp64: torch.Tensor, name: str) -> None:
    assert_close(actual, expected_fp64, torch.float32, reduce_len=4 * HIDDEN, name=name)


@pytest.fixture
def fused_calls(monkeypatch) -> list[dict]:
    """Every call of ``fastlora.lora_linear`` made by patched layers, with the arguments that set its math."""
    calls = []
    real = peft_compat.lora_linear

    def spy(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training, **kwargs):
        calls.append(dict(scaling=scaling, dropout_p=dropout_p, training=training, **kwargs))
        return real(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training, **kwargs)

    monkeypatch.setattr(peft_compat, "lora_linear", spy)
    return calls


# ----------------------------------------------------------------------------------------------- the fast path


def test_logits_match_peft_through_fastlora(fused_calls):
    patched, unpatched = _patched_pair(_peft_llama())
    summary = patched.fastlora_patch_summary
    assert set(summary.patched) == _lora_layer_names(patched) and len(summary.patched) == N_LLAMA_LAYERS
    assert summary.skipped == {}
    expected = _fp64_logits(unpatched)
    _assert_logits_close(_logits(unpatched), expected, "unpatched PEFT")
    assert fused_calls == []
    _assert_logits_close(_logits(patched), expected, "patched")
    assert len(fused_calls) == N_LLAMA_LAYERS
    assert {(c["scaling"], c["dropout_p"], c["training"], c["fan_in_fan_out"]) for c in fused_calls} == {
        (2.0, 0.0, False, False)
    }


def test_dropout_and_training_mode_reach_fastlora(fused_calls):
    patched, unpatched = _patched_pair(_peft_llama(lora_dropout=0.25))
    _assert_logits_close(_logits(patched), _fp64_logits(unpatched), "eval, dropout off")
    assert {(c["dropout_p"], c["training"]) for c in fused_calls} == {(0.25, False)}
    fused_calls.clear()
    patched.train()
    loss = patched(IDS, labels=IDS).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert {(c["dropout_p"], c["training"]) for c in fused_calls} == {(0.25, True)}


def test_training_step_matches_peft(fused_calls):
    patched, unpatched = _patched_pair(_peft_llama())
    oracle = copy.deepcopy(unpatched).double()
    losses = []
    for model in (patched, oracle):
        model.train()
        loss = model(IDS, labels=IDS).loss
        loss.backward()
        losses.append(loss.detach())
    assert len(fused_calls) == N_LLAMA_LAYERS
    assert_close(losses[0], losses[1], torch.float32, reduce_len=4 * HIDDEN, name="loss")
    grads = {n: p.grad for n, p in patched.named_parameters() if p.requires_grad}
    expected = {n: p.grad for n, p in oracle.named_parameters() if p.requires_grad}
    assert grads.keys() == expected.keys()
    assert len(grads) == 2 * N_LLAMA_LAYERS and all("lora_A" in n or "lora_B" in n for n in grads)
    for name, grad in grads.items():
        assert_close(grad, expected[name], torch.float32, reduce_len=4 * HIDDEN, name=name)


def test_save_pretrained_unchanged_and_reload(tmp_path, fused_calls):
    patched, unpatched = _patched_pair(_peft_llama())
    unpatched.save_pretrained(tmp_path / "peft")
    patched.save_pretrained(tmp_path / "patched")
    files = sorted(p.name for p in (tmp_path / "peft").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "patched").iterdir())
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(files)
    name = "adapter_model.safetensors"
    assert (tmp_path / "patched" / name).read_bytes() == (tmp_path / "peft" / name).read_bytes(), name
    # PEFT writes target_modules from a Python set, whose order differs between two equal sets: compare as sets.
    configs = [json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("patched", "peft")]
    for c in configs:
        c["target_modules"] = sorted(c["target_modules"])
    assert configs[0] == configs[1]
    config = configs[0]
    assert config["r"] == 8 and config["peft_type"] == "LORA"

    reloaded = peft.PeftModel.from_pretrained(_llama(), tmp_path / "patched")
    fastlora.patch_peft(reloaded)
    _assert_logits_close(_logits(reloaded), _fp64_logits(unpatched), "reloaded and patched")
    assert len(fused_calls) == N_LLAMA_LAYERS


def test_disable_set_adapter_and_merge_match_peft(fused_calls):
    patched, unpatched = _patched_pair(_peft_llama())
    base_expected = _fp64_logits(_llama())
    default_expected = _fp64_logits(unpatched)

    with patched.disable_adapter():
        _assert_logits_close(_logits(patched), base_expected, "disable_adapter")
    assert fused_calls == []
    _assert_logits_close(_logits(patched), default_expected, "enabled again")
    assert len(fused_calls) == N_LLAMA_LAYERS

    # Added after patching, on fewer modules: the other layers have no active adapter and are the base layer alone.
    for model in (patched, unpatched):
        _add_second_adapter(model, target_modules=["q_proj", "v_proj"])
        model.set_adapter("second")
    fused_calls.clear()
    _assert_logits_close(_logits(patched), _fp64_logits(unpatched), "set_adapter('second')")
    assert len(fused_calls) == 2 * 2 and {c["scaling"] for c in fused_calls} == {1.0}

    for model in (patched, unpatched):
        model.set_adapter("default")
    fused_calls.clear()
    _assert_logits_close(_logits(patched), default_expected, "set_adapter('default')")
    assert len(fused_calls) == N_LLAMA_LAYERS

    fused_calls.clear()
    patched.merge_adapter()
    _assert_logits_close(_logits(patched), default_expected, "merge_adapter")
    assert fused_calls == []
    patched.unmerge_adapter()
    _assert_logits_close(_logits(patched), default_expected, "unmerge_adapter")
    assert len(fused_calls) == N_LLAMA_LAYERS

    merged = patched.merge_and_unload()
    assert not _lora_layer_names(merged)
    assert not any("forward" in vars(m) for m in merged.modules())
    _assert_logits_close(_logits(merged), default_expected, "merge_and_unload")
    _assert_logits_close(_logits(unpatched.merge_and_unload()), default_expected, "PEFT merge_and_unload")


def test_gpt2_conv1d_fan_in_fan_out(fused_calls):
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=HIDDEN, n_head=4, vocab_size=128, n_positions=64, bos_token_id=0, eos_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # the training step compares gradients
    )  # fmt: skip
    base = transformers.GPT2LMHeadModel(config).eval()
    torch.manual_seed(1)
    lora = peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, init_lora_weights=False
    )
    patched, unpatched = _patched_pair(peft.get_peft_model(base, lora).eval())
    assert len(patched.fastlora_patch_summary.patched) == 2 * 3  # c_attn, attn.c_proj, mlp.c_proj
    _assert_logits_close(_logits(patched), _fp64_logits(unpatched), "gpt2 logits")
    assert len(fused_calls) == 6 and all(c["fan_in_fan_out"] for c in fused_calls)

    oracle = copy.deepcopy(unpatched).double()
    for model in (patched, oracle):
        model.train()
        model(IDS, labels=IDS).loss.backward()
    expected = dict(oracle.named_parameters())
    for name, p in patched.named_parameters():
        if p.requires_grad:
            assert_close(p.grad, expected[name].grad, torch.float32, reduce_len=4 * HIDDEN, name=name)


def _fp64_layer(layer, x: torch.Tensor) -> torch.Tensor:
    """What a LoRA layer (no bias, adapter "default") computes, in fp64."""
    W, A, B = (t.detach().double() for t in (layer.base_layer.weight, layer.lora_A["default"].weight,
                                            layer.lora_B["default"].weight))  # fmt: skip
    return x.double() @ W.T + layer.scaling["default"] * (x.double() @ A.T) @ B.T


@torch.no_grad()
def test_dtypes(fused_calls):
    """A bf16 base with PEFT's fp32 adapter weights, and fp32 under autocast, run fastlora (the LoRA branch in fp32);
    fp64, which the Triton backend does not take, runs PEFT's forward."""
    x = torch.randn(2, 8, HIDDEN, generator=torch.Generator().manual_seed(3))
    model = peft.get_peft_model(_llama().to(torch.bfloat16), _lora_config()).eval()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.base_layer.weight.dtype == torch.bfloat16 and layer.lora_A["default"].weight.dtype == torch.float32
    fastlora.patch_peft(model)
    x_bf16 = x.to(torch.bfloat16)
    y = layer(x_bf16)
    assert y.dtype == torch.bfloat16 and len(fused_calls) == 1
    expected = _fp64_layer(layer, x_bf16)
    assert_close(y, expected, torch.bfloat16, reduce_len=HIDDEN, name="bf16 base, fp32 LoRA")
    assert_close(type(layer).forward(layer, x_bf16), expected, torch.bfloat16, HIDDEN, name="PEFT, bf16")

    model = peft.get_peft_model(_llama(), _lora_config()).eval()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    fastlora.patch_peft(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        assert y.dtype == type(layer).forward(layer, x).dtype == torch.bfloat16
    assert len(fused_calls) == 2
    assert_close(y, _fp64_layer(layer, x), torch.bfloat16, reduce_len=HIDDEN, name="fp32 under bf16 autocast")

    patched, unpatched = _patched_pair(_peft_llama())
    patched.double()
    unpatched.double()
    with pytest.warns(UserWarning, match="float64 is not among"):
        logits = _logits(patched)
    assert torch.equal(logits, _logits(unpatched))
    assert len(fused_calls) == 2
    assert sum(patched.fastlora_fallback_counts.values()) == N_LLAMA_LAYERS


# ----------------------------------------------------------------------------------------------- PEFT's path


UNSUPPORTED = {
    "dora": (dict(use_dora=True), "DoRA"),
    "lora_bias": (dict(lora_bias=True), "lora_bias=True"),
    "two_active": ({}, "2 active adapters"),
}


@pytest.mark.parametrize("case", list(UNSUPPORTED))
@pytest.mark.filterwarnings("ignore:`lora_bias=True` was passed")  # PEFT: the Llama projections have no bias to merge
def test_unsupported_adapters_stay_on_peft(case, fused_calls):
    overrides, reason = UNSUPPORTED[case]
    if case == "lora_bias" and "lora_bias" not in peft.LoraConfig.__dataclass_fields__:
        pytest.skip("this peft has no lora_bias option")
    unpatched = _peft_llama(**overrides)
    if case == "two_active":
        _add_second_adapter(unpatched)
        unpatched.base_model.set_adapter(["default", "second"])
    with pytest.warns(UserWarning, match=f"{N_LLAMA_LAYERS} of {N_LLAMA_LAYERS} LoRA layers run PEFT's forward"):
        patched, summary = fastlora.patch_peft(copy.deepcopy(unpatched), return_summary=True)
    assert summary.patched == ()
    assert summary.skipped.keys() == _lora_layer_names(patched)
    assert all(reason in why for why in summary.skipped.values()), summary.skipped
    assert patched.fastlora_patch_summary is summary

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned about when patching, not again per call
        assert torch.equal(_logits(patched), _logits(unpatched))
    assert fused_calls == []
    assert sum(patched.fastlora_fallback_counts.values()) == N_LLAMA_LAYERS


def test_call_time_fallbacks_are_counted_and_warned_once(fused_calls):
    patched, unpatched = _patched_pair(_peft_llama())
    for model in (patched, unpatched):
        _add_second_adapter(model)
        model.base_model.set_adapter(["default", "second"])
    with pytest.warns(UserWarning, match="2 active adapters"):
        assert torch.equal(_logits(patched), _logits(unpatched))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(_logits(patched), _logits(unpatched))
    assert fused_calls == []
    assert list(patched.fastlora_fallback_counts.values()) == [2 * N_LLAMA_LAYERS]

    for model in (patched, unpatched):
        model.set_adapter("default")
    names = ["second", "default"]
    with pytest.warns(UserWarning, match="mixed-adapter batch"):
        assert torch.equal(_logits(patched, adapter_names=names), _logits(unpatched, adapter_names=names))
    assert fused_calls == []
    _assert_logits_close(_logits(patched), _fp64_logits(unpatched), "single adapter again")
    assert len(fused_calls) == N_LLAMA_LAYERS


class _SubclassedLinear(nn.Linear):
    """A subclass may compute anything in its forward: not treated as nn.Linear."""


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(16, 8)
        self.lin = nn.Linear(8, 8)
        self.sub = _SubclassedLinear(8, 8)

    def forward(self, ids):
        return self.sub(self.lin(self.emb(ids)))


def test_non_linear_and_unknown_layers_are_skipped(fused_calls):
    torch.manual_seed(0)
    unpatched = peft.get_peft_model(_Toy(), peft.LoraConfig(r=2, target_modules=["emb", "lin", "sub"],
                                                            init_lora_weights=False)).eval()  # fmt: skip
    with pytest.warns(UserWarning, match="2 of 3 LoRA layers"):
        patched, summary = fastlora.patch_peft(copy.deepcopy(unpatched), return_summary=True)
    assert summary.patched == ("base_model.model.lin",)
    assert summary.skipped.keys() == {"base_model.model.emb", "base_model.model.sub"}
    assert "Embedding is not PEFT's lora.Linear" in summary.skipped["base_model.model.emb"]
    assert "_SubclassedLinear, not exactly nn.Linear" in summary.skipped["base_model.model.sub"]
    assert "forward" not in vars(patched.base_model.model.emb) and "forward" not in vars(patched.base_model.model.sub)
    ids = torch.tensor([[1, 2, 3], [4, 5, 15]])
    with torch.no_grad():
        expected = copy.deepcopy(unpatched).double()(ids)
        assert_close(patched(ids), expected, torch.float32, reduce_len=8, name="toy")
    assert len(fused_calls) == 1


# ----------------------------------------------------------------------------------------------- patch / unpatch


def test_patch_twice_is_a_no_op_and_unpatch_restores(fused_calls):
    patched, unpatched = _patched_pair(_peft_llama())
    layers = [m for m in patched.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    forwards = [vars(m)["forward"] for m in layers]
    first = patched.fastlora_patch_summary
    again, summary = fastlora.patch_peft(patched, return_summary=True)
    assert again is patched and summary == first
    assert [vars(m)["forward"] for m in layers] == forwards
    _logits(patched)
    assert len(fused_calls) == N_LLAMA_LAYERS

    copied = copy.deepcopy(patched)
    copied_layers = [m for m in copied.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    assert all(vars(m)["forward"].__self__ is m for m in copied_layers)

    assert fastlora.unpatch_peft(patched) is patched
    for layer in layers:
        assert "forward" not in vars(layer) and "_fastlora_call_log" not in vars(layer)
        assert layer.forward.__func__ is type(layer).forward
    assert not any(hasattr(patched, a) for a in ("fastlora_patch_summary", "fastlora_fallback_counts"))
    fused_calls.clear()
    assert torch.equal(_logits(patched), _logits(unpatched))
    assert fused_calls == []
    assert fastlora.unpatch_peft(patched) is patched  # not patched: nothing to do

    _logits(copied)  # the copy is patched on its own
    assert len(fused_calls) == N_LLAMA_LAYERS


def test_bad_input_raises():
    with pytest.raises(TypeError, match="expected a peft.PeftModel"):
        fastlora.patch_peft("model")
    with pytest.raises(TypeError, match="expected a peft.PeftModel"):
        fastlora.unpatch_peft(42)
    with pytest.raises(ValueError, match="has no PEFT LoRA layers"):
        fastlora.patch_peft(nn.Linear(4, 4))
    ia3 = peft.get_peft_model(_llama(), peft.IA3Config(target_modules=["k_proj", "down_proj"],
                                                       feedforward_modules=["down_proj"]))  # fmt: skip
    with pytest.raises(ValueError, match="PeftModel has no PEFT LoRA layers"):
        fastlora.patch_peft(ia3)


def test_torch_compile_traces_without_graph_breaks(fused_calls):
    patched, unpatched = _patched_pair(_peft_llama())
    compiled = torch.compile(patched, backend="eager", fullgraph=True)
    _assert_logits_close(_logits(compiled), _fp64_logits(unpatched), "compiled")
    assert fused_calls  # traced through the patched forward
