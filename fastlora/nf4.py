"""bitsandbytes' 4-bit weight format (NF4 / FP4, optionally with double-quantized absmax) in pure PyTorch.

A :class:`QuantizedWeight` holds exactly the tensors of a bitsandbytes ``Params4bit`` and its ``QuantState``, in the
same memory layout, so a bnb weight is read in place (:func:`from_bnb`) and the fused kernels dequantize tiles of it
in registers. bitsandbytes itself is optional: only :func:`to_bnb` imports it.

Format of a frozen ``[N, K]`` weight ``W`` (``N = out_features``, ``K = in_features``)
----------------------------------------------------------------------------------------
- **Elements.** ``W`` is flattened row-major: element ``i`` is ``W[i // K, i % K]``, ``0 <= i < N*K``.
- **Nibbles.** Each element is a 4-bit index ``q[i]`` into ``code`` (16 fp32 values in ``[-1, 1]``). Byte ``j`` of
  ``data`` holds two of them: ``data[j] = (q[2j] << 4) | q[2j + 1]``, the *even* element in the **high** nibble.
  ``data`` has ``ceil(N*K / 2)`` bytes (bnb keeps it as a ``[bytes, 1]`` tensor, possibly of another storage dtype,
  which only reinterprets the same bytes); when ``N*K`` is odd the last low nibble is padding, the index of 0.0.
- **Blocks.** Block ``b`` is the elements ``[b*blocksize, (b+1)*blocksize)`` of the flattened weight, so a block
  spans rows when ``K % blocksize != 0``; the last block is short when ``N*K % blocksize != 0``. There are
  ``ceil(N*K / blocksize)`` blocks, one ``absmax`` each.
- **Value.** ``W[i] = code[q[i]] * absmax[i // blocksize]``, the product in fp32, rounded once (to nearest even) to
  the output dtype: ``bitsandbytes.functional.dequantize_4bit`` for fp32, fp16 and bf16, bit for bit (but see the
  known limits).
- **Double quantization** (``nested``). ``absmax`` is then ``uint8``: an index into ``nested_code`` (bnb's signed
  8-bit dynamic map, 256 sorted fp32 values) per block, with one fp32 ``nested_absmax`` per ``nested_blocksize``
  (256) blocks and one fp32 ``offset``::

      absmax_fp32[b] = nested_code[absmax[b]] * nested_absmax[b // nested_blocksize] + offset

  a rounded fp32 product, then a rounded fp32 sum (no fused multiply-add).

Quantization (bit-exact with ``bitsandbytes.functional.quantize_4bit`` on CPU)
----------------------------------------------------------------------------
The weight is upcast to fp32. ``absmax[b] = max |w|`` over the block; the full blocks are scaled by
``clamp(w * (1 / absmax), -1, 1)`` (an fp32 reciprocal, then a product), the short last block by
``clamp(w / absmax, -1, 1)``. An all-zero full block keeps ``absmax = 0`` (its elements scale to 0); an all-zero
short last block stores ``absmax = 1e-38``. Each scaled value takes the nearest code, a value exactly halfway taking
the lower one. FP4 holds 0.0 twice (indices 0 and 8): values in ``(-0.0026, 0]`` take index 0, values in
``(0, 0.0026]`` index 8. Double quantization takes ``offset = absmax.mean()``, splits ``absmax - offset`` into blocks
of 256, stores each block's max ``|.|`` as ``nested_absmax``, and picks the dynamic code as bnb's CPU kernel does:
through a table of 65536 points, ``t = trunc((clamp(v, -1, 1) + 1) * 0.5 * 65535 + 0.5)``, index = the number of
code midpoints below ``-1 + 2t / 65535``; NaN picks index 0 and an all-zero (or all-NaN) block index 0 throughout.

Known limits
------------
- bnb's CUDA quantizer is a separate kernel (fixed threshold trees for NF4 and FP4, with FP4's sign taken from the
  value; an exact binary search for the 8-bit code), so its bytes can differ from the CPU's at ties, around zero and
  in the nested absmax. Weights it quantized are read the same way, but :func:`quantize` follows bnb's CPU rules on
  every device (on CUDA, torch's ``absmax.mean()`` for the offset may round differently from the CPU's).
- bnb's CPU ``dequantize_4bit`` reads ``absmax`` per row when ``K`` is a multiple of 16 (its AVX-512 path), which is
  wrong when ``K % blocksize != 0`` (e.g. ``[64, 96]`` with blocksize 64). :meth:`QuantizedWeight.dequantize`
  follows the format above (as bnb's CUDA and pure-torch paths do), not that path.
- bnb repacks a ``Linear4bit`` weight for its CPU kernel on the first ``eval()`` forward without grad on a CPU with
  AVX512-BF16 (``quant_state.packing_format_for_cpu``): nibbles reordered per 32 rows, absmax as ``[K/blocksize, N]``
  bf16, double quantization undone. :func:`from_bnb` unpacks such a weight into the layout above (a copy) with the
  bf16 absmax it now uses, upcast to fp32: the original fp32 (or nested) absmax no longer exists in bnb's state.
"""

