"""The model level of the ``multi`` suite: a whole model serving a batch whose rows use different adapters.

A case (``MultiModelCase``) is a Llama-style causal LM built from a config (``fastlora.bench.llama``, no downloads),
q/k/v/o and gate/up/down projections adapted, ``batch`` rows each using one of ``D`` distinct adapters (shuffled rows,
every adapter at least one row; see ``fastlora.bench.multi_batch``). ``mode`` is ``forward`` (one forward of ``batch
× seq`` tokens, no KV cache: prefill) or ``generate`` (greedy ``generate`` of exactly ``new_tokens`` tokens per row
after a ``seq``-token prompt, KV cache on; the prefill is inside the timed call). Contenders: the base model alone
(the same weights, no adapters), PEFT's mixed batch (``get_peft_model`` and ``add_adapter`` for the batch's adapters,
called with ``adapter_names=``; PEFT keeps them in fp32 for a bf16 model, as it does by default) and
``fastlora.serving.MultiLoraModel`` (its pool in the model's dtype, its default) with ``registered`` adapters
registered and resident in as many slots. The ``registered`` sweep times ``MultiLoraModel`` alone, on a fixed batch,
with more and more adapters registered: its throughput should not depend on how many adapters the pool holds.

Tokens per second count the tokens a call computes (``batch × seq`` for a forward) or generates (``batch ×
new_tokens`` for ``generate``). Before a case is timed, the logits of ``MultiLoraModel``'s forward of the batch must
match PEFT's (``BenchmarkMismatch`` otherwise). On CPU the model is tiny and fp32 on the torch backend, on one
thread: the rows prove the level runs, nothing more.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..serving import MultiLoraModel
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
MULTI_MODEL = f"{FASTLORA} MultiLoraModel"
MODEL_CONTENDERS = (BASE_MODEL, PEFT_MIXED, MULTI_MODEL)
SWEEPS = ("contenders", "registered")
MODES = ("forward", "generate")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Throughput from the fewest to the most registered adapters: within 5%.
REGISTERED_SPREAD = 0.05
PLOT = "multi_model.png"


@dataclasses.dataclass(frozen=True)
class MultiModelCase(LlamaCase):
    """A Llama-style model (the fields of ``LlamaCase``), ``mode`` (``forward`` or ``generate``), ``batch`` rows of
    ``seq`` prompt tokens (``new_tokens`` generated per row), ``adapters`` distinct adapters among the rows, their
    rank mix, ``registered`` adapters in the pool (all resident), the model's dtype, and ``sweep``: ``contenders``
    (base, PEFT and fastlora) or ``registered`` (fastlora alone, one point of the registered-adapters sweep)."""

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
        if (self.mode == "generate") != (self.new_tokens > 0):
            raise ValueError("MultiModelCase: new_tokens > 0 for generate, 0 for forward")

    @property
    def tokens(self) -> int:
        """The tokens a call produces: the batch's for a forward, the generated ones for ``generate``."""
        return self.batch * (self.new_tokens if self.mode == "generate" else self.seq)

    @property
    def positions(self) -> int:
        return self.seq + self.new_tokens

    @property
    def shape(self) -> str:
        new = f"+{self.new_tokens}" if self.mode == "generate" else ""
        return (f"hidden={self.hidden} layers={self.layers} {self.mode} {self.batch}x{self.seq}{new} "
                f"D={self.adapters} r={self.ranks} registered={self.registered}")  # fmt: skip

    @property
    def label(self) -> str:
        return (f"{self.size}-{self.mode}-b{self.batch}x{self.seq}+{self.new_tokens}-D{self.adapters}-"
                f"r{self.ranks.replace(',', '_')}-R{self.registered}-{self.dtype}-{self.sweep}")  # fmt: skip


