"""The ``qlora`` suite: LoRA over a frozen 4-bit NF4 base weight (QLoRA), at two levels (``common.multilevel_suite``:
rows carry ``level``, ``layer`` or ``train``).

Every 4-bit weight here is ``nf4.quantize(W, blocksize=64, quant_type="nf4", double_quant=True)`` (``QUANTIZATION``:
QLoRA's settings, bit-exact with bitsandbytes' ``quantize_4bit``), and the bitsandbytes contenders hold the very same
bytes (``nf4.to_bnb``), so that every 4-bit contender computes over one dequantized weight. "PEFT" in this suite is
PEFT over bitsandbytes (``bitsandbytes + PEFT``): ``speedup_over_peft`` and ``peak_over_peft`` are against it.

``layer``: one linear layer, K = N = 4096, r = 16, bf16 activations, fp32 LoRA weights (PEFT's default),
``lora_alpha`` = 2·r, a frozen bias, no dropout, on the inputs of the ``linear`` suite (``linear.make_linear_inputs``,
``lora_B`` non-zero so that the adapter matters). Modes:

- ``fwd+bwd``: ``x`` requires grad (as inside a model), the forward, then the backward of a fixed upstream gradient,
  the inputs' ``.grad`` set to None at the start of every call (inside the timed region, the same for every
  contender); over 16 and 4096 tokens;
- ``decode``: the forward alone, as a server calls it: no autograd, ``x`` needs no gradient, layers in eval mode;
  over 16 tokens.

Contenders, around one bf16 weight ``W0``, its one quantization and one pair of LoRA factors (shared, not copied):

- ``frozen nn.Linear``: ``F.linear`` over ``W0`` (the floor);
- ``fastlora LoRA``: ``fastlora.lora_linear`` over ``W0``;
- ``fastlora QLoRA``: ``fastlora.lora_linear`` over the 4-bit weight (on the Triton backend the kernels dequantize its
  tiles in registers; the torch backend dequantizes it per call);
- ``fastlora 4-bit frozen``: ``fastlora.quant_linear``, the 4-bit layer without an adapter (a QLoRA model's other
  layers);
- ``bitsandbytes + PEFT``: PEFT's QLoRA layer (``peft.tuners.lora.bnb.Linear4bit``, what ``get_peft_model`` puts over
  a model loaded in 4 bits) around a bitsandbytes ``Linear4bit`` (NF4, double quantization, computing in bf16). When
  bitsandbytes is not installed, or does not run a 4-bit layer on the device (``bnb_issue``), its row carries the
  reason as its status and no figure, and nothing is measured against it.

Before a contender is timed, its output (and in ``fwd+bwd`` the gradients of ``x``, ``lora_A``, ``lora_B``) must match
PEFT's formula written out in the case's dtype over the weight it holds: ``W0`` for the LoRA layer, the
dequantized 4-bit weight for the 4-bit ones (``check_layer_agreement``). Reported per row: median time with 20/80%
quantiles, its ratio to the frozen layer's, ``bitsandbytes + PEFT``'s time over it, its time over ``fastlora
LoRA``'s (``ratio_to_lora``), the peak memory of a call above what was allocated before it
(``common.peak_memory_bytes``) and the bytes of the frozen weight as the contender stores it (``weight_bytes``: 4-bit
codes, block scales and their scales). The headline cases (``fwd+bwd`` over 4096 tokens, ``decode`` over 16) feed
targets P14 to P16 (``fastlora.bench.targets``); a headline run leaves out ``fastlora 4-bit frozen``, which no target
reads (on a GPU its kernels would be compiled and autotuned for nothing), and draws no plot (``_plotted``).

``train``: one optimizer step (``fastlora.bench.train.measure_steps``: forward with labels, backward, ``AdamW.step()``
over the LoRA weights, ``zero_grad``) of a Llama-style model built from a config (no downloads; on CUDA 4 layers,
hidden 2048, 4 × 1024 tokens), LoRA r = 16 on q/k/v/o and gate/up/down, every one of those linear layers quantized
(the output head stays in bf16, as transformers keeps it when it loads a model in 4 bits). Contenders, each a fresh
model from seed 0 with the same LoRA weights (``set_lora_weights``):

- ``bitsandbytes + PEFT``: the layers as bitsandbytes ``Linear4bit``s, ``model.is_loaded_in_4bit`` set as transformers
  sets it, then ``peft.get_peft_model`` (without ``prepare_model_for_kbit_training``, which would cast the norms to
  fp32 and turn on gradient checkpointing: every contender runs the model in its one dtype);
- ``PEFT + fastlora.patch_peft``: that PEFT model, its QLoRA layers patched to run fastlora's op;
- ``fastlora QLoRA``: ``fastlora.quantize_nf4`` on the model, then ``fastlora.apply_lora``;
- ``fastlora LoRA``: ``fastlora.apply_lora`` on the unquantized model.

The 4-bit contenders' loss and LoRA-gradient norm must match the first one's (``bitsandbytes + PEFT``, or ``fastlora
QLoRA`` without bitsandbytes) before they are timed; the unquantized model computes over another weight and is
checked against nothing. Reported: tokens per second, the bytes of weights and optimizer state (buffers and
bitsandbytes' quantization state included: a 4-bit weight is not always a parameter), the peak memory of a step above
them, each against ``bitsandbytes + PEFT``, and the step time over ``fastlora LoRA``'s. The level feeds no target:
headline runs measure none of its cases.

On CPU both levels run small shapes on the torch backend on one thread, bitsandbytes' rows its own CPU path: the layer
level in bf16 (bitsandbytes' CPU inference kernel computes in bf16 whatever it is given), the train level in fp32,
whose tolerance tells other LoRA weights apart. The rows prove the suite runs, nothing about kernel speed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import io
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .. import nf4
from ..ops import lora_linear, quant_linear
from .common import (
    FASTLORA,
    FROZEN,
    PATCHED,
    Case,
    Suite,
    assert_close,
    bench_backend,
    device_memory,
    fmt_bytes,
    fmt_ratio,
    forced_backend,
    grouped_bars,
    md_table,
    multilevel_suite,
    peak_memory_bytes,
    plot_title,
    progress,
    pyplot,
    save_plot,
    time_ms,
    without_grad,
)
from .linear import LinearCase, LinearInputs, make_linear_inputs, outputs_and_grads, reduction_lengths
from .llama import build_llama, quiet_peft
from .multi_batch import cpu_threads
from .train import (
    STEP_HEADER,
    TrainCase,
    check_train_agreement,
    fit_batch,
    make_batch,
    measure_steps,
    step_cells,
    step_plots,
)

LORA = f"{FASTLORA} LoRA"  # over the unquantized weight
QLORA = f"{FASTLORA} QLoRA"
FROZEN_4BIT = f"{FASTLORA} 4-bit frozen"
BNB_PEFT = "bitsandbytes + PEFT"
LAYER_CONTENDERS = (FROZEN, LORA, QLORA, FROZEN_4BIT, BNB_PEFT)
HEADLINE_CONTENDERS = tuple(name for name in LAYER_CONTENDERS if name != FROZEN_4BIT)  # what P14 to P16 read
TRAIN_CONTENDERS = (BNB_PEFT, PATCHED, QLORA, LORA)  # bitsandbytes + PEFT first: the 4-bit ones are checked against it
BNB_CONTENDERS = (BNB_PEFT, PATCHED)
MODES = ("fwd+bwd", "decode")
QUANTIZATION = {"blocksize": 64, "quant_type": "nf4", "double_quant": True}
ADAPTED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BNB_MISSING = "bitsandbytes not installed"
LAYER_PLOT, TRAIN_PLOT = "qlora_layer.png", "qlora_train.png"
# The targets P14 to P16 (``fastlora.bench.targets``) read from the layer level's headline cases; the tables say them.
TARGET_SPEEDUP_OVER_BNB, TARGET_RATIO_TO_LORA, TARGET_DECODE_RATIO_TO_LORA = 2.0, 1.15, 1.0


# ----------------------------------------------------------------------------------------------- bitsandbytes


def import_bitsandbytes():
    """``bitsandbytes``, imported with its loggers held at ERROR: on a CPU with AVX512-BF16 its import looks for an
    optional package of CPU kernels and logs a warning when it is missing, which no benchmark user acts on. PEFT
    imports bitsandbytes too, when it is installed: ``fastlora.bench.run`` and both levels import it here first
    (``bnb_issue``)."""
    logger = logging.getLogger("bitsandbytes")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        import bitsandbytes
    finally:
        logger.setLevel(level)
    return bitsandbytes


def bnb_linear4bit(qweight: nf4.QuantizedWeight, bias: torch.Tensor | None, compute_dtype: torch.dtype) -> nn.Module:
    """A bitsandbytes ``Linear4bit`` computing in ``compute_dtype`` that holds ``qweight``'s own tensors
    (``nf4.to_bnb``: the bytes the fastlora contenders read) and ``bias`` (frozen, shared)."""
    bnb = import_bitsandbytes()
    layer = bnb.nn.Linear4bit(qweight.in_features, qweight.out_features, bias=bias is not None,
                              compute_dtype=compute_dtype, compress_statistics=qweight.nested,
                              quant_type=qweight.quant_type, device="meta")  # fmt: skip
    layer.weight = nf4.to_bnb(qweight)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach(), requires_grad=False)
    return layer


@functools.cache
def bnb_issue(device_type: str) -> str | None:
    """Why the bitsandbytes contenders cannot run on devices of ``device_type`` (``BNB_MISSING``, or the error of a
    small 4-bit layer's forward and backward there), or None when they can."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return BNB_MISSING
    weight = torch.linspace(-1.0, 1.0, 64 * 64, device=device_type).view(64, 64)  # no draw from torch's generator
    try:
        layer = bnb_linear4bit(nf4.quantize(weight, **QUANTIZATION), None, torch.bfloat16)
        layer(weight[:2].to(torch.bfloat16).requires_grad_()).sum().backward()
    except Exception as e:  # noqa: BLE001 - whatever breaks, bitsandbytes does not run here
        return f"bitsandbytes does not run on {device_type} ({type(e).__name__}: {str(e)[:80]})"
    return None


def bnb_state_tensors(weight: torch.Tensor) -> list[torch.Tensor]:
    """The tensors of a bitsandbytes ``Params4bit``'s quantization state (block scales, code, and with double
    quantization their scales, code and offset), which are no parameter or buffer of its module."""
    state = getattr(weight, "quant_state", None)
    if state is None:
        return []
    nested = [state.state2.absmax, state.state2.code, state.offset] if state.nested else []
    return [t for t in (state.absmax, state.code, *nested) if isinstance(t, torch.Tensor)]


def storage_bytes(tensors: list[torch.Tensor]) -> int:
    """The bytes of the storages behind ``tensors``, each counted once."""
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def peft_qlora_linear(base: nn.Module, lora_A: nn.Parameter, lora_B: nn.Parameter, scaling: float) -> nn.Module:
    """PEFT's QLoRA layer (``peft.tuners.lora.bnb.Linear4bit``) around the bitsandbytes layer ``base``, its adapter
    ``"default"`` holding ``lora_A`` / ``lora_B`` themselves; in training mode."""
    import peft
    from peft.tuners.lora.bnb import Linear4bit

    r = lora_A.shape[0]
    layer = Linear4bit(base, "default", config=peft.LoraConfig(r=r, lora_alpha=scaling * r), r=r,
                       lora_alpha=scaling * r)  # fmt: skip
    layer.lora_A["default"].weight, layer.lora_B["default"].weight = lora_A, lora_B
    if layer.scaling["default"] != scaling:
        raise AssertionError(f"PEFT's scaling {layer.scaling['default']} != {scaling}")
    return layer.train()


# ----------------------------------------------------------------------------------------------- layer


@dataclasses.dataclass(frozen=True)
class QloraLayerCase(Case):
    """One layer: ``x [M, K]``, ``W0 [N, K]`` (quantized for the 4-bit contenders), rank ``r``, the activations'
    dtype, the ``mode`` (``fwd+bwd`` or ``decode``) and the LoRA weights' dtype."""

    M: int
    K: int
    N: int
    r: int
    dtype: str
    mode: str
    lora_dtype: str = "fp32"

    def __post_init__(self):
        super().__post_init__()
        if self.mode not in MODES:
            raise ValueError(f"QloraLayerCase: mode must be one of {MODES}, got {self.mode!r}")

    @property
    def shape(self) -> str:
        return f"M={self.M} K={self.K} N={self.N} r={self.r}"

    @property
    def label(self) -> str:
        return f"M{self.M}-K{self.K}-N{self.N}-r{self.r}-{self.dtype}-lora{self.lora_dtype}-{self.mode}"

    @property
    def training(self) -> bool:
        return self.mode == "fwd+bwd"

    def as_linear(self) -> LinearCase:
        """The ``linear`` suite's case of the same layer: its inputs and the lengths of its sums."""
        mode = "fwd+bwd" if self.training else "fwd"
        return LinearCase(self.M, self.K, self.N, self.r, self.dtype, 0.0, mode, self.lora_dtype)


def qlora_layer_cases(device: torch.device, quick: bool = False, headline: bool = False) -> list[QloraLayerCase]:
    """On CUDA a K = N = 4096 bf16 layer at r = 16: ``fwd+bwd`` over 16 and 4096 tokens and ``decode`` over 16. Quick
    and headline runs: ``fwd+bwd`` over 4096 tokens and ``decode`` over 16, the cases of P14 to P16. On CPU the same
    over a K = N = 256 layer at r = 8, with 256 tokens for the large case."""
    (small, large), KN, r = ((16, 4096), 4096, 16) if device.type == "cuda" else ((16, 256), 256, 8)
    grid = [(large, "fwd+bwd"), (small, "decode")]
    if not (quick or headline):
        grid.insert(0, (small, "fwd+bwd"))
    return [QloraLayerCase(M, KN, KN, r, "bf16", mode) for M, mode in grid]


@dataclasses.dataclass(frozen=True)
class LayerContender:
    """What a contender calls (one forward of the case's mode, returning ``y``) and the bytes of its frozen weight."""

    forward: Callable[[], torch.Tensor]
    weight_bytes: int


def layer_contender(
    name: str, case: QloraLayerCase, inputs: LinearInputs, qweight: nf4.QuantizedWeight, backend: str
) -> LayerContender:
    """Contender ``name`` over ``inputs`` (their ``weight`` is ``W0``) and ``qweight`` (its quantization). In
    ``decode`` mode ``x`` is called without its gradient, as a server has it."""
    x = inputs.x if case.training else inputs.x.detach()
    w, b, A, B, s, training = inputs.weight, inputs.bias, inputs.lora_A, inputs.lora_B, inputs.scaling, case.training
    if name == FROZEN:
        return LayerContender(lambda: F.linear(x, w, b), storage_bytes([w]))
    if name == LORA:
        return LayerContender(functools.partial(lora_linear, x, w, b, A, B, s, 0.0, training, backend=backend),
                              storage_bytes([w]))  # fmt: skip
    if name == QLORA:
        return LayerContender(functools.partial(lora_linear, x, qweight, b, A, B, s, 0.0, training, backend=backend),
                              storage_bytes(list(qweight.tensors())))  # fmt: skip
    if name == FROZEN_4BIT:
        return LayerContender(functools.partial(quant_linear, x, qweight, b, backend=backend),
                              storage_bytes(list(qweight.tensors())))  # fmt: skip
    if name == BNB_PEFT:
        layer = peft_qlora_linear(bnb_linear4bit(qweight, b, case.torch_dtype), A, B, s).train(training)
        weight = layer.get_base_layer().weight
        return LayerContender(lambda: layer(x), storage_bytes([weight, *bnb_state_tensors(weight)]))
    raise ValueError(f"qlora: no layer contender {name!r}")


def layer_step(forward: Callable[[], torch.Tensor], inputs: LinearInputs, mode: str) -> Callable[[], torch.Tensor]:
    """The call timed: in ``decode`` the forward without autograd; in ``fwd+bwd`` the inputs' gradients cleared, the
    forward, then the backward of ``inputs.dy``."""
    if mode == "decode":
        return without_grad(forward)

    def step() -> torch.Tensor:
        inputs.clear_grads()
        y = forward()
        y.backward(inputs.dy)
        return y

    return step


def formula(case: QloraLayerCase, inputs: LinearInputs, weight: torch.Tensor, lora: bool) -> Callable[[], torch.Tensor]:
    """PEFT's formula written out over ``weight`` (``W0``, or the dequantized 4-bit weight): ``x·weightᵀ + b``, plus
    with ``lora`` the adapter's branch computed in the LoRA weights' dtype and the sum cast back to ``x``'s."""
    x = inputs.x if case.training else inputs.x.detach()
    A, B, s = inputs.lora_A, inputs.lora_B, inputs.scaling

    def forward() -> torch.Tensor:
        y = F.linear(x, weight, inputs.bias)
        return (y + F.linear(F.linear(x.to(A.dtype), A), B) * s).to(x.dtype) if lora else y

    return forward


def layer_results(case: QloraLayerCase, inputs: LinearInputs, forward: Callable[[], torch.Tensor]) -> dict:
    """What the agreement check compares of one call of ``forward``: ``y``, and in ``fwd+bwd`` the gradients ``dx``
    and, for a layer with an adapter, ``dA`` and ``dB``."""
    call = forward if case.training else without_grad(forward)
    out = outputs_and_grads(call, list(inputs.leaves), inputs.dy, case.training)
    return {key: value for key, value in out.items() if value is not None}


def check_layer_agreement(
    case: QloraLayerCase, inputs: LinearInputs, dequantized: torch.Tensor, name: str, forward: Callable
) -> None:
    """Contender ``name`` (its ``forward``) must match ``formula`` over the weight it holds, ``W0`` or
    ``dequantized``, within the tolerance of two results of the case's dtype; raises ``BenchmarkMismatch``."""
    weight = inputs.weight if name == LORA else dequantized
    expected = layer_results(case, inputs, formula(case, inputs, weight, lora=name != FROZEN_4BIT))
    got = layer_results(case, inputs, forward)
    lengths = reduction_lengths(case.as_linear())
    for key, want in expected.items():
        what = f"{name} != PEFT's formula over its weight in {key} for {case.label}"
        assert_close(got[key], want, case.torch_dtype, lengths[key], what, want_dtype=case.torch_dtype)


def add_ratios(rows: list[dict], ratios: dict[str, tuple[str, str, bool]]) -> None:
    """Each of ``ratios``, ``key: (contender, figure, speedup)``, added to every row of one case: the row's ``figure``
    over that contender's (the other way round for a speedup), or None where either side was not measured."""
    ok = {row["contender"]: row for row in rows if row["status"] == "ok"}
    for row in rows:
        for key, (name, figure, speedup) in ratios.items():
            other = ok.get(name, {}).get(figure)
            mine = row.get(figure) if row["status"] == "ok" else None
            if other and mine:
                row[key] = other / mine if speedup else mine / other
            else:
                row[key] = None


LAYER_RATIOS = {
    "ratio_to_frozen": (FROZEN, "median_ms", False),
    "speedup_over_peft": (BNB_PEFT, "median_ms", True),
    "ratio_to_lora": (LORA, "median_ms", False),
}


def _layer_row(case: QloraLayerCase, name: str, **figures) -> dict:
    return {"contender": name, **dataclasses.asdict(case), "shape": case.shape, **figures}


def measure_layer_case(
    case: QloraLayerCase, device: torch.device, min_run_time: float, headline: bool = False
) -> list[dict]:
    """Every contender (``HEADLINE_CONTENDERS`` in a headline run) in turn on one set of inputs and one quantized
    weight: checked, timed, its peak measured; the bitsandbytes row only when ``bnb_issue`` finds none (else it
    carries the issue as its status). Then the ratios."""
    backend = bench_backend(device)
    inputs = make_linear_inputs(case.as_linear(), device)
    qweight = nf4.quantize(inputs.weight, **QUANTIZATION)
    dequantized = qweight.dequantize(case.torch_dtype)
    rows = []
    for name in HEADLINE_CONTENDERS if headline else LAYER_CONTENDERS:
        if name == BNB_PEFT and (issue := bnb_issue(device.type)):
            rows.append(_layer_row(case, name, status=issue))
            continue
        contender = layer_contender(name, case, inputs, qweight, backend)
        if name != FROZEN:
            check_layer_agreement(case, inputs, dequantized, name, contender.forward)
        step = layer_step(contender.forward, inputs, case.mode)
        median, p20, p80 = time_ms(step, device, min_run_time)
        peak = peak_memory_bytes(step, device)
        inputs.clear_grads()
        rows.append(_layer_row(case, name, status="ok", median_ms=median, p20_ms=p20, p80_ms=p80, peak_bytes=peak,
                               weight_bytes=contender.weight_bytes))  # fmt: skip
    add_ratios(rows, LAYER_RATIOS)
    return rows


# ----------------------------------------------------------------------------------------------- train


# (*model, batch, seq), the model as ``fastlora.bench.llama`` spells it. The CPU model's widths are multiples of the
# block size, 64 (the llama module's tiny model has an intermediate size of 176): bitsandbytes' CPU kernel dequantizes
# a weight whose rows do not start on a block boundary wrongly (``fastlora.nf4``, known limits).
GPU_MODEL = ("0.3B", 2048, 4, 16, 8, 5632, 32000, 4, 1024)
CPU_MODEL = ("tiny", 64, 2, 4, 2, 192, 256, 2, 32)


def qlora_train_cases(device: torch.device, quick: bool = False, headline: bool = False) -> list[TrainCase]:
    """One Llama-style model, no dropout: on CUDA 4 layers at hidden 2048 in bf16, r = 16, over 4 × 1024 tokens
    (quick: sequences of 512; the batch cut down to fit the device), on CPU the tiny model in fp32 at r = 8. None in
    headline runs: no target reads this level."""
    if headline:
        return []
    if device.type != "cuda":
        return [TrainCase(*CPU_MODEL, 8, "fp32", 0.0)]
    size = (*GPU_MODEL[:-1], 512) if quick else GPU_MODEL
    fitted = fit_batch(TrainCase(*size, 16, "bf16", 0.0), device_memory(device))
    return [] if fitted is None else [fitted]


def lora_factors(model: nn.Module) -> dict[str, tuple[nn.Parameter, nn.Parameter]]:
    """``(lora_A, lora_B)`` of every adapted layer (fastlora's, or PEFT's over any base layer) by its module path
    without PEFT's ``base_model.model.`` prefix, so that every contender names them alike."""
    from peft.tuners.lora.layer import LoraLayer

    from ..layers import LoraLinear

    factors = {}
    for path, module in model.named_modules():
        name = path.removeprefix("base_model.model.")
        if isinstance(module, LoraLinear):
            factors[name] = (module.lora_A, module.lora_B)
        elif isinstance(module, LoraLayer) and "default" in module.lora_A:
            factors[name] = (module.lora_A["default"].weight, module.lora_B["default"].weight)
    return factors


@torch.no_grad()
def set_lora_weights(model: nn.Module, seed: int = 1) -> None:
    """The same LoRA weights in every contender: drawn layer by layer in sorted name order from one generator on CPU
    (the same draw on every device), ``lora_A`` of norm about 1 per row, ``lora_B`` non-zero."""
    g = torch.Generator().manual_seed(seed)
    factors = lora_factors(model)
    for name in sorted(factors):
        A, B = factors[name]
        A.copy_(torch.randn(A.shape, generator=g) * A.shape[1] ** -0.5)
        B.copy_(torch.randn(B.shape, generator=g) * B.shape[1] ** -0.5 * 0.1)


def to_bitsandbytes(model: nn.Module, compute_dtype: torch.dtype) -> nn.Module:
    """Every ``Nf4Linear`` of ``model`` replaced, in place, by a bitsandbytes ``Linear4bit`` over the same bytes, and
    the model marked as transformers marks a model it loaded in 4 bits (``is_loaded_in_4bit``), so that PEFT puts its
    QLoRA layer over them."""
    from ..layers import Nf4Linear
    from ..model import set_submodule

    layers = [(name, module) for name, module in model.named_modules() if isinstance(module, Nf4Linear)]
    for name, module in layers:
        set_submodule(model, name, bnb_linear4bit(module.quantized_weight(), module.bias, compute_dtype))
    model.is_loaded_in_4bit = True
    return model


def build_qlora_model(case: TrainCase, name: str, device: torch.device) -> nn.Module:
    """A fresh model for contender ``name``: base weights from seed 0 in the case's dtype on ``device``, its adapted
    layers quantized (``QUANTIZATION``) unless ``name`` is the LoRA model, adapted at r = ``case.r``
    (``lora_alpha`` = 2·r) as the contender does it, and its LoRA weights set by ``set_lora_weights``. In training
    mode."""
    import peft

    from ..config import LoraConfig
    from ..model import apply_lora, quantize_nf4
    from ..peft_compat import patch_peft

    model = build_llama(case, device)
    if name != LORA:
        quantize_nf4(model, **QUANTIZATION)
    if name in (LORA, QLORA):
        apply_lora(model, LoraConfig(r=case.r, lora_alpha=2 * case.r, target_modules=list(ADAPTED)))
    else:
        to_bitsandbytes(model, case.torch_dtype)
        with quiet_peft():
            model = peft.get_peft_model(model, peft.LoraConfig(r=case.r, lora_alpha=2 * case.r,
                                                               target_modules=list(ADAPTED)))  # fmt: skip
        if name == PATCHED and (skipped := patch_peft(model, return_summary=True)[1].skipped):
            raise RuntimeError(f"patch_peft left layers to PEFT's forward, so {PATCHED} would time PEFT: {skipped}")
    set_lora_weights(model)
    return model.train()


def reference_values(model: nn.Module, batch: torch.Tensor) -> dict[str, torch.Tensor]:
    """Loss and the norm of every LoRA gradient of one forward+backward (no dropout, so in training mode: eval mode
    would switch bitsandbytes on a CPU to its inference kernel), gradients cleared after."""
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    norms = [t.grad.float().norm() for pair in lora_factors(model).values() for t in pair]
    out = {"loss": loss.detach().float(), "lora grad norm": torch.linalg.vector_norm(torch.stack(norms))}
    model.zero_grad(set_to_none=True)
    return out


def held_beyond_parameters(model: nn.Module) -> tuple[int, int]:
    """``(parameters, bytes)``: the model's parameter count with each 4-bit weight counted as its ``out · in``
    elements (``fastlora.print_trainable_parameters``, PEFT's count), and the bytes it holds beyond its parameters
    (buffers, such as an ``Nf4Linear``'s 4-bit weight, and bitsandbytes' quantization states)."""
    from ..model import print_trainable_parameters

    with contextlib.redirect_stdout(io.StringIO()):
        _, count = print_trainable_parameters(model)
    params = list(model.parameters())
    held = [*params, *model.buffers(), *(t for p in params for t in bnb_state_tensors(p))]
    return count, storage_bytes(held) - storage_bytes(params)


TRAIN_RATIOS = {
    "speedup_over_peft": (BNB_PEFT, "median_ms", True),
    "peak_over_peft": (BNB_PEFT, "peak_step_bytes", False),
    "ratio_to_lora": (LORA, "median_ms", False),
}


def _train_row(case: TrainCase, name: str, params: int | None, **figures) -> dict:
    return {"contender": name, **dataclasses.asdict(case), "shape": case.shape, "tokens": case.tokens,
            "params": params, **figures}  # fmt: skip


def measure_train_case(
    case: TrainCase, device: torch.device, min_run_time: float, headline: bool = False
) -> list[dict]:
    """The 4-bit contenders checked against the first and timed (``train.measure_steps``), then the unquantized LoRA
    model; each row's parameter count and weights corrected for what ``measure_steps`` does not see
    (``held_beyond_parameters``); a bitsandbytes contender that cannot run gets a row with the reason as its status.
    Then the ratios. (``headline``, as ``level`` passes it, changes nothing: a headline run has no case here.)"""
    issue = bnb_issue(device.type)
    held: dict[str, tuple[int, int]] = {}

    def build(name: str) -> nn.Module:
        model = build_qlora_model(case, name, device)
        held[name] = held_beyond_parameters(model)
        return model

    batch, row = make_batch(case, device), functools.partial(_train_row, case)
    quantized = tuple(name for name in TRAIN_CONTENDERS if name != LORA and not (issue and name in BNB_CONTENDERS))
    measured = {r["contender"]: r for names in (quantized, (LORA,))
                for r in measure_steps(case, names, build, batch, reference_values, check_train_agreement, row, device,
                                       min_run_time)}  # fmt: skip
    for name, r in measured.items():
        if r["status"] == "ok":
            r["params"], r["state_bytes"] = held[name][0], r["state_bytes"] + held[name][1]
    rows = [measured.get(name) or row(name, None, status=issue) for name in TRAIN_CONTENDERS]
    add_ratios(rows, TRAIN_RATIOS)
    return rows


# ----------------------------------------------------------------------------------------------- levels


def level(
    cases: Callable[[torch.device, bool, bool], list],
    measure: Callable[..., list[dict]],
    what: str,
    min_run_time: float,
) -> Callable[..., list[dict]]:
    """A level's ``run``: every case of ``cases(device, quick, headline)`` measured in turn (``measure(case, device,
    seconds, headline)``, ``seconds`` a tenth of ``min_run_time`` when quick) on the device's backend, on one CPU
    thread. bitsandbytes is imported first, when it can be, so that PEFT finds it imported (``import_bitsandbytes``)."""

    def run(device: torch.device, quick: bool = False, progress_bar: bool = False, headline: bool = False) -> list:
        bnb_issue(device.type)
        rows = []
        with forced_backend(bench_backend(device)), cpu_threads(device, 1):
            for case in progress(cases(device, quick, headline), what, progress_bar):
                rows.extend(measure(case, device, min_run_time / 10 if quick else min_run_time, headline))
        return rows

    return run


# ----------------------------------------------------------------------------------------------- report


def _ok(rows: list[dict]) -> Iterator[dict]:
    return (row for row in rows if row["status"] == "ok")


def _plotted(rows: list[dict]) -> list[dict]:
    """The layer rows the plot draws: those measured, and none of a headline run, whose figures are in its table and
    targets.md; ``./dev gpu`` brings back at most 8 files, which the other suites' plots and its reports fill."""
    return [row for row in _ok(rows) if not row.get("headline")]


def layer_markdown(rows: list[dict]) -> list[str]:
    """A line per (case, contender): its time, its ratios, its peak memory and the bytes of its frozen weight."""
    intro = (
        "One linear layer, bf16 activations, fp32 LoRA weights, frozen bias. `fwd+bwd`: forward of `x` (which needs "
        "its gradient), backward of a fixed upstream gradient; `decode`: the forward alone, in inference. The 4-bit "
        "weight is NF4, blocks of 64, double quantization, the same bytes for every 4-bit contender. Median ms "
        "(20/80% quantiles in results.json); / frozen is the time over the frozen bf16 `nn.Linear`'s; speedup is "
        f"{BNB_PEFT}'s time over the contender's (target for {QLORA}, `fwd+bwd`: ≥ {TARGET_SPEEDUP_OVER_BNB:g}×); "
        f"/ LoRA is the time over {LORA}'s, the same layer over the bf16 weight (targets for {QLORA}: ≤ "
        f"{TARGET_RATIO_TO_LORA}× in `fwd+bwd`, < {TARGET_DECODE_RATIO_TO_LORA:g}× in `decode`); peak is the most "
        "memory a call allocates above what it starts with; weights are the frozen weight's bytes as the contender "
        "stores it. Targets P14 to P16 read the "
        "GPU headline cases. A contender that did not run says why, and is measured against by nothing."
    )
    header = ["M", "K", "N", "r", "mode", "contender", "median (ms)", "/ frozen", f"speedup over {BNB_PEFT}",
              "/ LoRA", "peak", "weights"]  # fmt: skip
    table = []
    for row in rows:
        case = [row["M"], row["K"], row["N"], row["r"], row["mode"], row["contender"]]
        if row["status"] != "ok":
            table.append([*case, row["status"], "", "", "", "", ""])
            continue
        table.append([*case, f"{row['median_ms']:.4g}", fmt_ratio(row["ratio_to_frozen"]),
                      fmt_ratio(row["speedup_over_peft"]), fmt_ratio(row["ratio_to_lora"]),
                      fmt_bytes(row["peak_bytes"]), fmt_bytes(row["weight_bytes"])])  # fmt: skip
    plot = ["", f"![QLoRA layer]({LAYER_PLOT})"] if _plotted(rows) else []
    return ["### layer", "", intro, "", *md_table(header, table), *plot]


def layer_plots(rows: list[dict], out_dir: Path) -> list[Path]:
    """Per case, a bar per contender measured: its time over ``fastlora LoRA``'s with the target drawn (left),
    and its peak memory (right). None for a headline run (``_plotted``)."""
    ok = _plotted(rows)
    if not ok:
        return []
    plt = pyplot()
    contenders = list(dict.fromkeys(row["contender"] for row in ok))
    cases = list(dict.fromkeys((row["M"], row["mode"]) for row in ok))
    value = {((row["M"], row["mode"]), row["contender"]): row for row in ok}
    fig, axes = plt.subplots(1, 2, figsize=(max(10.0, 3.2 * len(cases) + 3), 4.6))
    grouped_bars(axes[0], cases, contenders, {pair: row["ratio_to_lora"] or 0 for pair, row in value.items()})
    axes[0].axhline(TARGET_RATIO_TO_LORA, color="tab:red", linewidth=0.8, linestyle="--",
                    label=f"{QLORA} target, fwd+bwd: {TARGET_RATIO_TO_LORA}×")  # fmt: skip
    axes[0].axhline(1.0, color="grey", linewidth=0.8)
    grouped_bars(axes[1], cases, contenders, {pair: row["peak_bytes"] / 2**20 for pair, row in value.items()})
    for ax, title in ((axes[0], f"time / {LORA}"), (axes[1], "peak memory of a call, MiB")):
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels([f"M={M}\n{mode}" for M, mode in cases], fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].legend(fontsize=7)
    K, N = ok[0]["K"], ok[0]["N"]
    fig.suptitle(plot_title(f"one QLoRA layer (NF4 base), K={K} N={N} r={ok[0]['r']}", ok), fontsize=11)
    fig.tight_layout()
    return [save_plot(fig, out_dir / LAYER_PLOT)]


def train_markdown(rows: list[dict]) -> list[str]:
    """A line per (case, contender), as the ``train`` suite's table, against ``bitsandbytes + PEFT``."""
    intro = (
        "One optimizer step (forward with loss, backward, AdamW step, zero_grad) of a Llama-style model built from "
        "a config, LoRA on q/k/v/o and gate/up/down, those layers quantized to NF4 (double quantization; the output "
        f"head in bf16) except for {LORA}, whose model is the unquantized one. Median step time (20/80% quantiles in "
        "results.json), tokens per second, the weights (4-bit ones as stored) and optimizer state, the peak memory "
        f"of a step above them, each against {BNB_PEFT} (`get_peft_model` over bitsandbytes `Linear4bit` layers), "
        f"and the step time over {LORA}'s."
    )
    steps = [column.replace("PEFT", BNB_PEFT) for column in STEP_HEADER]
    header = ["size", "params", "batch×seq", "r", "dtype", "contender", *steps, "/ LoRA"]
    table = [
        [row["size"], f"{row['params'] / 1e6:.1f}M" if row.get("params") else "", f"{row['batch']}×{row['seq']}",
         row["r"], row["dtype"], row["contender"], *step_cells(row), fmt_ratio(row.get("ratio_to_lora"))]
        for row in rows
    ]  # fmt: skip
    plot = ["", f"![QLoRA training step]({TRAIN_PLOT})"] if any(_ok(rows)) else []
    return ["### train", "", intro, "", *md_table(header, table), *plot]


def train_plots(rows: list[dict], out_dir: Path) -> list[Path]:
    """Tokens per second (left) and peak step memory (right) per model, a bar per contender measured."""
    return step_plots(list(_ok(rows)), out_dir, ("size", "batch", "seq"),
                      lambda size, batch, seq: f"{size}\n{batch}×{seq}", "one QLoRA training step, Llama-style model",
                      TRAIN_PLOT)  # fmt: skip


LAYER = Suite("layer", level(qlora_layer_cases, measure_layer_case, "qlora layer", 0.5), layer_markdown, layer_plots,
              (LAYER_PLOT,))  # fmt: skip
TRAIN = Suite("train", level(qlora_train_cases, measure_train_case, "qlora train", 2.0), train_markdown, train_plots,
              (TRAIN_PLOT,))  # fmt: skip
SUITE = multilevel_suite("qlora", (LAYER, TRAIN))
