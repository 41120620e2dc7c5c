"""The fixed-size serving path on CPU: ``StaticBatch`` metadata against the exact ``BatchMeta`` for every layer and in
``generate``, the decode-step API over a static cache while adapters come and go, and ``torch.compile`` of decoder
layers without graph breaks. (Capture and replay of CUDA graphs need a GPU: ``tests/test_gpu.py``.)"""

import pytest
import torch
from multi_lora_cases import expected, make_case
from serving_helpers import IDS, ROWS, TARGETS, peft_model_with_adapters, record_multi_launches
from tiny_models import tiny_llama
from tolerances import assert_close

from fastlora.ops import BatchMeta, StaticBatch, multi_lora_linear
from fastlora.serving import MultiLoraModel

# ------------------------------------------------------------------------------------------------- StaticBatch

RANKS = [4, 16, 0, 8]
SCALINGS = [0.5, 0.75, 1.0, 1.25]


@pytest.mark.parametrize(
    ("backend", "impl"), [("torch", None), ("triton", "fused"), ("triton", "segmented")], ids=["torch", "fused", "seg"]
)
@pytest.mark.parametrize("scales", [False, True], ids=["", "token scales"])
def test_static_batch_matches_the_exact_meta(backend, impl, scales, monkeypatch):
    """Fixed-size buffers (padding rows with slot -1, empty trailing segments, rank bucket above the batch's) give
    the exact metadata's output, on both backends and both Triton paths; a second batch written into the same
    buffers gives its own output."""
    monkeypatch.setenv("FASTLORA_BACKEND", backend)
    batches = [[1, -1, 0, 3, 1, 0, -1, 3, 1, -1], [3, 3, 3, -1, -1, -1, -1, -1, 0, 1]]
    x, w, b, a_pool, b_pool, _ = make_case(10, 24, 40, RANKS, batches[0], torch.float32, r_max=32)
    buffers = StaticBatch(10, len(RANKS), 32, "cpu", token_scales=scales)
    for i, slots in enumerate(batches):
        token_scales = [0.5 + 0.1 * t for t in range(10)] if scales else None
        meta = BatchMeta.build(slots, RANKS, SCALINGS, token_scales)
        static = buffers.update(slots, RANKS, SCALINGS, token_scales)
        assert static is buffers.meta and static.num_segments == 4 and static.max_segment_len == 10
        kwargs = {} if backend == "torch" else {"impl": impl}
        with torch.no_grad():
            got = multi_lora_linear(x, w, b, a_pool, b_pool, static, **kwargs)
            want = multi_lora_linear(x, w, b, a_pool, b_pool, meta, **kwargs)
        assert_close(got, want, torch.float32, 24, f"batch {i}")
        assert_close(got, expected(x, w, b, a_pool, b_pool, meta), torch.float32, 24, f"batch {i} vs fp64")


def test_static_batch_buffers_stay_in_place_and_padding_is_empty():
    buffers = StaticBatch(6, 4, 16, "cpu")
    ptrs = (buffers.meta.token_slots.data_ptr(), buffers.meta.seg_offsets.data_ptr())
    meta = buffers.update([2, -1, 2, 0, -1, -1], [4, 16, 8, 0], SCALINGS)
    assert (meta.token_slots.data_ptr(), meta.seg_offsets.data_ptr()) == ptrs
    assert meta.seg_offsets.tolist() == [0, 1, 3, 3, 3]  # two segments, then empty ones
    assert meta.seg_slots.tolist()[:2] == [0, 2]
    assert meta.sorted_token_ids.tolist()[:3] == [3, 0, 2]
    assert meta.active_slots is None


def test_static_batch_errors_change_nothing():
    buffers = StaticBatch(4, 4, 8, "cpu")
    before = buffers.update([0, 3, -1, 3], RANKS, SCALINGS).token_slots.clone()
    with pytest.raises(ValueError, match="rank 16, above the buffers' max_rank=8"):
        buffers.update([1, 1, 1, 1], RANKS, SCALINGS)
    with pytest.raises(ValueError, match="5 tokens, the buffers hold 4"):
        buffers.update([0] * 5, RANKS, SCALINGS)
    with pytest.raises(ValueError, match="slot 2 is used by a token but holds no adapter"):
        buffers.update([2, 0, 0, 0], RANKS, SCALINGS)
    with pytest.raises(ValueError, match="token_scales=False"):
        buffers.update([0, 0, 0, 0], RANKS, SCALINGS, [1.0] * 4)
    assert torch.equal(buffers.meta.token_slots, before)
    with pytest.raises(ValueError, match="max_rank must be an integer >= 1"):
        StaticBatch(4, 4, 0, "cpu")


