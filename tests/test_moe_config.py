"""``LoraConfig.target_parameters`` and ``moe_recipe`` against PEFT on tiny mixture-of-experts models.

PEFT is the oracle: for each (model, config) pair, ``peft.get_peft_model`` wraps parameters in ``ParamWrapper``s and
modules in ``lora.Linear``s, with a rank and an alpha each, and rewrites its config (transformers v5's fused experts);
fastlora's config functions, given the same model's names as strings, must select the same set with the same ranks
and alphas and end up with the same config fields. Models are built on the meta device: only names and types matter.
"""

import copy
import dataclasses
import json
import math

import pytest
import torch

from fastlora.config import LoraConfig, moe_recipe

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from peft.tuners.lora.layer import Linear as PeftLinear  # noqa: E402 (after importorskip)
from peft.tuners.lora.layer import ParamWrapper  # noqa: E402
from tiny_models import tiny_llama  # noqa: E402

# PEFT checks rank_pattern / alpha_pattern keys against the modules it targeted only, never the parameters.
pytestmark = [
    pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys did not match:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),  # PEFT's call
]

ADAPTER = "default"
PEFT_PREFIX = "base_model.model."
_COMMON = dict(
    hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)  # fmt: skip
_MOE_CONFIGS = {
    "mixtral": lambda: transformers.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **_COMMON),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=32, **_COMMON
    ),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, head_dim=8, **_COMMON
    ),
    "olmoe": lambda: transformers.OlmoeConfig(num_experts=4, num_experts_per_tok=2, **_COMMON),
    "gpt_oss": lambda: transformers.GptOssConfig(num_local_experts=4, num_experts_per_tok=2, head_dim=8, **_COMMON),
}
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _build(model_name: str, device: str = "meta") -> torch.nn.Module:
    if model_name == "llama":
        with torch.device(device):
            return tiny_llama(num_hidden_layers=2)
    torch.manual_seed(0)
    with torch.device(device):
        return transformers.AutoModelForCausalLM.from_config(_MOE_CONFIGS[model_name]())


# (model, kwargs): shared by PEFT and fastlora.
CASES = [
    ("mixtral", dict(target_modules=[], target_parameters=[*EXPERTS, "mlp.gate.weight"])),
    ("mixtral", dict(target_modules=["w1", "w2", "w3", "gate"])),
    ("mixtral", dict(target_modules="all-linear", r=4, lora_alpha=16)),
    ("mixtral", dict(target_modules="ALL-LINEAR", exclude_modules=["o_proj"])),
    # A caller's key matching gate_up_proj comes first, so it beats the doubled alpha PEFT adds.
    (
        "mixtral",
        dict(
            target_modules=["q_proj", "mlp.experts.w1", "w3"],
            r=4,
            lora_alpha=16,
            rank_pattern={"q_proj": 2},
            alpha_pattern={"layers.1.mlp.experts.gate_up_proj": 5},
        ),
    ),  # fmt: skip
    # layers_to_transform selects modules only: the experts of every layer get LoRA.
    ("mixtral", dict(target_modules=["w1", "w2", "w3", "k_proj"], layers_to_transform=[0])),
    # A regex becomes leaf names: layer 0's q_proj stands for every q_proj, as in PEFT.
    ("mixtral", dict(target_modules=r".*layers\.0\.self_attn\.q_proj")),
    ("mixtral", dict(target_modules=r".*\.experts\.(w1|w3|w2)", r=2, lora_alpha=3)),
    ("mixtral", dict(target_parameters=["gate_up_proj"], use_rslora=True, r=4)),
    # Qwen2-MoE itself is not rewritten: its v4 recipe adapts the shared expert only.
    ("qwen2_moe", dict(target_modules=["gate_proj", "up_proj", "down_proj"])),
    ("qwen2_moe", dict(target_modules="all-linear")),
    ("qwen2_moe", dict(target_modules=["q_proj"], target_parameters=[*EXPERTS, "mlp.gate.weight"], r=4)),
    ("qwen2_moe", dict(target_parameters=["experts.down_proj"])),
    ("qwen3_moe", dict(target_modules=["gate_proj", "up_proj", "down_proj"], r=4, lora_alpha=16)),
    ("qwen3_moe", dict(target_modules="all-linear", use_rslora=True)),
    # exclude_modules and layers_to_transform do not apply to parameters; the pattern key is the parameter's name.
    (
        "qwen3_moe",
        dict(
            target_modules=[],
            target_parameters=[*EXPERTS, "mlp.gate.weight"],
            layers_to_transform=[0],
            exclude_modules=["experts", "gate"],
            rank_pattern={"gate_up_proj": 2, "experts": 3, "mlp.gate": 5},
            alpha_pattern={"layers.1.mlp.experts.down_proj": 32},
        ),
    ),  # fmt: skip
    ("qwen3_moe", dict(target_modules=["gate_proj", "up_proj"], r=4, rank_pattern={"gate_up_proj": 3})),
    ("olmoe", dict(target_modules="all-linear", r=4, lora_alpha=8)),
    ("olmoe", dict(target_modules=["gate_proj", "up_proj", "down_proj", "gate", "v_proj"], exclude_modules=["0.mlp"])),
    # The OpenAI cookbook's GPT-OSS recipe: entries naming a layer index end-match that layer only.
    ("gpt_oss", dict(
        target_modules="all-linear", target_parameters=["1.mlp.experts.gate_up_proj", "7.mlp.experts.down_proj"]
    )),
    ("gpt_oss", dict(target_parameters=[*EXPERTS, "mlp.router.weight"], r=2, lora_alpha=4)),
    ("gpt_oss", dict(target_modules=["q_proj"], target_parameters=["down_proj"], rank_pattern={"down_proj": 2})),
    # Without target_modules, PEFT adds a model type's default modules (Llama: q_proj, v_proj).
    ("llama", dict(target_parameters=["mlp.down_proj.weight"])),
]  # fmt: skip


