"""The serving runtime against hostile and careless callers: non-finite scalings, tensors changed after registration,
bad timeouts, starving waits, interrupts around leases, an unwrapped model, routed tokens, base-weight copies in PEFT
adapters, and arguments of the wrong type. Every refused input leaves the pool (registry, residency, pins, slot
tensors) exactly as it was.

Pool-level tests use a two-layer ``AdapterPool`` with no model; model-level tests a one-layer Llama of hidden 32 and
a tiny mixture-of-experts model built here, on the torch backend (kernels are not the point).
"""

import functools
import gc
import math
import threading
import time
import types

import pytest
import torch
from safetensors.torch import load_file
from serving_helpers import lora_tensors
from torch import nn

from fastlora import LoraConfig
from fastlora.serving import AdapterPool, MultiLoraLinear, MultiLoraModel
from fastlora.serving import model as model_module
from fastlora.serving import pool as pool_module

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

LAYERS = {"l0": (16, 24), "l1": (16, 8)}  # name: (in_features, out_features)


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    monkeypatch.setenv("FASTLORA_BACKEND", "torch")


def _tensors(ranks: dict[str, int], seed: int, **kwargs) -> dict[str, torch.Tensor]:
    return lora_tensors(LAYERS, ranks, seed, **kwargs)


def _config(ranks: dict[str, int], **fields) -> dict:
    return {"r": max(ranks.values()), "lora_alpha": 8, "target_modules": sorted(ranks), **fields}


def _pool(names=("a", "b", "c"), **kwargs) -> AdapterPool:
    pool = AdapterPool(LAYERS, **{"max_adapters": 2, "max_rank": 8, **kwargs})
    for seed, name in enumerate(names):
        pool.register(name, _tensors({"l0": 2, "l1": 2}, seed), config=_config({"l0": 2, "l1": 2}))
    return pool


def _snapshot(pool: AdapterPool) -> dict:
    with pool._cond:
        return {
            "adapters": pool.adapters,
            "resident": pool.resident,
            "pinned": pool.pinned,
            "infos": [pool.info(n) for n in pool.adapters],
            "layers": {
                n: [t.clone() for t in (p.a_pool, p.b_pool, p.slot_ranks, p.slot_scalings)]
                for n, p in pool.layers.items()
            },
            "cpu_tier": {
                n: {k: (w.lora_A.clone(), w.lora_B.clone()) for k, w in e.layers.items()}
                for n, e in pool._entries.items()
            },
        }


def _assert_unchanged(pool: AdapterPool, before: dict) -> None:
    after = _snapshot(pool)
    for key in ("adapters", "resident", "pinned", "infos"):
        assert after[key] == before[key], key
    assert after["layers"].keys() == before["layers"].keys()
    for name, tensors in before["layers"].items():
        for old, new in zip(tensors, after["layers"][name], strict=True):
            assert old.dtype == new.dtype and torch.equal(old, new), name
    assert after["cpu_tier"].keys() == before["cpu_tier"].keys()
    for name, layers in before["cpu_tier"].items():
        assert layers.keys() == after["cpu_tier"][name].keys()
        for layer, pair in layers.items():
            assert all(torch.equal(o, n) for o, n in zip(pair, after["cpu_tier"][name][layer], strict=True)), name


@pytest.fixture
def busy_pool():
    """A pool with adapter ``a`` resident and pinned by a running batch, ``b`` resident, ``c`` in the CPU tier."""
    pool = _pool()
    pool.acquire(["b"]).release()
    lease = pool.acquire(["a"])
    yield pool
    lease.release()


# ------------------------------------------------------------------------------------------------- tiny models


def _llama() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval()


IDS = torch.tensor([[3, 14, 15, 9, 26], [5, 35, 8, 9, 7]])


