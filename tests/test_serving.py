"""``MultiLoraModel`` against PEFT: mixed-batch logits and generate, and the model wrapper's own behaviour.

Three adapters of ranks 4, 8 and 16 (sql, chat, math) are trained-looking (``init_lora_weights=False``: B is not zero) PEFT adapters on
the tiny Llama of ``tiny_models``, saved with ``save_pretrained`` and loaded into a ``MultiLoraModel`` from their
directories. ``chat`` uses rsLoRA with rank and alpha patterns, ``math`` targets a subset of the wrapper's layers (the
others run rank 0 for its slot). The key equalities run the Triton kernels (the interpreter on CPU); tests that need
many forwards use the torch backend. Oracles: PEFT's own mixed-batch forward (``adapter_names`` with
``"__base__"``), in fp64, and single-adapter fastlora models (``fastlora.load_adapter``).
"""

import copy
import threading

import pytest
import torch
from serving_helpers import (
    IDS,
    PEFT_ROWS,
    ROWS,
    TARGETS,
    assert_logits_close,
    expected_rows,
    oracle_logits,
    peft_model_with_adapters,
    random_adapter,
    record_multi_launches,
)
from tiny_models import HIDDEN, tiny_gpt2, tiny_llama
from tolerances import assert_close

from fastlora.serving import AdapterPool, MultiLoraLinear, MultiLoraModel, UnknownAdapterError

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def peft_adapters(tmp_path_factory):
    """``(peft_model, {name: directory})``: one PEFT Llama holding the three adapters, each also saved alone."""
    return peft_model_with_adapters(tiny_llama(), tmp_path_factory.mktemp("peft_adapters"))


@pytest.fixture
def triton_calls(monkeypatch) -> list:
    """Runs the Triton kernels (interpreted on CPU) and records each multi-adapter kernel launch."""
    return record_multi_launches(monkeypatch, "auto")


def _wrapped(dirs, max_adapters=4, max_rank=16, **kwargs) -> MultiLoraModel:
    mm = MultiLoraModel(tiny_llama(), TARGETS, max_adapters=max_adapters, max_rank=max_rank, **kwargs)
    for name, directory in dirs.items():
        mm.load_adapter(name, directory)
    return mm


# ------------------------------------------------------------------------------------------------ PEFT equality


def test_mixed_batch_logits_match_peft(peft_adapters, triton_calls):
    peft_model, dirs = peft_adapters
    mm = _wrapped(dirs)
    logits = mm(IDS, adapter_names=ROWS).logits
    assert triton_calls == [IDS.numel()] * 2 * len(TARGETS)  # one launch per layer, every token of the batch
    with torch.no_grad():
        expected = copy.deepcopy(peft_model).double()(input_ids=IDS, adapter_names=PEFT_ROWS).logits
        peft_fp32 = peft_model(input_ids=IDS, adapter_names=PEFT_ROWS).logits
    assert_logits_close(logits, expected, "MultiLoraModel vs PEFT (fp64)")
    assert_logits_close(peft_fp32, expected, "PEFT fp32 vs PEFT fp64")
    # Every row really differs from the base model and from the other adapters (the comparison has teeth).
    with torch.no_grad():
        base = tiny_llama()(IDS).logits
    for i, name in enumerate(ROWS):
        differs = (logits[i] - base[i]).abs().max() > 1e-3
        assert differs == (name is not None), f"row {i} ({name})"
    assert (logits[0] - logits[4]).abs().max() < 1e-5  # the same prompt and adapter in two rows
    assert mm.pool.info("math").layer_ranks.keys() == {
        f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")
    }


