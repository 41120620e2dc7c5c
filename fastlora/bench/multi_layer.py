"""The layer level of the ``multi`` suite: one projection over a batch that mixes many adapters (the serving path).

A case (``MultiCase``) is one projection ``x [T, K] -> [T, N]`` whose ``T`` tokens use ``D`` distinct adapters, each
token's adapter drawn in shuffled order (every adapter gets ``T / D`` tokens, to within one, not in runs), from a pool
of ``slots`` adapters (the registered adapters resident on the device) of the case's rank mix (see
``fastlora.bench.multi_batch``). Contenders, all on the same ``x``, ``W0``, bias and adapter weights, under
``torch.no_grad`` (inference):

- ``base only``: ``F.linear`` (cuBLAS on CUDA), the floor: what the layer costs with no adapter at all;
- ``PEFT mixed batch``: a PEFT ``lora.Linear`` holding the batch's ``D`` adapters as named adapters (in the pool's
  dtype, with the same values), called with ``adapter_names=`` (one per token): PEFT's ``_mixed_batch_forward``,
  which runs the base layer and then one gather, two small matmuls and one scatter per adapter;
- ``fastlora multi_lora_linear``: ``fastlora.multi_lora_linear`` (``impl="auto"``) over the pool and the batch's
  ``BatchMeta``; on the Triton backend also its forced paths, ``fused`` (base GEMM with the per-token expand in its
  epilogue; decode sizes only) and ``segmented`` (shrink and expand per segment of tokens of one adapter).

The ``BatchMeta`` is built once, outside the timed call: a model builds it once per forward for all its layers.
Before a case is timed, every fastlora path must match PEFT's output on the same inputs (``BenchmarkMismatch``
otherwise). On CPU the cases are tiny and fp32 on the torch backend, on one thread: the rows prove the level runs,
nothing more.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import MULTI_FUSED_MAX_TOKENS, BatchMeta, multi_lora_linear
from .common import (
    FASTLORA,
    Case,
    Suite,
    assert_close,
    bench_backend,
    by_case,
    fmt_ratio,
    forced_backend,
    free_memory,
    md_table,
    plot_title,
    progress,
    pyplot,
    save_plot,
    time_ms,
    without_grad,
)
from .multi_batch import MIXED, PEFT_MIXED, UNIFORM, check_mix, cpu_threads, parse_ranks, shuffled_assignment, spread

BASE_ONLY = "base only"
MULTI = f"{FASTLORA} multi_lora_linear"
# The target: the layer within 1.25× of the base GEMM for 32 distinct rank-16 adapters in a batch of 32.
TARGET_RATIO = 1.25
PLOT = "multi_layer.png"


@dataclasses.dataclass(frozen=True)
class MultiCase(Case):
    """One layer shape: ``T`` tokens of ``x [T, K]``, ``W0 [N, K]``, ``adapters`` distinct adapters in the batch
    (``D``), their rank mix, ``slots`` adapters in the pool, the dtype of activations, weights and pool."""

    T: int
    K: int
    N: int
    adapters: int
    ranks: str
    slots: int
    dtype: str

    def __post_init__(self):
        super().__post_init__()
        check_mix("MultiCase", self.ranks, self.adapters, self.slots, "slots")
        if self.adapters > self.T:
            raise ValueError(f"MultiCase: {self.adapters} distinct adapters need at least as many tokens, T={self.T}")

    @property
    def phase(self) -> str:
        return "decode" if self.T <= 256 else "prefill"

    @property
    def shape(self) -> str:
        return f"T={self.T} K={self.K} N={self.N} D={self.adapters} r={self.ranks} slots={self.slots}"

    @property
    def label(self) -> str:
        return (
            f"T{self.T}-K{self.K}-N{self.N}-D{self.adapters}-r{self.ranks.replace(',', '_')}-s{self.slots}-{self.dtype}"
        )

    @property
    def reduce_len(self) -> int:
        """Each output element sums ``K`` products (the base GEMM and the shrink), then the adapter's rank (the
        expand): the agreement check's reduction length, at the mix's largest rank."""
        return self.K + max(parse_ranks(self.ranks))


def gpu_layer_cases(quick: bool = False) -> list[MultiCase]:
    """K = N = 4096 bf16 over a pool of 128 slots: decode (T = 32 to 256 tokens) with 1 to 128 distinct adapters
    (never more than tokens), prefill (4096 tokens), uniform rank 16 and mixed ranks 8 to 64; then the pool size
    from 8 to 512 slots at the target shape (T = 32, 8 rank-16 adapters). Quick: the target case (32 rank-16
    adapters in 32 tokens) and one mixed-rank decode batch."""
    kn, slots = 4096, 128
    if quick:
        return [MultiCase(32, kn, kn, 32, UNIFORM, slots, "bf16"), MultiCase(256, kn, kn, 8, MIXED, slots, "bf16")]
    cases = [
        MultiCase(T, kn, kn, D, ranks, slots, "bf16")
        for ranks, T, D in itertools.product((UNIFORM, MIXED), (32, 64, 128, 256, 4096), (1, 8, 32, 128))
        if D <= T
    ]
    return cases + [MultiCase(32, kn, kn, 8, UNIFORM, s, "bf16") for s in (8, 32, 512)]


def cpu_layer_cases(quick: bool = False) -> list[MultiCase]:
    """Tiny fp32 shapes (K = N = 128) with the same rank mixes: enough to prove on CPU that every contender runs.
    Quick: 1 and 4 rank-16 adapters in 16 tokens (a line on the plot), 8 mixed-rank adapters in 64."""
    kn, slots = 128, 16
    if quick:
        return [
            MultiCase(16, kn, kn, 1, UNIFORM, slots, "fp32"),
            MultiCase(16, kn, kn, 4, UNIFORM, slots, "fp32"),
            MultiCase(64, kn, kn, 8, MIXED, slots, "fp32"),
        ]
    cases = [
        MultiCase(T, kn, kn, D, ranks, slots, "fp32")
        for ranks, T, D in itertools.product((UNIFORM, MIXED), (16, 64, 512), (1, 4, 16))
        if D <= T
    ]
    return cases + [MultiCase(16, kn, kn, 4, UNIFORM, s, "fp32") for s in (4, 64)]


def headline_layer_cases(device: torch.device) -> list[MultiCase]:
    """The case of target P6: 32 distinct rank-16 adapters over 32 decode tokens, K = N = 4096 bf16, a pool of 128
    slots. On CPU: 16 rank-16 adapters over 16 tokens of a K = N = 128 fp32 layer."""
    if device.type == "cuda":
        return [MultiCase(32, 4096, 4096, 32, UNIFORM, 128, "bf16")]
    return [MultiCase(16, 128, 128, 16, UNIFORM, 16, "fp32")]


def layer_cases(device: torch.device, quick: bool = False, headline: bool = False) -> list[MultiCase]:
    if headline:
        return headline_layer_cases(device)
    return gpu_layer_cases(quick) if device.type == "cuda" else cpu_layer_cases(quick)


def layer_contender_names(case: MultiCase, backend: str) -> list[str]:
    """The contenders of a case; the forced paths exist on the Triton backend only, and ``fused`` is meant for
    decode batches (it is timed up to four times the size where ``auto`` stops choosing it)."""
    names = [BASE_ONLY, PEFT_MIXED, MULTI]
    if backend == "triton":
        if case.T <= 4 * MULTI_FUSED_MAX_TOKENS:
            names.append(f"{MULTI} fused")
        names.append(f"{MULTI} segmented")
    return names


@dataclasses.dataclass
class MultiInputs:
    """One set of inputs shared by every contender of a layer case."""

    x: torch.Tensor  # [T, K]
    weight: torch.Tensor  # [N, K]
    bias: torch.Tensor  # [N]
    a_pool: torch.Tensor  # [slots, r_max, K]
    b_pool: torch.Tensor  # [slots, N, r_max]
    slot_ranks: list[int]  # [slots]
    scaling: float  # every adapter's lora_alpha / r
    batch_slots: list[int]  # [D], the slots the batch uses
    token_slots: list[int]  # [T]
    meta: BatchMeta


def make_multi_inputs(case: MultiCase, device: torch.device, seed: int = 0) -> MultiInputs:
    """Random inputs scaled so outputs are O(1), with a LoRA term of the same order (``B`` is not zero). Every slot
    holds an adapter; the batch's ``D`` adapters are spread over the pool and take the rank mix in turn."""
    g = torch.Generator(device=device).manual_seed(seed)
    dtype = case.torch_dtype

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * scale).to(dtype)

    mix = parse_ranks(case.ranks)
    batch_slots = spread(case.adapters, case.slots)
    slot_ranks = [mix[s % len(mix)] for s in range(case.slots)]
    for i, s in enumerate(batch_slots):
        slot_ranks[s] = mix[i % len(mix)]
    r_max = max(mix)
    a_pool = torch.zeros(case.slots, r_max, case.K, device=device, dtype=dtype)
    b_pool = torch.zeros(case.slots, case.N, r_max, device=device, dtype=dtype)
    for s, r in enumerate(slot_ranks):
        a_pool[s, :r] = randn(r, case.K, scale=case.K**-0.5)
        b_pool[s, :, :r] = randn(case.N, r, scale=r**-0.5)
    token_slots = [batch_slots[i] for i in shuffled_assignment(case.T, case.adapters, seed)]
    scaling = 2.0  # lora_alpha = 2·r, a common choice
    meta = BatchMeta.build(token_slots, slot_ranks, [scaling] * case.slots, device=device)
    return MultiInputs(
        x=randn(case.T, case.K), weight=randn(case.N, case.K, scale=case.K**-0.5), bias=randn(case.N), a_pool=a_pool,
        b_pool=b_pool, slot_ranks=slot_ranks, scaling=scaling, batch_slots=batch_slots, token_slots=token_slots,
        meta=meta,
    )  # fmt: skip


