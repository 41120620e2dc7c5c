"""``grouped_lora_linear``: LoRA on the fused expert weights of a mixture-of-experts layer, forward and backward.

A mixture-of-experts layer sends each token to ``top_k`` of ``E`` experts. ``Routing`` sorts the routed (token,
expert) pairs by expert, once per layer call, from the router's own choice (``top_k_index``): row ``m`` of the sorted
order belongs to expert ``e`` when ``offsets[e] <= m < offsets[e + 1]``. Over those rows

    y[m] = x[m]·W_eᵀ + b_e + s·(D(x)[m]·A_eᵀ)·B_eᵀ

with ``weight [E, N, K]`` (``[E, K, N]`` when ``transposed``, GPT-OSS's layout), ``lora_A [E, r, K]`` and
``lora_B [E, N, r]`` (any strides). ``ΔW_e = s·B_e·A_e`` is never formed.

How it runs on the Triton backend. The base GEMMs stay the model's own kind: ``torch.nn.functional.grouped_mm`` (or
``torch._grouped_mm``), the grouped GEMM transformers runs for its experts, on CUDA for bf16 operands with 16-byte
aligned strides; otherwise a loop over the experts, which reads ``offsets`` on the host (a synchronisation per
projection on a GPU: fp16 and fp32 experts pay it).
The LoRA terms are ``fastlora.kernels.grouped``'s kernels around it: a grouped shrink writes ``xa = D(x)·A_eᵀ``
(``[S, r]``, fp32), and a grouped expand adds ``s·xa·B_eᵀ`` and the bias into the base GEMM's output in place. The
backward computes ``dx = dy·W_e`` with the same grouped GEMM and adds ``D'(s·dy·B_e·A_e)`` into it in place (a shrink
and an expand), and ``dA_e``, ``dB_e`` with the grouped wgrad kernel: fixed-order sums, so two runs give bitwise-equal
gradients. Launches per call: 3 forward (base GEMM, shrink, expand), 5 backward (base GEMM, shrink, expand, two
wgrads), plus the tile list (a few small device ops, once per ``Routing``).

Saved for the backward: ``x`` (which the caller's graph holds anyway), the weights, ``xa`` (``[S, r]`` fp32) and the
dropout seed: the mask is regenerated, never stored. The base weights and bias are frozen: a ``weight`` or ``bias``
that requires grad is refused.

Two entry points run the same implementation (``_forward`` / ``_backward``): an autograd function in eager mode, and
under ``torch.compile`` the custom ops ``fastlora::grouped_lora_fwd`` / ``fastlora::grouped_lora_bwd`` (fake
implementations and an autograd formula), so a model with ``LoraExperts`` compiles with ``fullgraph=True``.

The torch backend runs ``fastlora.reference.grouped_lora_linear_reference`` under autograd (same mask, same math).
"""

from __future__ import annotations

import dataclasses

import torch

from .. import kernels, reference
from .common import check_devices_and_dtypes, check_tensor_types, resolve_backend
from .linear import _check_dropout, _check_scaling, _check_seed, draw_seed

_WHERE = "fastlora.grouped_lora_linear"


@dataclasses.dataclass(frozen=True, eq=False)
class Routing:
    """The routed (token, expert) pairs of one mixture-of-experts call, sorted by expert.

    ``rows [S]``: the token of each sorted row (``S = tokens · top_k``); ``order [S]``: the position of each sorted row
    in the flattened ``top_k_index`` (``order // top_k`` is its token), so ``weights.reshape(-1)[order]`` are the rows'
    routing weights, and ``inverse [S]`` the sorted row of each flattened pair (``out_sorted[inverse]`` restores the
    router's order); ``experts [S]``: each row's expert; ``offsets [E + 1]`` int32: expert ``e`` owns rows ``offsets[e] .. offsets[e + 1] - 1``.
    Built on the device without a host synchronisation (``route``)."""

    rows: torch.Tensor
    order: torch.Tensor
    inverse: torch.Tensor
    experts: torch.Tensor
    offsets: torch.Tensor
    num_experts: int
    top_k: int

    @property
    def num_rows(self) -> int:
        return self.rows.numel()

    def tiles(self, narrow: bool) -> tuple[int, tuple[torch.Tensor, torch.Tensor]]:
        """``(block_m, (tile_expert, tile_start))``: the tile list the grouped kernels walk (``kernels.tile_list``),
        built once per tile height; ``narrow``: dropout or an fp32 operand (``kernels.tile_rows``)."""
        block_m = kernels.tile_rows(self.num_rows, self.num_experts, narrow)
        cache = self.__dict__.setdefault("_tiles", {})
        if block_m not in cache:
            cache[block_m] = kernels.tile_list(self.offsets, self.num_rows, block_m)
        return block_m, cache[block_m]


