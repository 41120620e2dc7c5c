"""Adapter files in PEFT's format: ``save_adapter`` writes what ``PeftModel.save_pretrained`` writes for a LoRA
adapter, and ``load_adapter`` reads adapters saved by PEFT or by fastlora.

A directory holds ``adapter_config.json`` (the PEFT ``LoraConfig``) and ``adapter_model.safetensors`` (metadata
``{"format": "pt"}``) whose keys are those of PEFT's ``get_peft_model_state_dict``:

- ``base_model.model.<module>.lora_A.weight`` ``[r, in]`` and ``...lora_B.weight`` ``[out, r]``, for every adapted
  module (``Conv1D`` and 4-bit layers included: the LoRA shapes come from the layer's features, never from the base
  weight's layout or packing);
- ``bias="lora_only"``: ``base_model.model.<module>.base_layer.bias`` for every adapted module with a bias;
  ``bias="all"``: every ``.bias`` entry of the model's state dict, adapted modules under ``.base_layer.bias``;
- ``modules_to_save``: ``base_model.model.<module>.<name>`` for every entry of that module's state dict (for a
  module that shares parameters with the input embedding, its own trained copies);
- ``target_parameters`` (mixture-of-experts experts and routers): ``base_model.model.<module>.lora_A.weight`` and
  ``...lora_B.weight`` per adapted parameter, PEFT's ``[r·E, in]`` and interleaved ``[out, r·E]`` for a fused-experts
  parameter (``[r, in]`` / ``[out, r]`` for a router's), with ``.base_layer`` repeated before ``.lora_A`` for all but the
  last of a module's adapted parameters in registration order, as PEFT nests its wrappers (``peft_keys``);
- an output embedding (``lm_head``) with LoRA, when ``target_modules`` names an embedding layer as PEFT's
  ``save_embedding_layers="auto"`` detects it: its base layer, ``base_model.model.lm_head.base_layer.weight``.

Loading validates everything (files, config, every key and shape) before the model changes, so a bad adapter
raises and leaves the model exactly as it was. Reading the files themselves is ``fastlora.peft_format``'s
(``read_adapter`` gives a file's config and tensors without a model). Limits: one adapter per model; the duplicate
``original_module.*`` / ``modules_to_save.*`` biases PEFT writes when ``bias="all"`` meets ``modules_to_save`` are
read (and the base copies ignored) but never written; embedding layers PEFT saves after a vocabulary resize are
unexpected keys (skipped with a warning under ``strict=False``).

A saved ``lm_head.base_layer.weight`` is loaded as PEFT loads it, into the base layer, with one difference: when the
layer's weight is tied to the input embedding and the saved weight differs from it, the layer gets its own copy
(with a warning) instead of writing through the tie into the embedding. Equal to the model's weight (the usual case,
the base model's own head), it changes nothing.
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
from safetensors.torch import save_file
from torch import nn

from .config import LoraConfig
from .layers import LoraExperts, LoraLinear, LoraParameter, expert_layout
from .model import (
    adapted_modules,
    adapted_parameters,
    apply_lora,
    find_targets,
    linear_features,
    lora_layers,
    modules_to_save,
    moe_config,
    parameter_layers,
    storage_key,
    within,
)
from .peft_format import (
    CONFIG_NAME,
    PREFIX,
    SAFETENSORS_NAME,
    listing,
    read_adapter,
    read_adapter_file,
    saved_config_metadata,
)

__all__ = ["load_adapter", "read_adapter", "save_adapter"]

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
    param_layers = dict(parameter_layers(model))
    if not layers and not param_layers:
        raise ValueError("save_adapter: the model has no LoRA layers; nothing to save")
    config = _config_for_layers(model, config, layers)
    config = _config_for_parameter_layers(model, config, param_layers)

    tensors = {}
    for name, layer in layers.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = layer.lora_A
        tensors[f"{PREFIX}{name}.lora_B.weight"] = layer.lora_B
    for key, (lora_A, lora_B) in _parameter_tensors(param_layers).items():
        tensors[f"{PREFIX}{key}.lora_A.weight"] = lora_A
        tensors[f"{PREFIX}{key}.lora_B.weight"] = lora_B
    state = model.state_dict(keep_vars=True)
    for key, (name, _) in _extra_entries(model, config, set(layers)).items():
        tensors[PREFIX + key] = state[name]
    if _saves_embedding_layers(model, config):
        for key, (name, attr, _) in _base_layer_entries(model, set(layers), {}).items():
            tensors[PREFIX + key] = getattr(model.get_submodule(name), attr)
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
        save_file(tensors, weights_tmp, metadata=saved_config_metadata(data))
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


def peft_keys(module: str, params: list[str]) -> dict[str, str]:
    """``{parameter: saved key prefix}`` of the parameters of ``module`` PEFT adapts with ``target_parameters``, in the
    module's registration order: PEFT nests one ``ParamWrapper`` per parameter, the first innermost, so the first of
    ``n`` is saved under ``<module>`` + ``.base_layer`` × ``(n - 1)``, the last under ``<module>``."""
    return {p: module + ".base_layer" * (len(params) - 1 - i) for i, p in enumerate(params)}


def _parameter_tensors(param_layers: dict[str, nn.Module]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{saved key prefix: (lora_A, lora_B)}`` in PEFT's layout for every ``target_parameters`` layer."""
    out = {}
    for name, layer in param_layers.items():
        if isinstance(layer, LoraParameter):
            out[name] = (layer.lora_A, layer.lora_B)
            continue
        for p, key in peft_keys(name, list(layer.lora)).items():
            out[key] = layer.lora[p].to_peft()
    return out


