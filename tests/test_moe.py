"""LoRA on mixture-of-experts models (``target_parameters``), against PEFT 0.21 on tiny Mixtral, Qwen2-MoE, Qwen3-MoE
and GPT-OSS (transposed expert weights with biases): logits, loss and every LoRA gradient; adapters loaded both ways;
``patch_peft`` on PEFT's ``ParamWrapper`` layers; merge, unload and disable; dropout on our path; errors."""

import copy
import warnings

import pytest
import torch
import transformers
from safetensors.torch import load_file

import fastlora
from fastlora import kernels
from fastlora.io import peft_keys
from fastlora.layers import LoraExperts, LoraLinear, LoraParameter

peft = pytest.importorskip("peft")

COMMON = dict(hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=64, head_dim=8)  # fmt: skip
ARCHS = {
    "mixtral": (transformers.MixtralConfig, dict(num_local_experts=4, num_experts_per_tok=2), "mlp.gate.weight"),
    "qwen2_moe": (
        transformers.Qwen2MoeConfig,
        dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=24),
        "mlp.gate.weight",
    ),
    "qwen3_moe": (
        transformers.Qwen3MoeConfig,
        dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16),
        "mlp.gate.weight",
    ),
    "gpt_oss": (
        transformers.GptOssConfig,
        dict(num_local_experts=4, num_experts_per_tok=2, layer_types=["full_attention"] * 2),
        "mlp.router.weight",
    ),
}


def tiny_moe(arch: str) -> transformers.PreTrainedModel:
    cls, extra, _ = ARCHS[arch]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cls(**COMMON, **extra)).float()
    with torch.no_grad():  # GPT-OSS initialises its expert weights to zero; every weight gets values here
        for name, param in model.named_parameters():
            if "experts" in name or "router" in name or name.endswith("mlp.gate.weight"):
                param.normal_(0.0, 0.2)
    return model.eval()


def peft_config(arch: str, **overrides) -> dict:
    kw = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
              target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj", ARCHS[arch][2]])  # fmt: skip
    return {**kw, **overrides}


def lora_grads_in_peft_layout(model) -> dict[str, torch.Tensor]:
    """Every LoRA gradient of a fastlora model under PEFT's saved key (``base_model.model.`` stripped)."""
    grads = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraExperts):
            for p, key in peft_keys(name, list(module.lora)).items():
                adapter = module.lora[p]
                E, r, k = adapter.lora_A.shape
                grads[f"{key}.lora_A.weight"] = adapter.lora_A.grad.reshape(E * r, k)
                grads[f"{key}.lora_B.weight"] = adapter.lora_B.grad.permute(1, 2, 0).reshape(-1, r * E)
        elif isinstance(module, (LoraLinear, LoraParameter)):
            grads[f"{name}.lora_A.weight"] = module.lora_A.grad
            grads[f"{name}.lora_B.weight"] = module.lora_B.grad
    return grads


def peft_grads(peft_model) -> dict[str, torch.Tensor]:
    return {
        n.removeprefix("base_model.model.").replace(".default", ""): p.grad
        for n, p in peft_model.named_parameters()
        if p.requires_grad
    }


def assert_grads_equal(expected: dict, actual: dict, rel: float = 1e-5):
    assert set(expected) == set(actual)
    for key, g in expected.items():
        scale = g.abs().max().item() or 1.0
        assert (actual[key] - g).abs().max().item() <= rel * scale, key