def _case_id(case) -> str:
    model_name, kwargs = case
    return f"{model_name}-" + "-".join(f"{k}={v}" for k, v in kwargs.items())[:90]


def _strip(name: str) -> str:
    """A PEFT wrapper's name as the base model's module name (a nested ``ParamWrapper`` sits at ``.base_layer``)."""
    return name.removeprefix(PEFT_PREFIX).replace(".base_layer", "")


def _peft_targets(peft_model) -> set[tuple]:
    """``(module, parameter or None, r, alpha, scaling)`` for every LoRA wrapper PEFT made."""
    targets = set()
    for name, module in peft_model.named_modules():
        if isinstance(module, ParamWrapper):
            parameter = module.parameter_name
        elif isinstance(module, PeftLinear):
            parameter = None
        else:
            continue
        r, alpha, scaling = module.r[ADAPTER], module.lora_alpha[ADAPTER], module.scaling[ADAPTER]
        targets.add((_strip(name), parameter, r, alpha, scaling))
    return targets


def _model_facts(model: torch.nn.Module) -> dict:
    """What a model transform hands ``moe_recipe``: names as strings, ``linear_names`` as ``"all-linear"`` reads."""
    head = model.get_output_embeddings()
    return dict(
        module_names=[name for name, _ in model.named_modules()],
        parameter_names=[name for name, _ in model.named_parameters()],
        linear_names=[n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head],
    )


def _fastlora_targets(model: torch.nn.Module, config: LoraConfig) -> set[tuple]:
    """The same set from fastlora's config functions: linear modules ``matches`` selects, parameters
    ``targets_parameter`` selects, and ``rank_for`` / ``alpha_for`` / ``scaling_for`` of each."""
    head = model.get_output_embeddings()
    targets = set()
    for name, module in model.named_modules():
        if name and isinstance(module, torch.nn.Linear) and config.matches(name):
            if not (config.all_linear and module is head):
                targets.add((name, None, config.rank_for(name), config.alpha_for(name), config.scaling_for(name)))
        for parameter, _ in module.named_parameters(recurse=False):
            if config.targets_parameter(name, parameter):
                key = f"{name}.{parameter}"
                targets.add((name, parameter, config.rank_for(key), config.alpha_for(key), config.scaling_for(key)))
    return targets


