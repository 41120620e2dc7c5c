"""Serving many LoRA adapters over one base model: batch metadata, the adapter pool, the multi-adapter model."""

from .meta import BatchMeta

__all__ = ["BatchMeta"]
