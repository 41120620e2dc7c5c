"""``LoraConfig`` against PEFT itself: which modules a config selects, with which rank and alpha, which options are
refused, and the round trip through PEFT's ``adapter_config.json`` format.

PEFT is the oracle: every table below is checked against ``peft.get_peft_model`` (or PEFT's own matcher) on the
same model and the same keyword arguments, never against hand-written expectations alone.
"""

import copy
import dataclasses
import functools
import json
import math

import pytest
import torch

import fastlora
from fastlora.model import find_targets, lora_layers

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

ADAPTER = "default"
PEFT_PREFIX = "base_model.model."
from tiny_models import tiny_gpt2 as _tiny_gpt2  # noqa: E402 (after importorskip)
from tiny_models import tiny_llama  # noqa: E402 (after importorskip)

_tiny_llama = functools.partial(tiny_llama, num_hidden_layers=3)


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    return {"llama": _tiny_llama(), "gpt2": _tiny_gpt2()}


# (model, kwargs): shared by PEFT and fastlora. Order inside rank/alpha patterns matters: the first matching key wins.
SELECTION_CASES = [
    ("llama", dict(target_modules=["q_proj", "v_proj"])),
    ("llama", dict(target_modules=["model.layers.0.self_attn.q_proj", "model.layers.2.mlp.down_proj"])),
    ("llama", dict(target_modules=["self_attn.q_proj", "mlp.up_proj"])),
    ("llama", dict(target_modules=r".*\.(q|v)_proj")),
    ("llama", dict(target_modules=r"model\.layers\.[12]\.mlp\..*_proj")),
    ("llama", dict(target_modules="all-linear")),
    ("llama", dict(target_modules="All-Linear")),
    ("llama", dict(target_modules=["q_proj", "k_proj"], layers_to_transform=1)),
    ("llama", dict(target_modules=["q_proj", "down_proj"], layers_to_transform=[0, 2])),
    ("llama", dict(target_modules=["q_proj"], layers_to_transform=[])),
    ("llama", dict(target_modules=["q_proj", "o_proj"], layers_to_transform=[1], layers_pattern="layers")),
    ("llama", dict(target_modules=["q_proj"], layers_to_transform=[0, 2], layers_pattern=["blocks", "layers"])),
    ("llama", dict(target_modules="all-linear", exclude_modules=["o_proj", "down_proj"])),
    ("llama", dict(target_modules=["q_proj", "v_proj", "o_proj"], exclude_modules=r".*layers\.1\..*")),
    ("llama", dict(target_modules=["self_attn.q_proj", "mlp"], exclude_modules=["mlp"])),
    ("llama", dict(target_modules="all-linear", modules_to_save=["lm_head"])),
    ("llama", dict(target_modules=["q_proj", "up_proj"], modules_to_save=["mlp"])),
    ("llama", dict(target_modules=["q_proj", "v_proj"], rank_pattern={"q_proj": 2, "layers.0.self_attn.q_proj": 16})),
    ("llama", dict(target_modules=["q_proj", "v_proj"], rank_pattern={"layers.0.self_attn.q_proj": 16, "q_proj": 2})),
    (
        "llama",
        dict(
            target_modules="all-linear",
            r=4,
            lora_alpha=8,
            rank_pattern={"model.layers.0.self_attn.q_proj": 12, "^model.layers.1.*": 6, r"layers\.[02]\.mlp\..*": 3},
            alpha_pattern={"v_proj": 32, "^model.layers.1.*": 3, "layers.1.self_attn.v_proj": 99},
        ),
    ),  # fmt: skip
    ("llama", dict(target_modules=["q_proj", "k_proj"], r=4, lora_alpha=16, use_rslora=True)),
    ("llama", dict(target_modules=["k_proj"], alpha_pattern={"q_proj": 64, "k_proj": 5})),
    ("gpt2", dict(target_modules=["c_attn"])),
    ("gpt2", dict(target_modules=["c_attn", "c_proj"])),
    ("gpt2", dict(target_modules=["attn.c_proj"])),
    ("gpt2", dict(target_modules="all-linear")),
    ("gpt2", dict(target_modules=r"transformer\.h\.\d\.mlp\.c_(fc|proj)")),
    ("gpt2", dict(target_modules=["c_fc"], layers_to_transform=0)),
    ("gpt2", dict(target_modules=["c_attn", "c_fc"], layers_to_transform=[1], layers_pattern="h")),
    ("gpt2", dict(target_modules=["c_attn", "c_fc"], exclude_modules=["0.attn.c_attn"])),
    (
        "gpt2",
        dict(
            target_modules="all-linear",
            r=4,
            lora_alpha=16,
            rank_pattern={"c_attn": 2, "h.1.mlp.c_fc": 12, "c_fc": 5},
            alpha_pattern={"mlp.c_proj": 4},
        ),
    ),  # fmt: skip
]


