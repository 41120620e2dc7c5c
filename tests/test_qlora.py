"""QLoRA: LoRA over a 4-bit (NF4 / FP4) base weight, against PEFT's QLoRA over bitsandbytes' ``Linear4bit``.

A tiny Llama is quantized by bitsandbytes on CPU (as ``from_pretrained(..., load_in_4bit=True)`` builds it, and once
through ``from_pretrained`` itself), then given the same non-zero LoRA weights by PEFT and by fastlora. PEFT is the
oracle: logits, loss and every LoRA gradient are held to the tolerance table (PEFT's fp32 result as the reference),
merges to PEFT's bytes. fastlora's own 4-bit layer (``quantize_nf4``) is held to bitsandbytes' quantizer, byte for
byte, and to the bitsandbytes model's results exactly. Layer forwards run the Triton kernels through the interpreter.

The tiny Llama's intermediate size is 128, a multiple of the block size: bitsandbytes' CPU ``dequantize_4bit`` reads
the block scales per row when K is a multiple of 16, which is wrong when a block spans rows (``fastlora.nf4``'s known
limits), so PEFT itself would be off on such a layer.
"""

import copy
import functools
import os
import subprocess
import sys
import textwrap
import warnings
from collections import Counter

import pytest
import torch
from tolerances import assert_close
from torch import nn

import fastlora
from fastlora import kernels, nf4

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

HIDDEN = 64
IDS = torch.tensor([[1, 5, 9, 33, 2, 64, 100, 7], [3, 3, 80, 12, 127, 0, 44, 18]])
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MERGE_WARNING = "Merge lora module to 4-bit linear may get different generations due to rounding errors."
UNMERGE_WARNING = "Unmerge lora module to 4-bit linear may get different generations due to rounding errors."
# Logits and gradients pass through a few layers of 64- and 128-long reductions.
REDUCE = 4 * HIDDEN
# (quant_type, compute dtype, double quantization): the usual QLoRA setting, its bf16 compute, and plain FP4.
QUANTS = [
    pytest.param("nf4", torch.float32, True, {}, id="nf4-fp32-dq"),
    pytest.param("nf4", torch.bfloat16, True, {}, id="nf4-bf16-dq"),
    pytest.param("fp4", torch.float32, False, {"bias": "lora_only"}, id="fp4-fp32-bias"),
]


def _llama(num_hidden_layers: int = 2, dtype: torch.dtype = torch.float32) -> transformers.LlamaForCausalLM:
    """Biased attention projections (as Qwen2's), so the 4-bit layers' bias is exercised too."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=num_hidden_layers,
        num_attention_heads=4, num_key_value_heads=2, attention_bias=True,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).to(dtype).eval()


def _bnb_quantize(model: nn.Module, quant_type: str = "nf4", compute_dtype=torch.float32, double_quant=True):
    """Every ``nn.Linear`` but the output head as a bitsandbytes ``Linear4bit`` quantized by bitsandbytes on CPU, what
    ``from_pretrained(..., load_in_4bit=True)`` builds; flagged ``is_loaded_in_4bit`` as transformers flags it, which
    is what makes PEFT build its QLoRA layers."""
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or name.endswith("lm_head"):
            continue
        layer = bnb.nn.Linear4bit(
            module.in_features, module.out_features, bias=module.bias is not None, compute_dtype=compute_dtype,
            compress_statistics=double_quant, quant_type=quant_type,
        )  # fmt: skip
        layer.weight = bnb.nn.Params4bit(
            module.weight.data.clone(), requires_grad=False, compress_statistics=double_quant, quant_type=quant_type,
            module=layer,
        )  # fmt: skip
        if module.bias is not None:
            layer.bias = nn.Parameter(module.bias.data.clone())
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.to("cpu"))
    model.is_loaded_in_4bit = True
    return model.eval()


@functools.cache
def _base(
    quant_type: str = "nf4", compute_dtype=torch.float32, double_quant=True, layers: int = 2, dtype=torch.float32
):
    return _bnb_quantize(_llama(layers, dtype), quant_type, compute_dtype, double_quant)


def base(*args, **kwargs) -> nn.Module:
    """A fresh copy of a cached bitsandbytes-quantized tiny Llama."""
    return copy.deepcopy(_base(*args, **kwargs))


def _lora_config(**overrides) -> dict:
    return {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": TARGETS, **overrides}


def _peft_model(model: nn.Module, **overrides) -> nn.Module:
    """PEFT's QLoRA model with random, non-zero LoRA weights (the same on every call)."""
    torch.manual_seed(1)
    return peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, **_lora_config(**overrides)))