class _Expert(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(hidden, 2 * hidden)
        self.w2 = nn.Linear(2 * hidden, hidden)

    def forward(self, x):
        return self.w2(torch.relu(self.w1(x)))


class _MoeBlock(nn.Module):
    """Top-1 hash routing (Roller et al. 2021): token ``t`` goes to expert ``t % n``, weighted by the router's
    probability of that expert. Which tokens an expert sees is thus set by the ids."""

    def __init__(self, hidden: int, n_experts: int, container: str):
        super().__init__()
        self.gate = nn.Linear(hidden, n_experts, bias=False)
        self.container = container
        setattr(self, container, nn.ModuleList(_Expert(hidden) for _ in range(n_experts)))

    def forward(self, h, ids):
        flat, route = h.reshape(-1, h.shape[-1]), ids.reshape(-1) % len(getattr(self, self.container))
        weight = torch.softmax(self.gate(flat), -1).gather(1, route[:, None])
        out = torch.zeros_like(flat)
        for e, expert in enumerate(getattr(self, self.container)):
            index = (route == e).nonzero().squeeze(1)
            out[index] = expert(flat[index])
        return (out * weight).view_as(h)


class TinyMoeLM(nn.Module):
    """A causal-LM-shaped model (ids in, ``.logits`` out) with one mixture-of-experts block."""

    def __init__(self, container: str = "experts", hidden: int = 16, vocab: int = 32, n_experts: int = 2):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, hidden)
        self.moe = _MoeBlock(hidden, n_experts, container)
        self.proj = nn.Linear(hidden, hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        h = h + self.moe(h, input_ids)
        h = h + self.proj(h)
        return types.SimpleNamespace(logits=self.lm_head(h))


def _plain(model: nn.Module) -> bool:
    """No layer of ``model`` is wrapped and no hook is left on it."""
    return not any(isinstance(m, MultiLoraLinear) for m in model.modules()) and not model._forward_pre_hooks


# ------------------------------------------------------------------------------------------- scalings, copies


@pytest.mark.parametrize(
    ("field", "value", "module"),
    [
        ("lora_alpha", float("nan"), "'l0'"),
        ("lora_alpha", float("inf"), "'l0'"),
        ("lora_alpha", 1e40, "'l0'"),  # finite in float64, infinite in float32
        ("alpha_pattern", {"l1": float("nan")}, "'l1'"),
        ("alpha_pattern", {"l1": -1e300}, "'l1'"),
    ],
)
def test_non_finite_scaling_never_reaches_a_slot(busy_pool, field, value, module):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["l0", "l1"])
    setattr(config, field, value)  # a config changed after it was built and checked
    tensors = _tensors({"l0": 4, "l1": 4}, seed=9)
    before = _snapshot(busy_pool)
    with pytest.raises(ValueError, match=rf"module {module}: the scaling from {field}=.* is not finite in float32"):
        busy_pool.register("bad", tensors, config=config)
    _assert_unchanged(busy_pool, before)


def test_registration_keeps_its_own_copy_of_the_weights():
    pool = AdapterPool(LAYERS, max_adapters=2, max_rank=8)
    tensors = _tensors({"l0": 2, "l1": 4}, seed=1)
    config = LoraConfig(r=2, lora_alpha=8, target_modules=["l0", "l1"], rank_pattern={"l1": 4})
    expected = {k: t.clone() for k, t in tensors.items()}
    pool.register("x", tensors, config=config)
    for t in tensors.values():  # fp32, contiguous, on the CPU: nothing the pool had to convert
        t.fill_(float("nan"))
    config.lora_alpha = float("nan")
    with pool.acquire(["x"]) as lease:
        slot = lease.row_slots[0]
        for name, r in (("l0", 2), ("l1", 4)):
            layer = pool.layers[name]
            assert torch.equal(layer.a_pool[slot, :r], expected[f"base_model.model.{name}.lora_A.weight"])
            assert torch.equal(layer.b_pool[slot, :, :r], expected[f"base_model.model.{name}.lora_B.weight"])
            assert layer.slot_scalings[slot].item() == 8 / r
        assert lease.slot_scalings[slot] == 8 / 2


# ------------------------------------------------------------------------------------------------ timeouts


