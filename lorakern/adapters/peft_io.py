"""PEFT-format LoRA adapters in and out, and compressed (LoRAQuant) adapter files.

A PEFT LoRA adapter directory holds ``adapter_config.json`` and
``adapter_model.safetensors`` with keys
``base_model.model.<module>.lora_A.weight`` (``[r, in]``) and
``base_model.model.<module>.lora_B.weight`` (``[out, r]``); the update of
``<module>`` is ``scale * B @ A`` with ``scale = lora_alpha / r``
(``lora_alpha / sqrt(r)`` with rsLoRA; ``rank_pattern`` / ``alpha_pattern``
override r and alpha per module). Loading validates everything and never
unpickles (``adapter_model.bin`` is refused).
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..formats.io import FormatError, load_quantized, read_safetensors, save_quantized
from ..quant.loraquant import CompressedLoRA, compress_lora

__all__ = ["LoraAdapter", "LoraLayer", "compress_adapter", "load_compressed_adapter", "load_peft_adapter",
           "save_compressed_adapter", "save_peft_adapter"]

_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")


@dataclass
class LoraLayer:
    """One adapted Linear: ``delta = scale * B @ A`` (A ``[r, in]``, B ``[out, r]``)."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def delta(self) -> torch.Tensor:
        return self.scale * (self.B.float() @ self.A.float())


@dataclass
class LoraAdapter:
    """A LoRA adapter: its PEFT config and its layers by module name (e.g. ``model.layers.0.self_attn.q_proj``)."""

    config: dict
    layers: dict[str, LoraLayer] = field(default_factory=dict)


def _pattern_value(pattern: dict, module: str, default):
    for key, v in (pattern or {}).items():
        if module == key or module.endswith("." + key) or re.fullmatch(key, module):
            return v
    return default


def load_peft_adapter(path: str | os.PathLike) -> LoraAdapter:
    """Read a PEFT LoRA adapter directory; raises FormatError on anything malformed."""
    d = Path(path)
    cfg_path, w_path = d / "adapter_config.json", d / "adapter_model.safetensors"
    if not cfg_path.is_file():
        raise FormatError(f"{d}: no adapter_config.json (not a PEFT adapter directory)")
    if not w_path.is_file():
        if (d / "adapter_model.bin").is_file():
            raise FormatError(f"{d}: only adapter_model.bin (a pickle) is present; lorakern reads safetensors only")
        raise FormatError(f"{d}: no adapter_model.safetensors")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise FormatError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict) or cfg.get("peft_type", "LORA") != "LORA":
        raise FormatError(f"{cfg_path}: peft_type {cfg.get('peft_type') if isinstance(cfg, dict) else None!r} is not LORA")
    for key in ("r", "lora_alpha"):
        if not isinstance(cfg.get(key), (int, float)) or cfg[key] <= 0:
            raise FormatError(f"{cfg_path}: {key!r} must be a positive number, got {cfg.get(key)!r}")
    tensors, _ = read_safetensors(w_path)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for k, t in tensors.items():
        m = _KEY.match(k)
        if not m:
            raise FormatError(f"{w_path}: unsupported tensor {k!r} (only lora_A / lora_B weights of Linear layers)")
        if m["which"] in parts.setdefault(m["module"], {}):
            raise FormatError(f"{w_path}: {k!r} duplicates another lora_{m['which']} of {m['module']}")
        parts[m["module"]][m["which"]] = t
    if not parts:
        raise FormatError(f"{w_path}: no LoRA weights")
    adapter = LoraAdapter(cfg)
    for module, p in sorted(parts.items()):
        if set(p) != {"A", "B"}:
            raise FormatError(f"{w_path}: {module} has lora_{''.join(sorted(p))} but not both A and B")
        A, B = p["A"], p["B"]
        if A.dim() != 2 or B.dim() != 2 or not A.dtype.is_floating_point or not B.dtype.is_floating_point:
            raise FormatError(f"{w_path}: {module}: lora_A/lora_B must be 2-D float tensors")
        if A.shape[0] != B.shape[1]:
            raise FormatError(f"{w_path}: {module}: lora_A is {tuple(A.shape)} and lora_B {tuple(B.shape)}: ranks differ")
        r = int(_pattern_value(cfg.get("rank_pattern"), module, cfg["r"]))
        if A.shape[0] != r:
            raise FormatError(f"{w_path}: {module}: rank {A.shape[0]} but the config says r={r}")
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise FormatError(f"{w_path}: {module}: NaN or Inf in the LoRA weights")
        alpha = float(_pattern_value(cfg.get("alpha_pattern"), module, cfg["lora_alpha"]))
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        adapter.layers[module] = LoraLayer(A.float(), B.float(), scale)
    return adapter


