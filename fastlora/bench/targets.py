"""The README's performance targets, read from the rows of a headline run (``fastlora bench --headline``).

``TARGETS`` is the README's targets table as code: each ``Target`` names the suite whose headline rows it reads
(``select``), the figure it takes from each (``value``), how the figures of several cases combine (the worst: the
largest for an upper bound, the smallest for a lower one) and the bound. ``evaluate(rows)`` gives one ``Outcome`` per
target, and ``format_targets`` writes ``targets.md``: the table with the measured value, met or missed, and the case
that decided it. The serving targets (P7, P8) read ``MultiLoraModel`` with CUDA graphs, as it ships; P8 against the
base model with CUDA graphs, so that neither side's figure carries host time the other saves. The mixture-of-experts
targets (P11 to P13) read the ``moe`` suite's block level: both fastlora contenders (``apply_lora`` and ``patch_peft``),
each against PEFT's ``target_parameters`` and the frozen block of the same case. The QLoRA targets (P14 to P16) read
the ``qlora`` suite's layer level: ``fastlora QLoRA`` against bitsandbytes + PEFT (not measured, never passed or
failed, where bitsandbytes did not run) and against fastlora's LoRA layer over the bf16 weight. Rows measured on a CPU
give values (they prove the chain from rows to report works) but no verdict: their status says they are no GPU
figure.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from pathlib import Path

from .common import FASTLORA, PATCHED
from .moe import TARGET_PEAK_OVER_PEFT, TARGET_RATIO_TO_FROZEN, TARGET_SPEEDUP_OVER_PEFT
from .multi_layer import MULTI
from .multi_model import MULTI_MODEL
from .qlora import QLORA, TARGET_DECODE_RATIO_TO_LORA, TARGET_RATIO_TO_LORA, TARGET_SPEEDUP_OVER_BNB
from .train import APPLY_LORA

TARGETS_MD = "targets.md"
MET, MISSED, NOT_MEASURED, NOT_GPU = "met", "missed", "not measured", "not a GPU figure"
# Constant-size state kept for the backward that P3 does not count against 4·M·r: the int64 dropout seed.
SEED_BYTES = 8


@dataclasses.dataclass(frozen=True)
class Target:
    """One line of the README's targets table. ``select(row)`` picks the rows it reads (headline rows only are
    offered), ``value(row)`` is the figure of one row (None: the row has none), ``upper`` says whether ``bound`` is an
    upper (``value <= bound``) or a lower (``value >= bound``) one, ``strict`` that the bound itself misses (``<`` or
    ``>``); ``unit`` formats values."""

    id: str
    measure: str
    target: str
    select: Callable[[dict], bool]
    value: Callable[[dict], float | None]
    bound: float
    upper: bool
    unit: str = "×"
    strict: bool = False

    def worst(self, values: list[float]) -> float:
        return max(values) if self.upper else min(values)

    def met(self, value: float) -> bool:
        if value == self.bound:
            return not self.strict
        return value < self.bound if self.upper else value > self.bound

    def format(self, value: float) -> str:
        if self.unit == "%":
            return f"{value:.1f} %"
        if self.unit == "µs":
            return f"{value:.1f} µs"
        if self.unit == "·M·r B":
            return f"{value:.2f}·M·r B"
        if self.unit == "":
            return f"{value:g}"
        return f"{value:.3f}{self.unit}"


@dataclasses.dataclass(frozen=True)
class Outcome:
    target: Target
    value: float | None
    where: str
    status: str


def _linear_train(row: dict) -> bool:
    return row["suite"] == "linear" and row["mode"] == "fwd+bwd" and row["contender"] == FASTLORA


def _case(row: dict, *fields: str) -> str:
    return " ".join(f"{field}={row[field]}" for field in fields if field in row)


def _multi_model(row: dict, sweep: str) -> bool:
    """A row of ``MultiLoraModel`` with CUDA graphs (the shipping default) on the model level's ``sweep``: P7 reads
    its registered sweep, P8 its ``generate`` time over the base model's with CUDA graphs (``ratio_to_base_graphs``),
    not over the eager base model's (``ratio_to_base``)."""
    return (
        row["suite"] == "multi" and row.get("level") == "model" and row.get("sweep") == sweep
        and row["contender"] == MULTI_MODEL
    )  # fmt: skip


def _overhead(row: dict) -> bool:
    return row["suite"] == "overhead" and row["contender"] == FASTLORA and row["dropout"] > 0


def _moe_block(row: dict) -> bool:
    """A fastlora row of the ``moe`` suite's block level (LoRA on the experts' ``gate_up_proj`` and ``down_proj``)."""
    return row["suite"] == "moe" and row.get("level") == "block" and row["contender"] in (APPLY_LORA, PATCHED)


