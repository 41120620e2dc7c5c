"""``AdapterPool``: slots and their contents, LRU eviction, deferred unloads, validation that changes nothing on
failure, and loads / unloads / evictions from other threads while forwards run.

The model-level tests use a one-layer tiny Llama on the torch backend (they run many forwards); per-row outputs are
checked against single-adapter fastlora models (``fastlora.load_adapter``), the pool's contents against the adapter
tensors themselves.
"""

import copy
import functools
import json
import threading
import time

import pytest
import torch
from safetensors.torch import save_file
from serving_helpers import (
    IDS,
    adapter_state_dict,
    assert_logits_close,
    lora_tensors,
    oracle_logits,
    random_adapter,
)
from tiny_models import tiny_llama

import fastlora
from fastlora.ops import multi as multi_op
from fastlora.serving import AdapterPool, MultiLoraModel, UnknownAdapterError

pytest.importorskip("transformers")

POOL_TARGETS = ["q_proj", "v_proj", "down_proj"]
one_layer_llama = functools.partial(tiny_llama, num_hidden_layers=1)
LAYERS = {"l0": (16, 24), "l1": (16, 8)}  # name: (in_features, out_features)


def _tensors(ranks: dict[str, int], seed: int, **kwargs) -> dict[str, torch.Tensor]:
    return lora_tensors(LAYERS, ranks, seed, **kwargs)


def _small_pool(**kwargs) -> AdapterPool:
    return AdapterPool(LAYERS, **{"max_adapters": 2, "max_rank": 8, **kwargs})


def _register(pool, name, ranks, seed, **config):
    config = {"r": max(ranks.values()), "lora_alpha": 8, "target_modules": sorted(ranks), **config}
    pool.register(name, _tensors(ranks, seed), config=config)


# ------------------------------------------------------------------------------------------- slots, pool level


def test_upload_writes_every_layer_with_zero_padding_and_per_layer_scaling():
    pool = _small_pool()
    _register(pool, "big", {"l0": 8, "l1": 8}, seed=0)
    _register(pool, "small", {"l0": 2}, seed=1, r=2, lora_alpha=4, use_rslora=True)
    with pool.acquire(["big"]) as lease:
        assert lease.row_slots == (0,)
    with pool.acquire(["small", None]) as lease:
        slot = lease.row_slots[0]
        assert lease.row_slots == (1, -1) and lease.slot_ranks == (8, 2)
    # Evict "big" and put "small" into its slot: the rank-8 data must not survive beyond rank 2.
    _register(pool, "other", {"l1": 4}, seed=2, r=4)
    with pool.acquire(["other", "small"]):
        pass
    assert pool.resident == {"small": 1, "other": 0}
    pool.unregister("small")
    with pool.acquire(["big", "other"]):
        pass
    slot = pool.resident["big"]
    pool.unregister("big")
    _register(pool, "small", {"l0": 2}, seed=1, r=2, lora_alpha=4, use_rslora=True)
    with pool.acquire(["small"]) as lease:
        assert lease.row_slots == (slot,)
    t = _tensors({"l0": 2}, seed=1)
    l0, l1 = pool.layers["l0"], pool.layers["l1"]
    assert torch.equal(l0.a_pool[slot, :2], t["base_model.model.l0.lora_A.weight"])
    assert torch.equal(l0.b_pool[slot, :, :2], t["base_model.model.l0.lora_B.weight"])
    assert not l0.a_pool[slot, 2:].any() and not l0.b_pool[slot, :, 2:].any()
    assert not l1.a_pool[slot].any() and not l1.b_pool[slot].any()  # not targeted: rank 0, zeros
    assert l0.slot_ranks[slot] == 2 and l1.slot_ranks[slot] == 0
    assert l0.slot_scalings[slot].item() == pytest.approx(4 / 2**0.5)


