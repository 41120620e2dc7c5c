"""``LoraConfig``: PEFT's LoRA configuration, with PEFT's field names and PEFT's module-matching semantics.

A config saved by PEFT (``adapter_config.json``) loads into a ``LoraConfig`` and a ``LoraConfig`` saves as one that
PEFT reads. Fields this library cannot honour exactly (DoRA, PiSSA/OLoRA/LoftQ initialisation, LoRA biases, ...)
raise ``NotImplementedError`` naming the field: never a silent change of the math.
``lora_scaling`` is the ``alpha / r`` (or ``alpha / sqrt(r)``) every layer multiplies its update by.

``target_parameters`` (LoRA on parameters rather than modules: the fused 3-D expert weights and the router weights of
mixture-of-experts models) follows PEFT 0.21: ``LoraConfig.targets_parameter`` is its matching rule, and
``moe_recipe`` the rewrite PEFT applies to a config when it meets a model (transformers v5's fused MoE layers, and
PEFT's default ``target_modules``).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import time
from collections.abc import Iterable, Mapping
from typing import Any

import regex

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
    "use_dora": False, "lora_bias": False, "loftq_config": {}, "use_qalora": False,
    "trainable_token_indices": None, "eva_config": None, "corda_config": None, "alora_invocation_tokens": None,
    "arrow_config": None, "qalora_group_size": 16, "ensure_weight_tying": False, "layers_pattern_regex": None,
    "layer_replication": None, "lora_ga_config": None, "velora_config": None, "monteclora_config": None,
    "use_bdlora": None, "kasa_config": None,
}  # fmt: skip
# Of those, the ones a user is most likely to pass to ``LoraConfig`` directly are fields, so they fail by name.
_UNSUPPORTED_FIELDS = ("use_dora", "lora_bias", "layer_replication")


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool = False) -> float:
    """``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rank-stabilised LoRA. Raises ``ValueError`` when the result
    is not a finite float32 number: the kernels take the scaling as an fp32 scalar, and an infinite or NaN one turns
    every output of the layer into inf/NaN."""
    try:
        scaling = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
    except OverflowError:  # an integer too large for a float
        scaling = math.inf
    if not (math.isfinite(scaling) and abs(scaling) <= _FP32_MAX):
        formula = "lora_alpha / sqrt(r)" if use_rslora else "lora_alpha / r"
        raise ValueError(
            f"lora_scaling: {formula} with r={r!r}, lora_alpha={lora_alpha!r} is {scaling!r}, not a finite float32 "
            "number"
        )
    return float(scaling)


@dataclasses.dataclass
class LoraConfig:
    """Which modules get LoRA and how, as in ``peft.LoraConfig``.

    ``target_modules``: a list (a module matches when its full name equals an entry or ends with ``"." + entry``),
    a string (a regex that must match the full name), or ``"all-linear"`` (every ``nn.Linear`` / ``Conv1D`` except
    the output head). ``rank_pattern`` / ``alpha_pattern``: a key matches a module name when
    ``re.match(rf"(.*\\.)?({key})$", name)``; the first matching key wins. ``layers_to_transform`` keeps only
    modules inside those layer indices (found after ``layers_pattern`` in the name, or the first numbered segment).
    ``modules_to_save``: modules whose name ends with an entry (a plain string suffix, as in PEFT) are saved whole.
    ``target_parameters``: a list of parameter names, matched like a ``target_modules`` list against a parameter's
    full name (see ``targets_parameter``); with it, ``target_modules`` may be ``None`` (PEFT then adds the default
    modules of some model types, see ``moe_recipe``) or ``[]`` (no module).

    Construction checks every field (``TypeError`` for a value of the wrong type, ``ValueError`` for a wrong value,
    both naming the field), since configs come from downloaded ``adapter_config.json`` files: ``lora_alpha`` and
    ``alpha_pattern`` values must give a finite float32 scaling with every rank, and every regex (a ``target_modules``
    or ``exclude_modules`` string, ``rank_pattern`` / ``alpha_pattern`` keys, ``layers_pattern`` and
    ``modules_to_save`` entries, as PEFT interpolates them) is compiled once, here. Matching runs those regexes with
    the ``regex`` module, which can be interrupted and releases the GIL for any match that runs over a millisecond:
    a config gets ``MATCH_BUDGET_S`` seconds of matching in all, and a pattern that backtracks catastrophically is
    refused with a ``ValueError`` naming it instead of freezing the process. Results are identical to PEFT's
    matching with Python's ``re``.
    """

    # The regexes compiled from the fields and the matching time left (a ``_Regexes``) live in a slot, outside
    # ``__dict__``, so that ``LoraConfig(**vars(config))`` and ``dataclasses.asdict`` still see only the fields.
    __slots__ = ("__dict__", "__weakref__", "_regexes")

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
        self._check_types()
        if self.r < 1:
            raise ValueError(f"LoraConfig: r must be an integer >= 1, got {self.r!r}")
        for key, rank in self.rank_pattern.items():
            if rank < 1:
                raise ValueError(f"LoraConfig: rank_pattern[{key!r}] must be an integer >= 1, got {rank!r}")
        self._check_scalings()
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
        if self.target_modules is None and not self.target_parameters:
            raise ValueError("LoraConfig: target_modules is required (a list of names, a regex, or 'all-linear')")
        if self.target_parameters and self.bias != "none":
            # PEFT names the biases of a module whose parameters it wraps by its wrapper nesting (and trains every
            # parameter whose name contains "bias", the experts' ``*_bias`` included): not reproduced here.
            raise NotImplementedError(
                f"LoraConfig: bias={self.bias!r} with target_parameters is not supported by fastlora; use bias='none'"
            )
        if self.target_parameters and self.fan_in_fan_out:
            # A targeted parameter is used as stored; PEFT's ParamWrapper refuses the flag rather than ignore it.
            raise ValueError("LoraConfig: fan_in_fan_out=True cannot be used with target_parameters, as in PEFT")
        if self.modules_to_save and "" in self.modules_to_save:
            # Every name ends with "": PEFT would save (and exclude from LoRA) every module of the model.
            raise ValueError("LoraConfig: modules_to_save holds an empty name, which would name every module")
        self._regexes = _Regexes()
        self._compile_regexes()

    def _check_types(self):
        """Refuse values of the wrong type (a ``TypeError`` naming the field) and normalise sets and tuples of names
        to lists, before any check compares or sorts them."""
        for field in ("target_modules", "exclude_modules", "modules_to_save", "layers_pattern"):
            value = getattr(self, field)
            allowed = "None or a list of str" if field == "modules_to_save" else "None, a str or a list of str"
            if isinstance(value, (list, tuple, set, frozenset)):
                if not all(isinstance(v, str) for v in value):
                    raise TypeError(f"LoraConfig: {field} must be {allowed}, got {value!r}")
                if not isinstance(value, list):
                    setattr(self, field, sorted(value))
            elif value is not None and (field == "modules_to_save" or not isinstance(value, str)):
                raise TypeError(f"LoraConfig: {field} must be {allowed}, got {value!r}")
        value = self.target_parameters
        if isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(v, str) for v in value):
            if not isinstance(value, list):
                self.target_parameters = sorted(value)
        elif value is not None:
            # A str would read as a list of one-letter names; PEFT does not take a regex here either.
            raise TypeError(f"LoraConfig: target_parameters must be None or a list of str, got {value!r}")
        if isinstance(self.layers_to_transform, tuple):
            self.layers_to_transform = list(self.layers_to_transform)
        layers = self.layers_to_transform
        if not (layers is None or _is_int(layers) or (isinstance(layers, list) and all(map(_is_int, layers)))):
            raise TypeError(f"LoraConfig: layers_to_transform must be None, an int or a list of ints, got {layers!r}")
        _check_number("r", self.r, integer=True)
        _check_number("lora_alpha", self.lora_alpha)
        _check_number("lora_dropout", self.lora_dropout, kind="a real number in [0, 1)")
        for field in ("fan_in_fan_out", "use_rslora"):
            # PEFT takes any truthy value (use_rslora="no" would be True); a JSON string here is a mistake.
            if not isinstance(getattr(self, field), bool):
                raise TypeError(f"LoraConfig: {field} must be True or False, got {getattr(self, field)!r}")
        for field in ("bias", "task_type", "base_model_name_or_path"):
            value = getattr(self, field)
            if not (isinstance(value, str) or (value is None and field != "bias")):
                allowed = "a str" if field == "bias" else "None or a str"
                raise TypeError(f"LoraConfig: {field} must be {allowed}, got {value!r}")
        for field, integer in (("rank_pattern", True), ("alpha_pattern", False)):
            patterns = getattr(self, field)
            if not isinstance(patterns, dict):
                raise TypeError(f"LoraConfig: {field} must be a dict of {{regex: value}}, got {patterns!r}")
            for key, value in patterns.items():
                if not isinstance(key, str):
                    raise TypeError(f"LoraConfig: {field} keys must be str (regexes), got {key!r}")
                _check_number(f"{field}[{key!r}]", value, integer=integer)

    def _check_scalings(self):
        """Every (rank, alpha) pair a layer can get must give a finite float32 scaling: ``r`` or any ``rank_pattern``
        rank with ``lora_alpha`` or any ``alpha_pattern`` value. The largest scaling of an alpha is the one with the
        smallest rank, so that pair is the one checked (a config may hold thousands of patterns)."""
        ranks = {"r": self.r, **{f"rank_pattern[{k!r}]": v for k, v in self.rank_pattern.items()}}
        rank_field = min(ranks, key=ranks.__getitem__)
        rank = ranks[rank_field]
        alphas = {"lora_alpha": self.lora_alpha, **{f"alpha_pattern[{k!r}]": v for k, v in self.alpha_pattern.items()}}
        for alpha_field, alpha in alphas.items():
            if not _is_finite(alpha):
                raise ValueError(f"LoraConfig: {alpha_field} must be a finite real number, got {alpha!r}")
            try:
                lora_scaling(rank, alpha, self.use_rslora)
            except ValueError:
                formula = f"/ sqrt({rank_field})" if self.use_rslora else f"/ {rank_field}"
                raise ValueError(
                    f"LoraConfig: {alpha_field}={alpha!r} gives a scaling {alpha_field} {formula} "
                    f"(with {rank_field}={rank!r}) that is not a finite float32 number, the kernels' scaling type"
                ) from None

    def _compile_regexes(self):
        """Compile every regex the fields hold, as PEFT builds them, so that a bad one fails here, naming it."""
        regexes = self._regexes
        for field in ("target_modules", "exclude_modules"):
            value = getattr(self, field)
            if isinstance(value, str) and not (field == "target_modules" and self.all_linear):
                regexes.compile(field, value, _FULL)
        for key in self.rank_pattern:
            regexes.compile("rank_pattern", key, _PATTERN_KEY)
        for key in self.alpha_pattern:
            regexes.compile("alpha_pattern", key, _PATTERN_KEY)
        for entry in self.modules_to_save or ():
            regexes.compile("modules_to_save", entry, _INSIDE_SAVED)
        if self.layers_to_transform is not None and self.layers_pattern:
            for pattern in _as_list(self.layers_pattern):
                regexes.compile("layers_pattern", pattern, _LAYERS_PATTERN)

    def _matcher(self) -> _Regexes:
        try:
            return self._regexes
        except AttributeError:  # an instance built without __init__ (unpickled from an older version)
            self._regexes = _Regexes()
            return self._regexes

    # ------------------------------------------------------------------------------------------------ matching

    @property
    def all_linear(self) -> bool:
        """``target_modules="all-linear"``: every linear layer but the model's output head."""
        return isinstance(self.target_modules, str) and self.target_modules.lower() == ALL_LINEAR

    def saves_module(self, name: str) -> bool:
        """Whether the module called ``name`` is one of ``modules_to_save``: its name ends with an entry, as a plain
        string (PEFT's rule, see ``names_module``)."""
        return any(names_module(key, name) for key in self.modules_to_save or ())

    def is_excluded(self, name: str) -> bool:
        """Whether ``exclude_modules`` excludes the module called ``name``, or it lies inside (or is) a module of
        ``modules_to_save``, which LoRA never targets (PEFT's ``check_target_module_exists``)."""
        regexes = self._matcher()
        if self.exclude_modules:
            if isinstance(self.exclude_modules, str):
                if regexes.match("exclude_modules", self.exclude_modules, _FULL, name):
                    return True
            elif name in self.exclude_modules or any(name.endswith(f".{e}") for e in self.exclude_modules):
                return True
        return any(regexes.match("modules_to_save", m, _INSIDE_SAVED, name) for m in self.modules_to_save or ())

    def matches(self, name: str) -> bool:
        """Whether the module called ``name`` is a target (for ``"all-linear"``, before the type check). With
        ``target_modules=None`` (allowed with ``target_parameters``) no module is: ``moe_recipe`` gives the modules
        PEFT would add for the model's type."""
        if self.is_excluded(name) or self.target_modules is None:
            return False
        if isinstance(self.target_modules, str):
            if self.all_linear:
                return True
            return self._matcher().match("target_modules", self.target_modules, _FULL, name) is not None
        if name in self.target_modules:
            return True
        if not any(name.endswith(f".{t}") for t in self.target_modules):
            return False
        if self.layers_to_transform is None or self.layers_to_transform == []:
            return True
        index = layer_index(name, self.layers_pattern, _regexes=self._matcher())
        if index is None:
            return False
        if isinstance(self.layers_to_transform, int):
            return index == self.layers_to_transform
        return index in self.layers_to_transform

    def targets_parameter(self, module_name: str, param_name: str) -> bool:
        """Whether the parameter ``param_name`` registered directly on the module called ``module_name`` is one of
        ``target_parameters``, by PEFT's rule (``BaseTuner._inject_parameters``): its full name
        ``f"{module_name}.{param_name}"`` equals an entry or ends with ``"." + entry``.

        Nothing else applies to parameters in PEFT: ``exclude_modules``, ``layers_to_transform`` / ``layers_pattern``
        and ``modules_to_save`` select modules only, so ``layers_to_transform=[0]`` still targets the experts of every
        layer. The rank and alpha of a targeted parameter are ``rank_for`` / ``alpha_for`` of that full name (PEFT's
        pattern key), so ``rank_pattern={"gate_up_proj": 4}`` applies and ``{"experts": 4}`` does not.

        Names are those of the model without adapters; PEFT's rule differs for a module with ``torch.nn.utils
        .parametrize`` parametrizations (exact names only), which the caller must handle. A match on a parameter of the
        root module (``module_name == ""``) raises ``ValueError``, as PEFT cannot wrap it either."""
        if not self.target_parameters:
            return False
        key = f"{module_name}.{param_name}"
        if key not in self.target_parameters and not any(key.endswith(f".{t}") for t in self.target_parameters):
            return False
        if not module_name:
            raise ValueError(
                f"LoraConfig: target_parameters={self.target_parameters!r} names the parameter {param_name!r} of the "
                "model's root module, which PEFT cannot wrap"
            )
        return True

    def rank_for(self, name: str) -> int:
        """The rank of the module called ``name`` (or of a targeted parameter, by its full name): the value of the
        first ``rank_pattern`` key matching it, else ``r``."""
        key = _pattern_key(self.rank_pattern, name, _field="rank_pattern", _regexes=self._matcher())
        return self.rank_pattern.get(key, self.r)

    def alpha_for(self, name: str) -> float:
        """The alpha of the module (or parameter) called ``name``, as ``rank_for`` finds its rank."""
        key = _pattern_key(self.alpha_pattern, name, _field="alpha_pattern", _regexes=self._matcher())
        return self.alpha_pattern.get(key, self.lora_alpha)

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
            # PEFT keeps the list as given (it is matched as a set).
            "target_parameters": None if self.target_parameters is None else list(self.target_parameters),
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
        ``NotImplementedError`` naming them; unknown keys are refused too, rather than ignored. Values are checked as
        by ``LoraConfig(...)``: ``json.loads`` reads ``NaN``, ``Infinity`` and ``1e309`` as floats, refused there."""
        if not isinstance(data, Mapping):
            raise TypeError(
                f"LoraConfig.from_peft_dict: expected a dict of PEFT config fields, got {type(data).__name__}"
            )
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


# PEFT 0.21.2 with transformers 5.24 (``peft/utils/transformers_weight_conversion.py``): transformers v5 fused the
# experts of these model types into 3-D parameters and made the router a custom module, and PEFT rewrites the
# v4 recipes naming the old ``nn.Linear`` layers. Model type -> style: PEFT's copy of transformers'
# ``_MODEL_TO_CONVERSION_PATTERN`` (with ``"mixtral"`` added), kept where the style has a rewrite. ``qwen2_moe`` itself
# is not a key there, so PEFT leaves Qwen2-MoE configs alone.
MOE_RECIPE_STYLES = {
    **dict.fromkeys(("minimax", "minimax_m2", "mixtral"), "mixtral"),
    **dict.fromkeys(
        (
            "Dots3NoteTextModel", "afmoe", "deepseek_v2", "deepseek_v3", "deepseek_v32", "dots1", "ernie4_5_moe",
            "glm4_moe", "glm4_moe_lite", "glm_moe_dsa", "glm4v_moe", "longcat_flash", "solar_open", "mellum",
            "qwen3_moe", "beam", "qwen3_omni_moe", "qwen3_omni_moe_thinker", "qwen3_omni_moe_text", "qwen3_next",
            "hunyuan_v1_moe", "flex_olmo", "olmoe", "sarvam_mla", "exaone_moe", "cohere2_moe", "UnlimitedOcrTextModel",
        ),
        "qwen2_moe",
    ),
}  # fmt: skip
# Old target name -> new target parameter (``_MOE_TARGET_MODULE_MAPPING``); the first matching entry wins.
_MOE_RENAMES = {
    "mixtral": {"gate": "gate.weight", "w1": "gate_up_proj", "w3": "gate_up_proj", "w2": "down_proj"},
    "qwen2_moe": {
        "gate": "gate.weight", "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj", "down_proj": "down_proj"
    },
}  # fmt: skip
# Fused parameter -> the old targets it concatenates (``_MOE_FUSED_TARGETS``): their LoRAs stack, rank and alpha add.
_MOE_FUSED = {"mixtral": {"gate_up_proj": ("w1", "w3")}, "qwen2_moe": {"gate_up_proj": ("gate_proj", "up_proj")}}
# The ``target_modules`` PEFT picks for a model type when a config has none, which only a config with
# ``target_parameters`` may lack here (``peft.utils.constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``).
_PEFT_DEFAULT_TARGETS = {
    **dict.fromkeys(("t5", "mt5"), ("q", "v")),
    **dict.fromkeys(
        ("bart", "opt", "gptj", "gpt_neo", "llama", "llama4", "mistral", "mixtral", "stablelm", "gemma", "gemma2",
         "gemma3_text", "qwen2", "qwen3"),
        ("q_proj", "v_proj"),
    ),
    **dict.fromkeys(("gpt2", "gpt_bigcode"), ("c_attn",)),
    **dict.fromkeys(("bloom", "gpt_neox", "chatglm", "RefinedWebModel", "RefinedWeb", "falcon"), ("query_key_value",)),
    "blip-2": ("q", "v", "q_proj", "v_proj"),
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "electra", "layoutlm"), ("query", "value")),
    "deberta-v2": ("query_proj", "value_proj"),
    "deberta": ("in_proj",),
    "mpt": ("Wqkv",),
    "btlm": ("c_proj", "c_attn"),
    "codegen": ("qkv_proj",),
    "phi": ("q_proj", "v_proj", "fc1", "fc2"),
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)",
    "nemotron_h": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "rwkv": ("key", "value", "receptance", "output"),
    "rwkv7": ("r_proj", "k_proj", "v_proj", "o_proj", "key", "value"),
}  # fmt: skip


def moe_recipe(
    config: LoraConfig,
    model_type: str | None,
    *,
    module_names: Iterable[str],
    parameter_names: Iterable[str],
    linear_names: Iterable[str],
    transformers_v5: bool = True,
) -> LoraConfig:
    """The config PEFT 0.21 ends up with when it injects ``config`` into a model of type ``model_type``
    (``model.config.model_type``; ``None`` for a model without one): a new ``LoraConfig``, ``config`` is left alone
    (PEFT rewrites its own in place, then saves the result). The facts come from the model as strings:
    ``module_names`` and ``parameter_names`` as ``model.named_modules()`` / ``model.named_parameters()`` list them,
    and ``linear_names``, the modules ``target_modules="all-linear"`` selects (every ``nn.Linear`` / ``Conv1D`` but
    the output head).

    Under transformers v5 (``BaseTuner.inject_adapter``, so in ``get_peft_model`` and when loading alike), for the
    model types of ``MOE_RECIPE_STYLES`` (Mixtral, MiniMax: ``w1 w3 w2 gate``; Qwen3-MoE, OLMoE, DeepSeek-V2/V3,
    GLM-4-MoE, Qwen3-Next, ... : ``gate_proj up_proj down_proj gate``; not Qwen2-MoE itself, not GPT-OSS), the v4
    names move from ``target_modules`` to ``target_parameters``: ``w1`` / ``w3`` (``gate_proj`` / ``up_proj``)
    -> ``gate_up_proj``, ``w2`` (``down_proj``) -> ``down_proj``, ``gate`` -> ``gate.weight``; an entry ending with
    ``"." + old name`` moves too, as the bare new name. The two halves of ``gate_up_proj`` must both be named
    (``ValueError`` otherwise), and their fused LoRA gets ``rank_pattern`` / ``alpha_pattern`` key
    ``.*\\.gate_up_proj`` with ``2 * r`` and ``2 * lora_alpha`` (added after the caller's keys, so a caller's key
    matching ``gate_up_proj`` wins). A string ``target_modules`` is first resolved to leaf names: ``"all-linear"`` to
    the leaf names of ``linear_names`` plus the four old names, so the experts and the router are targeted too; a
    regex to the leaf names of the modules and parameters it matches, plus an old expert name when it matches
    ``<container of gate_up_proj / down_proj>.<old name>``. Leaf names select every module with that name: a regex
    naming one layer's ``q_proj`` selects every ``q_proj``, as in PEFT. A regex matching nothing stays as it is.

    Then, as PEFT's ``_prepare_adapter_config``: ``target_modules=None`` (with ``target_parameters``) becomes PEFT's
    default modules for ``model_type``, if it has some. Any other config comes back equal to ``config``.
    """
    changes: dict[str, Any] = {}
    if transformers_v5 and model_type in MOE_RECIPE_STYLES:
        changes = _rewrite_moe_targets(config, model_type, module_names, parameter_names, linear_names)
    if changes.get("target_modules", config.target_modules) is None and model_type in _PEFT_DEFAULT_TARGETS:
        default = _PEFT_DEFAULT_TARGETS[model_type]
        changes["target_modules"] = default if isinstance(default, str) else sorted(default)
    fields = {f.name: copy.deepcopy(getattr(config, f.name)) for f in dataclasses.fields(config)}
    return type(config)(**{**fields, **changes})


def _rewrite_moe_targets(
    config: LoraConfig,
    model_type: str,
    module_names: Iterable[str],
    parameter_names: Iterable[str],
    linear_names: Iterable[str],
) -> dict[str, Any]:
    """PEFT's ``_convert_peft_config_moe``: the fields ``moe_recipe`` changes for a model type of
    ``MOE_RECIPE_STYLES`` (none for a regex that matches nothing)."""
    style = MOE_RECIPE_STYLES[model_type]
    renames, fused = _MOE_RENAMES[style], _MOE_FUSED[style]
    target_modules = config.target_modules
    if isinstance(target_modules, str):
        target_modules = _resolve_string_targets(config, renames, module_names, parameter_names, linear_names)
        if not target_modules:
            return {}
    modules, parameters = set(), set(config.target_parameters or ())
    named: dict[str, set[str]] = {new: set() for new in fused}
    for target in target_modules or ():
        old = next((old for old in renames if target == old or target.endswith(f".{old}")), None)
        if old is None:
            modules.add(target)
            continue
        parameters.add(renames[old])
        if renames[old] in fused:
            named[renames[old]].add(old)
    rank_pattern, alpha_pattern = dict(config.rank_pattern), dict(config.alpha_pattern)
    for new, olds in fused.items():
        if 0 < len(named[new]) < len(olds):
            raise ValueError(
                f"moe_recipe: cannot convert the target(s) {', '.join(sorted(named[new]))} of this {model_type} model "
                f"without also targeting {', '.join(sorted(set(olds) - named[new]))}: transformers v5 fuses them into "
                f"{new} (PEFT refuses this config too)"
            )
        if len(named[new]) == len(olds) > 1:
            key = rf".*\.{re.escape(new)}"
            rank_pattern[key] = config.r * len(olds)
            alpha_pattern[key] = config.lora_alpha * len(olds)
    return {
        "target_modules": sorted(modules),
        "target_parameters": sorted(parameters),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
    }


def _resolve_string_targets(
    config: LoraConfig,
    renames: Mapping[str, str],
    module_names: Iterable[str],
    parameter_names: Iterable[str],
    linear_names: Iterable[str],
) -> list[str]:
    """PEFT's ``_resolve_string_target_modules``: the leaf names a string ``target_modules`` stands for on a model
    whose v4 expert layers are gone (none when a regex matches nothing)."""
    if config.all_linear:
        return sorted({name.rpartition(".")[2] for name in linear_names} | renames.keys())
    parameter_names = list(parameter_names)
    matched = {name.rpartition(".")[2] for name in (*module_names, *parameter_names) if config.matches(name)}
    containers: dict[str, set[str]] = {}
    for name in parameter_names:
        container, _, leaf = name.rpartition(".")
        containers.setdefault(leaf, set()).add(container)
    for old, new in renames.items():
        if old not in matched and any(config.matches(f"{c}.{old}") for c in containers.get(new, ())):
            matched.add(old)
    return sorted(matched)


def names_module(key: str, name: str) -> bool:
    """PEFT's ``modules_to_save`` rule (``_set_trainable``): ``key`` names the module ``name`` when the name ends
    with it as a plain string, with no dot boundary, so ``"classifier"`` also names ``"pre_classifier"``."""
    return name.endswith(key)


def _pattern_key(
    patterns: Iterable[str], name: str, *, _field: str = "pattern", _regexes: _Regexes | None = None
) -> str | None:
    """PEFT's ``get_pattern_key``: the first key matching the end of ``name`` on a dot boundary."""
    regexes = _regexes if _regexes is not None else _Regexes()
    for key in patterns:
        if regexes.match(_field, key, _PATTERN_KEY, name):
            return key
    return None


