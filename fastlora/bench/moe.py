"""The ``moe`` suite: LoRA on the experts of mixture-of-experts layers (PEFT's ``target_parameters``), at two levels
(``common.multilevel_suite``: rows carry ``level``, ``block`` or ``train``).

``block``: one sparse MoE block of a Qwen3-MoE config (transformers' ``Qwen3MoeSparseMoeBlock``: the top-k router and
the fused experts ``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``), in training: ``x [1, tokens, H]`` requires
grad (so the backward computes ``dx``, as inside a model), the forward, then the backward of a fixed upstream
gradient, with the inputs' ``.grad`` set to None at the start of every call (inside the timed region, the same for
every contender). The experts run transformers' ``grouped_mm`` implementation (``config._experts_implementation``).
Contenders, all around one set of base weights (shared, not copied):

- ``frozen block``: the block without LoRA (the floor);
- ``PEFT``: ``peft.get_peft_model`` with ``target_parameters`` on ``experts.gate_up_proj`` and ``experts.down_proj``
  (PEFT's ``ParamWrapper`` folds ``W_e + s·B_e·A_e`` into a full copy of each expert weight in every forward);
- ``fastlora apply_lora``: ``fastlora.apply_lora`` with the same config (``LoraExperts``: the grouped GEMM of the
  base weights plus fastlora's grouped LoRA op, ``ΔW`` never formed);
- ``PEFT + fastlora.patch_peft``: the PEFT block, its expert wrappers patched to run fastlora's grouped op (a layer
  ``patch_peft`` leaves to PEFT, or a call that falls back to PEFT's forward, stops the run: ``no_fallback``).

The router is left out of the adapters: LoRA on it (``mlp.gate.weight``) is an ``E × H`` matrix that every contender
computes the same way (``W + s·B·A`` through the router's own forward), so it would only dilute the comparison of the
experts. The router still runs, frozen, and ``dx`` flows through it. LoRA weights are fp32 on a bf16 block (PEFT's
and fastlora's default), the same values in every contender (drawn from one seeded generator in a common layout,
``lora_B`` non-zero so that the adapters matter), r = 16, ``lora_alpha`` = 2·r, no dropout (PEFT refuses dropout on
parameters). Before a contender is timed, its output, ``dx`` and the gradients of every ``lora_A`` / ``lora_B`` (in a
common layout) must match PEFT's (``block_reduction_lengths``). Reported per row: median time of forward+backward
with 20/80% quantiles, its ratio to the frozen block's, PEFT's time over it, the peak memory of a forward+backward
above what was allocated before it (``common.peak_memory_bytes``) and its ratio to PEFT's. On CUDA, a case whose
memory estimate (``block_bytes``: PEFT's full-size copies of every expert weight and their gradients) does not fit
the device is left out; a contender that runs out of memory anyway gets a row marked ``OOM``.

GPU cases (bf16, r = 16): a Qwen3-30B-A3B-shaped block (E = 128, top-8, H = 2048, I = 768) over 8192 tokens, a
Mixtral-8x7B-shaped one (E = 8, top-2, H = 4096, I = 14336) over 4096, and E = 64, top-8, I = 1408 blocks at H = 2048
(8192 tokens) and H = 4096 (4096 tokens). The first two are the headline cases of targets P11 to P13
(``fastlora.bench.targets``); a headline run draws no plot of them (``_plotted``).

``train``: one optimizer step of a small Qwen3-MoE causal LM built from a config (no downloads; on CUDA 4 layers,
H = 1024, E = 32, top-4, I = 512, vocabulary 32000, 4 × 1024 tokens), LoRA r = 16 on the
attention projections (q/k/v/o, ``target_modules``) and on the experts (``target_parameters`` on ``gate_up_proj`` and
``down_proj``), as in ``fastlora.bench.train``: forward with labels, backward, ``AdamW.step()`` over the LoRA
weights, ``zero_grad``. Contenders: ``PEFT``, ``fastlora apply_lora`` and ``PEFT + fastlora.patch_peft``, each a fresh
model from seed 0 with the same LoRA weights; the loss and the norm of the LoRA gradients must match PEFT's before a
contender is timed. Reported: tokens per second, the bytes of weights and optimizer state, the peak memory of a step
above them. The level feeds no target: headline runs measure none of its cases.

On CPU both levels run tiny fp32 shapes on the torch backend on one thread: the rows prove the suite runs, nothing
about kernel speed.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from .common import (
    DTYPES,
    PATCHED,
    BenchmarkMismatch,
    Case,
    Suite,
    assert_close,
    bench_backend,
    default_dtype,
    device_memory,
    fmt_bytes,
    fmt_ratio,
    forced_backend,
    free_memory,
    grouped_bars,
    md_table,
    multilevel_suite,
    peak_memory_bytes,
    plot_title,
    progress,
    pyplot,
    save_plot,
    time_ms,
)
from .multi_batch import cpu_threads
from .train import APPLY_LORA, PEFT_MODEL, STEP_HEADER, measure_steps, step_cells, step_plots

FROZEN_BLOCK = "frozen block"
BLOCK_CONTENDERS = (FROZEN_BLOCK, PEFT_MODEL, APPLY_LORA, PATCHED)  # PEFT before the contenders checked against it
TRAIN_CONTENDERS = (PEFT_MODEL, APPLY_LORA, PATCHED)
EXPERT_PARAMETERS = ("gate_up_proj", "down_proj")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
BLOCK_PLOT, TRAIN_PLOT = "moe_block.png", "moe_train.png"
# The targets P11 to P13 (``fastlora.bench.targets``) read from the block level's headline cases; the tables say them.
TARGET_SPEEDUP_OVER_PEFT, TARGET_PEAK_OVER_PEFT, TARGET_RATIO_TO_FROZEN = 2.0, 0.65, 1.15


# ----------------------------------------------------------------------------------------------- LoRA weights


@dataclasses.dataclass(frozen=True)
class LoraPair:
    """One adapted weight's ``lora_A`` / ``lora_B`` as a contender holds them. A linear layer's are ``[r, in]`` and
    ``[out, r]`` everywhere. A fused-experts parameter's (``experts`` > 0) are fastlora's ``[E, r, in]`` and ``[E, out,
    r]``, the common layout here, or PEFT's ``[r·E, in]`` and ``[out, r·E]`` (``peft``; see
    ``fastlora.layers.ExpertAdapter``)."""

    lora_A: nn.Parameter
    lora_B: nn.Parameter
    experts: int = 0
    peft: bool = False

    def common(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``a``, ``b`` (of this pair's layout: the factors or their gradients) in the common layout."""
        if not self.peft:
            return a, b
        from ..layers import ExpertAdapter

        return ExpertAdapter.from_peft(a, b, self.experts)

    @property
    def shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The shapes of ``lora_A`` and ``lora_B`` in the common layout."""
        a, b = self.common(self.lora_A, self.lora_B)
        return tuple(a.shape), tuple(b.shape)

    @torch.no_grad()
    def load(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Set the factors from ``a``, ``b`` in the common layout."""
        if self.peft:
            E, r, k = a.shape
            a, b = a.reshape(E * r, k), b.permute(1, 2, 0).reshape(-1, r * E)
        self.lora_A.copy_(a)
        self.lora_B.copy_(b)

    def grads(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The gradients of the factors in the common layout."""
        return self.common(self.lora_A.grad, self.lora_B.grad)


def lora_pairs(model: nn.Module) -> dict[str, LoraPair]:
    """Every adapted weight of ``model`` (fastlora's or PEFT's) by a name both spell alike: the module's path without
    PEFT's ``base_model.model.`` and ``.base_layer`` parts, and for an experts parameter its name
    (``mlp.experts.down_proj``)."""
    from peft.tuners.lora.layer import Linear as PeftLinear
    from peft.tuners.lora.layer import ParamWrapper

    from ..layers import LoraExperts, LoraLinear, LoraParameter

    pairs = {}
    for path, module in model.named_modules():
        name = path.removeprefix("base_model.model.").replace(".base_layer", "")
        if isinstance(module, LoraLinear):
            pairs[name] = LoraPair(module.lora_A, module.lora_B)
        elif isinstance(module, PeftLinear):
            pairs[name] = LoraPair(module.lora_A["default"].weight, module.lora_B["default"].weight)
        elif isinstance(module, LoraExperts):
            for param, adapter in module.lora.items():
                pairs[f"{name}.{param}"] = LoraPair(adapter.lora_A, adapter.lora_B, module.num_experts)
        elif isinstance(module, LoraParameter):  # a router's 2-D weight: a linear layer's factors
            pairs[f"{name}.{module.parameter_name}"] = LoraPair(module.lora_A, module.lora_B)
        elif type(module) is ParamWrapper:
            param = getattr(module.get_base_layer(), module.parameter_name)
            experts = param.shape[0] if param.dim() == 3 else 0
            pairs[f"{name}.{module.parameter_name}"] = LoraPair(
                module.lora_A["default"].weight, module.lora_B["default"].weight, experts, peft=experts > 0
            )
    return pairs


def set_lora_weights(model: nn.Module, seed: int = 1) -> None:
    """The same LoRA weights in every contender: drawn in the common layout, name by name in sorted order, from one
    generator on CPU (the same draw on every device); ``lora_A`` of norm about 1 per row, ``lora_B`` non-zero so that
    ``ΔW`` is about a fifth of the base weight."""
    g = torch.Generator().manual_seed(seed)
    pairs = lora_pairs(model)
    for name in sorted(pairs):
        shape_a, shape_b = pairs[name].shapes
        r, k = shape_a[-2:]
        pairs[name].load(torch.randn(shape_a, generator=g) * k**-0.5, torch.randn(shape_b, generator=g) * r**-0.5 * 0.1)


def lora_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{"<name> lora_A", "<name> lora_B": gradient}`` in the common layout, for every adapted weight."""
    grads = {}
    for name, pair in sorted(lora_pairs(model).items()):
        grads[f"{name} lora_A"], grads[f"{name} lora_B"] = pair.grads()
    return grads


def _peft_config(r: int, target_modules: list[str], target_parameters: list[str]):
    import peft

    return peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=target_modules, target_parameters=target_parameters)


