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
# Philox calls (four mask elements each) made at once, per device type: a CPU keeps the temporaries in cache, a GPU
# wants few large launches (blocks of 64K calls would launch some 75 000 small kernels for a 16384 x 4096 mask).
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
    """``(hi, lo)`` 32-bit words of the 64-bit product of the uint32 constant ``a`` and uint32 values ``b`` (int64
    tensor): ``a`` is split in 16-bit halves so that no product passes 2**48 and nothing overflows int64."""
    lo = b * (a & 0xFFFF)
    t = b * (a >> 16)
    t += lo >> 16
    hi = t >> 16
    lo &= 0xFFFF
    t &= 0xFFFF
    t <<= 16
    t |= lo
    return hi, t


def philox4x32_10(
    key: int, c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The four words of Philox4x32-10 with the 64-bit ``key`` (``(key_lo, key_hi)``) at counter ``(c0, c1, c2, c3)``:
    int64 tensors of values in ``[0, 2**32)`` that broadcast together, as in ``kernels/philox.py``. A word that
    depends on rows only or columns only stays that small until a round mixes it."""
    k0 = key & _MASK32
    k1 = (key >> 32) & _MASK32
    for _ in range(PHILOX_ROUNDS.value):
        hi_b, lo_b = _mul32(PHILOX_ROUND_B.value, c2)
        hi_a, lo_a = _mul32(PHILOX_ROUND_A.value, c0)
        c0 = hi_b ^ c1
        c0 ^= k0
        c2 = hi_a ^ c3
        c2 ^= k1
        c1, c3 = lo_b, lo_a
        k0 = (k0 + PHILOX_KEY_A.value) & _MASK32
        k1 = (k1 + PHILOX_KEY_B.value) & _MASK32
    return c0, c1, c2, c3


def dropout_threshold(p: float) -> int:
    """Words below this are dropped: keep probability ``1 - p`` to within ``2**-32``."""
    return min(int(p * 2**32), 2**32 - 1)


def dropout_mask(seed: int | torch.Tensor, shape: tuple[int, int], p: float, device=None) -> torch.Tensor:
    """Boolean keep-mask ``[M, K]`` for inverted dropout with probability ``p``: the kernels' mask, bit for bit.

    Element ``(row, col)`` is kept iff word ``col % 4`` of Philox4x32-10 with key ``seed`` at counter
    ``(col // 4, row, 0, 0)`` is at least ``dropout_threshold(p)`` (``kernels/philox.py``)."""
    if isinstance(seed, torch.Tensor):
        seed = int(seed.item())
    M, K = shape
    groups = (K + 3) // 4
    # Four columns per Philox call: the mask is built [M, groups, 4] and cut to K columns.
    keep = torch.empty((M, groups, 4), dtype=torch.bool, device=device)
    c0 = torch.arange(groups, device=device)[None, :]
    zero = torch.zeros((), dtype=torch.int64, device=device)
    threshold = dropout_threshold(p)
    # The Philox rounds hold about ten int64 temporaries per four elements: a block of rows at a time bounds them (a
    # few MiB on a CPU, where they stay in cache; about a GiB on a GPU) instead of ~20 bytes per element of x.
    kind = "cpu" if device is None else torch.device(device).type
    block = _MASK_BLOCK_ELEMENTS.get(kind, _MASK_BLOCK_ELEMENTS["cpu"])
    step = max(1, block // max(groups, 1))
    for r0 in range(0, M, step):
        rows = torch.arange(r0, min(r0 + step, M), device=device)[:, None]
        for j, word in enumerate(philox4x32_10(seed, c0, rows, zero, zero)):
            torch.ge(word, threshold, out=keep[r0 : r0 + step, :, j])
    keep = keep.reshape(M, groups * 4)
    return keep if K == groups * 4 else keep[:, :K].contiguous()


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


# Mixture-of-experts layers: rows sorted by expert, each with its expert's own adapter (``fastlora.grouped_lora_linear``).


def grouped_lora_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    offsets,
    scaling: float,
    dropout_p: float = 0.0,
    seed: int | torch.Tensor | None = None,
    transposed: bool = False,
) -> torch.Tensor:
    """``y[m] = x[m]·W_eᵀ + b_e + s·(D(x)[m]·A_eᵀ)·B_eᵀ`` for the rows ``m`` of expert ``e``, ``offsets[e] <= m <
    offsets[e + 1]``.

    ``x [S, K]`` (rows sorted by expert), ``weight [E, N, K]`` (``[E, K, N]`` when ``transposed``, as GPT-OSS stores
    it), ``bias [E, N]`` or None, ``lora_A [E, r, K]``, ``lora_B [E, N, r]``, ``offsets``: ``E + 1`` row offsets. The
    dropout mask is the dense layer's over the ``[S, K]`` rows (``dropout_mask``). The LoRA branch computes in the LoRA
    weights' dtype. A loop over the experts, plain and differentiable: the CPU path and the oracle, not fast (it reads
    ``offsets`` on the host).
    """
    offsets = offsets.tolist() if isinstance(offsets, torch.Tensor) else list(offsets)
    xd = dropout(x, dropout_p, seed) if dropout_p > 0.0 else x
    rows = []
    for e in range(len(offsets) - 1):
        lo, hi = offsets[e], offsets[e + 1]
        w = weight[e] if transposed else weight[e].t()
        y = x[lo:hi] @ w
        if bias is not None:
            y = (y + bias[e]).to(x.dtype)
        y = y + (scaling * ((xd[lo:hi].to(lora_A.dtype) @ lora_A[e].t()) @ lora_B[e].t())).to(y.dtype)
        rows.append(y)
    N = weight.shape[2] if transposed else weight.shape[1]
    return torch.cat(rows) if rows else x.new_zeros((0, N))
