"""``LoraConfig``: PEFT's LoRA configuration, with PEFT's field names and PEFT's module-matching semantics.

A config saved by PEFT (``adapter_config.json``) loads into a ``LoraConfig`` and a ``LoraConfig`` saves as one that
PEFT reads. Fields this library cannot honour exactly (DoRA, PiSSA/OLoRA/LoftQ initialisation, LoRA biases,
parameter targeting, ...) raise ``NotImplementedError`` naming the field: never a silent change of the math.
``lora_scaling`` is the ``alpha / r`` (or ``alpha / sqrt(r)``) every layer multiplies its update by.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable
from typing import Any

ALL_LINEAR = "all-linear"
_INIT_CHOICES = (True, False, "gaussian")
_BIAS_CHOICES = ("none", "all", "lora_only")
# PEFT fields that carry no meaning for the computation (bookkeeping, or options of other PEFT methods).
_IGNORED_PEFT_FIELDS = {
    "peft_type", "task_type", "inference_mode", "base_model_name_or_path", "revision", "auto_mapping",
    "peft_version", "exclude_modules", "megatron_config", "megatron_core", "runtime_config",
}  # fmt: skip
# PEFT fields whose non-default values change the math in ways fastlora does not implement.
_UNSUPPORTED_DEFAULTS = {
    "use_dora": False, "lora_bias": False, "target_parameters": None, "loftq_config": {}, "use_qalora": False,
    "trainable_token_indices": None, "eva_config": None, "corda_config": None, "alora_invocation_tokens": None,
    "arrow_config": None, "qalora_group_size": 16, "ensure_weight_tying": False, "layers_pattern_regex": None,
    "layer_replication": None, "lora_ga_config": None, "velora_config": None, "monteclora_config": None,
    "use_bdlora": None, "kasa_config": None,
}  # fmt: skip
# Of those, the ones a user is most likely to pass to ``LoraConfig`` directly are fields, so they fail by name.
_UNSUPPORTED_FIELDS = ("use_dora", "lora_bias", "target_parameters", "layer_replication")


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool = False) -> float:
    """``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rank-stabilised LoRA."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