@pytest.mark.parametrize(
    ("timeout", "error", "match"),
    [
        (float("nan"), ValueError, "timeout must be None or a number of seconds >= 0, got nan"),
        (-1, ValueError, "timeout must be .* >= 0, got -1"),
        (True, TypeError, "timeout must be None or a number of seconds, got True"),
        ("1", TypeError, "timeout must be None or a number of seconds, got '1'"),
    ],
)
def test_bad_timeouts_are_refused(busy_pool, timeout, error, match):
    before = _snapshot(busy_pool)
    with pytest.raises(error, match=match):
        busy_pool.acquire(["b"], timeout=timeout)
    _assert_unchanged(busy_pool, before)
    model = _llama()
    with pytest.raises(error, match="acquire_timeout: " + match):
        MultiLoraModel(model, ["q_proj"], acquire_timeout=timeout)
    assert _plain(model)


@pytest.mark.parametrize("timeout", [float("inf"), 1e20, 10**30])
def test_huge_timeouts_wait_without_bound(timeout):
    pool = _pool(max_adapters=1)
    lease = pool.acquire(["a"])
    timer = threading.Timer(0.05, lease.release)
    timer.start()
    with pool.acquire(["b"], timeout=timeout) as other:  # has to wait: the only slot is pinned
        assert other.slots == {"b": 0}
    timer.join()
    assert pool.pinned == {} and pool.waiting == 0


# ------------------------------------------------------------------------------------------------ fairness


def _waiting(pool: AdapterPool, count: int) -> bool:
    return pool.waiting == count


def _wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + 2.0
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.002)


@pytest.fixture
def grants(monkeypatch) -> list:
    """The names of every lease granted, in the order the pool granted them (recorded under the pool's lock)."""
    order = []

    class RecordingLease(pool_module.AdapterLease):
        def __init__(self, pool, row_slots, slots, *args):
            order.append(tuple(slots))
            super().__init__(pool, row_slots, slots, *args)

    monkeypatch.setattr(pool_module, "AdapterLease", RecordingLease)
    return order


def test_waiting_calls_are_served_first_come_first_served(grants):
    pool = _pool()
    first = pool.acquire(["a"])
    big_may_release = threading.Event()

    def big():
        with pool.acquire(["b", "c"], timeout=5):  # needs both slots; a's is pinned
            big_may_release.wait(5)

    threads = [threading.Thread(target=big)]
    threads[0].start()
    _wait_until(lambda: pool.waiting == 1, "the two-adapter call waits")
    # Each of these could be served at once (a is resident; b fits the free slot) but arrives after the big call.
    for names in (["a"], ["b"], ["a", None], ["b"]):
        threads.append(threading.Thread(target=lambda names=names: pool.acquire(names, timeout=5).release()))
        threads[-1].start()
        _wait_until(functools.partial(_waiting, pool, len(threads)), f"{names} waits behind the big call")
    assert grants == [("a",)]
    first.release()
    _wait_until(lambda: len(grants) == 2, "the big call is served")
    assert grants == [("a",), ("b", "c")]
    big_may_release.set()
    for thread in threads:
        thread.join(5)
    assert grants == [("a",), ("b", "c"), ("a",), ("b",), ("a",), ("b",)]
    assert pool.pinned == {} and pool.waiting == 0
    # With nobody waiting, a call that fits goes at once.
    pool.acquire(["c"], timeout=0).release()


def test_a_waiting_call_that_times_out_lets_the_next_one_go(grants):
    pool = _pool()
    first = pool.acquire(["a"])
    results = {}

    def call(key, names, timeout):
        try:
            pool.acquire(names, timeout=timeout).release()
            results[key] = "served"
        except TimeoutError as error:
            results[key] = error

    big = threading.Thread(target=call, args=("big", ["b", "c"], 0.2))
    big.start()
    _wait_until(lambda: pool.waiting == 1, "the big call waits")
    small = threading.Thread(target=call, args=("small", ["b"], 5))
    small.start()
    _wait_until(lambda: pool.waiting == 2, "the small call waits behind it")
    big.join(5)
    small.join(5)
    assert isinstance(results["big"], TimeoutError) and "earlier batches wait" in str(results["big"])
    assert results["small"] == "served" and grants == [("a",), ("b",)]
    assert pool.waiting == 0 and pool.pinned == {first.row_slots[0]: 1}
    first.release()