def _fastlora_config(r: int, target_modules: list[str], target_parameters: list[str]):
    from ..config import LoraConfig

    return LoraConfig(r=r, lora_alpha=2 * r, target_modules=target_modules, target_parameters=target_parameters)


def adapt(model: nn.Module, name: str, r: int, target_modules: list[str], target_parameters: list[str]) -> nn.Module:
    """``model`` adapted as contender ``name`` (``PEFT_MODEL``, ``APPLY_LORA`` or ``PATCHED``) with the same LoRA
    weights as every other (``set_lora_weights``); the PEFT contenders return the ``PeftModel``."""
    import peft

    from ..model import apply_lora
    from ..peft_compat import patch_peft

    if name == APPLY_LORA:
        apply_lora(model, _fastlora_config(r, target_modules, target_parameters))
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # transformers' deprecations from inside PEFT: nothing a user acts on
            model = peft.get_peft_model(model, _peft_config(r, target_modules, target_parameters))
            if name == PATCHED and (skipped := patch_peft(model, return_summary=True)[1].skipped):
                raise RuntimeError(f"patch_peft left layers to PEFT's forward, so {PATCHED} would time PEFT: {skipped}")
    set_lora_weights(model)
    return model


@contextlib.contextmanager
def no_fallback() -> Iterator[None]:
    """A patched PEFT layer that falls back to PEFT's forward for a call (and warns, once per reason) raises instead:
    the agreement checks run under it, so that ``PATCHED`` never times PEFT's path under fastlora's name."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="fastlora: a patched PEFT LoRA layer runs PEFT's forward")
        yield


# ----------------------------------------------------------------------------------------------- block: cases


@dataclasses.dataclass(frozen=True)
class MoeBlockCase(Case):
    """One sparse MoE block: ``experts`` E, ``top_k``, ``hidden`` H, the experts' ``intermediate`` size I, the tokens
    of ``x``, the LoRA rank and the dtype of the block. ``size`` names the model whose block has these shapes."""

    size: str
    experts: int
    top_k: int
    hidden: int
    intermediate: int
    tokens: int
    r: int
    dtype: str

    @property
    def shape(self) -> str:
        return (
            f"E={self.experts} top_k={self.top_k} H={self.hidden} I={self.intermediate} tokens={self.tokens} r={self.r}"
        )

    @property
    def label(self) -> str:
        return (f"{self.size}-E{self.experts}-k{self.top_k}-H{self.hidden}-I{self.intermediate}-T{self.tokens}"
                f"-r{self.r}-{self.dtype}")  # fmt: skip

    def config(self):
        import transformers

        config = transformers.Qwen3MoeConfig(
            hidden_size=self.hidden, moe_intermediate_size=self.intermediate, intermediate_size=self.intermediate,
            num_experts=self.experts, num_experts_per_tok=self.top_k, num_hidden_layers=1, num_attention_heads=1,
            num_key_value_heads=1, head_dim=self.hidden, vocab_size=1,
        )  # fmt: skip
        config._experts_implementation = "grouped_mm"  # what a model built from this config runs
        return config


# (size, E, top_k, H, I, tokens)
QWEN3_30B_A3B = ("Qwen3-30B-A3B", 128, 8, 2048, 768, 8192)
MIXTRAL_8X7B = ("Mixtral-8x7B", 8, 2, 4096, 14336, 4096)
E64_H2048, E64_H4096 = ("E64-H2048", 64, 8, 2048, 1408, 8192), ("E64-H4096", 64, 8, 4096, 1408, 4096)
GPU_BLOCKS = (QWEN3_30B_A3B, MIXTRAL_8X7B, E64_H2048, E64_H4096)
CPU_BLOCKS = (("tiny", 4, 2, 64, 32, 64), ("tiny-E8", 8, 2, 64, 48, 64))


def block_bytes(case: MoeBlockCase) -> int:
    """A generous estimate of a forward+backward's memory for the hungriest contender, PEFT, with the base weights:
    every expert weight, PEFT's folded copy ``W + s·B·A`` and its gradient in the block's dtype with fp32 room to
    spare (16 bytes per element), and the routed rows' activations and their gradients."""
    E, H, F, rows = case.experts, case.hidden, case.intermediate, case.tokens * case.top_k
    item = DTYPES[case.dtype].itemsize
    return 3 * E * H * F * (item + 16) + 8 * rows * (2 * H + 3 * F) * 4


