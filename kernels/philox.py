"""The dropout mask: Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11) in Triton.

Element ``(row, col)`` of an ``[M, K]`` activation is kept iff word number ``col % 4`` of Philox4x32-10 with key
``(seed_lo, seed_hi)`` at counter ``(col // 4, row, 0, 0)``, read as an unsigned 32-bit integer, is at least
``threshold = floor(p * 2**32)`` (capped at ``2**32 - 1``). One Philox call thus serves four neighbouring columns of a
row. The mask is a pure function of ``(seed, row, col)``: the forward and the backward regenerate it from the saved
seed, so nothing of size ``M·K`` is stored, and ``fastlora.reference.dropout_mask`` reproduces it bit for bit in
PyTorch from the constants below. The rounds are written out here rather than taken from ``tl.randint4x`` so that the
mask does not change with the Triton version.

The constants are ``tl.constexpr`` because a ``@triton.jit`` function reads no other globals; plain Python reads
``.value``.
"""

import triton
import triton.language as tl

PHILOX_ROUND_A = tl.constexpr(0xD2511F53)
PHILOX_ROUND_B = tl.constexpr(0xCD9E8D57)
PHILOX_KEY_A = tl.constexpr(0x9E3779B9)
PHILOX_KEY_B = tl.constexpr(0xBB67AE85)
PHILOX_ROUNDS = tl.constexpr(10)


@triton.jit
def philox4x32_10(k0, k1, c0, c1, c2, c3):
    """The four output words of Philox4x32-10 with key ``(k0, k1)`` at counter ``(c0, c1, c2, c3)``: uint32 values
    that broadcast together (a word that depends on rows only or columns only stays that small until a round mixes
    it)."""
    # umulhi and a 32-bit multiply rather than one 64-bit product (IMAD.WIDE.U32), which issues fewer instructions
    # but holds register pairs: with it ptxas spills in a one-pass config under Triton 3.9.
    for _ in tl.static_range(PHILOX_ROUNDS):
        _c0 = c0
        _c2 = c2
        c0 = tl.umulhi(_c2, PHILOX_ROUND_B) ^ c1 ^ k0
        c2 = tl.umulhi(_c0, PHILOX_ROUND_A) ^ c3 ^ k1
        c1 = _c2 * PHILOX_ROUND_B
        c3 = _c0 * PHILOX_ROUND_A
        k0 = k0 + PHILOX_KEY_A
        k1 = k1 + PHILOX_KEY_B
    return c0, c1, c2, c3


@triton.jit
def _keeps(word, threshold):
    """Whether the uint32 ``word`` is at least the threshold: uint32 order equals int32 order after flipping the top
    bit, and ``threshold`` comes shifted the same way (``signed_threshold``), so it is always an int32 argument."""
    return (word ^ 0x80000000).to(tl.int32, bitcast=True) >= threshold


@triton.jit
def dropout_tile(tile, seed, rows, cols, threshold, keep_scale):
    """Inverted dropout of ``tile`` ``[BM, BN]``: the mask of the module docstring at absolute ``rows`` ``[BM]`` and
    ``cols`` ``[BN]``, a contiguous range that starts at a multiple of 4 (``BN`` a power of two, at least 4).

    The Philox rounds run once on the ``[BM, BN // 4]`` grid of column groups. The four keep decisions of a group
    are packed into the low bits of one int32 and spread to its four columns: with a single value per group to place,
    the compiler runs the rounds in the tile's own register layout, where interleaving the four words themselves
    (``tl.join``) moves them between threads through shared memory. ``threshold`` is ``signed_threshold(p)``.
    """
    BM: tl.constexpr = rows.shape[0]
    BN: tl.constexpr = cols.shape[0]
    seed = seed.to(tl.uint64)
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = (seed >> 32).to(tl.uint32)
    # cols[4g] // 4 = g: the first column of each quadruple, split off a [BN // 4, 2, 2] view.
    first_half, _ = tl.split(tl.reshape(cols, (BN // 4, 2, 2)))
    first, _ = tl.split(first_half)
    groups = first // 4
    c0 = groups.to(tl.uint32)[None, :]
    c1 = rows.to(tl.uint32)[:, None]
    zero = c0 * 0
    w0, w1, w2, w3 = philox4x32_10(k0, k1, c0, c1, zero, zero)
    bits = (
        _keeps(w0, threshold).to(tl.int32)
        | (_keeps(w1, threshold).to(tl.int32) << 1)
        | (_keeps(w2, threshold).to(tl.int32) << 2)
        | (_keeps(w3, threshold).to(tl.int32) << 3)
    )
    keep = tl.reshape((bits[:, :, None] >> tl.arange(0, 4)[None, None, :]) & 1, (BM, BN)) != 0
    return tl.where(keep, tile.to(tl.float32) * keep_scale, 0.0)
