"""Helpers shared by every fastlora kernel: dropout from Philox, the tensor-core dot, tile loads and stores, the base
GEMM's main loop and epilogue, tile sizes, config pruning, launch settings.

Dropout mask. The keep decision for element ``(row, col)`` of an ``[M, K]`` activation is a pure function of
``(seed, row, col)``: word ``col % 4`` of Philox4x32-10 with key ``(seed_lo, seed_hi)`` and counter
``(col // 4, row, 0, 0)``, compared as an unsigned integer with ``threshold = floor(p * 2**32)``, so one Philox call
serves four columns. The forward and the backward regenerate the same mask from the saved seed, so nothing of size
``M·K`` is stored. ``philox.py`` defines the rounds and ``dropout_tile`` (re-exported here), and
``fastlora.reference.dropout_mask`` reproduces the mask bit for bit in PyTorch from the same constants.
"""

import contextlib
import contextvars
import dataclasses
import functools
import os
import threading
from collections.abc import Callable, Iterator

import torch
import triton
import triton.language as tl

from .philox import dropout_tile as dropout_tile  # the kernel files import it from here

# ``triton.jit`` reads TRITON_INTERPRET when a kernel is defined, so the mode is fixed when this module loads.
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Every launch of an autotuned kernel goes through this lock. Triton's ``Autotuner.run`` keeps the call's arguments
# on the shared kernel object (``self.nargs``) while it picks and launches a config, so two threads launching the same
# kernel at once can read each other's arguments (or None); and the interpreter patches ``triton.language`` during a
# launch. Launches are asynchronous on a GPU, so the lock is held for microseconds.
launch_lock = threading.Lock()


@dataclasses.dataclass(frozen=True)
class Launch:
    """One kernel launch as a launcher records it: the launcher's name and the bytes the launch must move at
    least (each operand it reads read once, each output written once)."""

    kernel: str
    bytes: int


_recorders: list[list[Launch]] = []


@contextlib.contextmanager
def recording_launches() -> Iterator[list[Launch]]:
    """Collect every kernel launch made inside the block, in order (the launchers record them on every backend,
    the interpreter's included). Nested blocks each see every launch."""
    log: list[Launch] = []
    _recorders.append(log)
    try:
        yield log
    finally:
        _recorders.remove(log)


@contextlib.contextmanager
def launching(kernel: str, *operands: torch.Tensor | None) -> Iterator[None]:
    """The block that launches ``kernel``: records the launch when ``recording_launches`` is on (``operands``: every
    tensor it reads or writes, for the byte count), and holds ``launch_lock``."""
    if _recorders:
        launch = Launch(kernel, sum(t.numel() * t.element_size() for t in operands if t is not None))
        for log in _recorders:
            log.append(launch)
    with launch_lock:
        _launch_state.depth = getattr(_launch_state, "depth", 0) + 1
        try:
            yield
        finally:
            _launch_state.depth -= 1


_launch_state = threading.local()


def in_launch() -> bool:
    """True inside a launcher's ``launching`` block on this thread: what torch ops run there are the kernel's own
    (the interpreter runs a kernel as numpy and torch calls), not launches of their own."""
    return getattr(_launch_state, "depth", 0) > 0


def is_interpreting() -> bool:
    """True when ``TRITON_INTERPRET=1`` was set before the kernels were defined: they run on CPU tensors."""
    return _INTERPRETING


def dropout_threshold(p: float) -> int:
    """The uint32 threshold below which a Philox word drops its element (keep probability ``1 - p``)."""
    return min(int(p * 2**32), 2**32 - 1)


def signed_threshold(p: float) -> int:
    """``dropout_threshold(p)`` moved into int32 range, as ``dropout_tile`` compares it."""
    return dropout_threshold(p) - 2**31


def dot_precision(*dtypes: torch.dtype) -> str:
    """``tl.dot`` precision for fp32 operands, following ``torch.backends.cuda.matmul.allow_tf32``."""
    if torch.float32 in dtypes and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def pow2_at_least_16(n: int) -> int:
    """Smallest power of two ``>= max(n, 16)``: ``tl.dot`` needs every tile dimension to be at least 16."""
    return max(16, triton.next_power_of_2(n))


def rank_tile(R: int) -> int:
    """The tile over a rank ``R``: the padded rank up to 64, then 64-wide tiles (a grid axis or a loop covers the
    rest), so no rank is compiled in and a rank-8 adapter does not pay for a 64-wide tile."""
    return min(64, pow2_at_least_16(R))


