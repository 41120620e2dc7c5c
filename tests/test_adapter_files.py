"""Adapter files from untrusted sources: oversized safetensors headers are refused unparsed, tensors a model cannot
use are never read, and a config file that is not the one the weights were saved with is refused."""

import json
import shutil
import struct
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_models import tiny_llama

import fastlora
from fastlora.peft_format import SAFETENSORS_NAME, SAVED_CONFIG_KEY


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same(model, before) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


def _saved_adapter(directory, lora_alpha: int = 16, seed: int = 0) -> None:
    model = tiny_llama()
    fastlora.apply_lora(model, fastlora.LoraConfig(r=4, lora_alpha=lora_alpha, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(seed)
    for _, layer in fastlora.model.lora_layers(model):
        torch.nn.init.normal_(layer.lora_B)
    fastlora.save_adapter(model, directory)


def _flood_header(path, n: int) -> None:
    """A safetensors file declaring ``n`` zero-size tensors."""
    header = {"__metadata__": {"format": "pt"}}
    for i in range(n):
        key = f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight"
        header[key] = {"dtype": "F32", "shape": [0, 16], "data_offsets": [0, 0]}
    data = json.dumps(header).encode()
    data += b" " * (-len(data) % 8)
    path.write_bytes(struct.pack("<Q", len(data)) + data)


@pytest.fixture
def flooded(tmp_path):
    _saved_adapter(tmp_path)
    _flood_header(tmp_path / SAFETENSORS_NAME, 20_000)
    return tmp_path


def test_an_oversized_header_is_refused_before_it_is_parsed(flooded):
    model = tiny_llama()
    before = _state(model)
    start = time.perf_counter()
    with pytest.raises(ValueError, match="safetensors header of .* bytes, far more than an adapter"):
        fastlora.load_adapter(model, flooded, strict=False)
    assert time.perf_counter() - start < 1.0
    _assert_same(model, before)
    assert not list(fastlora.model.lora_layers(model))


def test_an_oversized_header_is_refused_by_the_pool(flooded, monkeypatch):
    monkeypatch.setenv("FASTLORA_BACKEND", "torch")
    server = fastlora.MultiLoraModel(tiny_llama(), target_modules=["q_proj", "v_proj"], max_adapters=2, max_rank=8)
    with pytest.raises(ValueError, match="far more than an adapter"):
        server.load_adapter("flood", flooded)
    assert server.adapters == [] and server.pool.resident == {}


@pytest.fixture
def with_extra_key(tmp_path):
    """An adapter whose file also holds a LoRA weight of a module the model's adapter does not target."""
    _saved_adapter(tmp_path)
    path = tmp_path / SAFETENSORS_NAME
    with safe_open(path, "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    tensors[EXTRA] = torch.ones(4, 64)
    save_file(tensors, path, metadata=metadata)
    return tmp_path


EXTRA = "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"


class _RecordingOpen:
    """``safe_open`` recording which tensors are read."""

    read: list[str] = []

    def __init__(self, *args, **kwargs):
        self.file = safe_open(*args, **kwargs)

    def __enter__(self):
        self.inner = self.file.__enter__()
        return self

    def __exit__(self, *exc):
        return self.file.__exit__(*exc)

    def metadata(self):
        return self.inner.metadata()

    def keys(self):
        return self.inner.keys()

    def get_tensor(self, key):
        _RecordingOpen.read.append(key)
        return self.inner.get_tensor(key)


def test_keys_the_model_cannot_use_are_never_read(with_extra_key, monkeypatch):
    monkeypatch.setattr(fastlora.peft_format, "safe_open", _RecordingOpen)
    monkeypatch.setattr(_RecordingOpen, "read", [])
    model = tiny_llama()
    with pytest.raises(ValueError, match="unexpected keys: .*mlp.up_proj.lora_A.weight"):
        fastlora.load_adapter(model, with_extra_key)
    assert not list(fastlora.model.lora_layers(model))
    with pytest.warns(UserWarning, match="unexpected keys skipped: .*up_proj"):
        fastlora.load_adapter(model, with_extra_key, strict=False)
    assert len(_RecordingOpen.read) == 16 and EXTRA not in _RecordingOpen.read  # 4 layers x A, B, twice
    adapter = fastlora.peft_format.read_adapter_file(with_extra_key, keys=lambda config: {"nothing"})
    assert adapter.tensors == {} and EXTRA in adapter.skipped


def test_the_pool_refuses_keys_of_other_modules_unread(with_extra_key, monkeypatch):
    monkeypatch.setenv("FASTLORA_BACKEND", "torch")
    monkeypatch.setattr(fastlora.peft_format, "safe_open", _RecordingOpen)
    monkeypatch.setattr(_RecordingOpen, "read", [])
    server = fastlora.MultiLoraModel(tiny_llama(), target_modules=["q_proj", "v_proj"], max_adapters=2, max_rank=8)
    with pytest.raises(ValueError, match="module .model.layers.0.mlp.up_proj. is not adapted by this pool"):
        server.load_adapter("extra", with_extra_key)
    assert server.adapters == [] and EXTRA not in _RecordingOpen.read


def test_an_interrupted_save_is_detected(tmp_path):
    """Weights of a second save beside the config of the first: refused, naming the field; config= overrides."""
    old, new = tmp_path / "old", tmp_path / "new"
    _saved_adapter(old, lora_alpha=16)
    _saved_adapter(new, lora_alpha=32, seed=1)
    shutil.copy(new / SAFETENSORS_NAME, old / SAFETENSORS_NAME)  # the first of save_adapter's two renames
    model = tiny_llama()
    before = _state(model)
    with pytest.raises(ValueError, match=r"not the config .* was saved with \(lora_alpha: weights saved with 32"):
        fastlora.load_adapter(model, old)
    _assert_same(model, before)
    config = fastlora.LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"])
    fastlora.load_adapter(model, old, config=config)
    assert all(layer.lora_alpha == 32 for _, layer in fastlora.model.lora_layers(model))


def test_the_pair_check_ignores_bookkeeping_fields(tmp_path):
    _saved_adapter(tmp_path)
    with safe_open(tmp_path / SAFETENSORS_NAME, "pt") as f:
        assert json.loads(f.metadata()[SAVED_CONFIG_KEY])["lora_alpha"] == 16
    config_file = tmp_path / "adapter_config.json"
    data = json.loads(config_file.read_text())
    data["base_model_name_or_path"] = "somewhere/else"
    data["target_modules"] = data["target_modules"][::-1]
    data["lora_alpha"] = 16.0
    config_file.write_text(json.dumps(data))
    fastlora.load_adapter(tiny_llama(), tmp_path)


def test_files_without_the_record_load_as_before(tmp_path):
    """PEFT writes no such metadata: nothing to compare, the file loads."""
    _saved_adapter(tmp_path)
    path = tmp_path / SAFETENSORS_NAME
    with safe_open(path, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, path, metadata={"format": "pt"})
    model = fastlora.load_adapter(tiny_llama(), tmp_path)
    assert len(list(fastlora.model.lora_layers(model))) == 4
