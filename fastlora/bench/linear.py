"""The ``linear`` suite: one LoRA linear layer in training, every contender timed side by side on the same inputs.

Contenders: a frozen ``nn.Linear`` (the floor: what the layer costs without LoRA), the naive PyTorch formula, PEFT's
``lora.Linear`` built around an ``nn.Linear`` holding the same ``W0`` and bias with the same ``lora_A`` / ``lora_B``
parameters, and fastlora (``auto``; on the Triton backend also the ``onepass`` and ``split`` forwards).

Modes:

- ``fwd``: the forward alone (``training=True``, autograd recording);
- ``fwd+bwd``: the forward, then ``backward`` of a fixed upstream gradient, with the inputs' ``.grad`` set to None
  at the start of every call (inside the timed region, the same for every contender).

``x`` requires grad in every contender (a layer inside a network receives activations that do), ``W0`` and the bias
are frozen, ``lora_A``/``lora_B`` are trainable and fp32 when the activations are bf16/fp16, as PEFT keeps them.
Beside the times, each row counts what one call of the contender (the mode's: a forward, or a training step's forward
and backward) asks of the device (``fastlora.bench.launches``): ``launches``, ``host_syncs``, ``launch_bytes`` (the
bytes its launches must move together) and ``launch_kernels`` (each launch's name and bytes, in order). On CUDA the
counts come from ``torch.profiler``; on CPU they are counted at the launchers, on the backend the row ran (the torch
backend: ``fastlora.reference``'s ops). ``dispatch_us`` is the host time of one eager forward call in microseconds
(``common.host_us``: on a GPU the device runs behind; on a CPU it is the whole call).

Cases with 16-bit activations run twice: with fp32 LoRA weights (PEFT's default) and with LoRA weights in the
activations' dtype, for PEFT as for every other contender.

Before a case is timed, every LoRA contender must match the naive formula at dropout 0 (output and, for
``fwd+bwd``, the gradients of ``x``, ``lora_A``, ``lora_B``), within the tolerance of two results of the case's dtype
(``reduction_lengths``); with dropout, every fastlora forward must also match ``fastlora.reference`` under one seed.
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

from ..kernels import ONEPASS_MAX_RANK
from ..ops import lora_linear, resolve_backend, torch_linear
from ..reference import lora_linear_reference
from .common import (
    DTYPES,
    FASTLORA,
    FROZEN,
    NAIVE,
    PEFT,
    Case,
    Suite,
    assert_close,
    bench_backend,
    by_case,
    fmt_bytes,
    fmt_ratio,
    host_us,
    md_table,
    plot_title,
    progress,
    pyplot,
    save_plot,
    time_ms,
)
from .launches import LaunchCount, count_launches

MODES = ("fwd", "fwd+bwd")
PLOT = "linear_speedup.png"


@dataclasses.dataclass(frozen=True)
class LinearCase(Case):
    """One shape of the linear suite: ``x [M, K]``, ``W0 [N, K]``, rank ``r``, activation dtype (a key of
    ``DTYPES``), LoRA dropout probability, ``mode`` (``"fwd"`` or ``"fwd+bwd"``) and the dtype of the LoRA weights
    (``lora_dtype``; by default fp32 for half-precision activations, as PEFT keeps them, else the activations')."""

    M: int
    K: int
    N: int
    r: int
    dtype: str
    dropout: float
    mode: str
    lora_dtype: str = ""

    def __post_init__(self):
        super().__post_init__()
        if self.mode not in MODES:
            raise ValueError(f"LinearCase: mode must be one of {MODES}, got {self.mode!r}")
        if not self.lora_dtype:
            object.__setattr__(self, "lora_dtype", "fp32" if self.dtype in ("fp16", "bf16") else self.dtype)
        if self.lora_dtype not in ("fp32", self.dtype):
            raise ValueError(f"LinearCase: lora_dtype must be fp32 or the activations' {self.dtype}, got "
                             f"{self.lora_dtype!r}")  # fmt: skip

    @property
    def torch_lora_dtype(self) -> torch.dtype:
        return DTYPES[self.lora_dtype]

    @property
    def shape(self) -> str:
        return f"M={self.M} K={self.K} N={self.N} r={self.r}"

    @property
    def label(self) -> str:
        return f"M{self.M}-K{self.K}-N{self.N}-r{self.r}-{self.dtype}-lora{self.lora_dtype}-p{self.dropout}-{self.mode}"


def lora_dtypes(dtype: str) -> tuple[str, ...]:
    """The LoRA weight dtypes a case of ``dtype`` activations runs with: fp32 (PEFT's default), and the activations'
    own when they are 16-bit."""
    return ("fp32",) if dtype == "fp32" else ("fp32", dtype)


def _sweep(Ms, KNs, ranks, dtypes) -> list[LinearCase]:
    return [
        LinearCase(M, KN, KN, r, dtype, p, mode, lora)
        for mode, dtype, KN, r, p, M in itertools.product(MODES, dtypes, KNs, ranks, (0.0, 0.1), Ms)
        for lora in lora_dtypes(dtype)
    ]  # fmt: skip


def _quick(Ms, K, N, r, dtype) -> list[LinearCase]:
    """Both modes and both dropout settings once each, over a small and a larger ``M``; with 16-bit activations, the
    two training steps once more with LoRA weights in the activations' dtype."""
    small, large = Ms
    picks = ((small, 0.0, "fwd"), (large, 0.1, "fwd"), (small, 0.1, "fwd+bwd"), (large, 0.0, "fwd+bwd"))
    cases = [LinearCase(M, K, N, r, dtype, p, mode) for M, p, mode in picks]
    return cases + [
        LinearCase(M, K, N, r, dtype, p, mode, lora)
        for M, p, mode in picks
        if mode == "fwd+bwd"
        for lora in lora_dtypes(dtype)[1:]
    ]  # fmt: skip


def gpu_linear_cases(quick: bool = False) -> list[LinearCase]:
    """Llama-sized projections (K = N = 4096, and 8192 in bf16), from one decode token to a 16k-token training
    batch, ranks 16 and 64, bf16 and fp16, LoRA weights in fp32 and in the activations' dtype."""
    if quick:
        return _quick((16, 4096), 4096, 4096, 16, "bf16")
    Ms, ranks = (1, 16, 512, 4096, 16384), (16, 64)
    return _sweep(Ms, (4096, 8192), ranks, ("bf16",)) + _sweep(Ms, (4096,), ranks, ("fp16",))


def cpu_linear_cases(quick: bool = False) -> list[LinearCase]:
    """Small fp32 shapes: enough to prove on CPU that every contender runs, in seconds."""
    if quick:
        return _quick((1, 64), 256, 256, 8, "fp32")
    return _sweep((1, 64, 512), (256,), (8, 16), ("fp32",))


def headline_linear_cases(device: torch.device, quick: bool = False) -> list[LinearCase]:
    """The cases of targets P1 and P2: a training step (``fwd+bwd``) of a K = N = 4096 bf16 layer over M = 4096 and
    16384 tokens, r = 16 and 64, dropout 0 and 0.1, with fp32 LoRA weights (PEFT's default) and with bf16 ones. On CPU
    the same grid over a small layer. Quick: one case per LoRA dtype."""
    gpu = device.type == "cuda"
    Ms, KN, ranks = ((4096, 16384), 4096, (16, 64)) if gpu else ((64,), 256, (8,))
    if quick:
        return [LinearCase(Ms[0], KN, KN, ranks[0], "bf16", 0.1, "fwd+bwd", lora) for lora in ("fp32", "bf16")]
    return [
        LinearCase(M, KN, KN, r, "bf16", p, "fwd+bwd", lora)
        for lora, r, p, M in itertools.product(("fp32", "bf16"), ranks, (0.0, 0.1), Ms)
    ]  # fmt: skip


def linear_cases(device: torch.device, quick: bool = False, headline: bool = False) -> list[LinearCase]:
    if headline:
        return headline_linear_cases(device, quick)
    return gpu_linear_cases(quick) if device.type == "cuda" else cpu_linear_cases(quick)


def linear_flops(case: LinearCase) -> int:
    """The LoRA layer's work as it is trained, ``W0`` frozen. Forward: ``2·M·N·K`` (base) ``+ 2·M·K·r + 2·M·r·N``
    (LoRA). Backward: ``2·M·N·K`` for ``dx`` through ``W0`` (no ``dW``), plus ``dxa``, the LoRA part of ``dx``, ``dA``
    and ``dB``, each ``2·M·r·(N or K)``. Every contender of a case is credited with the same flops."""
    M, K, N, r = case.M, case.K, case.N, case.r
    forward = 2 * M * N * K + 2 * M * K * r + 2 * M * r * N
    backward = 2 * M * N * K + 2 * (2 * M * r * N + 2 * M * r * K)
    return forward + (backward if case.mode == "fwd+bwd" else 0)


def reduction_lengths(case: LinearCase) -> dict[str, int]:
    """For each result the agreement checks compare, the length of the longest chain of sums that makes one of its
    elements: ``y = x·W0ᵀ + s·(x·Aᵀ)·Bᵀ`` sums over K, then r; ``dx = dy·W0 + (s·dy·B)·A`` over N, then r; ``dA =
    (s·dy·B)ᵀ·x`` over N, then the M tokens; ``dB = s·dyᵀ·(x·Aᵀ)`` over K, then M."""
    M, K, N, r = case.M, case.K, case.N, case.r
    return {"y": K + r, "dx": N + r, "dA": N + M, "dB": K + M}


@dataclasses.dataclass
class LinearInputs:
    """One set of inputs shared by every contender of a case. ``lora_A`` / ``lora_B`` are ``nn.Parameter``s so that
    PEFT's layer holds these very tensors, and their gradients land in the same place for every contender."""

    x: torch.Tensor  # [M, K], requires grad
    weight: torch.Tensor  # [N, K], frozen
    bias: torch.Tensor  # [N], frozen
    lora_A: nn.Parameter  # [r, K], trainable
    lora_B: nn.Parameter  # [N, r], trainable
    dy: torch.Tensor  # [M, N], the fixed upstream gradient of fwd+bwd
    scaling: float

    @property
    def leaves(self) -> tuple[torch.Tensor, ...]:
        return self.x, self.lora_A, self.lora_B

    def clear_grads(self) -> None:
        for t in self.leaves:
            t.grad = None


def make_linear_inputs(case: LinearCase, device: torch.device, seed: int = 0) -> LinearInputs:
    """Random inputs scaled so outputs are O(1). ``lora_B`` is random, not PEFT's zero init, so that the LoRA branch
    contributes to the output and the agreement check means something."""
    g = torch.Generator(device=device).manual_seed(seed)
    dtype, lora_dtype = case.torch_dtype, case.torch_lora_dtype

    def randn(*shape, dt, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * scale).to(dt)

    return LinearInputs(
        x=randn(case.M, case.K, dt=dtype).requires_grad_(),
        weight=randn(case.N, case.K, dt=dtype, scale=case.K**-0.5),
        bias=randn(case.N, dt=dtype),
        lora_A=nn.Parameter(randn(case.r, case.K, dt=lora_dtype, scale=case.K**-0.5)),
        lora_B=nn.Parameter(randn(case.N, case.r, dt=lora_dtype, scale=case.r**-0.5)),
        dy=randn(case.M, case.N, dt=dtype),
        scaling=2.0,  # lora_alpha = 2·r, a common choice
    )


def peft_lora_linear(
    weight: torch.Tensor, bias: torch.Tensor | None, lora_A: nn.Parameter, lora_B: nn.Parameter, scaling: float,
    dropout: float,
) -> nn.Module:  # fmt: skip
    """A real PEFT ``lora.Linear`` (adapter ``"default"``, in training mode) around an ``nn.Linear`` that holds
    ``weight`` and ``bias`` (frozen, storage shared), with ``lora_A`` / ``lora_B`` as its adapter's weights."""
    import peft
    from peft.tuners.lora.layer import Linear as PeftLinear

    N, K = weight.shape
    r = lora_A.shape[0]
    base = nn.Linear(K, N, bias=bias is not None, device="meta")
    base.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        base.bias = nn.Parameter(bias, requires_grad=False)
    alpha = scaling * r
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout)
    layer = PeftLinear(base, "default", config=config, r=r, lora_alpha=alpha, lora_dropout=dropout)
    layer.lora_A["default"].weight = lora_A
    layer.lora_B["default"].weight = lora_B
    if layer.scaling["default"] != scaling:
        raise AssertionError(f"PEFT's scaling {layer.scaling['default']} != {scaling}")
    return layer.train()


