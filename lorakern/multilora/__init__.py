"""Batched multi-adapter LoRA: an adapter bank in slab storage and per-token batches over it."""
from .bank import AdapterBank, LayerBank, apply_slices, apply_slices_
from .batch import LoRABatch

__all__ = ["AdapterBank", "LayerBank", "LoRABatch", "apply_slices", "apply_slices_"]
