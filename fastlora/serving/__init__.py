"""Serving many LoRA adapters over one base model: the multi-adapter layer and its batch context, the adapter pool,
the multi-adapter model. ``BatchMeta`` (the batch metadata the multi-adapter op reads) is ``fastlora.ops.BatchMeta``.
"""

from ..ops import BatchMeta
from .linear import BatchSource, MultiLoraLinear, batch_meta, current_batch_meta, reset_batch_meta, set_batch_meta
from .model import MultiLoraModel
from .pool import AdapterInfo, AdapterLease, AdapterPool, PoolLayer, UnknownAdapterError

__all__ = [
    "AdapterInfo",
    "AdapterLease",
    "AdapterPool",
    "BatchMeta",
    "BatchSource",
    "MultiLoraLinear",
    "MultiLoraModel",
    "PoolLayer",
    "UnknownAdapterError",
    "batch_meta",
    "current_batch_meta",
    "reset_batch_meta",
    "set_batch_meta",
]