def linear_contender_names(case: LinearCase, backend: str, forward_shapes: bool = True) -> list[str]:
    """The contenders of a case; the forward shapes ``onepass``/``split`` exist on the Triton backend only, and are
    left out with ``forward_shapes=False`` (the headline cases time what a user gets: ``auto``)."""
    names = [FROZEN, NAIVE, PEFT, FASTLORA]
    if backend == "triton" and forward_shapes:
        if case.r <= ONEPASS_MAX_RANK:
            names.append(f"{FASTLORA} onepass")
        names.append(f"{FASTLORA} split")
    return names


def _linear_forward(name: str, case: LinearCase, inputs: LinearInputs, backend: str) -> Callable[[], torch.Tensor]:
    x, w, b, A, B, s, p = (inputs.x, inputs.weight, inputs.bias, inputs.lora_A, inputs.lora_B, inputs.scaling,
                           case.dropout)  # fmt: skip
    if name == FROZEN:
        return lambda: F.linear(x, w, b)
    if name == NAIVE:

        def naive() -> torch.Tensor:
            # PEFT's formula written out: the LoRA branch in the adapter's dtype, no dropout op when p == 0, the sum
            # cast back to the activation dtype.
            xl = x.to(A.dtype)
            if p > 0.0:
                xl = F.dropout(xl, p, training=True)
            return (F.linear(x, w, b) + F.linear(F.linear(xl, A), B) * s).to(x.dtype)

        return naive
    if name == PEFT:
        layer = peft_lora_linear(w, b, A, B, s, p)
        return lambda: layer(x)
    impl = name.removeprefix(FASTLORA).strip() or "auto"
    return functools.partial(
        lora_linear, x, w, b, A, B, s, dropout_p=p, training=True, forward_impl=impl, backend=backend
    )