def gpu_model_cases(quick: bool = False) -> list[MultiModelCase]:
    """bf16, mixed ranks, 32 slots: decode (``generate`` of 32 tokens for 32 rows of a 128-token prompt) with 1, 8
    and 32 distinct adapters, and a prefill of 8 × 512 tokens with 8 adapters, for the 160M and 1.1B shapes; then the
    160M decode batch with 8 rank-16 adapters while 8 to 512 adapters are registered. Quick: the 160M decode with 8
    adapters, and 8 and 128 registered."""

    def compare(model, mode, batch, seq, new, D):
        return MultiModelCase(*model, mode, batch, seq, new, D, MIXED, 32, "bf16", "contenders")

    def registered(R):
        return MultiModelCase(*LLAMA_160M, "generate", 32, 128, 32, 8, UNIFORM, R, "bf16", "registered")

    if quick:
        return [compare(LLAMA_160M, "generate", 32, 128, 32, 8), registered(8), registered(128)]
    models = (LLAMA_160M, TINYLLAMA_1B)
    cases = [compare(model, "generate", 32, 128, 32, D) for model in models for D in (1, 8, 32)]
    cases += [compare(model, "forward", 8, 512, 0, 8) for model in models]
    return cases + [registered(R) for R in (8, 32, 128, 512)]


def cpu_model_cases(quick: bool = False) -> list[MultiModelCase]:
    """A tiny fp32 Llama (2 layers, hidden 64): a short ``generate`` and a forward with mixed ranks, and 4 to 16
    registered adapters."""

    def compare(mode, seq, new, D):
        return MultiModelCase(*TINY, mode, 4, seq, new, D, MIXED, 4, "fp32", "contenders")

    def registered(R):
        return MultiModelCase(*TINY, "generate", 4, 8, 4, 2, UNIFORM, R, "fp32", "registered")

    if quick:
        return [compare("generate", 8, 4, 4), compare("forward", 16, 0, 4), registered(4), registered(16)]
    return (
        [compare("generate", 8, 4, D) for D in (1, 2, 4)]
        + [compare("forward", 64, 0, 4)]
        + [registered(R) for R in (4, 16, 64)]
    )


def headline_model_cases(device: torch.device, quick: bool = False) -> list[MultiModelCase]:
    """The cases of targets P7 and P8. P8: ``generate`` of 32 tokens for 32 rows of a 128-token prompt on the ≈1.1B
    shape, every row its own adapter (32 distinct, mixed ranks 8–64), against the base model. P7: the 160M decode
    batch with 8 rank-16 adapters while 8 and then 512 adapters are registered. Quick: the 160M shape for P8, 8 and
    128 registered for P7. On CPU the tiny model, 4 and 64 registered."""
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
    """The contenders timed: base model, PEFT's mixed batch and fastlora (fastlora alone on the registered sweep).
    Headline runs leave PEFT's timing out (its mixed-batch ``generate`` is the slowest call, and no target reads it);
    fastlora is still checked against PEFT's logits."""
    if case.sweep != "contenders":
        return [MULTI_MODEL]
    return [name for name in MODEL_CONTENDERS if not (headline and name == PEFT_MIXED)]


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
    """A fresh model for ``contender``, in eval mode: the base model; PEFT with the batch's adapters; or a
    ``MultiLoraModel`` with ``registered`` adapters registered and made resident (one slot each)."""
    import peft
    from peft import set_peft_model_state_dict

    model = build_llama(case, device).eval()
    shapes = target_shapes(model)
    if contender == BASE_MODEL:
        return model
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
    mm = MultiLoraModel(model, list(TARGETS), max_adapters=case.registered, max_rank=max(parse_ranks(case.ranks)))
    for name in names:
        mm.load_adapter(name, adapter_state_dict(case, shapes, name), config=adapter_config(case, name))
    mm.pool.acquire(names).release()  # every registered adapter resident: the pool is as full as it gets
    return mm


def make_ids(case: MultiModelCase, device: torch.device) -> torch.Tensor:
    """The prompt of every row; ids from 3 up, so that no prompt holds a special token (pad 0, BOS 1, EOS 2)."""
    return random_ids(case, case.batch, case.seq, device, low=3)