@pytest.mark.parametrize("arch", list(ARCHS))
def test_matches_peft_both_ways(arch, tmp_path, device):
    """A PEFT adapter loads into fastlora with PEFT's logits, loss and LoRA gradients (the grouped kernels on the
    Triton backend); fastlora's saved adapter has PEFT's keys and values and PEFT loads it with the same logits."""
    base = tiny_moe(arch)
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **peft_config(arch)))
    peft_model.save_pretrained(tmp_path / "peft")
    model = fastlora.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    experts = [m for m in model.modules() if isinstance(m, LoraExperts)]
    assert len(experts) == 2 and all(set(m.lora) == {"gate_up_proj", "down_proj"} for m in experts)
    assert sum(isinstance(m, LoraParameter) for m in model.modules()) == 2

    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    expected, actual = peft_model(input_ids=ids, labels=ids), model(input_ids=ids, labels=ids)
    torch.testing.assert_close(actual.logits, expected.logits, rtol=0, atol=2e-6)
    torch.testing.assert_close(actual.loss, expected.loss, rtol=1e-6, atol=0)
    expected.loss.backward()
    actual.loss.backward()
    assert_grads_equal(peft_grads(peft_model), lora_grads_in_peft_layout(model))
    assert fastlora.print_trainable_parameters(model) == tuple(peft_model.get_nb_trainable_parameters())

    fastlora.save_adapter(model, tmp_path / "ours")
    ours, theirs = (
        load_file(tmp_path / "ours/adapter_model.safetensors"),
        load_file(tmp_path / "peft/adapter_model.safetensors"),
    )
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in theirs)
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(reloaded(input_ids=ids).logits, expected.logits, rtol=0, atol=2e-6)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_merge_unload_disable(arch, tmp_path, device):
    """``merge_and_unload`` gives PEFT's merged model (the model's own expert modules back, with ``W + ΔW``);
    ``disable_adapters`` computes the base model; ``unload`` gives the base weights back exactly."""
    base = tiny_moe(arch)
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **peft_config(arch)))
    peft_model.save_pretrained(tmp_path)
    model = fastlora.load_adapter(copy.deepcopy(base), tmp_path)
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with fastlora.disable_adapters(model):
            torch.testing.assert_close(model(input_ids=ids).logits, base(input_ids=ids).logits, rtol=0, atol=0)
        merged = fastlora.merge_and_unload(copy.deepcopy(model))
        assert type(merged.model.layers[0].mlp.experts) is type(base.model.layers[0].mlp.experts)
        assert not any(isinstance(m, (LoraExperts, LoraParameter, LoraLinear)) for m in merged.modules())
        reference = peft_model.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=0, atol=1e-6)
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted, rtol=0, atol=1e-5)
        unloaded = fastlora.unload(model)
        assert set(unloaded.state_dict()) == set(base.state_dict())
        assert all(torch.equal(v, base.state_dict()[k]) for k, v in unloaded.state_dict().items())


@pytest.mark.parametrize("arch", list(ARCHS))
def test_patch_peft_runs_the_grouped_kernels(arch, device):
    """``patch_peft`` computes PEFT's expert ``ParamWrapper`` chains with fastlora's grouped op: same logits and
    gradients as PEFT's forward, kernels launched, routers left to PEFT's forward (named in the summary)."""
    model = peft.get_peft_model(tiny_moe(arch), peft.LoraConfig(init_lora_weights=False, **peft_config(arch)))
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(3))
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    expected = {k: g.clone() for k, g in peft_grads(model).items()}
    model.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, summary = fastlora.patch_peft(model, return_summary=True)
    experts = [n for n in summary.patched if n.endswith("mlp.experts")]
    assert len(experts) == 2 and all(f"{n}.base_layer" in summary.patched for n in experts)
    assert all("router" in reason for name, reason in summary.skipped.items())
    with kernels.recording_launches() as launches:
        patched = model(input_ids=ids, labels=ids)
    assert sum(launch.kernel == "grouped_expand" for launch in launches) == 4
    torch.testing.assert_close(patched.logits, out.logits, rtol=0, atol=2e-6)
    patched.loss.backward()
    assert_grads_equal(expected, peft_grads(model))
    fastlora.unpatch_peft(model)


def test_all_linear_adapts_experts_and_router_as_peft_does(device):
    """``all-linear`` on Mixtral adapts attention, the experts and the router, as PEFT does under transformers v5
    (the same trainable count), and the saved config is PEFT's."""
    base = tiny_moe("mixtral")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules="all-linear"))
    model = fastlora.apply_lora(copy.deepcopy(base), fastlora.LoraConfig(r=2, target_modules="all-linear"))
    assert fastlora.print_trainable_parameters(model) == tuple(peft_model.get_nb_trainable_parameters())
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, LoraExperts) and experts.lora["gate_up_proj"].r == 4  # the fused pair: 2·r
    assert isinstance(model.model.layers[0].mlp.gate, LoraParameter)


def test_dropout_on_experts(device):
    """Dropout works on fastlora's path (PEFT refuses it): in training the output depends on the seed and the
    gradients flow; in eval it is the plain LoRA output."""
    model = fastlora.apply_lora(
        tiny_moe("qwen3_moe"),
        fastlora.LoraConfig(r=4, lora_dropout=0.3, init_lora_weights=False, target_modules=[],
                            target_parameters=["gate_up_proj", "down_proj"]),
    )  # fmt: skip
    ids = torch.randint(0, 64, (1, 4), generator=torch.Generator().manual_seed(4))
    model.eval()
    with torch.no_grad():
        eval_logits = model(input_ids=ids).logits
    model.train()
    torch.manual_seed(1)
    first = model(input_ids=ids, labels=ids)
    torch.manual_seed(1)
    again = model(input_ids=ids).logits
    torch.manual_seed(2)
    other = model(input_ids=ids).logits
    assert torch.equal(first.logits, again) and not torch.allclose(first.logits, other)
    assert not torch.allclose(first.logits, eval_logits)
    first.loss.backward()
    adapter = model.model.layers[0].mlp.experts.lora["down_proj"]
    assert adapter.lora_A.grad.abs().sum() > 0 and adapter.lora_B.grad.abs().sum() > 0