# --------------------------------------------------------------------------------------------- MultiLoraModel


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    return peft_model_with_adapters(tiny_llama(), tmp_path_factory.mktemp("graph_adapters"))[1]


def _wrapped(dirs, max_adapters=4, **kwargs) -> MultiLoraModel:
    mm = MultiLoraModel(tiny_llama(), TARGETS, max_adapters=max_adapters, max_rank=16, **kwargs)
    for name, directory in dirs.items():
        mm.load_adapter(name, directory)
    return mm


def _generate(mm, cuda_graphs, names=ROWS, **kwargs):
    kwargs.setdefault("do_sample", False)
    return mm.generate(
        IDS, attention_mask=torch.ones_like(IDS), adapter_names=names, max_new_tokens=5, pad_token_id=0,
        cuda_graphs=cuda_graphs, **kwargs,
    )  # fmt: skip


@pytest.mark.parametrize("backend", ["torch", "auto"], ids=["torch backend", "triton kernels"])
def test_generate_on_the_fixed_size_path_matches_the_exact_one(adapters, backend, monkeypatch):
    """``cuda_graphs=True`` on a CPU: a kept static cache and fixed-size decode metadata, run eagerly; the same tokens
    as the dynamic-cache, exact-metadata generate, and again on a second call that reuses the cache and buffers with
    another row mix."""
    calls = record_multi_launches(monkeypatch, backend)
    mm = _wrapped(adapters)
    updates = []
    real_update = StaticBatch.update
    monkeypatch.setattr(StaticBatch, "update", lambda self, *a, **k: updates.append(self) or real_update(self, *a, **k))
    for names in (ROWS, ["math", "math", None, "sql", "chat"]):
        want = _generate(mm, False, names)
        got = _generate(mm, True, names)
        assert torch.equal(got, want)
    assert len(mm.graphs._caches) == 1  # one static cache, reset and reused by the second call
    assert len(mm._static) == 1 and len(updates) == 2  # one set of decode buffers, written once per call
    if backend == "auto":
        assert 5 in calls  # the decode steps ran the kernels over 5 tokens (the fixed-size metadata)


def test_generate_with_scales_and_copies_on_the_fixed_size_path(adapters):
    mm = _wrapped(adapters)
    # Sampling with top_k=1 (greedy generate takes no copies): rows repeated to their copies, each with its scale.
    kwargs = dict(adapter_scales=[0.5, None, 2.0, 1.0, 0.0], num_return_sequences=2, top_k=1)
    got = _generate(mm, True, **kwargs, do_sample=True)
    assert torch.equal(got, _generate(mm, False, **kwargs, do_sample=True))
    assert got.shape[0] == 2 * IDS.shape[0]
    assert any(key[2] for key in mm._static)  # token scales live in the buffers


def test_decode_step_api_follows_adapters_that_change_between_steps(adapters):
    """A serving loop: prefill, then decode steps over a static cache through ``mm(...)``, the rows' adapters changing
    and adapters being unloaded, reloaded and evicted (a pool of 2 slots for 3 adapters) between steps. Every step's
    logits match the same loop over a dynamic cache with exact metadata."""
    from transformers import DynamicCache

    steps = [ROWS, ["chat", None, "chat", "sql", "sql"], ["math", "math", None, None, "math"], [None] * 5, ROWS]

    def loop(mm, cache, cuda_graphs):
        cache_arg = mm.graphs.cache_arg
        ids, out = IDS, []
        logits = mm(ids, adapter_names=steps[0], cuda_graphs=cuda_graphs, **{cache_arg: cache}).logits
        for i, names in enumerate(steps):
            if i == 2:
                mm.unload_adapter("sql")
                mm.load_adapter("sql", adapters["sql"])
            ids = logits[:, -1:].argmax(-1)
            out.append(logits[:, -1])
            logits = mm(ids, adapter_names=names, cuda_graphs=cuda_graphs, **{cache_arg: cache}).logits
        return out

    graphed = _wrapped(adapters, max_adapters=3)
    eager = _wrapped(adapters, max_adapters=3)
    got = loop(graphed, graphed.static_cache(32), True)
    want = loop(eager, DynamicCache(), False)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert_close(g, w, torch.float32, 1024, f"step {i}")
    assert graphed._static  # the decode steps used the fixed-size buffers


