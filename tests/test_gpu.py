"""The CUDA test run, ``pytest -m gpu``: the compiled kernels at real shapes against the fp64 reference (computed on the
GPU), bitwise-deterministic gradients, the multi-adapter kernels, and ``MultiLoraModel`` against PEFT on CUDA.

The cases, the budget that shapes them (about three minutes on one GPU, compiles included) and the dry run are
described in ``tests/gpu_cases.py``. Without a CUDA device these tests are skipped, unless
``FASTLORA_GPU_TESTS_ON_CPU=1`` asks for the dry run: the same code through Triton's interpreter, at small sizes.

Precision. Every result is held to the tolerance table elementwise (``tests/tolerances.assert_close``), and the 16-bit
ones also to a bound on their relative error over the whole tensor, ``‖out − ref‖ / ‖ref‖`` (``NORM_TOLERANCE``): at
K = 14336 the table's bf16 bound, which covers the worst element of a long reduction, is near the output's own
magnitude, while the norm of the error stays at the rounding of the operands and of the intermediates (``s·x·Aᵀ`` and
``s·dy·B`` are rounded to the LoRA dtype), a few 1e-3 for bf16.

fp32 cases run with ``torch.backends.cuda.matmul.allow_tf32 = False`` (fastlora's dots follow the flag,
as cuBLAS does), because tf32 keeps a 10-bit mantissa: rounding the operands of a product with K = 4096 or 14336 terms
to tf32 moves it by 2.5e-4 to 3e-4 of the largest output, 4 to 10 times the fp32 row of the tolerance table (3.2e-5,
6e-5). The cases marked ``tf32`` turn it on and are held to the fp16 row, whose mantissa is the same.
"""

import contextlib
import copy
import functools

import pytest
import torch
from gpu_cases import (
    DETERMINISM_CASES,
    DEVICE,
    DRY_RUN,
    LINEAR_CASES,
    MOE_CASES,
    MULTI_CASES,
    ON_CUDA,
    ONEPASS,
    QLORA_CASES,
    SERVING_PIN,
    LinearCase,
    MoeCase,
    MultiCase,
    QloraCase,
    autotuners,
    linear_inputs,
    linear_scaling,
    moe_inputs,
    multi_inputs,
    pinned_configs,
    serving_llama,
)
from multi_lora_cases import expected as multi_expected
from tolerances import assert_close

import fastlora
from fastlora import kernels
from fastlora.reference import grouped_lora_linear_reference, lora_linear_reference

pytestmark = pytest.mark.gpu

# ‖out − ref‖ / ‖ref‖ for 16-bit results (and tf32 dots): a few times the rounding of one element, 2**-9 for bf16 and
# 2**-12 for fp16's (and tf32's) mantissa.
NORM_TOLERANCE = {torch.bfloat16: 1.5e-2, torch.float16: 3e-3}


def assert_norm_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, name: str) -> None:
    if dtype not in NORM_TOLERANCE:
        return
    error = ((actual.double() - expected.double()).norm() / expected.double().norm()).item()
    assert error <= NORM_TOLERANCE[dtype], f"{name}: ‖error‖ / ‖ref‖ = {error:.2e} > {NORM_TOLERANCE[dtype]:.0e}"


def _timed(name, kernel_call, quantiles):
    """The autotuner's timer for these tests: 10 ms per config instead of 125 (which config wins does not change what
    is checked). A config that fails to compile or launch fails the test that ran into it: the autotuner would skip
    it silently (it drops configs that run out of resources or fail in ptxas)."""
    import triton.testing

    try:
        return triton.testing.do_bench(kernel_call, warmup=2, rep=10, quantiles=quantiles)
    except Exception as e:
        raise AssertionError(f"{name}: a config failed while autotuning: {type(e).__name__}: {e}") from e


def _untimed(kernel_call, quantiles):
    """The autotuner's timer in the dry run: launches nothing (the interpreter cannot time), so the first config that
    survives pruning wins."""
    return [1.0, 1.0, 1.0]


