"""LoRA adapters: PEFT-format I/O, compressed (LoRAQuant) adapter files, attaching one to a model."""
from .attach import apply_adapter, attach_adapter, detach_adapter
from .peft_io import (LoraAdapter, LoraLayer, compress_adapter, load_compressed_adapter, load_peft_adapter,
                      save_compressed_adapter, save_peft_adapter)

__all__ = ["LoraAdapter", "LoraLayer", "apply_adapter", "attach_adapter", "compress_adapter", "detach_adapter",
           "load_compressed_adapter", "load_peft_adapter", "save_compressed_adapter", "save_peft_adapter"]