def _case_id(case) -> str:
    model_name, kwargs = case
    return f"{model_name}-" + "-".join(f"{k}={v}" for k, v in kwargs.items())[:90]


def _peft_selection(model: torch.nn.Module, kwargs: dict) -> dict[str, tuple[int, float, float]]:
    """``{module name: (r, alpha, scaling)}`` of the LoRA layers PEFT creates for ``kwargs``."""
    peft_model = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**copy.deepcopy(kwargs)))
    selected = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            assert name.startswith(PEFT_PREFIX), name
            selected[name.removeprefix(PEFT_PREFIX)] = (
                module.r[ADAPTER],
                module.lora_alpha[ADAPTER],
                module.scaling[ADAPTER],
            )
    return selected


@pytest.mark.parametrize("case", SELECTION_CASES, ids=_case_id)
def test_selection_rank_and_alpha_match_peft(models, case):
    model_name, kwargs = case
    model = models[model_name]
    expected = _peft_selection(model, kwargs)
    assert expected, "the case must select something in PEFT, or it tests nothing"

    config = fastlora.LoraConfig(**copy.deepcopy(kwargs))
    targets = find_targets(model, config)
    assert sorted(targets) == sorted(expected)
    assert len(targets) == len(set(targets))
    for name, (r, alpha, _) in expected.items():
        assert (config.rank_for(name), config.alpha_for(name)) == (r, alpha), name

    adapted = fastlora.apply_lora(copy.deepcopy(model), config)
    layers = dict(lora_layers(adapted))
    assert sorted(layers) == sorted(expected)
    conv1d = transformers.pytorch_utils.Conv1D
    for name, (r, alpha, scaling) in expected.items():
        layer = layers[name]
        assert (layer.r, layer.lora_alpha) == (r, alpha), name
        assert math.isclose(layer.scaling, scaling, rel_tol=1e-12), name
        assert tuple(layer.lora_A.shape) == (r, layer.in_features)
        assert tuple(layer.lora_B.shape) == (layer.out_features, r)
        assert layer.fan_in_fan_out == isinstance(model.get_submodule(name), conv1d)


def test_first_matching_pattern_key_wins(models):
    """The two orders of the same overlapping keys give different ranks; the table above checks both against PEFT."""
    model = models["llama"]
    name = "model.layers.0.self_attn.q_proj"
    short_first = fastlora.LoraConfig(
        target_modules=["q_proj"], rank_pattern={"q_proj": 2, "layers.0.self_attn.q_proj": 16}
    )
    long_first = fastlora.LoraConfig(
        target_modules=["q_proj"], rank_pattern={"layers.0.self_attn.q_proj": 16, "q_proj": 2}
    )
    assert short_first.rank_for(name) == 2
    assert long_first.rank_for(name) == 16
    assert long_first.rank_for("model.layers.1.self_attn.q_proj") == 2
    # A key matches on a dot boundary only: "proj" is no suffix of "q_proj" in PEFT's sense.
    on_boundary = fastlora.LoraConfig(target_modules=["q_proj"], r=8, rank_pattern={"proj": 3})
    assert on_boundary.rank_for(name) == 8
    assert sorted(find_targets(model, long_first)) == sorted(_peft_selection(model, dict(target_modules=["q_proj"])))


