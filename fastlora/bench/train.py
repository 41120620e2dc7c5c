"""The ``train`` suite: one training step of a Llama-style causal LM built from a config (no downloads), every linear
layer of the decoder adapted (PEFT's ``"all-linear"``: q/k/v/o and gate/up/down projections, not the head).

Contenders, each a fresh model built from the same seed (so the same base weights) with the same LoRA weights
(drawn from one seeded generator, ``lora_B`` non-zero so the adapters matter):

- ``PEFT``: ``peft.get_peft_model``;
- ``fastlora apply_lora``: ``fastlora.apply_lora`` with the same config;
- ``PEFT + fastlora.patch_peft``: the PEFT model, its LoRA layers patched to run fastlora's op.

One step is forward with labels (the model's cross-entropy loss), backward, ``AdamW.step()`` over the LoRA weights,
``zero_grad``. Before a contender is timed, its loss and the norm of its LoRA gradients, in eval mode (no dropout),
must match PEFT's (``reduction_lengths``). Reported: median step time with 20/80% quantiles, tokens per second
(``batch·seq`` over the median), the bytes of weights and optimizer state (``state_bytes``), and the peak memory of a
step above that (``peak_step_bytes``, measured as in ``fastlora.bench.common``). On CUDA, sizes whose rough memory
estimate does not fit the device are left out; a contender that runs out of memory anyway gets a row marked ``OOM``.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .common import (
    DTYPES,
    FASTLORA,
    PATCHED,
    Suite,
    assert_close,
    bench_backend,
    device_memory,
    fmt_bytes,
    fmt_ratio,
    forced_backend,
    free_memory,
    grouped_bars,
    md_table,
    peak_memory_bytes,
    plot_title,
    progress,
    pyplot,
    save_plot,
    time_ms,
)
from .llama import (
    LLAMA_3B,
    LLAMA_8B,
    LLAMA_160M,
    SMALL,
    TINY,
    TINYLLAMA_1B,
    LlamaCase,
    build_llama,
    quiet_peft,
    random_ids,
)

PEFT_MODEL = "PEFT"
APPLY_LORA = f"{FASTLORA} apply_lora"
CONTENDERS = (PEFT_MODEL, APPLY_LORA, PATCHED)
PLOT = "train_throughput.png"


@dataclasses.dataclass(frozen=True)
class TrainCase(LlamaCase):
    """A Llama-style model (the fields of ``LlamaCase``), the batch, the LoRA rank, the dtype of the model and the
    dropout."""

    batch: int
    seq: int
    r: int
    dtype: str
    dropout: float

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    @property
    def positions(self) -> int:
        return self.seq

    @property
    def shape(self) -> str:
        return f"hidden={self.hidden} layers={self.layers} batch={self.batch}x{self.seq} r={self.r}"

    @property
    def label(self) -> str:
        return f"{self.size}-b{self.batch}x{self.seq}-r{self.r}-{self.dtype}-p{self.dropout}"

    def config(self):
        config = super().config()
        config.use_cache = False  # a training step keeps no KV cache
        return config


# (*model, batch, seq)
GPU_SIZES = ((*LLAMA_160M, 8, 1024), (*TINYLLAMA_1B, 4, 1024), (*LLAMA_3B, 2, 1024), (*LLAMA_8B, 1, 1024))
CPU_SIZES = ((*TINY, 2, 64), (*SMALL, 2, 128))


def reduction_lengths(case: TrainCase) -> dict[str, int]:
    """What the agreement check allows for each figure it compares: the loss is computed from the logits (the model's
    ``reduce_len``); the LoRA gradients also sum over every token of the batch."""
    return {"loss": case.reduce_len, "lora grad norm": case.reduce_len + case.tokens}


def estimated_bytes(case: TrainCase) -> int:
    """A generous estimate of a step's memory for the hungriest contender (PEFT, which keeps fp32 and dropped copies
    of every adapted module's input): weights, per-layer activations, fp32 logits with their gradient."""
    h, f, L, V = case.hidden, case.intermediate, case.layers, case.vocab
    params = V * h * 2 + L * (2 * h * h + 2 * h * h * case.kv_heads // case.heads + 3 * h * f)
    item = DTYPES[case.dtype].itemsize
    activations = case.tokens * L * (48 * h + 16 * f) * item
    return params * item + activations + 3 * case.tokens * V * 4


def fit_batch(case: TrainCase, total: int | None) -> TrainCase | None:
    """``case`` with its batch halved until the step's estimate fits 80% of ``total`` bytes of device memory (None:
    no limit), or None when even one sequence does not fit."""
    while total is not None and estimated_bytes(case) > 0.8 * total:
        if case.batch == 1:
            return None
        case = dataclasses.replace(case, batch=case.batch // 2)
    return case


def headline_train_cases(device: torch.device, quick: bool = False) -> list[TrainCase]:
    """The case of targets P4 and P5: one step of the ≈1.1B shape (TinyLlama's) over sequences of 2048 tokens,
    every decoder linear layer adapted at r = 16 with dropout 0.05, bf16, the batch cut down to fit (4 sequences
    on an 80 GB or larger device; quick: 1). On CPU the tiny model, fp32."""
    if device.type == "cuda":
        case = TrainCase(*TINYLLAMA_1B, 1 if quick else 4, 2048, 16, "bf16", 0.05)
    else:
        case = TrainCase(*TINY, 2, 64, 8, "fp32", 0.05)
    fitted = fit_batch(case, device_memory(device))
    return [] if fitted is None else [fitted]


def train_cases(device: torch.device, quick: bool = False, headline: bool = False) -> list[TrainCase]:
    """On CUDA: 160M to 8B-parameter shapes in bf16, r = 16, dropout 0 and 0.1, with the batch cut down to fit the
    device's memory (sizes where one sequence does not fit are left out). On CPU: two tiny fp32 models. Quick: the
    smallest size, dropout 0.1. Headline (quick or not): ``headline_train_cases``."""
    if headline:
        return headline_train_cases(device, quick)
    gpu = device.type == "cuda"
    sizes, dtype = (GPU_SIZES, "bf16") if gpu else (CPU_SIZES, "fp32")
    if quick:
        size, h, L, nh, kv, f, V, b, s = sizes[0]
        cases = [TrainCase(size, h, L, nh, kv, f, V, b, s if not gpu else 512, 16 if gpu else 8, dtype, 0.1)]
    else:
        cases = [TrainCase(*size, 16 if gpu else 8, dtype, p) for size, p in itertools.product(sizes, (0.0, 0.1))]
    total = device_memory(device)
    return [fitted for case in cases if (fitted := fit_batch(case, total)) is not None]


def build_model(case: TrainCase, contender: str, device: torch.device) -> nn.Module:
    """A fresh model for ``contender``: base weights from seed 0 built in the case's dtype on ``device``, every
    decoder linear layer adapted (LoRA weights fp32, as PEFT and ``LoraLinear`` keep them for half precision), and
    its LoRA weights set by ``_set_lora_weights``. In training mode."""
    import peft

    from ..config import LoraConfig
    from ..model import apply_lora
    from ..peft_compat import patch_peft

    model = build_llama(case, device)
    alpha = 2 * case.r
    if contender == APPLY_LORA:
        apply_lora(
            model, LoraConfig(r=case.r, lora_alpha=alpha, lora_dropout=case.dropout, target_modules="all-linear")
        )
    else:
        cfg = peft.LoraConfig(r=case.r, lora_alpha=alpha, lora_dropout=case.dropout, target_modules="all-linear")
        with quiet_peft():
            model = peft.get_peft_model(model, cfg)
        if contender == PATCHED:
            patch_peft(model)
    _set_lora_weights(model)
    return model.train()


def lora_weights(model: nn.Module) -> list[tuple[nn.Parameter, nn.Parameter]]:
    """``(lora_A, lora_B)`` of every adapted layer, in module order (the same order for PEFT and fastlora)."""
    from peft.tuners.lora.layer import Linear as PeftLinear

    from ..layers import LoraLinear

    pairs = []
    for module in model.modules():
        if isinstance(module, LoraLinear):
            pairs.append((module.lora_A, module.lora_B))
        elif isinstance(module, PeftLinear):
            pairs.append((module.lora_A["default"].weight, module.lora_B["default"].weight))
    return pairs


@torch.no_grad()
def _set_lora_weights(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)  # on CPU: the same draw on every device
    for A, B in lora_weights(model):
        r, K = A.shape
        A.copy_(torch.randn(A.shape, generator=g) * K**-0.5)
        B.copy_(torch.randn(B.shape, generator=g) * r**-0.5 * 0.1)


def optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)


def make_batch(case: TrainCase, device: torch.device) -> torch.Tensor:
    return random_ids(case, case.batch, case.seq, device)


def make_step(model: nn.Module, opt: torch.optim.Optimizer, batch: torch.Tensor) -> Callable[[], torch.Tensor]:
    def step() -> torch.Tensor:
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def reference_values(model: nn.Module, batch: torch.Tensor) -> dict[str, torch.Tensor]:
    """Loss and LoRA-gradient norm in eval mode (dropout off), gradients cleared after."""
    model.eval()
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    grads = [p.grad.float() for pair in lora_weights(model) for p in pair]
    out = {
        "loss": loss.detach().float(),
        "lora grad norm": torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])),
    }
    model.zero_grad(set_to_none=True)
    model.train()
    return out