def _step(forward: Callable[[], torch.Tensor], inputs: LinearInputs, mode: str) -> Callable[[], torch.Tensor]:
    if mode == "fwd":
        return forward

    def forward_backward() -> torch.Tensor:
        inputs.clear_grads()
        y = forward()
        y.backward(inputs.dy)
        return y

    return forward_backward


def linear_forwards(
    case: LinearCase, inputs: LinearInputs, backend: str, forward_shapes: bool = True
) -> dict[str, Callable[[], torch.Tensor]]:
    """Name -> one training forward of the contender (autograd recording); returns ``y``."""
    names = linear_contender_names(case, backend, forward_shapes)
    return {name: _linear_forward(name, case, inputs, backend) for name in names}


def linear_contenders(
    case: LinearCase, inputs: LinearInputs, backend: str, forward_shapes: bool = True
) -> dict[str, Callable[[], torch.Tensor]]:
    """Name -> the callable to time: one forward (``fwd``) or forward and backward (``fwd+bwd``); returns ``y``."""
    return {
        name: _step(forward, inputs, case.mode)
        for name, forward in linear_forwards(case, inputs, backend, forward_shapes).items()
    }


def outputs_and_grads(
    forward: Callable[[], torch.Tensor], leaves: list[torch.Tensor], dy: torch.Tensor, backward: bool
) -> dict[str, torch.Tensor]:
    """What the agreement checks compare: ``{"y"}`` of one call of ``forward``, and with ``backward`` the gradients
    ``dx``, ``dA``, ``dB`` of ``leaves`` (``x``, ``lora_A``, ``lora_B``) for the upstream gradient ``dy``. Their
    ``.grad`` is cleared before and after."""
    for t in leaves:
        t.grad = None
    y = forward()
    out = {"y": y.detach()}
    if backward:
        y.backward(dy.to(y.dtype))
        out.update(dx=leaves[0].grad, dA=leaves[1].grad, dB=leaves[2].grad)
    for t in leaves:
        t.grad = None
    return out


