"""The cases of the CUDA test run (``pytest -m gpu``, ``tests/test_gpu.py``) and their inputs, in one place.

Budget. The whole run must fit in about three minutes on one GPU, Triton compiles included, and compiles dominate:
every new *specialisation* of a kernel (its constexprs, the dtypes of its pointers, and which integer arguments are 1
or multiples of 16: the rank, M, K, N and the strides made of them) compiles each config it runs, about a second each,
and a new autotune key runs (so compiles) every config that survives pruning, 2 to 7 per kernel. So the cases come in
*families* that share a specialisation: one dtype pair, dropout, rank class, weight layout and alignment class, with
several shapes each (a new shape in a family only re-times the configs, or costs nothing when pinned). Counted by
intercepting every launch of the lists below: about 110 compiles of 70 specialisations, and 38 autotune keys.

Two ways a family picks its configs:

- ``pin=None``: the autotuner picks, as in production. The training path (one ``lora_linear`` family, both forward
  shapes) and the adapter pool's decode and prefill paths run this way at real shapes, so every config that survives
  pruning is compiled and launched on the GPU, and the winner's result is checked.
- ``pin=i``: each kernel runs the ``i``-th config of those that survive its pruning (modulo their number), without
  timing: one compile per kernel. The pins are spread so that together they check most shipped configs against the
  fp64 reference (as the config lists stand, every one of lora_shrink, lora_expand, lora_wgrad and multi_lora_shrink),
  which autotuning alone never does: it checks only the winner.

Dry run. With ``FASTLORA_GPU_TESTS_ON_CPU=1`` and no CUDA device the same tests run on CPU through Triton's
interpreter, every case scaled down by ``LinearCase.sized`` / ``MultiCase.sized`` (same dtypes, ranks, dropout,
layout, kernel path, and the same 1 / multiple-of-16 / other class of every size), to prove the tests' code before
GPU minutes are spent.
"""

from __future__ import annotations

import dataclasses
import math
import os

import torch

ON_CUDA = torch.cuda.is_available()
DRY_RUN = not ON_CUDA and os.environ.get("FASTLORA_GPU_TESTS_ON_CPU", "") not in ("", "0")
# ``./dev gpu --quick``: a few cases of each test (``quick``), about a minute on one GPU.
QUICK = os.environ.get("FASTLORA_GPU_TESTS_QUICK", "") not in ("", "0")
DEVICE = "cuda" if ON_CUDA else "cpu"

f16, bf16, f32 = torch.float16, torch.bfloat16, torch.float32
_DTYPE_NAMES = {f16: "fp16", bf16: "bf16", f32: "fp32"}