def test_generate_matches_rows_alone_and_peft(peft_adapters, triton_calls, monkeypatch):
    peft_model, dirs = peft_adapters
    mm = _wrapped(dirs)
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    ids = IDS[:, :5]
    mixed = mm.generate(ids, attention_mask=torch.ones_like(ids), adapter_names=ROWS, **kwargs)
    assert mixed.shape == (len(ROWS), ids.shape[1] + 4)
    # The prefill, then decode steps of one token per row with the KV cache, each through the kernels.
    layers = 2 * len(TARGETS)
    assert triton_calls == [ids.numel()] * layers + [len(ROWS)] * layers * 3
    monkeypatch.setenv("FASTLORA_BACKEND", "torch")  # many more forwards below
    for i, name in enumerate(ROWS):
        alone = mm.generate(ids[i : i + 1], adapter_names=[name], **kwargs)
        assert torch.equal(mixed[i], alone[0]), f"row {i} ({name})"
    with torch.no_grad():
        peft_tokens = peft_model.generate(input_ids=ids, adapter_names=PEFT_ROWS, **kwargs)
    assert torch.equal(mixed, peft_tokens)
    # Adapters change what is generated, so the check above tells rows apart.
    assert len({tuple(row[5:].tolist()) for row in mixed}) >= 3


def test_generate_repeats_rows_for_num_return_sequences(peft_adapters, monkeypatch):
    monkeypatch.setenv("FASTLORA_BACKEND", "torch")
    _, dirs = peft_adapters
    mm = _wrapped(dirs)
    ids = IDS[:2, :4]
    kwargs = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    out = mm.generate(ids, adapter_names=["chat", "math"], num_return_sequences=2, num_beams=2, **kwargs)
    assert out.shape[0] == 4
    for i, name in enumerate(["chat", "math"]):
        alone = mm.generate(ids[i : i + 1], adapter_names=[name], num_return_sequences=2, num_beams=2, **kwargs)
        assert torch.equal(out[2 * i : 2 * i + 2], alone)


def test_gpt2_conv1d_layers_match_fastlora_single_adapter_models(tmp_path, triton_calls):
    targets = ["c_attn", "c_proj", "c_fc"]
    dirs = {
        "x": random_adapter(tmp_path / "x", tiny_gpt2, r=4, lora_alpha=8, target_modules=targets, seed=1),
        "y": random_adapter(tmp_path / "y", tiny_gpt2, r=8, lora_alpha=8, target_modules=["c_attn"], seed=2),
    }
    mm = MultiLoraModel(tiny_gpt2(), targets, max_adapters=2, max_rank=8)
    for name, directory in dirs.items():
        mm.load_adapter(name, directory)
    rows = ["y", "x", None]
    logits = mm(IDS[:3], adapter_names=rows).logits
    assert triton_calls  # before the oracle runs: only MultiLoraModel calls the multi-adapter kernels
    assert_logits_close(logits, expected_rows(tiny_gpt2, dirs, rows, IDS[:3]), "GPT-2 Conv1D")


# ------------------------------------------------------------------------------------------------- the wrapper


def test_wrapper_swaps_target_layers_and_unwrap_restores_them(peft_adapters):
    _, dirs = peft_adapters
    model = tiny_llama()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    q = model.model.layers[0].self_attn.q_proj
    mm = MultiLoraModel(model, TARGETS, max_adapters=2, max_rank=16)
    swapped = [n for n, m in model.named_modules() if isinstance(m, MultiLoraLinear)]
    assert len(swapped) == 2 * len(TARGETS)
    assert model.model.layers[0].self_attn.q_proj.weight is q.weight  # shared, not copied
    assert model.state_dict().keys() == state.keys()  # the pool is not part of the model's state
    with torch.no_grad():
        plain = model(IDS).logits  # outside the wrapper: the base model
    assert torch.equal(plain, tiny_llama()(IDS).logits)
    assert torch.equal(mm(IDS).logits, plain)  # no adapter_names: every row is base
    assert mm.unwrap() is model and model.model.layers[0].self_attn.q_proj is q
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_inputs_embeds_and_a_single_name_for_every_row(peft_adapters, monkeypatch):
    monkeypatch.setenv("FASTLORA_BACKEND", "torch")
    _, dirs = peft_adapters
    mm = _wrapped(dirs)
    ids = IDS[:2]
    by_ids = mm(ids, adapter_names=["math", "math"]).logits
    with torch.no_grad():
        embeds = mm.model.get_input_embeddings()(ids)
    assert torch.equal(mm(inputs_embeds=embeds, adapter_names="math").logits, by_ids)