@pytest.fixture(scope="module", autouse=True)
def gpu_run():
    """On the GPU: the timer ``_timed`` for every autotuned kernel.

    In the dry run: the kernels must run in the interpreter (not the torch backend), with their GPU configs, chosen as
    on the GPU (pinned, or by the autotuner with the timer ``_untimed``), so that the configs' tiles and the pinning
    are exercised too."""
    tuners = autotuners()
    with pytest.MonkeyPatch.context() as mp:
        if ON_CUDA:
            for tuner in tuners:
                mp.setattr(tuner, "_do_bench", functools.partial(_timed, tuner.fn.__name__))
        else:
            assert DRY_RUN and kernels.is_interpreting(), "the dry run needs TRITON_INTERPRET=1 set before triton loads"
            gpu_configs = {id(k.fn): k.configs for k in kernels.GPU_KERNELS}
            for tuner in tuners:
                mp.setattr(tuner, "configs", gpu_configs[id(tuner.fn)])
                mp.setattr(tuner, "cache", {})
                mp.setattr(tuner, "_do_bench", _untimed)
        for tuner in tuners:
            tuner.__dict__.pop("do_bench", None)  # Autotuner.do_bench caches the timer it read
        yield
    for tuner in tuners:
        tuner.__dict__.pop("do_bench", None)


@contextlib.contextmanager
def matmul_tf32(enabled: bool):
    """``torch.backends.cuda.matmul.allow_tf32`` inside (set and restored by hand: pytest's monkeypatch cannot restore
    an attribute that torch serves from ``__getattr__``)."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture(autouse=True)
def ieee_fp32():
    """fp32 dots in fp32, not tf32 (see the module docstring), whatever the process had set."""
    with matmul_tf32(False):
        yield


# ----------------------------------------------------------------------------------------------- lora_linear


@pytest.mark.parametrize("case", LINEAR_CASES, ids=str)
def test_lora_linear_matches_fp64(case: LinearCase, device):
    """Forward and every gradient (y, dx, dA, dB, dbias) against the reference in fp64 on the same device."""
    case = case.sized()
    M, K, N, r = case.M, case.K, case.N, case.r
    x, weight, bias, lora_A, lora_B, dy = linear_inputs(case, device)
    before = [t.clone() for t in (x, weight, bias, lora_A, lora_B)]
    for t in (x, bias, lora_A, lora_B):
        t.requires_grad_()
    scaling = linear_scaling(r)
    seed = torch.tensor([20260201 + M], dtype=torch.int64, device=device)
    call = functools.partial(
        fastlora.lora_linear, x, weight, bias, lora_A, lora_B, scaling, case.dropout_p,
        fan_in_fan_out=case.fan_in_fan_out, forward_impl=case.impl, backend="triton", seed=seed,
    )  # fmt: skip
    with pinned_configs(case.pin), matmul_tf32(case.tf32):
        y = call(training=True)
        y.backward(dy)
        if case.impl == ONEPASS and case.dropout_p == 0.0:
            with torch.no_grad():  # the decode path: nothing stored for a backward, the same y
                assert torch.equal(call(training=False), y.detach()), "inference forward differs from training"
    assert y.dtype == case.dtype and y.shape == (M, N) and y.is_contiguous()
    assert x.grad.dtype == case.dtype and lora_A.grad.dtype == case.lora_dtype and lora_B.grad.dtype == case.lora_dtype
    assert lora_A.grad.is_contiguous() and lora_B.grad.is_contiguous()
    for t, t0 in zip((x, weight, bias, lora_A, lora_B), before, strict=True):
        assert torch.equal(t.detach(), t0), "an input was modified"

    x64, b64, a64, bb64 = (t.detach().double().requires_grad_() for t in (x, bias, lora_A, lora_B))
    y64 = lora_linear_reference(
        x64, weight.double(), b64, a64, bb64, scaling, case.dropout_p, seed, case.fan_in_fan_out
    )
    y64.backward(dy.double())
    dtype = torch.float16 if case.tf32 else case.dtype
    assert_close(y, y64, dtype, K + r, "y")
    assert_close(x.grad, x64.grad, dtype, N + r, "dx")
    assert_close(lora_A.grad, a64.grad, dtype, M, "dA")
    assert_close(lora_B.grad, bb64.grad, dtype, M, "dB")
    assert_close(bias.grad, b64.grad, dtype, M, "dbias")
    for name, got, want in (("y", y, y64), ("dx", x.grad, x64.grad), ("dA", lora_A.grad, a64.grad),
                            ("dB", lora_B.grad, bb64.grad)):  # fmt: skip
        assert_norm_close(got, want, dtype, name)


@pytest.mark.parametrize("case", QLORA_CASES, ids=str)
def test_qlora_matches_fp64(case: QloraCase, device):
    """QLoRA's kernels over a 4-bit W0 (dequantized in registers) at real shapes: ``y``, ``dx``, ``dA``, ``dB`` against
    the fp64 reference over the dequantized weight; with ``r = 0`` the frozen 4-bit layer's ``y`` and ``dx``."""
    from fastlora import nf4

    case = case.sized()
    M, K, N, r = case.M, case.K, case.N, case.r
    g = torch.Generator(device=device).manual_seed(M + K)

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, device=device) * scale

    quant_type, blocksize, nested = case.quant
    qweight = nf4.quantize(rand(N, K, scale=K**-0.5), blocksize=blocksize, quant_type=quant_type, double_quant=nested)
    x = rand(M, K).to(case.dtype).requires_grad_()
    dy = rand(M, N).to(case.dtype)
    w64 = qweight.dequantize(case.dtype).double()
    x64 = x.detach().double().requires_grad_()
    with pinned_configs(case.pin):
        if r == 0:
            y = fastlora.quant_linear(x, qweight, backend="triton")
            y.backward(dy)
            y64 = x64 @ w64.t()
        else:
            lora_A = rand(r, K, scale=K**-0.5).requires_grad_()
            lora_B = rand(N, r, scale=r**-0.5).requires_grad_()
            seed = torch.tensor([20261130 + M], dtype=torch.int64, device=device)
            y = fastlora.lora_linear(
                x, qweight, None, lora_A, lora_B, linear_scaling(r), case.dropout_p, True, forward_impl=case.impl,
                backend="triton", seed=seed,
            )  # fmt: skip
            y.backward(dy)
            a64, b64 = (t.detach().double().requires_grad_() for t in (lora_A, lora_B))
            y64 = lora_linear_reference(x64, w64, None, a64, b64, linear_scaling(r), case.dropout_p, seed)
    y64.backward(dy.double())
    assert y.dtype == case.dtype and y.shape == (M, N)
    checks = [("y", y, y64, K + r), ("dx", x.grad, x64.grad, N + r)]
    if r:
        checks += [("dA", lora_A.grad, a64.grad, M), ("dB", lora_B.grad, b64.grad, M)]
    for name, got, want, length in checks:
        assert_close(got, want, case.dtype, length, name)
        assert_norm_close(got, want, case.dtype, name)


