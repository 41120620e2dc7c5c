"""The model level of the ``multi`` suite: a whole model serving a batch whose rows use different adapters.

A case (``MultiModelCase``) is a Llama-style causal LM built from a config (``fastlora.bench.llama``, no downloads),
q/k/v/o and gate/up/down projections adapted, ``batch`` rows each using one of ``D`` distinct adapters (shuffled rows,
every adapter at least one row; see ``fastlora.bench.multi_batch``). ``mode`` is

- ``forward``: one forward of ``batch × seq`` tokens, no KV cache (a prefill);
- ``generate``: greedy ``generate`` of exactly ``new_tokens`` tokens per row after a ``seq``-token prompt, KV cache
  on (the prefill is inside the timed call);
- ``decode-step``: one decode step (one position per row) through the decode-step API, over a static KV cache of
  ``seq + new_tokens`` positions that the untimed prefill of the prompt filled: what a serving loop pays per step.
  The timed steps cycle over positions ``seq`` to ``seq + new_tokens - 1``: every ``new_tokens`` steps the cache is
  rewound to the prompt in place (``rewind``; a captured graph still finds its buffers), so it never overflows.
  On a CPU the figure is the whole step on one thread: the host's Python, dispatch and metadata per step. ``host_us``
  is the host's time per step with the device left to run behind (``common.host_us``; the whole step on a CPU).

Contenders: the base model alone (the same weights, no adapters), eager (``BASE_MODEL``) and with its decode steps
replayed from CUDA graphs (``BASE_GRAPHS``: ``fastlora.serving.DecodeGraphs``, its ``generate`` over a static cache);
PEFT's mixed batch (``get_peft_model`` and ``add_adapter`` for the batch's adapters, called with ``adapter_names=``;
PEFT keeps them in fp32 for a bf16 model, as it does by default); and ``fastlora.serving.MultiLoraModel`` (its pool in
the model's dtype, its default) with ``registered`` adapters registered and resident in as many slots, eager
(``MULTI_EAGER``: ``cuda_graphs=False``, HF ``generate`` over a dynamic cache, exact metadata) and with CUDA graphs
(``MULTI_MODEL``: the shipping default, ``cuda_graphs=True``). The graph contenders run in ``generate`` and
``decode-step`` cases only (a prefill is no decode step). On a CPU nothing is captured: the graph contenders run the
same static cache and fixed-size metadata eagerly. The ``registered`` sweep times ``MULTI_MODEL`` alone, on a fixed
batch, with more and more adapters registered: its throughput should not depend on how many adapters the pool holds.

Every timed call is made once untimed first (``common.time_ms``); the graph contenders make one more untimed call
before timing, in which the first ``generate`` (or step) captures its graphs, and their rows count the graphs captured
then (``captures_warmup``) and while timed (``captures_timed``, 0: the timing measured replays) and the steps replayed
while timed (``replays_timed``).

Tokens per second count the tokens a call computes (``batch × seq`` for a forward, ``batch`` for a decode step) or
generates (``batch × new_tokens`` for ``generate``). Per row: ``ratio_to_base`` (its time over the eager base
model's), ``ratio_to_base_graphs`` (over the base model's with CUDA graphs, where that was measured) and
``speedup_over_peft``. Before a case is timed, the logits of each ``MultiLoraModel``'s forward of the batch must match
PEFT's (``BenchmarkMismatch`` otherwise). On CPU the model is tiny and fp32 on the torch backend, on one thread: the
rows prove the level runs, nothing more.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..serving import DecodeGraphs, MultiLoraModel
from .common import (
    FASTLORA,
    Suite,
    assert_close,
    bench_backend,
    by_case,
    fmt_ratio,
    forced_backend,
    free_memory,
    grouped_bars,
    host_us,
    md_table,
    plot_title,
    progress,
    pyplot,
    save_plot,
    time_ms,
    without_grad,
)
from .llama import LLAMA_160M, TINY, TINYLLAMA_1B, LlamaCase, build_llama, quiet_peft, random_ids
from .multi_batch import MIXED, PEFT_MIXED, UNIFORM, check_mix, cpu_threads, parse_ranks, shuffled_assignment, spread

BASE_MODEL = "base model"
BASE_GRAPHS = "base model (CUDA graphs)"
MULTI_EAGER = f"{FASTLORA} MultiLoraModel (eager)"
MULTI_MODEL = f"{FASTLORA} MultiLoraModel (CUDA graphs)"  # the shipping default: P7 and P8 read it
MODEL_CONTENDERS = (BASE_MODEL, BASE_GRAPHS, PEFT_MIXED, MULTI_EAGER, MULTI_MODEL)
MULTI_MODELS = (MULTI_EAGER, MULTI_MODEL)
GRAPH_CONTENDERS = (BASE_GRAPHS, MULTI_MODEL)
SWEEPS = ("contenders", "registered")
MODES = ("forward", "generate", "decode-step")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Throughput from the fewest to the most registered adapters: within 5%.
REGISTERED_SPREAD = 0.05
PLOT = "multi_model.png"


@dataclasses.dataclass(frozen=True)
class MultiModelCase(LlamaCase):
    """A Llama-style model (the fields of ``LlamaCase``), ``mode`` (``forward``, ``generate`` or ``decode-step``),
    ``batch`` rows of ``seq`` prompt tokens (``new_tokens`` generated per row, or the positions the decode steps cycle
    over), ``adapters`` distinct adapters among the rows, their rank mix, ``registered`` adapters in the pool (all
    resident), the model's dtype, and ``sweep``: ``contenders`` (base, PEFT and fastlora) or ``registered`` (fastlora
    alone, one point of the registered-adapters sweep)."""

    mode: str
    batch: int
    seq: int
    new_tokens: int
    adapters: int
    ranks: str
    registered: int
    dtype: str
    sweep: str

    def __post_init__(self):
        super().__post_init__()
        check_mix("MultiModelCase", self.ranks, self.adapters, self.registered, "registered")
        if self.mode not in MODES:
            raise ValueError(f"MultiModelCase: mode must be one of {MODES}, got {self.mode!r}")
        if self.sweep not in SWEEPS:
            raise ValueError(f"MultiModelCase: sweep must be one of {SWEEPS}, got {self.sweep!r}")
        if self.adapters > self.batch:
            raise ValueError(f"MultiModelCase: {self.adapters} distinct adapters need as many rows, batch={self.batch}")
        if (self.mode == "forward") == (self.new_tokens > 0):
            raise ValueError("MultiModelCase: new_tokens > 0 for generate and decode-step, 0 for forward")

    @property
    def tokens(self) -> int:
        """The tokens a call produces: the batch's for a forward, the generated ones for ``generate``, one per row for
        a decode step."""
        return self.batch * {"forward": self.seq, "generate": self.new_tokens, "decode-step": 1}[self.mode]

    @property
    def positions(self) -> int:
        return self.seq + self.new_tokens

    @property
    def shape(self) -> str:
        new = "" if self.mode == "forward" else f"+{self.new_tokens}"
        return (f"hidden={self.hidden} layers={self.layers} {self.mode} {self.batch}x{self.seq}{new} "
                f"D={self.adapters} r={self.ranks} registered={self.registered}")  # fmt: skip

    @property
    def label(self) -> str:
        return (f"{self.size}-{self.mode}-b{self.batch}x{self.seq}+{self.new_tokens}-D{self.adapters}-"
                f"r{self.ranks.replace(',', '_')}-R{self.registered}-{self.dtype}-{self.sweep}")  # fmt: skip


def gpu_model_cases(quick: bool = False) -> list[MultiModelCase]:
    """bf16, mixed ranks, 32 slots: decode (``generate`` of 32 tokens for 32 rows of a 128-token prompt) with 1, 8
    and 32 distinct adapters, a prefill of 8 × 512 tokens with 8 adapters, and the decode step of the same 32 rows
    (32 adapters, positions 128 to 159), for the 160M and 1.1B shapes; then the 160M decode batch with 8 rank-16
    adapters while 8 to 512 adapters are registered. Quick: the 160M decode and decode step with 8 adapters, and 8
    and 128 registered."""

    def compare(model, mode, batch, seq, new, D):
        return MultiModelCase(*model, mode, batch, seq, new, D, MIXED, 32, "bf16", "contenders")

    def registered(R):
        return MultiModelCase(*LLAMA_160M, "generate", 32, 128, 32, 8, UNIFORM, R, "bf16", "registered")

    if quick:
        return [compare(LLAMA_160M, mode, 32, 128, 32, 8) for mode in ("generate", "decode-step")] + [
            registered(8), registered(128),
        ]  # fmt: skip
    models = (LLAMA_160M, TINYLLAMA_1B)
    cases = [compare(model, "generate", 32, 128, 32, D) for model in models for D in (1, 8, 32)]
    cases += [compare(model, "forward", 8, 512, 0, 8) for model in models]
    cases += [compare(model, "decode-step", 32, 128, 32, 32) for model in models]
    return cases + [registered(R) for R in (8, 32, 128, 512)]


def cpu_model_cases(quick: bool = False) -> list[MultiModelCase]:
    """A tiny fp32 Llama (2 layers, hidden 64): a short ``generate``, a forward and a decode step (positions 8 to 39)
    with mixed ranks, and 4 to 16 registered adapters."""

    def compare(mode, seq, new, D):
        return MultiModelCase(*TINY, mode, 4, seq, new, D, MIXED, 4, "fp32", "contenders")

    def registered(R):
        return MultiModelCase(*TINY, "generate", 4, 8, 4, 2, UNIFORM, R, "fp32", "registered")

    step = compare("decode-step", 8, 32, 4)
    if quick:
        return [compare("generate", 8, 4, 4), compare("forward", 16, 0, 4), step, registered(4), registered(16)]
    return (
        [compare("generate", 8, 4, D) for D in (1, 2, 4)]
        + [compare("forward", 64, 0, 4), step]
        + [registered(R) for R in (4, 16, 64)]
    )


def headline_model_cases(device: torch.device, quick: bool = False) -> list[MultiModelCase]:
    """The cases of targets P7 and P8. P8: ``generate`` of 32 tokens for 32 rows of a 128-token prompt on the ≈1.1B
    shape, every row its own adapter (32 distinct, mixed ranks 8–64), ``MultiLoraModel`` with CUDA graphs against
    the base model with CUDA graphs. P7: the 160M decode batch with 8 rank-16 adapters while 8 and then 512 adapters
    are registered (``MultiLoraModel`` with CUDA graphs). Quick: the 160M shape for P8, 8 and 128 registered for P7.
    On CPU the tiny model, 4 and 64 registered."""
    if device.type == "cuda":
        model, most = (LLAMA_160M, 128) if quick else (TINYLLAMA_1B, 512)
        mixed = MultiModelCase(*model, "generate", 32, 128, 32, 32, MIXED, 32, "bf16", "contenders")
        registered = [
            MultiModelCase(*LLAMA_160M, "generate", 32, 128, 32, 8, UNIFORM, R, "bf16", "registered") for R in (8, most)
        ]
        return [mixed, *registered]
    mixed = MultiModelCase(*TINY, "generate", 4, 8, 4, 4, MIXED, 4, "fp32", "contenders")
    return [mixed, *(MultiModelCase(*TINY, "generate", 4, 8, 4, 2, UNIFORM, R, "fp32", "registered") for R in (4, 64))]


def model_cases(device: torch.device, quick: bool = False, headline: bool = False) -> list[MultiModelCase]:
    if headline:
        return headline_model_cases(device, quick)
    return gpu_model_cases(quick) if device.type == "cuda" else cpu_model_cases(quick)


def model_contender_names(case: MultiModelCase, headline: bool = False) -> list[str]:
    """The contenders timed: on the registered sweep ``MultiLoraModel`` with CUDA graphs alone; in a forward the
    eager ones (base model, PEFT's mixed batch, ``MultiLoraModel``); in ``generate`` and decode steps those and both
    with CUDA graphs. Headline runs time only what P8 reads, both with CUDA graphs (PEFT's mixed-batch ``generate`` is
    the slowest call); fastlora is still checked against PEFT's logits."""
    if case.sweep != "contenders":
        return [MULTI_MODEL]
    if headline:
        return list(GRAPH_CONTENDERS)
    return [name for name in MODEL_CONTENDERS if case.mode != "forward" or name not in GRAPH_CONTENDERS]


def adapter_names(case: MultiModelCase) -> list[str]:
    """The registered adapters' names, ``adapter0`` ... in registration order."""
    return [f"adapter{i}" for i in range(case.registered)]


def batch_adapters(case: MultiModelCase) -> list[str]:
    """The batch's ``D`` adapters, spread over the registered ones (not the first slots)."""
    names = adapter_names(case)
    return [names[i] for i in spread(case.adapters, case.registered)]


def adapter_rank(case: MultiModelCase, name: str) -> int:
    """The batch's adapters take the rank mix in turn (so that a batch of ``len(mix)`` adapters has every rank); the
    other registered adapters cycle it by index."""
    mix = parse_ranks(case.ranks)
    index = int(name.removeprefix("adapter"))
    in_batch = spread(case.adapters, case.registered)
    return mix[in_batch.index(index) % len(mix)] if index in in_batch else mix[index % len(mix)]


def row_adapters(case: MultiModelCase) -> list[str]:
    """Each row's adapter: every batch adapter at least once, rows shuffled."""
    adapters = batch_adapters(case)
    return [adapters[i] for i in shuffled_assignment(case.batch, case.adapters, seed=3)]


def adapter_config(case: MultiModelCase, name: str) -> dict:
    r = adapter_rank(case, name)
    return {"r": r, "lora_alpha": 2 * r, "lora_dropout": 0.0, "target_modules": list(TARGETS)}


def target_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``{module name: (N, K)}`` of the model's target projections (read before any wrapper swaps them)."""
    return {
        name: tuple(module.weight.shape)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS
    }


def adapter_state_dict(case: MultiModelCase, shapes: dict[str, tuple[int, int]], name: str) -> dict[str, torch.Tensor]:
    """PEFT-format weights of adapter ``name`` for the target layers ``shapes`` (``target_shapes``): seeded by the
    adapter's index (the same weights on every device and for every contender), fp32 on CPU, ``B`` non-zero."""
    index = int(name.removeprefix("adapter"))
    r = adapter_rank(case, name)
    g = torch.Generator().manual_seed(1000 + index)
    out = {}
    for module_name, (N, K) in shapes.items():
        prefix = f"base_model.model.{module_name}"
        out[f"{prefix}.lora_A.weight"] = torch.randn(r, K, generator=g) * K**-0.5
        out[f"{prefix}.lora_B.weight"] = torch.randn(N, r, generator=g) * r**-0.5 * 0.1
    return out


def build_model(case: MultiModelCase, contender: str, device: torch.device):
    """A fresh model for ``contender``, in eval mode: the base model (behind ``DecodeGraphs`` for ``BASE_GRAPHS``);
    PEFT with the batch's adapters; or a ``MultiLoraModel`` with ``registered`` adapters registered and made resident
    (one slot each), with or without CUDA graphs."""
    import peft
    from peft import set_peft_model_state_dict

    model = build_llama(case, device).eval()
    shapes = target_shapes(model)
    if contender == BASE_MODEL:
        return model
    if contender == BASE_GRAPHS:
        return DecodeGraphs(model)
    if contender == PEFT_MIXED:
        peft_model = None
        with quiet_peft():
            for name in batch_adapters(case):
                config = peft.LoraConfig(**adapter_config(case, name))
                if peft_model is None:
                    peft_model = peft.get_peft_model(model, config, adapter_name=name)
                else:
                    peft_model.add_adapter(name, config)
                set_peft_model_state_dict(peft_model, adapter_state_dict(case, shapes, name), adapter_name=name)
        return peft_model.eval()
    names = adapter_names(case)
    mm = MultiLoraModel(model, list(TARGETS), max_adapters=case.registered, max_rank=max(parse_ranks(case.ranks)),
                        cuda_graphs=contender == MULTI_MODEL)  # fmt: skip
    for name in names:
        mm.load_adapter(name, adapter_state_dict(case, shapes, name), config=adapter_config(case, name))
    mm.pool.acquire(names).release()  # every registered adapter resident: the pool is as full as it gets
    return mm


def contender_graphs(model, contender: str) -> DecodeGraphs | None:
    """The CUDA graphs a graph contender replays its decode steps from (None for the eager contenders)."""
    if contender == BASE_GRAPHS:
        return model
    return model.graphs if contender == MULTI_MODEL else None


def make_ids(case: MultiModelCase, device: torch.device) -> torch.Tensor:
    """The prompt of every row; ids from 3 up, so that no prompt holds a special token (pad 0, BOS 1, EOS 2)."""
    return random_ids(case, case.batch, case.seq, device, low=3)


def _call_kwargs(case: MultiModelCase, contender: str) -> dict:
    return {} if contender in (BASE_MODEL, BASE_GRAPHS) else {"adapter_names": row_adapters(case)}


@torch.no_grad()
def forward_logits(model, case: MultiModelCase, contender: str, ids: torch.Tensor) -> torch.Tensor:
    """The logits of one forward of the batch (each row with its adapter), for the agreement check."""
    return model(input_ids=ids, use_cache=False, **_call_kwargs(case, contender)).logits


def static_cache(model, contender: str, max_cache_len: int) -> tuple[str, object]:
    """A transformers ``StaticCache`` of ``max_cache_len`` positions for the contender's causal LM, and the keyword
    its forward takes it by (``past_key_values`` or ``cache``, by transformers version)."""
    if contender == PEFT_MIXED:
        model = model.get_base_model()
    elif contender != BASE_MODEL:
        model = model.model  # under DecodeGraphs or MultiLoraModel
    graphs = DecodeGraphs(model)
    return graphs.cache_arg, graphs.static_cache(max_cache_len)


def rewind(cache, steps: int) -> None:
    """Drop the last ``steps`` positions of a filled ``StaticCache`` in place (its buffers stay where a captured graph
    reads them): ``Cache.crop`` where its layers have one, else (older transformers) the layers' device-side lengths
    are moved back; the positions past the length are masked and rewritten by the next steps."""
    for layer in cache.layers:
        if hasattr(layer, "crop"):
            layer.crop(-steps)
        else:
            layer.cumulative_length.sub_(steps)


@torch.no_grad()
def decode_step(model, case: MultiModelCase, contender: str, ids: torch.Tensor) -> Callable[[], torch.Tensor]:
    """Prefill the prompt into a static cache of ``case.positions`` (now, untimed), and return one decode step of a
    position per row over it (see the module docstring: the steps cycle over the last ``new_tokens`` positions)."""
    cache_arg, cache = static_cache(model, contender, case.positions)
    kwargs = {**_call_kwargs(case, contender), cache_arg: cache}
    model(input_ids=ids, **kwargs)
    step_ids = ids[:, -1:].clone()  # a step costs the same whatever its ids: the same ones every step
    done = 0

    def step() -> torch.Tensor:
        nonlocal done
        if done == case.new_tokens:
            rewind(cache, done)  # in place: back to the prompt
            done = 0
        done += 1
        return model(input_ids=step_ids, **kwargs).logits

    return without_grad(step)


def model_step(model, case: MultiModelCase, contender: str, ids: torch.Tensor) -> Callable[[], torch.Tensor]:
    """The timed call: one forward of the batch, a greedy ``generate`` of exactly ``new_tokens`` per row, or one
    decode step over a static cache (``decode_step``)."""
    if case.mode == "decode-step":
        return decode_step(model, case, contender, ids)
    kwargs = _call_kwargs(case, contender)
    if case.mode == "forward":
        return without_grad(lambda: model(input_ids=ids, use_cache=False, **kwargs).logits)
    mask = torch.ones_like(ids)
    n = case.new_tokens

    def generate() -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # generation-config notices, the same on every call
            return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                  do_sample=False, pad_token_id=0, **kwargs)  # fmt: skip

    return without_grad(generate)


