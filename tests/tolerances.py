"""The one tolerance table: how far a result may be from the fp64 reference, per dtype.

Errors are measured relative to the largest magnitude of the expected tensor (outputs and gradients of a
linear layer are sums whose rounding error scales with their size, not with each element). The table holds a
few units of the dtype's rounding step, times the growth of fp32 accumulation error with the reduction length.
"""

import math

import torch

# Units of relative error allowed, per activation dtype (eps: fp32 1.2e-7, fp16 9.8e-4, bf16 7.8e-3).
RELATIVE = {
    torch.float32: 2e-6,
    torch.float16: 4e-3,
    torch.bfloat16: 3.2e-2,
}


def tolerance(dtype: torch.dtype, reduce_len: int = 1) -> float:
    """Relative tolerance for a result of ``dtype`` computed with fp32 accumulation over ``reduce_len`` terms."""
    return RELATIVE[dtype] * max(1.0, math.sqrt(reduce_len) / 4)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, reduce_len: int = 1, name: str = ""):
    """``|actual - expected| <= tol · max|expected|`` elementwise, with ``expected`` in fp64."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    scale = expected.abs().max().item() or 1.0
    tol = tolerance(dtype, reduce_len) * scale
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= tol, f"{name}: max error {err:.3e} > {tol:.3e} ({dtype}, reduction {reduce_len}, scale {scale:.3e})"