# Module names (including ones no tiny model has: MoE experts, other layer containers) × list-style configs, checked
# against PEFT's own matcher. "all-linear" needs a model (types and the output head), so it is tested above only.
SYNTHETIC_NAMES = [
    "lm_head",
    "q_proj",
    "model.embed_tokens",
    "model.layers.0.self_attn.q_proj",
    "model.layers.1.self_attn.q_proj",
    "model.layers.12.self_attn.v_proj",
    "model.layers.1.self_attn.qq_proj",
    "model.layers.1.mlp.experts.0.q_proj",
    "model.layers.2.mlp.experts.1.down_proj",
    "model.layers.2.mlp",
    "model.decoder.blocks.1.attn.q_proj",
    "encoder.h.3.q_proj",
    "transformer.h.1.attn.c_attn",
    "transformer.h.0.mlp.c_proj",
    "vision.layers.0.q_proj",
]
MATCH_CASES = [
    dict(target_modules=["q_proj"]),
    dict(target_modules=["q_proj", "down_proj", "c_attn"]),
    dict(target_modules=["self_attn.q_proj", "lm_head"]),
    dict(target_modules=["model.layers.1.self_attn.q_proj"]),
    dict(target_modules=r".*\.(q|v)_proj"),
    dict(target_modules=r"model\.layers\.\d+\..*"),
    dict(target_modules="q_proj"),
    dict(target_modules=["q_proj", "v_proj"], layers_to_transform=1),
    dict(target_modules=["q_proj", "down_proj"], layers_to_transform=[1, 2]),
    dict(target_modules=["q_proj", "c_attn"], layers_to_transform=[1, 3], layers_pattern="blocks"),
    dict(target_modules=["q_proj", "c_attn"], layers_to_transform=[1, 3], layers_pattern=["h", "blocks"]),
    dict(target_modules=["q_proj"], layers_to_transform=[0], layers_pattern="layers"),
    dict(target_modules=["q_proj", "v_proj"], exclude_modules=["experts.0.q_proj", "vision.layers.0.q_proj"]),
    dict(target_modules=r".*_proj", exclude_modules=r".*experts.*"),
    dict(target_modules=["q_proj", "c_attn"], modules_to_save=["self_attn", "attn"]),
]


@pytest.mark.parametrize("kwargs", MATCH_CASES, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items())[:90])
def test_matches_agrees_with_peft_matcher(kwargs):
    config = fastlora.LoraConfig(**copy.deepcopy(kwargs))
    peft_config = peft.LoraConfig(**copy.deepcopy(kwargs))
    expected = {
        name for name in SYNTHETIC_NAMES if bool(peft.tuners.tuners_utils.check_target_module_exists(peft_config, name))
    }
    actual = {name for name in SYNTHETIC_NAMES if config.matches(name)}
    assert actual == expected


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(target_modules=r".*\.q_proj", layers_to_transform=[0]),
        dict(target_modules="all-linear", layers_to_transform=[0]),
        dict(target_modules="all-linear", layers_to_transform=1, layers_pattern="layers"),
        dict(target_modules=["q_proj"], layers_pattern="layers"),
    ],
    ids=["regex+layers", "all-linear+layers", "all-linear+pattern", "pattern-without-layers"],
)
def test_configs_peft_refuses_are_refused(kwargs):
    """Where PEFT refuses a combination, fastlora must not silently ignore a field (e.g. adapt every layer)."""
    with pytest.raises(ValueError):
        peft.LoraConfig(**copy.deepcopy(kwargs))
    with pytest.raises(ValueError, match="layers_"):
        fastlora.LoraConfig(**copy.deepcopy(kwargs))


def test_no_match_and_non_linear_targets_raise(models):
    model = models["llama"]
    with pytest.raises(ValueError, match="model.layers.0.self_attn.q_proj"):
        find_targets(model, fastlora.LoraConfig(target_modules=["nonexistent_proj"]))
    with pytest.raises(NotImplementedError, match="embed_tokens"):
        find_targets(model, fastlora.LoraConfig(target_modules=["embed_tokens"]))
    with pytest.raises(NotImplementedError, match="mlp"):
        find_targets(model, fastlora.LoraConfig(target_modules=["mlp"]))


# ----------------------------------------------------------------------------------------------- PEFT files


@pytest.mark.parametrize(
    "field, value",
    [
        ("use_dora", True),
        ("init_lora_weights", "pissa"),
        ("init_lora_weights", "olora"),
        ("lora_bias", True),
        ("layer_replication", [[0, 2], [1, 3]]),
        ("frobnicate", 3),
    ],
)
def test_unsupported_peft_fields_raise_naming_the_field(field, value):
    data = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], field: value}
    with pytest.raises(NotImplementedError, match=field):
        fastlora.LoraConfig.from_peft_dict(data)


def test_non_lora_peft_type_raises():
    with pytest.raises(NotImplementedError, match="PREFIX_TUNING"):
        fastlora.LoraConfig.from_peft_dict({"peft_type": "PREFIX_TUNING", "target_modules": ["q_proj"]})


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(r=0),
        dict(r=-2),
        dict(r=2.5),
        dict(r=True),
        dict(bias="some"),
        dict(lora_dropout=1.0),
        dict(lora_dropout=-0.1),
        dict(rank_pattern={"q_proj": 0}),
        dict(rank_pattern={"q_proj": True}),
        dict(target_modules=None),
    ],
    ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()),
)
def test_invalid_values_raise_value_error(kwargs):
    full = {"target_modules": ["q_proj"], **kwargs}
    with pytest.raises(ValueError):
        fastlora.LoraConfig(**full)