def _parameter_layer_targets(param_layers: dict[str, nn.Module]) -> dict[str, dict[str, tuple]]:
    """``{module: {parameter: (r, lora_alpha, use_rslora, scaling)}}`` of the model's ``target_parameters`` layers."""
    out = {}
    for name, layer in param_layers.items():
        adapters = {layer.parameter_name: layer} if isinstance(layer, LoraParameter) else dict(layer.lora.items())
        out[name] = {p: (a.r, a.lora_alpha, a.use_rslora, a.scaling) for p, a in adapters.items()}
    return out


def _config_for_parameter_layers(model: nn.Module, config: LoraConfig, param_layers: dict) -> LoraConfig:
    """``config``, checked against the model's ``target_parameters`` layers, with exact-name rank/alpha patterns
    where needed."""
    selected = adapted_parameters(model, config)
    have = {name: list(targets) for name, targets in _parameter_layer_targets(param_layers).items()}
    if {m: sorted(p) for m, p in selected.items()} != {m: sorted(p) for m, p in have.items()}:
        raise ValueError(
            "save_adapter: the config's target_parameters do not describe the model's parameter LoRA layers; the "
            f"config selects {selected}, the model has {have}"
        )
    rank_pattern, alpha_pattern = {}, {}
    for name, targets in _parameter_layer_targets(param_layers).items():
        for p, (r, alpha, rslora, _) in targets.items():
            key = f"{name}.{p}"
            if rslora != config.use_rslora:
                raise ValueError(f"save_adapter: {key} has use_rslora={rslora} but the config says {config.use_rslora}")
            if config.rank_for(key) != r:
                rank_pattern[re.escape(key)] = r
            if config.alpha_for(key) != alpha:
                alpha_pattern[re.escape(key)] = alpha
    if not rank_pattern and not alpha_pattern:
        return config
    return dataclasses.replace(
        config,
        rank_pattern={**rank_pattern, **config.rank_pattern},
        alpha_pattern={**alpha_pattern, **config.alpha_pattern},
    )