from __future__ import annotations

import dataclasses
import math

import torch

NF4_CODE: tuple[float, ...] = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
"""bnb's NF4 table: quantiles of N(0, 1) scaled to [-1, 1], sorted. Exact as fp32."""

FP4_CODE: tuple[float, ...] = (
    0.0,
    0.0052083334885537624,
    0.6666666865348816,
    1.0,
    0.3333333432674408,
    0.5,
    0.1666666716337204,
    0.25,
    0.0,
    -0.0052083334885537624,
    -0.6666666865348816,
    -1.0,
    -0.3333333432674408,
    -0.5,
    -0.1666666716337204,
    -0.25,
)
"""bnb's FP4 table (1 sign, 2 exponent, 1 mantissa bit; exponent bias 2) in bit-pattern order, divided by 12 in fp32.

Index 8, the pattern of -0, holds +0.0 as in bnb.
"""

QUANT_TYPES = ("nf4", "fp4")

_CODES = {"nf4": NF4_CODE, "fp4": FP4_CODE}

# The FP4 indices in ascending order of value, as bnb's CPU quantizer gets them from a stable argsort: of the two
# zeros, index 0 comes first. Fixed here so that CUDA's argsort, which need not be stable, cannot change the bytes.
_FP4_ASCENDING = (11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3)

# What bnb accepts for 4-bit blocks (quantize_4bit) and for the nested blocks of the absmax (its CUDA
# quantize_blockwise; quantize_4bit itself always uses 256).
_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
_NESTED_BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# bnb's CPU 8-bit quantizer maps [-1, 1] onto this many table points before choosing a code.
_LUT_POINTS = 65536

# The floor bnb puts under a block's absmax before dividing by it.
_TINY = 1e-38


def _code_tensor(quant_type: str, device: torch.device | str) -> torch.Tensor:
    return torch.tensor(_CODES[quant_type], dtype=torch.float32, device=device)