def route(top_k_index: torch.Tensor, num_experts: int) -> Routing:
    """``Routing`` of the router's choice ``top_k_index [T, top_k]`` (expert ids in ``[0, num_experts)``): a stable sort
    of the ``T·top_k`` pairs by expert, so rows of one expert keep their token order."""
    if not isinstance(top_k_index, torch.Tensor) or top_k_index.dim() != 2:
        shape = tuple(top_k_index.shape) if isinstance(top_k_index, torch.Tensor) else type(top_k_index).__name__
        raise ValueError(f"fastlora.route: top_k_index must be a [tokens, top_k] tensor, got {shape}")
    if top_k_index.dtype.is_floating_point or top_k_index.dtype == torch.bool:
        raise TypeError(f"fastlora.route: top_k_index must hold integer expert ids, got {top_k_index.dtype}")
    if type(num_experts) is not int or num_experts < 1:
        raise ValueError(f"fastlora.route: num_experts must be a positive int, got {num_experts!r}")
    top_k = top_k_index.shape[1]
    flat = top_k_index.reshape(-1)
    experts, order = torch.sort(flat, stable=True)
    bounds = torch.arange(num_experts + 1, device=flat.device, dtype=experts.dtype)
    offsets = torch.searchsorted(experts, bounds).to(torch.int32)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return Routing(order // top_k, order, inverse, experts, offsets, num_experts, top_k)


# --- the base grouped GEMM ------------------------------------------------------------------------------------------


def _grouped_mm_fn():
    return getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def _runs_grouped_mm(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether PyTorch's grouped GEMM takes these operands: CUDA, sm_80 or newer, bf16 (its CUDA kernels' dtype), and
    16-byte aligned strides."""
    if x.device.type != "cuda" or x.dtype != torch.bfloat16 or _grouped_mm_fn() is None:
        return False
    if torch.cuda.get_device_capability(x.device) < (8, 0):
        return False
    aligned = all(s % 8 == 0 or d == 1 for t in (x, w) for s, d in zip(t.stride(), t.shape) if s != 1)
    return aligned and x.data_ptr() % 16 == 0 and w.data_ptr() % 16 == 0


def base_grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``out[m] = x[m] · w[e]`` for the rows of each expert: ``x [S, K]``, ``w [E, K, N]`` (any strides), ``offsets
    [E + 1]``. PyTorch's grouped GEMM where it runs (``_runs_grouped_mm``), else one ``mm`` per expert with rows (which
    reads ``offsets`` on the host)."""
    if _runs_grouped_mm(x, w):
        return _grouped_mm_fn()(x, w, offs=offsets[1:])
    bounds = offsets.tolist()
    parts = [x[bounds[e] : bounds[e + 1]] @ w[e] for e in range(w.shape[0]) if bounds[e + 1] > bounds[e]]
    return torch.cat(parts) if parts else x.new_empty((0, w.shape[2]))


def grouped_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, routing: Routing, transposed: bool = False
) -> torch.Tensor:
    """``y[m] = x[m]·W_eᵀ + b_e`` over rows sorted by expert, without an adapter: an experts projection fastlora does
    not adapt, differentiable by autograd (``weight [E, N, K]``, or ``[E, K, N]`` with ``transposed``)."""
    y = base_grouped_mm(x, _w_t(weight, transposed), routing.offsets)
    if bias is not None:
        y = y + bias[routing.experts].to(y.dtype)
    return y