def _qlora_layer(row: dict, mode: str) -> bool:
    """A ``fastlora QLoRA`` row of the ``qlora`` suite's layer level in ``mode`` (``fwd+bwd`` or ``decode``)."""
    return row["suite"] == "qlora" and row.get("level") == "layer" and row["contender"] == QLORA and row["mode"] == mode


TARGETS: tuple[Target, ...] = (
    Target(
        "P1", "LoRA layer forward+backward / frozen `nn.Linear` forward+backward (W0 frozen, x needs grad), K = N = "
        "4096, M ≥ 4096, r ≤ 64", "≤ 1.10",
        _linear_train, lambda row: row["ratio_to_frozen"], 1.10, upper=True,
    ),
    Target(
        "P2", "speedup over PEFT `lora.Linear`, same cases, fp32 adapters", "≥ 1.5×",
        lambda row: _linear_train(row) and row.get("lora_dtype") == "fp32", lambda row: row["speedup_over_peft"], 1.5,
        upper=False,
    ),
    Target(
        "P2", "speedup over PEFT `lora.Linear`, same cases, bf16 adapters", "≥ 1.3×",
        lambda row: _linear_train(row) and row.get("lora_dtype") == "bf16", lambda row: row["speedup_over_peft"], 1.3,
        upper=False,
    ),
    Target(
        "P3", "bytes saved for the backward beyond x per adapted module, dropout > 0", "≤ 4·M·r",
        _overhead, lambda row: (row["saved_beyond_input_bytes"] - SEED_BYTES) / (row["M"] * row["r"]), 4.0,
        upper=True, unit="·M·r B",
    ),
    Target(
        "P4", "train step tokens/s, ≈ 1B Llama-style config, seq 2048, every linear adapted, dropout 0.05, against "
        "PEFT", "≥ 1.3×",
        lambda row: row["suite"] == "train" and row["contender"] in (APPLY_LORA, PATCHED),
        lambda row: row.get("speedup_over_peft"), 1.3, upper=False,
    ),
    Target(
        "P5", "peak memory of that step against PEFT", "≤ 0.8×",
        lambda row: row["suite"] == "train" and row["contender"] in (APPLY_LORA, PATCHED),
        lambda row: row.get("peak_over_peft"), 0.8, upper=True,
    ),
    Target(
        "P6", "multi-adapter layer, 32 distinct rank-16 adapters over 32 tokens / the base GEMM alone", "≤ 1.25×",
        lambda row: row["suite"] == "multi" and row.get("level") == "layer" and row["contender"] == MULTI,
        lambda row: row["ratio_to_base"], 1.25, upper=True,
    ),
    Target(
        "P7", "serving throughput from 8 to 512 registered adapters (`MultiLoraModel` with CUDA graphs)",
        "≤ 5 % drop",
        lambda row: _multi_model(row, "registered")
        and row["registered"] > row.get("fewest_registered", row["registered"]),
        lambda row: 100.0 * (1.0 - row["throughput_vs_fewest_registered"]), 5.0, upper=True, unit="%",
    ),
    Target(
        "P8", "mixed-adapter `generate` tokens/s / the base model's, both with CUDA graphs", "≥ 85 %",
        lambda row: _multi_model(row, "contenders") and row["mode"] == "generate",
        lambda row: 100.0 / row["ratio_to_base_graphs"] if row.get("ratio_to_base_graphs") else None, 85.0,
        upper=False, unit="%",
    ),
    Target(
        "P9", "kernel launches per training forward+backward with dropout (frozen layer: 2)", "≤ 6",
        _overhead, lambda row: row["launches"], 6, upper=True, unit="",
    ),
    Target(
        "P10", "host time per layer call in eager mode", "≤ 30 µs",
        _overhead, lambda row: row["host_us_fwd"], 30.0, upper=True, unit="µs",
    ),
    Target(
        "P11", "MoE block (router + experts) forward+backward, LoRA r = 16 on the experts' `gate_up_proj` and "
        "`down_proj`, bf16: speedup over PEFT `target_parameters`", f"≥ {TARGET_SPEEDUP_OVER_PEFT:g}×",
        _moe_block, lambda row: row.get("speedup_over_peft"), TARGET_SPEEDUP_OVER_PEFT, upper=False,
    ),
    Target(
        "P12", "peak memory of that forward+backward against PEFT's", f"≤ {TARGET_PEAK_OVER_PEFT}×",
        _moe_block, lambda row: row.get("peak_over_peft"), TARGET_PEAK_OVER_PEFT, upper=True,
    ),
    Target(
        "P13", "that forward+backward / the frozen block's (transformers' `grouped_mm` experts)",
        f"≤ {TARGET_RATIO_TO_FROZEN}×", _moe_block, lambda row: row.get("ratio_to_frozen"), TARGET_RATIO_TO_FROZEN,
        upper=True,
    ),
    Target(
        "P14", "QLoRA layer (NF4 base, double quantization) forward+backward, K = N = 4096, M = 4096, r = 16, fp32 "
        "adapters: speedup over bitsandbytes + PEFT", f"≥ {TARGET_SPEEDUP_OVER_BNB:g}×",
        lambda row: _qlora_layer(row, "fwd+bwd"), lambda row: row.get("speedup_over_peft"), TARGET_SPEEDUP_OVER_BNB,
        upper=False,
    ),
    Target(
        "P15", "that forward+backward / fastlora's LoRA layer over the bf16 weight", f"≤ {TARGET_RATIO_TO_LORA}×",
        lambda row: _qlora_layer(row, "fwd+bwd"), lambda row: row.get("ratio_to_lora"), TARGET_RATIO_TO_LORA,
        upper=True,
    ),
    Target(
        "P16", "QLoRA decode forward (M = 16, inference) / fastlora's LoRA layer over the bf16 weight",
        f"< {TARGET_DECODE_RATIO_TO_LORA:g}×", lambda row: _qlora_layer(row, "decode"),
        lambda row: row.get("ratio_to_lora"), TARGET_DECODE_RATIO_TO_LORA, upper=True, strict=True,
    ),
)  # fmt: skip

