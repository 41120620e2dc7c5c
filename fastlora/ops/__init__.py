"""The ops: validation, backend dispatch, ``torch.library`` registration and autograd, one file per op.

- ``lora_linear`` (``fastlora.ops.linear``): one adapter, forward and backward, for training;
- ``grouped_lora_linear`` (``fastlora.ops.grouped``): one adapter per expert of a mixture-of-experts layer, rows
  sorted by expert (``route``), forward and backward, for training;
- ``multi_lora_linear`` (``fastlora.ops.multi``): every token with the adapter of its own pool slot, for serving;
  ``BatchMeta`` (``fastlora.ops.meta``) describes which slot each token of a batch uses, ``StaticBatch`` keeps one
  in fixed-size device buffers for CUDA graphs and ``torch.compile``;
- ``quant_linear`` (``fastlora.ops.quant``): a frozen 4-bit (NF4 / FP4) linear layer, its tiles dequantized inside the
  GEMMs (``lora_linear`` takes the same 4-bit weights, for QLoRA);
- ``fastlora.ops.common``: the backend choice (``resolve_backend``), the dtypes each backend takes, the base-layer
  checks both ops share.
"""

from .common import BACKENDS, TORCH_DTYPES, TRITON_DTYPES, resolve_backend
from .grouped import Routing, grouped_linear, grouped_lora_linear, multi_expert_lora_, route
from .linear import FORWARD_IMPLS, ONEPASS_MAX_TOKENS, choose_forward_impl, draw_seed, lora_linear
from .meta import BatchMeta, StaticBatch
from .multi import MULTI_FUSED_MAX_TOKENS, MULTI_IMPLS, choose_multi_impl, multi_lora_linear
from .quant import quant_linear

__all__ = [
    "BACKENDS",
    "FORWARD_IMPLS",
    "MULTI_FUSED_MAX_TOKENS",
    "MULTI_IMPLS",
    "ONEPASS_MAX_TOKENS",
    "TORCH_DTYPES",
    "TRITON_DTYPES",
    "BatchMeta",
    "Routing",
    "StaticBatch",
    "choose_forward_impl",
    "choose_multi_impl",
    "draw_seed",
    "grouped_linear",
    "grouped_lora_linear",
    "lora_linear",
    "multi_expert_lora_",
    "multi_lora_linear",
    "quant_linear",
    "resolve_backend",
    "route",
]