def _call_kwargs(case: MultiModelCase, contender: str) -> dict:
    return {} if contender == BASE_MODEL else {"adapter_names": row_adapters(case)}


@torch.no_grad()
def forward_logits(model, case: MultiModelCase, contender: str, ids: torch.Tensor) -> torch.Tensor:
    """The logits of one forward of the batch (each row with its adapter), for the agreement check."""
    return model(input_ids=ids, use_cache=False, **_call_kwargs(case, contender)).logits


def model_step(model, case: MultiModelCase, contender: str, ids: torch.Tensor) -> Callable[[], torch.Tensor]:
    """The timed call: one forward of the batch, or a greedy ``generate`` of exactly ``new_tokens`` per row."""
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


def check_model_agreement(case: MultiModelCase, got: torch.Tensor, want: torch.Tensor) -> None:
    """``MultiLoraModel``'s logits must match PEFT's mixed batch on the same rows; raises ``BenchmarkMismatch``. Both
    run the model in its dtype, so both errors are allowed, over the model's reduction length."""
    what = f"{MULTI_MODEL} != {PEFT_MIXED} in logits for {case.label}"
    assert_close(got, want, case.torch_dtype, case.reduce_len, what, want_dtype=case.torch_dtype)


def peft_reference(case: MultiModelCase, device: torch.device, ids: torch.Tensor) -> torch.Tensor:
    model = build_model(case, PEFT_MIXED, device)
    logits = forward_logits(model, case, PEFT_MIXED, ids)
    del model
    free_memory(device)
    return logits


def measure_model_case(
    case: MultiModelCase, device: torch.device, min_run_time: float, headline: bool = False
) -> list[dict]:
    """Every contender in turn (one model in memory at a time); fastlora checked against PEFT before it is timed.
    Headline runs time 5 calls at least (a ``generate`` of the 1.1B shape takes about a second), not 10."""
    ids = make_ids(case, device)
    want = peft_reference(case, device, ids)
    rows = []
    for name in model_contender_names(case, headline):
        model = build_model(case, name, device)
        if name == MULTI_MODEL:
            check_model_agreement(case, forward_logits(model, case, name, ids), want)
        step = model_step(model, case, name, ids)
        median, p20, p80 = time_ms(step, device, min_run_time, min_reps=5 if headline else 10)
        rows.append({
            "contender": name, **dataclasses.asdict(case), "shape": case.shape, "tokens": case.tokens,
            "median_ms": median, "p20_ms": p20, "p80_ms": p80, "tokens_per_s": case.tokens / (median * 1e-3),
        })  # fmt: skip
        del model
        free_memory(device)
    times = {row["contender"]: row["median_ms"] for row in rows}
    for row in rows:
        row["ratio_to_base"] = row["median_ms"] / times[BASE_MODEL] if BASE_MODEL in times else None
        row["speedup_over_peft"] = times[PEFT_MIXED] / row["median_ms"] if PEFT_MIXED in times else None
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


