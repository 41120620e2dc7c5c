"""Serving many LoRA adapters over one base model: batch metadata, the adapter pool, the multi-adapter model."""

from ..layers import MultiLoraLinear, batch_meta, current_batch_meta
from .meta import BatchMeta
from .model import MultiLoraModel
from .pool import AdapterInfo, AdapterLease, AdapterPool, PoolLayer, UnknownAdapterError

__all__ = [
    "AdapterInfo",
    "AdapterLease",
    "AdapterPool",
    "BatchMeta",
    "MultiLoraLinear",
    "MultiLoraModel",
    "PoolLayer",
    "UnknownAdapterError",
    "batch_meta",
    "current_batch_meta",
]
