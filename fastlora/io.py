"""Adapter files in PEFT's format: ``save_adapter`` writes what ``PeftModel.save_pretrained`` writes for a LoRA
adapter, and ``load_adapter`` reads adapters saved by PEFT or by fastlora.

A directory holds ``adapter_config.json`` (the PEFT ``LoraConfig``) and ``adapter_model.safetensors`` (metadata
``{"format": "pt"}``) whose keys are those of PEFT's ``get_peft_model_state_dict``:

- ``base_model.model.<module>.lora_A.weight`` ``[r, in]`` and ``...lora_B.weight`` ``[out, r]``, for every adapted
  module (``Conv1D`` layers included: the LoRA shapes do not depend on the base weight's layout);
- ``bias="lora_only"``: ``base_model.model.<module>.base_layer.bias`` for every adapted module with a bias;
  ``bias="all"``: every ``.bias`` entry of the model's state dict, adapted modules under ``.base_layer.bias``;
- ``modules_to_save``: ``base_model.model.<module>.<name>`` for every entry of that module's state dict.

Loading validates everything (files, config, every key and shape) before the model changes, so a bad adapter
raises and leaves the model exactly as it was. ``read_adapter`` gives a file's config and tensors without a model. Limits: one adapter per model; the duplicate
``original_module.*`` / ``modules_to_save.*`` biases PEFT writes when ``bias="all"`` meets ``modules_to_save`` are
read (and the base copies ignored) but never written; embedding layers PEFT saves after a vocabulary resize are
unexpected keys (skipped with a warning under ``strict=False``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import uuid
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .config import ALL_LINEAR, LoraConfig
from .layers import LoraLinear, lora_scaling
from .model import (
    _linear_types,
    _modules_to_save,
    _output_head_names,
    apply_lora,
    find_targets,
    is_conv1d,
    lora_layers,
)

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
# A LoRA key as PEFT writes it, or with the adapter name still in it (``lora_A.default.weight``), as some tools do.
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<which>lora_A|lora_B)(?:\.[^.]+)?\.weight$")
# ``bias="all"`` with ``modules_to_save`` makes PEFT also save the wrapper's own biases: the copy being trained
# (``<module>.modules_to_save.bias``) and the frozen original (``<module>.original_module.bias``).
_WRAPPED_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>modules_to_save|original_module)\.(?P<rest>.+)$")


# ------------------------------------------------------------------------------------------------------------ save


def save_adapter(model: nn.Module, save_directory: str | os.PathLike, *, config: LoraConfig | None = None) -> None:
    """Write ``model``'s adapter to ``save_directory`` as PEFT's ``save_pretrained`` does (see the module docstring).

    ``config`` defaults to ``model.fastlora_config``. When a layer's rank or alpha differs from what the config gives
    it, an exact-name entry is added to ``rank_pattern`` / ``alpha_pattern`` so that PEFT (and ``load_adapter``)
    rebuilds the same layers. Both files are written to temporary files in the directory first and then renamed over
    the final names, so an interrupted save never leaves a half-written file.
    """
    config = config if config is not None else getattr(model, "fastlora_config", None)
    if not isinstance(config, LoraConfig):
        raise ValueError(
            "save_adapter: the model has no fastlora_config (was it adapted with fastlora.apply_lora?); pass "
            "config=fastlora.LoraConfig(...)"
        )
    layers = dict(lora_layers(model))
    if not layers:
        raise ValueError("save_adapter: the model has no LoRA layers; nothing to save")
    config = _config_for_layers(model, config, layers)

    tensors = {}
    for name, layer in layers.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = layer.lora_A
        tensors[f"{PREFIX}{name}.lora_B.weight"] = layer.lora_B
    state = model.state_dict(keep_vars=True)
    for key, (name, _) in _extra_entries(model, config, set(layers)).items():
        tensors[PREFIX + key] = state[name]
    tensors = _unaliased({key: t.detach().to("cpu").contiguous() for key, t in tensors.items()})

    data = config.to_peft_dict()
    if data["base_model_name_or_path"] is None:
        data["base_model_name_or_path"] = getattr(model, "name_or_path", None) or None
    if data["task_type"] is None:
        # What PEFT records so that ``AutoPeftModel`` can rebuild the base model's class.
        data["auto_mapping"] = {"base_model_class": type(model).__name__, "parent_library": type(model).__module__}

    directory = Path(save_directory)
    if directory.is_file():
        raise ValueError(f"save_adapter: {str(directory)!r} is a file, not a directory")
    directory.mkdir(parents=True, exist_ok=True)
    weights_tmp, config_tmp = _temp_path(directory, SAFETENSORS_NAME), _temp_path(directory, CONFIG_NAME)
    try:
        save_file(tensors, weights_tmp, metadata={"format": "pt"})
        _fsync(weights_tmp)
        with open(config_tmp, "w") as f:
            f.write(json.dumps(data, indent=2, sort_keys=True))
            f.flush()
            os.fsync(f.fileno())
        os.replace(weights_tmp, directory / SAFETENSORS_NAME)
        os.replace(config_tmp, directory / CONFIG_NAME)
    finally:
        for tmp in (weights_tmp, config_tmp):
            if os.path.exists(tmp):
                os.unlink(tmp)


def _config_for_layers(model: nn.Module, config: LoraConfig, layers: dict[str, LoraLinear]) -> LoraConfig:
    """``config``, checked against the model's LoRA layers, with exact-name rank/alpha patterns where needed."""
    selected = _config_targets(model, config)
    if selected != set(layers):
        raise ValueError(
            "save_adapter: the config does not describe the model's LoRA layers (PEFT would adapt other modules); "
            f"LoRA layers it misses: {_listing(set(layers) - selected) or 'none'}; modules it targets without LoRA: "
            f"{_listing(selected - set(layers)) or 'none'}"
        )
    rank_pattern, alpha_pattern = {}, {}
    for name, layer in layers.items():
        if layer.use_rslora != config.use_rslora:
            raise ValueError(
                f"save_adapter: layer {name!r} has use_rslora={layer.use_rslora} but the config says "
                f"{config.use_rslora}; a PEFT adapter has one setting for all layers"
            )
        # Exact names go first: PEFT uses the first pattern that matches, and a name matches only itself.
        if config.rank_for(name) != layer.r:
            rank_pattern[re.escape(name)] = layer.r
        if config.alpha_for(name) != layer.lora_alpha:
            alpha_pattern[re.escape(name)] = layer.lora_alpha
    if not rank_pattern and not alpha_pattern:
        return config
    config = dataclasses.replace(
        config,
        rank_pattern={**rank_pattern, **config.rank_pattern},
        alpha_pattern={**alpha_pattern, **config.alpha_pattern},
    )
    for name, layer in layers.items():
        if config.rank_for(name) != layer.r or config.alpha_for(name) != layer.lora_alpha:
            raise ValueError(f"save_adapter: no rank/alpha pattern can single out layer {name!r}")
    return config