@pytest.mark.parametrize("case", DETERMINISM_CASES, ids=str)
def test_two_identical_training_steps_give_bitwise_equal_gradients(case: LinearCase, device):
    """The same inputs and the same ``torch.manual_seed`` (the dropout seed is drawn from it) twice: y, dx, dA, dB and
    dbias bitwise equal (no atomics; the split reductions over tokens are summed in a fixed order)."""
    case = case.sized()
    runs = []
    for _ in range(2):
        x, weight, bias, lora_A, lora_B, dy = linear_inputs(case, device, seed=1)
        for t in (x, bias, lora_A, lora_B):
            t.requires_grad_()
        torch.manual_seed(1234)
        with pinned_configs(case.pin):
            y = fastlora.lora_linear(
                x, weight, bias, lora_A, lora_B, linear_scaling(case.r), case.dropout_p, training=True,
                fan_in_fan_out=case.fan_in_fan_out, forward_impl=case.impl, backend="triton",
            )  # fmt: skip
            y.backward(dy)
        runs.append({"y": y.detach(), "dx": x.grad, "dbias": bias.grad, "dA": lora_A.grad, "dB": lora_B.grad})
    for name, first in runs[0].items():
        assert first.abs().sum() > 0, f"{name} is zero: the comparison would prove nothing"
        assert torch.equal(first, runs[1][name]), f"{name} differs between two identical steps"


# ----------------------------------------------------------------------------------------------- grouped_lora_linear


