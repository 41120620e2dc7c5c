"""The ``multi`` suite: many adapters in one batch (the serving path), at the layer and at the model level.

**Layer** (``MultiCase``): one projection ``x [T, K] -> [T, N]`` whose ``T`` tokens use ``D`` distinct adapters, each
token's adapter drawn in shuffled order (every adapter gets ``T / D`` tokens, to within one, not in runs), from a pool
of ``slots`` adapters (the registered adapters resident on the device) of the case's rank mix (``"16"``, or
``"8,16,32,64"`` cycled over the batch's adapters). Contenders, all on the same ``x``, ``W0``, bias and adapter
weights, under ``torch.no_grad`` (inference):

- ``base only``: ``F.linear`` (cuBLAS on CUDA), the floor: what the layer costs with no adapter at all;
- ``PEFT mixed batch``: a PEFT ``lora.Linear`` holding the batch's ``D`` adapters as named adapters (in the pool's
  dtype, with the same values), called with ``adapter_names=`` (one per token): PEFT's ``_mixed_batch_forward``,
  which runs the base layer and then one gather, two small matmuls and one scatter per adapter;
- ``fastlora multi_lora_linear``: ``fastlora.multi_lora_linear`` (``impl="auto"``) over the pool and the batch's
  ``BatchMeta``; on the Triton backend also its forced paths, ``fused`` (base GEMM with the per-token expand in its
  epilogue; decode sizes only) and ``segmented`` (shrink and expand per segment of tokens of one adapter).

The ``BatchMeta`` is built once, outside the timed call: a model builds it once per forward for all its layers.

**Model** (``MultiModelCase``): a Llama-style causal LM built from a config (no downloads), q/k/v/o and
gate/up/down projections adapted, ``batch`` rows each using one of ``D`` distinct adapters (shuffled rows, every
adapter at least one row). ``mode`` is ``forward`` (one forward of ``batch × seq`` tokens, no KV cache: prefill) or
``generate`` (greedy ``generate`` of exactly ``new_tokens`` tokens per row after a ``seq``-token prompt, KV cache on;
the prefill is inside the timed call). Contenders: the base model alone (the same weights, no adapters), PEFT's
mixed batch (``get_peft_model`` and ``add_adapter`` for the batch's adapters, called with ``adapter_names=``; PEFT
keeps them in fp32 for a bf16 model, as it does by default) and ``fastlora.serving.MultiLoraModel`` (its pool in the
model's dtype, its default) with ``registered`` adapters registered and resident in as many slots. The
``registered`` sweep times ``MultiLoraModel`` alone, on a fixed batch, with more and more adapters registered: its
throughput should not depend on how many adapters the pool holds.

Tokens per second count the tokens a call computes (``batch × seq`` for a forward) or generates (``batch ×
new_tokens`` for ``generate``). Before a case is timed, fastlora's output must match PEFT's on the same inputs
(every fastlora path of the layer; the logits of a forward of the batch for a model); ``BenchmarkMismatch``
otherwise. On CPU the cases are tiny and fp32 on the torch backend, on one thread: the rows prove the suite runs,
nothing more.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import itertools
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import MULTI_FUSED_MAX_TOKENS, multi_lora_linear
from ..serving import BatchMeta, MultiLoraModel
from .common import (
    FASTLORA,
    Case,
    Suite,
    assert_close,
    bench_backend,
    forced_backend,
    md_table,
    plot_title,
    progress,
    pyplot,
    save_plot,
    time_ms,
)
from .train import _default_dtype

BASE_ONLY = "base only"
PEFT_MIXED = "PEFT mixed batch"
MULTI = f"{FASTLORA} multi_lora_linear"
BASE_MODEL = "base model"
MULTI_MODEL = f"{FASTLORA} MultiLoraModel"
MODEL_CONTENDERS = (BASE_MODEL, PEFT_MIXED, MULTI_MODEL)
SWEEPS = ("contenders", "registered")
MODES = ("forward", "generate")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
UNIFORM, MIXED = "16", "8,16,32,64"
# The target: the layer within 1.25× of the base GEMM for 32 distinct rank-16 adapters in a batch of 32.
TARGET_RATIO = 1.25
# Throughput from the fewest to the most registered adapters: within 5%.
REGISTERED_SPREAD = 0.05
# Relative to the largest magnitude of PEFT's output: catches a wrong adapter or slot, not rounding. bf16 allows for
# PEFT computing the LoRA branch with its fp32 copy of the adapters (the model level) or rounding its intermediates
# differently from the kernels.
_AGREEMENT_TOL = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2}
PLOT_LAYER, PLOT_MODEL = "multi_layer.png", "multi_model.png"


def parse_ranks(ranks: str) -> tuple[int, ...]:
    """``"8,16,32,64"`` -> ``(8, 16, 32, 64)``: the ranks the batch's adapters cycle through."""
    return tuple(int(r) for r in ranks.split(","))