def moe_block_cases(device: torch.device, quick: bool = False, headline: bool = False) -> list[MoeBlockCase]:
    """On CUDA: ``GPU_BLOCKS`` in bf16 at r = 16, those whose ``block_bytes`` exceed 80% of the device's memory left
    out; quick: the Qwen3-30B-A3B shape over 4096 tokens. Headline: the Qwen3-30B-A3B and Mixtral-8x7B shapes (quick:
    the first, over 4096 tokens). On CPU: tiny fp32 blocks at r = 8 (quick and headline: one)."""
    if device.type != "cuda":
        sizes = CPU_BLOCKS[:1] if quick or headline else CPU_BLOCKS
        return [MoeBlockCase(*size, 8, "fp32") for size in sizes]
    if quick:
        sizes = [(*QWEN3_30B_A3B[:-1], 4096)]
    else:
        sizes = [QWEN3_30B_A3B, MIXTRAL_8X7B] if headline else list(GPU_BLOCKS)
    total = device_memory(device)
    cases = [MoeBlockCase(*size, 16, "bf16") for size in sizes]
    return [case for case in cases if total is None or block_bytes(case) <= 0.8 * total]


def block_reduction_lengths(case: MoeBlockCase) -> dict[str, int]:
    """What the agreement check allows for each result it compares, the longest chain of sums that makes one element:
    ``y`` sums over H (gate_up), I (down), each with its LoRA rank, then the top-k experts of a token; ``dx`` also
    over H (down's backward), 2·I (gate_up's) and the router's E logits; a LoRA gradient over H and 2·I on its way
    back, then over the tokens routed to one expert (at most all of them)."""
    H, F, r, k = case.hidden, case.intermediate, case.r, case.top_k
    return {"y": H + F + 2 * r + k, "dx": 2 * H + 3 * F + 4 * r + k + case.experts,
            "lora": 2 * H + 3 * F + 4 * r + case.tokens}  # fmt: skip