def layer_index(name: str, layers_pattern: list[str] | str | None, *, _regexes: _Regexes | None = None) -> int | None:
    """The transformer-layer index in a module name, as PEFT finds it (the first numbered segment, or the number
    after one of ``layers_pattern``)."""
    if not layers_pattern:
        match = _FIRST_NUMBERED_SEGMENT.match(name)
    else:
        regexes = _regexes if _regexes is not None else _Regexes()
        match = None
        for pattern in _as_list(layers_pattern):
            match = regexes.match("layers_pattern", pattern, _LAYERS_PATTERN, name)
            if match is not None:
                break
    return int(match.group("idx")) if match else None


def _as_list(value: list[str] | str) -> list[str]:
    return [value] if isinstance(value, str) else value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond float range, e.g. from a JSON literal with 400 digits
        return False


def _check_number(field: str, value: Any, *, integer: bool = False, kind: str | None = None) -> None:
    """``TypeError`` unless ``value`` is a number; ``ValueError`` if it is a bool (an ``int`` subclass, so ``True``
    would silently mean 1) or, for an ``integer`` field, a float."""
    kind = kind or ("an integer >= 1" if integer else "a finite real number")
    if not isinstance(value, (int, float)):
        raise TypeError(f"LoraConfig: {field} must be {kind}, got {value!r}")
    if isinstance(value, bool) or (integer and not isinstance(value, int)):
        raise ValueError(f"LoraConfig: {field} must be {kind}, got {value!r}")