CONFIGS_TO_SAVE = [
    dict(target_modules=["v_proj", "q_proj"], r=4, lora_alpha=16, lora_dropout=0.1),
    dict(
        target_modules=r".*\.(q|v)_proj",
        r=8,
        lora_alpha=8,
        use_rslora=True,
        bias="lora_only",
        modules_to_save=["lm_head"],
        init_lora_weights="gaussian",
        rank_pattern={"q_proj": 2},
        alpha_pattern={"^model.layers.1.*": 3},
        exclude_modules=["model.layers.2.self_attn.v_proj"],
    ),  # fmt: skip
    dict(
        target_modules=["q_proj", "down_proj"],
        layers_to_transform=[0, 2],
        layers_pattern="layers",
        bias="all",
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    ),  # fmt: skip
    dict(target_modules="all-linear", exclude_modules=r".*o_proj", fan_in_fan_out=False),
]


def _peft_kwargs(data: dict) -> dict:
    """``data`` minus the keys ``peft.LoraConfig`` does not take as arguments."""
    init_fields = {f.name for f in dataclasses.fields(peft.LoraConfig) if f.init}
    return {k: v for k, v in data.items() if k in init_fields}


def _normal(value):
    """Name lists compare as sets: PEFT keeps ``target_modules`` as a set, fastlora as a list."""
    return sorted(value) if isinstance(value, (list, set, tuple)) and all(isinstance(v, str) for v in value) else value


def _as_dict(config: fastlora.LoraConfig) -> dict:
    return {k: _normal(v) for k, v in dataclasses.asdict(config).items()}


@pytest.mark.parametrize("kwargs", CONFIGS_TO_SAVE, ids=range(len(CONFIGS_TO_SAVE)))
def test_to_peft_dict_round_trips_through_peft(models, kwargs):
    config = fastlora.LoraConfig(**copy.deepcopy(kwargs))
    data = config.to_peft_dict()
    data = json.loads(json.dumps(data))  # what adapter_config.json holds
    assert _peft_kwargs(data).keys() == data.keys(), "to_peft_dict writes keys PEFT does not know"
    peft_config = peft.LoraConfig(**_peft_kwargs(data))
    for field in dataclasses.fields(fastlora.LoraConfig):
        assert _normal(getattr(config, field.name)) == _normal(getattr(peft_config, field.name)), field.name
    assert peft_config.use_dora is False and peft_config.lora_bias is False

    assert _as_dict(fastlora.LoraConfig.from_peft_dict(data)) == _as_dict(config)
    model = models["llama"]
    assert sorted(find_targets(model, config)) == sorted(_peft_selection(model, _peft_kwargs(data)))

    # PEFT writes its config back (sets as lists, enums as strings); fastlora reads it into the same config.
    peft_json = json.loads(json.dumps(peft_config.to_dict(), default=lambda o: sorted(o) if isinstance(o, set) else o))
    assert _as_dict(fastlora.LoraConfig.from_peft_dict(peft_json)) == _as_dict(config)


def test_reads_adapter_config_written_by_peft(models, tmp_path):
    """An ``adapter_config.json`` saved by the installed PEFT (every field, most at their defaults) loads."""
    kwargs = dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2})
    peft_model = peft.get_peft_model(copy.deepcopy(models["llama"]), peft.LoraConfig(**kwargs))
    peft_model.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    config = fastlora.LoraConfig.from_peft_dict(data)
    assert (config.r, config.lora_alpha, sorted(config.target_modules)) == (4, 16, ["q_proj", "v_proj"])
    assert config.rank_pattern == {"v_proj": 2}


def test_reads_peft_to_dict_directly():
    """``peft.LoraConfig.to_dict()`` holds ``peft_type`` as a ``PeftType`` enum (a ``str`` subclass), not ``"LORA"``."""
    data = {"peft_type": peft.PeftType.LORA, "r": 4, "target_modules": ["q_proj"]}
    config = fastlora.LoraConfig.from_peft_dict(data)
    assert (config.r, config.target_modules) == (4, ["q_proj"])
