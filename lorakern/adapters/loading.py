"""One entry point for an adapter given as a path or an object: a PEFT directory, a compressed
adapter file (or a directory holding one, as ``lorakern compress-adapter IN OUT_DIR`` writes), a :class:`LoraAdapter` or a ``{module: layer}`` dict."""
from __future__ import annotations

import os
from pathlib import Path

from ..formats.io import FormatError
from .peft_io import COMPRESSED_DIR_FILE, LoraAdapter, load_compressed_adapter, load_peft_adapter

__all__ = ["load_adapter"]


def load_adapter(adapter):
    """Load ``adapter`` if it is a path; return it unchanged if it is a :class:`LoraAdapter` or a dict.

    Raises:
        FormatError: a path that is neither a PEFT adapter directory nor a compressed adapter file
            (or a malformed one).
        TypeError: anything else.
    """
    if isinstance(adapter, (str, os.PathLike)):
        p = Path(adapter)
        if (p / COMPRESSED_DIR_FILE).is_file():  # a compressed adapter directory (save_compressed_adapter_dir)
            return load_compressed_adapter(p)
        if (p / "adapter_config.json").is_file():
            return load_peft_adapter(p)
        if p.is_file():
            return load_compressed_adapter(p)
        if p.is_dir() and len(list(p.glob("*.safetensors"))) == 1:  # a directory holding one compressed file
            return load_compressed_adapter(next(p.glob("*.safetensors")))
        if not p.exists():
            raise FormatError(f"{p}: no such adapter file or directory")
        raise FormatError(f"{p}: neither a PEFT adapter directory (no adapter_config.json) nor a compressed "
                          "adapter file")
    if isinstance(adapter, (LoraAdapter, dict)):
        return adapter
    raise TypeError(f"lorakern: expected a LoraAdapter, a dict of layers or a path, got {type(adapter).__name__}")