def test_lru_evicts_the_least_recently_used_unpinned_slot():
    pool = _small_pool()
    for i, name in enumerate("xyz"):
        _register(pool, name, {"l0": 2}, seed=i)
    for names in (["x"], ["y"], ["x"]):
        pool.acquire(names).release()
    pool.acquire(["z"]).release()
    assert set(pool.resident) == {"x", "z"}  # y was least recently used
    with pool.acquire(["x"]):  # pinned: the next upload must take z's slot although x is older now
        pool.acquire(["y"]).release()
        assert set(pool.resident) == {"x", "y"}


def test_a_batch_waits_for_slots_pinned_by_running_batches():
    pool = _small_pool()
    for i, name in enumerate("xyz"):
        _register(pool, name, {"l0": 2}, seed=i)
    held = pool.acquire(["x", "y"])
    with pytest.raises(TimeoutError, match="waited 0.05 s for 1 free slots"):
        pool.acquire(["z"], timeout=0.05)
    assert pool.resident == {"x": 0, "y": 1}
    got = []
    waiter = threading.Thread(target=lambda: got.append(pool.acquire(["z", "x"])))
    waiter.start()
    time.sleep(0.1)
    assert got == [] and pool.resident == {"x": 0, "y": 1}
    held.release()
    waiter.join(timeout=10)
    assert got and got[0].row_slots == (1, 0)  # y's slot, x kept (the waiting batch needs it)
    got[0].release()
    assert pool.pinned == {}


def test_unload_and_replace_of_a_pinned_adapter_wait_for_its_batch():
    pool = _small_pool(max_adapters=3)
    _register(pool, "x", {"l0": 4, "l1": 4}, seed=0)
    lease = pool.acquire(["x"])
    slot = lease.row_slots[0]
    before = pool.layers["l0"].a_pool[slot].clone()
    pool.register("x", _tensors({"l0": 4, "l1": 4}, seed=1), config={"r": 4, "lora_alpha": 8}, replace=True)
    with pool.acquire(["x"]) as new:
        assert new.row_slots[0] != slot and new.versions["x"] > lease.versions["x"]
    assert torch.equal(pool.layers["l0"].a_pool[slot], before)  # the running batch keeps its weights
    pool.unregister("x")
    assert "x" not in pool and pool.adapters == []
    with pytest.raises(UnknownAdapterError):
        pool.acquire(["x"])
    assert pool.pinned == {slot: 1} and torch.equal(pool.layers["l0"].a_pool[slot], before)
    lease.release()
    lease.release()  # idempotent
    assert pool.pinned == {} and pool.resident == {}


def test_state_dict_keys_and_config_forms():
    pool = _small_pool()
    t = _tensors({"l0": 2, "l1": 2}, seed=0)
    # Module-relative keys with the adapter-name infix, as some tools save them; target_modules from the keys.
    infix = {k.removeprefix("base_model.model.").replace(".weight", ".default.weight"): v for k, v in t.items()}
    info = pool.register("x", infix, config={"r": 2, "lora_alpha": 6})
    assert info.layer_ranks == {"l0": 2, "l1": 2} and info.layer_scalings == {"l0": 3.0, "l1": 3.0}
    pool.register("y", t, config=fastlora.LoraConfig(r=2, lora_alpha=2, target_modules=["l0", "l1"]))
    with pytest.raises(ValueError, match="a state dict needs config="):
        pool.register("z", t)
    with pytest.raises(TypeError, match="expected a path or a state dict"):
        pool.register("z", [t])


def test_fp16_pool_refuses_values_that_overflow_it():
    pool = _small_pool(dtype=torch.float16)
    t = _tensors({"l0": 2}, seed=0)
    t["base_model.model.l0.lora_B.weight"][0, 0] = 1e6
    with pytest.raises(ValueError, match=r"l0.lora_B.weight has non-finite values \(in torch.float16\)"):
        pool.register("x", t, config={"r": 2, "lora_alpha": 2})
    assert pool.adapters == []


class _FakeStream:
    """Stands in for a CUDA stream: records what it was made to wait for."""

    def __init__(self):
        self.waited = []

    def wait_event(self, event):
        self.waited.append(event)


