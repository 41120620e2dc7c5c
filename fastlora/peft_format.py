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
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from .config import LoraConfig

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
# Suffixes of pickled tensor files (PEFT's adapter_model.bin, torch.save's .pt / .pth).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
PREFIX = "base_model.model."
# A safetensors header takes some hundred bytes per tensor; a reader that knows which keys it can use refuses a header
# larger than this for them before parsing it (a header declaring hundreds of thousands of tensors costs seconds and
# hundreds of MiB to parse).
HEADER_BYTES_BASE = 1 << 20
HEADER_BYTES_PER_KEY = 4096
# The safetensors metadata entry in which ``save_adapter`` records the config fields the weights were saved with.
SAVED_CONFIG_KEY = "fastlora.adapter_config"
# The config fields that decide which tensors a file must hold and how they are scaled.
_PAIR_FIELDS = (
    "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "target_modules", "exclude_modules",
    "layers_to_transform", "layers_pattern", "modules_to_save", "bias",
)  # fmt: skip
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
    path_or_dir: str | os.PathLike,
    *,
    config: LoraConfig | None = None,
    allow_pickle: bool = False,
    keys: Callable[[LoraConfig], Collection[str]] | None = None,
) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """The config and tensors of a PEFT-format adapter, checked as files but not against any model. Tensor keys are
    module-relative, in PEFT's saved form (``model.layers.0.self_attn.q_proj.lora_A.weight``), whatever prefix or
    adapter-name infix the file used. Arguments as for ``read_adapter_file`` (with ``keys``, tensors outside them are
    not read)."""
    adapter = read_adapter_file(path_or_dir, config=config, allow_pickle=allow_pickle, keys=keys)
    return adapter.config, {key: tensor for key, (_, tensor) in adapter.tensors.items()}


@dataclasses.dataclass
class AdapterFile:
    """An adapter as read from its files, checked as files (not against any model)."""

    config: LoraConfig
    config_origin: str  # for error messages: the config file, or "the given config"
    weights_path: Path
    tensors: dict[str, tuple[str, torch.Tensor]]  # normalised key -> (key in the file, tensor)
    skipped: list[str] = dataclasses.field(default_factory=list)  # file keys outside ``keys``, never read


def read_adapter_file(
    path_or_dir: str | os.PathLike,
    *,
    config: LoraConfig | None = None,
    allow_pickle: bool = False,
    keys: Callable[[LoraConfig], Collection[str]] | None = None,
) -> AdapterFile:
    """Read a PEFT-format adapter: ``path_or_dir`` is a directory with ``adapter_config.json`` and
    ``adapter_model.safetensors``, or the weights file itself (its config is read from the same directory unless
    ``config`` is given; ``config`` replaces the file's). A pickled ``adapter_model.bin`` (or ``.pt`` / ``.pth``) is
    refused unless ``allow_pickle=True`` (then read with ``torch.load(weights_only=True)``); any other file that is
    not ``.safetensors`` is refused. Raises ``FileNotFoundError`` for missing files, ``ValueError`` /
    ``NotImplementedError`` for corrupt files and configs fastlora cannot honour, and ``TypeError`` for config fields
    of the wrong type, each naming the file (and the field).

    ``keys(config)``, when given, names the (normalised) keys the reader can use, from the adapter's config, before
    any tensor is read: a safetensors header far larger than those keys need is refused unparsed, and tensors outside
    them are never read (their file keys are listed in ``skipped``), so a file declaring hundreds of thousands of
    tensors costs nothing. Weights written by ``fastlora.save_adapter`` record the config fields they were saved with:
    a config file that disagrees (a save interrupted between its two renames, or a config edited by hand) is refused,
    naming the fields; ``config=`` replaces the file's config and skips that check."""
    path = Path(path_or_dir)
    if config is not None and not isinstance(config, LoraConfig):
        raise TypeError(f"load_adapter: config must be a fastlora.LoraConfig, got {type(config).__name__}")
    weights_path, config_path = _adapter_files(path, allow_pickle, need_config=config is None)
    from_file = config is None
    origin = str(config_path) if from_file else "the given config"
    config = _read_config(config_path) if from_file else config
    accepted = None if keys is None else set(keys(config))
    tensors, skipped, metadata = _read_weights(weights_path, accepted)
    if from_file:
        _check_pair(config, metadata.get(SAVED_CONFIG_KEY), config_path, weights_path)
    return AdapterFile(config, origin, weights_path, tensors, skipped)


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
    if _is_pickle(weights):
        if not allow_pickle:
            raise ValueError(
                f"load_adapter: {weights} is a pickle file; unpickling can run arbitrary code, so it is refused. "
                "Convert it to safetensors, or pass allow_pickle=True to read it (with torch.load(weights_only=True))"
            )
    elif weights.suffix.lower() != ".safetensors":
        raise ValueError(f"load_adapter: {weights} is not a safetensors file (expected {SAFETENSORS_NAME})")
    config_path = directory / CONFIG_NAME
    if need_config and not config_path.is_file():
        raise FileNotFoundError(f"load_adapter: {config_path} not found (or pass config=fastlora.LoraConfig(...))")
    return weights, config_path


