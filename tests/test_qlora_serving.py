"""``MultiLoraModel`` over a 4-bit base model (QLoRA serving): rows of one batch use different adapters, or none, over
NF4 linear layers (fastlora's ``Nf4Linear``, and bitsandbytes' ``Linear4bit`` when bitsandbytes is installed), and
each row must equal that row run alone through a QLoRA model holding its adapter. The multi-adapter kernels read the
4-bit weight (the interpreter on CPU)."""

import copy

import pytest
import torch
from serving_helpers import assert_logits_close, random_adapter
from tiny_models import tiny_llama

import fastlora
from fastlora import kernels
from fastlora.serving import MultiLoraLinear4bit, MultiLoraModel

TARGETS = ["q_proj", "v_proj", "down_proj"]
IDS = torch.tensor([[1, 5, 9, 33, 2, 64], [3, 3, 80, 12, 127, 0], [7, 100, 7, 44, 18, 2]])


def nf4_llama():
    return fastlora.quantize_nf4(tiny_llama(), blocksize=64, double_quant=True)


def bnb_llama():
    """The tiny Llama with every decoder linear layer a bitsandbytes ``Linear4bit`` (NF4, double quant, fp32 compute).
    Block size 32 divides every layer's K (64 and 96): bitsandbytes' own CPU kernel, the reference of the base-only
    row, reads absmax per row and is wrong when it does not (``fastlora.nf4``'s known limits)."""
    bnb = pytest.importorskip("bitsandbytes")
    model = tiny_llama()
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            layer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                      compute_dtype=torch.float32, quant_type="nf4")  # fmt: skip
            layer.weight = bnb.nn.Params4bit(module.weight.data.clone(), requires_grad=False, blocksize=32,
                                             compress_statistics=True, quant_type="nf4")  # fmt: skip
            model.set_submodule(name, layer.to("cpu"))  # quantized on the move
    return model.train()  # bitsandbytes repacks a CPU weight on its first eval forward without grad


@pytest.mark.parametrize("build", [nf4_llama, bnb_llama])
def test_mixed_adapters_over_4bit_base_match_each_row_alone(build, tmp_path, device):
    base = build()
    adapters = {
        "a": random_adapter(tmp_path / "a", lambda: copy.deepcopy(base), 1, r=4, lora_alpha=8, target_modules=TARGETS),
        "b": random_adapter(
            tmp_path / "b", lambda: copy.deepcopy(base), 2, r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"]
        ),  # fmt: skip
    }
    served = MultiLoraModel(copy.deepcopy(base), target_modules=TARGETS, max_adapters=2, max_rank=8)
    layers = [m for m in served.model.modules() if isinstance(m, MultiLoraLinear4bit)]
    assert len(layers) == 3 * 2
    for name, path in adapters.items():
        served.load_adapter(name, path)
    rows = ["a", None, "b"]
    with torch.no_grad(), kernels.recording_launches() as launches:
        logits = served(IDS, adapter_names=rows).logits
    assert any(launch.kernel.startswith("multi_lora") for launch in launches)
    for i, name in enumerate(rows):
        alone = copy.deepcopy(base)
        if name is not None:
            alone = fastlora.load_adapter(alone, adapters[name])
        with torch.no_grad():
            expected = alone(IDS[i : i + 1]).logits
        assert_logits_close(logits[i : i + 1], expected.double(), f"row {i} ({name})")
    # Decode steps (one token per row) take the fused kernel over the 4-bit weight.
    with torch.no_grad():
        out = served.generate(IDS, adapter_names=rows, max_new_tokens=2, do_sample=False)
    assert out.shape == (3, IDS.shape[1] + 2)
    restored = served.unwrap()
    assert not any(isinstance(m, MultiLoraLinear4bit) for m in restored.modules())
    assert type(restored.model.layers[0].self_attn.q_proj) is type(base.model.layers[0].self_attn.q_proj)