@triton.jit
def mma(acc, a, b, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """``acc += a @ b`` in fp32. Operands of different dtypes meet in fp32; ``UPCAST`` lifts 16-bit operands
    to fp32 (the interpreter multiplies bf16 bit patterns, triton-lang/triton#11584)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    elif a.dtype != b.dtype:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if a.dtype == tl.float32:
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def load_tile(ptr, rows, cols, stride_row, stride_col, mask_rows, mask_cols):
    """The ``[len(rows), len(cols)]`` tile at ``ptr + rows·stride_row + cols·stride_col``, zero where either mask is
    off. Indices that can pass 2**31 elements must come as int64."""
    return tl.load(
        ptr + rows[:, None] * stride_row + cols[None, :] * stride_col,
        mask=mask_rows[:, None] & mask_cols[None, :],
        other=0.0,
    )


@triton.jit
def store_tile(ptr, tile, rows, cols, stride_row, stride_col, mask_rows, mask_cols):
    """Store ``tile``, rounded to ``ptr``'s dtype, at ``ptr + rows·stride_row + cols·stride_col`` where both masks
    are on."""
    ptrs = ptr + rows[:, None] * stride_row + cols[None, :] * stride_col
    tl.store(ptrs, tile.to(ptr.dtype.element_ty), mask=mask_rows[:, None] & mask_cols[None, :])


@triton.jit
def _absmax(block, mask, wq_absmax_ptr, wq_absmax2_ptr, wq_code2_ptr, wq_offset_ptr, QBLOCK2: tl.constexpr):
    """The fp32 absmax of quantization blocks ``block``: read, or with ``QBLOCK2 > 0`` dequantized from its 8-bit
    code as ``code2[q] · absmax2[block // QBLOCK2] + offset``."""
    if QBLOCK2 == 0:
        return tl.load(wq_absmax_ptr + block, mask=mask, other=0.0)
    q = tl.load(wq_absmax_ptr + block, mask=mask, other=0).to(tl.int32)
    scale = tl.load(wq_absmax2_ptr + block // QBLOCK2, mask=mask, other=0.0)
    return tl.load(wq_code2_ptr + q) * scale + tl.load(wq_offset_ptr)


@triton.jit
def _dequant_rows(
    w_ptr, offs_n, k0, mask_n, K, wq_absmax_ptr, wq_code_ptr, wq_absmax2_ptr, wq_code2_ptr, wq_offset_ptr,
    QBLOCK: tl.constexpr, QBLOCK2: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """``W0[offs_n, k0 : k0 + BLOCK_K]`` (fp32, zero outside the weight) of a 4-bit W0 ``[N, K]`` whose rows hold whole
    quantization blocks (``K % QBLOCK == 0``; ``k0`` a multiple of ``BLOCK_K``): its ``BLOCK_K / 2`` bytes per row
    read as one vector, the two nibbles of each byte joined into adjacent columns, and one absmax per row and block
    broadcast over the block's columns, so the software pipeline stages 4-bit bytes, not dequantized values."""
    offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    mask_b = offs_b < K // 2
    packed = tl.load(
        w_ptr + offs_n[:, None] * (K // 2) + offs_b[None, :], mask=mask_n[:, None] & mask_b[None, :], other=0
    ).to(tl.int32)
    nibbles = tl.reshape(tl.join(packed >> 4, packed & 0xF), (BLOCK_N, BLOCK_K))  # the even element is the high nibble
    value = tl.load(wq_code_ptr + nibbles)
    blocks_per_row = K // QBLOCK
    if BLOCK_K <= QBLOCK:  # the tile lies in one block of each row
        absmax = _absmax(
            offs_n * blocks_per_row + k0 // QBLOCK, mask_n, wq_absmax_ptr, wq_absmax2_ptr, wq_code2_ptr,
            wq_offset_ptr, QBLOCK2,
        )  # fmt: skip
        tile = value * absmax[:, None]
    else:
        offs_q = k0 // QBLOCK + tl.arange(0, BLOCK_K // QBLOCK)
        absmax = _absmax(
            offs_n[:, None] * blocks_per_row + offs_q[None, :], mask_n[:, None] & (offs_q < blocks_per_row)[None, :],
            wq_absmax_ptr, wq_absmax2_ptr, wq_code2_ptr, wq_offset_ptr, QBLOCK2,
        )  # fmt: skip
        absmax = tl.broadcast_to(absmax[:, :, None], (BLOCK_N, BLOCK_K // QBLOCK, QBLOCK))
        tile = value * tl.reshape(absmax, (BLOCK_N, BLOCK_K))
    return tile


@triton.jit
def load_w_tile(
    w_ptr,  # W0: its elements, or with QBLOCK > 0 its 4-bit codes packed two to a byte (uint8)
    rows,  # [BLOCK_ROWS] int64
    cols,  # [BLOCK_COLS] int64
    row0,  # rows[0], and cols[0]: where the tile starts
    col0,
    stride_row,  # in elements of W0 (a 4-bit weight: of its flattened [N, K] matrix)
    stride_col,
    mask_rows,
    mask_cols,
    wq_absmax_ptr,  # [N·K / QBLOCK] fp32, or uint8 with QBLOCK2 > 0; read only with QBLOCK > 0
    wq_code_ptr,  # [16] fp32: the 4-bit code table (NF4 or FP4)
    wq_absmax2_ptr,  # [blocks / QBLOCK2] fp32, read only with QBLOCK2 > 0
    wq_code2_ptr,  # [256] fp32: the 8-bit code of the double-quantized absmax
    wq_offset_ptr,  # [1] fp32: added to every dequantized absmax
    DTYPE: tl.constexpr,  # the dtype a 4-bit tile is dequantized to (the activations')
    QBLOCK: tl.constexpr,  # 0: W0 is dense; else its quantization block size
    QBLOCK2: tl.constexpr,  # 0: absmax is fp32; else the block size of its double quantization
    QPACKED: tl.constexpr,  # 1: the tile's columns run along W0's K, 2: its rows do, whole blocks per row; 0: else
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    """The ``[BLOCK_ROWS, BLOCK_COLS]`` tile of ``W0``, zero outside the masks. With ``QBLOCK > 0`` W0 is 4-bit in
    bitsandbytes' layout (``fastlora.nf4``) and the tile is dequantized here, in registers, to ``DTYPE``: element ``f``
    of the flattened ``[N, K]`` weight is ``code[nibble] · absmax[f // QBLOCK]``, its nibble the high one of byte
    ``f // 2`` for even ``f``. No full-precision copy of W0 is ever written to memory. When each row of W0 holds whole
    blocks (``QPACKED``), the tile is read as bytes and absmax values (``_dequant_rows``); otherwise, element by
    element."""
    if QBLOCK == 0:
        return load_tile(w_ptr, rows, cols, stride_row, stride_col, mask_rows, mask_cols)
    if QPACKED == 1:
        tile = _dequant_rows(
            w_ptr, rows, col0, mask_rows, stride_row, wq_absmax_ptr, wq_code_ptr, wq_absmax2_ptr, wq_code2_ptr,
            wq_offset_ptr, QBLOCK, QBLOCK2, BLOCK_ROWS, BLOCK_COLS,
        )  # fmt: skip
    elif QPACKED == 2:
        tile = tl.trans(
            _dequant_rows(
                w_ptr, cols, row0, mask_cols, stride_col, wq_absmax_ptr, wq_code_ptr, wq_absmax2_ptr, wq_code2_ptr,
                wq_offset_ptr, QBLOCK, QBLOCK2, BLOCK_COLS, BLOCK_ROWS,
            )
        )  # fmt: skip
    else:
        mask = mask_rows[:, None] & mask_cols[None, :]
        f = rows[:, None] * stride_row + cols[None, :] * stride_col
        packed = tl.load(w_ptr + (f >> 1), mask=mask, other=0).to(tl.int32)
        nibble = (packed >> (4 - 4 * (f & 1)).to(tl.int32)) & 0xF
        absmax = _absmax(f // QBLOCK, mask, wq_absmax_ptr, wq_absmax2_ptr, wq_code2_ptr, wq_offset_ptr, QBLOCK2)
        tile = tl.load(wq_code_ptr + nibble) * absmax
    return tile.to(DTYPE)


@triton.jit
def base_gemm(
    acc,  # [BLOCK_M, BLOCK_N] fp32
    x_ptr,  # [M, K]
    wt_ptr,  # [K, N]  (a view of W0, either layout; 4-bit with QBLOCK > 0, see ``load_w_tile``)
    rows,  # [BLOCK_M] int64 row indices of x
    cols,  # [BLOCK_N] column indices of wt
    col0,  # cols[0]
    mask_rows,
    mask_cols,
    K,
    stride_xm,
    stride_xk,
    stride_wk,
    stride_wn,
    wq_absmax_ptr,
    wq_code_ptr,
    wq_absmax2_ptr,
    wq_code2_ptr,
    wq_offset_ptr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    QBLOCK: tl.constexpr,
    QBLOCK2: tl.constexpr,
    QPACKED: tl.constexpr,
):
    """``acc + x[rows, :] @ wt[:, cols]``: the base GEMM's main loop over ``K``, software-pipelined by the compiler
    (``num_stages``) once inlined into the kernel."""
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = load_tile(x_ptr, rows, offs_k, stride_xm, stride_xk, mask_rows, mask_k)
        # W0 has N·K elements, which can pass 2**31: its offsets are int64.
        w = load_w_tile(
            wt_ptr, offs_k.to(tl.int64), cols.to(tl.int64), k0, col0, stride_wk, stride_wn, mask_k, mask_cols,
            wq_absmax_ptr, wq_code_ptr, wq_absmax2_ptr, wq_code2_ptr, wq_offset_ptr,
            x_ptr.dtype.element_ty, QBLOCK, QBLOCK2, QPACKED, BLOCK_K, BLOCK_N,
        )  # fmt: skip
        acc = mma(acc, x, w, UPCAST, PRECISION)
    return acc


@dataclasses.dataclass(frozen=True)
class WeightOperand:
    """How a launcher passes ``W0`` (a 2-D view of it) to a kernel: the pointer, the strides in elements, and, for a
    4-bit weight, its quantization state as the ``wq_*`` arguments of ``load_w_tile``."""

    ptr: torch.Tensor
    stride0: int
    stride1: int
    args: tuple  # (wq_absmax_ptr, wq_code_ptr, wq_absmax2_ptr, wq_code2_ptr, wq_offset_ptr)
    qblock: int  # 0 for a dense W0
    qblock2: int
    qpacked: int  # ``load_w_tile``'s QPACKED: 1 or 2 when W0's rows hold whole blocks, along dim 1 or 0 of the view
    dtype: torch.dtype  # the dtype its tiles reach the tensor cores in
    tensors: tuple  # every tensor the kernel reads of it (for the launch record)


def weight_operand(w, act_dtype: torch.dtype) -> WeightOperand:
    """``w``: a 2-D tensor (any strides), or a ``fastlora.nf4.QuantizedWeight`` (or its ``.t()`` view), read 4-bit."""
    if isinstance(w, torch.Tensor):
        return WeightOperand(w, w.stride(0), w.stride(1), (w,) * 5, 0, 0, 0, w.dtype, (w,))
    absmax2 = w.nested_absmax if w.nested else w.absmax
    code2 = w.nested_code if w.nested else w.code
    offset = w.offset if w.nested else w.code
    args = (w.absmax, w.code, absmax2, code2, offset)
    packed = 0
    if w.in_features % w.blocksize == 0:
        packed = 1 if w.stride(1) == 1 else 2
    return WeightOperand(
        w.data, w.stride(0), w.stride(1), args, w.blocksize, w.nested_blocksize if w.nested else 0, packed, act_dtype,
        tuple(dict.fromkeys(t for t in (w.data, *args) if t is not None)),
    )  # fmt: skip


@triton.jit
def store_with_bias(
    out_ptr, acc, bias_ptr, rows, cols, stride_row, stride_col, mask_rows, mask_cols, HAS_BIAS: tl.constexpr
):
    """The GEMM epilogue: ``out[rows, cols] = acc + bias[cols]`` (``bias`` read only with ``HAS_BIAS``), added in
    fp32 and rounded once to ``out``'s dtype."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=mask_cols, other=0.0).to(tl.float32)[None, :]
    store_tile(out_ptr, acc, rows, cols, stride_row, stride_col, mask_rows, mask_cols)


@triton.jit
def tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Program id -> (pid_m, pid_n), walking ``GROUP_M`` row tiles per column so neighbours share L2."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


def m_bucket(M: int) -> int:
    """Autotune key for the token count: powers of two, so a new batch size rarely triggers a new search."""
    return min(triton.next_power_of_2(M), 16384)


# Largest shared memory a block may use: sm_80 (A100) 163 KiB, sm_90 (H100) 227 KiB. Configs are pruned against the
# device a kernel launches on (``device_smem_limit``); the static check and the AOT build prune against each
# architecture they compile for (``smem_limit``).
SMEM_LIMIT = {80: 166912, 90: 232448}
_smem_limit = contextvars.ContextVar("fastlora_smem_limit", default=SMEM_LIMIT[80])


@contextlib.contextmanager
def smem_limit(limit: int) -> Iterator[None]:
    """Prune configs against ``limit`` bytes of shared memory per block inside the block (``fits_in_smem``)."""
    token = _smem_limit.set(limit)
    try:
        yield
    finally:
        _smem_limit.reset(token)


@functools.cache
def device_smem_limit(device: torch.device) -> int:
    """The shared memory a block may opt in to on ``device`` (a CUDA device): 227 KiB on an H100, 163 KiB on an
    A100, 99 KiB on the 8.6 / 8.9 parts."""
    props = torch.cuda.get_device_properties(device)
    limit = getattr(props, "shared_memory_per_block_optin", 0)
    return limit or SMEM_LIMIT[90 if props.major >= 9 else 80]


def fits_in_smem(config: triton.Config, bytes_per_stage: int) -> bool:
    """Whether the software pipeline's operand tiles (``bytes_per_stage`` per stage) fit the shared memory being
    pruned against (``smem_limit``; sm_80's by default), with room for the epilogue."""
    return bytes_per_stage * max(config.num_stages, 1) <= _smem_limit.get() - 16384


# What one element of a 4-bit W0 tile read element by element (``load_w_tile`` with QPACKED = 0) costs a pipeline
# stage: Triton stages its fp32 absmax, the code-table values its nibbles gather and their indices (measured: 9 bytes).
# A tile read as bytes (QPACKED > 0) stages half a byte per element and one absmax per row and block; it is counted
# as a dense tile of the activations' dtype, which bounds it.
NF4_ELEMENTWISE_STAGE_BYTES = 9


def w_stage_bytes(act_bytes: int, QBLOCK: int, QPACKED: int) -> int:
    """Shared memory per element of a W0 tile in one pipeline stage: dense (``QBLOCK = 0``) or 4-bit."""
    return NF4_ELEMENTWISE_STAGE_BYTES if QBLOCK and not QPACKED else act_bytes


def nf4_tile_fits(
    config: triton.Config, rows: int, cols: int, act_bytes: int, QBLOCK: int, per_thread: int = 32
) -> bool:  # fmt: skip
    """Whether a ``rows x cols`` tile of a 4-bit W0 (``QBLOCK > 0``; any dense tile fits) can be dequantized in
    registers beside the kernel's other tiles: at most ``per_thread`` elements per thread, and with fp32 activations K
    steps of at most 64. The decode kernels (one-pass, fused multi-adapter) spilled 24-528 B beyond either on sm_80 and
    sm_90; the GEMM's 128-row accumulator takes 16 (32 spilled 8-32 B on sm_80 under Triton 3.6)."""
    if not QBLOCK:
        return True
    return rows * cols <= per_thread * 32 * config.num_warps and (act_bytes < 4 or rows <= 64)


# With dropout a tile's Philox rounds run in registers next to the accumulators; beyond this many dropout
# elements per thread, ptxas spills (measured by ``fastlora info`` on sm_80 and sm_90).
MAX_DROPOUT_ELEMS_PER_THREAD = 32


def dropout_fits(config: triton.Config, rows: int, cols: int) -> bool:
    return rows * cols <= MAX_DROPOUT_ELEMS_PER_THREAD * 32 * config.num_warps


def config_pruner(config_ok: Callable[..., bool], act_arg: str, lora_arg: str):
    """The ``early_config_prune`` of an autotuned kernel: the configs that ``config_ok(config, act_bytes, lora_bytes,
    **constexprs)`` keeps for a launch, with the element sizes read from the pointer arguments ``act_arg`` and
    ``lora_arg``.

    When no config fits, the list's first one is kept, as Triton needs one (the one-pass list puts first the config
    that fits every rank with fp32 operands). For the dtypes the ops accept the case does not arise: the static check
    compiles each kernel at its widest call site with fp32 operands and finds a config that fits at every one.
    """

    def prune(configs, nargs, **kwargs):
        act = nargs[act_arg]
        sizes = act.element_size(), nargs[lora_arg].element_size()
        limit = device_smem_limit(act.device) if act.is_cuda else SMEM_LIMIT[80]
        with smem_limit(limit):
            return [c for c in configs if config_ok(c, *sizes, **kwargs)] or configs[:1]

    return prune


@dataclasses.dataclass(frozen=True)
class GpuKernel:
    """An autotuned kernel as the static check and the AOT build compile it for GPUs, without launching it."""

    name: str  # its launcher's name
    fn: object  # the ``@triton.jit`` function under the autotuner
    configs: list[triton.Config]  # every config the launcher may run on a GPU
    config_ok: Callable[..., bool]  # (config, act_bytes, lora_bytes, **constexprs) -> whether the pruning keeps it
