"""PEFT's on-disk adapter format: file names, key normalisation, and reading and validating adapter files.

A directory holds ``adapter_config.json`` (the PEFT ``LoraConfig``) and ``adapter_model.safetensors`` (metadata
``{"format": "pt"}``) whose keys are those of PEFT's ``get_peft_model_state_dict``: ``base_model.model.<module>.lora_A
.weight`` ``[r, in]`` and ``...lora_B.weight`` ``[out, r]`` for every adapted module, plus biases and
``modules_to_save`` entries as the config asks (see ``fastlora.io``).

Reading checks the files (present, parseable, floating-point tensors, a config fastlora can honour) and puts every
key in PEFT's saved form without the ``base_model.model.`` prefix; checking the keys and shapes against a model is
the reader's job (``fastlora.io`` for a model, ``fastlora.serving`` for an adapter pool). This module imports no
model code, so anything that only reads adapter files can use it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .config import LoraConfig

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
# A LoRA key as PEFT writes it, or with the adapter name still in it (``lora_A.default.weight``), as some tools do.
LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<which>lora_A|lora_B)(?:\.[^.]+)?\.weight$")
# ``bias="all"`` with ``modules_to_save`` makes PEFT also save the wrapper's own biases: the copy being trained
# (``<module>.modules_to_save.bias``) and the frozen original (``<module>.original_module.bias``).
WRAPPED_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>modules_to_save|original_module)\.(?P<rest>.+)$")


def lora_key(key: str) -> str:
    """``key`` without the ``base_model.model.`` prefix, and for a LoRA weight in PEFT's saved form
    (``<module>.lora_A.weight``, dropping an adapter-name infix such as ``lora_A.default.weight``)."""
    key = key.removeprefix(PREFIX)
    if match := LORA_KEY.match(key):
        return f"{match['module']}.{match['which']}.weight"
    return key


def read_adapter(
    path_or_dir: str | os.PathLike, *, config: LoraConfig | None = None, allow_pickle: bool = False
) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """The config and tensors of a PEFT-format adapter, checked as files but not against any model. Tensor keys are
    module-relative, in PEFT's saved form (``model.layers.0.self_attn.q_proj.lora_A.weight``), whatever prefix or
    adapter-name infix the file used. Arguments as for ``read_adapter_file``."""
    adapter = read_adapter_file(path_or_dir, config=config, allow_pickle=allow_pickle)
    return adapter.config, {key: tensor for key, (_, tensor) in adapter.tensors.items()}


@dataclasses.dataclass
class AdapterFile:
    """An adapter as read from its files, checked as files (not against any model)."""

    config: LoraConfig
    config_origin: str  # for error messages: the config file, or "the given config"
    weights_path: Path
    tensors: dict[str, tuple[str, torch.Tensor]]  # normalised key -> (key in the file, tensor)


def read_adapter_file(
    path_or_dir: str | os.PathLike, *, config: LoraConfig | None = None, allow_pickle: bool = False
) -> AdapterFile:
    """Read a PEFT-format adapter: ``path_or_dir`` is a directory with ``adapter_config.json`` and
    ``adapter_model.safetensors``, or the weights file itself (its config is read from the same directory unless
    ``config`` is given; ``config`` replaces the file's). A pickled ``adapter_model.bin`` is refused unless
    ``allow_pickle=True`` (then read with ``torch.load(weights_only=True)``). Raises ``FileNotFoundError`` for missing
    files and ``ValueError`` / ``NotImplementedError`` for corrupt files and configs fastlora cannot honour."""
    path = Path(path_or_dir)
    if config is not None and not isinstance(config, LoraConfig):
        raise TypeError(f"load_adapter: config must be a fastlora.LoraConfig, got {type(config).__name__}")
    weights_path, config_path = _adapter_files(path, allow_pickle, need_config=config is None)
    origin = "the given config" if config is not None else str(config_path)
    config = config if config is not None else _read_config(config_path)
    return AdapterFile(config, origin, weights_path, _normalized(_read_weights(weights_path), weights_path))


def _adapter_files(path: Path, allow_pickle: bool, need_config: bool) -> tuple[Path, Path]:
    if path.is_dir():
        directory = path
        weights = path / SAFETENSORS_NAME
        if not weights.is_file():
            pickled = path / PICKLE_NAME
            if not pickled.is_file():
                raise FileNotFoundError(f"load_adapter: no {SAFETENSORS_NAME} (nor {PICKLE_NAME}) in {path}")
            weights = pickled
    elif path.is_file():
        directory, weights = path.parent, path
    else:
        raise FileNotFoundError(f"load_adapter: {path} does not exist")
    if weights.suffix != ".safetensors" and not allow_pickle:
        raise ValueError(
            f"load_adapter: {weights} is a pickle file; unpickling can run arbitrary code, so it is refused. Convert "
            "it to safetensors, or pass allow_pickle=True to read it (with torch.load(weights_only=True))"
        )
    config_path = directory / CONFIG_NAME
    if need_config and not config_path.is_file():
        raise FileNotFoundError(f"load_adapter: {config_path} not found (or pass config=fastlora.LoraConfig(...))")
    return weights, config_path


def _read_config(path: Path) -> LoraConfig:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"load_adapter: {path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"load_adapter: {path} does not hold a JSON object")
    try:
        return LoraConfig.from_peft_dict(data)
    except (ValueError, TypeError, NotImplementedError) as e:
        raise type(e)(f"load_adapter: {path}: {e}") from e


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        try:
            return load_file(path, device="cpu")
        except SafetensorError as e:
            raise ValueError(f"load_adapter: {path} is not a readable safetensors file (truncated?): {e}") from e
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many types for corrupt files and refused objects
        raise ValueError(f"load_adapter: {path} could not be read with torch.load(weights_only=True): {e}") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"load_adapter: {path} does not hold a dict of tensors")
    return state


def _normalized(state: dict[str, torch.Tensor], path: Path) -> dict[str, tuple[str, torch.Tensor]]:
    """File keys in PEFT's saved form without ``base_model.model.``: ``{key: (key in the file, tensor)}``.

    Also accepted: keys without the prefix (adapters saved by transformers' PEFT integration), the adapter name
    left in (``lora_A.default.weight``), and PEFT's ``modules_to_save`` wrapper entries."""
    out: dict[str, tuple[str, torch.Tensor]] = {}
    for file_key, tensor in state.items():
        if not tensor.is_floating_point():
            raise ValueError(f"load_adapter: {path}: {file_key!r} is {tensor.dtype}, not floating point")
        key = lora_key(file_key)
        wrapped = None if LORA_KEY.match(key) else WRAPPED_KEY.match(key)
        if wrapped is not None:
            if wrapped["kind"] == "original_module":
                continue  # the frozen base copy, identical to the model's own module
            key = f"{wrapped['module']}.{wrapped['rest']}"
        if key in out:
            if not torch.equal(out[key][1], tensor):
                raise ValueError(f"load_adapter: {path}: {out[key][0]!r} and {file_key!r} disagree")
            continue
        out[key] = (file_key, tensor)
    return out


def listing(keys, limit: int = 8) -> str:
    """``keys`` sorted and joined for an error message, the first ``limit`` of them."""
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")