def _check_common(where: str, ranks: str, adapters: int, pool: int, pool_name: str) -> None:
    if not ranks or any(r < 1 for r in parse_ranks(ranks)):
        raise ValueError(f"{where}: ranks must be positive integers separated by commas, got {ranks!r}")
    if not 1 <= adapters <= pool:
        raise ValueError(f"{where}: adapters ({adapters}) must be between 1 and {pool_name} ({pool})")


# ----------------------------------------------------------------------------------------------- layer cases


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
        _check_common("MultiCase", self.ranks, self.adapters, self.slots, "slots")
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


def layer_cases(device: torch.device, quick: bool = False) -> list[MultiCase]:
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


def spread(count: int, total: int) -> list[int]:
    """``count`` indices spread evenly over ``range(total)``: the batch's adapters sit all over the pool, not in its
    first slots."""
    return [i * total // count for i in range(count)]


def shuffled_assignment(items: int, groups: int, seed: int) -> list[int]:
    """For each of ``items`` tokens (or rows), one of ``groups`` groups: every group equally often (to within one),
    in a seeded random order."""
    g = torch.Generator().manual_seed(seed)
    return [i % groups for i in torch.randperm(items, generator=g).tolist()]


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


def _no_grad(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    def call() -> torch.Tensor:
        with torch.no_grad():
            return fn()

    return call


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
        out[name] = _no_grad(fn)
    return out


def check_layer_agreement(case: MultiCase, contenders: dict[str, Callable[[], torch.Tensor]]) -> None:
    """Every fastlora path must match PEFT's mixed batch on the same inputs; raises ``BenchmarkMismatch``."""
    want = contenders[PEFT_MIXED]()
    tol = _AGREEMENT_TOL[case.torch_dtype]
    for name, fn in contenders.items():
        if name.startswith(MULTI):
            assert_close(fn(), want, tol, f"{name} != {PEFT_MIXED} for {case.label}")


def _layer_rows(case: MultiCase, timings: dict[str, tuple[float, float, float]]) -> list[dict]:
    base, peft = timings[BASE_ONLY][0], timings[PEFT_MIXED][0]
    return [
        {
            "suite": "multi",
            "level": "layer",
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


# ----------------------------------------------------------------------------------------------- model cases


@dataclasses.dataclass(frozen=True)
class MultiModelCase(Case):
    """A Llama-style model (``size`` names it), ``mode`` (``forward`` or ``generate``), ``batch`` rows of ``seq``
    prompt tokens (``new_tokens`` generated per row), ``adapters`` distinct adapters among the rows, their rank mix,
    ``registered`` adapters in the pool (all resident), the model's dtype, and ``sweep``: ``contenders`` (base, PEFT
    and fastlora) or ``registered`` (fastlora alone, one point of the registered-adapters sweep)."""

    size: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
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
        _check_common("MultiModelCase", self.ranks, self.adapters, self.registered, "registered")
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
    def shape(self) -> str:
        new = f"+{self.new_tokens}" if self.mode == "generate" else ""
        return (f"hidden={self.hidden} layers={self.layers} {self.mode} {self.batch}x{self.seq}{new} "
                f"D={self.adapters} r={self.ranks} registered={self.registered}")  # fmt: skip

    @property
    def label(self) -> str:
        return (f"{self.size}-{self.mode}-b{self.batch}x{self.seq}+{self.new_tokens}-D{self.adapters}-"
                f"r{self.ranks.replace(',', '_')}-R{self.registered}-{self.dtype}-{self.sweep}")  # fmt: skip

    def config(self):
        import transformers

        return transformers.LlamaConfig(
            vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
            num_hidden_layers=self.layers, num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
            max_position_embeddings=max(self.seq + self.new_tokens, 128), tie_word_embeddings=False,
        )  # fmt: skip


# (size, hidden, layers, heads, kv_heads, intermediate, vocab)
_GPU_MODELS = (
    ("160M", 768, 12, 12, 12, 2048, 32000),
    ("1.1B", 2048, 22, 32, 4, 5632, 32000),  # TinyLlama's shape
)
_CPU_MODEL = ("tiny", 64, 2, 4, 2, 176, 256)


def gpu_model_cases(quick: bool = False) -> list[MultiModelCase]:
    """bf16, mixed ranks, 32 slots: decode (``generate`` of 32 tokens for 32 rows of a 128-token prompt) with 1, 8
    and 32 distinct adapters, and a prefill of 8 × 512 tokens with 8 adapters, for the 160M and 1.1B shapes; then the
    160M decode batch with 8 rank-16 adapters while 8 to 512 adapters are registered. Quick: the 160M decode with 8
    adapters, and 8 and 128 registered."""

    def compare(model, mode, batch, seq, new, D):
        return MultiModelCase(*model, mode, batch, seq, new, D, MIXED, 32, "bf16", "contenders")

    def registered(R):
        return MultiModelCase(*_GPU_MODELS[0], "generate", 32, 128, 32, 8, UNIFORM, R, "bf16", "registered")

    if quick:
        return [compare(_GPU_MODELS[0], "generate", 32, 128, 32, 8), registered(8), registered(128)]
    cases = [compare(model, "generate", 32, 128, 32, D) for model in _GPU_MODELS for D in (1, 8, 32)]
    cases += [compare(model, "forward", 8, 512, 0, 8) for model in _GPU_MODELS]
    return cases + [registered(R) for R in (8, 32, 128, 512)]


def cpu_model_cases(quick: bool = False) -> list[MultiModelCase]:
    """A tiny fp32 Llama (2 layers, hidden 64): a short ``generate`` and a forward with mixed ranks, and 4 to 16
    registered adapters."""

    def compare(mode, seq, new, D):
        return MultiModelCase(*_CPU_MODEL, mode, 4, seq, new, D, MIXED, 4, "fp32", "contenders")

    def registered(R):
        return MultiModelCase(*_CPU_MODEL, "generate", 4, 8, 4, 2, UNIFORM, R, "fp32", "registered")

    if quick:
        return [compare("generate", 8, 4, 4), compare("forward", 16, 0, 4), registered(4), registered(16)]
    return (
        [compare("generate", 8, 4, D) for D in (1, 2, 4)]
        + [compare("forward", 64, 0, 4)]
        + [registered(R) for R in (4, 16, 64)]
    )


def model_cases(device: torch.device, quick: bool = False) -> list[MultiModelCase]:
    return gpu_model_cases(quick) if device.type == "cuda" else cpu_model_cases(quick)


def model_contender_names(case: MultiModelCase) -> list[str]:
    return list(MODEL_CONTENDERS) if case.sweep == "contenders" else [MULTI_MODEL]


def build_base_model(case: MultiModelCase, device: torch.device) -> nn.Module:
    """The base model, weights from seed 0, in the case's dtype on ``device``, in eval mode."""
    import transformers

    torch.manual_seed(0)
    with torch.device(device), _default_dtype(case.torch_dtype):
        return transformers.LlamaForCausalLM(case.config()).eval()


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
    """A fresh model for ``contender``: the base model; PEFT with the batch's adapters; or a ``MultiLoraModel`` with
    ``registered`` adapters registered and made resident (one slot each)."""
    import peft
    from peft import set_peft_model_state_dict

    model = build_base_model(case, device)
    shapes = target_shapes(model)
    if contender == BASE_MODEL:
        return model
    if contender == PEFT_MIXED:
        peft_model = None
        with warnings.catch_warnings():
            # transformers deprecation warnings raised from inside PEFT: nothing a benchmark user can act on
            warnings.simplefilter("ignore", FutureWarning)
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
    g = torch.Generator().manual_seed(2)
    return torch.randint(3, case.vocab, (case.batch, case.seq), generator=g).to(device)


def _call_kwargs(case: MultiModelCase, contender: str) -> dict:
    rows = row_adapters(case)
    return {} if contender == BASE_MODEL else {"adapter_names": rows}


@torch.no_grad()
def forward_logits(model, case: MultiModelCase, contender: str, ids: torch.Tensor) -> torch.Tensor:
    """The logits of one forward of the batch (each row with its adapter), for the agreement check."""
    return model(input_ids=ids, use_cache=False, **_call_kwargs(case, contender)).logits


def model_step(model, case: MultiModelCase, contender: str, ids: torch.Tensor) -> Callable[[], torch.Tensor]:
    """The timed call: one forward of the batch, or a greedy ``generate`` of exactly ``new_tokens`` per row."""
    kwargs = _call_kwargs(case, contender)
    if case.mode == "forward":
        return _no_grad(lambda: model(input_ids=ids, use_cache=False, **kwargs).logits)
    mask = torch.ones_like(ids)
    n = case.new_tokens

    def generate() -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # generation-config notices, the same on every call
            return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                  do_sample=False, pad_token_id=0, **kwargs)  # fmt: skip

    return _no_grad(generate)


def check_model_agreement(case: MultiModelCase, got: torch.Tensor, want: torch.Tensor) -> None:
    """``MultiLoraModel``'s logits must match PEFT's mixed batch on the same rows; raises ``BenchmarkMismatch``."""
    assert_close(
        got, want, _AGREEMENT_TOL[case.torch_dtype], f"{MULTI_MODEL} != {PEFT_MIXED} in logits for {case.label}"
    )


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def peft_reference(case: MultiModelCase, device: torch.device, ids: torch.Tensor) -> torch.Tensor:
    model = build_model(case, PEFT_MIXED, device)
    logits = forward_logits(model, case, PEFT_MIXED, ids)
    del model
    _free(device)
    return logits


def measure_model_case(case: MultiModelCase, device: torch.device, min_run_time: float) -> list[dict]:
    """Every contender in turn (one model in memory at a time); fastlora checked against PEFT before it is timed."""
    ids = make_ids(case, device)
    want = peft_reference(case, device, ids)
    rows = []
    for name in model_contender_names(case):
        model = build_model(case, name, device)
        if name == MULTI_MODEL:
            check_model_agreement(case, forward_logits(model, case, name, ids), want)
        median, p20, p80 = time_ms(model_step(model, case, name, ids), device, min_run_time)
        rows.append({
            "suite": "multi", "level": "model", "contender": name, **dataclasses.asdict(case), "shape": case.shape,
            "tokens": case.tokens, "median_ms": median, "p20_ms": p20, "p80_ms": p80,
            "tokens_per_s": case.tokens / (median * 1e-3),
        })  # fmt: skip
        del model
        _free(device)
    times = {row["contender"]: row["median_ms"] for row in rows}
    for row in rows:
        row["ratio_to_base"] = row["median_ms"] / times[BASE_MODEL] if BASE_MODEL in times else None
        row["speedup_over_peft"] = times[PEFT_MIXED] / row["median_ms"] if PEFT_MIXED in times else None
    return rows


def _sweep_key(row: dict) -> tuple:
    return tuple(row[k] for k in ("size", "mode", "batch", "seq", "new_tokens", "adapters", "ranks", "dtype"))


def add_registered_spread(rows: list[dict]) -> None:
    """Each ``registered`` sweep row's throughput over that of the fewest registered adapters of the same batch."""
    sweep = [row for row in rows if row["level"] == "model" and row["sweep"] == "registered"]
    fewest: dict[tuple, dict] = {}
    for row in sweep:
        key = _sweep_key(row)
        if key not in fewest or row["registered"] < fewest[key]["registered"]:
            fewest[key] = row
    for row in sweep:
        row["throughput_vs_fewest_registered"] = row["tokens_per_s"] / fewest[_sweep_key(row)]["tokens_per_s"]


@contextlib.contextmanager
def cpu_threads(device: torch.device, threads: int) -> Iterator[None]:
    """On CPU, run torch on ``threads`` threads: the tiny CPU shapes are dozens of small ops per layer, where a
    thread pool's barriers cost more than they share, and on a loaded machine a spinning thread waiting for a busy
    core turns microseconds into milliseconds. CUDA runs are left alone."""
    if device.type == "cuda":
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def multi_suite(device: torch.device, quick: bool = False, progress_bar: bool = False) -> list[dict]:
    """The layer cases, then the model cases; one row per (case, contender)."""
    backend = bench_backend(device)
    rows = []
    with forced_backend(backend), cpu_threads(device, 1):
        for case in progress(layer_cases(device, quick), "multi layer", progress_bar):
            rows.extend(measure_layer_case(case, device, backend, 0.05 if quick else 0.5))
            _free(device)
        for case in progress(model_cases(device, quick), "multi model", progress_bar):
            rows.extend(measure_model_case(case, device, 0.1 if quick else 1.0))
    add_registered_spread(rows)
    return rows


# ----------------------------------------------------------------------------------------------- report


def _fmt(value: float | None, suffix: str = "×", digits: str = ".2f") -> str:
    return "" if value is None else f"{value:{digits}}{suffix}"


def _by_case(rows: list[dict], fields: list[str]) -> dict[tuple, dict[str, dict]]:
    out: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        out.setdefault(tuple(row[f] for f in fields), {})[row["contender"]] = row
    return out


def multi_markdown(rows: list[dict]) -> list[str]:
    """Three tables: the layer (a line per case, median ms per contender), the model (tokens/s per contender), the
    registered-adapters sweep (tokens/s and its ratio to the fewest registered)."""
    lines = [
        "Many adapters in one batch, inference. **Layer**: one projection, median ms per call (20/80% quantiles in "
        "results.json); D distinct adapters among T tokens in shuffled order, the rank mix cycled over them, a pool "
        f"of `slots` adapters. fastlora / base is `{MULTI}` (auto) over `{BASE_ONLY}` (the base GEMM alone; target "
        f"≤ {TARGET_RATIO}× at 32 rank-16 adapters in 32 tokens); speedup over PEFT is PEFT's mixed-batch time over "
        f"fastlora's. **Model**: a Llama-style model built from a config, tokens/s of a forward (batch × seq tokens) "
        f"or of `generate` (new tokens, prefill included). **Registered adapters**: `{MULTI_MODEL}` on the same batch "
        f"with more adapters registered and resident (target: within {REGISTERED_SPREAD:.0%} of the fewest).",
    ]
    layer = [row for row in rows if row["level"] == "layer"]
    if layer:
        fields = ["T", "K", "N", "adapters", "ranks", "slots", "dtype"]
        contenders = list(dict.fromkeys(row["contender"] for row in layer))
        header = ["T", "K", "N", "D", "ranks", "slots", "dtype", *(f"{name} (ms)" for name in contenders),
                  "fastlora / base", "speedup over PEFT"]  # fmt: skip
        table = []
        for key, cells in _by_case(layer, fields).items():
            ours = cells.get(MULTI)
            times = [f"{cells[name]['median_ms']:.4g}" if name in cells else "" for name in contenders]
            figures = ["", ""] if ours is None else [_fmt(ours["ratio_to_base"]), _fmt(ours["speedup_over_peft"])]
            table.append([*map(str, key), *times, *figures])
        lines += ["", "### layer", "", *md_table(header, table), "", f"![multi-adapter layer]({PLOT_LAYER})"]
    model = [row for row in rows if row["level"] == "model"]
    case_fields = ["size", "mode", "batch", "seq", "new_tokens", "adapters", "ranks", "registered", "dtype"]
    compare = [row for row in model if row["sweep"] == "contenders"]
    if compare:
        contenders = list(dict.fromkeys(row["contender"] for row in compare))
        header = ["size", "mode", "batch×seq", "new tokens", "D", "ranks", "registered", "dtype",
                  *(f"{name} (tokens/s)" for name in contenders), "fastlora / base (time)",
                  "speedup over PEFT"]  # fmt: skip
        table = []
        for key, cells in _by_case(compare, case_fields).items():
            size, mode, batch, seq, new, *rest = key
            ours = cells.get(MULTI_MODEL)
            speeds = [f"{cells[name]['tokens_per_s']:.4g}" if name in cells else "" for name in contenders]
            figures = ["", ""] if ours is None else [_fmt(ours["ratio_to_base"]), _fmt(ours["speedup_over_peft"])]
            table.append([size, mode, f"{batch}×{seq}", new, *rest, *speeds, *figures])
        lines += ["", "### model", "", *md_table(header, table)]
    sweep = [row for row in model if row["sweep"] == "registered"]
    if sweep:
        header = ["size", "mode", "batch×seq", "new tokens", "D", "ranks", "registered", "dtype",
                  f"{MULTI_MODEL} (tokens/s)", "vs fewest registered"]  # fmt: skip
        table = [
            [row["size"], row["mode"], f"{row['batch']}×{row['seq']}", row["new_tokens"], row["adapters"],
             row["ranks"], row["registered"], row["dtype"], f"{row['tokens_per_s']:.4g}",
             _fmt(row.get("throughput_vs_fewest_registered"))]
            for row in sweep
        ]  # fmt: skip
        lines += ["", "### registered adapters", "", *md_table(header, table)]
    if model:
        lines += ["", f"![MultiLoraModel throughput]({PLOT_MODEL})"]
    return lines


def _layer_plot(rows: list[dict], out_dir: Path) -> Path | None:
    """fastlora's layer time over the base GEMM (top) and its speedup over PEFT (bottom) against distinct adapters
    D: a panel per rank mix, a line per token count, at the pool size most cases use."""
    ours = [row for row in rows if row["level"] == "layer" and row["contender"] == MULTI]
    if not ours:
        return None
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
    return save_plot(fig, out_dir / PLOT_LAYER)


def _model_plot(rows: list[dict], out_dir: Path) -> Path | None:
    """Tokens/s per case, a bar per contender (left); the registered sweep's tokens/s against adapters registered,
    with the ±5% band around the fewest (right)."""
    model = [row for row in rows if row["level"] == "model"]
    if not model:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11.0, 4.4))
    compare = [row for row in model if row["sweep"] == "contenders"]
    cases = list(dict.fromkeys(_sweep_key(row) for row in compare))
    contenders = list(dict.fromkeys(row["contender"] for row in compare))
    width = 0.8 / max(len(contenders), 1)
    value = {(_sweep_key(row), row["contender"]): row["tokens_per_s"] for row in compare}
    for i, name in enumerate(contenders):
        heights = [value.get((c, name), 0) / 1e3 for c in cases]
        axes[0].bar(
            [j + (i - (len(contenders) - 1) / 2) * width for j in range(len(cases))], heights, width, label=name
        )
    axes[0].set_xticks(range(len(cases)))
    axes[0].set_xticklabels([f"{c[0]} {c[1]}\n{c[2]}×{c[3]} D={c[5]}" for c in cases], fontsize=7)
    axes[0].set_title("thousand tokens / s (higher is better)", fontsize=10)
    axes[0].grid(True, axis="y", alpha=0.3)
    if contenders:
        axes[0].legend(fontsize=8)
    sweep = [row for row in model if row["sweep"] == "registered"]
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
    return save_plot(fig, out_dir / PLOT_MODEL)


def multi_plots(rows: list[dict], out_dir: Path) -> list[Path]:
    return [path for path in (_layer_plot(rows, out_dir), _model_plot(rows, out_dir)) if path is not None]


SUITE = Suite("multi", multi_suite, multi_markdown, multi_plots, (PLOT_LAYER, PLOT_MODEL))
