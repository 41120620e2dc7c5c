"""Reading and validating an adapter for an ``AdapterPool``, before the pool changes.

Everything is checked before anything is kept, so a bad adapter raises and leaves the pool, its slots and every
registered adapter exactly as they were: the file (``fastlora.peft_format``'s errors for missing, corrupt or pickled
files and bad configs), unsupported config fields (``bias`` other than ``"none"``, ``modules_to_save``: per-adapter
base-layer changes a shared base model cannot serve), every key (a LoRA ``A`` / ``B`` pair per module; a module the
pool does not adapt is named in the error), every shape against the layer's ``K`` and ``N``, each layer's rank
against the config's ``rank_for`` and against ``max_rank``, floating dtypes, and finite values (after the cast to the
pool's dtype, so an fp32 value that overflows fp16 is caught). The config must select exactly the modules the weights
cover, as PEFT would adapt them.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..config import LoraConfig
from ..peft_format import LORA_KEY, listing, lora_key, read_adapter

AdapterSource = str | os.PathLike | Mapping[str, torch.Tensor]
# Config fields that change the base model per adapter: a shared base model cannot serve them.
UNSERVABLE_FIELDS = {"bias": "none", "modules_to_save": None}


@dataclasses.dataclass(frozen=True)
class LayerWeights:
    """One layer of a validated adapter, on the host in the pool's dtype."""

    lora_A: torch.Tensor  # [r, K]
    lora_B: torch.Tensor  # [N, r]
    scaling: float

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]


def read_adapter_source(
    adapter: AdapterSource, config: LoraConfig | Mapping[str, Any] | None, allow_pickle: bool
) -> tuple[LoraConfig, dict[str, torch.Tensor], str]:
    """``(config, tensors, origin)`` of an adapter given as a PEFT-format path or as a state dict (see
    ``AdapterPool.register``): tensor keys module-relative, LoRA keys in PEFT's saved form; ``origin`` names the
    source in error messages."""
    if isinstance(adapter, Mapping):
        tensors = {}
        for key, tensor in adapter.items():
            if not isinstance(tensor, torch.Tensor):
                raise ValueError(f"AdapterPool.register: state dict entry {key!r} is not a tensor")
            module_key = lora_key(key)
            if module_key in tensors:
                raise ValueError(f"AdapterPool.register: state dict has two entries for {module_key!r}")
            tensors[module_key] = tensor
        if config is None:
            raise ValueError(
                "AdapterPool.register: a state dict needs config= (a fastlora.LoraConfig, or PEFT config fields "
                "such as {'r': 8, 'lora_alpha': 16}) for its scaling"
            )
        if not isinstance(config, LoraConfig):
            fields = dict(config)
            if fields.get("target_modules") is None:
                fields["target_modules"] = sorted({k.rsplit(".", 2)[0] for k in tensors if LORA_KEY.match(k)})
            config = LoraConfig.from_peft_dict(fields)
        return config, tensors, "the state dict"
    if isinstance(adapter, (str, os.PathLike)):
        if config is not None and not isinstance(config, LoraConfig):
            config = LoraConfig.from_peft_dict(dict(config))
        config, tensors = read_adapter(adapter, config=config, allow_pickle=allow_pickle)
        return config, tensors, str(Path(adapter))
    raise TypeError(f"AdapterPool.register: expected a path or a state dict, got {type(adapter).__name__}")


def validate_adapter(
    name: str,
    config: LoraConfig,
    tensors: dict[str, torch.Tensor],
    origin: str,
    *,
    shapes: Mapping[str, tuple[int, int]],
    select: Callable[[LoraConfig], Iterable[str]],
    max_rank: int,
    dtype: torch.dtype,
    pin: bool,
) -> dict[str, LayerWeights]:
    """Per-layer weights of adapter ``name`` for a pool over ``shapes`` (``{module: (in_features, out_features)}``),
    in ``dtype`` (pinned host memory with ``pin``), after every check of the module docstring. ``select`` maps the
    config to the modules it adapts in the model."""
    where = f"AdapterPool.register: {origin}"
    for field, default in UNSERVABLE_FIELDS.items():
        if getattr(config, field) not in (default, None, []):
            raise NotImplementedError(
                f"{where}: {field}={getattr(config, field)!r} changes the base model per adapter, which a shared "
                f"base model cannot serve (only {field}={default!r} is supported)"
            )
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = LORA_KEY.match(key)
        if match is None:
            raise ValueError(f"{where}: {key!r} is not a LoRA weight (lora_A / lora_B); only LoRA weights are served")
        module = match["module"]
        if module not in shapes:
            raise ValueError(
                f"{where}: module {module!r} is not adapted by this pool (unknown module); the pool adapts: "
                f"{listing(shapes)}"
            )
        pairs.setdefault(module, {})[match["which"]] = tensor
    selected = set(select(config))
    if not selected:
        raise ValueError(
            f"{where}: adapter {name!r}: the config's target_modules={config.target_modules!r} select no module of "
            f"this pool (nothing to adapt); the pool adapts: {listing(shapes)}"
        )
    unknown = selected - set(shapes)
    if unknown:
        raise ValueError(
            f"{where}: the config's target_modules={config.target_modules!r} select modules this pool does not "
            f"adapt (unknown modules): {listing(unknown)}; the pool adapts: {listing(shapes)}"
        )
    if set(pairs) != selected:
        raise ValueError(
            f"{where}: the weights do not match the config's target_modules={config.target_modules!r}: modules "
            f"selected without weights: {listing(selected - set(pairs)) or 'none'}; weights of modules it does "
            f"not select: {listing(set(pairs) - selected) or 'none'}"
        )
    layers = {}
    for module in sorted(pairs):
        pair = pairs[module]
        for which in ("lora_A", "lora_B"):
            if which not in pair:
                raise ValueError(f"{where}: {module}.{which}.weight is missing")
        in_features, out_features = shapes[module]
        a, b = pair["lora_A"], pair["lora_B"]
        for which, t in (("lora_A", a), ("lora_B", b)):
            if not t.is_floating_point():
                raise ValueError(f"{where}: {module}.{which}.weight is {t.dtype}, not floating point")
            if t.dim() != 2:
                raise ValueError(f"{where}: {module}.{which}.weight must be 2-D, got shape {tuple(t.shape)}")
        r = a.shape[0]
        if a.shape[1] != in_features or b.shape != (out_features, r):
            raise ValueError(
                f"{where}: {module}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit the layer "
                f"(expected [r, {in_features}] and [{out_features}, r])"
            )
        if r < 1 or r > max_rank:
            raise ValueError(f"{where}: {module} has rank {r}, over the pool's max_rank={max_rank}")
        if r != config.rank_for(module):
            raise ValueError(
                f"{where}: {module} has rank {r} but the config gives it r={config.rank_for(module)} (its scaling "
                "depends on it; fix r / rank_pattern)"
            )
        a, b = a.detach().to("cpu", dtype), b.detach().to("cpu", dtype)
        for which, t in (("lora_A", a), ("lora_B", b)):
            if not torch.isfinite(t).all():
                raise ValueError(f"{where}: {module}.{which}.weight has non-finite values (in {dtype})")
        a, b = a.contiguous(), b.contiguous()
        if pin:
            a, b = a.pin_memory(), b.pin_memory()
        layers[module] = LayerWeights(a, b, config.scaling_for(module))
    return layers
