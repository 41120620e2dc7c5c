"""The tests' comparison against the fp64 reference, with the one tolerance table (``fastlora.reference.tolerance``)."""

import torch

from fastlora.reference import tolerance


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, reduce_len: int = 1, name: str = ""):
    """``|actual - expected| <= tol · max|expected|`` elementwise, with ``expected`` in fp64."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    scale = expected.abs().max().item() or 1.0
    tol = tolerance(dtype, reduce_len) * scale
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= tol, f"{name}: max error {err:.3e} > {tol:.3e} ({dtype}, reduction {reduce_len}, scale {scale:.3e})"