# How PEFT builds a regex from a config value: (prefix, suffix, fullmatch). ``target_modules`` / ``exclude_modules``
# strings must match the whole name; pattern keys the end of it on a dot boundary (``get_pattern_key``); a module
# inside one of ``modules_to_save`` is never a LoRA target; ``layers_pattern`` is followed by the layer index.
_FULL = ("", "", True)
_PATTERN_KEY = (r"(.*\.)?(", r")$", False)
_INSIDE_SAVED = (r"(^|.*\.)", r"($|\..*)", False)
_LAYERS_PATTERN = (r"(?:^|.*?\.)", r"\.(?P<idx>\d+)\.", False)
# Lazy ``.*?``: the first numbered segment is the layer index, not a nested one (an expert index in a MoE model).
_FIRST_NUMBERED_SEGMENT = re.compile(r".*?\.[^.]*\.(?P<idx>\d+)\.")

_FP32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max; this module does not import torch
# Total CPU time one config may spend matching module names with its regexes. Normal configs spend milliseconds on
# a large model; a pattern that backtracks catastrophically would otherwise hold a thread (and, with Python's re, the
# GIL) for minutes.
MATCH_BUDGET_S = 1.0
# A match still running after this long goes on without the GIL, so other threads (serving requests) run meanwhile.
_GIL_SLICE_S = 0.001
# Match results a config remembers (names x patterns): a few models' worth.
_MAX_REMEMBERED = 100_000
# The ``regex`` module expands counted repeats when compiling (``(?:a{1000}){1000}`` takes 300 MB), and compiling
# cannot be interrupted: bound the product of the counts, and the length, of a pattern from a config.
_MAX_REPEAT_PRODUCT = 10_000
_MAX_PATTERN_LEN = 100_000
_COUNTED_REPEAT = re.compile(r"\{(\d*),?(\d*)\}")
# Syntax Python's re takes literally but the regex module reads as a POSIX class or a fuzzy-matching constraint:
# the same pattern would select other modules than in PEFT. Module names hold neither brackets nor braces.
_ENGINE_DIFFERENCE = re.compile(r"\[:\^?\w*:\]|(?<!\\)\{(?!\d*,?\d*\})")