# ----------------------------------------------------------------------------------------------- block: contenders


@dataclasses.dataclass
class BlockInputs:
    """The inputs every contender of a case shares."""

    x: torch.Tensor  # [1, tokens, H], requires grad
    dy: torch.Tensor  # [1, tokens, H], the fixed upstream gradient


def build_block(case: MoeBlockCase, device: torch.device) -> nn.Module:
    """The frozen base block of ``case``, built in its dtype on ``device``, weights drawn from seed 0 on the device:
    router rows of norm about 1 (so that the top-k spreads tokens over the experts; a zero router, as transformers
    initialises it, sends every token to the first experts), expert weights scaled so that outputs are O(1)."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    with torch.device(device), default_dtype(case.torch_dtype):
        block = Qwen3MoeSparseMoeBlock(case.config())
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for param in block.parameters():
            param.normal_(0.0, param.shape[-1] ** -0.5, generator=g)
            param.requires_grad_(False)
    return block


def make_block_inputs(case: MoeBlockCase, device: torch.device, seed: int = 2) -> BlockInputs:
    g = torch.Generator(device=device).manual_seed(seed)
    x, dy = (torch.randn(1, case.tokens, case.hidden, generator=g, device=device, dtype=case.torch_dtype)
             for _ in range(2))  # fmt: skip
    return BlockInputs(x.requires_grad_(), dy)


def block_contender(base: nn.Module, case: MoeBlockCase, name: str) -> nn.Module:
    """The block contender ``name`` calls: ``base`` itself for the frozen block, else a copy of it that shares its
    weights, adapted on the experts' ``gate_up_proj`` and ``down_proj`` (for PEFT, the adapted block inside the
    ``PeftModel``)."""
    if name == FROZEN_BLOCK:
        return base
    shared = copy.deepcopy(base, {id(param): param for param in base.parameters()})
    model = adapt(shared, name, case.r, [], [f"experts.{param}" for param in EXPERT_PARAMETERS])
    return shared if name == APPLY_LORA else model.get_base_model()


def _trainable(block: nn.Module) -> list[nn.Parameter]:
    return [param for param in block.parameters() if param.requires_grad]


def make_block_step(block: nn.Module, inputs: BlockInputs) -> Callable[[], torch.Tensor]:
    """One forward+backward of ``block``: ``x``'s and the LoRA weights' gradients set to None first."""
    leaves = [inputs.x, *_trainable(block)]

    def step() -> torch.Tensor:
        for t in leaves:
            t.grad = None
        y = block(inputs.x)
        y.backward(inputs.dy)
        return y

    return step


def block_results(block: nn.Module, inputs: BlockInputs) -> dict[str, torch.Tensor]:
    """What the agreement check compares: ``y``, ``dx`` and every LoRA gradient (common layout) of one
    forward+backward (``no_fallback``); the gradients are cleared after."""
    with no_fallback():
        y = make_block_step(block, inputs)()
    out = {"y": y.detach(), "dx": inputs.x.grad, **lora_grads(block)}
    for t in (inputs.x, *_trainable(block)):
        t.grad = None
    return out


def check_block_agreement(case: MoeBlockCase, name: str, got: dict, expected: dict) -> None:
    """``got`` (``block_results`` of contender ``name``) must match PEFT's ``expected``, both computed in the case's
    dtype: the same results (same LoRA weights, by name) within the tolerance of two such results; raises
    ``BenchmarkMismatch`` otherwise."""
    if got.keys() != expected.keys():
        raise BenchmarkMismatch(f"{name} adapts {sorted(got)} and {PEFT_MODEL} {sorted(expected)} for {case.label}")
    lengths, dtype = block_reduction_lengths(case), case.torch_dtype
    for key, want in expected.items():
        what = f"{name} != {PEFT_MODEL} in {key} for {case.label}"
        assert_close(got[key], want, dtype, lengths.get(key, lengths["lora"]), what, want_dtype=dtype)


def _block_row(case: MoeBlockCase, name: str, **figures) -> dict:
    return {"contender": name, **dataclasses.asdict(case), "shape": case.shape, **figures}


def measure_block_case(case: MoeBlockCase, device: torch.device, min_run_time: float) -> list[dict]:
    """Every contender in turn around one base block (one adapted copy in memory at a time): checked against PEFT,
    timed, its peak measured; then the ratios to the frozen block and to PEFT."""
    base = build_block(case, device)
    inputs = make_block_inputs(case, device)
    rows, expected = [], None
    for name in BLOCK_CONTENDERS:
        block = step = got = None
        try:
            block = block_contender(base, case, name)
            if name != FROZEN_BLOCK:
                got = block_results(block, inputs)
                expected = expected or got
                check_block_agreement(case, name, got, expected)
            step = make_block_step(block, inputs)
            median, p20, p80 = time_ms(step, device, min_run_time)
            peak = peak_memory_bytes(step, device)
            rows.append(_block_row(case, name, status="ok", median_ms=median, p20_ms=p20, p80_ms=p80,
                                   tokens_per_s=case.tokens / (median * 1e-3), peak_bytes=peak))  # fmt: skip
        except torch.OutOfMemoryError:
            rows.append(_block_row(case, name, status="OOM"))
        finally:
            # The step closure holds the adapted block: drop every reference before the next contender.
            block = step = got = None
            inputs.x.grad = None
            free_memory(device)
    add_block_ratios(rows)
    return rows


def add_block_ratios(rows: list[dict]) -> None:
    """``ratio_to_frozen``, ``speedup_over_peft`` and ``peak_over_peft`` of each row of one case (None where a side is
    missing or out of memory)."""
    ok = {row["contender"]: row for row in rows if row["status"] == "ok"}
    frozen, peft = ok.get(FROZEN_BLOCK), ok.get(PEFT_MODEL)
    for row in rows:
        mine = row["status"] == "ok"
        row["ratio_to_frozen"] = row["median_ms"] / frozen["median_ms"] if mine and frozen else None
        row["speedup_over_peft"] = peft["median_ms"] / row["median_ms"] if mine and peft else None
        row["peak_over_peft"] = row["peak_bytes"] / peft["peak_bytes"] if mine and peft and peft["peak_bytes"] else None


def block_level(
    device: torch.device, quick: bool = False, progress_bar: bool = False, headline: bool = False
) -> list[dict]:
    rows = []
    with forced_backend(bench_backend(device)), cpu_threads(device, 1):
        for case in progress(moe_block_cases(device, quick, headline), "moe block", progress_bar):
            rows.extend(measure_block_case(case, device, 0.05 if quick else 0.5))
    return rows


# ----------------------------------------------------------------------------------------------- train


@dataclasses.dataclass(frozen=True)
class MoeTrainCase(Case):
    """A Qwen3-MoE-style causal LM (every decoder layer a sparse MoE block; ``intermediate`` is the experts'), the
    batch, the LoRA rank and the dtype of the model."""

    size: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    experts: int
    top_k: int
    intermediate: int
    vocab: int
    batch: int
    seq: int
    r: int
    dtype: str

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    @property
    def shape(self) -> str:
        return (f"hidden={self.hidden} layers={self.layers} E={self.experts} top_k={self.top_k} I={self.intermediate} "
                f"batch={self.batch}x{self.seq} r={self.r}")  # fmt: skip

    @property
    def label(self) -> str:
        return f"{self.size}-E{self.experts}-k{self.top_k}-b{self.batch}x{self.seq}-r{self.r}-{self.dtype}"

    @property
    def reduce_len(self) -> int:
        """The reduction length the agreement check allows for the loss: along the residual stream, in every layer,
        the sums over ``hidden``, the experts' ``intermediate`` and a token's ``top_k`` experts."""
        return self.layers * (self.hidden + self.intermediate + self.top_k)

    def config(self):
        import transformers

        config = transformers.Qwen3MoeConfig(
            vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
            moe_intermediate_size=self.intermediate, num_hidden_layers=self.layers, num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads, head_dim=self.hidden // self.heads, num_experts=self.experts,
            num_experts_per_tok=self.top_k, max_position_embeddings=max(self.seq, 128), tie_word_embeddings=False,
            use_cache=False,
        )  # fmt: skip
        config._experts_implementation = "grouped_mm"
        return config


# (size, hidden, layers, heads, kv_heads, experts, top_k, intermediate, vocab, batch, seq)
GPU_MODEL = ("Qwen3-MoE-0.3B", 1024, 4, 16, 4, 32, 4, 512, 32000, 4, 1024)
CPU_MODEL = ("tiny", 64, 2, 4, 2, 4, 2, 32, 256, 2, 32)


def moe_train_cases(device: torch.device, quick: bool = False, headline: bool = False) -> list[MoeTrainCase]:
    """One small Qwen3-MoE-style model: on CUDA in bf16 at r = 16 (quick: sequences of 512), on CPU tiny in fp32 at
    r = 8. None in headline runs: no target reads this level."""
    if headline:
        return []
    if device.type != "cuda":
        return [MoeTrainCase(*CPU_MODEL, 8, "fp32")]
    size = (*GPU_MODEL[:-1], 512) if quick else GPU_MODEL
    return [MoeTrainCase(*size, 16, "bf16")]


def build_moe_model(case: MoeTrainCase, name: str, device: torch.device) -> nn.Module:
    """A fresh model for contender ``name``: base weights from seed 0 built in the case's dtype on ``device``
    (transformers' init: routers included), adapted (``adapt``) on the attention projections and the experts. In
    training mode."""
    import transformers

    torch.manual_seed(0)
    with torch.device(device), default_dtype(case.torch_dtype):
        model = transformers.Qwen3MoeForCausalLM(case.config())
    targets = [f"mlp.experts.{param}" for param in EXPERT_PARAMETERS]
    return adapt(model, name, case.r, list(ATTENTION), targets).train()


def make_batch(case: MoeTrainCase, device: torch.device) -> torch.Tensor:
    """``[batch, seq]`` token ids drawn on CPU from a fixed seed: the same ids on every device."""
    g = torch.Generator().manual_seed(2)
    return torch.randint(0, case.vocab, (case.batch, case.seq), generator=g).to(device)


def reference_values(model: nn.Module, batch: torch.Tensor) -> dict[str, torch.Tensor]:
    """Loss and the norm of every LoRA gradient of one forward+backward (``no_fallback``), gradients cleared after."""
    with no_fallback():
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
    grads = list(lora_grads(model).values())
    out = {
        "loss": loss.detach().float(),
        "lora grad norm": torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads])),
    }
    model.zero_grad(set_to_none=True)
    return out


def check_train_agreement(case: MoeTrainCase, name: str, got: dict, expected: dict) -> None:
    """``got`` (``reference_values`` of contender ``name``) must match PEFT's ``expected``; raises
    ``BenchmarkMismatch`` otherwise. The gradients also sum over every token of the batch."""
    lengths = {"loss": case.reduce_len, "lora grad norm": case.reduce_len + case.tokens}
    for key, want in expected.items():
        what = f"{name} != {PEFT_MODEL} in {key} for {case.label}"
        assert_close(got[key], want, case.torch_dtype, lengths[key], what, want_dtype=case.torch_dtype)


def _train_row(case: MoeTrainCase, name: str, params: int | None, **figures) -> dict:
    return {"contender": name, **dataclasses.asdict(case), "shape": case.shape, "tokens": case.tokens,
            "params": params, **figures}  # fmt: skip


def measure_train_case(case: MoeTrainCase, device: torch.device, min_run_time: float) -> list[dict]:
    """Every contender in turn: checked against PEFT, timed, its peak measured (``train.measure_steps``)."""
    return measure_steps(case, TRAIN_CONTENDERS, lambda name: build_moe_model(case, name, device),
                         make_batch(case, device), reference_values, check_train_agreement,
                         functools.partial(_train_row, case), device, min_run_time)  # fmt: skip


def train_level(
    device: torch.device, quick: bool = False, progress_bar: bool = False, headline: bool = False
) -> list[dict]:
    rows = []
    with forced_backend(bench_backend(device)), cpu_threads(device, 1):
        for case in progress(moe_train_cases(device, quick, headline), "moe train", progress_bar):
            rows.extend(measure_train_case(case, device, 0.2 if quick else 2.0))
    return rows


# ----------------------------------------------------------------------------------------------- report


def _ok(rows: list[dict]) -> Iterator[dict]:
    return (row for row in rows if row["status"] == "ok")


def block_markdown(rows: list[dict]) -> list[str]:
    """A line per (case, contender): its forward+backward time, ratios and peak memory."""
    intro = (
        "One sparse MoE block (router + experts, Qwen3-MoE's) in training: forward of `x [1, tokens, H]` (which "
        "needs its gradient), backward of a fixed upstream gradient. LoRA on the experts' `gate_up_proj` and "
        "`down_proj` (PEFT's `target_parameters`; the router not adapted); the experts run transformers' `grouped_mm`. "
        "Median ms (20/80% quantiles in results.json); / frozen is the time over the frozen block's (target ≤ "
        f"{TARGET_RATIO_TO_FROZEN}×); speedup is PEFT's time over the contender's (target ≥ "
        f"{TARGET_SPEEDUP_OVER_PEFT:g}×); peak is the most memory a forward+backward allocates above what it starts "
        f"with (target ≤ {TARGET_PEAK_OVER_PEFT}× PEFT's). Targets P11 to P13 read the first two GPU shapes."
    )
    header = ["size", "E", "top-k", "H", "I", "tokens", "r", "dtype", "contender", "fwd+bwd (ms)", "/ frozen",
              "speedup over PEFT", "peak fwd+bwd", "peak / PEFT"]  # fmt: skip
    table = []
    for row in rows:
        case = [row["size"], row["experts"], row["top_k"], row["hidden"], row["intermediate"], row["tokens"], row["r"],
                row["dtype"], row["contender"]]  # fmt: skip
        if row["status"] != "ok":
            table.append([*case, row["status"], "", "", "", ""])
            continue
        table.append([*case, f"{row['median_ms']:.4g}", fmt_ratio(row["ratio_to_frozen"]),
                      fmt_ratio(row["speedup_over_peft"]), fmt_bytes(row["peak_bytes"]),
                      fmt_ratio(row["peak_over_peft"])])  # fmt: skip
    plot = ["", f"![MoE block]({BLOCK_PLOT})"] if _plotted(rows) else []
    return ["### block", "", intro, "", *md_table(header, table), *plot]


def _plotted(rows: list[dict]) -> list[dict]:
    """The block rows the plot draws: those measured, and none of a headline run, whose figures are in its table and
    targets.md; ``./dev gpu`` brings back at most 8 files, which the other suites' plots and its reports fill."""
    return [row for row in _ok(rows) if not row.get("headline")]


def block_plots(rows: list[dict], out_dir: Path) -> list[Path]:
    """Per case, a bar per contender: forward+backward time over the frozen block's (left) and peak memory over
    PEFT's (right), each with its target drawn. None for a headline run (``_plotted``)."""
    ok = _plotted(rows)
    if not ok:
        return []
    plt = pyplot()
    contenders = list(dict.fromkeys(row["contender"] for row in rows))
    cases = list(dict.fromkeys((row["size"], row["tokens"]) for row in ok))
    value = {((row["size"], row["tokens"]), row["contender"]): row for row in ok}
    fig, axes = plt.subplots(1, 2, figsize=(max(9.0, 2.6 * len(cases) + 3), 4.4))
    panels = ((axes[0], "ratio_to_frozen", TARGET_RATIO_TO_FROZEN, "forward+backward time / frozen block"),
              (axes[1], "peak_over_peft", TARGET_PEAK_OVER_PEFT, "peak memory of forward+backward / PEFT"))  # fmt: skip
    for ax, key, target, title in panels:
        grouped_bars(ax, cases, contenders, {pair: row[key] or 0 for pair, row in value.items()})
        ax.axhline(target, color="tab:red", linewidth=0.8, linestyle="--", label=f"target {target}×")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels([f"{size}\n{tokens} tokens" for size, tokens in cases], fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(plot_title("one MoE block, LoRA on the experts", ok), fontsize=11)
    fig.tight_layout()
    return [save_plot(fig, out_dir / BLOCK_PLOT)]


def train_markdown(rows: list[dict]) -> list[str]:
    """A line per (case, contender), as the ``train`` suite's table."""
    intro = (
        "One optimizer step (forward with loss, backward, AdamW step, zero_grad) of a Qwen3-MoE-style model built from "
        "a config, LoRA on q/k/v/o (`target_modules`) and on the experts' `gate_up_proj` and `down_proj` "
        "(`target_parameters`). Median step time (20/80% quantiles in results.json), tokens per second, the weights "
        "and optimizer state, and the peak memory of a step above them."
    )
    header = ["size", "params", "E", "top-k", "batch×seq", "r", "dtype", "contender", *STEP_HEADER]
    table = [
        [row["size"], f"{row['params'] / 1e6:.1f}M" if row["params"] else "", row["experts"], row["top_k"],
         f"{row['batch']}×{row['seq']}", row["r"], row["dtype"], row["contender"], *step_cells(row)]
        for row in rows
    ]  # fmt: skip
    return ["### train", "", intro, "", *md_table(header, table), "", f"![MoE training step]({TRAIN_PLOT})"]


def train_plots(rows: list[dict], out_dir: Path) -> list[Path]:
    """Tokens per second (left) and peak step memory (right) per model, a bar per contender."""
    return step_plots(rows, out_dir, ("size", "batch", "seq"), lambda size, batch, seq: f"{size}\n{batch}×{seq}",
                      "one training step, Qwen3-MoE-style model", TRAIN_PLOT)  # fmt: skip


BLOCK = Suite("block", block_level, block_markdown, block_plots, (BLOCK_PLOT,))
TRAIN = Suite("train", train_level, train_markdown, train_plots, (TRAIN_PLOT,))
SUITE = multilevel_suite("moe", (BLOCK, TRAIN))