@pytest.mark.parametrize("case", MOE_CASES, ids=str)
def test_grouped_lora_linear_matches_fp64(case: MoeCase, device):
    """One expert projection of a mixture-of-experts layer (the grouped kernels around the base grouped GEMM): y, dx,
    dA and dB against the reference in fp64, and a second identical step bitwise equal."""
    case = case.sized()
    runs = []
    for _ in range(2):
        t = moe_inputs(case, device)
        x, lora_A, lora_B = (t[k].requires_grad_() for k in ("x", "lora_A", "lora_B"))
        seed = torch.tensor([20261130], dtype=torch.int64, device=device)
        with pinned_configs(case.pin):
            y = fastlora.grouped_lora_linear(
                x, t["weight"], t["bias"], lora_A, lora_B, t["routing"], 2.0 / case.r, case.dropout_p, True,
                case.transposed, seed, backend="triton",
            )  # fmt: skip
            y.backward(t["dy"])
        runs.append({"y": y.detach(), "dx": x.grad, "dA": lora_A.grad, "dB": lora_B.grad})
    for name, first in runs[0].items():
        assert torch.equal(first, runs[1][name]), f"{name} differs between two identical steps"
    x64, a64, b64 = (t[k].detach().double().requires_grad_() for k in ("x", "lora_A", "lora_B"))
    bias64 = None if t["bias"] is None else t["bias"].double()
    y64 = grouped_lora_linear_reference(
        x64, t["weight"].double(), bias64, a64, b64, t["routing"].offsets, 2.0 / case.r, case.dropout_p, seed,
        case.transposed,
    )  # fmt: skip
    y64.backward(t["dy"].double())
    rows = max(1, case.tokens * case.top_k // case.experts)
    got = runs[1]
    for name, want, n in (("y", y64, case.K + case.r), ("dx", x64.grad, case.N + case.r), ("dA", a64.grad, rows),
                          ("dB", b64.grad, rows)):  # fmt: skip
        assert_close(got[name], want, case.dtype, n, name)
        assert_norm_close(got[name], want, case.dtype, name)


def test_moe_training_and_serving_match_peft(device, tmp_path):
    """A tiny Qwen3-MoE on the device: fastlora's expert and router LoRA (the grouped kernels) against PEFT's, logits,
    loss and every LoRA gradient; then the adapter served by ``MultiLoraModel`` in a mixed batch, each row against
    PEFT alone. fp32 with ieee dots: a bf16 model routes some tokens to other experts than an fp32 one, so the two
    could not be compared row by row. (The bf16 path of the grouped op, PyTorch's grouped GEMM included, is
    ``test_grouped_lora_linear_matches_fp64``'s.)"""
    peft = pytest.importorskip("peft")
    from test_moe import assert_grads_equal, lora_grads_in_peft_layout, peft_config, peft_grads, tiny_moe

    from fastlora.serving import MultiLoraModel

    base = tiny_moe("qwen3_moe")
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False,
                                                                          **peft_config("qwen3_moe")))  # fmt: skip
    peft_model.save_pretrained(tmp_path)
    peft_model.to(device)
    model = fastlora.load_adapter(copy.deepcopy(base).to(device), tmp_path)
    ids = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(7)).to(device)
    expected, actual = peft_model(input_ids=ids, labels=ids), model(input_ids=ids, labels=ids)
    torch.testing.assert_close(actual.logits, expected.logits, rtol=0, atol=1e-5)
    expected.loss.backward()
    actual.loss.backward()
    assert_grads_equal(peft_grads(peft_model), lora_grads_in_peft_layout(model), rel=1e-4)

    server = MultiLoraModel(copy.deepcopy(base).to(device), target_modules=["q_proj", "v_proj"],
                            target_parameters=["gate_up_proj", "down_proj", "gate.weight"], max_rank=8)  # fmt: skip
    server.load_adapter("a", tmp_path)
    names = ["a", None, "a", None]
    logits = server(ids, adapter_names=names).logits
    with torch.no_grad():
        alone = peft_model(input_ids=ids).logits
        base_logits = base.to(device)(input_ids=ids).logits
    for i, name in enumerate(names):
        torch.testing.assert_close(logits[i], (alone if name else base_logits)[i], rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------- multi_lora_linear


@pytest.mark.parametrize("case", MULTI_CASES, ids=str)
def test_multi_lora_linear_matches_fp64(case: MultiCase, device):
    """Every token its own adapter (ranks 1 to 128, or none), against the reference in fp64; the NaN beyond each
    slot's (or the layer's) rank in the pools must stay unread."""
    case = case.sized()
    inputs = multi_inputs(case, device)
    args, kwargs = inputs["args"], inputs["kwargs"]
    tensors = [t for t in args[:5] if t is not None]
    before = [t.clone() for t in tensors]
    with pinned_configs(case.pin), torch.no_grad():
        y = fastlora.multi_lora_linear(*args, **kwargs, impl=case.impl, backend="triton")
    for t, t0 in zip(tensors, before, strict=True):
        torch.testing.assert_close(t, t0, rtol=0, atol=0, equal_nan=True, msg="an input was modified")
    assert y.dtype == case.dtype and y.shape == (case.T, case.N) and y.is_contiguous()
    want = multi_expected(*args, kwargs.get("slot_ranks"), kwargs.get("slot_scalings"), case.fan_in_fan_out)
    assert_close(y, want, case.dtype, case.K + inputs["max_rank"], "y")
    assert_norm_close(y, want, case.dtype, "y")


# ----------------------------------------------------------------------------------------------- MultiLoraModel


@pytest.fixture(scope="module")
def peft_served(tmp_path_factory):
    """``(peft_model on device, {name: directory})``: one PEFT Llama holding the three adapters, each also saved."""
    from serving_helpers import peft_model_with_adapters

    pytest.importorskip("peft")
    model, dirs = peft_model_with_adapters(serving_llama(), tmp_path_factory.mktemp("gpu_peft_adapters"))
    return model.to(DEVICE), dirs


def test_multi_lora_model_matches_peft(peft_served, device, monkeypatch):
    """A mixed batch (three adapters of ranks 4 to 16 and a base row) through the kernels on every adapted layer:
    logits equal PEFT's mixed batch (``adapter_names``) in fp64, and a greedy ``generate`` gives PEFT's tokens, both
    for the mixed batch and row by row."""
    from serving_helpers import IDS, PEFT_ROWS, ROWS, TARGETS, record_multi_launches

    from fastlora.serving import MultiLoraModel

    peft_model, dirs = peft_served
    calls = record_multi_launches(monkeypatch, "triton")  # the kernels on every layer (interpreted in the dry run)
    mm = MultiLoraModel(serving_llama().to(device), TARGETS, max_adapters=4, max_rank=16)
    for name, directory in dirs.items():
        mm.load_adapter(name, directory)
    peft_rows = PEFT_ROWS
    ids = IDS.to(device)
    prompt = ids[:, :5]
    kwargs = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False, pad_token_id=0)
    with pinned_configs(SERVING_PIN):
        logits = mm(ids, adapter_names=ROWS).logits
        assert calls == [ids.numel()] * 2 * len(TARGETS), "not every adapted layer ran the kernels"
        tokens = mm.generate(prompt, adapter_names=ROWS, **kwargs)

    with torch.no_grad():
        want = copy.deepcopy(peft_model).double()(input_ids=ids, adapter_names=peft_rows).logits
        base = serving_llama().to(device)(ids).logits
        peft_tokens = peft_model.generate(input_ids=prompt, adapter_names=peft_rows, **kwargs)
        hidden = peft_model.config.hidden_size
    assert_close(logits, want, torch.float32, reduce_len=4 * hidden, name="MultiLoraModel vs PEFT (fp64)")
    for i, name in enumerate(ROWS):  # every adapter changes its row, so the check tells rows apart
        assert ((logits[i] - base[i]).abs().max() > 1e-3) == (name is not None), f"row {i} ({name})"
    assert torch.equal(tokens, peft_tokens), "generate differs from PEFT's mixed batch"
    assert len({tuple(row[prompt.shape[1] :].tolist()) for row in tokens}) >= 3, "adapters should change the tokens"
    for i, name in enumerate(peft_rows):
        row_kwargs = {**kwargs, "attention_mask": kwargs["attention_mask"][i : i + 1]}
        with torch.no_grad():
            alone = peft_model.generate(input_ids=prompt[i : i + 1], adapter_names=[name], **row_kwargs)
        assert torch.equal(tokens[i], alone[0]), f"row {i} ({name}) differs from PEFT on that row alone"