def save_peft_adapter(adapter: LoraAdapter, path: str | os.PathLike) -> Path:
    """Write ``adapter`` as a PEFT LoRA directory that ``peft.PeftModel.from_pretrained`` loads."""
    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for module, layer in adapter.layers.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = layer.A.detach().contiguous().cpu()
        tensors[f"base_model.model.{module}.lora_B.weight"] = layer.B.detach().contiguous().cpu()
    save_file(tensors, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
    (d / "adapter_config.json").write_text(json.dumps(adapter.config, indent=2))
    return d


def compress_adapter(adapter: LoraAdapter, rho: float = 0.9, bits_high: int = 2,
                     group_size: int = 128) -> dict[str, CompressedLoRA]:
    """LoRAQuant-compress every layer of an adapter (see :func:`lorakern.quant.compress_lora`)."""
    return {m: compress_lora(l.B, l.A, rho=rho, bits_high=bits_high, group_size=group_size, scale=l.scale)
            for m, l in adapter.layers.items()}


def save_compressed_adapter(path: str | os.PathLike, layers: dict[str, CompressedLoRA],
                            extra_metadata: dict[str, str] | None = None) -> None:
    """One safetensors file: each layer's parts as quantized weights under
    ``{module}.{a_hi,b_hi,a_lo,b_lo}`` and its rank, h, scale and shape in the metadata."""
    weights, index = {}, {}
    for m, c in layers.items():
        for part in ("a_hi", "b_hi", "a_lo", "b_lo"):
            w = getattr(c, part)
            if w is not None:
                weights[f"{m}.{part}"] = w
        index[m] = {"rank": c.rank, "h": c.h, "scale": c.scale, "shape": list(c.shape)}
    meta = {"module": "CompressedLoRA", "lora_layers": json.dumps(index)}
    meta.update(extra_metadata or {})
    save_quantized(path, weights, extra_metadata=meta)


def load_compressed_adapter(path: str | os.PathLike) -> dict[str, CompressedLoRA]:
    """Read a file written by :func:`save_compressed_adapter` (every field validated)."""
    weights, others, meta = load_quantized(path)
    if meta.get("module") != "CompressedLoRA" or others:
        raise FormatError(f"{path}: not a compressed LoRA adapter file")
    try:
        index = json.loads(meta["lora_layers"])
        if not isinstance(index, dict):
            raise ValueError
    except (KeyError, ValueError):
        raise FormatError(f"{path}: metadata 'lora_layers' is missing or malformed") from None
    out, used = {}, set()
    for m, info in index.items():
        parts = {p: weights.get(f"{m}.{p}") for p in ("a_hi", "b_hi", "a_lo", "b_lo")}
        used.update(f"{m}.{p}" for p, w in parts.items() if w is not None)
        try:
            out[m] = CompressedLoRA(**parts, shape=tuple(int(v) for v in info["shape"]), rank=int(info["rank"]),
                                    h=int(info["h"]), scale=float(info["scale"]))
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(f"{path}: layer {m!r} is inconsistent: {e}") from None
    if set(weights) - used:
        raise FormatError(f"{path}: weights not listed in 'lora_layers': {sorted(set(weights) - used)[:5]}")
    return out