def check_train_agreement(case: TrainCase, name: str, got: dict, expected: dict) -> None:
    """``got`` (``reference_values`` of contender ``name``) must match PEFT's ``expected``, both computed in the
    case's dtype; raises ``BenchmarkMismatch`` otherwise."""
    dtype = case.torch_dtype
    for key, want in expected.items():
        what = f"{name} != {PEFT_MODEL} in {key} for {case.label}"
        assert_close(got[key], want, dtype, reduction_lengths(case)[key], what, want_dtype=dtype)


def _state_bytes(model: nn.Module, opt: torch.optim.Optimizer) -> int:
    tensors = list(model.parameters()) + [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def _row(case: TrainCase, name: str, params: int | None, **figures) -> dict:
    return {"suite": "train", "contender": name, **dataclasses.asdict(case), "shape": case.shape,
            "tokens": case.tokens, "params": params, **figures}  # fmt: skip


def measure_steps(
    case,
    contenders: tuple[str, ...],
    build: Callable[[str], nn.Module],
    batch: torch.Tensor,
    reference: Callable[[nn.Module, torch.Tensor], dict],
    check: Callable[..., None],
    row: Callable[..., dict],
    device: torch.device,
    min_run_time: float,
) -> list[dict]:
    """Every contender in turn (one model in memory at a time): ``build(name)``, its ``reference(model, batch)``
    values checked (``check(case, name, got, expected)``) against the first contender's, PEFT's, then its optimizer
    step on ``batch`` timed and its peak measured. Rows are ``row(name, params, **figures)``, with the speedup and the
    peak over PEFT's added."""
    rows, expected = [], None
    for name in contenders:
        model = opt = step = got = None
        try:
            model = build(name)
            got = reference(model, batch)
            expected = expected or got
            check(case, name, got, expected)
            opt = optimizer(model)
            step = make_step(model, opt, batch)
            median, p20, p80 = time_ms(step, device, min_run_time)
            peak = peak_memory_bytes(step, device)
            rows.append(row(
                name, sum(p.numel() for p in model.parameters()), status="ok", median_ms=median, p20_ms=p20,
                p80_ms=p80, tokens_per_s=case.tokens / (median * 1e-3), state_bytes=_state_bytes(model, opt),
                peak_step_bytes=peak,
            ))  # fmt: skip
        except torch.OutOfMemoryError:
            rows.append(row(name, None, status="OOM"))
        finally:
            # The step closure holds the model and the optimizer state: drop every reference before the next model.
            model = opt = step = got = None
            free_memory(device)
    peft = next((row for row in rows if row["contender"] == PEFT_MODEL and row["status"] == "ok"), None)
    for row in rows:
        ok = peft is not None and row["status"] == "ok"
        row["speedup_over_peft"] = peft["median_ms"] / row["median_ms"] if ok else None
        row["peak_over_peft"] = row["peak_step_bytes"] / peft["peak_step_bytes"] if ok else None
    return rows


def measure_case(case: TrainCase, device: torch.device, min_run_time: float) -> list[dict]:
    """Every contender in turn: checked against PEFT, timed, its peak measured (``measure_steps``)."""
    return measure_steps(case, CONTENDERS, lambda name: build_model(case, name, device), make_batch(case, device),
                         reference_values, check_train_agreement, functools.partial(_row, case), device,
                         min_run_time)  # fmt: skip


def train_suite(
    device: torch.device, quick: bool = False, progress_bar: bool = False, headline: bool = False
) -> list[dict]:
    min_run_time = 0.2 if quick else 2.0
    rows = []
    with forced_backend(bench_backend(device)):
        for case in progress(train_cases(device, quick, headline), "train", progress_bar):
            rows.extend(measure_case(case, device, min_run_time))
    return rows


# ----------------------------------------------------------------------------------------------- report


STEP_HEADER = ["step (ms)", "tokens/s", "speedup over PEFT", "weights + optimizer", "peak step", "peak / PEFT"]


def step_cells(row: dict) -> list[str]:
    """A train-step row's figures, as the cells under ``STEP_HEADER`` (its status alone when it did not run)."""
    if row["status"] != "ok":
        return [row["status"], "", "", "", "", ""]
    return [f"{row['median_ms']:.4g}", f"{row['tokens_per_s']:.4g}", fmt_ratio(row["speedup_over_peft"]),
            fmt_bytes(row["state_bytes"]), fmt_bytes(row["peak_step_bytes"]), fmt_ratio(row["peak_over_peft"])]  # fmt: skip


def train_markdown(rows: list[dict]) -> list[str]:
    lines = [
        "One optimizer step (forward with loss, backward, AdamW step, zero_grad) of a Llama-style model built from a "
        "config, every decoder linear layer adapted. Median step time (20/80% quantiles in results.json), tokens per "
        "second, the weights and optimizer state, and the peak memory of a step above them.",
    ]
    header = ["size", "params", "batch×seq", "r", "dtype", "dropout", "contender", *STEP_HEADER]
    table = [
        [row["size"], f"{row['params'] / 1e6:.1f}M" if row["params"] else "", f"{row['batch']}×{row['seq']}",
         row["r"], row["dtype"], row["dropout"], row["contender"], *step_cells(row)]
        for row in rows
    ]  # fmt: skip
    return [*lines, "", *md_table(header, table), "", f"![train throughput]({PLOT})"]


def step_plots(
    rows: list[dict], out_dir: Path, fields: tuple[str, ...], label: Callable[..., str], what: str, file: str
) -> list[Path]:
    """Tokens per second (left) and peak step memory (right), a group of bars per case (its ``fields``, labelled
    ``label(*values)``) and a bar per contender, titled with ``what``, saved as ``file``."""
    ok = [row for row in rows if row["status"] == "ok"]
    if not ok:
        return []
    plt = pyplot()
    contenders = list(dict.fromkeys(row["contender"] for row in rows))
    cases = list(dict.fromkeys(tuple(row[f] for f in fields) for row in rows))
    value = {(tuple(row[f] for f in fields), row["contender"]): row for row in ok}
    fig, axes = plt.subplots(1, 2, figsize=(max(9.0, 2.4 * len(cases) + 3), 4.2))
    for ax, key, scale, title in ((axes[0], "tokens_per_s", 1e3, "thousand tokens / s (higher is better)"),
                                  (axes[1], "peak_step_bytes", 2**20, "peak step memory, MiB")):  # fmt: skip
        grouped_bars(ax, cases, contenders, {pair: row[key] / scale for pair, row in value.items()})
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels([label(*case) for case in cases], fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(plot_title(what, rows), fontsize=11)
    fig.tight_layout()
    return [save_plot(fig, out_dir / file)]


def train_plots(rows: list[dict], out_dir: Path) -> list[Path]:
    """Tokens per second (left) and peak step memory (right) per model size and dropout, a bar per contender."""
    return step_plots(rows, out_dir, ("size", "dropout"), lambda size, p: f"{size}\np={p}",
                      "one training step, Llama-style models", PLOT)  # fmt: skip


SUITE = Suite("train", train_suite, train_markdown, train_plots, (PLOT,))