# ------------------------------------------------------------------------------------------------- CUDA graphs


def _graph_model(dirs, device, max_adapters=4):
    from serving_helpers import TARGETS

    from fastlora.serving import MultiLoraModel

    mm = MultiLoraModel(serving_llama().to(device), TARGETS, max_adapters=max_adapters, max_rank=16)
    for name, directory in dirs.items():
        mm.load_adapter(name, directory)
    return mm


def test_decode_graphs_replay_the_eager_tokens(peft_served, device, monkeypatch):
    """``generate`` with CUDA graphs: the first call captures the decode step (once for its batch size), the next
    replays it; both give the tokens of the eager generate (dynamic cache, exact metadata). In the dry run the same
    fixed-size path runs eagerly and nothing is captured."""
    from serving_helpers import IDS, ROWS, record_multi_launches

    record_multi_launches(monkeypatch, "triton")
    mm = _graph_model(peft_served[1], device)
    prompt = IDS[:, :5].to(device)
    kwargs = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False, pad_token_id=0)
    with pinned_configs(SERVING_PIN):
        want = mm.generate(prompt, adapter_names=ROWS, cuda_graphs=False, **kwargs)
        first = mm.generate(prompt, adapter_names=ROWS, **kwargs)
        second = mm.generate(prompt, adapter_names=ROWS, **kwargs)
    assert torch.equal(first, want) and torch.equal(second, want)
    assert mm.graphs.captures == (1 if ON_CUDA else 0)
    assert mm.graphs.replays == (2 * 6 - 3 if ON_CUDA else 0)  # every decode step but the first call's first