def _config_for_layers(model: nn.Module, config: LoraConfig, layers: dict[str, LoraLinear]) -> LoraConfig:
    """``config``, checked against the model's LoRA layers, with exact-name rank/alpha patterns where needed."""
    selected = _config_targets(model, config)
    if selected != set(layers):
        raise ValueError(
            "save_adapter: the config does not describe the model's LoRA layers (PEFT would adapt other modules); "
            f"LoRA layers it misses: {listing(set(layers) - selected) or 'none'}; modules it targets without LoRA: "
            f"{listing(selected - set(layers)) or 'none'}"
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
        storage = storage_key(tensor)
        out[key] = tensor.clone() if storage is not None and storage in seen else tensor
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
    layers = dict(lora_layers(model))
    param_layers = dict(parameter_layers(model))
    has_lora = bool(layers) or bool(param_layers) or getattr(model, "fastlora_config", None) is not None
    plan = {}

    def usable_keys(config: LoraConfig) -> set[str]:
        # What the model can take for this config, known before any tensor of the file is read.
        origin = "the given config" if given_config is not None else str(_config_path(path_or_dir))
        try:
            config = moe_config(model, config)
            if has_lora:
                expected = _expected_for_lora_model(model, config, layers)
                params = _expected_parameters(model, config, param_layers)
            else:
                expected = _expected_for_plain_model(model, config)
                params = _expected_parameters(model, config, None)
        except (ValueError, NotImplementedError) as e:
            raise type(e)(f"load_adapter: the adapter ({origin}) does not fit the model: {e}") from e
        layer_names = {key.rpartition(".lora_A.weight")[0] for key in expected if key.endswith(".lora_A.weight")}
        plan["expected"], plan["base"] = expected, _base_layer_entries(model, layer_names, expected)
        plan["convert"] = {key: convert for key, (_, _, convert) in params.items()}
        expected.update({key: (name, shape) for key, (name, shape, _) in params.items()})
        return set(expected) | set(plan["base"])

    given_config = config
    adapter = read_adapter_file(path_or_dir, config=config, allow_pickle=allow_pickle, keys=usable_keys)
    config, weights_path, source = adapter.config, adapter.weights_path, adapter.tensors
    expected = plan["expected"]
    base_entries = {k: v for k, v in plan["base"].items() if k in source}
    for key, (name, attr, shape) in base_entries.items():
        file_key, tensor = source[key]
        if tuple(tensor.shape) != shape:
            raise ValueError(
                f"load_adapter: {weights_path}: {file_key!r} has shape {tuple(tensor.shape)}, the model expects "
                f"{shape} (for {name}.{attr})"
            )
    common = sorted(set(expected) & set(source))
    for key in common:
        name, shape = expected[key]
        file_key, tensor = source[key]
        if tuple(tensor.shape) != shape:
            raise ValueError(
                f"load_adapter: {weights_path}: {file_key!r} has shape {tuple(tensor.shape)}, the model expects "
                f"{shape} (for {name!r})"
            )
    missing = listing(set(expected) - set(source))
    unexpected = listing(adapter.skipped)
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
            value = source[key][1]
            convert = plan["convert"].get(key)
            tensors[expected[key][0]].copy_(convert(value) if convert is not None else value)
        for key, (name, attr, _) in base_entries.items():
            _load_base_tensor(model, name, attr, source[key][1], weights_path)
    return model


def _config_path(path_or_dir: str | os.PathLike) -> Path:
    path = Path(path_or_dir)
    return (path if path.is_dir() else path.parent) / CONFIG_NAME


def _load_base_tensor(model: nn.Module, name: str, attr: str, value: torch.Tensor, weights_path: Path) -> None:
    """Put a saved ``<name>.base_layer.<attr>`` into LoRA layer ``name``, as PEFT does, but never through a tie."""
    layer = model.get_submodule(name)
    current = getattr(layer, attr)
    value = value.to(device=current.device, dtype=current.dtype)
    if torch.equal(current, value):
        return
    if attr == "weight" and getattr(layer, "shared_weight", False):
        warnings.warn(
            f"load_adapter: {weights_path}: {name}.base_layer.weight differs from the model's {name}.weight, which is "
            f"shared with another module (tied embeddings); {name!r} gets its own copy of the saved weight and the "
            "tie is broken (set config.tie_word_embeddings=False before saving the model with transformers)",
            UserWarning,
            stacklevel=3,
        )
        layer.weight = nn.Parameter(value.clone(), requires_grad=current.requires_grad)
        layer.shared_weight = False
    else:
        current.copy_(value)


def _expected_for_plain_model(model: nn.Module, config: LoraConfig) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{saved key: (state-dict name after apply_lora, shape)}`` for a model ``apply_lora(model, config)`` would
    adapt; ``find_targets`` raises when the config names modules the model lacks."""
    targets = find_targets(model, config, adapted_parameters(model, config))
    expected = {}
    for name in targets:
        # From the layer's features, not its weight's shape: a Conv1D's is [in, out], a 4-bit layer's is packed.
        in_features, out_features = linear_features(model.get_submodule(name))
        r = config.rank_for(name)
        if r > max(in_features, out_features):
            # Checked before anything is allocated: apply_lora would otherwise allocate A and B of that rank.
            raise ValueError(
                f"layer {name!r} ({in_features} -> {out_features}) would get rank r={r}, more than "
                f"max(in_features, out_features) = {max(in_features, out_features)}; a rank larger than the layer's "
                "dimensions has no meaning"
            )
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
            f"{listing(selected - set(layers)) or 'nothing'} without LoRA, and not "
            f"{listing(set(layers) - selected) or 'nothing'} with LoRA (unload the model's adapter to load another)"
        )
    expected = {}
    for name, layer in layers.items():
        if layer.merged:
            raise ValueError(f"layer {name!r} is merged; unmerge it before loading new weights")
        r, scaling = config.rank_for(name), config.scaling_for(name)
        if r != layer.r or not math.isclose(scaling, layer.scaling, rel_tol=1e-6):
            raise ValueError(
                f"layer {name!r} has r={layer.r}, scaling={layer.scaling:g}; the adapter's config "
                f"gives r={r}, scaling={scaling:g}"
            )
        expected[f"{name}.lora_A.weight"] = (f"{name}.lora_A", tuple(layer.lora_A.shape))
        expected[f"{name}.lora_B.weight"] = (f"{name}.lora_B", tuple(layer.lora_B.shape))
    expected.update(_extra_entries(model, config, set(layers)))
    return expected


def _expected_parameters(
    model: nn.Module, config: LoraConfig, param_layers: dict[str, nn.Module] | None
) -> dict[str, tuple[str, tuple[int, ...], object]]:
    """``{saved key: (state-dict name, saved shape, converter or None)}`` of the ``target_parameters`` layers: those
    ``apply_lora(model, config)`` would make (``param_layers`` None), or, checked against ``config``, the model's own.
    A converter turns PEFT's layout into the layer's (``ExpertAdapter.from_peft``)."""
    selected = adapted_parameters(model, config)
    if param_layers is not None:
        have = _parameter_layer_targets(param_layers)
        if {m: sorted(p) for m, p in selected.items()} != {m: sorted(p) for m, p in have.items()}:
            raise ValueError(
                f"target_parameters={config.target_parameters!r} selects {selected}, but the model's parameter LoRA "
                f"layers are { ({m: list(p) for m, p in have.items()}) } (unload the model's adapter to load another)"
            )
        for name, targets in have.items():
            if param_layers[name].merged:
                raise ValueError(f"layer {name!r} is merged; unmerge it before loading new weights")
            for p, (r, alpha, _, scaling) in targets.items():
                key = f"{name}.{p}"
                if config.rank_for(key) != r or not math.isclose(config.scaling_for(key), scaling, rel_tol=1e-6):
                    raise ValueError(
                        f"{key} has r={r}, lora_alpha={alpha}; the adapter's config gives r={config.rank_for(key)}, "
                        f"lora_alpha={config.alpha_for(key)}"
                    )
    expected = {}
    for name, params in selected.items():
        module = model.get_submodule(name)
        base = module.base_module if isinstance(module, (LoraExperts, LoraParameter)) else module
        shapes = {p: tuple(getattr(base, p).shape) for p in params}
        if all(len(shape) == 3 for shape in shapes.values()):
            for p, key in peft_keys(name, params).items():
                E, k, n = expert_layout(base, p)
                r = config.rank_for(f"{name}.{p}")
                expected[f"{key}.lora_A.weight"] = (
                    f"{name}.lora.{p}.lora_A",
                    (r * E, k),
                    lambda t, E=E, r=r, k=k: t.reshape(E, r, k),
                )
                expected[f"{key}.lora_B.weight"] = (
                    f"{name}.lora.{p}.lora_B",
                    (n, r * E),
                    lambda t, E=E, r=r, n=n: t.reshape(n, r, E).permute(2, 0, 1),
                )
        elif len(params) == 1 and len(shapes[params[0]]) == 2:
            out_features, in_features = shapes[params[0]]
            r = config.rank_for(f"{name}.{params[0]}")
            expected[f"{name}.lora_A.weight"] = (f"{name}.lora_A", (r, in_features), None)
            expected[f"{name}.lora_B.weight"] = (f"{name}.lora_B", (out_features, r), None)
        # anything else: apply_lora refuses it, naming it
    return expected


# ---------------------------------------------------------------------------------------------------------- shared


def _config_targets(model: nn.Module, config: LoraConfig) -> set[str]:
    """The modules ``config`` adapts in ``model``, counting those that already hold LoRA."""
    return set(adapted_modules(model, config))


def _extra_entries(model: nn.Module, config: LoraConfig, targets: set[str]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Biases and ``modules_to_save`` tensors PEFT saves with this config: ``{saved key: (state-dict name, shape)}``."""
    saved = modules_to_save(model, config)
    entries = {}
    state = model.state_dict(keep_vars=True)
    if config.bias != "none":
        for key, tensor in state.items():
            module = key.rpartition(".")[0]
            if not (key == "bias" or key.endswith(".bias")) or any(within(module, m) for m in saved):
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


_EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")


def _saves_embedding_layers(model: nn.Module, config: LoraConfig) -> bool:
    """PEFT's ``save_embedding_layers="auto"``: whether ``target_modules`` targets an embedding layer, by PEFT's
    test (a list holding ``"embed_tokens"`` or ``"lm_head"``; a regex matching a module of that name)."""
    target = config.target_modules
    if not isinstance(target, str):
        return any(name in target for name in _EMBEDDING_LAYER_NAMES)
    if config.all_linear:
        return False  # PEFT expands it to names that leave the output head out
    pattern = re.compile(rf"(.*\.)?({'|'.join(_EMBEDDING_LAYER_NAMES)})$")
    return any(pattern.match(n) and re.fullmatch(target, n) for n, _ in model.named_modules())


def _base_layer_entries(
    model: nn.Module, layers: set[str], expected: dict
) -> dict[str, tuple[str, str, tuple[int, ...]]]:
    """``{saved key: (layer name, "weight" or "bias", stored shape)}`` of the base layer of the output embedding, when
    it is one of ``layers``: what PEFT saves for an embedding it adapts (keys already in ``expected`` left out)."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None:
        return {}
    entries = {}
    for name in layers:
        module = model.get_submodule(name)
        if module is not head and getattr(module, "_base_module", None) is not head:
            continue
        for attr in ("weight", "bias"):
            tensor = getattr(module, attr, None)
            key = f"{name}.base_layer.{attr}"
            if tensor is not None and key not in expected:
                entries[key] = (name, attr, tuple(tensor.shape))
    return entries
