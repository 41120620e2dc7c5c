"""fastlora.multi_lora_linear (Triton kernels; the interpreter on CPU) against the fp64 reference: mixed ranks and
adapters in one batch, unsorted slots, tokens without an adapter, per-token scales, per-layer rank/scaling overrides,
both kernel paths (fused decode, segmented), odd shapes, both weight layouts, and garbage beyond each slot's rank."""

import pytest
import torch
from multi_lora_cases import expected, make_case
from tolerances import assert_close

from fastlora import kernels, ops
from fastlora.serving import BatchMeta


def test_reference_matches_a_per_token_loop():
    """The reference (a loop over slots with masked pools) is the formula, token by token."""
    ranks = [3, 0, 5]
    slots = [2, -1, 0, 2, 0, -1]
    x, w, b, a_pool, b_pool, meta = make_case(6, 11, 7, ranks, slots, torch.float64, token_scales=True)
    y = expected(x, w, b, a_pool, b_pool, meta)
    for t, s in enumerate(slots):
        row = x[t] @ w.t() + b
        if s >= 0:
            r = ranks[s]
            scale = meta.slot_scalings[s].item() * meta.token_scales[t].item()
            row = row + scale * (x[t] @ a_pool[s, :r].t()) @ b_pool[s, :, :r].t()
        torch.testing.assert_close(y[t], row, rtol=1e-12, atol=1e-12)


def test_torch_backend_against_reference():
    ranks = [1, 8, 16]
    slots = [2, -1, 0, 1, 2, 0, -1]
    case = make_case(len(slots), 33, 17, ranks, slots, torch.float32, token_scales=True)
    y = ops.multi_lora_linear(*case, backend="torch")
    assert y.dtype == torch.float32 and y.shape == (len(slots), 17)
    assert_close(y, expected(*case), torch.float32, 33 + 16, "y")


RANKS = (1, 8, 16, 64)  # mixed in every batch: slot s has rank RANKS[s % 4]
IMPLS = ["fused", "segmented"]


def unsorted_slots(T, num_adapters, seed=0):
    """Every adapter used at least once, in a shuffled order, with about one token in five on the base model."""
    g = torch.Generator().manual_seed(seed)
    slots = [s % num_adapters for s in range(T)]
    slots = [slots[i] for i in torch.randperm(T, generator=g).tolist()]
    for i in range(2, T, 5):
        slots[i] = -1
    return slots


def run(case, **kwargs):
    """``multi_lora_linear`` on the triton backend (the interpreter here), checking that no input was modified."""
    before = [t.clone() for t in case[:5] if t is not None]
    with torch.no_grad():
        y = ops.multi_lora_linear(*case, backend="triton", **kwargs)
    for t, t0 in zip([t for t in case[:5] if t is not None], before):
        torch.testing.assert_close(t, t0, rtol=0, atol=0, equal_nan=True)
    return y


