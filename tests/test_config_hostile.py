"""``LoraConfig`` and adapter-file reading against hostile or careless configs: values of the wrong type, scalings
that are not finite in float32, regexes that do not compile or backtrack catastrophically, and weights files that
are not safetensors. Every refusal is an error naming the field (and the file), raised before anything changes: a
model's tensors and an adapter pool's contents are compared before and after.

Matching runs through the ``regex`` module with a time budget; an oracle written with Python's ``re`` and PEFT's
formulas checks that the results are unchanged for ordinary patterns.
"""

import copy
import json
import math
import pickle
import re
import threading
import time

import pytest
import torch
from safetensors.torch import save_file

import fastlora
from fastlora import config as config_module
from fastlora.peft_format import read_adapter_file

BASE = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}
# Catastrophic backtracking for Python's re and the regex module alike (``(.|.)*Z`` is not: the regex module first
# checks that a "Z" occurs, in linear time).
SLOW = "(.|.)*[A-Z]"
NAMES = [
    f"model.layers.{i}.{module}"
    for i in (0, 1, 11)
    for module in (
        "self_attn", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm",
    )
] + [
    "model.embed_tokens", "lm_head", "score", "classifier", "pre_classifier", "distilbert.pre_classifier",
    "transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_fc", "model.layers.1.mlp.experts.0.down_proj",
    "vision.blocks.2.attn.q_proj", "model.layers.0.self_attn.q_proj.base_layer",
]  # fmt: skip


def _config(**changes) -> fastlora.LoraConfig:
    return fastlora.LoraConfig(**{**BASE, **changes})


@pytest.fixture
def small_budget(monkeypatch):
    """A matching budget small enough for a test to hit quickly."""
    monkeypatch.setattr(config_module, "MATCH_BUDGET_S", 0.05)
    return 0.05


# ------------------------------------------------------------------------------------------------- scalings


NON_FINITE = [math.nan, math.inf, -math.inf, float("1e309"), 1e300, 10**400]
NON_FINITE_IDS = ["nan", "inf", "-inf", "1e309", "1e300", "10**400"]


@pytest.mark.parametrize("value", NON_FINITE, ids=NON_FINITE_IDS)
@pytest.mark.parametrize(
    "field, changes",
    [
        ("lora_alpha", lambda v: {"lora_alpha": v}),
        ("alpha_pattern['v_proj']", lambda v: {"alpha_pattern": {"q_proj": 2, "v_proj": v}}),
    ],
    ids=["lora_alpha", "alpha_pattern"],
)
def test_non_finite_alpha_is_refused(field, changes, value):
    with pytest.raises(ValueError, match=re.escape(field)) as error:
        _config(**changes(value))
    assert "finite" in str(error.value)


@pytest.mark.parametrize(
    "literal, field",
    [
        ('"lora_alpha": NaN', "lora_alpha"),
        ('"lora_alpha": Infinity', "lora_alpha"),
        ('"lora_alpha": -Infinity', "lora_alpha"),
        ('"lora_alpha": 1e309', "lora_alpha"),
        ('"lora_alpha": 1e300', "lora_alpha"),
        ('"lora_alpha": 8, "alpha_pattern": {"q_proj": NaN}', "alpha_pattern['q_proj']"),
        ('"lora_alpha": 8, "alpha_pattern": {"q_proj": 1e309}', "alpha_pattern['q_proj']"),
    ],
)
def test_non_finite_alpha_in_json_is_refused(literal, field):
    text = '{"peft_type": "LORA", "r": 8, "target_modules": ["q_proj"], ' + literal + "}"
    with pytest.raises(ValueError, match=re.escape(field)):
        fastlora.LoraConfig.from_peft_dict(json.loads(text))