def check_agreement(case: LinearCase, inputs: LinearInputs, backend: str, forward_shapes: bool = True) -> None:
    """Every LoRA contender (PEFT and fastlora) must match the naive formula at dropout 0 (output and, for
    ``fwd+bwd``, the gradients of ``x``, ``lora_A``, ``lora_B``) on these inputs; raises ``BenchmarkMismatch``. The
    naive formula rounds as much as the others, so both errors are allowed."""
    no_dropout = dataclasses.replace(case, dropout=0.0)
    results = {
        name: outputs_and_grads(_linear_forward(name, no_dropout, inputs, backend), list(inputs.leaves), inputs.dy,
                                case.mode == "fwd+bwd")
        for name in linear_contender_names(case, backend, forward_shapes)
        if name != FROZEN
    }  # fmt: skip
    dtype, lengths = case.torch_dtype, reduction_lengths(case)
    expected = results.pop(NAIVE)
    for name, out in results.items():
        for key, want in expected.items():
            what = f"{name} != {NAIVE} in {key} for {case.label}"
            assert_close(out[key], want, dtype, lengths[key], what, want_dtype=dtype)
    if case.dropout > 0.0:
        check_dropout_agreement(case, inputs, backend, forward_shapes)


def check_dropout_agreement(case: LinearCase, inputs: LinearInputs, backend: str, forward_shapes: bool = True) -> None:
    """With dropout, every fastlora forward shape must match the layer's formula (fp32, autograd) under one explicit
    seed, with the backend's mask: ``fastlora.reference``'s (the kernels' bits) on the Triton backend,
    ``torch_linear.keep_mask``'s on the torch backend. Either is a pure function of the seed, so the dropout path is
    checked before it is timed too. The formula's own fp32 rounding is allowed on top of the case's."""
    seed = torch.tensor([20261123], dtype=torch.int64, device=inputs.x.device)
    ref_leaves = [t.detach().float().requires_grad_() for t in inputs.leaves]
    x, A, B = ref_leaves
    backward = case.mode == "fwd+bwd"
    weight, bias = inputs.weight.float(), inputs.bias.float()
    if resolve_backend(inputs.x.device, backend) == "torch":
        keep = torch_linear.keep_mask(int(seed), tuple(inputs.x.shape), case.dropout, inputs.x.device)

        def reference():
            dropped = torch.where(keep, x / (1.0 - case.dropout), 0.0)
            return x @ weight.t() + bias + inputs.scaling * ((dropped @ A.t()) @ B.t())

    else:

        def reference():
            return lora_linear_reference(x, weight, bias, A, B, inputs.scaling, case.dropout, seed)

    expected = outputs_and_grads(reference, ref_leaves, inputs.dy, backward)
    dtype, lengths = case.torch_dtype, reduction_lengths(case)
    for name in linear_contender_names(case, backend, forward_shapes):
        if not name.startswith(FASTLORA):
            continue
        impl = name.removeprefix(FASTLORA).strip() or "auto"
        got = outputs_and_grads(
            lambda impl=impl: lora_linear(inputs.x, inputs.weight, inputs.bias, inputs.lora_A, inputs.lora_B,
                                          inputs.scaling, case.dropout, training=True, forward_impl=impl,
                                          backend=backend, seed=seed),
            list(inputs.leaves), inputs.dy, backward,
        )  # fmt: skip
        for key, want in expected.items():
            what = f"{name} != fastlora.reference with dropout in {key} for {case.label}"
            assert_close(got[key], want, dtype, lengths[key], what, want_dtype=torch.float32)