class _FakeEvent:
    created = []

    def __init__(self):
        self.stream = None
        self.created.append(self)

    def record(self, stream):
        self.stream = stream


def test_each_slot_keeps_one_release_event_per_stream(monkeypatch):
    streams = [_FakeStream(), _FakeStream(), _FakeStream()]
    current = [streams[0]]
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current[0])
    pool = _small_pool()
    monkeypatch.setattr(pool, "device", torch.device("cuda"))  # the event bookkeeping, on CPU tensors
    for i, name in enumerate("xyz"):
        _register(pool, name, {"l0": 2}, seed=i)
    latest = {}
    for i in range(50):  # many requests for a resident adapter, from two streams
        current[0] = streams[i % 2]
        lease = pool.acquire(["x"])
        lease.release()
        latest[current[0]] = _FakeEvent.created[-1]
        assert all(len(events) <= 2 for events in pool._slot_events), f"after {i + 1} releases"
    assert {e.stream for e in latest.values()} == set(streams[:2])
    # Evicting x uploads into its slot: the upload waits for the last release on each stream, and only for those.
    current[0] = streams[2]
    pool.acquire(["y"]).release()
    streams[2].waited.clear()
    pool.acquire(["z"]).release()
    assert pool.resident["z"] == 0
    released = [e for e in streams[2].waited if e.stream is not streams[2]]
    assert sorted(map(id, released)) == sorted(map(id, latest.values()))


def test_uploads_copy_from_the_host_without_blocking(monkeypatch):
    pool = _small_pool()
    _register(pool, "x", {"l0": 4, "l1": 4}, seed=0)
    blocking = []
    copy = torch.Tensor.copy_

    def spy(dst, src, non_blocking=False):
        if not non_blocking:
            blocking.append((tuple(dst.shape), tuple(src.shape)))
        return copy(dst, src, non_blocking=non_blocking)

    # A blocking host-to-device copy waits for the stream's queued kernels, here under the pool's lock.
    monkeypatch.setattr(torch.Tensor, "copy_", spy)
    pool.acquire(["x"]).release()
    monkeypatch.undo()
    assert pool.resident == {"x": 0} and blocking == []