@pytest.mark.parametrize(
    "changes, fragment",
    [
        # 1e39 / 8 fits float32; 1e39 / 2 does not.
        (dict(lora_alpha=1e39, rank_pattern={"k_proj": 16, "q_proj": 2}), "rank_pattern['q_proj']"),
        (dict(lora_alpha=8, alpha_pattern={"v_proj": 1e39}, rank_pattern={"q_proj": 1}), "alpha_pattern['v_proj']"),
        # rsLoRA divides by sqrt(r) = 2 rather than r = 4.
        (dict(lora_alpha=1e39, r=4, use_rslora=True), "sqrt(r)"),
    ],
    ids=["rank_pattern-x-lora_alpha", "rank_pattern-x-alpha_pattern", "rslora"],
)
def test_every_rank_alpha_combination_is_checked(changes, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        _config(**changes)
    without = {k: v for k, v in changes.items() if k not in ("rank_pattern", "use_rslora")}
    config = _config(**without)  # the same alpha with r alone is fine
    assert math.isfinite(config.scaling)


@pytest.mark.parametrize(
    "args", [(8, math.nan), (8, math.inf), (1, 1e39), (4, 1e39, True), (8, 10**400)], ids=str
)  # fmt: skip
def test_lora_scaling_refuses_non_finite_results(args):
    with pytest.raises(ValueError, match="not a finite float32"):
        fastlora.lora_scaling(*args)


def test_lora_scaling_keeps_finite_results():
    assert fastlora.lora_scaling(4, 1e38) == 2.5e37
    assert fastlora.lora_scaling(4, 16, True) == 8.0


# ------------------------------------------------------------------------------------------------- types


WRONG_VALUES = [
    (dict(lora_alpha="x"), TypeError, "lora_alpha must be a finite real number, got 'x'"),
    (dict(lora_alpha=None), TypeError, "lora_alpha must be a finite real number, got None"),
    (dict(lora_alpha=True), ValueError, "lora_alpha must be a finite real number, got True"),
    (dict(r="8"), TypeError, "r must be an integer >= 1, got '8'"),
    (dict(r=None), TypeError, "r must be an integer >= 1"),
    (dict(lora_dropout="0.1"), TypeError, "lora_dropout"),
    (dict(lora_dropout=math.nan), ValueError, "lora_dropout"),
    (dict(target_modules=5), TypeError, "target_modules must be None, a str or a list of str, got 5"),
    (dict(target_modules=["q_proj", 5]), TypeError, "target_modules"),
    (dict(target_modules={"q_proj", 5}), TypeError, "target_modules"),
    (dict(exclude_modules=5), TypeError, "exclude_modules"),
    (dict(exclude_modules=[None]), TypeError, "exclude_modules"),
    (dict(use_rslora="yes"), TypeError, "use_rslora must be True or False, got 'yes'"),
    (dict(use_rslora=1), TypeError, "use_rslora"),
    (dict(fan_in_fan_out="yes"), TypeError, "fan_in_fan_out must be True or False"),
    (dict(modules_to_save="lm_head"), TypeError, "modules_to_save must be None or a list of str"),
    (dict(modules_to_save=["lm_head", 3]), TypeError, "modules_to_save"),
    (dict(modules_to_save=[""]), ValueError, "modules_to_save holds an empty name"),
    (dict(layers_to_transform="1"), TypeError, "layers_to_transform"),
    (dict(layers_to_transform=[0, True]), TypeError, "layers_to_transform"),
    (dict(layers_to_transform=1.0), TypeError, "layers_to_transform"),
    (dict(layers_to_transform=[0], layers_pattern=5), TypeError, "layers_pattern"),
    (dict(rank_pattern=[("q_proj", 2)]), TypeError, "rank_pattern must be a dict"),
    (dict(rank_pattern={"q_proj": "2"}), TypeError, "rank_pattern['q_proj']"),
    (dict(rank_pattern={"q_proj": 2.0}), ValueError, "rank_pattern['q_proj']"),
    (dict(alpha_pattern={"q_proj": None}), TypeError, "alpha_pattern['q_proj']"),
    (dict(alpha_pattern={"q_proj": "2"}), TypeError, "alpha_pattern['q_proj']"),
    (dict(alpha_pattern={1: 2}), TypeError, "alpha_pattern keys must be str"),
    (dict(task_type=5), TypeError, "task_type"),
    (dict(bias=None), TypeError, "bias"),
    (dict(base_model_name_or_path=["x"]), TypeError, "base_model_name_or_path"),
]


@pytest.mark.parametrize("changes, error, fragment", WRONG_VALUES, ids=[repr(c)[:40] for c, _, _ in WRONG_VALUES])
def test_wrong_types_and_values_name_the_field(changes, error, fragment):
    with pytest.raises(error, match=re.escape(fragment)):
        _config(**changes)
    with pytest.raises(error, match=re.escape(fragment)):
        fastlora.LoraConfig.from_peft_dict({**BASE, **changes})


def test_from_peft_dict_needs_a_dict():
    with pytest.raises(TypeError, match="expected a dict"):
        fastlora.LoraConfig.from_peft_dict([("r", 8)])


def test_name_collections_are_normalised_to_lists():
    config = _config(
        target_modules=("v_proj", "q_proj"), modules_to_save={"score", "lm_head"}, layers_to_transform=(1,)
    )
    assert config.target_modules == ["q_proj", "v_proj"]
    assert config.modules_to_save == ["lm_head", "score"]
    assert config.layers_to_transform == [1]
    assert json.loads(json.dumps(config.to_peft_dict()))["modules_to_save"] == ["lm_head", "score"]


def test_config_copies_keep_only_the_fields():
    """The compiled regexes live outside ``__dict__``: rebuilding from ``vars``, deep copies and pickles all work."""
    config = _config(rank_pattern={r"layers\.1\..*": 2}, exclude_modules=r".*mlp.*")
    for copied in (
        fastlora.LoraConfig(**vars(config)),
        copy.deepcopy(config),
        pickle.loads(pickle.dumps(config)),
    ):
        assert copied == config
        assert [copied.rank_for(n) for n in NAMES] == [config.rank_for(n) for n in NAMES]
        assert [copied.matches(n) for n in NAMES] == [config.matches(n) for n in NAMES]


# ------------------------------------------------------------------------------------------------- regexes

REGEX_FIELDS = [
    ("target_modules pattern", lambda p: dict(target_modules=p)),
    ("exclude_modules pattern", lambda p: dict(exclude_modules=p)),
    ("rank_pattern key", lambda p: dict(rank_pattern={p: 2})),
    ("alpha_pattern key", lambda p: dict(alpha_pattern={p: 2})),
    ("modules_to_save entry", lambda p: dict(modules_to_save=[p])),
    ("layers_pattern entry", lambda p: dict(layers_to_transform=[0, 1], layers_pattern=["blocks", p])),
]
REGEX_IDS = [what.split()[0] for what, _ in REGEX_FIELDS]


@pytest.mark.parametrize("what, changes", REGEX_FIELDS, ids=REGEX_IDS)
@pytest.mark.parametrize(
    "pattern, fragment",
    [
        ("((", "is not a valid regular expression"),
        ("q_proj)", "is not a valid regular expression"),
        ("(?:(?:a{100}){100}){100}", "repeats too much"),
        ("[[:alpha:]]_proj", "reads literally"),
        ("(?:q_proj){e<=1}", "reads literally"),
    ],
    ids=["unbalanced", "breaks-template", "repeats", "posix-class", "fuzzy"],
)
def test_bad_regexes_are_refused_when_the_config_is_built(what, changes, pattern, fragment):
    start = time.perf_counter()
    with pytest.raises(ValueError, match=re.escape(f"the {what} {pattern!r}")) as error:
        _config(**changes(pattern))
    assert fragment in str(error.value)
    assert time.perf_counter() - start < 5  # refused, not compiled (that takes minutes and gigabytes)


def test_overlong_regex_is_refused():
    with pytest.raises(ValueError, match="characters long"):
        _config(target_modules="q" * 100_001)


def test_catastrophic_regex_for_python_re_is_answered_quickly():
    """``(.|.)*Z`` takes Python's re minutes on a 40-character name; the regex module first checks for the "Z"."""
    config = _config(target_modules="(.|.)*Z")
    start = time.perf_counter()
    assert not any(config.matches(name) for name in ("a" * 40, "model.layers.0.self_attn.q_proj" * 2))
    assert config.matches("a" * 40 + "Z")
    assert time.perf_counter() - start < 5  # microseconds; Python's re would take minutes


def test_a_regex_changed_after_construction_is_checked_when_used():
    config = _config(target_modules=r".*_proj")
    config.target_modules = "(("
    with pytest.raises(ValueError, match=re.escape("the target_modules pattern '(('")):
        config.matches("model.layers.0.self_attn.q_proj")


def _use(config: fastlora.LoraConfig, names) -> None:
    for name in names:
        config.matches(name)
        config.rank_for(name)
        config.alpha_for(name)


@pytest.mark.parametrize("what, changes", REGEX_FIELDS, ids=REGEX_IDS)
def test_catastrophic_regex_is_refused_within_the_budget(small_budget, what, changes):
    config = _config(**changes(SLOW))  # compiles: it is only slow
    names = ["model.layers.0.self_attn.q_proj" * 2, "model.layers.0.self_attn.q_proj"]
    start = time.perf_counter()
    with pytest.raises(ValueError, match=re.escape(f"the {what} {SLOW!r} takes too long")) as error:
        _use(config, names)
    assert time.perf_counter() - start < 2
    assert f"over {small_budget:g} s" in str(error.value)
    with pytest.raises(ValueError, match=re.escape(SLOW)):  # once spent, the budget stays spent
        _use(config, names[1:])


def test_many_ordinary_regexes_over_the_budget_are_refused_together(monkeypatch):
    monkeypatch.setattr(config_module, "MATCH_BUDGET_S", 0.005)
    config = _config(alpha_pattern={rf"blocks\.{i}\.mlp": 2 for i in range(400)})
    with pytest.raises(ValueError, match="matching module names with this config's 400 regexes takes too long"):
        _use(config, NAMES)


def test_slow_regex_releases_the_gil(monkeypatch):
    """A thread matching a catastrophic pattern (as a server loading an adapter in the background) leaves the other
    threads running; with Python's re it would hold the GIL for the whole match."""
    monkeypatch.setattr(config_module, "MATCH_BUDGET_S", 0.5)
    config = _config(target_modules=SLOW)
    errors = []

    def load():
        try:
            config.matches("model.layers.0.self_attn.q_proj" * 2)
        except ValueError as e:
            errors.append(e)

    thread = threading.Thread(target=load)
    wakeups = 0
    thread.start()
    while thread.is_alive():
        time.sleep(0.002)
        wakeups += 1
    thread.join()
    assert len(errors) == 1 and "target_modules" in str(errors[0])
    # Holding the GIL for its 0.5 s, the match would let this thread wake once or twice; a loaded machine slows the
    # wake-ups of a free one to no fewer than some dozens.
    assert wakeups >= 10, wakeups


def test_matching_the_same_names_again_costs_no_budget(monkeypatch):
    monkeypatch.setattr(config_module, "MATCH_BUDGET_S", 0.2)
    names = [f"model.layers.{i}.{m}" for i in range(32) for m in ("self_attn.q_proj", "mlp.down_proj", "mlp")]
    config = _config(
        target_modules=r"model\.layers\.\d+\.(self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj",
        rank_pattern={r"layers\.1\d\..*": 4, "q_proj": 2},
        alpha_pattern={"down_proj": 3},
        exclude_modules=r".*layers\.3[01]\..*",
        modules_to_save=["lm_head"],
    )
    for _ in range(300):  # ~2 ms of regex calls a pass: 0.6 s, were results not remembered
        _use(config, names)
    assert config.matches("model.layers.12.self_attn.q_proj") and config.rank_for("model.layers.12.mlp") == 4


def _oracle(kwargs: dict, name: str) -> tuple[bool, int, float, bool]:
    """``(matches, rank, alpha, saved)`` for ``name`` by PEFT's formulas, with Python's re."""
    target, exclude = kwargs["target_modules"], kwargs.get("exclude_modules")
    saved_entries = kwargs.get("modules_to_save") or []

    def key_for(patterns):
        return next((k for k in patterns if re.match(rf"(.*\.)?({k})$", name)), None)

    rank = kwargs.get("rank_pattern", {}).get(key_for(kwargs.get("rank_pattern", {})), kwargs.get("r", 8))
    alpha = kwargs.get("alpha_pattern", {}).get(key_for(kwargs.get("alpha_pattern", {})), kwargs.get("lora_alpha", 8))
    saved = any(name.endswith(m) for m in saved_entries)
    if isinstance(exclude, str) and re.fullmatch(exclude, name):
        return False, rank, alpha, saved
    if isinstance(exclude, list) and (name in exclude or any(name.endswith(f".{e}") for e in exclude)):
        return False, rank, alpha, saved
    if any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in saved_entries):
        return False, rank, alpha, saved
    if isinstance(target, str):
        return (target == "all-linear" or re.fullmatch(target, name) is not None), rank, alpha, saved
    found = name in target or any(name.endswith(f".{t}") for t in target)
    layers = kwargs.get("layers_to_transform")
    if found and layers not in (None, []):
        pattern = kwargs.get("layers_pattern")
        if not pattern:
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
        else:
            match = None
            for p in [pattern] if isinstance(pattern, str) else pattern:
                if match := re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", name):
                    break
        index = int(match["idx"]) if match else None
        found = index is not None and (index == layers if isinstance(layers, int) else index in layers)
    return found, rank, alpha, saved