def check_model_agreement(
    case: MultiModelCase, got: torch.Tensor, want: torch.Tensor, contender: str = MULTI_MODEL
) -> None:
    """``MultiLoraModel``'s logits must match PEFT's mixed batch on the same rows; raises ``BenchmarkMismatch``. Both
    run the model in its dtype, so both errors are allowed, over the model's reduction length."""
    what = f"{contender} != {PEFT_MIXED} in logits for {case.label}"
    assert_close(got, want, case.torch_dtype, case.reduce_len, what, want_dtype=case.torch_dtype)


def peft_reference(case: MultiModelCase, device: torch.device, ids: torch.Tensor) -> torch.Tensor:
    model = build_model(case, PEFT_MIXED, device)
    logits = forward_logits(model, case, PEFT_MIXED, ids)
    del model
    free_memory(device)
    return logits


def measure_contender(
    case: MultiModelCase, contender: str, model, ids: torch.Tensor, device: torch.device, min_run_time: float,
    headline: bool = False,
) -> dict:  # fmt: skip
    """The row of one contender: its call timed (after an untimed one that captures the graphs of a graph contender,
    so that the timed calls replay them), with the graphs' counts, and the host time of a decode step."""
    step = model_step(model, case, contender, ids)
    graphs = contender_graphs(model, contender)
    if graphs is not None:
        step()  # the first generate (or step) of this shape captures its graphs
        captures, replays = graphs.captures, graphs.replays
    median, p20, p80 = time_ms(step, device, min_run_time, min_reps=5 if headline else 10)
    extra = {}
    if graphs is not None:
        extra = {"captures_warmup": captures, "captures_timed": graphs.captures - captures,
                 "replays_timed": graphs.replays - replays}  # fmt: skip
    if case.mode == "decode-step":
        extra.update(step_us=median * 1e3, host_us=host_us(step, device, max_run_time=min_run_time))
    return {
        "contender": contender, **dataclasses.asdict(case), "shape": case.shape, "tokens": case.tokens,
        "median_ms": median, "p20_ms": p20, "p80_ms": p80, "tokens_per_s": case.tokens / (median * 1e-3), **extra,
    }  # fmt: skip