def test_adapter_scales(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTLORA_BACKEND", "torch")
    directory = random_adapter(tmp_path / "a", tiny_llama, r=4, lora_alpha=8, target_modules=TARGETS, seed=3)
    mm = MultiLoraModel(tiny_llama(), TARGETS, max_adapters=2, max_rank=8)
    mm.load_adapter("a", directory)
    ids = IDS[:4]
    logits = mm(ids, adapter_names=["a", "a", "a", None], adapter_scales=[1.0, 0.0, 0.5, 2.0]).logits
    full = oracle_logits(tiny_llama, directory, ids)
    base = oracle_logits(tiny_llama, None, ids)
    half = oracle_logits(tiny_llama, directory, ids, b_scale=0.5)
    assert_logits_close(logits[0], full[0], "scale 1")
    assert_logits_close(logits[1], base[1], "scale 0 = base")
    assert_logits_close(logits[2], half[2], "scale 0.5 = B halved")
    assert_logits_close(logits[3], base[3], "a scale on a base row changes nothing")
    with pytest.raises(ValueError, match="adapter_scales has 2 entries for a batch of 4"):
        mm(ids, adapter_names=["a"] * 4, adapter_scales=[1.0, 1.0])


def test_argument_errors(peft_adapters, monkeypatch):
    monkeypatch.setenv("FASTLORA_BACKEND", "torch")
    _, dirs = peft_adapters
    mm = _wrapped(dirs, max_adapters=2)
    with pytest.raises(ValueError, match="adapter_names has 2 entries for a batch of 5"):
        mm(IDS, adapter_names=["sql", None])
    with pytest.raises(UnknownAdapterError, match="no adapter named 'nope'.*registered: chat, math, sql"):
        mm(IDS, adapter_names=["sql", "nope", None, None, None])
    with pytest.raises(ValueError, match="uses 3 distinct adapters but the pool has max_adapters=2"):
        mm(IDS, adapter_names=ROWS)
    with pytest.raises(ValueError, match="'__base__' means 'no adapter'"):
        mm.load_adapter("__base__", dirs["sql"])
    mm(IDS[:1], adapter_names=["chat"])  # resident now
    mm.unload_adapter("chat")
    assert mm.adapters == ["sql", "math"] and "chat" not in mm.pool.resident
    with pytest.raises(UnknownAdapterError, match="no adapter named 'chat'"):
        mm(IDS[:1], adapter_names=["chat"])
    with pytest.raises(UnknownAdapterError):
        mm.unload_adapter("chat")
    assert mm.pool.pinned == {}  # failed calls released what they had acquired
    with pytest.raises(ValueError, match="already has LoRA layers"):
        MultiLoraModel(mm.model, TARGETS, max_adapters=2, max_rank=8)


def test_more_adapters_than_slots_cycle_through_the_pool(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTLORA_BACKEND", "torch")
    names = [f"ad{i}" for i in range(5)]
    dirs = {
        name: random_adapter(tmp_path / name, tiny_llama, r=r, lora_alpha=2 * r, target_modules=TARGETS, seed=10 + i)
        for i, (name, r) in enumerate(zip(names, (2, 4, 8, 3, 16), strict=True))
    }
    mm = MultiLoraModel(tiny_llama(), TARGETS, max_adapters=2, max_rank=16)
    for name, directory in dirs.items():
        mm.load_adapter(name, directory)
    ids = IDS[:3]
    expected = {name: oracle_logits(tiny_llama, directory, ids) for name, directory in dirs.items()}
    expected[None] = oracle_logits(tiny_llama, None, ids)
    batches = [["ad0", None, "ad1"], ["ad2", "ad3", "ad2"], [None, "ad4", "ad0"], ["ad1", "ad1", None],
               ["ad3", "ad4", None], ["ad0", "ad2", "ad0"]]  # fmt: skip
    uploads = 0
    for rows in batches:
        before = mm.pool.resident
        logits = mm(ids, adapter_names=rows).logits
        after = mm.pool.resident
        uploads += sum(1 for n in set(rows) - {None} if n not in before)
        assert set(rows) - {None} <= set(after) and len(after) <= 2
        for i, name in enumerate(rows):
            assert_logits_close(logits[i], expected[name][i], f"{rows} row {i}")
    assert uploads >= len(batches)  # the pool did evict and re-upload


def test_concurrent_generates_in_threads_each_use_their_own_rows(peft_adapters, monkeypatch):
    monkeypatch.setenv("FASTLORA_BACKEND", "torch")
    _, dirs = peft_adapters
    mm = _wrapped(dirs)
    ids = IDS[:, :4]
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    batches = [ROWS, ["math", "math", None, "chat", "sql"], [None, "chat", "sql", None, "math"]]
    serial = [mm.generate(ids, adapter_names=rows, **kwargs) for rows in batches]
    results, errors = {}, []

    def run(i):
        try:
            for _ in range(3):
                out = mm.generate(ids, adapter_names=batches[i], **kwargs)
                assert torch.equal(out, serial[i]), f"batch {i}"
            results[i] = True
        except BaseException as e:  # noqa: BLE001 (reported by the main thread)
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(batches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    if errors:
        raise errors[0]
    assert sorted(results) == [0, 1, 2] and mm.pool.pinned == {}


@pytest.mark.parametrize("pool_dtype", [None, torch.float32], ids=["pool in the model dtype", "fp32 pool"])
def test_bf16_model(peft_adapters, monkeypatch, pool_dtype):
    monkeypatch.setenv("FASTLORA_BACKEND", "torch")
    _, dirs = peft_adapters
    mm = MultiLoraModel(tiny_llama().to(torch.bfloat16), TARGETS, max_adapters=2, max_rank=16, dtype=pool_dtype)
    mm.load_adapter("chat", dirs["chat"])
    assert mm.pool.dtype == (pool_dtype or torch.bfloat16)
    ids = IDS[:2]
    logits = mm(ids, adapter_names=["chat", None]).logits.float()
    expected = torch.stack(
        [oracle_logits(tiny_llama, dirs["chat"], ids)[0], oracle_logits(tiny_llama, None, ids)[1]]
    ).double()
    assert_close(logits, expected, torch.bfloat16, reduce_len=4 * HIDDEN, name=f"bf16 model, {mm.pool.dtype} pool")


# --------------------------------------------------------------------------- layers that see other token counts


@pytest.fixture(scope="module")
def head_adapters(tmp_path_factory):
    """Two adapters over q_proj and the output head (``lm_head``, which sees one position per row in generate)."""
    root = tmp_path_factory.mktemp("head_adapters")
    targets = ["q_proj", "lm_head"]
    return {
        "h4": random_adapter(root / "h4", tiny_llama, r=4, lora_alpha=8, target_modules=targets, seed=5),
        "h2": random_adapter(root / "h2", tiny_llama, r=2, lora_alpha=2, target_modules=["lm_head"], seed=6),
    }


def _head_model(dirs) -> MultiLoraModel:
    mm = MultiLoraModel(tiny_llama(), ["q_proj", "lm_head"], max_adapters=2, max_rank=4)
    for name, directory in dirs.items():
        mm.load_adapter(name, directory)
    return mm


def test_lm_head_target_on_the_triton_path(head_adapters, triton_calls):
    mm = _head_model(head_adapters)
    assert isinstance(mm.model.lm_head, MultiLoraLinear)
    rows = ["h4", None, "h2"]
    ids = IDS[:3]
    logits = mm(ids, adapter_names=rows).logits
    assert triton_calls == [ids.numel()] * 3  # two q_proj and the head, every token of the batch
    assert_logits_close(logits, expected_rows(tiny_llama, head_adapters, rows, ids), "lm_head targeted")
    # The head sees one position per row, as in generate: its tokens are the rows' last positions.
    last = mm(ids, adapter_names=rows, logits_to_keep=1).logits
    assert last.shape == (3, 1, logits.shape[-1]) and triton_calls[3:] == [ids.numel()] * 2 + [3]
    assert_logits_close(last[:, 0], logits[:, -1], "lm_head on the last position only")


def test_generate_with_lm_head_targeted_matches_rows_alone(head_adapters, monkeypatch):
    monkeypatch.setenv("FASTLORA_BACKEND", "torch")
    mm = _head_model(head_adapters)
    rows = ["h2", "h4", None, "h4"]
    ids = IDS[:4, :5]
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    mixed = mm.generate(ids, adapter_names=rows, **kwargs)
    for i, name in enumerate(rows):
        assert torch.equal(mixed[i], mm.generate(ids[i : i + 1], adapter_names=[name], **kwargs)[0]), f"row {i}"
    # The head's adapter alone changes the tokens (h2 adapts nothing else), so the check above tells rows apart.
    assert not torch.equal(mixed[0], mm.generate(ids[:1], **kwargs)[0])
    assert mm.pool.pinned == {}


def test_generate_left_padded_rows_match_each_row_alone(peft_adapters, monkeypatch):
    monkeypatch.setenv("FASTLORA_BACKEND", "torch")
    _, dirs = peft_adapters
    mm = _wrapped(dirs)
    lengths = [6, 3, 5, 2, 4]
    ids = IDS.clone()
    mask = torch.ones_like(ids)
    for i, n in enumerate(lengths):  # left padding: the prompt is the last n positions
        ids[i, : ids.shape[1] - n] = 0
        mask[i, : ids.shape[1] - n] = 0
    rows = ["math", "sql", None, "chat", "sql"]
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    mixed = mm.generate(ids, attention_mask=mask, adapter_names=rows, **kwargs)
    for i, name in enumerate(rows):
        alone = mm.generate(ids[i : i + 1], attention_mask=mask[i : i + 1], adapter_names=[name], **kwargs)
        assert torch.equal(mixed[i], alone[0]), f"row {i} ({name}, {lengths[i]} prompt tokens)"
    # Rows 1 and 4 share an adapter but not a prompt length, so a row mapping off by the padding shows.
    assert len({tuple(row[6:].tolist()) for row in mixed}) >= 3


def test_an_assistant_model_wrapped_too_computes_its_base_model_inside_a_call(head_adapters, monkeypatch):
    monkeypatch.setenv("FASTLORA_BACKEND", "torch")
    main, assistant = _head_model(head_adapters), _head_model(head_adapters)
    assistant(IDS[:1], adapter_names=["h4"])  # resident in the assistant's pool too, in the same slot
    seen = []
    assistant.model.register_forward_hook(lambda m, args, kwargs, out: seen.append((kwargs, out.logits)),
                                          with_kwargs=True)  # fmt: skip
    ids = IDS[:1, :5]
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    assisted = main.generate(ids, adapter_names=["h4"], assistant_model=assistant.model, **kwargs)
    assert torch.equal(assisted, main.generate(ids, adapter_names=["h4"], **kwargs))
    # The assistant's prefill (no cache yet) against its base model: its own adapter's slot is the main call's.
    call, logits = seen[0]
    assert torch.equal(call["input_ids"], ids)
    with torch.no_grad():
        expected = tiny_llama()(input_ids=call["input_ids"]).logits
    assert_logits_close(logits, expected[:, -logits.shape[1] :], "assistant prefill = base")


def test_unwrap_gives_back_the_base_module_type_with_parameters():
    pool = AdapterPool({"l": (8, 6)}, max_adapters=1, max_rank=2)
    weight, bias = torch.randn(6, 8), torch.randn(6)
    layer = MultiLoraLinear(weight, bias, pool.layers["l"])  # plain tensors, no base module
    linear = layer.unwrap()
    assert type(linear) is torch.nn.Linear
    assert isinstance(linear.weight, torch.nn.Parameter) and isinstance(linear.bias, torch.nn.Parameter)
    assert linear.weight.data_ptr() == weight.data_ptr() and linear.bias.data_ptr() == bias.data_ptr()
    x = torch.randn(3, 8)
    assert torch.equal(linear(x), torch.nn.functional.linear(x, weight, bias))
    with pytest.raises(ValueError, match="no base module to restore a fan_in_fan_out layer into"):
        MultiLoraLinear(weight.t(), None, pool.layers["l"], fan_in_fan_out=True).unwrap()
    # GPT-2's Conv1D layers come back as themselves.
    model = tiny_gpt2()
    c_attn = model.transformer.h[0].attn.c_attn
    mm = MultiLoraModel(model, ["c_attn", "c_fc"], max_adapters=1, max_rank=2)
    assert isinstance(model.transformer.h[0].attn.c_attn, MultiLoraLinear)
    assert mm.unwrap() is model and model.transformer.h[0].attn.c_attn is c_attn
    assert type(model.transformer.h[1].mlp.c_fc).__name__ == "Conv1D"