EQUIVALENCE_CASES = [
    dict(target_modules=["q_proj", "v_proj"]),
    dict(target_modules=r".*\.(q|v)_proj"),
    dict(target_modules=r"model\.layers\.[01]\.(self_attn|mlp)\..*"),
    dict(target_modules="all-linear", exclude_modules=["o_proj", "down_proj"]),
    dict(target_modules=["q_proj", "c_attn"], exclude_modules=r".*(experts|vision).*"),
    dict(target_modules=["q_proj", "v_proj", "down_proj"], layers_to_transform=[1, 11]),
    dict(target_modules=["q_proj", "c_attn"], layers_to_transform=[0, 2], layers_pattern=["h", "blocks"]),
    dict(target_modules=["q_proj"], layers_to_transform=1, layers_pattern="layers"),
    dict(target_modules=["q_proj", "up_proj"], modules_to_save=["mlp", "classifier", "lm_head"]),
    dict(target_modules=["q_proj", "v_proj"], modules_to_save=["self_attn.q_proj"]),
    dict(
        target_modules="all-linear",
        r=8,
        lora_alpha=16,
        rank_pattern={r"layers\.1\d?\..*": 4, "q_proj": 2, r"^model.layers.0.self_attn.v_proj": 16},
        alpha_pattern={r"(o|v)_proj": 3, "mlp": 5, "down_proj": 7},
    ),
]


