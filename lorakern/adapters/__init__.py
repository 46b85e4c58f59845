"""LoRA adapters: PEFT-format I/O and compressed (LoRAQuant) adapter files."""
from .peft_io import (LoraAdapter, LoraLayer, compress_adapter, load_compressed_adapter, load_peft_adapter,
                      save_compressed_adapter, save_peft_adapter)

__all__ = ["LoraAdapter", "LoraLayer", "compress_adapter", "load_compressed_adapter", "load_peft_adapter",
           "save_compressed_adapter", "save_peft_adapter"]
