"""The LoRA linear layer in plain PyTorch: the CPU path, and the oracle for tests and benchmarks.

    y   = x·W0ᵀ + b + s·(D(x)·Aᵀ)·Bᵀ
    dxa = s·dy·B,  dx = dy·W0 + D'(dxa·A),  dA = dxaᵀ·D(x),  dB = s·dyᵀ·xa

``D`` is inverted dropout whose mask is a pure function of ``(seed, row, col)`` (see ``dropout_mask``): the same
bits as the Triton kernels, so every backend drops the same elements for the same seed, and the backward
regenerates the mask instead of storing it.

``tolerance`` is the one tolerance table: how far a kernel's result may be from this reference computed in fp64, for
the tests and for the benchmarks' agreement checks.
"""

import math

import torch

from .kernels.philox import PHILOX_KEY_A, PHILOX_KEY_B, PHILOX_ROUND_A, PHILOX_ROUND_B, PHILOX_ROUNDS

_MASK32 = 0xFFFFFFFF
# Elements of the dropout mask generated at once, per device type: a CPU keeps the temporaries in cache, a GPU wants
# few large launches (blocks of 64K elements would launch some 300 000 small kernels for a 16384 x 4096 mask).
_MASK_BLOCK_ELEMENTS = {"cpu": 1 << 16, "cuda": 1 << 24}


# Units of relative error allowed, per activation dtype (eps: fp32 1.2e-7, fp16 9.8e-4, bf16 7.8e-3): a few rounding
# steps of the dtype. Errors are measured relative to the largest magnitude of the expected tensor: outputs and
# gradients of a linear layer are sums whose rounding error scales with their size, not with each element.
RELATIVE_TOLERANCE = {
    torch.float32: 2e-6,
    torch.float16: 4e-3,
    torch.bfloat16: 3.2e-2,
}


def tolerance(dtype: torch.dtype, reduce_len: int = 1) -> float:
    """Relative tolerance for a result of ``dtype`` computed with fp32 accumulation over ``reduce_len`` terms: the
    table's entry times the growth of fp32 accumulation error with the reduction length."""
    return RELATIVE_TOLERANCE[dtype] * max(1.0, math.sqrt(reduce_len) / 4)


def _mul32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hi, lo)`` 32-bit words of the 64-bit product of the constant ``a`` and uint32 values ``b`` (int64 tensor),
    in 16-bit halves so nothing overflows int64."""
    b_hi = b >> 16
    b_lo = b & 0xFFFF
    lo_part = a * b_lo
    t = a * b_hi + (lo_part >> 16)
    return t >> 16, ((t & 0xFFFF) << 16) | (lo_part & 0xFFFF)


def philox_word(seed: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """First word of Philox4x32-10 with key ``seed`` at counter ``(col, row, 0, 0)``, as int64 in ``[0, 2**32)``."""
    k0 = seed & _MASK32
    k1 = (seed >> 32) & _MASK32
    c0, c1 = (
        t.contiguous() for t in torch.broadcast_tensors(cols.to(torch.int64) & _MASK32, rows.to(torch.int64) & _MASK32)
    )
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    for _ in range(PHILOX_ROUNDS.value):
        hi_b, lo_b = _mul32(PHILOX_ROUND_B.value, c2)
        hi_a, lo_a = _mul32(PHILOX_ROUND_A.value, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A.value) & _MASK32
        k1 = (k1 + PHILOX_KEY_B.value) & _MASK32
    return c0


def dropout_threshold(p: float) -> int:
    """Words below this are dropped: keep probability ``1 - p`` to within ``2**-32``."""
    return min(int(p * 2**32), 2**32 - 1)


def dropout_mask(seed: int | torch.Tensor, shape: tuple[int, int], p: float, device=None) -> torch.Tensor:
    """Boolean keep-mask ``[M, K]`` for inverted dropout with probability ``p``: the kernels' mask, bit for bit."""
    if isinstance(seed, torch.Tensor):
        seed = int(seed.item())
    M, K = shape
    keep = torch.empty((M, K), dtype=torch.bool, device=device)
    cols = torch.arange(K, device=device)[None, :]
    threshold = dropout_threshold(p)
    # The Philox rounds hold about ten int64 temporaries per element: a block of rows at a time bounds them (a few MiB
    # on a CPU, where they stay in cache; about a GiB on a GPU) instead of ~80 bytes per element of x.
    kind = "cpu" if device is None else torch.device(device).type
    block = _MASK_BLOCK_ELEMENTS.get(kind, _MASK_BLOCK_ELEMENTS["cpu"])
    step = max(1, block // max(K, 1))
    for r0 in range(0, M, step):
        rows = torch.arange(r0, min(r0 + step, M), device=device)[:, None]
        keep[r0 : r0 + step] = philox_word(seed, rows, cols) >= threshold
    return keep


def dropout(x2d: torch.Tensor, p: float, seed: int | torch.Tensor | None) -> torch.Tensor:
    """``D(x)``: inverted dropout of a 2-D tensor with the seeded mask (identity when ``p == 0``)."""
    if p == 0.0:
        return x2d
    keep = dropout_mask(seed, tuple(x2d.shape), p, device=x2d.device)
    return torch.where(keep, x2d * (1.0 / (1.0 - p)), torch.zeros((), dtype=x2d.dtype, device=x2d.device))


def lora_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    seed: int | torch.Tensor | None = None,
    fan_in_fan_out: bool = False,
) -> torch.Tensor:
    """The layer written as the formula, differentiable by autograd: the oracle tests compare against (in fp64).

    ``weight`` is ``[N, K]``, or ``[K, N]`` with ``fan_in_fan_out``. Computes in the dtype of its inputs.
    """
    w = weight.t() if fan_in_fan_out else weight
    x2d = x.reshape(-1, x.shape[-1])
    y = x2d @ w.t()
    if bias is not None:
        y = y + bias
    y = y + scaling * ((dropout(x2d, dropout_p, seed) @ lora_A.t()) @ lora_B.t())
    return y.reshape(*x.shape[:-1], y.shape[-1])