def _peft_lora(peft_model: nn.Module) -> dict[str, nn.Parameter]:
    """PEFT's LoRA parameters under fastlora's names (``<module>.lora_A``)."""
    out = {}
    for name, param in peft_model.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            module, _, rest = name.removeprefix("base_model.model.").partition(".lora_")
            out[f"{module}.lora_{rest.split('.')[0]}"] = param
    return out


def _pair(model: nn.Module, **overrides) -> tuple[nn.Module, nn.Module]:
    """``(peft_model, ours)`` on copies of ``model``, with the same LoRA weights."""
    peft_model = _peft_model(copy.deepcopy(model), **overrides)
    ours = fastlora.apply_lora(copy.deepcopy(model), fastlora.LoraConfig(**_lora_config(**overrides)))
    with torch.no_grad():
        for name, param in _peft_lora(peft_model).items():
            ours.get_parameter(name).copy_(param)
    return peft_model, ours


def _lora_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """The gradients of the LoRA weights and of the trained biases, under fastlora's names."""
    if isinstance(model, peft.PeftModel):
        grads = {name: p.grad for name, p in _peft_lora(model).items()}
        for name, p in model.named_parameters():
            if name.endswith(".bias") and p.requires_grad:
                grads[name.removeprefix("base_model.model.").replace(".base_layer.", ".")] = p.grad
        return grads
    return {
        name: p.grad
        for name, p in model.named_parameters()
        if name.endswith((".lora_A", ".lora_B")) or (name.endswith(".bias") and p.requires_grad)
    }


def _step(model: nn.Module):
    """Logits and loss of one training forward, after its backward."""
    model.zero_grad()
    out = model(IDS, labels=IDS)
    out.loss.backward()
    return out.logits.detach(), out.loss.detach()


def _assert_like_peft(ours: nn.Module, peft_model: nn.Module, dtype: torch.dtype) -> None:
    """Logits, loss and every LoRA gradient of ``ours`` against PEFT's, with the tolerance table of ``dtype``."""
    expected_logits, expected_loss = _step(peft_model)
    logits, loss = _step(ours)
    assert_close(logits, expected_logits, dtype, REDUCE, name="logits")
    assert_close(loss, expected_loss, dtype, REDUCE, name="loss")
    expected, actual = _lora_grads(peft_model), _lora_grads(ours)
    assert actual.keys() == expected.keys() and len(actual) >= 2 * 2 * len(TARGETS)
    for name, grad in expected.items():
        assert_close(actual[name], grad, dtype, REDUCE, name=name)


def _bnb_tensors(weight) -> dict[str, torch.Tensor]:
    """Every tensor of a bitsandbytes 4-bit weight, for byte comparisons."""
    state = weight.quant_state
    tensors = {"data": weight.data.view(torch.uint8), "absmax": state.absmax, "code": state.code}
    if state.nested:
        tensors.update(nested_absmax=state.state2.absmax, nested_code=state.state2.code, offset=state.offset)
    return tensors


def _assert_same_bytes(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], where: str) -> None:
    assert actual.keys() == expected.keys(), where
    for key, tensor in expected.items():
        assert actual[key].dtype == tensor.dtype and torch.equal(actual[key].reshape(-1), tensor.reshape(-1)), (
            f"{where}: {key} differs"
        )


# ------------------------------------------------------------------------------------------------ PEFT parity