@pytest.mark.parametrize("kwargs", EQUIVALENCE_CASES, ids=range(len(EQUIVALENCE_CASES)))
def test_matching_equals_peft_formulas_with_python_re(kwargs):
    config = fastlora.LoraConfig(**copy.deepcopy(kwargs))
    for name in NAMES:
        actual = (config.matches(name), config.rank_for(name), config.alpha_for(name), config.saves_module(name))
        assert actual == _oracle(kwargs, name), name


def test_modules_to_save_is_a_plain_suffix_as_in_peft():
    """PEFT's ``_set_trainable`` wraps every module whose name ends with an entry, with no dot boundary."""
    peft = pytest.importorskip("peft")

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)
            self.pre_classifier = torch.nn.Linear(4, 4)
            self.classifier = torch.nn.Linear(4, 2)
            self.classifier_norm = torch.nn.LayerNorm(2)

    peft_model = peft.get_peft_model(Head(), peft.LoraConfig(target_modules=["lin"], modules_to_save=["classifier"]))
    wrapped = {
        n.removeprefix("base_model.model.")
        for n, m in peft_model.named_modules()
        if isinstance(m, peft.utils.other.ModulesToSaveWrapper)
    }
    config = fastlora.LoraConfig(target_modules=["lin"], modules_to_save=["classifier"])
    names = [n for n, _ in Head().named_modules() if n]
    assert {n for n in names if config.saves_module(n)} == wrapped == {"classifier", "pre_classifier"}
    assert config_module.names_module("classifier", "distilbert.pre_classifier")