def _names(value):
    """A name collection as PEFT may hold it (set, list, ``None``, a str) in one comparable form."""
    return sorted(value) if isinstance(value, (set, list, tuple)) else value


def _fields(config: LoraConfig) -> dict:
    """``config``'s fields, name lists in order: PEFT saves its sets as lists in any order."""
    return {k: _names(v) for k, v in dataclasses.asdict(config).items()}


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_targets_ranks_and_rewritten_config_match_peft(case):
    model_name, kwargs = case
    peft_model = peft.get_peft_model(_build(model_name), peft.LoraConfig(**copy.deepcopy(kwargs)))
    expected = _peft_targets(peft_model)
    assert expected, "the case must target something in PEFT, or it tests nothing"
    peft_config = peft_model.peft_config[ADAPTER]

    model = _build(model_name)
    config = LoraConfig(**copy.deepcopy(kwargs))
    recipe = moe_recipe(config, model.config.model_type, **_model_facts(model))
    assert _fastlora_targets(model, recipe) == expected

    if recipe.all_linear:  # fastlora keeps "all-linear" symbolic; PEFT lists the linear layers it found
        assert sorted(peft_config.target_modules) == sorted(_model_facts(model)["linear_names"])
    else:
        assert _names(recipe.target_modules) == _names(peft_config.target_modules)
    assert _names(recipe.target_parameters) == _names(peft_config.target_parameters)
    # Dict order matters: the first matching key wins.
    assert list(recipe.rank_pattern.items()) == list(peft_config.rank_pattern.items())
    assert list(recipe.alpha_pattern.items()) == list(peft_config.alpha_pattern.items())
    assert dataclasses.asdict(config) == dataclasses.asdict(LoraConfig(**copy.deepcopy(kwargs))), "config changed"


@pytest.mark.parametrize(
    "model_name, kwargs",
    [
        ("qwen3_moe", dict(target_modules=["gate_proj", "down_proj"])),
        ("olmoe", dict(target_modules=["up_proj"])),
        ("mixtral", dict(target_modules=["w1", "w2"])),
        ("mixtral", dict(target_modules=r".*\.experts\.w3")),
    ],
)
def test_half_of_a_fused_pair_is_refused_as_by_peft(model_name, kwargs):
    with pytest.raises(ValueError, match="fused"):
        peft.get_peft_model(_build(model_name), peft.LoraConfig(**copy.deepcopy(kwargs)))
    model = _build(model_name)
    with pytest.raises(ValueError, match="gate_up_proj"):
        moe_recipe(LoraConfig(**kwargs), model.config.model_type, **_model_facts(model))


def test_recipe_applies_only_under_transformers_v5_and_leaves_the_callers_config_alone():
    model = _build("mixtral")
    config = LoraConfig(target_modules=["w1", "w2", "w3"], rank_pattern={"q_proj": 2})
    before = dataclasses.asdict(config)
    recipe = moe_recipe(config, "mixtral", **_model_facts(model))
    assert recipe.target_parameters == ["down_proj", "gate_up_proj"]
    assert recipe.rank_pattern == {"q_proj": 2, r".*\.gate_up_proj": 16}
    assert dataclasses.asdict(config) == before and recipe.rank_pattern is not config.rank_pattern
    assert moe_recipe(recipe, "mixtral", **_model_facts(model)) == recipe, "PEFT reapplies it on load: idempotent"

    v4 = moe_recipe(config, "mixtral", transformers_v5=False, **_model_facts(model))
    assert dataclasses.asdict(v4) == before and v4 is not config