def add_ratios(rows: list[dict]) -> None:
    """Each row of one case: its time over the eager base model's and over the base model's with CUDA graphs, and
    PEFT's time over its own, where those were measured (None otherwise)."""
    times = {row["contender"]: row["median_ms"] for row in rows}
    for row in rows:
        row["ratio_to_base"] = row["median_ms"] / times[BASE_MODEL] if BASE_MODEL in times else None
        row["ratio_to_base_graphs"] = row["median_ms"] / times[BASE_GRAPHS] if BASE_GRAPHS in times else None
        row["speedup_over_peft"] = times[PEFT_MIXED] / row["median_ms"] if PEFT_MIXED in times else None


def measure_model_case(
    case: MultiModelCase, device: torch.device, min_run_time: float, headline: bool = False
) -> list[dict]:
    """Every contender in turn (one model in memory at a time); each fastlora one checked against PEFT before it is
    timed. Headline runs time 5 calls at least (a ``generate`` of the 1.1B shape takes about a second), not 10."""
    ids = make_ids(case, device)
    want = peft_reference(case, device, ids)
    rows = []
    for name in model_contender_names(case, headline):
        model = build_model(case, name, device)
        if name in MULTI_MODELS:
            check_model_agreement(case, forward_logits(model, case, name, ids), want, name)
        rows.append(measure_contender(case, name, model, ids, device, min_run_time, headline))
        del model
        free_memory(device)
    add_ratios(rows)
    return rows


