"""Serving many LoRA adapters over one base model: the multi-adapter layer and its batch context, the adapter pool,
the multi-adapter model, its mixture-of-experts layers (``MultiLoraExperts``, ``MultiLoraParameter``), and its decode
step in CUDA graphs (``DecodeGraphs``). ``BatchMeta`` (the batch metadata
the multi-adapter op reads) and ``StaticBatch`` (it in fixed-size buffers) are in ``fastlora.ops``.
"""

from ..ops import BatchMeta, StaticBatch
from .experts import MultiLoraExperts, MultiLoraParameter
from .graphs import DecodeGraphs
from .linear import (
    BatchSource,
    MultiLoraLinear,
    MultiLoraLinear4bit,
    batch_meta,
    current_batch_meta,
    reset_batch_meta,
    set_batch_meta,
)
from .model import MultiLoraModel
from .pool import AdapterInfo, AdapterLease, AdapterPool, PoolLayer, UnknownAdapterError

__all__ = [
    "AdapterInfo",
    "AdapterLease",
    "AdapterPool",
    "BatchMeta",
    "BatchSource",
    "DecodeGraphs",
    "MultiLoraExperts",
    "MultiLoraLinear",
    "MultiLoraLinear4bit",
    "MultiLoraModel",
    "MultiLoraParameter",
    "PoolLayer",
    "StaticBatch",
    "UnknownAdapterError",
    "batch_meta",
    "current_batch_meta",
    "reset_batch_meta",
    "set_batch_meta",
]
