"""Converting a GGUF file shipped in a registry package into a cached Hugging Face checkpoint.

transformers dequantizes the GGUF's tensors to fp32 (its ``gguf_file=`` loading); the result is saved once
as plain safetensors under lorakern's cache (:func:`lorakern.data.cache.cache_dir`), so later loads take
about a second. Nothing is downloaded.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

__all__ = ["clean_config", "convert_gguf", "load_converted"]

log = logging.getLogger("lorakern")


def clean_config(path: Path) -> None:
    """Drop ``quantization_config: {quant_method: gguf}`` that transformers' GGUF conversion leaves in
    config.json: the cached weights are plain floats, and engines such as vLLM refuse that key."""
    cfg = json.loads(path.read_text())
    if "quantization_config" in cfg:
        del cfg["quantization_config"]
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        tmp.replace(path)


def convert_gguf(src: Path, out: Path, seconds_hint: str = "~30 s") -> None:
    """Convert the GGUF file ``src`` to an fp32 safetensors checkpoint (model + tokenizer) in the folder ``out``.

    Written into ``out``'s sibling ``*.tmp`` first and moved in file by file, so an interrupted conversion
    leaves no ``model.safetensors`` behind and is redone on the next load.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s (first run only)", src)
    print(f"lorakern: converting {src.name} to {out} (first run only, {seconds_hint})", flush=True)
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    model.hf_quantizer = None  # save_pretrained refuses a model that still carries the GGUF quantizer
    out.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    for f in tmp.iterdir():
        f.replace(out / f.name)
    tmp.rmdir()


def load_converted(out: Path, dtype=None):
    """``(model, tokenizer)`` from a converted checkpoint folder, eval mode, fp32 unless ``dtype``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    clean_config(out / "config.json")
    model = AutoModelForCausalLM.from_pretrained(out, dtype=dtype or torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(out)
    return model, tok