# -------------------------------------------------------------------------------------------------- leases


def test_a_lease_collected_while_held_unpins_its_slots():
    pool = _pool()
    lease = pool.acquire(["a", "b"])
    assert len(pool.pinned) == 2
    del lease
    gc.collect()
    assert pool.pinned == {}
    pool.acquire(["c", "a"], timeout=0).release()


@pytest.fixture
def llama_mm():
    mm = MultiLoraModel(_llama(), ["q_proj", "v_proj"], max_adapters=2, max_rank=4)
    g = torch.Generator().manual_seed(0)
    for name in ("x", "y"):
        state = {}
        for module, (k, n) in (("q_proj", (32, 32)), ("v_proj", (32, 16))):
            state[f"model.layers.0.self_attn.{module}.lora_A.weight"] = torch.randn(4, k, generator=g)
            state[f"model.layers.0.self_attn.{module}.lora_B.weight"] = torch.randn(n, 4, generator=g)
        mm.load_adapter(name, state, {"r": 4, "lora_alpha": 8})
    return mm


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize("where", ["_Rows.__init__", "_Rows.prebuild", "acquire returns"])
def test_an_interrupt_right_after_the_grant_leaks_no_pin(llama_mm, monkeypatch, where):
    if where == "acquire returns":
        acquire = llama_mm.pool.acquire

        def interrupted(*args, **kwargs):
            acquire(*args, **kwargs)  # the lease is granted, then the interrupt lands before anyone holds it
            raise KeyboardInterrupt

        monkeypatch.setattr(llama_mm.pool, "acquire", interrupted)
    else:
        monkeypatch.setattr(model_module._Rows, where.split(".")[1], _interrupt)
    with pytest.raises(KeyboardInterrupt):
        llama_mm(IDS, adapter_names=["x", "y"])
    gc.collect()
    assert llama_mm.pool.pinned == {}
    monkeypatch.undo()
    out = llama_mm(IDS, adapter_names=["y", None]).logits
    assert out.shape == (2, 5, 64) and llama_mm.pool.pinned == {}


@pytest.mark.parametrize("where", ["before unpinning", "between unpinning and freeing", "after unpinning"])
def test_an_interrupted_release_is_completed_by_the_next_one(monkeypatch, where):
    pool = _pool()
    lease = pool.acquire(["a", "b"])
    pool.unregister("a")  # pinned: its slot is freed at the release
    pool.unregister("b")
    calls = []

    def once(real):
        def interrupted(*args, **kwargs):
            if not calls:
                calls.append(1)
                raise KeyboardInterrupt
            return real(*args, **kwargs)

        return interrupted

    if where == "before unpinning":
        monkeypatch.setattr(pool, "_unpin", once(pool._unpin))
    elif where == "between unpinning and freeing":
        monkeypatch.setattr(pool, "_free", once(pool._free))
    else:
        monkeypatch.setattr(pool._cond, "notify_all", once(pool._cond.notify_all))
    with pytest.raises(KeyboardInterrupt):
        lease.release()
    assert not lease.released  # never marked released while a slot may still be pinned
    lease.release()
    assert lease.released and pool.pinned == {} and pool.resident == {}
    lease.release()
    assert pool.pinned == {}
    pool.acquire(["c"], timeout=0).release()


# ------------------------------------------------------------------------------------------------- unwrap


def test_an_unwrapped_model_refuses_every_call(llama_mm):
    model = llama_mm.unwrap()
    assert _plain(model)
    calls = {
        "__call__": lambda: llama_mm(IDS, adapter_names="x"),
        "generate": lambda: llama_mm.generate(IDS, adapter_names="x", max_new_tokens=1),
        "load_adapter": lambda: llama_mm.load_adapter("z", {}, {"r": 4}),
        "static_cache": lambda: llama_mm.static_cache(8),
        "compile": lambda: llama_mm.compile(),
    }
    for what, call in calls.items():
        with pytest.raises(RuntimeError, match=rf"the model was unwrapped; {what} would compute the base model"):
            call()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    assert llama_mm.unwrap() is model and _plain(model)  # a second unwrap changes nothing
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------------------------------- routed tokens