def _dynamic_code(device: torch.device | str = "cpu") -> torch.Tensor:
    """bnb's signed 8-bit dynamic map (``create_dynamic_map()``): 256 sorted fp32 values, the nested absmax code.

    Built as bnb builds it (fp32 ``linspace`` midpoints times powers of ten), so that the values are bit-identical.
    """
    values = [0.0, 1.0]
    for exponent in range(7):
        bounds = torch.linspace(0.1, 1, 2**exponent + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        scale = 10 ** (exponent - 6)
        values += (scale * means).tolist()
        values += (-scale * means).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32, device=device)


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class QuantizedWeight:
    """A frozen ``[out_features, in_features]`` weight in bitsandbytes' 4-bit format (see the module docstring).

    Read from bnb (:func:`from_bnb`), the tensors are bnb's own (``Params4bit.data`` and its ``QuantState``), shared
    and never repacked, so kernels read them in place. ``transposed`` makes it the logical matrix ``W^T`` without moving data: :meth:`stride` then gives the
    element strides of ``W^T`` into the flattened ``W``. The constructor checks that sizes and dtypes agree.
    """

    data: torch.Tensor
    """uint8, contiguous, ``ceil(N*K / 2)`` bytes in any shape: ``data[j] = (q[2j] << 4) | q[2j + 1]``."""
    absmax: torch.Tensor
    """``[ceil(N*K / blocksize)]``: fp32, or uint8 indices into ``nested_code`` when double-quantized."""
    code: torch.Tensor
    """``[16]`` fp32, the 4-bit code table."""
    blocksize: int
    out_features: int
    in_features: int
    dtype: torch.dtype
    """The dtype :meth:`dequantize` gives by default: the dtype of the weight before quantization."""
    quant_type: str
    nested_absmax: torch.Tensor | None = None
    """``[ceil(blocks / nested_blocksize)]`` fp32 (double quantization only)."""
    nested_code: torch.Tensor | None = None
    """``[256]`` fp32, the dynamic 8-bit map (double quantization only)."""
    nested_blocksize: int = 0
    offset: torch.Tensor | None = None
    """One fp32 element (double quantization only); a tensor, as reading it on the host would sync a GPU."""
    transposed: bool = False

    def __post_init__(self) -> None:
        self.validate()

    @property
    def nested(self) -> bool:
        """Whether ``absmax`` is double-quantized."""
        return self.nested_absmax is not None

    @property
    def num_blocks(self) -> int:
        """The number of absmax blocks, ``ceil(N*K / blocksize)``."""
        return -(-self.out_features * self.in_features // self.blocksize)

    @property
    def shape(self) -> tuple[int, int]:
        """The logical shape: ``(N, K)``, or ``(K, N)`` when transposed."""
        if self.transposed:
            return (self.in_features, self.out_features)
        return (self.out_features, self.in_features)

    def size(self, dim: int | None = None) -> int | tuple[int, int]:
        if dim is None:
            return self.shape
        return self.shape[dim]

    def dim(self) -> int:
        return 2

    def stride(self, dim: int | None = None) -> int | tuple[int, int]:
        """Strides of the logical matrix in elements of the flattened ``[N, K]`` weight: ``(K, 1)``, or ``(1, K)``."""
        strides = (1, self.in_features) if self.transposed else (self.in_features, 1)
        if dim is None:
            return strides
        return strides[dim]

    def t(self) -> QuantizedWeight:
        """The transpose, as a view: the same tensors, ``transposed`` flipped."""
        return dataclasses.replace(self, transposed=not self.transposed)

    @property
    def device(self) -> torch.device:
        return self.data.device

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """Every tensor held, for byte counts and moves."""
        optional = (self.nested_absmax, self.nested_code, self.offset)
        return (self.data, self.absmax, self.code, *(t for t in optional if t is not None))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def to(self, device: torch.device | str) -> QuantizedWeight:
        """A copy on ``device`` (``self`` when already there)."""
        device = torch.device(device)
        if all(_same_device(t.device, device) for t in self.tensors()):
            return self

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return dataclasses.replace(
            self,
            data=move(self.data),
            absmax=move(self.absmax),
            code=move(self.code),
            nested_absmax=move(self.nested_absmax),
            nested_code=move(self.nested_code),
            offset=move(self.offset),
        )

    def absmax_fp32(self) -> torch.Tensor:
        """``[blocks]`` fp32 scales, undoing double quantization as bnb does (bit-exact); ``absmax`` itself if fp32."""
        if not self.nested:
            return self.absmax
        group = torch.arange(self.num_blocks, device=self.absmax.device) // self.nested_blocksize
        return self.nested_code[self.absmax.long()] * self.nested_absmax[group] + self.offset.reshape(())

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The ``[N, K]`` weight (a transposed ``[K, N]`` view when transposed) in ``dtype`` (default ``self.dtype``).

        Bit-exact with ``bitsandbytes.functional.dequantize_4bit`` for fp32, fp16 and bf16: ``code * absmax`` in
        fp32, rounded once to ``dtype``.
        """
        dtype = self.dtype if dtype is None else dtype
        if dtype not in _FLOAT_DTYPES:
            raise ValueError(f"dequantize gives float32, float16 or bfloat16, not {dtype}")
        n, blocksize = self.out_features * self.in_features, self.blocksize
        packed = self.data.reshape(-1)
        nibbles = torch.stack((packed >> 4, packed & 0xF), dim=-1).reshape(-1)[:n]
        values = self.code[nibbles.long()]
        padded = torch.nn.functional.pad(values, (0, self.num_blocks * blocksize - n))
        scaled = (padded.view(-1, blocksize) * self.absmax_fp32().unsqueeze(1)).reshape(-1)[:n]
        weight = scaled.to(dtype).view(self.out_features, self.in_features)
        return weight.t() if self.transposed else weight

    def validate(self) -> None:
        """Raise ValueError naming the first field that disagrees with the format."""
        if self.quant_type not in QUANT_TYPES:
            raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {self.quant_type!r}")
        if self.blocksize not in _BLOCKSIZES:
            raise ValueError(f"blocksize must be one of {_BLOCKSIZES}, got {self.blocksize!r}")
        for name in ("out_features", "in_features"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {self.dtype}")
        if not isinstance(self.transposed, bool):
            raise ValueError(f"transposed must be a bool, got {self.transposed!r}")
        shape = f"[{self.out_features}, {self.in_features}]"

        _check_tensor(
            "data",
            self.data,
            torch.uint8,
            (self.out_features * self.in_features + 1) // 2,
            f"ceil(N*K / 2) bytes for {shape}",
        )
        if not self.data.is_contiguous():
            raise ValueError("data must be contiguous")
        blocks = f"one per block of {self.blocksize} elements of {shape}"
        _check_tensor("code", self.code, torch.float32, 16, "16 values", one_dim=True)

        nested_fields = {"nested_absmax": self.nested_absmax, "nested_code": self.nested_code, "offset": self.offset}
        given = [name for name, value in nested_fields.items() if value is not None]
        if given and len(given) < len(nested_fields):
            missing = [name for name in nested_fields if name not in given]
            raise ValueError(f"double quantization needs all of {list(nested_fields)}: {missing} missing")
        if self.nested:
            if self.nested_blocksize not in _NESTED_BLOCKSIZES:
                raise ValueError(f"nested_blocksize must be one of {_NESTED_BLOCKSIZES}, got {self.nested_blocksize!r}")
            _check_tensor("absmax", self.absmax, torch.uint8, self.num_blocks, f"{blocks} (uint8: double-quantized)")
            groups = -(-self.num_blocks // self.nested_blocksize)
            _check_tensor(
                "nested_absmax",
                self.nested_absmax,
                torch.float32,
                groups,
                f"one per {self.nested_blocksize} blocks",
                one_dim=True,
            )
            _check_tensor("nested_code", self.nested_code, torch.float32, 256, "256 values", one_dim=True)
            _check_tensor("offset", self.offset, torch.float32, 1, "one value")
        else:
            if self.nested_blocksize != 0:
                raise ValueError(f"nested_blocksize is {self.nested_blocksize} without double quantization (want 0)")
            _check_tensor("absmax", self.absmax, torch.float32, self.num_blocks, blocks)
        if self.absmax.dim() != 1 or not self.absmax.is_contiguous():
            raise ValueError(f"absmax must be a contiguous 1-D tensor, got shape {tuple(self.absmax.shape)}")

        devices = {t.device for t in self.tensors()}
        if len(devices) > 1:
            raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")

    def __repr__(self) -> str:
        nested = f", nested_blocksize={self.nested_blocksize}" if self.nested else ""
        transposed = ", transposed" if self.transposed else ""
        return (
            f"QuantizedWeight({self.quant_type}, [{self.out_features}, {self.in_features}], "
            f"blocksize={self.blocksize}{nested}, dtype={self.dtype}, device={self.device}{transposed})"
        )


def _same_device(actual: torch.device, wanted: torch.device) -> bool:
    if actual.type != wanted.type:
        return False
    return wanted.index is None or actual.index == wanted.index


def _check_tensor(name: str, value: object, dtype: torch.dtype, numel: int, what: str, one_dim: bool = False) -> None:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(value).__name__}")
    if value.dtype != dtype:
        raise ValueError(f"{name} must be {dtype}, got {value.dtype}")
    if value.numel() != numel:
        raise ValueError(f"{name} has {value.numel()} elements, want {numel} ({what})")
    if one_dim and value.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(value.shape)}")


def _quantize_4bit_indices(flat: torch.Tensor, blocksize: int, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The 4-bit indices (padded to an even count) and fp32 absmax of a flat fp32 tensor, as bnb's CPU op."""
    n = flat.numel()
    full = n - n % blocksize
    head = flat[:full].view(-1, blocksize)
    absmax = head.abs().max(dim=1).values
    scaled = (head * (1.0 / absmax.clamp(min=_TINY).unsqueeze(1))).clamp(-1, 1).reshape(-1)
    if full < n:
        # bnb divides the short last block instead of multiplying by a reciprocal, and stores the clamped absmax.
        tail_absmax = flat[full:].abs().max().clamp(min=_TINY)
        absmax = torch.cat((absmax, tail_absmax.reshape(1)))
        scaled = torch.cat((scaled, (flat[full:] / tail_absmax).clamp(-1, 1)))
    if n % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))

    code = _code_tensor(quant_type, flat.device)
    if quant_type == "fp4":
        ascending = torch.tensor(_FP4_ASCENDING, device=flat.device)
        sorted_code = code[ascending]
    else:
        sorted_code = code
    midpoints = (sorted_code[:-1] + sorted_code[1:]) / 2
    # bucketize (right=False) sends a value equal to a midpoint to the lower code, as bnb does.
    indices = torch.bucketize(scaled, midpoints)
    if quant_type == "fp4":
        indices = ascending[indices]
    return indices.to(torch.uint8), absmax