def _w_t(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """``[E, K, N]``: the base weight as the forward GEMM's right operand."""
    return weight if transposed else weight.transpose(1, 2)


# --- autograd -------------------------------------------------------------------------------------------------------


def _narrow(x: torch.Tensor, lora_A: torch.Tensor, dropout_p: float) -> bool:
    return dropout_p > 0.0 or torch.float32 in (x.dtype, lora_A.dtype)


def _forward(x, weight, bias, lora_A, lora_B, offsets, tiles, block_m, scaling, dropout_p, seed, transposed):
    """``(y, xa)``: the base grouped GEMM, then the grouped shrink and expand (``xa`` fp32, for the backward)."""
    y = base_grouped_mm(x, _w_t(weight, transposed), offsets)
    xa = kernels.grouped_shrink(x, lora_A, offsets, tiles, block_m, 1.0, dropout_p, seed)
    kernels.grouped_expand_(y, xa, lora_B, offsets, tiles, block_m, scaling, bias)
    return y, xa


def _backward(dy, x, weight, lora_A, lora_B, xa, offsets, tiles, block_m, scaling, dropout_p, seed, transposed, need):
    """``(dx, dA, dB)``, each None unless ``need`` (a triple of bools) asks for it."""
    need_dx, need_a, need_b = need
    dy = dy.contiguous()
    dx = dA = dB = None
    if need_dx or need_a:
        dxa = kernels.grouped_shrink(dy, lora_B.transpose(1, 2), offsets, tiles, block_m, scaling)
    if need_dx:
        dx = base_grouped_mm(dy, _w_t(weight, transposed).transpose(1, 2), offsets)
        kernels.grouped_expand_(dx, dxa, lora_A.transpose(1, 2), offsets, tiles, block_m, 1.0, None, dropout_p, seed)
    if need_a:
        dA = kernels.grouped_wgrad(dxa, x, offsets, torch.empty_like(lora_A), 1.0, dropout_p, seed)
    if need_b:
        dB = torch.empty_like(lora_B)
        kernels.grouped_wgrad(xa, dy, offsets, dB.transpose(1, 2), scaling)
    return dx, dA, dB


class _GroupedLoraFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, routing, scaling, dropout_p, seed, transposed):
        block_m, tiles = routing.tiles(_narrow(x, lora_A, dropout_p))
        y, xa = _forward(x, weight, bias, lora_A, lora_B, routing.offsets, tiles, block_m, scaling, dropout_p, seed,
                         transposed)  # fmt: skip
        ctx.save_for_backward(x, weight, lora_A, lora_B, xa, seed, routing.offsets, *tiles)
        ctx.block_m, ctx.scaling, ctx.dropout_p, ctx.transposed = block_m, scaling, dropout_p, transposed
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_A, lora_B, xa, seed, offsets, *tiles = ctx.saved_tensors
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4])
        dx, dA, dB = _backward(dy, x, weight, lora_A, lora_B, xa, offsets, tuple(tiles), ctx.block_m, ctx.scaling,
                               ctx.dropout_p, seed, ctx.transposed, need)  # fmt: skip
        return dx, None, None, dA, dB, None, None, None, None, None


# --- custom ops (torch.compile) -------------------------------------------------------------------------------------
# The same implementation as two opaque ops with fake (meta) implementations and an autograd formula, so
# ``torch.compile(fullgraph=True)`` traces a model with LoraExperts without graph breaks. The routing enters as its
# tensors (offsets and the tile list) and the tile height.


@torch.library.custom_op("fastlora::grouped_lora_fwd", mutates_args=())
def _grouped_lora_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    offsets: torch.Tensor,
    tile_expert: torch.Tensor,
    tile_start: torch.Tensor,
    block_m: int,
    scaling: float,
    dropout_p: float,
    seed: torch.Tensor,
    transposed: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(x, weight, bias, lora_A, lora_B, offsets, (tile_expert, tile_start), block_m, scaling, dropout_p,
                    seed, transposed)  # fmt: skip


@_grouped_lora_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, offsets, tile_expert, tile_start, block_m, scaling, dropout_p, seed, transposed):
    return x.new_empty((x.shape[0], lora_B.shape[1])), x.new_empty((x.shape[0], lora_A.shape[1]), dtype=torch.float32)


@torch.library.custom_op("fastlora::grouped_lora_bwd", mutates_args=())
def _grouped_lora_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    xa: torch.Tensor,
    offsets: torch.Tensor,
    tile_expert: torch.Tensor,
    tile_start: torch.Tensor,
    block_m: int,
    scaling: float,
    dropout_p: float,
    seed: torch.Tensor,
    transposed: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dA, dB = _backward(dy, x, weight, lora_A, lora_B, xa, offsets, (tile_expert, tile_start), block_m, scaling,
                           dropout_p, seed, transposed, (True, True, True))  # fmt: skip
    return dx, dA, dB


@_grouped_lora_bwd.register_fake
def _(dy, x, weight, lora_A, lora_B, xa, offsets, tile_expert, tile_start, block_m, scaling, dropout_p, seed,
      transposed):  # fmt: skip
    return torch.empty_like(x), torch.empty_like(lora_A), torch.empty_like(lora_B)


def _setup_context(ctx, inputs, output):
    x, weight, _, lora_A, lora_B, offsets, tile_expert, tile_start, block_m, scaling, dropout_p, seed, transposed = (
        inputs
    )
    ctx.save_for_backward(x, weight, lora_A, lora_B, output[1], offsets, tile_expert, tile_start, seed)
    ctx.block_m, ctx.scaling, ctx.dropout_p, ctx.transposed = block_m, scaling, dropout_p, transposed