@pytest.mark.parametrize("targets", [["w1"], ["moe.experts.1.w2", "proj"], r".*experts\.0\.w1"])
def test_explicit_targets_inside_routed_experts_are_refused(targets):
    model = TinyMoeLM()
    with pytest.raises(NotImplementedError, match=r"target module 'moe\.experts\.\d\.w\d' sits inside routed experts"):
        MultiLoraModel(model, targets)
    assert _plain(model)


def _moe_adapter(seed: int, r: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"moe.gate": (16, 2), "proj": (16, 16)}
    return {
        key: torch.randn(*shape, generator=g) * 0.3
        for module, (k, n) in shapes.items()
        for key, shape in ((f"{module}.lora_A.weight", (r, k)), (f"{module}.lora_B.weight", (n, r)))
    }


@torch.no_grad()
def _merged_logits(state: dict[str, torch.Tensor] | None, ids: torch.Tensor, scaling: float) -> torch.Tensor:
    """The oracle: the base model with one adapter merged into its weights."""
    model = TinyMoeLM()
    for module in ("moe.gate", "proj") if state is not None else ():
        linear = model.get_submodule(module)
        linear.weight += scaling * state[f"{module}.lora_B.weight"] @ state[f"{module}.lora_A.weight"]
    return model(ids).logits


def test_all_linear_leaves_routed_experts_out_and_rows_stay_right():
    with pytest.warns(UserWarning, match="leaves out 4 layers inside routed experts"):
        mm = MultiLoraModel(TinyMoeLM(), "all-linear", max_adapters=2, max_rank=4)
    assert set(mm.pool.layers) == {"moe.gate", "proj"}  # the router sees every token in order: served
    adapters = {"p": _moe_adapter(1), "q": _moe_adapter(2)}
    for name, state in adapters.items():
        mm.load_adapter(name, state, {"r": 2, "lora_alpha": 4})
    # Each expert receives exactly as many tokens as there are rows (ids 0, 2 -> expert 0; 1, 3 -> expert 1).
    ids = torch.tensor([[0, 2], [1, 3], [2, 0]])
    rows = ["p", "q", None]
    logits = mm(ids, adapter_names=rows).logits
    for i, name in enumerate(rows):
        expected = _merged_logits(adapters.get(name), ids[i : i + 1], scaling=2.0)[0]
        torch.testing.assert_close(logits[i], expected, rtol=1e-5, atol=1e-5)
    before = _snapshot(mm.pool)
    expert = {**adapters["p"], "moe.experts.0.w1.lora_A.weight": torch.zeros(2, 16)}
    expert["moe.experts.0.w1.lora_B.weight"] = torch.zeros(32, 2)
    with pytest.raises(ValueError, match=r"module 'moe\.experts\.0\.w1' is not adapted by this pool"):
        mm.load_adapter("expert", expert, {"r": 2, "lora_alpha": 4})
    _assert_unchanged(mm.pool, before)


@pytest.mark.parametrize(
    ("ids", "match"),
    [
        # Expert 0 gets 6 tokens and expert 1 gets 4, multiples of the 2 rows: read as rows, they would be wrong.
        ([[0, 2, 4, 6, 8], [1, 3, 5, 7, 10]], r"'moe\.banks\.0\.w1' sees 6 tokens .* in a forward of \[2, 5\]"),
        # Each expert gets as many tokens as there are rows: all of row 0 to expert 0, all of row 1 to expert 1.
        ([[0, 2], [1, 3]], r"'moe\.banks\.0\.w1' sees 2 tokens .* in a forward of \[2, 2\]"),
    ],
)
def test_routed_tokens_raise_instead_of_getting_other_rows_adapters(ids, match):
    # Experts under another name are not recognised at construction: the run-time check stops them.
    mm = MultiLoraModel(TinyMoeLM(container="banks"), ["w1"], max_adapters=2, max_rank=4)
    g = torch.Generator().manual_seed(0)
    for name in ("p", "q"):
        state = {}
        for e in range(2):
            state[f"moe.banks.{e}.w1.lora_A.weight"] = torch.randn(2, 16, generator=g)
            state[f"moe.banks.{e}.w1.lora_B.weight"] = torch.randn(32, 2, generator=g)
        mm.load_adapter(name, state, {"r": 2, "lora_alpha": 4})
    with pytest.raises(ValueError, match=match + r".*routed or packed tokens are not supported"):
        mm(torch.tensor(ids), adapter_names=["p", "q"])
    assert mm.pool.pinned == {}
    # Without adapters on the routed layers the model is served.
    assert mm(torch.tensor(ids), adapter_names=[None, None]).logits.shape == (2, len(ids[0]), 32)