@dataclasses.dataclass(frozen=True)
class Measured:
    """What the suite measures of one contender in one case: the times of a call (median, 20% and 80% quantiles, in
    ms), what one call launches, and the host time of one forward (µs)."""

    times: tuple[float, float, float]
    launch_count: LaunchCount
    dispatch_us: float


def measure_contender(
    fn: Callable[[], torch.Tensor], forward: Callable[[], torch.Tensor], device: torch.device, min_run_time: float
) -> Measured:
    """Times ``fn`` (the case's call), then counts one call's launches (autotuning done by then) and times the host
    side of ``forward`` (within about ``min_run_time`` seconds when a forward is slow, as on a CPU)."""
    times = time_ms(fn, device, min_run_time)
    return Measured(times, count_launches(fn, device), host_us(forward, device, max_run_time=min_run_time))


def _linear_rows(case: LinearCase, measured: dict[str, Measured]) -> list[dict]:
    flops = linear_flops(case)
    timings = {name: m.times for name, m in measured.items()}
    frozen, naive, peft = timings[FROZEN][0], timings[NAIVE][0], timings[PEFT][0]
    return [
        {
            "suite": "linear",
            "contender": name,
            **dataclasses.asdict(case),
            "shape": case.shape,
            "median_ms": median,
            "p20_ms": p20,
            "p80_ms": p80,
            "tflops": flops / (median * 1e-3) / 1e12,
            "ratio_to_frozen": median / frozen,
            "speedup_over_naive": naive / median,
            "speedup_over_peft": peft / median,
            "launches": measured[name].launch_count.launches,
            "host_syncs": measured[name].launch_count.host_syncs,
            "launch_bytes": measured[name].launch_count.bytes,
            "launch_kernels": [list(kernel) for kernel in measured[name].launch_count.kernels],
            "dispatch_us": measured[name].dispatch_us,
        }
        for name, (median, p20, p80) in timings.items()
    ]