def _quantize_blockwise_8bit(
    values: torch.Tensor, code: torch.Tensor, blocksize: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 indices into the sorted 256-value ``code`` and fp32 absmax per block: bnb's CPU ``quantize_blockwise``.

    bnb's C++ kernel does not search the code exactly: it rounds the scaled value to one of 65536 evenly spaced
    points of [-1, 1] and takes the code nearest to that point. Reproduced here step by step in fp32.
    """
    n = values.numel()
    blocks = -(-n // blocksize)
    padded = torch.nn.functional.pad(values, (0, blocks * blocksize - n)).view(blocks, blocksize)
    # The C++ max skips NaN; the zero padding cannot change a max of magnitudes.
    absmax = padded.abs().nan_to_num(nan=0.0, posinf=math.inf).max(dim=1).values
    scaled = (padded * (1.0 / absmax).unsqueeze(1)).clamp(-1, 1)
    last = _LUT_POINTS - 1
    # Whether or not the C++ compiler fuses `* 65535 + 0.5` into one rounding, the truncated point is the same for
    # every fp32 value in [0, 1] (checked exhaustively), so the two-rounding torch form is exact.
    point = ((scaled + 1.0) * 0.5 * float(last) + 0.5).nan_to_num(nan=0.0).to(torch.int32)
    grid = -1.0 + (2.0 * point.float()) / float(last)
    midpoints = (code[:-1] + code[1:]) / 2
    # right=False: the number of midpoints strictly below the point, the C++ table's rule.
    indices = torch.searchsorted(midpoints, grid.reshape(-1)).view(blocks, blocksize)
    indices = torch.where(absmax.unsqueeze(1) == 0, 0, indices)
    return indices.reshape(-1)[:n].to(torch.uint8), absmax


def quantize(
    weight: torch.Tensor,
    *,
    blocksize: int = 64,
    quant_type: str = "nf4",
    double_quant: bool = True,
    nested_blocksize: int = 256,
) -> QuantizedWeight:
    """Quantize an ``[N, K]`` fp32/fp16/bf16 weight to bnb's 4-bit format, on the weight's device.

    Bit-exact with ``bitsandbytes.functional.quantize_4bit(weight, blocksize=blocksize, quant_type=quant_type,
    compress_statistics=double_quant)`` on CPU: the same bytes, absmax, nested absmax and offset.
    """
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"quantize expects a tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"quantize expects a 2-D [out_features, in_features] weight, got shape {tuple(weight.shape)}")
    if weight.numel() == 0:
        raise ValueError(f"quantize expects a non-empty weight, got shape {tuple(weight.shape)}")
    if weight.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"quantize expects a float32, float16 or bfloat16 weight, got {weight.dtype}")
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    if blocksize not in _BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {_BLOCKSIZES}, got {blocksize!r}")
    if double_quant and nested_blocksize not in _NESTED_BLOCKSIZES:
        raise ValueError(f"nested_blocksize must be one of {_NESTED_BLOCKSIZES}, got {nested_blocksize!r}")

    out_features, in_features = weight.shape
    with torch.no_grad():
        indices, absmax = _quantize_4bit_indices(weight.detach().reshape(-1).float(), blocksize, quant_type)
        data = ((indices[0::2] << 4) | indices[1::2]).unsqueeze(1)
        fields = {}
        if double_quant:
            offset = absmax.mean()
            nested_code = _dynamic_code(weight.device)
            qabsmax, nested_absmax = _quantize_blockwise_8bit(absmax - offset, nested_code, nested_blocksize)
            absmax = qabsmax
            fields = {
                "nested_absmax": nested_absmax,
                "nested_code": nested_code,
                "nested_blocksize": nested_blocksize,
                "offset": offset,
            }
    return QuantizedWeight(
        data=data,
        absmax=absmax,
        code=_code_tensor(quant_type, weight.device),
        blocksize=blocksize,
        out_features=out_features,
        in_features=in_features,
        dtype=weight.dtype,
        quant_type=quant_type,
        **fields,
    )


def _unpack_cpu_repacked(data: torch.Tensor, absmax: torch.Tensor, out_features: int, in_features: int, block_n: int):
    """Undo bnb's ``_convert_weight_packed_for_cpu`` (block_n 32): standard bytes and fp32 absmax, new tensors.

    The repacked ``[N, K/2]`` bytes go 32 at a time per (32-row group, column pair): byte ``t`` holds, in its low
    nibble, element ``(row t // 2, column 2p + t % 2)`` of the group and, in its high nibble, the same element of row
    ``16 + t // 2``. ``absmax`` was reshaped to ``[N, K/blocksize]``, transposed and cast to bf16.
    """
    packed = data.reshape(-1, block_n)
    nibbles = torch.cat((packed & 0xF, packed >> 4), dim=-1)
    nibbles = nibbles.view(out_features // block_n, in_features // 2, block_n, 2).transpose(1, 2).reshape(-1)
    standard = ((nibbles[0::2] << 4) | nibbles[1::2]).unsqueeze(1)
    return standard, absmax.t().reshape(-1).float()


def from_bnb(weight) -> QuantizedWeight:
    """Read a bitsandbytes 4-bit weight (a ``Params4bit``, or anything with ``.data`` and ``.quant_state``) in place.

    No tensor is copied: ``data`` is viewed as uint8 whatever bnb's ``quant_storage`` is. A weight that bnb has
    repacked for its CPU kernel (``quant_state.packing_format_for_cpu``) is unpacked into new tensors instead, with
    bnb's bf16 absmax upcast to fp32 and no double quantization (see the module docstring); the weight itself is
    never modified. Does not import bitsandbytes.
    """
    state = getattr(weight, "quant_state", None)
    data = getattr(weight, "data", None)
    if state is None or not isinstance(data, torch.Tensor) or not hasattr(state, "absmax"):
        kind = type(weight).__name__
        hint = ""
        if isinstance(getattr(weight, "weight", None), torch.Tensor):
            hint = " (pass the module's .weight)"
        elif data is not None and state is None and hasattr(weight, "quant_type"):
            hint = " (not quantized yet: move it to a device first)"
        raise TypeError(f"from_bnb expects a bitsandbytes 4-bit weight with a quant_state, got {kind}{hint}")
    quant_type = getattr(state, "quant_type", None)
    if quant_type not in QUANT_TYPES:
        raise TypeError(f"from_bnb expects an nf4 or fp4 quant_state, got quant_type {quant_type!r}")
    shape = tuple(state.shape)
    if len(shape) != 2:
        raise ValueError(f"from_bnb reads 2-D weights, got a quantized shape {shape}")
    out_features, in_features = shape

    if getattr(state, "packing_format_for_cpu", False):
        block_n = 32
        if data.dtype != torch.uint8 or tuple(data.shape) != (out_features, in_features // 2):
            raise ValueError(
                f"a weight repacked by bitsandbytes for CPU should be uint8 [{out_features}, {in_features // 2}], "
                f"got {data.dtype} {tuple(data.shape)}"
            )
        standard, absmax = _unpack_cpu_repacked(data, state.absmax, out_features, in_features, block_n)
        return QuantizedWeight(
            data=standard,
            absmax=absmax,
            code=state.code,
            blocksize=state.blocksize,
            out_features=out_features,
            in_features=in_features,
            dtype=getattr(state, "original_dtype", state.dtype),
            quant_type=quant_type,
        )

    if data.dtype != torch.uint8:
        data = data.view(torch.uint8)
    fields = {}
    if getattr(state, "nested", False):
        fields = {
            "nested_absmax": state.state2.absmax,
            "nested_code": state.state2.code,
            "nested_blocksize": state.state2.blocksize,
            "offset": state.offset,
        }
    return QuantizedWeight(
        data=data,
        absmax=state.absmax,
        code=state.code,
        blocksize=state.blocksize,
        out_features=out_features,
        in_features=in_features,
        dtype=state.dtype,
        quant_type=quant_type,
        **fields,
    )


def to_bnb(qw: QuantizedWeight, requires_grad: bool = False) -> torch.nn.Parameter:
    """A ``bitsandbytes.nn.Params4bit`` sharing ``qw``'s tensors, with a matching ``QuantState``.

    Needs bitsandbytes (``pip install fastlora[qlora]``) and an untransposed weight: bnb has no transposed view.
    """
    try:
        import bitsandbytes as bnb
    except ImportError as error:
        raise ImportError("to_bnb needs bitsandbytes: pip install fastlora[qlora]") from error
    if qw.transposed:
        raise ValueError("to_bnb needs the untransposed [out_features, in_features] weight; call .t() first")

    state2 = None
    if qw.nested:
        state2 = bnb.functional.QuantState(
            absmax=qw.nested_absmax, code=qw.nested_code, blocksize=qw.nested_blocksize, dtype=torch.float32
        )
    state = bnb.functional.QuantState(
        absmax=qw.absmax,
        shape=torch.Size((qw.out_features, qw.in_features)),
        code=qw.code,
        blocksize=qw.blocksize,
        quant_type=qw.quant_type,
        dtype=qw.dtype,
        offset=qw.offset,
        state2=state2,
    )
    return bnb.nn.Params4bit(
        qw.data.view(-1, 1),
        requires_grad=requires_grad,
        quant_state=state,
        blocksize=qw.blocksize,
        compress_statistics=qw.nested,
        quant_type=qw.quant_type,
        quant_storage=torch.uint8,
        bnb_quantized=True,
    )