# -------------------------------------------------------------------------------------- PEFT's lm_head copies


@pytest.fixture(scope="module")
def lm_head_adapter(tmp_path_factory):
    """A PEFT adapter of q_proj and lm_head (PEFT then also saves ``lm_head.base_layer.weight``) and its model."""
    model = peft.get_peft_model(
        _llama(),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], init_lora_weights=False),
    )
    directory = tmp_path_factory.mktemp("lm_head")
    with pytest.warns(UserWarning, match="save_embedding_layers"):
        model.save_pretrained(directory)
    return model.eval(), directory


def test_a_peft_adapter_of_the_output_head_is_served(lm_head_adapter):
    peft_model, directory = lm_head_adapter
    keys = load_file(directory / "adapter_model.safetensors").keys()
    assert "base_model.model.lm_head.base_layer.weight" in keys
    mm = MultiLoraModel(_llama(), ["q_proj", "lm_head"], max_adapters=2, max_rank=4)
    mm.load_adapter("head", directory)
    logits = mm(IDS, adapter_names=["head", None]).logits
    with torch.no_grad():
        expected = peft_model(input_ids=IDS).logits
        base = _llama()(IDS).logits
    torch.testing.assert_close(logits[0], expected[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits[1], base[1], rtol=1e-5, atol=1e-5)
    assert (logits[0] - base[0]).abs().max() > 1e-2  # the adapter does change the row


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda s: s["lm_head.base_layer.weight"].add_(1e-3), r"differs from the model's \(compared in torch\.float32"),
        (lambda s: s.update({"lm_head.base_layer.weight": torch.zeros(64, 16)}), r"of shape \(64, 16\)"),
        (lambda s: s.update({"lm_head.base_layer.bias": torch.zeros(64)}), "which the model does not have"),
        (
            lambda s: s.update({"model.layers.0.mlp.up_proj.base_layer.weight": torch.zeros(48, 32)}),
            "a module not adapted by this pool",
        ),
    ],
)
def test_an_adapter_changing_base_weights_is_refused(lm_head_adapter, change, match):
    _, directory = lm_head_adapter
    state = {
        k.removeprefix("base_model.model."): v for k, v in load_file(directory / "adapter_model.safetensors").items()
    }
    change(state)
    mm = MultiLoraModel(_llama(), ["q_proj", "lm_head"], max_adapters=2, max_rank=4)
    mm.load_adapter("ok", directory)
    mm(IDS, adapter_names=["ok", None])
    before = _snapshot(mm.pool)
    config = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "lm_head"]}
    with pytest.raises(ValueError, match="is not a LoRA weight but a copy of the base model's .*" + match):
        mm.load_adapter("bad", state, config)
    _assert_unchanged(mm.pool, before)
    assert "a shared base model cannot serve an adapter that changes base weights" in str(
        pytest.raises(ValueError, mm.load_adapter, "bad", state, config).value
    )


def test_a_pool_without_a_base_model_refuses_base_weight_copies(busy_pool):
    tensors = {**_tensors({"l0": 2}, seed=3), "l0.base_layer.weight": torch.zeros(24, 16)}
    before = _snapshot(busy_pool)
    with pytest.raises(ValueError, match="no base model to compare it with: a shared base model cannot serve"):
        busy_pool.register("copy", tensors, config=_config({"l0": 2}))
    _assert_unchanged(busy_pool, before)


