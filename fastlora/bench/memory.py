"""The ``memory`` suite: what one adapted module keeps for the backward, and the peak memory of its training step.

Contenders, all around the same ``W0``, bias, ``lora_A`` and ``lora_B``: a frozen ``nn.Linear`` (the floor), PEFT's
``lora.Linear``, the same PEFT layer after ``fastlora.patch_peft``, and ``fastlora.LoraLinear``.

**Saved for backward** is counted with ``torch.autograd.graph.saved_tensors_hooks`` during one training forward:
every tensor autograd packs, grouped by the storage it lives in (a view keeps its whole storage alive), each
storage counted once at its full size. Storages of the module's parameters (``W0``, bias, ``lora_A``, ``lora_B``)
are left out: they are weights, not activation memory, and are kept whether or not a backward follows. Two figures:

- ``saved_bytes``: every other saved storage, the input ``x`` included;
- ``saved_beyond_input_bytes``: the same without ``x``'s storage. The input is usually kept anyway (by the layer
  that made it, or by the q/k/v projections that share it), so this is what the module adds to a model's
  activation memory. ``x_copies`` is that figure over the size of ``x``.

These are counts, exact on any device. fastlora's are the same on every device and backend (its op saves the same
tensors on each). PEFT's depend on torch's dropout: on CUDA it keeps a 1-byte bool mask, on CPU it computes
``x * noise`` and keeps the noise in the dtype of ``x`` (the adapter's dtype, after PEFT's cast).

**Peak step memory** is the most bytes allocated at once during forward plus backward of a fixed upstream gradient
(``.grad`` of ``x``, ``lora_A``, ``lora_B`` cleared before), above what was allocated when the step started: on CUDA
from ``torch.cuda.max_memory_allocated``, on CPU from the allocator events of ``torch.profiler`` (see
``fastlora.bench.common``). It includes the output, the gradients and the temporaries of the backward.

Before measuring, the LoRA contenders must agree with PEFT at dropout 0 (output and gradients, within the tolerance
of two results of the case's dtype: ``fastlora.bench.linear.reduction_lengths``).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..layers import LoraLinear
from .common import (
    FASTLORA,
    FROZEN,
    PATCHED,
    PEFT,
    Case,
    Suite,
    assert_close,
    bench_backend,
    fmt_bytes,
    forced_backend,
    grouped_bars,
    md_table,
    peak_memory_bytes,
    progress,
    pyplot,
    save_plot,
)
from .linear import (
    LinearCase,
    LinearInputs,
    make_linear_inputs,
    outputs_and_grads,
    peft_lora_linear,
    reduction_lengths,
)

CONTENDERS = (FROZEN, PEFT, PATCHED, FASTLORA)
PLOT = "memory_per_module.png"
TORCH_BACKEND_NOTE = (
    "Here fastlora runs its torch backend (`fastlora.reference`): its peak step memory is that of plain PyTorch ops "
    "with their temporaries (with dropout, the keep-mask and the dropped input are tensors of size M·K), not "
    "the Triton kernels', which keep the mask in registers. What it saves for backward is the same on every backend."
)


@dataclasses.dataclass(frozen=True)
class MemoryCase(Case):
    """One adapted module: ``x [M, K]``, ``W0 [N, K]``, rank ``r``, activation dtype, LoRA dropout."""

    M: int
    K: int
    N: int
    r: int
    dtype: str
    dropout: float

    @property
    def shape(self) -> str:
        return f"M={self.M} K={self.K} N={self.N} r={self.r}"

    @property
    def label(self) -> str:
        return f"M{self.M}-K{self.K}-N{self.N}-r{self.r}-{self.dtype}-p{self.dropout}"

    def as_linear(self) -> LinearCase:
        return LinearCase(self.M, self.K, self.N, self.r, self.dtype, self.dropout, "fwd+bwd")


def memory_cases(device: torch.device, quick: bool = False) -> list[MemoryCase]:
    """A Llama-7B/8B attention projection (K = N = 4096) and MLP up-projection (N = 14336) over 2048 tokens, r = 16,
    bf16 (fp32 LoRA weights, as PEFT keeps them) and fp32, dropout 0 and 0.1. The same shapes on every device:
    saved bytes are exact anywhere. Quick: a small shape with the same dtypes and dropouts."""
    shapes = [(64, 256, 256, 8)] if quick else [(2048, 4096, 4096, 16), (2048, 4096, 14336, 16)]
    return [
        MemoryCase(M, K, N, r, dtype, p)
        for (M, K, N, r), dtype, p in itertools.product(shapes, ("bf16", "fp32"), (0.0, 0.1))
    ]  # fmt: skip


def memory_modules(inputs: LinearInputs, dropout: float) -> dict[str, nn.Module]:
    """Every contender as a module in training mode, all holding the same ``W0``, bias, ``lora_A`` and ``lora_B``."""
    from ..peft_compat import patch_peft

    w, b, A, B, s = inputs.weight, inputs.bias, inputs.lora_A, inputs.lora_B, inputs.scaling
    frozen = nn.Linear(w.shape[1], w.shape[0], device="meta")
    frozen.weight, frozen.bias = nn.Parameter(w, requires_grad=False), nn.Parameter(b, requires_grad=False)
    patched = nn.ModuleDict({"layer": peft_lora_linear(w, b, A, B, s, dropout)})
    patch_peft(patched)
    ours = LoraLinear(frozen.weight, frozen.bias, A.shape[0], lora_alpha=s * A.shape[0], lora_dropout=dropout)
    ours.lora_A, ours.lora_B = A, B
    modules = {
        FROZEN: frozen,
        PEFT: peft_lora_linear(w, b, A, B, s, dropout),
        PATCHED: patched["layer"],
        FASTLORA: ours,
    }
    return {name: module.train() for name, module in modules.items()}


@dataclasses.dataclass(frozen=True)
class SavedTensors:
    """What autograd packed for the backward during one call, by storage (see the module docstring)."""

    saved_bytes: int  # every storage but the parameters', the input's included
    input_bytes: int  # the input's storage, when it was saved (else 0)
    tensors: int  # how many tensors were packed, parameters included

    @property
    def beyond_input_bytes(self) -> int:
        return self.saved_bytes - self.input_bytes


def _storage(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def saved_for_backward(fn: Callable[[], object], x: torch.Tensor, params: list[torch.Tensor]) -> SavedTensors:
    """Run ``fn`` and count what autograd saves for the backward: unique storages, without those of ``params``,
    with ``x``'s counted apart. Returns the counts; ``fn``'s result is dropped (and the graph with it)."""
    packed: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        packed.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    skip = {_storage(p)[0] for p in params}
    storages = dict(_storage(t) for t in packed)  # data_ptr -> nbytes: every storage is alive, so keys are unique
    x_ptr = _storage(x)[0]
    kept = {ptr: n for ptr, n in storages.items() if ptr not in skip}
    return SavedTensors(saved_bytes=sum(kept.values()), input_bytes=kept.get(x_ptr, 0), tensors=len(packed))


def make_step(module: nn.Module, inputs: LinearInputs) -> Callable[[], None]:
    def step() -> None:
        inputs.clear_grads()
        module(inputs.x).backward(inputs.dy)

    return step


def check_memory_agreement(case: MemoryCase, inputs: LinearInputs) -> None:
    """At dropout 0, ``patch_peft`` and ``LoraLinear`` must give PEFT's output and gradients on these inputs (PEFT
    rounds as much as they do: both errors are allowed)."""
    results = {
        name: outputs_and_grads(lambda module=module: module(inputs.x), list(inputs.leaves), inputs.dy, True)
        for name, module in memory_modules(inputs, 0.0).items()
        if name != FROZEN
    }
    dtype, lengths = case.torch_dtype, reduction_lengths(case.as_linear())
    expected = results.pop(PEFT)
    for name, out in results.items():
        for key, want in expected.items():
            what = f"{name} != {PEFT} in {key} for {case.label}"
            assert_close(out[key], want, dtype, lengths[key], what, want_dtype=dtype)


def measure_case(case: MemoryCase, device: torch.device) -> list[dict]:
    """One row per contender: bytes saved for backward, and the peak memory of a training step of the module."""
    inputs = make_linear_inputs(case.as_linear(), device)
    check_memory_agreement(case, inputs)
    x_bytes = inputs.x.numel() * inputs.x.element_size()
    rows = []
    for name, module in memory_modules(inputs, case.dropout).items():
        params = list(module.parameters())
        saved = saved_for_backward(lambda m=module: m(inputs.x), inputs.x, params)
        step = make_step(module, inputs)
        step()  # warm-up: lazy initialisation is not the step's memory
        peak = peak_memory_bytes(step, device)
        rows.append(
            {
                "suite": "memory",
                "contender": name,
                **dataclasses.asdict(case),
                "shape": case.shape,
                "input_bytes": x_bytes,
                "saved_bytes": saved.saved_bytes,
                "saved_beyond_input_bytes": saved.beyond_input_bytes,
                "saved_tensors": saved.tensors,
                "x_copies": saved.beyond_input_bytes / x_bytes,
                "peak_step_bytes": peak,
            }
        )
    inputs.clear_grads()
    peft = next(row for row in rows if row["contender"] == PEFT)
    for row in rows:
        row["saved_over_peft"] = row["saved_beyond_input_bytes"] / max(peft["saved_beyond_input_bytes"], 1)
        row["peak_over_peft"] = row["peak_step_bytes"] / max(peft["peak_step_bytes"], 1)
    return rows


def memory_suite(
    device: torch.device, quick: bool = False, progress_bar: bool = False, headline: bool = False
) -> list[dict]:
    """Every memory case; one row per (case, contender). No headline cases: target P3 (bytes saved beyond x) is read
    from the ``overhead`` suite, which counts them at the headline layer shape."""
    if headline:
        return []
    rows = []
    with forced_backend(bench_backend(device)):
        for case in progress(memory_cases(device, quick), "memory", progress_bar):
            rows.extend(measure_case(case, device))
    return rows


# ----------------------------------------------------------------------------------------------- report


def memory_markdown(rows: list[dict]) -> list[str]:
    lines = [
        "Per adapted module, in training. *Saved for backward*: storages autograd keeps from the forward to the "
        "backward, parameters (`W0`, bias, `lora_A`, `lora_B`) left out, each storage counted once; *beyond x* leaves "
        "the input out too (it is usually kept anyway), and *× x* is that in units of the input's size. *Peak step*: "
        "the most bytes allocated at once during forward + backward, above the bytes allocated before it (on CPU "
        "from torch.profiler's allocator events). Saved bytes are counted exactly; fastlora's are the same on every "
        "device, PEFT's dropout mask is 1 byte per element on CUDA (bool) and one element of the adapter's dtype on "
        "CPU.",
    ]
    header = ["M", "K", "N", "r", "dtype", "dropout", "contender", "saved for backward", "beyond x", "× x",
              "peak step", "peak / PEFT"]  # fmt: skip
    table = [
        [row["M"], row["K"], row["N"], row["r"], row["dtype"], row["dropout"], row["contender"],
         fmt_bytes(row["saved_bytes"]), fmt_bytes(row["saved_beyond_input_bytes"]), f"{row['x_copies']:.2f}",
         fmt_bytes(row["peak_step_bytes"]), f"{row['peak_over_peft']:.2f}×"]
        for row in rows
    ]  # fmt: skip
    if rows[0]["backend"] == "torch":
        lines += ["", TORCH_BACKEND_NOTE]
    return [*lines, "", *md_table(header, table), "", f"![memory per module]({PLOT})"]


def memory_plots(rows: list[dict], out_dir: Path) -> list[Path]:
    """Grouped bars per case: saved beyond the input (top) and peak step memory (bottom), one bar per contender."""
    if not rows:
        return []
    plt = pyplot()
    contenders = list(dict.fromkeys(row["contender"] for row in rows))
    cases = list(dict.fromkeys((row["M"], row["K"], row["N"], row["r"], row["dtype"], row["dropout"]) for row in rows))
    value = {(tuple(row[f] for f in ("M", "K", "N", "r", "dtype", "dropout")), row["contender"]): row for row in rows}
    fig, axes = plt.subplots(2, 1, figsize=(max(7.0, 1.5 * len(cases) + 2), 7.5), sharex=True)
    for ax, key, title in ((axes[0], "saved_beyond_input_bytes", "saved for backward beyond x"),
                           (axes[1], "peak_step_bytes", "peak memory of a training step")):  # fmt: skip
        bars = grouped_bars(ax, cases, contenders, {pair: row[key] / 2**20 for pair, row in value.items()})
        if key == "saved_beyond_input_bytes":  # fastlora's bars are too short to read: print the figures
            for contender_bars in bars:
                ax.bar_label(contender_bars, fmt="%.3g", fontsize=6, padding=1)
        ax.set_ylabel("MiB")
        ax.set_title(title, fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[1].set_xticks(range(len(cases)))
    axes[1].set_xticklabels([f"M={M} K={K}\nN={N} r={r}\n{dt}, p={p}" for M, K, N, r, dt, p in cases], fontsize=8)
    fig.suptitle(f"memory per adapted module, {rows[0]['device']}", fontsize=11)
    if rows[0]["backend"] == "torch":
        fig.text(0.5, 0.005, "fastlora on its torch backend: its peak step is the reference's (M·K temporaries for "
                 "dropout), not the kernels'", ha="center", fontsize=7, style="italic")  # fmt: skip
    fig.tight_layout(rect=(0, 0.02, 1, 1))  # room for the note at the bottom
    return [save_plot(fig, out_dir / PLOT)]


SUITE = Suite("memory", memory_suite, memory_markdown, memory_plots, (PLOT,))