def test_errors_name_the_problem(device):
    model = tiny_moe("mixtral")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="lora_dropout=0.1 cannot apply to LoRA on a parameter"):
        fastlora.apply_lora(model, fastlora.LoraConfig(r=2, lora_dropout=0.1, target_modules=[],
                                                       target_parameters=["mlp.gate.weight"]))  # fmt: skip
    with pytest.raises(ValueError, match="matched no parameter"):
        fastlora.apply_lora(model, fastlora.LoraConfig(r=2, target_modules=[], target_parameters=["nope"]))
    with pytest.raises(ValueError, match="only 2-D and 3-D parameters"):
        fastlora.apply_lora(model, fastlora.LoraConfig(r=2, target_modules=[], target_parameters=["norm.weight"]))
    with pytest.raises(ValueError, match="more than max"):
        fastlora.apply_lora(model, fastlora.LoraConfig(r=64, target_modules=[], target_parameters=["down_proj"]))
    assert not any(isinstance(m, (LoraExperts, LoraParameter)) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


def test_unsupported_experts_are_refused_by_name(device):
    """A 3-D parameter of a module fastlora cannot compute (not one of transformers' fused-experts modules), and
    experts split across devices, raise ``NotImplementedError`` naming them; the model is left as it was."""

    class Custom(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.Parameter(torch.zeros(4, 8, 8))

    model = torch.nn.Sequential(Custom())
    with pytest.raises(NotImplementedError, match="Custom, not one of transformers' fused-experts modules"):
        fastlora.apply_lora(model, fastlora.LoraConfig(r=2, target_modules=[], target_parameters=["blocks"]))
    assert model[0].blocks.requires_grad
    moe = tiny_moe("qwen3_moe")
    moe.model.layers[1].mlp.experts._is_expert_parallel = True
    with pytest.raises(NotImplementedError, match="'model.layers.1.mlp.experts' are split across devices"):
        fastlora.apply_lora(moe, fastlora.LoraConfig(r=2, target_modules=[], target_parameters=["down_proj"]))
    assert not any(isinstance(m, LoraExperts) for m in moe.modules())


def test_moves_with_the_model(device):
    """``.to()`` moves the adapted experts' base weights, which the wrapped module computes with."""
    model = fastlora.apply_lora(
        tiny_moe("mixtral"), fastlora.LoraConfig(r=2, target_modules=[], target_parameters=["down_proj"])
    )
    model.to(torch.float64)
    experts = model.model.layers[0].mlp.experts
    assert experts.base_module.down_proj.dtype == torch.float64 and experts.down_proj is experts.base_module.down_proj


def test_review_regressions(tmp_path, device):
    """Zero tokens; adapters saved in registration order whatever order they were given; merge_and_reinit commits
    expert and router adapters; bias other than 'none' with target_parameters refused by name; a target_modules name
    shared with an expert projection (Qwen2-MoE's shared expert) saves and loads."""
    base = tiny_moe("qwen3_moe")
    experts = copy.deepcopy(base.model.layers[0].mlp.experts)
    layer = LoraExperts(experts, {"down_proj": (4, 8.0), "gate_up_proj": (2, 4.0)}, init_lora_weights=False)
    assert list(layer.lora) == ["gate_up_proj", "down_proj"]
    empty = layer(torch.zeros(0, 32), torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2))
    assert empty.shape == (0, 32)

    model = fastlora.apply_lora(copy.deepcopy(base), fastlora.LoraConfig(**peft_config("qwen3_moe")))
    assert fastlora.merge_and_reinit(model) == 8  # q, v, experts and router of both layers
    adapter = model.model.layers[0].mlp.experts.lora["down_proj"]
    assert not adapter.lora_B.any() and model.model.layers[0].mlp.experts.merged is False

    with pytest.raises(NotImplementedError, match="bias='all' with target_parameters"):
        fastlora.LoraConfig(r=2, target_modules=["q_proj"], target_parameters=["down_proj"], bias="all")

    qwen2 = tiny_moe("qwen2_moe")
    config = fastlora.LoraConfig(r=2, target_modules=["down_proj"], target_parameters=["mlp.experts.down_proj"])
    adapted = fastlora.apply_lora(copy.deepcopy(qwen2), config)
    fastlora.save_adapter(adapted, tmp_path)
    fastlora.load_adapter(adapted, tmp_path)
    assert isinstance(adapted.model.layers[0].mlp.shared_expert.down_proj, LoraLinear)