def _is_pickle(path: Path) -> bool:
    return path.suffix.lower() in PICKLE_SUFFIXES


def _read_config(path: Path) -> LoraConfig:
    """The ``LoraConfig`` in ``path``; errors name the file (and, from ``LoraConfig``, the field)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: absurdly deep nesting
        raise ValueError(f"load_adapter: {path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"load_adapter: {path} does not hold a JSON object (it holds a {type(data).__name__})")
    try:
        return LoraConfig.from_peft_dict(data)
    except (ValueError, TypeError, NotImplementedError) as e:
        raise type(e)(f"load_adapter: {path}: {e}") from e


def _read_weights(
    path: Path, accepted: set[str] | None
) -> tuple[dict[str, tuple[str, torch.Tensor]], list[str], dict[str, str]]:
    """``(tensors, skipped, metadata)``: the file's tensors under their normalised keys, only those in ``accepted``
    when given (the file keys of the others in ``skipped``, unread), and the safetensors metadata."""
    if _is_pickle(path):  # _adapter_files let through only safetensors and (allowed) pickle files
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch.load raises many types for corrupt files and refused objects
            raise ValueError(f"load_adapter: {path} could not be read with torch.load(weights_only=True): {e}") from e
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise ValueError(f"load_adapter: {path} does not hold a dict of tensors keyed by str")
        if not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"load_adapter: {path} does not hold a dict of tensors")
        wanted, skipped = _select(state, accepted)
        return _normalized({key: state[key] for key in wanted}, path), skipped, {}
    _check_header_size(path, accepted)
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            wanted, skipped = _select(f.keys(), accepted)
            state = {key: f.get_tensor(key) for key in wanted}
    except SafetensorError as e:
        raise ValueError(f"load_adapter: {path} is not a readable safetensors file (truncated?): {e}") from e
    return _normalized(state, path), skipped, metadata


def _check_header_size(path: Path, accepted: set[str] | None) -> None:
    """Refuse, before parsing it, a safetensors header far larger than the accepted keys need."""
    if accepted is None:
        return
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) < 8:
        raise ValueError(f"load_adapter: {path} is not a readable safetensors file (truncated to {len(head)} bytes)")
    size = int.from_bytes(head, "little")
    limit = HEADER_BYTES_BASE + HEADER_BYTES_PER_KEY * len(accepted)
    if size > limit:
        raise ValueError(
            f"load_adapter: {path} has a safetensors header of {size:,d} bytes, far more than an adapter of at most "
            f"{len(accepted)} tensors for this model needs (limit {limit:,d} bytes); refusing to parse it"
        )


def _select(file_keys, accepted: set[str] | None) -> tuple[list[str], list[str]]:
    """The file keys to read (every key, or those whose normalised key is accepted) and the others; the frozen base
    copies PEFT saves beside a module to save are neither (never needed)."""
    wanted, skipped = [], []
    for file_key in file_keys:
        key = _normalized_key(file_key)
        if key is not None:
            (wanted if accepted is None or key in accepted else skipped).append(file_key)
    return wanted, skipped


def _normalized_key(file_key: str) -> str | None:
    """A file key in PEFT's saved form without ``base_model.model.`` (``lora_key``); a ``modules_to_save`` wrapper
    entry as the module's own key; None for the wrapper's ``original_module`` copy.

    Also accepted: keys without the prefix (adapters saved by transformers' PEFT integration), the adapter name
    left in (``lora_A.default.weight``)."""
    key = lora_key(file_key)
    wrapped = None if LORA_KEY.match(key) else WRAPPED_KEY.match(key)
    if wrapped is None:
        return key
    if wrapped["kind"] == "original_module":
        return None  # the frozen base copy, identical to the model's own module
    return f"{wrapped['module']}.{wrapped['rest']}"


def _normalized(state: dict[str, torch.Tensor], path: Path) -> dict[str, tuple[str, torch.Tensor]]:
    """``{normalised key: (key in the file, tensor)}``: floating-point tensors only, and two file keys of one
    normalised key must agree."""
    out: dict[str, tuple[str, torch.Tensor]] = {}
    for file_key, tensor in state.items():
        if not tensor.is_floating_point():
            raise ValueError(f"load_adapter: {path}: {file_key!r} is {tensor.dtype}, not floating point")
        key = _normalized_key(file_key)
        if key in out:
            if not torch.equal(out[key][1], tensor):
                raise ValueError(f"load_adapter: {path}: {out[key][0]!r} and {file_key!r} disagree")
            continue
        out[key] = (file_key, tensor)
    return out


# ------------------------------------------------------------------------------------------- config / weights pair


def saved_config_metadata(config_data: dict[str, Any]) -> dict[str, str]:
    """The safetensors metadata ``save_adapter`` writes with the config ``config_data``: the fields that decide how
    the weights are read (``_PAIR_FIELDS``), so that a reader can tell whether the config file beside the weights is
    the one they were saved with. PEFT ignores metadata it does not know."""
    fields = {name: config_data.get(name) for name in _PAIR_FIELDS}
    return {"format": "pt", SAVED_CONFIG_KEY: json.dumps(fields, sort_keys=True)}


def _check_pair(config: LoraConfig, saved: str | None, config_path: Path, weights_path: Path) -> None:
    if saved is None:
        return  # written by PEFT or another tool: nothing recorded to compare with
    try:
        recorded = json.loads(saved)
    except json.JSONDecodeError as e:
        raise ValueError(f"load_adapter: {weights_path}: its {SAVED_CONFIG_KEY!r} metadata is not valid JSON") from e
    if not isinstance(recorded, dict):
        raise ValueError(f"load_adapter: {weights_path}: its {SAVED_CONFIG_KEY!r} metadata is not a JSON object")
    current = config.to_peft_dict()
    differ = [
        f"{name}: weights saved with {recorded[name]!r}, config file says {current.get(name)!r}"
        for name in _PAIR_FIELDS
        if name in recorded and not _same(recorded[name], current.get(name))
    ]
    if differ:
        raise ValueError(
            f"load_adapter: {config_path} is not the config {weights_path} was saved with ({'; '.join(differ)}). An "
            "interrupted save_adapter leaves new weights beside the old config: save the adapter again, or pass "
            "config=fastlora.LoraConfig(...) to read the weights with a config of your choice"
        )


def _same(a: Any, b: Any) -> bool:
    """Config values equal up to the order of name lists and the spelling of numbers (16 == 16.0)."""
    if isinstance(a, list) and isinstance(b, list):
        return sorted(map(json.dumps, a)) == sorted(map(json.dumps, b))
    return a == b


def listing(keys, limit: int = 8) -> str:
    """``keys`` sorted and joined for an error message, the first ``limit`` of them."""
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")
