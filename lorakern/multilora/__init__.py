"""Batched multi-adapter LoRA: an adapter bank in slab storage and per-token batches over it."""
from .bank import AdapterBank, LayerBank, apply_slices
from .batch import LoRABatch

__all__ = ["AdapterBank", "LayerBank", "LoRABatch", "apply_slices"]