def _sweep_key(row: dict) -> tuple:
    return tuple(row[k] for k in ("size", "mode", "batch", "seq", "new_tokens", "adapters", "ranks", "dtype"))


def add_registered_spread(rows: list[dict]) -> None:
    """Each ``registered`` sweep row's throughput over that of the fewest registered adapters of the same batch."""
    sweep = [row for row in rows if row["sweep"] == "registered"]
    fewest: dict[tuple, dict] = {}
    for row in sweep:
        key = _sweep_key(row)
        if key not in fewest or row["registered"] < fewest[key]["registered"]:
            fewest[key] = row
    for row in sweep:
        row["fewest_registered"] = fewest[_sweep_key(row)]["registered"]
        row["throughput_vs_fewest_registered"] = row["tokens_per_s"] / fewest[_sweep_key(row)]["tokens_per_s"]


def model_suite(
    device: torch.device, quick: bool = False, progress_bar: bool = False, headline: bool = False
) -> list[dict]:
    """Every model case; one row per (case, contender)."""
    rows = []
    with forced_backend(bench_backend(device)), cpu_threads(device, 1):
        for case in progress(model_cases(device, quick, headline), "multi model", progress_bar):
            rows.extend(measure_model_case(case, device, 0.1 if quick else 1.0, headline))
    add_registered_spread(rows)
    return rows