def peft_mixed_linear(inputs: MultiInputs) -> tuple[nn.Module, list[str]]:
    """A real PEFT ``lora.Linear`` around an ``nn.Linear`` holding ``W0`` and the bias (storage shared), with one
    named adapter per slot the batch uses (``"slot<s>"``: that slot's weights, copied, in the pool's dtype), in eval
    mode; and the ``adapter_names`` of the tokens."""
    import peft
    from peft.tuners.lora.layer import Linear as PeftLinear

    N, K = inputs.weight.shape
    base = nn.Linear(K, N, device="meta")
    base.weight = nn.Parameter(inputs.weight, requires_grad=False)
    base.bias = nn.Parameter(inputs.bias, requires_grad=False)
    layer = None
    for s in inputs.batch_slots:
        r, name = inputs.slot_ranks[s], f"slot{s}"
        alpha = inputs.scaling * r
        config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0)
        if layer is None:
            layer = PeftLinear(base, name, config=config, r=r, lora_alpha=alpha)
        else:
            layer.update_layer(name, r, lora_alpha=alpha, config=config)
        layer.lora_A[name].weight = nn.Parameter(inputs.a_pool[s, :r].clone(), requires_grad=False)
        layer.lora_B[name].weight = nn.Parameter(inputs.b_pool[s, :, :r].clone(), requires_grad=False)
        if layer.scaling[name] != inputs.scaling:
            raise AssertionError(f"PEFT's scaling {layer.scaling[name]} != {inputs.scaling}")
    return layer.eval(), [f"slot{s}" for s in inputs.token_slots]