def measure_linear_case(
    case: LinearCase, device: torch.device, backend: str, forward_shapes: bool = True, min_run_time: float = 0.5
) -> list[dict]:
    """The rows of one case: its contenders checked to agree, then each measured (``measure_contender``)."""
    inputs = make_linear_inputs(case, device)
    check_agreement(case, inputs, backend, forward_shapes)
    contenders = linear_contenders(case, inputs, backend, forward_shapes)
    forwards = linear_forwards(case, inputs, backend, forward_shapes)
    measured = {}
    for name, fn in contenders.items():
        measured[name] = measure_contender(fn, forwards[name], device, min_run_time)
        inputs.clear_grads()
    return _linear_rows(case, measured)


def linear_suite(
    device: torch.device, quick: bool = False, progress_bar: bool = False, headline: bool = False
) -> list[dict]:
    """Every contender of every linear case, timed side by side, its launches counted and its forward's host time
    measured; one row per (case, contender)."""
    backend = bench_backend(device)
    min_run_time = 0.05 if quick else 0.5
    rows = []
    for case in progress(linear_cases(device, quick, headline), "linear", progress_bar):
        rows.extend(measure_linear_case(case, device, backend, not headline, min_run_time))
    return rows


# ----------------------------------------------------------------------------------------------- report


def _launch_cell(row: dict | None) -> str:
    """``launches · dispatch µs``, with the host syncs when there are any, or nothing for a row without them."""
    if row is None or row.get("launches") is None:
        return ""
    syncs = f" · {row['host_syncs']} syncs" if row.get("host_syncs") else ""
    return f"{row['launches']}{syncs} · {row['dispatch_us']:.0f} µs"