# ----------------------------------------------------------------------------------------------- report

CASE_FIELDS = ["size", "mode", "batch", "seq", "new_tokens", "adapters", "ranks", "registered", "dtype"]
CASE_HEADER = ["size", "mode", "batch×seq", "new tokens", "D", "ranks", "registered", "dtype"]
FIGURES_HEADER = ["fastlora / base, eager (time)", "fastlora / base, CUDA graphs (time)",
                  "speedup over PEFT (eager · CUDA graphs)"]  # fmt: skip


def _tables(rows: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """The rows of each table: the contenders in forward and ``generate`` cases, in decode steps, the registered
    sweep."""
    contenders = [row for row in rows if row["sweep"] == "contenders"]
    return (
        [row for row in contenders if row["mode"] != "decode-step"],
        [row for row in contenders if row["mode"] == "decode-step"],
        [row for row in rows if row["sweep"] == "registered"],
    )


def _case_cells(key: tuple) -> list:
    """The ``CASE_HEADER`` cells of a case, from its ``CASE_FIELDS`` values."""
    size, mode, batch, seq, *rest = key
    return [size, mode, f"{batch}×{seq}", *rest]


def _figures(cells: dict[str, dict]) -> list[str]:
    """The cells of ``FIGURES_HEADER`` for one case's rows (by contender): the eager ``MultiLoraModel`` against the
    eager base model, the one with CUDA graphs against the base model with CUDA graphs, and both against PEFT."""
    eager, graphs = cells.get(MULTI_EAGER, {}), cells.get(MULTI_MODEL, {})
    speedups = " · ".join(fmt_ratio(row.get("speedup_over_peft")) or "–" for row in (eager, graphs))
    return [fmt_ratio(eager.get("ratio_to_base")), fmt_ratio(graphs.get("ratio_to_base_graphs")), speedups]


def _contenders_table(rows: list[dict], unit: str, cell: Callable[[dict], str]) -> list[str]:
    """A line per case: the case, ``cell(row)`` of each contender (a column each, headed with ``unit``), the figures."""
    contenders = list(dict.fromkeys(row["contender"] for row in rows))
    header = [*CASE_HEADER, *(f"{name} ({unit})" for name in contenders), *FIGURES_HEADER]
    table = [
        [*_case_cells(key), *(cell(cells[name]) if name in cells else "" for name in contenders), *_figures(cells)]
        for key, cells in by_case(rows, CASE_FIELDS).items()
    ]
    return md_table(header, table)


def model_markdown(rows: list[dict]) -> list[str]:
    """Three tables: the contenders (tokens/s of each), the decode step (µs per step of each), the
    registered-adapters sweep (tokens/s and its ratio to the fewest registered)."""
    lines: list[str] = []
    compare, steps, sweep = _tables(rows)
    if compare:
        intro = (
            "A Llama-style model built from a config, inference: tokens/s of a forward (batch × seq tokens) or of "
            "`generate` (new tokens, prefill included), eager and, in `generate`, with every decode step after the "
            "first replayed from a CUDA graph (captured in an untimed call; on a CPU the graph contenders run the "
            f"same static cache eagerly). fastlora / base, eager is `{MULTI_EAGER}`'s time over `{BASE_MODEL}`'s; "
            f"fastlora / base, CUDA graphs is `{MULTI_MODEL}`'s over `{BASE_GRAPHS}`'s (target P8 reads it); speedup "
            "over PEFT is PEFT's mixed-batch time over fastlora's."
        )
        table = _contenders_table(compare, "tokens/s", lambda row: f"{row['tokens_per_s']:.4g}")
        lines += ["### model", "", intro, "", *table, ""]
    if steps:
        intro = (
            "One decode step (a position per row) through the decode-step API, over a static KV cache that the prompt "
            "filled, the steps cycling over the `new tokens` positions after it: µs per step (median, the device "
            "synchronised) · the host's µs per step (the device left to run behind). On a CPU both are the whole step "
            f"on one thread: Python, dispatch and metadata. `{BASE_MODEL}`: `model(...)`; `{BASE_GRAPHS}`: "
            f"`DecodeGraphs(model)(...)`; `{MULTI_EAGER}`: `cuda_graphs=False`, exact metadata; `{MULTI_MODEL}`: "
            "fixed-size metadata, the step replayed from a CUDA graph on a GPU. Ratios as in the table above."
        )
        table = _contenders_table(
            steps, "µs / step · host µs", lambda row: f"{row['step_us']:.4g} · {row['host_us']:.4g}"
        )
        lines += ["### decode step", "", intro, "", *table, ""]
    if sweep:
        intro = (
            f"`{MULTI_MODEL}` on the same batch with more adapters registered and resident (target: within "
            f"{REGISTERED_SPREAD:.0%} of the fewest)."
        )
        header = [*CASE_HEADER, f"{MULTI_MODEL} (tokens/s)", "vs fewest registered"]
        table = [
            [*_case_cells(tuple(row[f] for f in CASE_FIELDS)), f"{row['tokens_per_s']:.4g}",
             fmt_ratio(row.get("throughput_vs_fewest_registered"))]
            for row in sweep
        ]  # fmt: skip
        lines += ["### registered adapters", "", intro, "", *md_table(header, table), ""]
    return [*lines, f"![MultiLoraModel throughput]({PLOT})"]


def _case_bars(ax, rows: list[dict], value: Callable[[dict], float], title: str) -> None:
    """A group of bars per case, a bar per contender ``value(row)`` high."""
    cases = list(dict.fromkeys(_sweep_key(row) for row in rows))
    contenders = list(dict.fromkeys(row["contender"] for row in rows))
    grouped_bars(ax, cases, contenders, {(_sweep_key(row), row["contender"]): value(row) for row in rows})
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels([f"{c[0]} {c[1]}\n{c[2]}×{c[3]} D={c[5]}" for c in cases], fontsize=7)
    ax.set_title(title, fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=7)


def _registered_lines(ax, sweep: list[dict]) -> None:
    """The registered sweep's tokens/s against adapters registered, with the ±5% band around the fewest."""
    for key in dict.fromkeys(_sweep_key(row) for row in sweep):
        line = sorted((row["registered"], row["tokens_per_s"] / 1e3) for row in sweep if _sweep_key(row) == key)
        ax.plot(*zip(*line), marker="o", label=f"{key[0]} {key[1]} {key[2]}×{key[3]} D={key[5]}")
        first = line[0][1]
        ax.axhspan(first * (1 - REGISTERED_SPREAD), first * (1 + REGISTERED_SPREAD), color="grey", alpha=0.15)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("adapters registered (all resident)")
    ax.set_title(f"{MULTI_MODEL}: thousand tokens / s", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)


def model_plots(rows: list[dict], out_dir: Path) -> list[Path]:
    """A panel for each table there is: tokens/s per case, a bar per contender; µs per decode step per case, a bar per
    contender; the registered sweep's tokens/s against adapters registered."""
    compare, steps, sweep = _tables(rows)
    draws = [
        (compare, lambda ax: _case_bars(ax, compare, lambda row: row["tokens_per_s"] / 1e3,
                                        "thousand tokens / s (higher is better)")),
        (steps, lambda ax: _case_bars(ax, steps, lambda row: row["step_us"], "µs per decode step (lower is better)")),
        (sweep, lambda ax: _registered_lines(ax, sweep)),
    ]  # fmt: skip
    draws = [draw for part, draw in draws if part]
    if not draws:
        return []
    plt = pyplot()
    fig, axes = plt.subplots(1, len(draws), figsize=(5.6 * len(draws), 4.6), squeeze=False)
    for ax, draw in zip(axes[0], draws):
        draw(ax)
    fig.suptitle(plot_title("many adapters, Llama-style models", rows), fontsize=11)
    fig.tight_layout()
    return [save_plot(fig, out_dir / PLOT)]


LEVEL = Suite("model", model_suite, model_markdown, model_plots, (PLOT,))
