"""Batched multi-adapter LoRA: an adapter bank in slab storage and per-token batches over it."""
from .bank import AdapterBank, LayerBank
from .batch import LoRABatch

__all__ = ["AdapterBank", "LayerBank", "LoRABatch"]