# ------------------------------------------------------------------------------------------------- files


def _adapter_dir(tmp_path, config_text: str | None = None):
    """A PEFT-format directory for a one-layer tiny Llama (q_proj, v_proj; r=2), as ``fastlora.save_adapter`` writes
    it; ``config_text`` replaces its ``adapter_config.json``."""
    from tiny_models import tiny_llama

    model = fastlora.apply_lora(tiny_llama(num_hidden_layers=1), fastlora.LoraConfig(r=2, **_targets()))
    fastlora.save_adapter(model, tmp_path)
    if config_text is not None:
        (tmp_path / "adapter_config.json").write_text(config_text)
    return tmp_path


def _targets() -> dict:
    return {"target_modules": ["q_proj", "v_proj"], "init_lora_weights": False}


@pytest.mark.parametrize("name", ["adapter.txt", "weights.npz", "adapter_model.safetensors.gz", "adapter_model"])
def test_weights_that_are_not_safetensors_are_named_as_such(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\x00" * 16)
    (tmp_path / "adapter_config.json").write_text(json.dumps(BASE))
    with pytest.raises(ValueError, match="is not a safetensors file \\(expected adapter_model.safetensors\\)"):
        read_adapter_file(path)
    with pytest.raises(ValueError, match="is not a safetensors file"):
        read_adapter_file(path, allow_pickle=True)
    assert path.read_bytes() == b"\x00" * 16


@pytest.mark.parametrize("name", ["adapter_model.bin", "adapter.pt", "adapter.PTH"])
def test_pickles_are_refused_without_allow_pickle(tmp_path, name):
    path = tmp_path / name
    torch.save({"x.lora_A.weight": torch.zeros(2, 4)}, path)
    (tmp_path / "adapter_config.json").write_text(json.dumps(BASE))
    with pytest.raises(ValueError, match="is a pickle file"):
        read_adapter_file(path)
    assert set(read_adapter_file(path, allow_pickle=True).tensors) == {"x.lora_A.weight"}


@pytest.mark.parametrize(
    "text, error, fragment",
    [
        ("[1, 2]", ValueError, "does not hold a JSON object (it holds a list)"),
        ('{"r": 8, "lora_alpha": "16", "target_modules": ["q_proj"]}', TypeError, "lora_alpha"),
        ('{"r": 8, "use_rslora": "yes", "target_modules": ["q_proj"]}', TypeError, "use_rslora"),
        ('{"r": 8, "target_modules": ["(("], "rank_pattern": {"((": 2}}', ValueError, "rank_pattern key '(('"),
        ("[" * 100_000, ValueError, "not valid JSON"),
    ],
    ids=["array", "alpha-str", "rslora-str", "bad-regex", "deep"],
)
def test_config_file_errors_name_the_file_and_the_field(tmp_path, text, error, fragment):
    save_file({"x.lora_A.weight": torch.zeros(2, 4)}, tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(text)
    with pytest.raises(error, match=re.escape(fragment)) as raised:
        read_adapter_file(tmp_path)
    assert "adapter_config.json" in str(raised.value)


CORRUPT_CONFIGS = {
    "nan": lambda data: json.dumps(data).replace('"lora_alpha": 8', '"lora_alpha": NaN'),
    "slow-regex": lambda data: json.dumps({**data, "target_modules": SLOW}),
}


@pytest.mark.parametrize("corrupt", CORRUPT_CONFIGS, ids=list(CORRUPT_CONFIGS))
def test_load_adapter_refuses_the_config_and_leaves_the_model_unchanged(tmp_path, small_budget, corrupt):
    from tiny_models import tiny_llama

    directory = _adapter_dir(tmp_path)
    data = json.loads((directory / "adapter_config.json").read_text())
    assert data["lora_alpha"] == 8
    (directory / "adapter_config.json").write_text(CORRUPT_CONFIGS[corrupt](data))
    files = {p.name: p.read_bytes() for p in directory.iterdir()}
    for model in (tiny_llama(num_hidden_layers=1), fastlora.apply_lora(tiny_llama(num_hidden_layers=1), _lora())):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        config = copy.deepcopy(getattr(model, "fastlora_config", None))
        with pytest.raises(ValueError, match="lora_alpha" if corrupt == "nan" else "target_modules"):
            fastlora.load_adapter(model, directory)
        after = model.state_dict()
        assert after.keys() == before.keys()
        assert all(torch.equal(after[k], v) for k, v in before.items())
        assert getattr(model, "fastlora_config", None) == config
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == files


def _lora() -> fastlora.LoraConfig:
    return fastlora.LoraConfig(r=2, **_targets())


def test_adapter_pool_refuses_the_config_and_stays_as_it_was(tmp_path):
    from fastlora.serving import AdapterPool

    layers = {"model.layers.0.self_attn.q_proj": (64, 64), "model.layers.0.self_attn.v_proj": (64, 32)}
    good = _adapter_dir(tmp_path / "good")
    bad = _adapter_dir(tmp_path / "bad")
    text = (bad / "adapter_config.json").read_text()
    (bad / "adapter_config.json").write_text(text.replace('"lora_alpha": 8', '"lora_alpha": NaN'))
    pool = AdapterPool(layers, max_adapters=2, max_rank=4)
    pool.register("good", good)
    with pool.acquire(["good"]):
        pass
    before = (pool.adapters, dict(pool.resident), pool.info("good"))
    slot = pool.resident["good"]
    a_pool = {name: layer.a_pool.clone() for name, layer in pool.layers.items()}
    for name, replace in (("bad", False), ("good", True)):
        with pytest.raises(ValueError, match="lora_alpha must be a finite real number"):
            pool.register(name, bad, replace=replace)
    assert (pool.adapters, dict(pool.resident), pool.info("good")) == before
    assert pool.resident["good"] == slot
    assert all(torch.equal(layer.a_pool, a_pool[name]) for name, layer in pool.layers.items())
