"""``MultiLoraModel`` over mixture-of-experts models: rows of one batch use different adapters (expert and router
LoRA of different ranks and targets, or none) while their tokens are routed to experts; each row must equal that row
run alone through PEFT with its adapter. Loading errors name the problem and change nothing."""

import copy
import warnings

import pytest
import torch
from test_moe import ARCHS, tiny_moe

from fastlora import kernels
from fastlora.serving import MultiLoraModel
from fastlora.serving.experts import MultiLoraExperts, MultiLoraParameter

peft = pytest.importorskip("peft")


def saved_adapters(arch: str, base, tmp_path) -> dict[str, tuple[str, object]]:
    """Three PEFT adapters of different ranks and targets (all experts and the router; ``down_proj`` alone; the router
    and ``gate_up_proj``), saved; ``{name: (directory, the PEFT model)}``."""
    router = ARCHS[arch][2]
    specs = {
        "all": (["mlp.experts.gate_up_proj", "mlp.experts.down_proj", router], 4),
        "down": (["mlp.experts.down_proj"], 2),
        "router+up": ([router, "mlp.experts.gate_up_proj"], 8),
    }
    out = {}
    for i, (name, (targets, r)) in enumerate(specs.items()):
        torch.manual_seed(10 + i)
        config = peft.LoraConfig(r=r, lora_alpha=2 * r, init_lora_weights=False, target_modules=["q_proj"],
                                 target_parameters=targets)  # fmt: skip
        model = peft.get_peft_model(copy.deepcopy(base), config).eval()
        model.save_pretrained(tmp_path / name)
        out[name] = (tmp_path / name, model)
    return out


def serving_model(arch: str, base, max_adapters: int = 4) -> MultiLoraModel:
    router_param = ARCHS[arch][2].split(".", 1)[1]  # "gate.weight" / "router.weight"
    return MultiLoraModel(
        copy.deepcopy(base), target_modules=["q_proj"], max_adapters=max_adapters, max_rank=8,
        target_parameters=["gate_up_proj", "down_proj", router_param],
    )  # fmt: skip


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "gpt_oss"])
def test_mixed_adapters_match_peft_row_by_row(arch, tmp_path, device):
    base = tiny_moe(arch)
    adapters = saved_adapters(arch, base, tmp_path)
    model = serving_model(arch, base)
    assert not model.cuda_graphs  # MoE layers run their decode steps eagerly
    for name, (path, _) in adapters.items():
        model.load_adapter(name, path)
    experts = model.model.model.layers[0].mlp.experts
    assert isinstance(experts, MultiLoraExperts)
    ids = torch.randint(0, 64, (5, 6), generator=torch.Generator().manual_seed(5))
    names = ["all", None, "router+up", "down", "all"]
    with kernels.recording_launches() as launches:
        logits = model(ids, adapter_names=names).logits
    assert any(launch.kernel == "grouped_expand" for launch in launches)
    with torch.no_grad():
        for i, name in enumerate(names):
            reference = (adapters[name][1] if name else base)(input_ids=ids[i : i + 1]).logits[0]
            torch.testing.assert_close(logits[i], reference, rtol=0, atol=3e-6, msg=f"row {i} ({name})")
    unwrapped = model.unwrap()
    assert type(unwrapped.model.layers[0].mlp.experts) is type(base.model.layers[0].mlp.experts)
    assert not any(isinstance(m, (MultiLoraExperts, MultiLoraParameter)) for m in unwrapped.modules())


def test_generate_with_mixed_adapters(tmp_path, device):
    """Greedy generation with a different adapter per row gives each row's tokens as PEFT generates them alone."""
    base = tiny_moe("qwen3_moe")
    adapters = saved_adapters("qwen3_moe", base, tmp_path)
    model = serving_model("qwen3_moe", base)
    for name, (path, _) in adapters.items():
        model.load_adapter(name, path)
    ids = torch.randint(0, 64, (3, 4), generator=torch.Generator().manual_seed(6))
    names = ["down", "router+up", None]
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tokens = model.generate(ids, adapter_names=names, **kw)
        for i, name in enumerate(names):
            reference = (adapters[name][1] if name else base).generate(input_ids=ids[i : i + 1], **kw)
            assert torch.equal(tokens[i], reference[0]), (i, name)


def test_loading_errors_change_nothing(tmp_path, device):
    base = tiny_moe("mixtral")
    adapters = saved_adapters("mixtral", base, tmp_path)
    model = MultiLoraModel(copy.deepcopy(base), target_modules=["q_proj"], target_parameters=["down_proj"],
                           max_adapters=2, max_rank=8)  # fmt: skip
    with pytest.raises(ValueError, match="not adapted by this pool|select modules this pool does not adapt"):
        model.load_adapter("all", adapters["all"][0])
    model.load_adapter("down", adapters["down"][0])
    small = MultiLoraModel(copy.deepcopy(base), target_modules=["q_proj"],
                           target_parameters=["gate_up_proj", "gate.weight"], max_adapters=2, max_rank=4)  # fmt: skip
    with pytest.raises(ValueError, match="over the pool's max_rank=4"):
        small.load_adapter("router+up", adapters["router+up"][0])
    assert model.adapters == ["down"] and small.adapters == []


def test_router_computed_on_a_cast_weight(tmp_path, device):
    """DeepSeek-V3's router computes ``F.linear(x.float(), weight.float())``: on a bf16 model the weight it multiplies
    is a cast, which the router layer still finds; rows with the adapter change, rows without stay the base model's."""
    import transformers

    import fastlora

    config = transformers.DeepseekV3Config(
        hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=64, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
        first_k_dense_replace=0, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4,
        v_head_dim=8, n_shared_experts=1,
    )  # fmt: skip
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16).eval()
    adapted = fastlora.apply_lora(
        copy.deepcopy(base),
        fastlora.LoraConfig(r=4, init_lora_weights=False, target_modules=[], target_parameters=["gate.weight"]),
    )
    fastlora.save_adapter(adapted, tmp_path)
    server = MultiLoraModel(copy.deepcopy(base), target_modules="all-linear", max_adapters=2, max_rank=8)
    assert "gate.weight" in server.target_parameters
    server.load_adapter("router", tmp_path)
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(8))
    logits = server(ids, adapter_names=["router", None]).logits
    with torch.no_grad():
        expected = base(input_ids=ids).logits
    torch.testing.assert_close(logits[1], expected[1], rtol=0, atol=2e-2)
    assert not torch.allclose(logits[0], expected[0], atol=2e-2)