@pytest.mark.parametrize("quant_type, compute_dtype, double_quant, config", QUANTS)
def test_training_step_matches_peft(quant_type, compute_dtype, double_quant, config):
    peft_model, ours = _pair(base(quant_type, compute_dtype, double_quant), **config)
    assert all(isinstance(m, fastlora.LoraLinear4bit) for n, m in ours.named_modules() if n.endswith(tuple(TARGETS)))
    peft_model.train(), ours.train()
    _assert_like_peft(ours, peft_model, compute_dtype)


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_from_pretrained_with_bitsandbytes_config(tmp_path, compute_dtype):
    """transformers' own 4-bit loading works on CPU with bitsandbytes; ``apply_lora`` takes the model as it comes."""
    _llama().save_pretrained(tmp_path)
    quantization = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=quantization, device_map="cpu"
    )
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit) and q_proj.weight.quant_state.nested
    assert model.is_loaded_in_4bit
    peft_model, ours = _pair(model.train())
    assert type(peft_model.base_model.model.model.layers[0].self_attn.q_proj).__module__ == "peft.tuners.lora.bnb"
    _assert_like_peft(ours, peft_model, compute_dtype)


def test_print_trainable_parameters_counts_as_peft(capsys):
    peft_model, ours = _pair(base())
    peft_model.print_trainable_parameters()
    expected = capsys.readouterr().out
    assert fastlora.print_trainable_parameters(ours) == peft_model.get_nb_trainable_parameters()
    assert capsys.readouterr().out == expected
    # The same model quantized by fastlora counts the same: a 4-bit weight counts out·in, never trainable.
    nf4_model = fastlora.apply_lora(fastlora.quantize_nf4(_llama()), fastlora.LoraConfig(**_lora_config()))
    assert fastlora.print_trainable_parameters(nf4_model) == peft_model.get_nb_trainable_parameters()


# ---------------------------------------------------------------------------------------------------- adapters


def test_adapters_move_between_peft_and_fastlora(tmp_path):
    peft_model, _ = _pair(base())
    peft_model.save_pretrained(tmp_path / "peft")
    ours = fastlora.load_adapter(base(), tmp_path / "peft")
    expected = {name: p.detach() for name, p in _peft_lora(peft_model).items()}
    assert {name: p for name, p in ours.named_parameters() if name in expected}.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(ours.get_parameter(name), value), name

    fastlora.save_adapter(ours, tmp_path / "ours")
    from safetensors.torch import load_file

    saved_by_peft = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    saved_by_us = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert saved_by_us.keys() == saved_by_peft.keys()
    assert all(torch.equal(saved_by_us[k], saved_by_peft[k]) for k in saved_by_peft)
    reloaded = peft.PeftModel.from_pretrained(base(), tmp_path / "ours")
    for name, value in _peft_lora(reloaded).items():
        assert torch.equal(value, expected[name]), name


# ------------------------------------------------------------------------------------------------------- merges


