"""The Philox4x32-10 constants of the dropout mask (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3",
SC'11): one definition for the kernels (``_common.dropout_tile``) and for ``fastlora.reference.dropout_mask``, which
reproduces their mask bit for bit in PyTorch.

They are ``tl.constexpr`` because a ``@triton.jit`` function reads no other globals; plain Python reads ``.value``.
"""

import triton.language as tl

PHILOX_ROUND_A = tl.constexpr(0xD2511F53)
PHILOX_ROUND_B = tl.constexpr(0xCD9E8D57)
PHILOX_KEY_A = tl.constexpr(0x9E3779B9)
PHILOX_KEY_B = tl.constexpr(0xBB67AE85)
PHILOX_ROUNDS = tl.constexpr(10)