def small_size(v: int) -> int:
    """A size of at most 96 in the same class as ``v`` for Triton's specialisation: 1, a multiple of 16, or neither
    (then odd). Sizes up to 64 are kept."""
    if v <= 64:
        return v
    if v % 16 == 0:
        return min(96, 48 + 16 * (v // 4096))
    return 33 + 2 * (v % 16)


# ----------------------------------------------------------------------------------------------- lora_linear


@dataclasses.dataclass(frozen=True)
class LinearCase:
    M: int
    K: int
    N: int
    r: int
    dtype: torch.dtype  # activations and W0
    lora_dtype: torch.dtype  # A and B: fp32 or the activations' dtype
    dropout_p: float
    fan_in_fan_out: bool  # W0 stored [K, N]
    impl: str  # forward_impl: "onepass" or "split"
    pin: int | None  # None: the autotuner picks; else the config index every kernel runs
    tf32: bool = False  # fp32 only: run with torch.backends.cuda.matmul.allow_tf32 (tf32 dots)

    def __str__(self) -> str:
        tuning = "tuned" if self.pin is None else f"pin{self.pin}"
        precision = "-tf32" if self.tf32 else ""
        return (f"{self.M}x{self.K}x{self.N}-r{self.r}-{_DTYPE_NAMES[self.dtype]}{precision}-"
                f"lora_{_DTYPE_NAMES[self.lora_dtype]}-p{self.dropout_p}-{'KN' if self.fan_in_fan_out else 'NK'}-"
                f"{self.impl}-{tuning}")  # fmt: skip

    def sized(self) -> LinearCase:
        """This case at its dry-run size when ``DRY_RUN``, else itself."""
        if not DRY_RUN:
            return self
        return dataclasses.replace(self, M=small_size(self.M), K=small_size(self.K), N=small_size(self.N))


def _family(dtype, lora_dtype, dropout_p, fan_in_fan_out, pin, shapes, tf32=False) -> list[LinearCase]:
    return [LinearCase(M, K, N, r, dtype, lora_dtype, dropout_p, fan_in_fan_out, impl, pin, tf32)
            for M, K, N, r, impl in shapes]  # fmt: skip


SPLIT, ONEPASS = "split", "onepass"

# The covering design. Each family below is one specialisation of every kernel it runs (see the module docstring),
# with several shapes; the big shapes are Llama-8B's projections (K, N of 4096 and 14336) at up to 16384 tokens. Every
# value of every axis appears:
#
#   activations / LoRA weights: bf16/fp32 (tuned), fp16/fp16 (P1), fp32/fp32 (P2, P6), fp16/fp32 (P3),
#       bf16/bf16 (P4, P5); fp32 with tf32 dots (P6)
#   dropout 0.1: tuned, P3, P5, P6; dropout 0: P1, P2, P4
#   rank: 1 (P5), 8 (P4), 16 (P1), 24 (P2), 64 (tuned, P6), 100 (P3), 128 (tuned, P6)
#   W0 [K, N] (fan_in_fan_out): P1, P3, P5, P6; W0 [N, K]: tuned, P2, P4
#   forward: split and onepass in every family (onepass with 1 to 64 tokens, where the automatic choice uses it)
#   M: 1 (P4: a constant to Triton), 9 to 64 (onepass; odd in P2, P5), 100 to 16384
#   K, N: 4096 and 14336 (tuned, P1, P3, P4, P6); not multiples of 16 (P2: real sizes 4095, 4100, 14335 and small
#       ones; P5: small ones, Liger's (9, 41, 341), and 4097)
#
# Ranks 64 and 128 share every split kernel's specialisation (rank tile 64, a multiple of 16), so the tuned family has
# both. A new specialisation costs about 6 compiles pinned and 25 tuned: fewer, richer families fit the budget.
LINEAR_CASES: list[LinearCase] = [
    # tuned: the training path as production runs it (PEFT keeps fp32 adapters under a bf16 model)
    *_family(bf16, f32, 0.1, False, None, [
        (16384, 4096, 14336, 64, SPLIT), (16384, 14336, 4096, 128, SPLIT), (4096, 4096, 4096, 64, SPLIT),
        (2048, 14336, 4096, 128, SPLIT), (64, 14336, 4096, 64, ONEPASS), (16, 4096, 14336, 64, ONEPASS),
    ]),
    *_family(f16, f16, 0.0, True, 1, [  # P1
        (8192, 14336, 4096, 16, SPLIT), (4096, 4096, 14336, 16, SPLIT), (16384, 4096, 4096, 16, SPLIT),
        (256, 4096, 4096, 16, SPLIT), (32, 4096, 4096, 16, ONEPASS), (64, 14336, 4096, 16, ONEPASS),
        (48, 4096, 14336, 16, ONEPASS),
    ]),
    *_family(f32, f32, 0.0, False, 2, [  # P2: sizes that are not multiples of 16
        (1000, 4100, 4095, 24, SPLIT), (333, 14335, 1000, 24, SPLIT), (33, 4095, 4100, 24, ONEPASS),
        (257, 1000, 97, 24, SPLIT), (17, 97, 1000, 24, ONEPASS), (17, 97, 1000, 24, SPLIT),
        (100, 14335, 4100, 24, SPLIT), (63, 4100, 4095, 24, ONEPASS),
    ]),
    *_family(f16, f32, 0.1, True, 6, [  # P3
        (4096, 4096, 14336, 100, SPLIT), (2048, 14336, 4096, 100, SPLIT), (8192, 4096, 4096, 100, SPLIT),
        (512, 14336, 14336, 100, SPLIT), (64, 14336, 4096, 100, ONEPASS), (16, 4096, 4096, 100, ONEPASS),
    ]),
    *_family(bf16, bf16, 0.0, False, 3, [  # P4: one token, as in decode
        (1, 4096, 14336, 8, ONEPASS), (1, 14336, 4096, 8, ONEPASS), (1, 4096, 4096, 8, ONEPASS),
        (1, 14336, 4096, 8, SPLIT), (1, 4096, 14336, 8, SPLIT),
    ]),
    *_family(bf16, bf16, 0.1, True, 4, [  # P5: small sizes that are not multiples of 16, ragged in every tile
        (300, 257, 33, 1, SPLIT), (9, 41, 341, 1, ONEPASS), (9, 41, 341, 1, SPLIT), (500, 333, 4097, 1, SPLIT),
        (41, 4097, 333, 1, ONEPASS), (257, 41, 4097, 1, SPLIT),
    ]),
    *_family(f32, f32, 0.1, True, 0, [  # P6: tf32 dots, checked against the fp16 row (the same 10-bit mantissa)
        (1024, 14336, 4096, 64, SPLIT), (16384, 4096, 4096, 128, SPLIT), (32, 4096, 4096, 128, ONEPASS),
    ], tf32=True),
]  # fmt: skip

# Two identical training steps at large shapes, split and onepass forward: bitwise-equal gradients. Shapes of the
# tuned family, so no new compile or autotune key.
DETERMINISM_CASES = [
    LinearCase(16384, 4096, 14336, 64, bf16, f32, 0.1, False, SPLIT, None),
    LinearCase(64, 14336, 4096, 64, bf16, f32, 0.1, False, ONEPASS, None),
]


def quick(cases: list, keep) -> list:
    """``cases``, or with ``QUICK`` only those ``keep`` picks."""
    return [case for case in cases if keep(case)] if QUICK else cases


# Quick: the training path as production runs it, split and onepass at Llama-8B shapes, and one pinned family of
# sizes that are not multiples of 16 (the most masking).
LINEAR_CASES = quick(LINEAR_CASES, lambda c: (c.pin is None and c.M in (4096, 16)) or (c.pin == 2 and c.M == 1000))
DETERMINISM_CASES = quick(DETERMINISM_CASES, lambda c: c.impl == ONEPASS)


def linear_inputs(case: LinearCase, device, seed: int = 0):
    """``(x, weight, bias, lora_A, lora_B, dy)`` drawn on ``device``, scaled so that outputs are O(1)."""
    g = torch.Generator(device=device).manual_seed(seed)

    def rand(*shape, dtype, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * scale).to(dtype)

    M, K, N, r = case.M, case.K, case.N, case.r
    x = rand(M, K, dtype=case.dtype)
    weight = rand(*((K, N) if case.fan_in_fan_out else (N, K)), dtype=case.dtype, scale=K**-0.5)
    bias = rand(N, dtype=case.dtype)
    lora_A = rand(r, K, dtype=case.lora_dtype, scale=K**-0.5)
    lora_B = rand(N, r, dtype=case.lora_dtype, scale=r**-0.5)
    dy = rand(M, N, dtype=case.dtype)
    return x, weight, bias, lora_A, lora_B, dy


def linear_scaling(r: int) -> float:
    """rsLoRA's ``alpha / sqrt(r)``: the low-rank term is as large as the base one at every rank, so a broken LoRA
    branch shows even under the tolerance of a long bf16 reduction."""
    return 2.0 / math.sqrt(r)


# ----------------------------------------------------------------------------------------------- QLoRA


@dataclasses.dataclass(frozen=True)
class QloraCase:
    """A LoRA layer over a 4-bit W0 (``lora_linear`` over a ``QuantizedWeight``), or with ``r = 0`` the frozen 4-bit
    layer alone (``quant_linear``)."""

    M: int
    K: int
    N: int
    r: int
    dtype: torch.dtype
    quant: tuple[str, int, bool]  # (quant_type, blocksize, double quantization)
    dropout_p: float
    impl: str
    pin: int | None

    def __str__(self) -> str:
        tuning = "tuned" if self.pin is None else f"pin{self.pin}"
        quant = f"{self.quant[0]}{self.quant[1]}{'-dq' if self.quant[2] else ''}"
        return f"{self.M}x{self.K}x{self.N}-r{self.r}-{_DTYPE_NAMES[self.dtype]}-{quant}-p{self.dropout_p}-{self.impl}-{tuning}"

    def sized(self) -> QloraCase:
        if not DRY_RUN:
            return self
        return dataclasses.replace(self, M=small_size(self.M), K=small_size(self.K), N=small_size(self.N))


# QLoRA as it trains (bf16 activations, fp32 adapters, NF4 with double quantization, blocks of 64) at Llama-8B shapes,
# both forward shapes (tuned: the cases of the qlora suite's targets) and the frozen 4-bit layer; FP4, fp16 and fp32
# compute, blocks of 128 and a K that is no multiple of the block size (the element-by-element path). The rest is
# pinned: each tuned 4-bit specialisation compiles every config of its kernels.
QLORA_CASES: list[QloraCase] = [
    QloraCase(4096, 4096, 14336, 16, bf16, ("nf4", 64, True), 0.1, SPLIT, None),
    QloraCase(4096, 14336, 4096, 16, bf16, ("nf4", 64, True), 0.1, SPLIT, 0),
    QloraCase(16, 4096, 4096, 16, bf16, ("nf4", 64, True), 0.0, ONEPASS, None),
    QloraCase(4096, 4096, 4096, 0, bf16, ("nf4", 64, True), 0.0, SPLIT, 3),
    QloraCase(1000, 4096, 4096, 64, f16, ("fp4", 128, False), 0.1, SPLIT, 1),
    QloraCase(33, 4100, 4096, 8, f32, ("nf4", 64, True), 0.0, ONEPASS, 0),
    QloraCase(300, 4100, 1000, 8, bf16, ("fp4", 64, True), 0.1, SPLIT, 2),
]  # fmt: skip
QLORA_CASES = quick(QLORA_CASES, lambda c: c.pin is None)


# ----------------------------------------------------------------------------------------------- multi_lora_linear

MULTI_RANKS = (1, 8, 16, 24, 64, 100, 128)  # slot s has rank MULTI_RANKS[s % 7]; the pools are sized for 128


@dataclasses.dataclass(frozen=True)
class MultiCase:
    T: int
    K: int
    N: int
    num_adapters: int  # pool slots; every one is used when T allows
    dtype: torch.dtype
    pool_dtype: torch.dtype
    impl: str  # "fused" or "segmented"
    fan_in_fan_out: bool
    bias: str | None  # "act", "fp32" or None
    token_scales: bool
    layer_ranks: bool  # the layer's own ranks (some 0: not adapted by that adapter) and scalings override the batch's
    pin: int | None

    def __str__(self) -> str:
        tuning = "tuned" if self.pin is None else f"pin{self.pin}"
        extras = "".join([f"-bias_{self.bias}" if self.bias else "", "-scales" if self.token_scales else "",
                          "-layer_ranks" if self.layer_ranks else ""])  # fmt: skip
        return (f"T{self.T}-{self.K}x{self.N}-{self.num_adapters}adapters-{_DTYPE_NAMES[self.dtype]}-"
                f"pool_{_DTYPE_NAMES[self.pool_dtype]}-{self.impl}-{'KN' if self.fan_in_fan_out else 'NK'}"
                f"{extras}-{tuning}")  # fmt: skip

    def sized(self) -> MultiCase:
        if not DRY_RUN:
            return self
        return dataclasses.replace(self, T=small_size(self.T), K=small_size(self.K), N=small_size(self.N))


# Ranks 1 to 128 mixed in every batch, tokens without an adapter (about one in five), NaN in every pool entry beyond a
# slot's (or the layer's) rank. The fused (decode) path and the segmented one each have a tuned family in the pool's
# default dtype (the model's: bf16); the other dtype pairs, layouts, bias dtypes and odd sizes are pinned.
MULTI_CASES: list[MultiCase] = [
    MultiCase(36, 4096, 4096, 32, bf16, bf16, "fused", False, "act", True, False, None),  # decode, 32 adapters
    MultiCase(4096, 4096, 4096, 40, bf16, bf16, "segmented", False, "act", True, False, None),  # prefill
    MultiCase(1, 4096, 4096, 32, f16, f32, "fused", True, None, False, False, 0),
    MultiCase(64, 4096, 4096, 33, f32, f32, "fused", True, "act", False, True, 1),
    MultiCase(1000, 4096, 4096, 48, f16, f16, "segmented", False, "fp32", True, True, 0),
    MultiCase(300, 4095, 4100, 33, f32, f32, "segmented", True, None, True, False, 1),
    MultiCase(2048, 4096, 14336, 64, bf16, f32, "segmented", False, "act", True, False, 2),
    MultiCase(48, 14336, 4096, 40, f16, f16, "fused", True, None, True, True, 1),
]  # fmt: skip
MULTI_CASES = quick(MULTI_CASES, lambda c: c.pin is None)  # quick: the tuned decode and prefill families


def multi_slots(T: int, num_adapters: int) -> list[int]:
    """Every adapter at least once when ``T`` allows, in a scrambled order; token 2, 7, 12, ... has none."""
    slots = [(7 * t + 5) % num_adapters for t in range(T)]
    for t in range(2, T, 5):
        slots[t] = -1
    return slots


def multi_inputs(case: MultiCase, device, seed: int = 0) -> dict:
    """The arguments of ``fastlora.multi_lora_linear`` drawn on ``device``: ``args`` (``x, weight, bias, a_pool, b_pool,
    meta``), ``kwargs``, and the batch's largest rank ``max_rank``."""
    from fastlora.ops import BatchMeta

    g = torch.Generator(device=device).manual_seed(seed)

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * scale

    T, K, N, S, r_max = case.T, case.K, case.N, case.num_adapters, max(MULTI_RANKS)
    ranks = [MULTI_RANKS[s % len(MULTI_RANKS)] for s in range(S)]
    slots = multi_slots(T, S)
    scalings = [2.0 / math.sqrt(r) * (1.0 + 0.25 * (s % 3)) for s, r in enumerate(ranks)]
    token_scales = (0.5 + torch.rand(T, generator=g, device=device)).tolist() if case.token_scales else None
    meta = BatchMeta.build(slots, ranks, scalings, token_scales, device=device)
    kwargs = {"fan_in_fan_out": case.fan_in_fan_out}
    layer_ranks = ranks
    if case.layer_ranks:  # a quarter of the adapters do not adapt this layer, a quarter have half their rank here
        layer_ranks = [0 if s % 4 == 1 else max(1, r // 2) if s % 4 == 2 else r for s, r in enumerate(ranks)]
        kwargs["slot_ranks"] = torch.tensor(layer_ranks, dtype=torch.int32, device=device)
        kwargs["slot_scalings"] = torch.tensor([-v if s % 3 == 0 else v for s, v in enumerate(scalings)],
                                               dtype=torch.float32, device=device)  # fmt: skip
    x = rand(T, K).to(case.dtype)
    weight = rand(*((K, N) if case.fan_in_fan_out else (N, K)), scale=K**-0.5).to(case.dtype)
    bias = None if case.bias is None else rand(N).to(case.dtype if case.bias == "act" else torch.float32)
    in_rank = torch.arange(r_max, device=device)[None, :] < torch.tensor(layer_ranks, device=device)[:, None]
    nan = torch.tensor(float("nan"), device=device)
    rank_scale = torch.tensor([max(r, 1) ** -0.5 for r in ranks], device=device)
    a_pool = torch.where(in_rank[:, :, None], rand(S, r_max, K, scale=K**-0.5), nan).to(case.pool_dtype)
    b_pool = torch.where(in_rank[:, None, :], rand(S, N, r_max) * rank_scale[:, None, None], nan).to(case.pool_dtype)
    return {"args": (x, weight, bias, a_pool, b_pool, meta), "kwargs": kwargs, "max_rank": meta.max_rank}


# ----------------------------------------------------------------------------------------------- autotuning


def autotuners() -> list:
    """Every autotuned kernel of ``fastlora.kernels`` (``fastlora.bench.warm``'s list, imported when needed: this module
    is read by conftest before the kernels load)."""
    from fastlora.bench.warm import autotuners as every_autotuner

    return every_autotuner()


def pinned_configs(index: int | None):
    """``fastlora.bench.warm.pinned_configs``: every autotuned kernel runs the ``index``-th config that survives its
    pruning, untimed (``None``: the autotuner picks)."""
    from fastlora.bench.warm import pinned_configs as pin

    return pin(index)


# ----------------------------------------------------------------------------------------------- MultiLoraModel

# The serving test uses tests/serving_helpers.py's three PEFT adapters (ranks 4 to 16) and mixed batch.
# ----------------------------------------------------------------------------------------------- grouped_lora_linear


@dataclasses.dataclass(frozen=True)
class MoeCase:
    """One projection of a mixture-of-experts layer: ``tokens`` routed to ``top_k`` of ``experts`` experts, ``K -> N``
    per expert, LoRA rank ``r`` per expert (``fastlora.grouped_lora_linear``)."""

    tokens: int
    K: int
    N: int
    experts: int
    top_k: int
    r: int
    dtype: torch.dtype
    lora_dtype: torch.dtype
    dropout_p: float
    transposed: bool  # GPT-OSS's [E, K, N] weights
    bias: bool
    pin: int | None

    def __str__(self) -> str:
        tuning = "tuned" if self.pin is None else f"pin{self.pin}"
        return (f"{self.tokens}tok-E{self.experts}k{self.top_k}-{self.K}x{self.N}-r{self.r}-{_DTYPE_NAMES[self.dtype]}-"
                f"lora_{_DTYPE_NAMES[self.lora_dtype]}-p{self.dropout_p}-{'EKN' if self.transposed else 'ENK'}-"
                f"{'bias-' if self.bias else ''}{tuning}")  # fmt: skip

    def sized(self) -> MoeCase:
        if not DRY_RUN:
            return self
        return dataclasses.replace(self, tokens=min(self.tokens, 24), K=small_size(self.K), N=small_size(self.N),
                                   experts=min(self.experts, 6), top_k=min(self.top_k, 2))  # fmt: skip


# Qwen3-30B-A3B's experts (E = 128, top-8, H = 2048, I = 768: gate_up 2048 -> 1536, down 768 -> 2048), Mixtral's
# (E = 8, top-2, 4096 -> 28672 and 14336 -> 4096) and GPT-OSS-20B's (E = 32, top-4, 2880 -> 5760 transposed, biases),
# at prefill and decode sizes; the training path tuned, the others pinned.
MOE_CASES: list[MoeCase] = [
    MoeCase(4096, 2048, 1536, 128, 8, 16, bf16, f32, 0.0, False, False, None),
    MoeCase(4096, 768, 2048, 128, 8, 16, bf16, f32, 0.1, False, False, None),
    MoeCase(2048, 4096, 28672, 8, 2, 16, bf16, bf16, 0.0, False, False, 1),
    MoeCase(2048, 14336, 4096, 8, 2, 64, bf16, bf16, 0.1, False, False, 2),
    MoeCase(1, 2880, 5760, 32, 4, 8, bf16, f32, 0.0, True, True, 0),
    MoeCase(300, 2880, 2880, 32, 4, 32, f16, f16, 0.0, True, True, 1),
]
MOE_CASES = quick(MOE_CASES, lambda c: c.pin is None)


def moe_inputs(case: MoeCase, device, seed: int = 0) -> dict:
    """Routed rows (the router's choice drawn at random, sorted by ``fastlora.ops.route``), weights and upstream
    gradient of ``case`` on ``device``, scaled so outputs are O(1)."""
    from fastlora.ops import route

    g = torch.Generator(device="cpu").manual_seed(seed)

    def rand(*shape, dtype, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    E, K, N, r = case.experts, case.K, case.N, case.r
    choice = torch.rand(case.tokens, E, generator=g).argsort(dim=1)[:, : case.top_k]
    routing = route(choice.to(device), E)
    x = rand(case.tokens, K, dtype=case.dtype)[routing.rows]
    weight = rand(*((E, K, N) if case.transposed else (E, N, K)), dtype=case.dtype, scale=K**-0.5)
    bias = rand(E, N, dtype=case.dtype) if case.bias else None
    lora_A = rand(E, r, K, dtype=case.lora_dtype, scale=K**-0.5)
    lora_B = rand(E, N, r, dtype=case.lora_dtype, scale=r**-0.5)
    dy = rand(x.shape[0], N, dtype=case.dtype)
    return dict(x=x, weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B, routing=routing, dy=dy)


SERVING_PIN = 2


def serving_llama():
    """The Llama of the serving test, built from a config (no download), seeded, on CPU: hidden 256 on the GPU,
    ``tiny_models``' hidden 64 in the dry run. Eager attention (plain matmuls) keeps the fp64 oracle's attention as
    exact as the layers under test."""
    import transformers
    from tiny_models import tiny_llama

    if DRY_RUN:
        return tiny_llama(attn_implementation="eager")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=4, attn_implementation="eager",
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval()