def model_markdown(rows: list[dict]) -> list[str]:
    """Two tables: the contenders (tokens/s of each), the registered-adapters sweep (tokens/s and its ratio to the
    fewest registered)."""
    lines: list[str] = []
    fields = ["size", "mode", "batch", "seq", "new_tokens", "adapters", "ranks", "registered", "dtype"]
    compare = [row for row in rows if row["sweep"] == "contenders"]
    if compare:
        intro = (
            "A Llama-style model built from a config, inference: tokens/s of a forward (batch × seq tokens) or of "
            "`generate` (new tokens, prefill included). fastlora / base is its time over the base model's; speedup "
            "over PEFT is PEFT's mixed-batch time over fastlora's."
        )
        contenders = list(dict.fromkeys(row["contender"] for row in compare))
        header = ["size", "mode", "batch×seq", "new tokens", "D", "ranks", "registered", "dtype",
                  *(f"{name} (tokens/s)" for name in contenders), "fastlora / base (time)",
                  "speedup over PEFT"]  # fmt: skip
        table = []
        for key, cells in by_case(compare, fields).items():
            size, mode, batch, seq, new, *rest = key
            ours = cells.get(MULTI_MODEL)
            speeds = [f"{cells[name]['tokens_per_s']:.4g}" if name in cells else "" for name in contenders]
            figures = ["", ""] if ours is None else [fmt_ratio(ours["ratio_to_base"]),
                                                     fmt_ratio(ours["speedup_over_peft"])]  # fmt: skip
            table.append([size, mode, f"{batch}×{seq}", new, *rest, *speeds, *figures])
        lines += ["### model", "", intro, "", *md_table(header, table), ""]
    sweep = [row for row in rows if row["sweep"] == "registered"]
    if sweep:
        intro = (
            f"`{MULTI_MODEL}` on the same batch with more adapters registered and resident (target: within "
            f"{REGISTERED_SPREAD:.0%} of the fewest)."
        )
        header = ["size", "mode", "batch×seq", "new tokens", "D", "ranks", "registered", "dtype",
                  f"{MULTI_MODEL} (tokens/s)", "vs fewest registered"]  # fmt: skip
        table = [
            [row["size"], row["mode"], f"{row['batch']}×{row['seq']}", row["new_tokens"], row["adapters"],
             row["ranks"], row["registered"], row["dtype"], f"{row['tokens_per_s']:.4g}",
             fmt_ratio(row.get("throughput_vs_fewest_registered"))]
            for row in sweep
        ]  # fmt: skip
        lines += ["### registered adapters", "", intro, "", *md_table(header, table), ""]
    return [*lines, f"![MultiLoraModel throughput]({PLOT})"]


def model_plots(rows: list[dict], out_dir: Path) -> list[Path]:
    """Tokens/s per case, a bar per contender (left); the registered sweep's tokens/s against adapters registered,
    with the ±5% band around the fewest (right)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11.0, 4.4))
    compare = [row for row in rows if row["sweep"] == "contenders"]
    cases = list(dict.fromkeys(_sweep_key(row) for row in compare))
    contenders = list(dict.fromkeys(row["contender"] for row in compare))
    grouped_bars(axes[0], cases, contenders, {(_sweep_key(row), row["contender"]): row["tokens_per_s"] / 1e3
                                              for row in compare})  # fmt: skip
    axes[0].set_xticks(range(len(cases)))
    axes[0].set_xticklabels([f"{c[0]} {c[1]}\n{c[2]}×{c[3]} D={c[5]}" for c in cases], fontsize=7)
    axes[0].set_title("thousand tokens / s (higher is better)", fontsize=10)
    axes[0].grid(True, axis="y", alpha=0.3)
    if contenders:
        axes[0].legend(fontsize=8)
    sweep = [row for row in rows if row["sweep"] == "registered"]
    for key in dict.fromkeys(_sweep_key(row) for row in sweep):
        line = sorted((row["registered"], row["tokens_per_s"] / 1e3) for row in sweep if _sweep_key(row) == key)
        axes[1].plot(*zip(*line), marker="o", label=f"{key[0]} {key[1]} {key[2]}×{key[3]} D={key[5]}")
        first = line[0][1]
        axes[1].axhspan(first * (1 - REGISTERED_SPREAD), first * (1 + REGISTERED_SPREAD), color="grey", alpha=0.15)
    axes[1].set_xscale("log", base=2)
    axes[1].set_xlabel("adapters registered (all resident)")
    axes[1].set_title(f"{MULTI_MODEL}: thousand tokens / s", fontsize=10)
    axes[1].grid(True, alpha=0.3)
    if sweep:
        axes[1].legend(fontsize=7)
    fig.suptitle(plot_title("many adapters, Llama-style models", rows), fontsize=11)
    fig.tight_layout()
    return [save_plot(fig, out_dir / PLOT)]


LEVEL = Suite("model", model_suite, model_markdown, model_plots, (PLOT,))