def layer_contenders(case: MultiCase, inputs: MultiInputs, backend: str) -> dict[str, Callable[[], torch.Tensor]]:
    """Name -> the callable to time (one inference forward, returns ``y [T, N]``)."""
    x, w, b = inputs.x, inputs.weight, inputs.bias
    out: dict[str, Callable[[], torch.Tensor]] = {}
    for name in layer_contender_names(case, backend):
        if name == BASE_ONLY:
            fn = functools.partial(F.linear, x, w, b)
        elif name == PEFT_MIXED:
            layer, names = peft_mixed_linear(inputs)
            fn = functools.partial(layer, x, adapter_names=names)
        else:
            impl = name.removeprefix(MULTI).strip() or "auto"
            fn = functools.partial(
                multi_lora_linear, x, w, b, inputs.a_pool, inputs.b_pool, inputs.meta, backend=backend, impl=impl
            )
        out[name] = without_grad(fn)
    return out


def check_layer_agreement(case: MultiCase, contenders: dict[str, Callable[[], torch.Tensor]]) -> None:
    """Every fastlora path must match PEFT's mixed batch on the same inputs; raises ``BenchmarkMismatch``. PEFT
    rounds in the case's dtype as fastlora does, so both errors are allowed."""
    want = contenders[PEFT_MIXED]()
    for name, fn in contenders.items():
        if name.startswith(MULTI):
            what = f"{name} != {PEFT_MIXED} for {case.label}"
            assert_close(fn(), want, case.torch_dtype, case.reduce_len, what, want_dtype=case.torch_dtype)


def _layer_rows(case: MultiCase, timings: dict[str, tuple[float, float, float]]) -> list[dict]:
    base, peft = timings[BASE_ONLY][0], timings[PEFT_MIXED][0]
    return [
        {
            "contender": name,
            **dataclasses.asdict(case),
            "phase": case.phase,
            "shape": case.shape,
            "median_ms": median,
            "p20_ms": p20,
            "p80_ms": p80,
            "tokens_per_s": case.T / (median * 1e-3),
            "ratio_to_base": median / base,
            "speedup_over_peft": peft / median,
        }
        for name, (median, p20, p80) in timings.items()
    ]


def measure_layer_case(case: MultiCase, device: torch.device, backend: str, min_run_time: float) -> list[dict]:
    inputs = make_multi_inputs(case, device)
    contenders = layer_contenders(case, inputs, backend)
    check_layer_agreement(case, contenders)
    return _layer_rows(case, {name: time_ms(fn, device, min_run_time) for name, fn in contenders.items()})