class _Regexes:
    """The compiled regexes of one ``LoraConfig`` and the matching time they have left (``MATCH_BUDGET_S`` in all).

    Patterns are compiled by ``(field, pattern, template)``, so a field changed after construction is compiled (and
    checked) on first use. Matching uses the ``regex`` module, which reads Python ``re`` syntax the same way (what it
    reads differently is refused when compiling) and stops after ``timeout`` seconds. Results are remembered, so
    matching the same model again (loading a second adapter file with this config) costs no budget. Time is this
    thread's time, so a busy process does not use up the budget of a config that only waits for the GIL."""

    def __init__(self):
        self.budget = MATCH_BUDGET_S
        self.left = self.budget
        self._compiled: dict[tuple, Any] = {}
        self._results: dict[tuple, Any] = {}
        self._spent: dict[tuple[str, str], float] = {}

    def compile(self, field: str, pattern: str, template: tuple[str, str, bool]):
        compiled = self._compiled.get((field, pattern, template))
        if compiled is None:
            compiled = self._compiled[field, pattern, template] = _compile(field, pattern, template)
        return compiled

    def match(self, field: str, pattern: str, template: tuple[str, str, bool], name: str):
        """``re.match`` (or ``re.fullmatch``) of ``pattern`` built with ``template`` on ``name``; ``ValueError``
        naming the pattern that used up the budget."""
        key = (field, pattern, template, name)
        if key in self._results:
            return self._results[key]
        compiled = self.compile(field, pattern, template)
        if self.left <= 0:
            raise self._exhausted(field, pattern)
        method = compiled.fullmatch if template[2] else compiled.match
        # Holding the GIL, wall time is this thread's time, and perf_counter is ten times cheaper than thread_time.
        start = time.perf_counter()
        try:
            try:
                # Almost every match takes microseconds: releasing the GIL for each would make a loading thread
                # queue for the GIL thousands of times, so it is released only for a match that runs longer.
                found = method(name, timeout=min(self.left, _GIL_SLICE_S))
            except TimeoutError:
                locked, unlocked = time.perf_counter() - start, time.thread_time()
                try:
                    if self.left - locked <= 0:
                        raise
                    found = method(name, timeout=self.left - locked, concurrent=True)
                finally:  # without the GIL, wall time would count the wait to get it back
                    self._charge(field, pattern, locked + time.thread_time() - unlocked)
            else:
                self._charge(field, pattern, time.perf_counter() - start)
        except TimeoutError:
            self.left = 0.0
            raise self._exhausted(field, pattern) from None
        if len(self._results) < _MAX_REMEMBERED:
            self._results[key] = found
        return found

    def _charge(self, field: str, pattern: str, seconds: float) -> None:
        self.left -= seconds
        self._spent[field, pattern] = self._spent.get((field, pattern), 0.0) + seconds

    def _exhausted(self, field: str, pattern: str) -> ValueError:
        """The error for a spent budget: it names the pattern that took most of it, or else the config's many
        patterns together."""
        if self._spent:
            (field, pattern), spent = max(self._spent.items(), key=lambda item: item[1])
            if spent < self.budget / 2 and len(self._spent) > 1:
                return ValueError(
                    f"LoraConfig: matching module names with this config's {len(self._spent)} regexes takes too long "
                    f"(over {self.budget:g} s; the slowest is the {_what(field)} {pattern!r}); refusing it"
                )
        return ValueError(
            f"LoraConfig: the {_what(field)} {pattern!r} takes too long to match module names "
            f"(over {self.budget:g} s); refusing it"
        )