def test_model_types_and_renames_are_peft_s():
    """The tables ``moe_recipe`` holds equal those of the installed PEFT and transformers."""
    from peft.utils import transformers_weight_conversion as conversion
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as defaults

    from fastlora import config as config_module

    styles = {
        model_type: style
        for model_type, style in conversion._MODEL_TO_CONVERSION_PATTERN.items()
        if conversion._MOE_TARGET_MODULE_MAPPING.get(style) and conversion._MOE_FUSED_TARGETS.get(style)
    }
    # PEFT reads the model types from the installed transformers' conversion mapping: fastlora's table holds the newest
    # release's, so an older transformers may lack some, only ones it has no model for.
    ours = config_module.MOE_RECIPE_STYLES
    assert all(ours.get(model_type) == style for model_type, style in styles.items())
    # ... and those it has a model for but no conversion (so no fused experts): fastlora.model.moe_config then leaves
    # them alone too, as PEFT does.
    known = set(transformers.models.auto.configuration_auto.CONFIG_MAPPING_NAMES)
    assert all(conversion.get_checkpoint_conversion_mapping(t) is None for t in (set(ours) - set(styles)) & known)
    assert all(conversion.get_checkpoint_conversion_mapping(model_type) is not None for model_type in styles)
    assert config_module._MOE_RENAMES == conversion._MOE_TARGET_MODULE_MAPPING
    fused = {style: {k: list(v) for k, v in pairs.items()} for style, pairs in config_module._MOE_FUSED.items()}
    assert fused == conversion._MOE_FUSED_TARGETS
    ours = {k: v if isinstance(v, str) else sorted(v) for k, v in config_module._PEFT_DEFAULT_TARGETS.items()}
    assert ours == {k: v if isinstance(v, str) else sorted(v) for k, v in defaults.items()}


def test_targets_parameter_rule():
    config = LoraConfig(target_modules=[], target_parameters=["experts.gate_up_proj", "model.layers.1.mlp.gate.weight"])
    assert config.targets_parameter("model.layers.0.mlp.experts", "gate_up_proj")
    assert not config.targets_parameter("model.layers.0.mlp.shared_experts", "gate_up_proj"), "dot boundary"
    assert not config.targets_parameter("model.layers.0.mlp.experts", "gate_up_proj_bias")
    assert config.targets_parameter("model.layers.1.mlp", "gate.weight"), "the full name counts, not the split"
    assert not config.targets_parameter("model.layers.0.mlp.gate", "weight")
    assert not config.matches("model.layers.0.mlp.experts"), "target_parameters select no module"
    assert not LoraConfig(target_modules=["q_proj"]).targets_parameter("model.layers.0.mlp.experts", "gate_up_proj")


def test_parameter_of_the_root_module_is_refused_as_by_peft():
    class Root(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(4, 4))
            self.lin = torch.nn.Linear(4, 4)

    kwargs = dict(target_modules=["lin"], target_parameters=["w"])
    with pytest.raises(ValueError, match="top-level"):
        peft.get_peft_model(Root(), peft.LoraConfig(**kwargs))
    with pytest.raises(ValueError, match="root module"):
        LoraConfig(**kwargs).targets_parameter("", "w")


# ----------------------------------------------------------------------------------------------- PEFT files