def _unaliased(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing memory (tied weights); like PEFT, save the later ones as copies."""
    seen = set()
    out = {}
    for key, tensor in tensors.items():
        storage = (tensor.device, tensor.untyped_storage().data_ptr())
        out[key] = tensor.clone() if storage in seen and tensor.numel() else tensor
        seen.add(storage)
    return out


def _temp_path(directory: Path, name: str) -> str:
    # A fresh name rather than tempfile.mkstemp: mkstemp's files are private (0600), the adapter's should follow the
    # umask as PEFT's do.
    return str(directory / f".{name}.{uuid.uuid4().hex}.tmp")


def _fsync(path: str) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


# ------------------------------------------------------------------------------------------------------------ load


def read_adapter(
    path_or_dir: str | os.PathLike, *, config: LoraConfig | None = None, allow_pickle: bool = False
) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """The config and tensors of a PEFT-format adapter, checked as files but not against any model. Tensor keys are
    module-relative, in PEFT's saved form (``model.layers.0.self_attn.q_proj.lora_A.weight``), whatever prefix or
    adapter-name infix the file used. Arguments as for ``load_adapter``."""
    adapter = _read_adapter(Path(path_or_dir), config, allow_pickle)
    return adapter.config, {key: tensor for key, (_, tensor) in adapter.tensors.items()}


def load_adapter(
    model: nn.Module,
    path_or_dir: str | os.PathLike,
    *,
    config: LoraConfig | None = None,
    allow_pickle: bool = False,
    strict: bool = True,
) -> nn.Module:
    """Load a PEFT-format LoRA adapter into ``model`` and return it.

    ``path_or_dir``: a directory with ``adapter_config.json`` and ``adapter_model.safetensors``, or the weights file
    itself (its config is read from the same directory unless ``config`` is given). ``config`` replaces the file's
    config. A model without LoRA is adapted first (``apply_lora`` with that config); a model with LoRA must have
    exactly the layers, ranks and scalings the adapter has. Values are copied into the model's tensors, cast to
    their dtypes.

    A pickled ``adapter_model.bin`` is refused unless ``allow_pickle=True`` (then read with ``weights_only=True``).
    ``strict=False`` tolerates keys missing from the file (those tensors keep their values) and skips unexpected
    keys, with a warning; shapes must match either way. Every check runs before the model changes: on any error it is
    left exactly as it was.
    """
    adapter = _read_adapter(Path(path_or_dir), config, allow_pickle)
    config, weights_path, source = adapter.config, adapter.weights_path, adapter.tensors

    layers = dict(lora_layers(model))
    has_lora = bool(layers) or getattr(model, "fastlora_config", None) is not None
    try:
        if has_lora:
            expected = _expected_for_lora_model(model, config, layers)
        else:
            expected = _expected_for_plain_model(model, config)
    except (ValueError, NotImplementedError) as e:
        raise type(e)(f"load_adapter: the adapter ({adapter.config_origin}) does not fit the model: {e}") from e

    common = sorted(set(expected) & set(source))
    for key in common:
        name, shape = expected[key]
        file_key, tensor = source[key]
        if tuple(tensor.shape) != shape:
            raise ValueError(
                f"load_adapter: {weights_path}: {file_key!r} has shape {tuple(tensor.shape)}, the model expects "
                f"{shape} (for {name!r})"
            )
    missing = _listing(set(expected) - set(source))
    unexpected = _listing(source[k][0] for k in set(source) - set(expected))
    if strict and (missing or unexpected):
        raise ValueError(
            f"load_adapter: {weights_path} does not fit the model: missing keys: {missing or 'none'}; unexpected "
            f"keys: {unexpected or 'none'} (strict=False loads what fits)"
        )
    if missing or unexpected:
        warnings.warn(
            f"load_adapter: {weights_path}: missing keys: {missing}; unexpected keys skipped: {unexpected}",
            stacklevel=2,
        )

    if not has_lora:
        apply_lora(model, config)
    tensors = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for key in common:
            tensors[expected[key][0]].copy_(source[key][1])
    return model


@dataclasses.dataclass
class _Adapter:
    config: LoraConfig
    config_origin: str  # for error messages: the config file, or "the given config"
    weights_path: Path
    tensors: dict[str, tuple[str, torch.Tensor]]  # normalised key -> (key in the file, tensor)


def _read_adapter(path: Path, config: LoraConfig | None, allow_pickle: bool) -> _Adapter:
    if config is not None and not isinstance(config, LoraConfig):
        raise TypeError(f"load_adapter: config must be a fastlora.LoraConfig, got {type(config).__name__}")
    weights_path, config_path = _adapter_files(path, allow_pickle, need_config=config is None)
    origin = "the given config" if config is not None else str(config_path)
    config = config if config is not None else _read_config(config_path)
    return _Adapter(config, origin, weights_path, _normalized(_read_weights(weights_path), weights_path))


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
        key = file_key.removeprefix(PREFIX)
        if match := _LORA_KEY.match(key):
            key = f"{match['module']}.{match['which']}.weight"
        elif match := _WRAPPED_KEY.match(key):
            if match["kind"] == "original_module":
                continue  # the frozen base copy, identical to the model's own module
            key = f"{match['module']}.{match['rest']}"
        if key in out:
            if not torch.equal(out[key][1], tensor):
                raise ValueError(f"load_adapter: {path}: {out[key][0]!r} and {file_key!r} disagree")
            continue
        out[key] = (file_key, tensor)
    return out


def _expected_for_plain_model(model: nn.Module, config: LoraConfig) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{saved key: (state-dict name after apply_lora, shape)}`` for a model ``apply_lora(model, config)`` would
    adapt; ``find_targets`` raises when the config names modules the model lacks."""
    targets = find_targets(model, config)
    expected = {}
    for name in targets:
        weight = model.get_submodule(name).weight
        fan_in_fan_out = is_conv1d(model.get_submodule(name))  # apply_lora's rule: Conv1D weights are [in, out]
        out_features, in_features = weight.shape[::-1] if fan_in_fan_out else weight.shape
        r = config.rank_for(name)
        expected[f"{name}.lora_A.weight"] = (f"{name}.lora_A", (r, in_features))
        expected[f"{name}.lora_B.weight"] = (f"{name}.lora_B", (out_features, r))
    expected.update(_extra_entries(model, config, set(targets)))
    return expected


def _expected_for_lora_model(
    model: nn.Module, config: LoraConfig, layers: dict[str, LoraLinear]
) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The same for a model that has LoRA already, after checking that ``config`` describes the same layers."""
    selected = _config_targets(model, config)
    if selected != set(layers):
        raise ValueError(
            f"target_modules={config.target_modules!r} does not match the model's LoRA layers: it selects "
            f"{_listing(selected - set(layers)) or 'nothing'} without LoRA, and not "
            f"{_listing(set(layers) - selected) or 'nothing'} with LoRA (unload the model's adapter to load another)"
        )
    expected = {}
    for name, layer in layers.items():
        if layer.merged:
            raise ValueError(f"layer {name!r} is merged; unmerge it before loading new weights")
        r = config.rank_for(name)
        scaling = lora_scaling(r, config.alpha_for(name), config.use_rslora)
        if r != layer.r or not math.isclose(scaling, layer.scaling, rel_tol=1e-6):
            raise ValueError(
                f"layer {name!r} has r={layer.r}, scaling={layer.scaling:g}; the adapter's config "
                f"gives r={r}, scaling={scaling:g}"
            )
        expected[f"{name}.lora_A.weight"] = (f"{name}.lora_A", tuple(layer.lora_A.shape))
        expected[f"{name}.lora_B.weight"] = (f"{name}.lora_B", tuple(layer.lora_B.shape))
    expected.update(_extra_entries(model, config, set(layers)))
    return expected


# ---------------------------------------------------------------------------------------------------------- shared


def _config_targets(model: nn.Module, config: LoraConfig) -> set[str]:
    """The modules ``config`` adapts in ``model``, counting those that already hold LoRA."""
    all_linear = isinstance(config.target_modules, str) and config.target_modules.lower() == ALL_LINEAR
    head = _output_head_names(model) if all_linear else set()
    linear = (*_linear_types(), LoraLinear)
    return {n for n, m in model.named_modules() if n and n not in head and isinstance(m, linear) and config.matches(n)}


def _extra_entries(model: nn.Module, config: LoraConfig, targets: set[str]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Biases and ``modules_to_save`` tensors PEFT saves with this config: ``{saved key: (state-dict name, shape)}``."""
    saved = _modules_to_save(model, config)
    entries = {}
    state = model.state_dict(keep_vars=True)
    if config.bias != "none":
        for key, tensor in state.items():
            module = key.rpartition(".")[0]
            if not (key == "bias" or key.endswith(".bias")) or any(_within(module, m) for m in saved):
                continue
            if module in targets:
                entries[f"{module}.base_layer.bias"] = (key, tuple(tensor.shape))
            elif config.bias == "all":
                entries[key] = (key, tuple(tensor.shape))
    for name in saved:
        for key, tensor in state.items():
            if key.startswith(f"{name}."):
                entries[key] = (key, tuple(tensor.shape))
    return entries


def _within(name: str, ancestor: str) -> bool:
    return name == ancestor or name.startswith(f"{ancestor}.")


def _listing(keys, limit: int = 8) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")