def _what(field: str) -> str:
    """How an error message names a regex of ``field``."""
    return _REGEX_KINDS.get(field, f"{field} pattern")


_REGEX_KINDS = {
    "rank_pattern": "rank_pattern key",
    "alpha_pattern": "alpha_pattern key",
    "pattern": "pattern key",
    "modules_to_save": "modules_to_save entry",
    "layers_pattern": "layers_pattern entry",
}


def _compile(field: str, pattern: str, template: tuple[str, str, bool]):
    """``pattern`` inside ``template``, compiled with the ``regex`` module, once it is known to be small enough to
    compile, to mean the same to both engines, and to be valid for Python's ``re`` (PEFT's engine); ``ValueError``
    naming the field and the pattern otherwise."""
    if len(pattern) > _MAX_PATTERN_LEN:
        raise ValueError(
            f"LoraConfig: the {_what(field)} {pattern[:40]!r}... is {len(pattern)} characters long "
            f"(at most {_MAX_PATTERN_LEN})"
        )
    where = f"LoraConfig: the {_what(field)} {pattern!r}"
    product = 1
    for low, high in _COUNTED_REPEAT.findall(pattern):
        count = high or low  # {m}, {m,}: m; {m,n}, {,n}: n
        product *= max(1, int(count)) if len(count) < 10 else _MAX_REPEAT_PRODUCT + 1
        if product > _MAX_REPEAT_PRODUCT:
            raise ValueError(f"{where} repeats too much (its counted repeats multiply to over {_MAX_REPEAT_PRODUCT})")
    prefix, suffix, _ = template
    source = prefix + pattern + suffix
    if difference := _ENGINE_DIFFERENCE.search(pattern):
        raise ValueError(
            f"{where} contains {difference.group()!r}, which Python's re (PEFT's matcher) reads literally but the "
            "regex module does not; escape the bracket or brace"
        )
    try:
        re.compile(source)
    except (re.error, RecursionError, OverflowError, ValueError) as e:
        raise ValueError(f"{where} is not a valid regular expression: {e}") from None
    try:
        return regex.compile(source)
    except (regex.error, RecursionError, OverflowError, ValueError) as e:
        raise ValueError(f"{where} is not a valid regular expression: {e}") from None