# ---------------------------------------------------------------------------------------------- wrong types


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda p: p.acquire("abe"), TypeError, "names must be a list or tuple .* got str 'abe'"),
        (lambda p: p.acquire({"a", "b"}), TypeError, "names must be a list or tuple .* got set"),
        (lambda p: p.acquire({"a": 0}), TypeError, "names must be a list or tuple .* got dict"),
        (lambda p: p.acquire(["a", 1]), TypeError, "names must be str or None, got 1"),
        (
            lambda p: p.register("__base__", _tensors({"l0": 2}, 5), config=_config({"l0": 2})),
            ValueError,
            "'__base__' is reserved",
        ),
        (
            lambda p: p.register("k", {0: torch.zeros(2, 16)}, config=_config({"l0": 2})),
            TypeError,
            "state dict key 0 is a int, not a str",
        ),
        (lambda p: p.register("k", _tensors({"l0": 2}, 5), config="r=2"), TypeError, "config must be a"),
        (
            lambda p: p.register("k", {**_tensors({"l0": 2}, 5), "l1.lora_A.weight": [0.0]}, config=_config({"l0": 2})),
            ValueError,
            "is not a tensor",
        ),
    ],
)
def test_pool_arguments_of_the_wrong_kind_are_refused(busy_pool, call, error, match):
    before = _snapshot(busy_pool)
    with pytest.raises(error, match=match):
        call(busy_pool)
    _assert_unchanged(busy_pool, before)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"adapter_names": {"x", "y"}}, "adapter_names must be a list or tuple .* got set"),
        ({"adapter_names": {"x": 0, "y": 1}}, "adapter_names must be a list or tuple .* got dict"),
        ({"adapter_names": "x", "adapter_scales": {0.5, 1.0}}, "adapter_scales must be a list or tuple .* got set"),
        ({"adapter_names": "x", "adapter_scales": {0: 0.5}}, "adapter_scales must be a list or tuple .* got dict"),
        ({"adapter_names": "x", "adapter_scales": [True, 1.0]}, "adapter_scales entries must be numbers or None"),
        ({"adapter_names": "x", "adapter_scales": ["1", 1.0]}, "adapter_scales entries must be numbers or None"),
    ],
)
def test_call_arguments_of_the_wrong_kind_are_refused(llama_mm, kwargs, match):
    llama_mm(IDS, adapter_names=["x", None])
    before = _snapshot(llama_mm.pool)
    with pytest.raises(TypeError, match=match):
        llama_mm(IDS, **kwargs)
    _assert_unchanged(llama_mm.pool, before)


def test_a_str_dtype_is_refused():
    model = _llama()
    with pytest.raises(TypeError, match="MultiLoraModel: dtype must be a torch.dtype .* got 'float16'"):
        MultiLoraModel(model, ["q_proj"], dtype="float16")
    assert _plain(model)
    with pytest.raises(TypeError, match="AdapterPool: dtype must be a torch.dtype .* got 'float16'"):
        AdapterPool(LAYERS, max_adapters=2, max_rank=4, dtype="float16")


def test_a_state_dict_key_that_is_not_a_str_is_refused(llama_mm):
    before = _snapshot(llama_mm.pool)
    with pytest.raises(TypeError, match=r"state dict key \('q', 0\) is a tuple, not a str"):
        llama_mm.load_adapter("k", {("q", 0): torch.zeros(4, 32)}, {"r": 4})
    _assert_unchanged(llama_mm.pool, before)
    assert math.isfinite(llama_mm(IDS, adapter_names="x").logits.abs().max().item())


def test_a_dict_config_goes_through_peft_validation(busy_pool):
    before = _snapshot(busy_pool)
    with pytest.raises(NotImplementedError, match="use_dora"):
        busy_pool.register("d", _tensors({"l0": 2}, 5), config={**_config({"l0": 2}), "use_dora": True})
    _assert_unchanged(busy_pool, before)