def test_decode_graphs_survive_loads_unloads_and_evictions(peft_served, device, monkeypatch):
    """Three adapters through a pool of two slots: between graphed calls adapters are evicted, unloaded and loaded
    again into other slots, and the rows change; every call gives the eager tokens, and the graphs captured for the
    first calls keep being replayed (no capture per call)."""
    from serving_helpers import IDS, record_multi_launches

    record_multi_launches(monkeypatch, "triton")
    dirs = peft_served[1]
    graphed, eager = _graph_model(dirs, device, max_adapters=2), _graph_model(dirs, device, max_adapters=2)
    prompt = IDS[:, :5].to(device)
    kwargs = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False, pad_token_id=0)
    mixes = [["sql", None, "chat", "sql", None], ["math", "math", None, "chat", "chat"], [None] * 5,
             ["sql", "math", "math", None, "sql"], ["chat", "sql", "chat", "chat", None]]  # fmt: skip
    with pinned_configs(SERVING_PIN):
        for i, names in enumerate(mixes):
            if i == 3:
                for model in (graphed, eager):
                    model.unload_adapter("math")
                    model.load_adapter("math", dirs["math"])
            got = graphed.generate(prompt, adapter_names=names, **kwargs)
            want = eager.generate(prompt, adapter_names=names, cuda_graphs=False, **kwargs)
            assert torch.equal(got, want), f"call {i} ({names})"
    if ON_CUDA:
        # One graph per metadata layout: adapters (rank bucket 16) and the base-only batch.
        assert graphed.graphs.captures == 2
        assert graphed.graphs.replays == len(mixes) * 3 - 2


def test_decode_step_api_replays_a_serving_loop(peft_served, device, monkeypatch):
    """A serving loop through ``mm(...)`` over ``mm.static_cache``: decode steps are replayed while the rows' adapters
    change from step to step; the logits match the same loop run eagerly."""
    from serving_helpers import IDS, ROWS, record_multi_launches

    record_multi_launches(monkeypatch, "triton")
    steps = [ROWS, ["chat", None, "chat", "sql", "sql"], ["math", "math", None, None, "math"], ROWS]

    def loop(mm, cuda_graphs):
        cache = mm.static_cache(64)
        arg = mm.graphs.cache_arg
        ids = IDS.to(device)
        logits = mm(ids, adapter_names=steps[0], cuda_graphs=cuda_graphs, **{arg: cache}).logits[:, -1]
        out = [logits]
        for names in steps:
            ids = logits.argmax(-1, keepdim=True)
            logits = mm(ids, adapter_names=names, cuda_graphs=cuda_graphs, **{arg: cache}).logits[:, -1]
            out.append(logits)  # not copied: a replay must not change the outputs of earlier steps
        return out

    dirs = peft_served[1]
    graphed = _graph_model(dirs, device)
    with pinned_configs(SERVING_PIN):
        got, want = loop(graphed, True), loop(_graph_model(dirs, device), False)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert_close(g, w, torch.float32, reduce_len=4 * 256, name=f"step {i}")
    if ON_CUDA:
        assert graphed.graphs.captures == 1 and graphed.graphs.replays == len(steps) - 1