def linear_markdown(rows: list[dict]) -> list[str]:
    """A table per mode, a line per case: a column of median times per contender, fastlora's figures, then each
    contender's launches and host time and the bytes fastlora's and the frozen layer's launches move."""
    lines = [
        "Median time per call in ms (20% and 80% quantiles in results.json). `fwd+bwd` is a training step of the "
        "layer: forward, then backward of a fixed upstream gradient. TFLOP/s count the LoRA layer's flops "
        "(`fastlora.bench.linear_flops`: the frozen weight gets no gradient). fastlora / frozen is its time over the "
        "frozen layer's (1.00× is the floor); speedups are PEFT's (or the naive formula's) time over fastlora's.",
        "",
        "*Launches · dispatch*: the device work items of one call (kernels, memsets, copies: from `torch.profiler` on "
        "CUDA, counted at the launchers on CPU, on the backend the suite ran), the host syncs in it when there are "
        "any, and the host time of one eager forward in µs (on a CPU, the whole forward). *Bytes moved*: what the "
        "call's launches must read and write together (each launch in results.json, `launch_kernels`).",
    ]
    case_fields = ["M", "K", "N", "r", "dtype", "lora_dtype", "dropout"]
    for mode in dict.fromkeys(row["mode"] for row in rows):
        group = [row for row in rows if row["mode"] == mode]
        contenders = list(dict.fromkeys(row["contender"] for row in group))
        header = [*case_fields, *(f"{name} (ms)" for name in contenders), "fastlora TFLOP/s", "fastlora / frozen",
                  "speedup over PEFT", "speedup over naive", *(f"{name}: launches · dispatch" for name in contenders),
                  "fastlora bytes moved", "frozen bytes moved"]  # fmt: skip
        table = []
        for key, cells in by_case(group, case_fields).items():
            ours = cells.get(FASTLORA)
            figures = ["", "", "", ""] if ours is None else [
                f"{ours['tflops']:.3g}", fmt_ratio(ours["ratio_to_frozen"]), fmt_ratio(ours["speedup_over_peft"]),
                fmt_ratio(ours["speedup_over_naive"]),
            ]  # fmt: skip
            times = [f"{cells[name]['median_ms']:.4g}" if name in cells else "" for name in contenders]
            launches = [_launch_cell(cells.get(name)) for name in contenders]
            moved = [fmt_bytes(cells[name].get("launch_bytes")) if name in cells else "" for name in (FASTLORA, FROZEN)]
            table.append([*map(str, key), *times, *figures, *launches, *moved])
        lines += ["", f"### {mode}", "", *md_table(header, table)]
    lines += ["", f"![fastlora speedup over PEFT]({PLOT})"]
    return lines


def linear_plots(rows: list[dict], out_dir: Path) -> list[Path]:
    """Speedup of fastlora over PEFT against tokens ``M``: a panel per (mode, dtype, K = N), a line per rank and
    dropout."""
    ours = [row for row in rows if row["contender"] == FASTLORA]
    if not ours:
        return []
    plt = pyplot()
    modes = list(dict.fromkeys(row["mode"] for row in ours))
    columns = list(dict.fromkeys((row["dtype"], row["K"], row["N"]) for row in ours))
    fig, axes = plt.subplots(len(modes), len(columns), figsize=(4.4 * len(columns), 3.4 * len(modes)),
                             squeeze=False, sharex=True)  # fmt: skip
    for (i, mode), (j, (dtype, K, N)) in itertools.product(enumerate(modes), enumerate(columns)):
        ax = axes[i][j]
        panel = [r for r in ours if (r["mode"], r["dtype"], r["K"], r["N"]) == (mode, dtype, K, N)]
        loras = {r.get("lora_dtype", "") for r in panel}
        lines = sorted({(r["r"], r["dropout"], r.get("lora_dtype", "")) for r in panel})
        for (rank, p, lora), marker in zip(lines, itertools.cycle("os^Dv")):
            line = sorted(
                (r["M"], r["speedup_over_peft"])
                for r in panel
                if (r["r"], r["dropout"], r.get("lora_dtype", "")) == (rank, p, lora)
            )
            label = f"r={rank}, dropout {p}" + (f", {lora} LoRA" if len(loras) > 1 else "")
            ax.plot(*zip(*line), marker=marker, linestyle="-" if p == 0 else "--", label=label)
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{mode}, {dtype}, K=N={K}" if K == N else f"{mode}, {dtype}, K={K} N={N}", fontsize=10)
        ax.grid(True, alpha=0.3)
        if j == 0:
            ax.set_ylabel("speedup over PEFT (×)")
        if i == len(modes) - 1:
            ax.set_xlabel("tokens M")
        ax.legend(fontsize=7)
    fig.suptitle(plot_title("fastlora vs PEFT lora.Linear", rows), fontsize=11)
    fig.tight_layout()
    return [save_plot(fig, out_dir / PLOT)]


SUITE = Suite("linear", linear_suite, linear_markdown, linear_plots, (PLOT,))
