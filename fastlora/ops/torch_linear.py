"""The torch backend of ``lora_linear``: the LoRA linear layer in plain PyTorch ops, built for speed.

    y   = x·W0ᵀ + b + s·(D(x)·Aᵀ)·Bᵀ                 xs = s·D(x)·Aᵀ   [M, r], the one tensor saved for backward
    dxa = s·dy·B,  dx = dy·W0 + D'(dxa·A),  dA = dxaᵀ·D(x),  dB = dyᵀ·xs

``fastlora.reference`` computes the same formulas with the kernels' Philox mask, bit for bit; that mask costs some
hundred element-wise passes in PyTorch. This file draws its own mask (``keep_mask``): still a pure function of
``(seed, shape, p, device)``, so the backward regenerates it instead of storing ``M·K`` of anything, but drawn from a
generator of the device's own kind, seeded with the seed (one per thread and device, re-seeded at every use):

- a large mask takes one full-range 64-bit ``random_`` word per four elements, read as four int16 lanes, and one
  compare: an element is kept when its lane is ``>= threshold``, so the keep probability is ``1 - p`` rounded to a
  multiple of ``2**-16`` (off by at most ``2**-17``), at about a nanosecond per element on one CPU core;
- a mask of at most ``_SMALL_MASK`` elements (a few tokens) is one fp32 ``bernoulli(1 - p)`` call: one op instead of
  five, as op overhead, not bandwidth, is its whole cost (on CPU, a double-precision uniform per element).

The mask comes as 0/1 in the LoRA branch's dtype: multiplying by it is a vectorised pass, where a bool mask would take
the element-by-element converting path, and its buffer then becomes ``x⊙keep``. ``1/(1-p)`` and ``s`` ride on the
GEMMs (an ``[M, r]`` scale in the forward, ``alpha`` / ``beta`` in the backward) instead of passes over ``[M, K]``.
On CPU the generator is mt19937, which takes 32 bits of seed (the seed's two halves xor-ed): two seeds share a mask
with probability ``2**-32``.

Dtypes as in the Triton kernels: the LoRA branch computes in the LoRA weights'
dtype with ``xs`` rounded to it, ``y`` and ``dx`` come out in ``x.dtype``, ``dA`` / ``dB`` in the LoRA dtype; the
matmuls accumulate in fp32 for 16-bit inputs (PyTorch's CPU GEMMs do). Terms wider than ``x`` (fp32 LoRA weights or
bias with 16-bit ``x``) are summed in that wider dtype and added to the base GEMM's output with one rounding.
Base and LoRA terms are accumulated into one output with in-place ``addmm_`` where the dtypes allow, and the scales are
applied inside GEMMs, so results may differ from the reference's in the last bits but never in the formula.
"""

from __future__ import annotations

import threading

import torch

_MASK32 = 0xFFFFFFFF
_MASK64 = 0xFFFFFFFFFFFFFFFF
_LANES = 4  # int16 lanes per 64-bit random word
_LANE_VALUES = 1 << 16
# Masks of at most this many elements come from one fp32 ``bernoulli`` call: one op instead of five, which is what a
# mask of a few tokens costs; beyond it the int16 lanes' cheaper passes win (bernoulli takes ~6 ns per element).
_SMALL_MASK = 1024


def draw_seed() -> int:
    """A dropout seed from torch's default CPU generator: ``torch.manual_seed`` makes runs reproducible, and every
    call draws a fresh one. Never touches an accelerator, so it never waits for one."""
    return torch.randint(2**62, (1,)).item()


class _ThreadGenerators(threading.local):
    def __init__(self):
        self.by_device: dict[torch.device, torch.Generator] = {}


_generators = _ThreadGenerators()


def _generator(device: torch.device, seed: int) -> torch.Generator:
    """This thread's generator for ``device``, re-seeded: reusing it saves creating one per call, and a per-thread
    generator cannot be re-seeded by another thread between the seeding and the draw."""
    gen = _generators.by_device.get(device)
    if gen is None:
        gen = _generators.by_device[device] = torch.Generator(device)
    if device.type == "cpu":
        # mt19937 takes 32 bits of the seed; fold the high half in rather than drop it.
        return gen.manual_seed((seed ^ (seed >> 32)) & _MASK32)
    return gen.manual_seed(seed & _MASK64)


def _threshold(p: float) -> int:
    """Lanes (uniform int16) at or above this are kept: keep probability ``1 - p`` to within ``2**-17``."""
    return min(round(p * _LANE_VALUES), _LANE_VALUES - 1) - _LANE_VALUES // 2