def _merged_with_warnings(merge) -> tuple[nn.Module, set[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merged = merge()
    return merged, {str(w.message) for w in caught if "4-bit" in str(w.message)}


@pytest.mark.parametrize(
    "quant_type, double_quant, dtype",
    [("nf4", True, torch.float32), ("nf4", True, torch.bfloat16), ("fp4", False, torch.float32)],
    ids=["nf4-dq", "nf4-dq-bf16-weights", "fp4"],
)
def test_merge_and_unload_requantizes_as_peft(quant_type, double_quant, dtype):
    peft_model, ours = _pair(base(quant_type, torch.float32, double_quant, dtype=dtype))
    peft_merged, peft_warned = _merged_with_warnings(peft_model.merge_and_unload)
    merged, warned = _merged_with_warnings(lambda: fastlora.merge_and_unload(ours))
    assert warned == peft_warned == {MERGE_WARNING}
    expected_layers = dict(peft_merged.named_modules())
    checked = 0
    for name, layer in merged.named_modules():
        if isinstance(expected_layers[name], bnb.nn.Linear4bit):
            assert type(layer) is bnb.nn.Linear4bit and layer.weight.quant_state.dtype == torch.float32
            _assert_same_bytes(_bnb_tensors(layer.weight), _bnb_tensors(expected_layers[name].weight), name)
            assert layer.weight.quant_state is layer.quant_state
            checked += 1
    assert checked == 2 * len(TARGETS)


def test_merge_and_unmerge_layer_by_layer_as_peft():
    peft_model, ours = _pair(base())
    peft_model.merge_adapter()
    _, warned = _merged_with_warnings(lambda: [layer.merge() for _, layer in fastlora.model.lora_layers(ours)])
    assert warned == {MERGE_WARNING}
    peft_layers = {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules()}
    for name, layer in fastlora.model.lora_layers(ours):
        _assert_same_bytes(_bnb_tensors(layer.weight), _bnb_tensors(peft_layers[name].base_layer.weight), name)
    peft_model.unmerge_adapter()
    _, warned = _merged_with_warnings(lambda: [layer.unmerge() for _, layer in fastlora.model.lora_layers(ours)])
    assert warned == {UNMERGE_WARNING}
    for name, layer in fastlora.model.lora_layers(ours):
        assert not layer.merged
        _assert_same_bytes(_bnb_tensors(layer.weight), _bnb_tensors(peft_layers[name].base_layer.weight), name)


def test_merge_reads_a_weight_bitsandbytes_repacked_for_cpu():
    """bitsandbytes repacks a Linear4bit for its CPU kernel on the first eval forward without grad; the merge reads
    the repacked weight correctly (bitsandbytes' own dequantize_4bit, which PEFT's merge calls, does not) and keeps
    the layer's double quantization."""
    model = base()
    layer = model.model.layers[0].self_attn.q_proj
    original = nf4.from_bnb(layer.weight).dequantize()
    with torch.no_grad():
        model(IDS)
    assert layer.weight.quant_state.packing_format_for_cpu
    ours = fastlora.apply_lora(model, fastlora.LoraConfig(**_lora_config(target_modules=["q_proj"])))
    lora = ours.model.layers[0].self_attn.q_proj
    torch.manual_seed(3)
    nn.init.normal_(lora.lora_B, std=0.02)
    expected = original + lora.delta_weight()
    with pytest.warns(UserWarning, match="Merge lora module to 4-bit"):
        merged = fastlora.merge_and_unload(ours).model.layers[0].self_attn.q_proj
    assert merged.weight.quant_state.nested and not getattr(merged.weight.quant_state, "packing_format_for_cpu", 0)
    error = (nf4.from_bnb(merged.weight).dequantize() - expected).abs().mean()
    assert error < 0.12 * expected.abs().mean()  # one NF4 rounding, as quantizing ``expected`` itself gives


def test_unload_and_disable_adapters():
    model = base()
    original = {n: _bnb_tensors(m.weight) for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    peft_model, ours = _pair(model)
    # In training mode bitsandbytes computes in fp32 (in eval mode without grad it switches to its bf16 CPU kernel).
    peft_model.train(), ours.train()
    with torch.no_grad(), peft_model.disable_adapter():
        expected = peft_model(IDS).logits
    with torch.no_grad(), fastlora.disable_adapters(ours):
        assert_close(ours(IDS).logits, expected, torch.float32, REDUCE, name="disabled")
    unloaded = fastlora.unload(ours)
    for name, tensors in original.items():
        layer = unloaded.get_submodule(name)
        assert type(layer) is bnb.nn.Linear4bit
        _assert_same_bytes(_bnb_tensors(layer.weight), tensors, name)


# ----------------------------------------------------------------------------------------------------- patch_peft


@pytest.mark.parametrize("loaded_in_4bit", [True, False], ids=["qlora-layers", "lora-linear-over-bnb"])
def test_patch_peft_runs_the_kernels_over_bitsandbytes_weights(loaded_in_4bit):
    """PEFT's QLoRA layers (and, on a model not flagged ``is_loaded_in_4bit``, its plain ``lora.Linear`` over a
    bitsandbytes layer) run fastlora's kernels, one forward launch and one backward pass per layer, with PEFT's
    results."""
    model = base()
    model.is_loaded_in_4bit = loaded_in_4bit
    peft_model = _peft_model(model).train()
    layer_type = type(peft_model.base_model.model.model.layers[0].self_attn.q_proj)
    assert layer_type.__module__ == ("peft.tuners.lora.bnb" if loaded_in_4bit else "peft.tuners.lora.layer")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        patched, summary = fastlora.patch_peft(copy.deepcopy(peft_model), return_summary=True)
    assert len(summary.patched) == 2 * len(TARGETS) and not summary.skipped
    with kernels.recording_launches() as launches:
        logits, loss = _step(patched)
    counts = Counter(launch.kernel for launch in launches)
    assert counts["lora_onepass"] == counts["lora_dy"] == 2 * len(TARGETS)
    expected_logits, expected_loss = _step(peft_model)
    assert_close(logits, expected_logits, torch.float32, REDUCE, name="logits")
    assert_close(loss, expected_loss, torch.float32, REDUCE, name="loss")
    expected = _lora_grads(peft_model)
    for name, grad in _lora_grads(patched).items():
        assert_close(grad, expected[name], torch.float32, REDUCE, name=name)
    assert not patched.fastlora_fallback_counts
    # What the op would not compute as PEFT does runs PEFT's forward, counted.
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), pytest.warns(UserWarning, match="autocast"):
        patched(IDS)
    assert patched.fastlora_fallback_counts == {"autocast over a 4-bit base layer": 2 * len(TARGETS)}


def test_patched_peft_merges_as_peft():
    peft_model = _peft_model(base())
    patched = fastlora.patch_peft(copy.deepcopy(peft_model))
    for model in (peft_model, patched):
        with pytest.warns(UserWarning, match="Merge lora module to 4-bit"):
            model.merge_adapter()
    expected = {n: m for n, m in peft_model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    for name, layer in patched.named_modules():
        if isinstance(layer, bnb.nn.Linear4bit):
            _assert_same_bytes(_bnb_tensors(layer.weight), _bnb_tensors(expected[name].weight), name)
    with torch.no_grad():
        patched.train()(IDS)  # merged: PEFT's forward, no fallback to count
    assert not patched.fastlora_fallback_counts


# ------------------------------------------------------------------------------------ quantize_nf4, no bitsandbytes


def test_quantize_nf4_is_bitsandbytes_without_it(monkeypatch):
    """``quantize_nf4`` gives bitsandbytes' bytes without importing it, and the model trains as the bitsandbytes one
    does (the same 4-bit tensors: bitwise the same results)."""
    bnb_model = base(layers=1)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # any import of it now fails
    ours = fastlora.quantize_nf4(_llama(1))
    monkeypatch.undo()
    assert type(ours.lm_head) is nn.Linear
    for name, layer in bnb_model.named_modules():
        if isinstance(layer, bnb.nn.Linear4bit):
            nf4_layer = ours.get_submodule(name)
            assert isinstance(nf4_layer, fastlora.Nf4Linear)
            qw = nf4_layer.quantized_weight()
            mine = {"data": qw.data, "absmax": qw.absmax, "code": qw.code, "nested_absmax": qw.nested_absmax,
                    "nested_code": qw.nested_code, "offset": qw.offset}  # fmt: skip
            _assert_same_bytes(mine, _bnb_tensors(layer.weight), name)
    config = fastlora.LoraConfig(**_lora_config(lora_dropout=0.1))
    results = []
    for model in (bnb_model, ours):
        torch.manual_seed(2)
        model = fastlora.apply_lora(model, config).train()
        for _, layer in fastlora.model.lora_layers(model):
            nn.init.normal_(layer.lora_B, std=0.02)
        results.append((*_step(model), _lora_grads(model)))
    (logits_a, loss_a, grads_a), (logits_b, loss_b, grads_b) = results
    assert torch.equal(logits_a, logits_b) and torch.equal(loss_a, loss_b)
    assert all(torch.equal(grads_a[name], grads_b[name]) for name in grads_a)


_NO_BITSANDBYTES = """
import sys
sys.modules["bitsandbytes"] = None  # as if it were not installed: importing it raises ImportError
import torch
from torch import nn
import fastlora

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32))
weights = [model[0].weight.detach().clone(), model[2].weight.detach().clone()]
fastlora.quantize_nf4(model, skip_modules=())
assert all(isinstance(model[i], fastlora.Nf4Linear) for i in (0, 2))
layers = [model[i].quantized_weight() for i in (0, 2)]
names = ("data", "absmax", "code", "nested_absmax", "nested_code", "offset")
tensors = [{k: getattr(q, k) for k in names} for q in layers]
model = fastlora.apply_lora(model, fastlora.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
x, target = torch.randn(16, 64), torch.randn(16, 32)
optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
losses = []
for _ in range(20):
    loss = nn.functional.mse_loss(model(x), target)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    losses.append(loss.item())
torch.save({"weights": weights, "tensors": tensors, "losses": losses}, sys.argv[1])
"""


def test_quantize_nf4_and_training_in_a_process_without_bitsandbytes(tmp_path):
    out = tmp_path / "out.pt"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTLORA_BACKEND")}
    subprocess.run([sys.executable, "-c", textwrap.dedent(_NO_BITSANDBYTES), str(out)], check=True, env=env)
    result = torch.load(out)
    for weight, tensors in zip(result["weights"], result["tensors"]):
        data, state = bnb.functional.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
        expected = {"data": data, "absmax": state.absmax, "code": state.code, "nested_absmax": state.state2.absmax,
                    "nested_code": state.state2.code, "offset": state.offset}  # fmt: skip
        _assert_same_bytes(tensors, expected, "quantize_nf4")
    losses = result["losses"]
    assert losses[-1] < 0.9 * losses[0]


def _nf4_tensors(layer) -> dict[str, torch.Tensor]:
    qw = layer.quantized_weight()
    names = ("data", "absmax", "code", "nested_absmax", "nested_code", "offset")
    return {name: getattr(qw, name) for name in names if getattr(qw, name) is not None}


def test_lora_over_nf4_linear_merges_and_unloads_as_over_bitsandbytes():
    """The same model quantized by fastlora and by bitsandbytes, the same adapter: merging gives the same bytes (new
    buffers for ``Nf4Linear``, a new ``Params4bit`` for bitsandbytes), and the layers come back as they went in."""
    config = fastlora.LoraConfig(**_lora_config())
    models = {}
    for kind, model in (("bnb", base(layers=1)), ("nf4", fastlora.quantize_nf4(_llama(1)))):
        keys = set(model.state_dict())
        torch.manual_seed(2)
        model = fastlora.apply_lora(model, config)
        for _, layer in fastlora.model.lora_layers(model):
            nn.init.normal_(layer.lora_B, std=0.02)
        # The base model's state-dict keys are kept (bitsandbytes' quantization entries included); LoRA's are added.
        added = set(model.state_dict()) - keys
        assert keys <= set(model.state_dict()) and all(k.endswith((".lora_A", ".lora_B")) for k in added)
        models[kind] = model
    original = {n: _nf4_tensors(m) for n, m in models["nf4"].named_modules() if isinstance(m, fastlora.LoraLinear4bit)}
    unloaded = fastlora.unload(copy.deepcopy(models["nf4"]))
    for name, tensors in original.items():
        assert type(unloaded.get_submodule(name)) is fastlora.Nf4Linear
        _assert_same_bytes(_nf4_tensors(unloaded.get_submodule(name)), tensors, name)
    with pytest.warns(UserWarning, match="Merge lora module to 4-bit"):
        merged_bnb = fastlora.merge_and_unload(models["bnb"])
        merged_nf4 = fastlora.merge_and_unload(models["nf4"])
    for name in original:
        layer = merged_nf4.get_submodule(name)
        assert type(layer) is fastlora.Nf4Linear
        _assert_same_bytes(_nf4_tensors(layer), _bnb_tensors(merged_bnb.get_submodule(name).weight), name)
        assert not torch.equal(_nf4_tensors(layer)["data"], original[name]["data"])


def test_nf4_linear_is_an_ordinary_module():
    linear = nn.Linear(128, 48)
    layer = fastlora.quantize_nf4(linear, compute_dtype=torch.bfloat16)
    assert isinstance(layer, fastlora.Nf4Linear) and layer.bias is linear.bias
    assert set(layer.state_dict()) == {"weight", "absmax", "code", "nested_absmax", "nested_code", "offset", "bias"}
    x = torch.randn(3, 128)
    y = layer(x)
    assert y.dtype == torch.float32
    w = layer.dequantize(torch.bfloat16).double()
    expected = nn.functional.linear(x.bfloat16().double(), w, linear.bias.detach().bfloat16().double())
    assert_close(y, expected, torch.bfloat16, 128, name="y")
    # Casting a model casts the bias, never the quantization format.
    layer.to(torch.bfloat16)
    assert layer.bias.dtype == torch.bfloat16 and layer.quantized_weight().absmax.dtype == torch.uint8
    assert layer.quantized_weight().nested_absmax.dtype == torch.float32
    copy_ = fastlora.quantize_nf4(nn.Linear(128, 48), compute_dtype=torch.bfloat16).to(torch.bfloat16)
    copy_.load_state_dict(layer.state_dict())
    assert torch.equal(copy_(x), layer(x))


# --------------------------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(use_reentrant):
    """Checkpointing recomputes each layer's forward with the RNG state restored, so the dropout seeds drawn from
    torch's generator, and with them the masks, are the same: the same gradients."""
    model = fastlora.apply_lora(base(layers=1), fastlora.LoraConfig(**_lora_config(lora_dropout=0.2)))
    for _, layer in fastlora.model.lora_layers(model):
        nn.init.normal_(layer.lora_B, std=0.02)
    model.train()
    torch.manual_seed(4)
    _, expected_loss = _step(model)
    expected = {name: grad.clone() for name, grad in _lora_grads(model).items()}
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    if use_reentrant:
        model.enable_input_require_grads()  # reentrant checkpoints need an input that requires grad (PEFT does this)
    assert model.model.gradient_checkpointing
    torch.manual_seed(4)
    _, loss = _step(model)
    assert torch.equal(loss, expected_loss)
    for name, grad in _lora_grads(model).items():
        assert torch.equal(grad, expected[name]), name


def test_quantized_weight_is_read_once_and_again_after_bitsandbytes_repacks():
    model = fastlora.apply_lora(base(layers=1), fastlora.LoraConfig(**_lora_config(target_modules=["q_proj"])))
    layer = model.model.layers[0].self_attn.q_proj
    first = layer.quantized_weight()
    assert layer.quantized_weight() is first
    bnb_layer = layer.base_module
    with torch.no_grad():
        bnb_layer.eval()(torch.randn(2, HIDDEN))  # bitsandbytes' own forward repacks its weight
    assert layer.weight.quant_state.packing_format_for_cpu
    again = layer.quantized_weight()
    assert again is not first and layer.quantized_weight() is again
    assert_close(again.dequantize(), first.dequantize().double(), torch.bfloat16, name="repacked")


# ------------------------------------------------------------------------------------------------------------ errors


class _PackedQuantLinear(nn.Module):
    """A GPTQ / AWQ-style layer: packed integer ``qweight``, ``scales``, no float weight."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.zeros(in_features // 8, out_features, dtype=torch.int32))
        self.register_buffer("scales", torch.ones(1, out_features))

    def forward(self, x):
        return x.new_zeros(*x.shape[:-1], self.out_features)


def _with_layer(module: nn.Module) -> nn.Module:
    model = _llama(1)
    model.model.layers[0].self_attn.q_proj = module
    return model


def _int8_weight_linear() -> nn.Linear:
    linear = nn.Linear(HIDDEN, HIDDEN)
    linear.weight = nn.Parameter(torch.zeros(HIDDEN, HIDDEN, dtype=torch.int8), requires_grad=False)
    linear.weight.quant_state = {"scheme": "someone else's"}
    return linear


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda: bnb.nn.Linear8bitLt(HIDDEN, HIDDEN, has_fp16_weights=False), "bitsandbytes 8-bit"),
        (lambda: _PackedQuantLinear(HIDDEN, HIDDEN), "GPTQ / AWQ"),
        (_int8_weight_linear, "quant_state fastlora does not know"),
    ],
    ids=["bnb-int8", "gptq-like", "unknown-quant-state"],
)
@pytest.mark.parametrize("targets", [TARGETS, "all-linear"], ids=["list", "all-linear"])
def test_other_quantizations_are_refused_leaving_the_model_unchanged(make, words, targets):
    model = _with_layer(make())
    before = {n: type(m) for n, m in model.named_modules()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(NotImplementedError, match=rf"'model\.layers\.0\.self_attn\.q_proj'.*{words}"):
        fastlora.apply_lora(model, fastlora.LoraConfig(r=4, target_modules=targets))
    assert {n: type(m) for n, m in model.named_modules()} == before
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert getattr(model, "fastlora_config", None) is None


def test_a_quantized_layer_in_modules_to_save_is_refused():
    model = base(layers=1)
    with pytest.raises(NotImplementedError, match="modules_to_save.*quantized"):
        fastlora.apply_lora(model, fastlora.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["o_proj"]))
    assert not any(isinstance(m, fastlora.LoraLinear4bit) for m in model.modules())
