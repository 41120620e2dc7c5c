"""What every op shares: the backend choice, the dtypes each backend takes, and the checks of the base layer.

Backends, chosen per call (``FASTLORA_BACKEND=auto|triton|torch`` or an op's ``backend`` argument):

- ``triton``: the kernels of ``fastlora.kernels``, on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1``
  was set before Triton was imported (the interpreter: slow, for tests);
- ``torch``: ``fastlora.reference``, the same math in PyTorch, for every other device;
- ``auto`` (default): ``triton`` for CUDA tensors and for CPU tensors under the interpreter, else ``torch``.
"""

from __future__ import annotations

import os

import torch

from ..kernels import is_interpreting
from ..nf4 import QuantizedWeight

BACKENDS = ("auto", "triton", "torch")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TORCH_DTYPES = TRITON_DTYPES + (torch.float64,)


def resolve_backend(device: torch.device, backend: str | None = None) -> str:
    """The backend (``"triton"`` or ``"torch"``) that runs tensors on ``device``."""
    choice = backend or os.environ.get("FASTLORA_BACKEND", "auto") or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"fastlora: backend must be one of {BACKENDS}, got {choice!r} (FASTLORA_BACKEND or backend=)")
    if choice == "torch":
        return "torch"
    runs_triton = device.type == "cuda" or (device.type == "cpu" and is_interpreting())
    if choice == "triton" and not runs_triton:
        if device.type == "cpu":
            raise RuntimeError(
                "fastlora: backend 'triton' was forced for CPU tensors, but the Triton interpreter is off; "
                "set TRITON_INTERPRET=1 before importing triton, or use backend 'torch' or 'auto'"
            )
        raise RuntimeError(f"fastlora: backend 'triton' runs CUDA tensors, got tensors on {device}")
    return "triton" if runs_triton else "torch"


def as_2d(x: torch.Tensor) -> torch.Tensor:
    """``x [..., K]`` as ``[M, K]``: a view whenever the leading dims collapse (kernels take any strides)."""
    try:
        return x.view(-1, x.shape[-1])
    except RuntimeError:
        return x.reshape(-1, x.shape[-1])


def is_quantized(weight) -> bool:
    """Whether ``weight`` is a 4-bit ``fastlora.nf4.QuantizedWeight`` rather than a tensor."""
    return isinstance(weight, QuantizedWeight)


def weight_t(weight: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """The ``[K, N]`` view of ``W0``, whichever way it is stored."""
    return weight if fan_in_fan_out else weight.t()


def out_features(weight: torch.Tensor, fan_in_fan_out: bool) -> int:
    """``N`` of ``W0`` stored ``[N, K]``, or ``[K, N]`` with ``fan_in_fan_out``."""
    return weight.shape[1] if fan_in_fan_out else weight.shape[0]


def check_tensor_types(where: str, tensors: dict, optional: tuple[str, ...] = ()) -> None:
    """Every value of ``tensors`` (name -> value) is a ``torch.Tensor``; those named in ``optional`` may be None.
    Ops call it first, before any attribute of their arguments is read."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) and not (t is None and name in optional):
            expected = "a torch.Tensor or None" if name in optional else "a torch.Tensor"
            raise TypeError(f"{where}: {name} must be {expected}, got {type(t).__name__}")


def check_devices_and_dtypes(where: str, devices: dict, x, weight, backend: str) -> None:
    """``devices`` (name -> device) are one device, ``x`` has a dtype the backend runs, and ``weight`` has x's."""
    if len(set(devices.values())) > 1:
        raise ValueError(f"{where}: all tensors must be on one device, got {devices}")
    allowed = TRITON_DTYPES if backend == "triton" else TORCH_DTYPES
    if x.dtype not in allowed:
        raise TypeError(f"{where}: x.dtype must be one of {allowed} on the {backend} backend, got {x.dtype}")
    if weight.dtype != x.dtype:
        raise TypeError(f"{where}: weight.dtype ({weight.dtype}) must equal x.dtype ({x.dtype})")


def _check_x_and_bias_dtype(where: str, x, bias) -> None:
    if bias is not None and bias.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"{where}: bias.dtype must be x.dtype ({x.dtype}) or float32, got {bias.dtype}")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{where}: x must have shape [..., K] with K >= 1, got {tuple(x.shape)}")


def _check_bias_shape(where: str, bias, N: int) -> None:
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"{where}: bias must be [N] = [{N}], got {tuple(bias.shape)}")


def check_base_layer(where: str, tensors: dict, x, weight, bias, fan_in_fan_out: bool, backend: str) -> tuple[int, int]:
    """The checks every op shares: ``tensors`` (name -> tensor or None, types already checked with
    ``check_tensor_types``) are on one device, and ``x``, ``weight``, ``bias`` make a linear layer of these dtypes and
    shapes. ``weight`` may be a 4-bit ``QuantizedWeight`` (``[N, K]``): ``x`` and ``bias`` are then of a dtype the
    kernels dequantize to (fp16, bf16 or fp32, whatever the weight's original dtype), every tensor on the weight's
    device. Returns ``(K, N)``."""
    if is_quantized(weight):
        return _check_quantized_base(where, tensors, x, weight, bias, fan_in_fan_out)
    check_devices_and_dtypes(where, {n: t.device for n, t in tensors.items() if t is not None}, x, weight, backend)
    _check_x_and_bias_dtype(where, x, bias)
    if weight.dim() != 2:
        raise ValueError(f"{where}: weight must be 2-D, got shape {tuple(weight.shape)}")
    K = x.shape[-1]
    N, K_w = (weight.shape[1], weight.shape[0]) if fan_in_fan_out else weight.shape
    if K_w != K:
        layout = "[K, N] (fan_in_fan_out=True)" if fan_in_fan_out else "[N, K]"
        raise ValueError(
            f"{where}: weight {tuple(weight.shape)} read as {layout} has K={K_w}, but x has K={K} "
            f"(x.shape={tuple(x.shape)})"
        )
    _check_bias_shape(where, bias, N)
    return K, N


def _check_quantized_base(where: str, tensors: dict, x, weight, bias, fan_in_fan_out: bool) -> tuple[int, int]:
    if fan_in_fan_out:
        raise ValueError(f"{where}: a 4-bit weight is stored [N, K]; fan_in_fan_out=True does not apply to it")
    if weight.transposed:
        raise ValueError(f"{where}: weight must be the 4-bit [N, K] weight itself, got its transposed view")
    devices = {n: t.device for n, t in tensors.items() if t is not None and n != "weight"}
    devices["weight"] = weight.device
    if len(set(devices.values())) > 1:
        raise ValueError(f"{where}: all tensors must be on one device, got {devices}")
    if x.dtype not in TRITON_DTYPES:
        raise TypeError(f"{where}: x.dtype must be one of {TRITON_DTYPES} over a 4-bit weight, got {x.dtype}")
    _check_x_and_bias_dtype(where, x, bias)
    N, K = weight.out_features, weight.in_features
    if x.shape[-1] != K:
        raise ValueError(
            f"{where}: the 4-bit weight is [N, K] = [{N}, {K}], but x has K={x.shape[-1]} (x.shape={tuple(x.shape)})"
        )
    _check_bias_shape(where, bias, N)
    return K, N
