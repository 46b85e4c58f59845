"""LoRA adapters: PEFT-format I/O, compressed (LoRAQuant) adapter files, attaching one to a model."""
from .attach import apply_adapter, attach_adapter, attach_adapters, detach_adapter, detach_adapters
from .mola import (apply_mola, attach_mola, compress_mola_adapter, detach_mola, is_mola_adapter, load_mola_adapter,
                   save_compressed_mola, save_mola_adapter)
from .qalora import is_qalora, merge_qalora_adapter
from .peft_io import (LoraAdapter, LoraLayer, compress_adapter, load_compressed_adapter, load_peft_adapter,
                      save_compressed_adapter, save_compressed_adapter_dir, save_peft_adapter)

__all__ = ["LoraAdapter", "LoraLayer", "is_qalora", "merge_qalora_adapter", "apply_mola", "attach_mola", "compress_mola_adapter", "detach_mola",
           "is_mola_adapter", "load_mola_adapter", "save_compressed_mola", "save_mola_adapter", "apply_adapter", "attach_adapter", "attach_adapters", "compress_adapter", "detach_adapter", "detach_adapters",
           "load_compressed_adapter", "load_peft_adapter", "save_compressed_adapter", "save_compressed_adapter_dir", "save_peft_adapter"]