# Which fields name the case that decided each suite's target.
_CASE_FIELDS = {
    "linear": ("M", "K", "N", "r", "lora_dtype", "dropout"),
    "overhead": ("M", "K", "N", "r", "dropout"),
    "train": ("size", "batch", "seq", "r", "dropout", "contender"),
    "multi": ("size", "T", "K", "N", "adapters", "ranks", "registered", "batch", "new_tokens"),
    "moe": ("size", "experts", "top_k", "hidden", "intermediate", "tokens", "r", "contender"),
    "qlora": ("M", "K", "N", "r", "mode"),
}


def evaluate(rows: list[dict]) -> list[Outcome]:
    """One ``Outcome`` per target, from the headline rows among ``rows``: the worst value over the rows it reads, the
    case it came from, and ``met`` / ``missed`` (CUDA rows), ``not a GPU figure`` (CPU rows) or ``not measured``."""
    headline = [row for row in rows if row.get("headline")]
    outcomes = []
    for target in TARGETS:
        figures = [(value, row) for row in headline if target.select(row) and (value := target.value(row)) is not None]
        if not figures:
            outcomes.append(Outcome(target, None, "", NOT_MEASURED))
            continue
        value = target.worst([value for value, _ in figures])
        row = next(row for v, row in figures if v == value)
        where = _case(row, *_CASE_FIELDS.get(row["suite"], ()))
        status = (MET if target.met(value) else MISSED) if row.get("device_type") == "cuda" else NOT_GPU
        outcomes.append(Outcome(target, value, where, status))
    return outcomes


def format_targets(rows: list[dict], environment: list[str] | None = None) -> str:
    """``targets.md``: where the figures were measured, then a line per target (its README id, what it measures,
    the bound, the measured value, the status, the case that decided it), then the environment lines given."""
    outcomes = evaluate(rows)
    measured = [row for row in rows if row.get("headline")]
    device = measured[0]["device"] if measured else "no headline rows"
    counts = {status: sum(o.status == status for o in outcomes) for status in (MET, MISSED, NOT_MEASURED, NOT_GPU)}
    lines = [
        f"# fastlora targets: {device}",
        "",
        ", ".join(f"{n} {status}" for status, n in counts.items() if n),
        "",
        "| id | measure | target | measured | status | worst case |",
        "| --- | --- | --- | ---: | --- | --- |",
    ]
    for o in outcomes:
        value = "" if o.value is None else o.target.format(o.value)
        lines.append(f"| {o.target.id} | {o.target.measure} | {o.target.target} | {value} | {o.status} | {o.where} |")
    if measured and measured[0].get("device_type") != "cuda":
        lines += ["", "These rows were measured on a CPU: the values prove the report is drawn, not the targets."]
    lines += ["", "P3 leaves out the 8-byte dropout seed. Each value is the worst over the headline cases of its "
              "target (`fastlora bench --headline`); every case is in results.md."]  # fmt: skip
    if environment:
        lines += ["", "## Environment", "", *(f"- {line}" for line in environment)]
    return "\n".join(lines) + "\n"


def write_targets(rows: list[dict], out_dir: str | Path, environment: list[str] | None = None) -> Path:
    path = Path(out_dir) / TARGETS_MD
    path.write_text(format_targets(rows, environment))
    return path


_ROW = re.compile(r"^\|\s*(P\d+)\s*\|(.*)\|\s*$")


def parse_targets_table(markdown: str) -> list[tuple[str, list[str]]]:
    """``(id, cells)`` of every line of a markdown table whose first cell is a target id (``P1``, ``P2``, ...): the
    README's targets table, or targets.md."""
    return [(m[1], [c.strip() for c in m[2].split("|")]) for line in markdown.splitlines() if (m := _ROW.match(line))]