@pytest.mark.parametrize("num_adapters", [1, 3, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("impl", IMPLS)
def test_against_reference(impl, dtype, num_adapters):
    """Ranks 1, 8, 16 and 64 in one batch (pool sized for 64, NaN beyond each rank), shuffled slots, tokens without
    an adapter and per-token scales; odd K and N. The weight layout, bias and LoRA dtype vary with the case."""
    T = 24 if impl == "segmented" else 20  # longer than a 16-row tile: segments and fused tiles both span two
    K, N = (37, 45) if num_adapters != 3 else (45, 19)
    fan_in_fan_out = num_adapters == 3
    lora_dtype = torch.float32 if num_adapters == 16 else dtype
    ranks = [RANKS[s % 4] for s in range(num_adapters)]
    slots = unsorted_slots(T, num_adapters, seed=num_adapters)
    case = make_case(T, K, N, ranks, slots, dtype, lora_dtype, r_max=64, token_scales=True,
                     fan_in_fan_out=fan_in_fan_out, bias=num_adapters != 1)  # fmt: skip
    y = run(case, fan_in_fan_out=fan_in_fan_out, impl=impl)
    assert y.dtype == dtype and y.shape == (T, N) and y.is_contiguous()
    assert_close(y, expected(*case, fan_in_fan_out=fan_in_fan_out), dtype, K + max(ranks), "y")


@pytest.mark.parametrize("impl", IMPLS)
def test_bfloat16(impl):
    ranks = [8, 1, 16]
    slots = [1, 0, -1, 2, 0, 2, 1]
    case = make_case(len(slots), 40, 33, ranks, slots, torch.bfloat16, r_max=16, token_scales=True)
    assert_close(run(case, impl=impl), expected(*case), torch.bfloat16, 40 + 16, "y")


@pytest.mark.parametrize("impl", IMPLS)
def test_no_token_has_an_adapter(impl):
    """Every token on the base model: the plain GEMM plus bias; the NaN-filled pools are never read."""
    case = make_case(5, 20, 30, [4, 8], [-1] * 5, torch.float32, pad=float("nan"))
    case[3].fill_(float("nan"))
    case[4].fill_(float("nan"))
    y = run(case, impl=impl)
    x, w, b = case[:3]
    assert_close(y, x.double() @ w.double().t() + b.double(), torch.float32, 20, "y")


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_batch(impl):
    case = make_case(0, 20, 30, [4], [], torch.float32)
    y = run(case, impl=impl)
    assert y.shape == (0, 30) and y.dtype == torch.float32


@pytest.mark.parametrize("impl", IMPLS)
def test_per_layer_ranks_and_scalings(impl):
    """A layer's own ranks (below the batch's, 0 = this layer not adapted) and scalings override the metadata; the
    pool columns between the layer's rank and the batch's hold NaN and must stay unread."""
    meta_ranks = [8, 16, 4]
    layer_ranks = [3, 0, 4]
    slots = [2, 0, 1, -1, 1, 0, 2, 2, 1]
    x, w, b, a_pool, b_pool, meta = make_case(len(slots), 29, 23, meta_ranks, slots, torch.float32, token_scales=True)
    for s, r in enumerate(layer_ranks):
        a_pool[s, r:] = float("nan")
        b_pool[s, :, r:] = float("nan")
    ranks = torch.tensor(layer_ranks, dtype=torch.int32)
    scalings = torch.tensor([2.0, 0.1, -0.5], dtype=torch.float32)
    case = (x, w, b, a_pool, b_pool, meta)
    y = run(case, slot_ranks=ranks, slot_scalings=scalings, impl=impl)
    assert_close(y, expected(*case, slot_ranks=ranks, slot_scalings=scalings), torch.float32, 29 + 4, "y")


@pytest.mark.parametrize("impl", IMPLS)
def test_input_layouts(impl):
    """3-D activations, and activations whose K stride is 2 (every other column of a wider buffer)."""
    ranks = [16, 1]
    slots = [1, -1, 0, 0, 1, 0]
    x, w, b, a_pool, b_pool, meta = make_case(len(slots), 24, 17, ranks, slots, torch.float16, token_scales=True)
    y = run((x.view(2, 3, 24), w, b, a_pool, b_pool, meta), impl=impl)
    assert y.shape == (2, 3, 17) and y.is_contiguous()
    want = expected(x, w, b, a_pool, b_pool, meta)
    assert_close(y.view(6, 17), want, torch.float16, 24 + 16, "y 3-D")
    wide = torch.zeros(6, 48, dtype=x.dtype)
    wide[:, ::2] = x
    y = run((wide[:, ::2], w, b, a_pool, b_pool, meta), impl=impl)
    assert_close(y, want, torch.float16, 24 + 16, "y strided")


def test_decode_shrink_k_splits():
    """The decode shrink's K splits (partial sums added by the fused kernel in a fixed order) give the same layer; a
    rank of 80 spans two 64-wide rank blocks of the shrink."""
    ranks = [16, 8, 1, 80]
    slots = [3, 1, -1, 0, 2, 3, 0]
    x, w, b, a_pool, b_pool, meta = make_case(len(slots), 100, 21, ranks, slots, torch.float32, token_scales=True)
    want = expected(x, w, b, a_pool, b_pool, meta)
    for split_k in (1, 2, 4):
        xa = kernels.multi_lora_shrink(x, a_pool, meta.slot_ranks, *meta.kernel_args(), split_k=split_k)
        y = kernels.multi_lora_fused(x, w.t(), b, xa, b_pool, meta.slot_ranks, meta.slot_scalings, *meta.kernel_args())
        assert_close(y, want, torch.float32, 100 + 80, f"y split_k={split_k}")


@pytest.mark.parametrize("split_k", [2, 4])
def test_segmented_k_splits(split_k, monkeypatch):
    """The segmented shrink's K splits, summed by the expand in a fixed order as it loads ``xa``, give the same layer
    (with K = 100 and 64-column steps, splits 3 and 4 lie past the end of K and add zeros); the op takes the split
    count from ``segmented_splits``."""
    ranks = [16, 8, 1, 80]
    slots = unsorted_slots(24, 4, seed=split_k)
    case = make_case(len(slots), 100, 21, ranks, slots, torch.float16, torch.float32, token_scales=True)
    x, w, b, a_pool, b_pool, meta = case
    want = expected(*case)
    xa = kernels.multi_lora_shrink(x, a_pool, meta.slot_ranks, *meta.kernel_args(), split_k=split_k)
    assert xa.shape == (split_k, len(slots), 80)
    y = x @ w.t() + b
    kernels.multi_lora_expand(y, xa, b_pool, meta.slot_ranks, meta.slot_scalings, *meta.kernel_args())
    assert_close(y, want, torch.float16, 100 + 80, f"kernels, split_k={split_k}")
    with pytest.raises(ValueError, match="laid out"):  # the expand finds a token's splits side by side
        kernels.multi_lora_expand(y, xa.contiguous(), b_pool, meta.slot_ranks, meta.slot_scalings, *meta.kernel_args())

    calls = []

    def splits(*args):
        calls.append(args)
        return split_k

    monkeypatch.setattr(kernels, "multi_segmented_splits", splits)
    assert_close(run(case, impl="segmented"), want, torch.float16, 100 + 80, f"op, split_k={split_k}")
    assert calls == [(meta.num_segments, meta.max_segment_len, meta.max_rank, 100, x.device)]


def test_segmented_splits_fill_the_gpu():
    """K is split only while the grid underfills the GPU (132 SMs off CUDA), in powers of two up to 8, keeping at least
    512 columns per split; no host reads, so it is a function of host integers."""
    cpu = torch.device("cpu")
    assert kernels.multi_segmented_splits(32, 4, 16, 4096, cpu) == 8  # 32 programs -> 256
    assert kernels.multi_segmented_splits(32, 4, 16, 1024, cpu) == 2  # 512 columns per split at most
    assert kernels.multi_segmented_splits(32, 4, 16, 1000, cpu) == 1
    assert kernels.multi_segmented_splits(100, 64, 16, 4096, cpu) == 4  # 100 programs -> 400 >= 264
    assert kernels.multi_segmented_splits(32, 4, 128, 4096, cpu) == 8  # two rank blocks: 64 programs -> 512
    assert kernels.multi_segmented_splits(4, 2048, 16, 4096, cpu) == 4  # 32 token blocks each: 128 programs
    assert kernels.multi_segmented_splits(16, 2048, 16, 4096, cpu) == 1  # 512 programs
    assert kernels.multi_segmented_splits(0, 0, 0, 4096, cpu) == 1


@pytest.mark.parametrize("r_max,ranks", [(16, [3, 16, 9, 1]), (20, [20, 5, 12, 1])], ids=["even_r", "odd_r"])
@pytest.mark.parametrize("lora_dtype", [torch.float16, torch.float32])
def test_fused_rank_chunks(r_max, ranks, lora_dtype):
    """The fused epilogue gathers B in whole chunks of EPI_R = 8 rank columns up to the tile's largest rank. With
    r_max = 16 the chunks stay inside the pool (the launcher passes EVEN_R) and are masked only by row and column;
    with r_max = 20 the last chunk would pass r_max and is also bounded. Pool entries past each slot's rank hold NaN, which the chunks
    read and must drop; tokens 16-19 (the second 16-row tile) have no adapter."""
    from fastlora.kernels import multi_lora

    assert [c.kwargs["EPI_R"] for c in multi_lora._fused_configs()] == [8] and multi_lora.FUSED_EPI_R_ALIGN == 8
    slots = [0, 1, 2, 3, -1, 1, 0, 2, 1, 3, 0, 2, 1, -1, 0, 1, -1, -1, -1, -1]
    case = make_case(len(slots), 40, 33, ranks, slots, torch.float16, lora_dtype, r_max=r_max, token_scales=True)
    assert_close(run(case, impl="fused"), expected(*case), torch.float16, 40 + r_max, "y")


def test_pdl_only_on_sm90_without_the_interpreter(monkeypatch):
    """Programmatic dependent launch needs a CUDA device of compute capability 9.0 or newer and compiled kernels:
    never in the interpreter, and ``FASTLORA_PDL=0`` turns it off."""
    from fastlora.kernels import multi_lora

    cuda = torch.device("cuda", 0)
    monkeypatch.delenv("FASTLORA_PDL", raising=False)
    assert not multi_lora.pdl_enabled(cuda) and not multi_lora.pdl_enabled(torch.device("cpu"))
    monkeypatch.setattr(multi_lora, "is_interpreting", lambda: False)
    monkeypatch.setattr(multi_lora, "_cuda_major", lambda index: 9)
    assert multi_lora.pdl_enabled(cuda) and not multi_lora.pdl_enabled(torch.device("cpu"))
    monkeypatch.setenv("FASTLORA_PDL", "0")
    assert not multi_lora.pdl_enabled(cuda)
    monkeypatch.setenv("FASTLORA_PDL", "1")
    monkeypatch.setattr(multi_lora, "_cuda_major", lambda index: 8)
    assert not multi_lora.pdl_enabled(cuda)


def test_static_check_compiles_the_decode_variants():
    """The static check compiles what the launchers run: PDL on sm_90 only (griddepcontrol is sm_90+), the fused
    gather with and without EVEN_R, and the segmented shrink and expand with K splits."""
    from fastlora import static_check

    specs = {spec.name: spec for spec in static_check.kernel_specs()}
    for name in ("multi_lora_shrink", "multi_lora_fused"):
        spec = specs[name]
        for i in range(len(spec.sites)):
            assert spec.site_at(i, 80).constexprs["USE_PDL"] is False
            assert spec.site_at(i, 90).constexprs["USE_PDL"] is True
    assert {site.constexprs["EVEN_R"] for site in specs["multi_lora_fused"].sites} == {True, False}
    assert max(site.constexprs["SPLIT_K"] for site in specs["multi_lora_expand"].sites) == 8
    assert {(s.constexprs["SPLIT_K"], s.constexprs["BLOCK_R"]) for s in specs["multi_lora_shrink"].sites} >= {(8, 64)}


def test_deterministic():
    ranks = [8, 16]
    slots = unsorted_slots(20, 2)
    case = make_case(20, 33, 40, ranks, slots, torch.float16, token_scales=True)
    for impl in IMPLS:
        assert torch.equal(run(case, impl=impl), run(case, impl=impl))


def test_auto_picks_fused_for_few_tokens():
    assert ops.choose_multi_impl(1) == ops.choose_multi_impl(ops.MULTI_FUSED_MAX_TOKENS) == "fused"
    assert ops.choose_multi_impl(ops.MULTI_FUSED_MAX_TOKENS + 1) == "segmented"
    assert ops.choose_multi_impl(500, "fused") == "fused"


def test_torch_backend_is_differentiable():
    """The reference path carries gradients; pool entries beyond a rank get none."""
    ranks = [2, 3]
    x, w, b, a_pool, b_pool, meta = make_case(4, 6, 5, ranks, [1, 0, -1, 1], torch.float64, r_max=4, pad=0.0)
    x.requires_grad_()
    a_pool.requires_grad_()
    b_pool.requires_grad_()
    ops.multi_lora_linear(x, w, b, a_pool, b_pool, meta, backend="torch").sum().backward()
    assert x.grad is not None and a_pool.grad[0, :2].abs().sum() > 0
    assert a_pool.grad[0, 2:].abs().sum() == 0 and b_pool.grad[1, :, 3:].abs().sum() == 0


def test_triton_backend_refuses_autograd():
    case = make_case(3, 8, 8, [2], [0, -1, 0], torch.float32)
    case[0].requires_grad_()
    with pytest.raises(RuntimeError, match="inference only"):
        ops.multi_lora_linear(*case, backend="triton")
    with torch.no_grad():
        ops.multi_lora_linear(*case, backend="triton")


def _bad_inputs():
    x, w, b, a_pool, b_pool, meta = make_case(4, 8, 6, [2, 3], [1, 0, -1, 1], torch.float32, r_max=4, pad=0.0)
    other_meta = BatchMeta.build([0, 0, 1], [2, 3], [1.0, 1.0])
    three_slots = BatchMeta.build([1, 0, -1, 1], [2, 3, 1], [1.0, 1.0, 1.0])
    big_rank = BatchMeta.build([1, 0, -1, 1], [2, 8], [1.0, 1.0])
    on_meta_device = BatchMeta.build([1, 0, -1, 1], [2, 3], [1.0, 1.0], device="meta")
    yield "tokens", (x, w, b, a_pool, b_pool, other_meta), {}
    yield "one device", (x, w, b, a_pool, b_pool, on_meta_device), {}
    yield "slots", (x, w, b, a_pool, b_pool, three_slots), {}
    yield "r_max", (x, w, b, a_pool, b_pool, big_rank), {}
    yield "K=", (x[:, :7], w, b, a_pool, b_pool, meta), {}
    yield "weight.dtype", (x, w.double(), b, a_pool, b_pool, meta), {}
    yield "bias", (x, w, b[:5], a_pool, b_pool, meta), {}
    yield "a_pool", (x, w, b, a_pool[:, :, :7], b_pool, meta), {}
    yield "b_pool", (x, w, b, a_pool, b_pool[:, :5], meta), {}
    yield "differ", (x, w, b, a_pool, b_pool.half(), meta), {}
    yield "pools' dtype", (x, w, b, a_pool.half(), b_pool.half(), meta), {}
    yield "slot_ranks", (x, w, b, a_pool, b_pool, meta), {"slot_ranks": torch.tensor([1, 2, 3], dtype=torch.int32)}
    yield "slot_ranks", (x, w, b, a_pool, b_pool, meta), {"slot_ranks": torch.tensor([1.0, 2.0])}
    yield "slot_scalings", (x, w, b, a_pool, b_pool, meta), {"slot_scalings": torch.tensor([1.0], dtype=torch.float32)}
    yield "BatchMeta", (x, w, b, a_pool, b_pool, [0, 1]), {}
    yield "impl", (x, w, b, a_pool, b_pool, meta), {"impl": "onepass"}
    yield "backend", (x, w, b, a_pool, b_pool, meta), {"backend": "cuda"}


@pytest.mark.parametrize("match,args,kwargs", list(_bad_inputs()), ids=lambda v: v if isinstance(v, str) else "")
def test_clear_errors(match, args, kwargs):
    with pytest.raises((ValueError, TypeError)) as info:
        ops.multi_lora_linear(*args, **kwargs)
    assert match in str(info.value), str(info.value)


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["auto", *IMPLS])
@pytest.mark.parametrize("dtype,lora_dtype", [(torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                              (torch.float32, torch.float32)])  # fmt: skip
@pytest.mark.parametrize("T,K,N,num_adapters", [(1, 16, 16, 1), (9, 97, 65, 5), (70, 41, 100, 16), (40, 64, 33, 9)])
def test_sweep(impl, dtype, lora_dtype, T, K, N, num_adapters):
    """More shapes, ranks up to 128, every dtype pair, both layouts, and the automatic choice of path."""
    ranks = [(1, 8, 16, 64, 128, 3)[s % 6] for s in range(num_adapters)]
    slots = unsorted_slots(T, num_adapters, seed=T + K)
    fan_in_fan_out = K % 2 == 1
    case = make_case(T, K, N, ranks, slots, dtype, lora_dtype, r_max=128, token_scales=T % 2 == 0,
                     fan_in_fan_out=fan_in_fan_out, bias=N % 2 == 0, seed=N)  # fmt: skip
    y = run(case, fan_in_fan_out=fan_in_fan_out, impl=impl)
    assert_close(y, expected(*case, fan_in_fan_out=fan_in_fan_out), dtype, K + max(ranks), "y")


def test_expand_autotuning_does_not_accumulate_into_the_output(monkeypatch):
    """The segmented expand adds into ``y`` in place. On a GPU the autotuner times several configs by launching the
    kernel repeatedly on the real arguments; each launch must start from the base output (``restore_value``)."""
    import triton
    from fastlora.kernels import multi_lora

    tuner = multi_lora._multi_expand_kernel
    configs = [
        triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_R": 16}, num_warps=4, num_stages=1),
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_R": 16}, num_warps=4, num_stages=1),
    ]

    def timer(kernel_call, quantiles=None, **_):
        for _ in range(3):  # warm-up and repetitions, each a real launch as in triton.testing.do_bench
            kernel_call()
        return 1.0 if quantiles is None else [1.0] * len(quantiles)

    monkeypatch.setattr(tuner, "configs", configs)
    monkeypatch.setattr(tuner, "cache", {})
    monkeypatch.setattr(tuner, "_do_bench", timer)
    x, w, b, a_pool, b_pool, meta = make_case(80, 32, 24, [4, 8], [i % 3 - 1 for i in range(80)], torch.float32)
    with torch.no_grad():
        y = ops.multi_lora_linear(x, w, b, a_pool, b_pool, meta, impl="segmented", backend="triton")
    assert len(tuner.cache) == 1, "the tuner did not run: the test would prove nothing"
    assert_close(y, expected(x, w, b, a_pool, b_pool, meta), torch.float32, 32, "first (tuned) call")


def test_concurrent_launches_from_threads_agree_with_one_thread():
    """Serving runs forwards from several threads; Triton's autotuner keeps a call's arguments on the shared kernel
    object, so launches go through one lock. Every thread's result equals the single-threaded one."""
    import threading

    cases = [
        make_case(T, 24, 40, [4, 16, 8], [(t * 5 + s) % 4 - 1 for t in range(T)], torch.float32, seed=s)
        for s, T in enumerate((5, 70, 9, 66))
    ]
    with torch.no_grad():
        want = [ops.multi_lora_linear(*case) for case in cases]
    errors = []

    def worker(i):
        try:
            with torch.no_grad():
                for _ in range(3):
                    got = ops.multi_lora_linear(*cases[i])
                    assert torch.equal(got, want[i]), f"thread {i}: result differs from the single-threaded run"
        except Exception as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not errors, errors


def test_a_segment_longer_than_the_grid_allows_is_refused():
    """The segmented grid's token-block axis is capped by CUDA: the op says so instead of launching a bad grid."""
    import dataclasses

    x, w, b, a_pool, b_pool, meta = make_case(5, 16, 16, [4], [0, 0, 0, -1, 0], torch.float32)
    meta = dataclasses.replace(meta, max_segment_len=kernels.MULTI_MAX_SEGMENT_TOKENS + 1)
    with pytest.raises(ValueError, match="per adapter and batch"):
        ops.multi_lora_linear(x, w, b, a_pool, b_pool, meta, backend="triton")