def test_releasing_a_lease_from_two_threads_unpins_once():
    pool = _small_pool()
    _register(pool, "x", {"l0": 2}, seed=0)
    other = pool.acquire(["x"])
    lease = pool.acquire(["x"])
    slot = lease.row_slots[0]
    # Both threads read the lease's state before either marks it released, unless release holds the pool's lock.
    both_read = threading.Barrier(2, timeout=0.5)
    reads = []

    class RacingLease(type(lease)):
        @property
        def _released(self):
            value = self.__dict__["_flag"]
            if len(reads) < 2:
                reads.append(threading.current_thread().name)
                try:
                    both_read.wait()
                except threading.BrokenBarrierError:  # the other thread could not read meanwhile
                    pass
            return value

        @_released.setter
        def _released(self, value):
            self.__dict__["_flag"] = value

    lease.__dict__["_flag"] = lease.__dict__.pop("_released")
    lease.__class__ = RacingLease
    threads = [threading.Thread(target=lease.release) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert lease.released and pool.pinned == {slot: 1}
    other.release()
    assert pool.pinned == {}


def test_an_adapter_selecting_no_module_of_the_pool_is_refused():
    pool = _small_pool()
    _register(pool, "x", {"l0": 2}, seed=0)
    with pytest.raises(ValueError, match=r"adapter 'bad'.*target_modules=\['nope'\] select no module of this pool"):
        pool.register("bad", {}, config={"r": 2, "lora_alpha": 2, "target_modules": ["nope"]})
    assert pool.adapters == ["x"] and pool.resident == {}


# ------------------------------------------------------------------------------- bad adapters change nothing


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A one-layer Llama serving q/v/down_proj with two resident adapters and one in the CPU tier only."""
    root = tmp_path_factory.mktemp("served")
    dirs = {
        "good1": random_adapter(root / "good1", one_layer_llama, r=4, lora_alpha=8, target_modules=POOL_TARGETS,
                                seed=1),
        "good2": random_adapter(root / "good2", one_layer_llama, r=8, lora_alpha=8, target_modules=["q_proj"], seed=2),
        "good3": random_adapter(root / "good3", one_layer_llama, r=2, lora_alpha=4, target_modules=POOL_TARGETS,
                                seed=3),
        "big": random_adapter(root / "big", one_layer_llama, r=16, lora_alpha=16, target_modules=POOL_TARGETS, seed=4),
        "o_proj": random_adapter(root / "o_proj", one_layer_llama, r=4, lora_alpha=8,
                                 target_modules=["q_proj", "o_proj"], seed=5),
    }  # fmt: skip
    mm = MultiLoraModel(one_layer_llama(), POOL_TARGETS, max_adapters=2, max_rank=8)
    for name in ("good1", "good2", "good3"):
        mm.load_adapter(name, dirs[name])
    mm(IDS[:2], adapter_names=["good1", "good2"])
    return mm, dirs, root


def _snapshot(pool: AdapterPool) -> dict:
    with pool._cond:
        return copy.deepcopy({
            "tensors": {n: (p.a_pool, p.b_pool, p.slot_ranks, p.slot_scalings) for n, p in pool.layers.items()},
            "adapters": pool.adapters,
            "resident": pool.resident,
            "pinned": pool.pinned,
            "infos": [pool.info(n) for n in pool.adapters],
            "cpu_tier": {n: {k: (w.lora_A, w.lora_B) for k, w in e.layers.items()} for n, e in pool._entries.items()},
            "slots": (list(pool._lru), pool._slot_ranks, pool._slot_scalings, [e and e.name for e in pool._slot_entry]),
        })  # fmt: skip


def _assert_same(actual, expected, path="pool"):
    if isinstance(expected, torch.Tensor):
        assert actual.dtype == expected.dtype and torch.equal(actual, expected), path
    elif isinstance(expected, dict):
        assert actual.keys() == expected.keys(), path
        for key in expected:
            _assert_same(actual[key], expected[key], f"{path}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), path
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            _assert_same(a, e, f"{path}[{i}]")
    else:
        assert actual == expected, path


def _with(dirs, name, change):
    state = dict(adapter_state_dict(dirs[name]))
    change(state)
    return state


def _config(dirs, name, **changes):
    config = fastlora.io.read_adapter(dirs[name])[0]
    return fastlora.LoraConfig(**{**config.__dict__, **changes})


Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
Q_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def _bad_state_dict(kind, dirs):
    """``(source, config, exception, message)`` for a bad adapter given as a state dict."""
    good = _config(dirs, "good1")
    if kind == "wrong A shape":
        return (
            _with(dirs, "good1", lambda s: s.update({Q_A: torch.zeros(4, 65)})),
            good,
            ValueError,
            (r"q_proj: lora_A \(4, 65\) / lora_B \(64, 4\) do not fit the layer \(expected \[r, 64\] and \[64, r\]\)"),
        )
    if kind == "wrong B shape":
        return _with(dirs, "good1", lambda s: s.update({Q_B: torch.zeros(63, 4)})), good, ValueError, "do not fit"
    if kind == "unknown module key":
        extra = "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"
        return (
            _with(dirs, "good1", lambda s: s.update({extra: torch.zeros(4, 64)})),
            good,
            ValueError,
            ("module 'model.layers.0.mlp.up_proj' is not adapted by this pool"),
        )
    if kind == "module the model lacks":
        extra = "base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"
        return (
            _with(dirs, "good1", lambda s: s.update({extra: torch.zeros(4, 64)})),
            good,
            ValueError,
            ("module 'model.layers.7.self_attn.q_proj' is not adapted"),
        )
    if kind == "missing lora_B":
        return _with(dirs, "good1", lambda s: s.pop(Q_B)), good, ValueError, "q_proj.lora_B.weight is missing"
    if kind == "module missing":
        return (
            _with(dirs, "good1", lambda s: (s.pop(Q_A), s.pop(Q_B))),
            good,
            ValueError,
            ("modules selected without weights: model.layers.0.self_attn.q_proj"),
        )
    if kind == "non-finite":
        return (
            _with(dirs, "good1", lambda s: s[Q_B].__setitem__((0, 0), float("nan"))),
            good,
            ValueError,
            ("q_proj.lora_B.weight has non-finite values"),
        )
    if kind == "integer tensor":
        return (
            _with(dirs, "good1", lambda s: s.update({Q_A: s[Q_A].to(torch.int32)})),
            good,
            ValueError,
            ("not floating point"),
        )
    if kind == "rank differs from config":
        return (
            adapter_state_dict(dirs["good1"]),
            _config(dirs, "good1", r=6),
            ValueError,
            ("has rank 4 but the config gives it r=6"),
        )
    if kind == "bias":
        return adapter_state_dict(dirs["good1"]), _config(dirs, "good1", bias="all"), NotImplementedError, "bias='all'"
    if kind == "modules_to_save":
        return (
            adapter_state_dict(dirs["good1"]),
            _config(dirs, "good1", modules_to_save=["lm_head"]),
            (NotImplementedError),
            "modules_to_save",
        )
    if kind == "not a LoRA key":
        extra = "base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias"
        return (
            _with(dirs, "good1", lambda s: s.update({extra: torch.zeros(64)})),
            good,
            ValueError,
            ("is not a LoRA weight"),
        )
    raise AssertionError(kind)


STATE_DICT_CASES = [
    "wrong A shape", "wrong B shape", "unknown module key", "module the model lacks", "missing lora_B",
    "module missing", "non-finite", "integer tensor", "rank differs from config", "bias", "modules_to_save",
    "not a LoRA key",
]  # fmt: skip


@pytest.mark.parametrize("kind", STATE_DICT_CASES)
def test_bad_state_dict_raises_and_changes_nothing(served, kind):
    mm, dirs, _ = served
    source, config, error, message = _bad_state_dict(kind, dirs)
    before = _snapshot(mm.pool)
    with pytest.raises(error, match=message):
        mm.load_adapter("bad", source, config)
    _assert_same(_snapshot(mm.pool), before)


def _truncated(dirs, root):
    bad = root / "truncated"
    bad.mkdir(exist_ok=True)
    (bad / "adapter_config.json").write_bytes((dirs["good1"] / "adapter_config.json").read_bytes())
    data = (dirs["good1"] / "adapter_model.safetensors").read_bytes()
    (bad / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    return bad


def _bad_json(dirs, root):
    bad = root / "bad_json"
    bad.mkdir(exist_ok=True)
    (bad / "adapter_config.json").write_text("{not json")
    (bad / "adapter_model.safetensors").write_bytes((dirs["good1"] / "adapter_model.safetensors").read_bytes())
    return bad


def _wrong_shape_file(dirs, root):
    bad = root / "wrong_shape_file"
    bad.mkdir(exist_ok=True)
    (bad / "adapter_config.json").write_bytes((dirs["good1"] / "adapter_config.json").read_bytes())
    save_file(_with(dirs, "good1", lambda s: s.update({Q_A: torch.zeros(4, 32)})), bad / "adapter_model.safetensors")
    return bad


def _pickle(dirs, root):
    bad = root / "pickled"
    bad.mkdir(exist_ok=True)
    (bad / "adapter_config.json").write_bytes((dirs["good1"] / "adapter_config.json").read_bytes())
    torch.save(adapter_state_dict(dirs["good1"]), bad / "adapter_model.bin")
    return bad


def _dora(dirs, root):
    bad = root / "dora"
    bad.mkdir(exist_ok=True)
    config = json.loads((dirs["good1"] / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    (bad / "adapter_model.safetensors").write_bytes((dirs["good1"] / "adapter_model.safetensors").read_bytes())
    return bad


FILE_CASES = {
    "corrupt file": (_truncated, ValueError, "not a readable safetensors file"),
    "bad config json": (_bad_json, ValueError, "is not valid JSON"),
    "wrong shape in file": (_wrong_shape_file, ValueError, "do not fit the layer"),
    "pickle refused": (_pickle, ValueError, "is a pickle file"),
    "missing dir": (lambda dirs, root: root / "nowhere", FileNotFoundError, "does not exist"),
    "DoRA": (_dora, NotImplementedError, "use_dora"),
    "rank over max_rank": (lambda dirs, root: dirs["big"], ValueError, r"has rank 16, over the pool's max_rank=8"),
    "config selects an unknown module": (lambda dirs, root: dirs["o_proj"], ValueError, (
        "module 'model.layers.0.self_attn.o_proj' is not adapted by this pool"
    )),
}  # fmt: skip


@pytest.mark.parametrize("kind", list(FILE_CASES))
def test_bad_adapter_file_raises_and_changes_nothing(served, kind):
    mm, dirs, root = served
    make, error, message = FILE_CASES[kind]
    before = _snapshot(mm.pool)
    with pytest.raises(error, match=message):
        mm.load_adapter("bad", make(dirs, root))
    _assert_same(_snapshot(mm.pool), before)


def test_config_naming_a_module_outside_the_pool_without_weights(served):
    mm, dirs, _ = served
    before = _snapshot(mm.pool)
    config = _config(dirs, "good1", target_modules=[*POOL_TARGETS, "o_proj"])
    with pytest.raises(ValueError, match=r"select modules this pool does not adapt \(unknown modules\): "
                                         r"model.layers.0.self_attn.o_proj"):  # fmt: skip
        mm.load_adapter("bad", adapter_state_dict(dirs["good1"]), config)
    _assert_same(_snapshot(mm.pool), before)


def test_config_selecting_no_module_of_the_model_changes_nothing(served):
    mm, dirs, _ = served
    before = _snapshot(mm.pool)
    for source in ({}, adapter_state_dict(dirs["good1"])):
        with pytest.raises(ValueError, match=r"adapter 'bad'.*target_modules=\['nope'\] select no module"):
            mm.load_adapter("bad", source, {"r": 4, "lora_alpha": 8, "target_modules": ["nope"]})
    _assert_same(_snapshot(mm.pool), before)


def test_duplicate_name_raises_and_replace_swaps(served):
    mm, dirs, _ = served
    before = _snapshot(mm.pool)
    with pytest.raises(ValueError, match="'good1' is already registered"):
        mm.load_adapter("good1", dirs["good3"])
    _assert_same(_snapshot(mm.pool), before)
    # Residents still compute what they computed (the snapshot covers the tensors; this covers the wiring).
    ids = IDS[:3]
    logits = mm(ids, adapter_names=["good2", None, "good1"]).logits
    assert_logits_close(logits[0], oracle_logits(one_layer_llama, dirs["good2"], ids)[0], "good2")
    assert_logits_close(logits[1], oracle_logits(one_layer_llama, None, ids)[1], "base")
    assert_logits_close(logits[2], oracle_logits(one_layer_llama, dirs["good1"], ids)[2], "good1")


# --------------------------------------------------------------------------------------------------- threads


def _concurrent_run(dirs, iterations: int, backend: str, monkeypatch):
    """Two threads run forwards (each checking every row) while a third replaces, unloads and reloads an adapter
    ("x", alternating between two weight sets) and forces evictions by pinning other adapters."""
    monkeypatch.setenv("FASTLORA_BACKEND", backend)
    mm = MultiLoraModel(one_layer_llama(), POOL_TARGETS, max_adapters=3, max_rank=8)
    for name in ("a", "b", "e1", "e2"):
        mm.load_adapter(name, dirs[name])
    ids = IDS[:4]
    expected = {n: oracle_logits(one_layer_llama, dirs[n], ids) for n in ("a", "b", "x1", "x2")}
    expected[None] = oracle_logits(one_layer_llama, None, ids)
    errors, seen = [], {"x1": 0, "x2": 0, "unknown": 0, "rows": 0}
    lock = threading.Lock()
    stop = threading.Event()

    def reader(rows):
        try:
            for _ in range(iterations):
                try:
                    logits = mm(ids, adapter_names=rows).logits
                    used = rows
                except UnknownAdapterError:  # "x" is between an unload and its reload
                    used = [None if n == "x" else n for n in rows]
                    logits = mm(ids, adapter_names=used).logits
                    with lock:
                        seen["unknown"] += 1
                for i, name in enumerate(used):
                    if name == "x":
                        errs = {v: (logits[i] - expected[v][i]).abs().max().item() for v in ("x1", "x2")}
                        version = min(errs, key=errs.get)
                        assert_logits_close(logits[i], expected[version][i], f"{used} row {i} ({version})")
                        with lock:
                            seen[version] += 1
                    else:
                        assert_logits_close(logits[i], expected[name][i], f"{used} row {i}")
                with lock:
                    seen["rows"] += len(used)
        except BaseException as e:  # noqa: BLE001 (reported by the main thread)
            errors.append(e)
            stop.set()

    def writer():
        try:
            i = 0
            while not stop.is_set():
                version = "x1" if i % 2 == 0 else "x2"
                mm.load_adapter("x", dirs[version], replace=True)
                with mm.pool.acquire(["e1", "e2"]):  # evicts whatever the readers do not pin
                    time.sleep(0.001)
                if i % 3 == 2:
                    mm.unload_adapter("x")
                i += 1
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    mm.load_adapter("x", dirs["x1"])
    readers = [threading.Thread(target=reader, args=(rows,)) for rows in (["x", "a", None, "b"], ["b", "x", "x", "a"])]
    write = threading.Thread(target=writer)
    for t in (*readers, write):
        t.start()
    for t in readers:
        t.join(timeout=300)
    stop.set()
    write.join(timeout=60)
    if errors:
        raise errors[0]
    assert seen["rows"] >= 2 * iterations * 4
    assert mm.pool.pinned == {}
    return seen


@pytest.fixture(scope="module")
def thread_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("threads")
    specs = {"a": (4, ["q_proj", "v_proj"]), "b": (8, POOL_TARGETS), "e1": (2, POOL_TARGETS), "e2": (4, ["q_proj"]),
             "x1": (4, POOL_TARGETS), "x2": (4, POOL_TARGETS)}  # fmt: skip
    return {
        name: random_adapter(root / name, one_layer_llama, r=r, lora_alpha=2 * r, target_modules=targets, seed=20 + i)
        for i, (name, (r, targets)) in enumerate(specs.items())
    }


def test_loads_unloads_and_evictions_during_forwards_never_mix_adapters(thread_dirs, monkeypatch):
    seen = _concurrent_run(thread_dirs, iterations=40, backend="torch", monkeypatch=monkeypatch)
    assert seen["x1"] + seen["x2"] > 0


@pytest.mark.slow
def test_concurrent_stress_on_the_triton_path(thread_dirs, monkeypatch):
    if not torch.cuda.is_available():
        # Triton's interpreter is not thread-safe (it patches triton.language while a kernel runs), so interpreted
        # launches take turns; the pool's loads, unloads and evictions still interleave with the forwards.
        lock = threading.Lock()
        launch = multi_op.multi_lora_triton

        def one_at_a_time(*args, **kwargs):
            with lock:
                return launch(*args, **kwargs)

        monkeypatch.setattr(multi_op, "multi_lora_triton", one_at_a_time)
    seen = _concurrent_run(thread_dirs, iterations=30, backend="auto", monkeypatch=monkeypatch)
    assert seen["x1"] + seen["x2"] > 0


@pytest.mark.slow
def test_concurrent_stress_long(thread_dirs, monkeypatch):
    seen = _concurrent_run(thread_dirs, iterations=400, backend="torch", monkeypatch=monkeypatch)
    assert seen["x1"] > 0 and seen["x2"] > 0