def _lanes(seed: int, M: int, K: int, device: torch.device) -> torch.Tensor:
    """Uniform int16 ``[M, K]``: each row cut from ``ceil(K/4)`` full-range 64-bit words of the seeded generator."""
    words = torch.empty((M, (K + _LANES - 1) // _LANES), dtype=torch.int64, device=device)
    words.random_(-(2**63), None, generator=_generator(device, seed))
    lanes = words.view(torch.int16)
    return lanes if K % _LANES == 0 else lanes[:, :K]


def _keep(seed: int, x2d: torch.Tensor, p: float, dtype: torch.dtype) -> torch.Tensor:
    """``keep_mask`` for ``x2d``'s shape and device as 0/1 in ``dtype``: multiplying by it is a vectorised pass, where a
    bool mask would take the element-by-element converting path, some twenty times slower."""
    M, K = x2d.shape
    device = x2d.device
    if M * K <= _SMALL_MASK:
        # bernoulli reads only its input's shape and dtype: x itself serves when it is fp32 and row-major (the mask
        # must not depend on how x is laid out).
        like = x2d if x2d.dtype == torch.float32 and x2d.is_contiguous() else torch.empty((M, K), device=device)
        keep = torch.bernoulli(like, 1.0 - p, generator=_generator(device, seed))
        return keep if dtype == torch.float32 else keep.to(dtype)
    return torch.ge(_lanes(seed, M, K, device), _threshold(p), out=torch.empty((M, K), dtype=dtype, device=device))


def keep_mask(seed: int, shape: tuple[int, int], p: float, device) -> torch.Tensor:
    """Bool keep-mask ``[M, K]`` of inverted dropout with probability ``p``: a pure function of
    ``(seed, shape, p, device)``, the mask ``forward`` and ``backward`` apply for that seed."""
    M, K = shape
    device = torch.device(device)
    if M * K <= _SMALL_MASK:
        like = torch.empty((M, K), device=device)
        return torch.bernoulli(like, 1.0 - p, generator=_generator(device, seed)) != 0
    return _lanes(seed, M, K, device) >= _threshold(p)


def _wide_dtype(lora_dtype: torch.dtype, bias: torch.Tensor | None) -> torch.dtype:
    return lora_dtype if bias is None else torch.promote_types(lora_dtype, bias.dtype)


def forward(
    x2d: torch.Tensor,
    wt: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: int | None,
    need_xs: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``y [M, N]`` in ``x.dtype`` and, when ``need_xs``, ``xs = s·D(x)·Aᵀ [M, r]`` in ``lora_A.dtype``.

    ``x2d [M, K]``, ``wt [K, N]`` (a view of ``W0``, any strides), ``bias [N]`` (``x.dtype`` or fp32) or None,
    ``lora_A [r, K]``, ``lora_B [N, r]`` (fp32 or ``x.dtype``); ``seed`` is required when ``dropout_p > 0``.
    """
    dtype, lora_dtype = x2d.dtype, lora_A.dtype
    if dropout_p > 0.0:
        if seed is None:
            raise ValueError("fastlora: dropout_p > 0 needs a seed")
        # The mask's buffer becomes x⊙keep, in the LoRA dtype: no other [M, K] temporary, no cast copy of x.
        xl = _keep(seed, x2d, dropout_p, lora_dtype).mul_(x2d)
        alpha = scaling / (1.0 - dropout_p)
    else:
        xl = x2d if dtype == lora_dtype else x2d.to(lora_dtype)
        alpha = scaling
    xs = torch.mm(xl, lora_A.t()).mul_(alpha)
    if dtype == lora_dtype and (bias is None or bias.dtype == dtype):
        y = torch.mm(x2d, wt) if bias is None else torch.addmm(bias, x2d, wt)
        y.addmm_(xs, lora_B.t())
    else:
        # fp32 LoRA weights or bias with 16-bit x: sum them in fp32, then round once into the base GEMM's output.
        wide = _wide_dtype(lora_dtype, bias)
        xs_w, b_w = xs.to(wide), lora_B.to(wide)
        extra = torch.mm(xs_w, b_w.t()) if bias is None else torch.addmm(bias.to(wide), xs_w, b_w.t())
        y = torch.mm(x2d, wt).add_(extra)
    return y, (xs if need_xs else None)


def backward(
    dy2d: torch.Tensor,
    x2d: torch.Tensor,
    wt: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    xs: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: int | None,
    need_dx: bool,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """``(dx, dA, dB)`` for upstream ``dy2d [M, N]``: ``dx [M, K]`` in ``x.dtype`` (None unless ``need_dx``),
    ``dA [r, K]`` and ``dB [N, r]`` in the LoRA dtype; the mask is regenerated from ``seed``."""
    dtype, lora_dtype = x2d.dtype, lora_A.dtype
    dyl = dy2d if dy2d.dtype == lora_dtype else dy2d.to(lora_dtype)
    dB = torch.mm(dyl.t(), xs)
    keep = None
    alpha = scaling
    if dropout_p > 0.0:
        if seed is None:
            raise ValueError("fastlora: dropout_p > 0 needs a seed")
        keep = _keep(seed, x2d, dropout_p, lora_dtype)
        alpha = scaling / (1.0 - dropout_p)  # the inverted-dropout scale of both D' terms
    # dxa / alpha: alpha rides on the GEMMs that read it (beta of dx's addmm_, alpha of dA's) instead of an op of its own.
    dxa = torch.mm(dyl, lora_B)
    dx = None
    if need_dx:
        low = torch.mm(dxa, lora_A)
        if keep is not None:
            low.mul_(keep)
        if dtype == lora_dtype:
            dx = low.addmm_(dy2d, wt.t(), beta=alpha)
        else:
            dx = torch.mm(dy2d, wt.t()).add_(low, alpha=alpha)
    if keep is not None:
        xl = keep.mul_(x2d)  # the mask's last use: its buffer becomes x⊙keep
    else:
        xl = x2d if dtype == lora_dtype else x2d.to(lora_dtype)
    # beta=0: the input is only a stand-in of dA's shape and dtype, never read (NaN in it would not propagate).
    dA = torch.addmm(lora_A, dxa.t(), xl, beta=0, alpha=alpha)
    return dx, dA, dB