@dataclasses.dataclass
class LoraConfig:
    """Which modules get LoRA and how, as in ``peft.LoraConfig``.

    ``target_modules``: a list (a module matches when its full name equals an entry or ends with ``"." + entry``),
    a string (a regex that must match the full name), or ``"all-linear"`` (every ``nn.Linear`` / ``Conv1D`` except
    the output head). ``rank_pattern`` / ``alpha_pattern``: a key matches a module name when
    ``re.match(rf"(.*\\.)?({key})$", name)``; the first matching key wins. ``layers_to_transform`` keeps only
    modules inside those layer indices (found after ``layers_pattern`` in the name, or the first numbered segment).
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    modules_to_save: list[str] | None = None
    init_lora_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: dict[str, float] = dataclasses.field(default_factory=dict)
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    use_dora: bool = False
    lora_bias: bool = False
    target_parameters: list[str] | None = None
    layer_replication: list | None = None

    def __post_init__(self):
        set_unsupported = [f"{k}={getattr(self, k)!r}" for k in _UNSUPPORTED_FIELDS if getattr(self, k)]
        if set_unsupported:
            raise NotImplementedError(f"LoraConfig: not supported by fastlora: {', '.join(set_unsupported)}")
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ValueError(f"LoraConfig: r must be an integer >= 1, got {self.r!r}")
        for key, rank in self.rank_pattern.items():
            if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
                raise ValueError(f"LoraConfig: rank_pattern[{key!r}] must be an integer >= 1, got {rank!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"LoraConfig: lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in _BIAS_CHOICES:
            raise ValueError(f"LoraConfig: bias must be one of {_BIAS_CHOICES}, got {self.bias!r}")
        if self.init_lora_weights not in _INIT_CHOICES:
            raise NotImplementedError(
                f"LoraConfig: init_lora_weights={self.init_lora_weights!r} is not supported "
                f"(supported: {_INIT_CHOICES}); it would change the adapter's initialisation"
            )
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("LoraConfig: layers_pattern is only used together with layers_to_transform")
        if isinstance(self.target_modules, str) and (self.layers_to_transform is not None or self.layers_pattern):
            raise ValueError(
                "LoraConfig: layers_to_transform / layers_pattern cannot be used when target_modules is a str "
                "(a regex or 'all-linear'), as in PEFT"
            )
        if self.target_modules is None:
            raise ValueError("LoraConfig: target_modules is required (a list of names, a regex, or 'all-linear')")

    # ------------------------------------------------------------------------------------------------ matching

    @property
    def all_linear(self) -> bool:
        """``target_modules="all-linear"``: every linear layer but the model's output head."""
        return isinstance(self.target_modules, str) and self.target_modules.lower() == ALL_LINEAR

    def saves_module(self, name: str) -> bool:
        """Whether the module called ``name`` is one of ``modules_to_save`` (its name ends with an entry)."""
        return any(names_module(key, name) for key in self.modules_to_save or ())

    def is_excluded(self, name: str) -> bool:
        if self.exclude_modules:
            if isinstance(self.exclude_modules, str):
                if re.fullmatch(self.exclude_modules, name):
                    return True
            elif name in self.exclude_modules or any(name.endswith(f".{e}") for e in self.exclude_modules):
                return True
        return bool(self.modules_to_save) and any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in self.modules_to_save)

    def matches(self, name: str) -> bool:
        """Whether the module called ``name`` is a target (for ``"all-linear"``, before the type check)."""
        if self.is_excluded(name):
            return False
        if isinstance(self.target_modules, str):
            if self.all_linear:
                return True
            return re.fullmatch(self.target_modules, name) is not None
        if name in self.target_modules:
            return True
        if not any(name.endswith(f".{t}") for t in self.target_modules):
            return False
        if self.layers_to_transform is None or self.layers_to_transform == []:
            return True
        index = layer_index(name, self.layers_pattern)
        if index is None:
            return False
        if isinstance(self.layers_to_transform, int):
            return index == self.layers_to_transform
        return index in self.layers_to_transform

    def rank_for(self, name: str) -> int:
        return self.rank_pattern.get(_pattern_key(self.rank_pattern, name), self.r)

    def alpha_for(self, name: str) -> float:
        return self.alpha_pattern.get(_pattern_key(self.alpha_pattern, name), self.lora_alpha)

    def scaling_for(self, name: str) -> float:
        """The scaling of the layer called ``name``: ``lora_scaling`` of its rank and alpha."""
        return lora_scaling(self.rank_for(name), self.alpha_for(name), self.use_rslora)

    @property
    def scaling(self) -> float:
        """The scaling of a layer no pattern singles out."""
        return lora_scaling(self.r, self.lora_alpha, self.use_rslora)

    # ------------------------------------------------------------------------------------------------ PEFT files

    def to_peft_dict(self) -> dict[str, Any]:
        """The ``adapter_config.json`` content PEFT writes for this configuration."""
        target = self.target_modules
        return {
            "peft_type": "LORA",
            "task_type": self.task_type,
            "base_model_name_or_path": self.base_model_name_or_path,
            "inference_mode": True,
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout,
            "target_modules": sorted(target) if isinstance(target, list) else target,
            "exclude_modules": self.exclude_modules,
            "fan_in_fan_out": self.fan_in_fan_out,
            "bias": self.bias,
            "use_rslora": self.use_rslora,
            "modules_to_save": self.modules_to_save,
            "init_lora_weights": self.init_lora_weights,
            "layers_to_transform": self.layers_to_transform,
            "layers_pattern": self.layers_pattern,
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
            "use_dora": False,
            "lora_bias": False,
        }

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any]) -> LoraConfig:
        """Read a PEFT ``adapter_config.json``. Unsupported options with non-default values raise
        ``NotImplementedError`` naming them; unknown keys are refused too, rather than ignored."""
        peft_type = data.get("peft_type", "LORA")
        if str(getattr(peft_type, "value", peft_type)).upper() != "LORA":
            raise NotImplementedError(f"LoraConfig: peft_type {peft_type!r} is not LoRA")
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs, unsupported, unknown = {}, [], []
        for key, value in data.items():
            if key in fields:
                kwargs[key] = value
            elif key in _UNSUPPORTED_DEFAULTS:
                if value not in (_UNSUPPORTED_DEFAULTS[key], None, False, {}, []):
                    unsupported.append(f"{key}={value!r}")
            elif key not in _IGNORED_PEFT_FIELDS:
                unknown.append(key)
        if unsupported:
            raise NotImplementedError(f"LoraConfig: unsupported PEFT options: {', '.join(unsupported)}")
        if unknown:
            raise NotImplementedError(f"LoraConfig: unknown PEFT options (not implemented here): {', '.join(unknown)}")
        return cls(**kwargs)


def names_module(key: str, name: str) -> bool:
    """PEFT's ``modules_to_save`` rule: ``key`` names the module ``name`` when the name ends with it."""
    return re.match(rf"(^|.*\.){key}$", name) is not None


def _pattern_key(patterns: Iterable[str], name: str) -> str | None:
    """PEFT's ``get_pattern_key``: the first key matching the end of ``name`` on a dot boundary."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


def layer_index(name: str, layers_pattern: list[str] | str | None) -> int | None:
    """The transformer-layer index in a module name, as PEFT finds it (the first numbered segment, or the number
    after one of ``layers_pattern``)."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        match = None
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if match is not None:
                break
    return int(match.group("idx")) if match else None