# The torch backend: the same contract as the Triton launchers in ``fastlora.kernels``, used by
# ``fastlora.ops`` on CPU tensors. ``wt`` is the ``[K, N]`` view of ``W0``. The LoRA branch computes in the
# LoRA weights' dtype, with ``xs = s·D(x)·Aᵀ`` rounded to it, as the kernels do.


def lora_forward(x2d, wt, bias, lora_A, lora_B, scaling, dropout_p, seed):
    """Returns ``(y, xs)``: the output and ``xs = s·D(x)·Aᵀ`` that the backward needs."""
    xd = dropout(x2d.to(lora_A.dtype), dropout_p, seed)
    xs = (xd @ lora_A.t()) * scaling
    y = torch.addmm(bias, x2d, wt) if bias is not None else x2d @ wt
    y = y + (xs @ lora_B.t()).to(y.dtype)
    return y, xs


def lora_backward(dy, x2d, wt, lora_A, lora_B, xs, scaling, dropout_p, seed):
    """Returns ``(dx, dA, dB)`` for upstream ``dy [M, N]``."""
    dyl = dy.to(lora_B.dtype)
    dxa = (dyl @ lora_B) * scaling
    low = dxa @ lora_A
    xl = x2d.to(lora_A.dtype)
    if dropout_p > 0.0:
        # One regeneration of the mask serves both D' terms (Philox in PyTorch dominates the CPU backward).
        keep = dropout_mask(seed, tuple(x2d.shape), dropout_p, device=x2d.device)
        zero = torch.zeros((), dtype=low.dtype, device=low.device)
        low = torch.where(keep, low * (1.0 / (1.0 - dropout_p)), zero)
        xl = torch.where(keep, xl * (1.0 / (1.0 - dropout_p)), zero)
    dx = dy @ wt.t() + low.to(dy.dtype)
    dA = dxa.t() @ xl
    dB = dyl.t() @ xs
    return dx, dA, dB


# Many adapters in one batch: every token picks its own slot of a pool (``fastlora.multi_lora_linear``).


def multi_lora_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    a_pool: torch.Tensor,
    b_pool: torch.Tensor,
    token_slots: torch.Tensor,
    slot_ranks: torch.Tensor,
    slot_scalings: torch.Tensor,
    token_scales: torch.Tensor | None = None,
    fan_in_fan_out: bool = False,
    active_slots=None,
) -> torch.Tensor:
    """``y[t] = x[t]·W0ᵀ + b + [slot(t) >= 0]·token_scale[t]·scaling[slot]·(x[t]·A_slotᵀ)·B_slotᵀ``.

    ``a_pool [num_slots, r_max, K]``, ``b_pool [num_slots, N, r_max]``; slot ``s`` uses ``A_s = a_pool[s, :rank_s]``
    and ``B_s = b_pool[s, :, :rank_s]`` with ``rank_s = slot_ranks[s]``. ``token_slots [T]`` (``-1`` = base only),
    ``token_scales [T]`` or None. Pool entries beyond a slot's rank are never read (masked with ``where``, so even a
    NaN there cannot leak). The LoRA branch computes in the pools' dtype, with ``s·x·Aᵀ`` rounded to it as the
    kernels store it. A loop over the slots in use (``active_slots``, else found from ``token_slots``): plain and
    differentiable; on CUDA tensors it synchronises with the device, as the CPU path and oracle it need not be fast.
    """
    w = weight.t() if fan_in_fan_out else weight
    x2d = x.reshape(-1, x.shape[-1])
    y = x2d @ w.t()
    if bias is not None:
        y = y + bias
    if active_slots is None:
        active_slots = torch.unique(token_slots[token_slots >= 0]).tolist()
    lora_dtype = a_pool.dtype
    r_max = a_pool.shape[1]
    in_rank = torch.arange(r_max, device=a_pool.device)
    for s in active_slots:
        rows = torch.nonzero(token_slots == s).reshape(-1)
        keep = in_rank < slot_ranks[s]
        a = torch.where(keep[:, None], a_pool[s], torch.zeros((), dtype=lora_dtype, device=a_pool.device))
        b = torch.where(keep[None, :], b_pool[s], torch.zeros((), dtype=lora_dtype, device=b_pool.device))
        scale = slot_scalings[s]
        if token_scales is not None:
            scale = scale * token_scales[rows][:, None]
        xs = ((x2d[rows].to(lora_dtype) @ a.t()) * scale).to(lora_dtype)
        y = y.index_add(0, rows, (xs @ b.t()).to(y.dtype))
    return y.reshape(*x.shape[:-1], y.shape[-1])