def layer_suite(
    device: torch.device, quick: bool = False, progress_bar: bool = False, headline: bool = False
) -> list[dict]:
    """Every layer case; one row per (case, contender)."""
    backend = bench_backend(device)
    rows = []
    with forced_backend(backend), cpu_threads(device, 1):
        for case in progress(layer_cases(device, quick, headline), "multi layer", progress_bar):
            rows.extend(measure_layer_case(case, device, backend, 0.05 if quick else 0.5))
            free_memory(device)
    return rows


# ----------------------------------------------------------------------------------------------- report


def layer_markdown(rows: list[dict]) -> list[str]:
    """A line per case: median ms per contender, then fastlora's ratio to the base GEMM and speedup over PEFT."""
    intro = (
        "One projection, inference: median ms per call (20/80% quantiles in results.json); D distinct adapters among "
        "T tokens in shuffled order, the rank mix cycled over them, a pool of `slots` adapters. fastlora / base is "
        f"`{MULTI}` (auto) over `{BASE_ONLY}` (the base GEMM alone; target ≤ {TARGET_RATIO}× at 32 rank-16 adapters "
        "in 32 tokens); speedup over PEFT is PEFT's mixed-batch time over fastlora's."
    )
    fields = ["T", "K", "N", "adapters", "ranks", "slots", "dtype"]
    contenders = list(dict.fromkeys(row["contender"] for row in rows))
    header = ["T", "K", "N", "D", "ranks", "slots", "dtype", *(f"{name} (ms)" for name in contenders),
              "fastlora / base", "speedup over PEFT"]  # fmt: skip
    table = []
    for key, cells in by_case(rows, fields).items():
        ours = cells.get(MULTI)
        times = [f"{cells[name]['median_ms']:.4g}" if name in cells else "" for name in contenders]
        figures = ["", ""] if ours is None else [fmt_ratio(ours["ratio_to_base"]), fmt_ratio(ours["speedup_over_peft"])]
        table.append([*map(str, key), *times, *figures])
    return ["### layer", "", intro, "", *md_table(header, table), "", f"![multi-adapter layer]({PLOT})"]


def layer_plots(rows: list[dict], out_dir: Path) -> list[Path]:
    """fastlora's layer time over the base GEMM (top) and its speedup over PEFT (bottom) against distinct adapters
    D: a panel per rank mix, a line per token count, at the pool size most cases use."""
    ours = [row for row in rows if row["contender"] == MULTI]
    if not ours:
        return []
    slots = max({row["slots"] for row in ours}, key=lambda s: sum(row["slots"] == s for row in ours))
    ours = [row for row in ours if row["slots"] == slots]
    plt = pyplot()
    mixes = list(dict.fromkeys(row["ranks"] for row in ours))
    fig, axes = plt.subplots(2, len(mixes), figsize=(4.8 * len(mixes), 6.4), squeeze=False, sharex=True)
    for j, ranks in enumerate(mixes):
        panel = [row for row in ours if row["ranks"] == ranks]
        for T, marker in zip(sorted({row["T"] for row in panel}), itertools.cycle("os^Dvp")):
            line = sorted((row["adapters"], row["ratio_to_base"], row["speedup_over_peft"]) for row in panel
                          if row["T"] == T)  # fmt: skip
            D, ratio, speedup = zip(*line)
            axes[0][j].plot(D, ratio, marker=marker, label=f"T={T}")
            axes[1][j].plot(D, speedup, marker=marker, label=f"T={T}")
        axes[0][j].axhline(TARGET_RATIO, color="tab:red", linewidth=0.8, linestyle="--", label=f"{TARGET_RATIO}×")
        axes[0][j].axhline(1.0, color="grey", linewidth=0.8)
        axes[1][j].axhline(1.0, color="grey", linewidth=0.8)
        axes[0][j].set_title(f"ranks {ranks}, {slots} slots, {panel[0]['dtype']}, K={panel[0]['K']} N={panel[0]['N']}",
                             fontsize=9)  # fmt: skip
        axes[1][j].set_xlabel("distinct adapters D in the batch")
        for ax in axes[:, j]:
            ax.set_xscale("log", base=2)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
    axes[0][0].set_ylabel("layer time / base GEMM")
    axes[1][0].set_ylabel("speedup over PEFT mixed batch (×)")
    fig.suptitle(plot_title("fastlora multi_lora_linear", rows), fontsize=11)
    fig.tight_layout()
    return [save_plot(fig, out_dir / PLOT)]


LEVEL = Suite("layer", layer_suite, layer_markdown, layer_plots, (PLOT,))