# ----------------------------------------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("backend", ["torch", "auto"], ids=["torch backend", "triton kernels"])
def test_compiled_decoder_layer_traces_without_graph_breaks(adapters, backend, monkeypatch):
    """``fullgraph=True`` on a decoder layer of the wrapped model: the logits of eager calls, and no recompile for a
    batch of the same size with another adapter mix and other scales."""
    from torch._dynamo.testing import CompileCounter

    monkeypatch.setenv("FASTLORA_BACKEND", backend)
    torch._dynamo.reset()
    eager, compiled = _wrapped(adapters), _wrapped(adapters)
    counter = CompileCounter()
    compiled.compile("model.layers.0", fullgraph=True, backend=counter)
    mixes = [(ROWS, None), (["math", "math", None, "sql", "chat"], [1.0, 0.5, 1.0, 2.0, 1.0])]
    for names, scales in mixes:
        want = eager(IDS, adapter_names=names, adapter_scales=scales).logits
        got = compiled(IDS, adapter_names=names, adapter_scales=scales).logits
        assert_close(got, want, torch.float32, 1024, f"{names}")
    assert counter.frame_count == 2  # one per scales layout (with and without token scales), not per mix
    assert compiled(IDS, adapter_names=ROWS).logits.shape == want.shape
    assert counter.frame_count == 2


# ----------------------------------------------------------------------------------------------- DecodeGraphs


def test_every_decode_step_of_a_generate_has_one_graph_key(adapters, monkeypatch):
    """What makes a graph replayable across steps and calls: in ``generate`` every decode step (and only those) gets a
    key, the same one at every step of the call and of the next call (the kept cache, reset, has the same buffers);
    a batch of another size gets another key; beam search and a dynamic cache get none."""
    from transformers import DynamicCache

    from fastlora.serving import DecodeGraphs

    mm = _wrapped(adapters)
    keys = []
    real_plan = DecodeGraphs._plan

    def spy(self, kwargs):
        plan = real_plan(self, kwargs)
        keys.append(None if plan is None else (plan[0], plan[2]))
        return plan

    monkeypatch.setattr(DecodeGraphs, "_plan", spy)
    _generate(mm, True)
    first = list(keys)
    assert first[0] is None and len(first) == 5  # the prefill, then 4 decode steps of 5 rows
    assert len(set(first[1:])) == 1 and first[1][0] == 5
    keys.clear()
    _generate(mm, True, ["chat"] * 5)
    assert keys == first
    keys.clear()
    mm.generate(IDS[:2], adapter_names=ROWS[:2], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert keys[0] is None and len(set(keys[1:])) == 1 and keys[1][0] == 2 and keys[1] != first[1]
    keys.clear()
    _generate(mm, True, num_beams=2)
    assert keys == [] or set(keys) == {None}  # beam search: plain generate
    keys.clear()
    arg = mm.graphs.cache_arg
    mm(IDS, adapter_names=ROWS, **{arg: (cache := DynamicCache())})
    mm(IDS[:, :1], adapter_names=ROWS, **{arg: cache})
    assert set(keys) == {None}


def test_decode_graphs_run_any_causal_lm():
    """``DecodeGraphs`` over a model without adapters: the base model's generate, through the kept static cache, gives
    the tokens of plain generate; the decode-step API copies its outputs."""
    from fastlora.serving import DecodeGraphs

    model = tiny_llama()
    graphs = DecodeGraphs(model)
    kwargs = dict(attention_mask=torch.ones_like(IDS), max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(graphs.generate(IDS, **kwargs), model.generate(IDS, **kwargs))
        cache = graphs.static_cache(16)
        graphs(input_ids=IDS, **{graphs.cache_arg: cache})
        step = graphs(input_ids=IDS[:, :1], **{graphs.cache_arg: cache})
    assert "forward" not in vars(model)  # generate put the model's own forward back
    assert graphs.captures == 0 and len(graphs._caches) == 1  # nothing is captured on a CPU
    assert step.logits.shape == (IDS.shape[0], 1, model.config.vocab_size)