def _op_backward(ctx, dy, _dxa):
    x, weight, lora_A, lora_B, xa, offsets, tile_expert, tile_start, seed = ctx.saved_tensors
    dx, dA, dB = _grouped_lora_bwd(dy, x, weight, lora_A, lora_B, xa, offsets, tile_expert, tile_start, ctx.block_m,
                                   ctx.scaling, ctx.dropout_p, seed, ctx.transposed)  # fmt: skip
    return dx, None, None, dA, dB, *(None,) * 8


_grouped_lora_fwd.register_autograd(_op_backward, setup_context=_setup_context)


# --- the op ---------------------------------------------------------------------------------------------------------


def _check_inputs(x, weight, bias, lora_A, lora_B, routing, transposed, backend) -> None:
    tensors = {"x": x, "weight": weight, "bias": bias, "lora_A": lora_A, "lora_B": lora_B}
    check_tensor_types(_WHERE, tensors, optional=("bias",))
    if not isinstance(routing, Routing):
        raise TypeError(
            f"{_WHERE}: routing must be a fastlora.ops.Routing (from route()), got {type(routing).__name__}"
        )
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    check_devices_and_dtypes(_WHERE, {**devices, "routing": routing.offsets.device}, x, weight, backend)
    if x.dim() != 2 or x.shape[1] == 0:
        raise ValueError(f"{_WHERE}: x must be [rows, K] with K >= 1 (rows sorted by expert), got {tuple(x.shape)}")
    if x.shape[0] != routing.num_rows:
        raise ValueError(f"{_WHERE}: x has {x.shape[0]} rows, but the routing sorts {routing.num_rows}")
    E = routing.num_experts
    layout = "[E, K, N] (transposed=True)" if transposed else "[E, N, K]"
    if weight.dim() != 3 or weight.shape[0] != E:
        raise ValueError(f"{_WHERE}: weight must be {layout} with E={E} experts, got {tuple(weight.shape)}")
    K = x.shape[1]
    K_w, N = (weight.shape[1], weight.shape[2]) if transposed else (weight.shape[2], weight.shape[1])
    if K_w != K:
        raise ValueError(f"{_WHERE}: weight {tuple(weight.shape)} read as {layout} has K={K_w}, but x has K={K}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.requires_grad:
            raise ValueError(
                f"{_WHERE}: {name} requires grad, but the expert weights are frozen here (only lora_A and lora_B "
                f"train); call {name}.requires_grad_(False)"
            )
    if bias is not None and (tuple(bias.shape) != (E, N) or bias.dtype not in (x.dtype, torch.float32)):
        raise ValueError(f"{_WHERE}: bias must be [E, N] = [{E}, {N}] in x.dtype or float32, got {bias.dtype} "
                         f"{tuple(bias.shape)}")  # fmt: skip
    if lora_A.dtype != lora_B.dtype or lora_A.dtype not in (x.dtype, torch.float32):
        raise TypeError(
            f"{_WHERE}: lora_A and lora_B must share a dtype, float32 or x.dtype ({x.dtype}), got {lora_A.dtype} and "
            f"{lora_B.dtype}"
        )
    if lora_A.dim() != 3 or lora_A.shape[0] != E or lora_A.shape[1] < 1 or lora_A.shape[2] != K:
        raise ValueError(f"{_WHERE}: lora_A must be [E, r, K] = [{E}, r, {K}] with r >= 1, got {tuple(lora_A.shape)}")
    r = lora_A.shape[1]
    if tuple(lora_B.shape) != (E, N, r):
        raise ValueError(f"{_WHERE}: lora_B must be [E, N, r] = [{E}, {N}, {r}], got {tuple(lora_B.shape)}")


def grouped_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    routing: Routing,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = False,
    transposed: bool = False,
    seed: int | torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """``y[m] = x[m]·W_eᵀ + b_e + s·(D(x)[m]·A_eᵀ)·B_eᵀ`` over rows sorted by expert (see the module docstring).

    ``x [S, K]`` in ``routing``'s sorted order; ``weight [E, N, K]`` (``[E, K, N]`` with ``transposed``) and ``bias
    [E, N]`` frozen; ``lora_A [E, r, K]``, ``lora_B [E, N, r]`` in fp32 or ``x``'s dtype, any strides. Dropout applies
    when ``training`` and ``dropout_p > 0``, with a fresh seed from torch's generator unless ``seed`` is given.
    Differentiable in ``x``, ``lora_A`` and ``lora_B``. Returns ``[S, N]`` in ``x``'s dtype."""
    check_tensor_types(_WHERE, {"x": x}, ())
    backend = resolve_backend(x.device, backend)
    _check_inputs(x, weight, bias, lora_A, lora_B, routing, transposed, backend)
    scaling = _check_scaling(scaling)
    p = _check_dropout(dropout_p, training)
    _check_seed(seed, x.device)
    if p > 0.0 and seed is None:
        seed = draw_seed(x.device)
    elif isinstance(seed, int):
        seed = torch.tensor([seed], dtype=torch.int64, device=x.device)
    if backend == "torch":
        return reference.grouped_lora_linear_reference(
            x, weight, bias, lora_A, lora_B, routing.offsets, scaling, p, seed, transposed
        )
    if seed is None:
        seed = torch.zeros(1, dtype=torch.int64, device=x.device)
    seed = seed.reshape(1)
    if torch.compiler.is_compiling():
        narrow = p > 0.0 or torch.float32 in (x.dtype, lora_A.dtype)
        block_m = kernels.tile_rows(routing.num_rows, routing.num_experts, narrow)
        tile_expert, tile_start = kernels.tile_list(routing.offsets, routing.num_rows, block_m)
        y, _ = _grouped_lora_fwd(x, weight, bias, lora_A, lora_B, routing.offsets, tile_expert, tile_start, block_m,
                                 scaling, p, seed, transposed)  # fmt: skip
        return y
    return _GroupedLoraFunction.apply(x, weight, bias, lora_A, lora_B, routing, scaling, p, seed, transposed)


# --- many adapters over the experts (serving) ----------------------------------------------------------------------


@torch.no_grad()
def multi_expert_lora_(
    y: torch.Tensor,
    x: torch.Tensor,
    routing: Routing,
    token_slots: torch.Tensor,
    token_scales: torch.Tensor | None,
    a_pool: torch.Tensor,
    b_pool: torch.Tensor,
    slot_scalings: torch.Tensor,
    max_rank: int,
    backend: str | None = None,
) -> torch.Tensor:
    """``y[m] += c[m]·(x[m]·A_{s,e}ᵀ)·B_{s,e}ᵀ`` in place, for the rows of a mixed-adapter batch routed to experts:
    row ``m`` (in ``routing``'s expert order) is token ``t = routing.rows[m]`` with slot ``s = token_slots[t]`` (``-1``:
    no adapter, nothing added) and expert ``e``; ``c[m] = slot_scalings[s] · token_scales[t]``. Inference only.

    ``a_pool [slots, E, r_max, K]``, ``b_pool [slots, E, N, r_max]`` (zero past each slot's rank, as the pool keeps
    them); only the first ``max_rank`` ranks are read. The rows are grouped per (slot, expert) on the device (a stable
    sort, no host synchronisation on the Triton backend) and run through the grouped shrink and expand kernels, one
    tile of one adapter's expert per program; the term is added into ``y`` through the inverse permutation."""
    slots, E = a_pool.shape[:2]
    groups = slots * E
    row_slots = token_slots[routing.rows].to(torch.int64)
    key = torch.where(row_slots >= 0, row_slots * E + routing.experts, groups)
    key, perm = torch.sort(key, stable=True)
    offsets = torch.searchsorted(key, torch.arange(groups + 1, device=key.device, dtype=key.dtype)).to(torch.int32)
    scale = slot_scalings.to(torch.float32)[row_slots.clamp(min=0)]
    if token_scales is not None:
        scale = scale * token_scales.to(torch.float32)[routing.rows]
    scale = scale[perm]
    x_v = x[perm]
    a = a_pool.view(groups, a_pool.shape[2], a_pool.shape[3])[:, :max_rank]
    b = b_pool.view(groups, b_pool.shape[2], b_pool.shape[3])[:, :, :max_rank]
    delta = torch.zeros_like(y)
    if resolve_backend(x.device, backend) == "torch":
        bounds = offsets.tolist()
        for g in range(groups):
            lo, hi = bounds[g], bounds[g + 1]
            if hi > lo:
                xa = (x_v[lo:hi].to(a.dtype) @ a[g].t()) * scale[lo:hi, None].to(a.dtype)
                delta[lo:hi] = (xa @ b[g].t()).to(y.dtype)
    else:
        narrow = torch.float32 in (x.dtype, a.dtype)
        block_m = kernels.tile_rows(x.shape[0], groups, narrow)
        tiles = kernels.tile_list(offsets, x.shape[0], block_m)
        xa = kernels.grouped_shrink(x_v, a, offsets, tiles, block_m)
        xa *= scale[:, None]
        kernels.grouped_expand_(delta, xa, b, offsets, tiles, block_m)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=perm.device)
    return y.add_(delta[inverse])