ROUND_TRIPS = [
    dict(target_modules=[], target_parameters=["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]),
    dict(target_modules=["q_proj"], target_parameters=["b.w", "a.w"], r=4, rank_pattern={"gate_up_proj": 2}),
    dict(target_parameters=["gate_up_proj"], lora_dropout=0.1),  # dropout: fastlora's own path, kept
    dict(target_modules="all-linear", target_parameters=("x.gate_up_proj",)),
]


@pytest.mark.parametrize("kwargs", ROUND_TRIPS, ids=range(len(ROUND_TRIPS)))
def test_to_peft_dict_round_trips_through_peft(kwargs):
    config = LoraConfig(**copy.deepcopy(kwargs))
    data = json.loads(json.dumps(config.to_peft_dict()))
    assert data["target_parameters"] == config.target_parameters == list(kwargs["target_parameters"])
    peft_config = peft.LoraConfig(**data)
    for field in dataclasses.fields(LoraConfig):
        assert _names(getattr(config, field.name)) == _names(getattr(peft_config, field.name)), field.name
    assert dataclasses.asdict(LoraConfig.from_peft_dict(data)) == dataclasses.asdict(config)
    peft_json = json.loads(json.dumps(peft_config.to_dict(), default=lambda o: sorted(o) if isinstance(o, set) else o))
    assert dataclasses.asdict(LoraConfig.from_peft_dict(peft_json)) == dataclasses.asdict(config)


@pytest.mark.parametrize(
    "model_name, kwargs",
    [
        ("qwen3_moe", dict(target_modules=["gate_proj", "up_proj", "down_proj", "q_proj"], r=2, lora_alpha=4)),
        ("gpt_oss", dict(target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"], r=2)),
    ],
)
def test_reads_adapter_config_saved_by_peft(tmp_path, model_name, kwargs):
    """PEFT saves the config it rewrote (here ``target_modules`` ``[]`` or ``null``); fastlora reads it as the recipe
    it computes itself, and the recipe of the file is the file (PEFT rewrites it again when loading)."""
    peft_model = peft.get_peft_model(_build(model_name, "cpu"), peft.LoraConfig(**copy.deepcopy(kwargs)))
    peft_model.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["target_parameters"]
    loaded = LoraConfig.from_peft_dict(data)

    model = _build(model_name)
    facts = _model_facts(model)
    recipe = moe_recipe(LoraConfig(**kwargs), model.config.model_type, **facts)
    for field in ("target_modules", "target_parameters", "rank_pattern", "alpha_pattern", "r", "lora_alpha"):
        assert _names(getattr(loaded, field)) == _names(getattr(recipe, field)), field
    assert _fields(moe_recipe(loaded, model.config.model_type, **facts)) == _fields(loaded)
    assert _fastlora_targets(model, loaded) == _peft_targets(peft_model)


# ----------------------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(target_parameters="mlp.experts.gate_up_proj"), TypeError, "target_parameters"),
        (dict(target_parameters={"gate_up_proj": 1}), TypeError, "target_parameters"),
        (dict(target_parameters=7), TypeError, "target_parameters"),
        (dict(target_parameters=["gate_up_proj", 3]), TypeError, "target_parameters"),
        (dict(target_parameters=[None]), TypeError, "target_parameters"),
        (dict(target_parameters=["gate_up_proj"], fan_in_fan_out=True), ValueError, "fan_in_fan_out"),
        (dict(target_modules=None, target_parameters=[]), ValueError, "target_modules"),
    ],
)
def test_bad_target_parameters_are_refused_naming_the_field(kwargs, error, match):
    kwargs = {"target_modules": ["q_proj"], **kwargs}
    with pytest.raises(error, match=match):
        LoraConfig(**kwargs)
    with pytest.raises(error, match=match):
        LoraConfig.from_peft_dict({"peft_type": "LORA", **kwargs})


def test_peft_refuses_the_same():
    """The oracle for the refusals above: PEFT refuses a str (constructing) and ``fan_in_fan_out`` (wrapping)."""
    with pytest.raises(TypeError, match="target_parameters"):
        peft.LoraConfig(target_modules=[], target_parameters="mlp.experts.gate_up_proj")
    kwargs = dict(target_modules=[], target_parameters=EXPERTS, fan_in_fan_out=True)
    with pytest.raises(ValueError, match="fan_in_fan_out"):
        peft.get_peft_model(_build("qwen3_moe"), peft.LoraConfig(**kwargs))


def test_sets_and_tuples_become_sorted_lists():
    assert LoraConfig(target_modules=[], target_parameters=("b", "a")).target_parameters == ["a", "b"]
    assert LoraConfig(target_modules=[], target_parameters={"x"}).target_parameters == ["x"]


def test_fused_pair_gets_twice_the_rank_and_alpha_and_keeps_its_scaling():
    """w1 and w3 of rank r stack into gate_up_proj of rank 2r; alpha doubles too, so alpha / r stays."""
    config = LoraConfig(target_modules=["w1", "w3"], r=3, lora_alpha=5)
    recipe = moe_recipe(config, "minimax", module_names=[], parameter_names=[], linear_names=[])
    name = "model.layers.0.mlp.experts.gate_up_proj"
    assert (recipe.rank_for(name), recipe.alpha_for(name)) == (6, 10)
    assert math.isclose(recipe.scaling_for(name), config.scaling)
    rslora = moe_recipe(
        dataclasses.replace(config, use_rslora=True), "mixtral", module_names=[], parameter_names=[], linear_names=[]
    )
    assert math.isclose(rslora.scaling_for(name), 10 / math.sqrt(6)), "rsLoRA: alpha / sqrt(r) does change, as in PEFT"
