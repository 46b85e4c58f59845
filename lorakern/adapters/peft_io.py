"""PEFT-format LoRA adapters in and out, and compressed (LoRAQuant) adapter files.

A PEFT LoRA adapter directory holds ``adapter_config.json`` and
``adapter_model.safetensors`` with keys
``base_model.model.<module>.lora_A.weight`` (``[r, in]``) and
``base_model.model.<module>.lora_B.weight`` (``[out, r]``); the update of
``<module>`` is ``scale * B @ A`` with ``scale = lora_alpha / r``
(``lora_alpha / sqrt(r)`` with rsLoRA; ``rank_pattern`` / ``alpha_pattern``
override r and alpha per module, with PEFT's matching rules: see
:mod:`lorakern.adapters.peft_config`). Loading validates everything and never
unpickles (``adapter_model.bin`` is refused); every config value that changes the
math in a way lorakern does not implement is refused by the PEFT feature's name.

PEFT also saves the base weight of a targeted ``lm_head`` / ``embed_tokens``
(``...lm_head.base_layer.weight``); such copies are kept in
:attr:`LoraAdapter.base_weights` and checked against the model when the adapter is
attached (:func:`check_base_weights`): equal, the adapter is accepted; different, it
would replace the base weight, which lorakern refuses. LoRA on embedding layers
(``lora_embedding_A/B``) is refused by name.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..formats.io import FormatError, load_quantized, read_safetensors, save_quantized
from ..formats.lora import CompressedLoRA, LoraAdapter, LoraLayer
from ..quant.loraquant import compress_lora
from .peft_config import LORAKERN_METADATA_KEYS, check_config, pattern_value, target_matches
from .qalora import check_qalora_config, refuse_qalora

__all__ = ["LoraAdapter", "LoraLayer", "check_base_weights", "compress_adapter", "load_compressed_adapter", "load_peft_adapter",
           "save_compressed_adapter", "save_compressed_adapter_dir", "save_peft_adapter", "COMPRESSED_DIR_FILE"]

_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")
_BASE_KEY = re.compile(r"^base_model\.model\.(?P<module>.+?)(?:\.base_layer)?\.weight$")  # after the checks below
# tensors of PEFT features lorakern does not implement -> the feature's name
_FEATURE_KEYS = (
    (re.compile(r"\.lora_embedding_[AB](\.[^.]+)?$"), "LoRA on an embedding layer (lora_embedding_A/B)"),
    (re.compile(r"\.lora_magnitude_vector(\.[^.]+)?(\.weight)?$"), "DoRA (lora_magnitude_vector)"),
    (re.compile(r"\.lora_B(\.[^.]+)?\.bias$"), "a bias on lora_B (lora_bias=True)"),
    (re.compile(r"\.modules_to_save\."), "modules_to_save (full copies of modules)"),
    (re.compile(r"\.trainable_tokens_"), "trainable tokens (trainable_token_indices)"),
    (re.compile(r"\.bias$"), "trained base-layer biases (bias='all' or 'lora_only')"),
)


def check_base_weights(model: torch.nn.Module, adapter: LoraAdapter, name: str = "the adapter") -> None:
    """Check the base-weight copies an adapter carries against ``model``.

    Raises:
        ValueError: the model has no such module, or its weight differs from the copy (the adapter
            would replace the base weight, which lorakern does not do).
    """
    for module, w in adapter.base_weights.items():
        try:
            mod = model.get_submodule(module)
        except AttributeError:
            raise ValueError(f"lorakern: {name} carries a base weight for {module!r}, which the model lacks") from None
        base = getattr(mod, "base", mod)  # an attached LoRALinear / MultiLoRALinear wraps the original
        mw = getattr(base, "weight", None)
        if not isinstance(mw, torch.Tensor):
            raise ValueError(f"lorakern: {name} carries a base weight for {module!r}, but the model's {module} is a "
                             f"{type(base).__name__} (quantized?) whose weight cannot be compared; attach the "
                             "adapter before quantizing, or drop the copy if it is the original weight")
        if tuple(mw.shape) != tuple(w.shape) or not torch.equal(mw.detach().cpu().to(w.dtype), w):
            raise ValueError(f"lorakern: {name} replaces the base weight of {module!r} (the copy PEFT saved beside "
                             "the adapter differs from the model's): lorakern applies adapters to the model's own "
                             "weights and does not replace them")


def load_peft_adapter(path: str | os.PathLike) -> LoraAdapter:
    """Read a PEFT LoRA adapter directory; raises FormatError on anything malformed."""
    d = Path(path)
    cfg_path, w_path = d / "adapter_config.json", d / "adapter_model.safetensors"
    if not d.exists():
        raise FormatError(f"{d}: no such adapter directory")
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
    check_config(cfg, str(cfg_path))
    qalora = check_qalora_config(cfg, str(cfg_path)) is not None
    tensors, st_meta = read_safetensors(w_path)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    base_weights: dict[str, torch.Tensor] = {}
    for k, t in tensors.items():
        m = _KEY.match(k)
        if not m:
            feature = next((f for pat, f in _FEATURE_KEYS if pat.search(k)), None)
            if feature:
                raise FormatError(f"{w_path}: tensor {k!r}: the adapter uses {feature}, which lorakern does not "
                                  "support")
            b = _BASE_KEY.match(k)  # a copy of a base weight (lm_head / embed_tokens): checked when attached
            if b and t.dim() == 2 and t.dtype.is_floating_point:
                base_weights[b["module"]] = t
                continue
            raise FormatError(f"{w_path}: unsupported tensor {k!r} (only lora_A / lora_B weights of linear layers)")
        if m["which"] in parts.setdefault(m["module"], {}):
            raise FormatError(f"{w_path}: {k!r} duplicates another lora_{m['which']} of {m['module']}")
        parts[m["module"]][m["which"]] = t
    if not parts:
        raise FormatError(f"{w_path}: no LoRA weights")
    meta = {k: v for k, v in (st_meta or {}).items() if k.startswith("lorakern_")}
    for k in LORAKERN_METADATA_KEYS:  # written into the config by lorakern < 0.2
        if k in cfg:
            meta.setdefault(k, str(cfg.pop(k)))
    adapter = LoraAdapter(cfg, base_weights=base_weights, metadata=meta)
    for module, p in sorted(parts.items()):
        if set(p) != {"A", "B"}:
            raise FormatError(f"{w_path}: {module} has lora_{''.join(sorted(p))} but not both A and B")
        A, B = p["A"], p["B"]
        if A.dim() != 2 or B.dim() != 2 or not A.dtype.is_floating_point or not B.dtype.is_floating_point:
            raise FormatError(f"{w_path}: {module}: lora_A/lora_B must be 2-D float tensors")
        if A.shape[0] != B.shape[1]:
            raise FormatError(f"{w_path}: {module}: lora_A is {tuple(A.shape)} and lora_B {tuple(B.shape)}: ranks differ")
        r = int(pattern_value(cfg.get("rank_pattern"), module, cfg["r"]))
        if A.shape[0] != r:
            raise FormatError(f"{w_path}: {module}: rank {A.shape[0]} but the config says r={r}")
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise FormatError(f"{w_path}: {module}: NaN or Inf in the LoRA weights")
        alpha = float(pattern_value(cfg.get("alpha_pattern"), module, cfg["lora_alpha"]))
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        A = A.float()
        if qalora:  # PEFT's QA-LoRA multiplies the pooled mean by in_features / G = A's columns; lorakern's A
            A = A * A.shape[1]  # acts on the mean itself
        adapter.layers[module] = LoraLayer(A, B.float(), scale)
    return adapter


def save_peft_adapter(adapter: LoraAdapter, path: str | os.PathLike) -> Path:
    """Write ``adapter`` as a PEFT LoRA directory that ``peft.PeftModel.from_pretrained`` loads with the
    same ranks and scales.

    ``r`` and ``lora_alpha`` become the most common (rank, alpha) pair of the layers; every layer that
    differs gets a full-name entry in ``rank_pattern`` / ``alpha_pattern`` (``alpha = scale * r``, or
    ``scale * sqrt(r)`` with ``use_rslora``), replacing the patterns the config had. ``target_modules``
    is set to the layers' full names when the config's does not select exactly them. lorakern's own
    metadata (:attr:`LoraAdapter.metadata`) goes into the safetensors metadata, not the config.

    Raises:
        ValueError: no layers, or a layer's scale is not a positive finite number; ``use_qalora`` without a
            positive integer ``qalora_group_size`` (FormatError).
    """
    if not adapter.layers:
        raise ValueError("lorakern: the adapter has no layers to save")
    cfg = {k: v for k, v in adapter.config.items() if k not in LORAKERN_METADATA_KEYS}
    cfg.setdefault("peft_type", "LORA")
    rs = bool(cfg.get("use_rslora"))
    pairs = {}
    for module, layer in adapter.layers.items():
        if not (math.isfinite(layer.scale) and layer.scale > 0):
            raise ValueError(f"lorakern: {module}: scale {layer.scale} cannot be written as a PEFT lora_alpha")
        r = layer.rank
        alpha = layer.scale * (math.sqrt(r) if rs else r)
        alpha = int(round(alpha)) if abs(alpha - round(alpha)) < 1e-9 * max(1.0, abs(alpha)) else alpha
        pairs[module] = (r, alpha)
    counts: dict = {}
    for pair in pairs.values():
        counts[pair] = counts.get(pair, 0) + 1
    r0, a0 = max(counts, key=lambda pr: (counts[pr], -pr[0]))
    cfg["r"], cfg["lora_alpha"] = r0, a0
    cfg["rank_pattern"] = {re.escape(m): r for m, (r, _) in sorted(pairs.items()) if r != r0}
    cfg["alpha_pattern"] = {re.escape(m): a for m, (_, a) in sorted(pairs.items()) if a != a0}
    tm = cfg.get("target_modules")
    if not (isinstance(tm, (list, str)) and tm != "all-linear" and all(target_matches(tm, m) for m in pairs)
            and not cfg.get("layers_to_transform") and not cfg.get("exclude_modules")):
        cfg["target_modules"] = sorted(pairs)
        cfg.pop("layers_to_transform", None), cfg.pop("layers_pattern", None), cfg.pop("exclude_modules", None)
    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    tensors = {}
    qalora = check_qalora_config(cfg, "save_peft_adapter") is not None  # a QA-LoRA config names its group size
    for module, layer in adapter.layers.items():
        A = layer.A.detach() / layer.A.shape[1] if qalora else layer.A.detach()  # PEFT's QA-LoRA convention
        tensors[f"base_model.model.{module}.lora_A.weight"] = A.contiguous().cpu()
        tensors[f"base_model.model.{module}.lora_B.weight"] = layer.B.detach().contiguous().cpu()
    for module, w in adapter.base_weights.items():
        tensors[f"base_model.model.{module}.base_layer.weight"] = w.detach().contiguous().cpu()
    meta = {"format": "pt"}
    meta.update({k: str(v) for k, v in adapter.metadata.items()})
    save_file(tensors, str(d / "adapter_model.safetensors"), metadata=meta)
    (d / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    return d


def compress_adapter(adapter: LoraAdapter, rho: float = 0.9, bits_high: int = 2,
                     group_size: int = 128, model: torch.nn.Module | None = None,
                     unbias: bool = True) -> dict[str, CompressedLoRA]:
    """LoRAQuant-compress every layer of an adapter (see :func:`lorakern.quant.compress_lora`; ``unbias=False``
    keeps the paper's scales).

    A compressed file keeps no base-weight copies, so an adapter that carries some (PEFT's save of an
    adapter on ``lm_head``) is compressed only after they are checked against ``model``.

    Raises:
        ValueError: base-weight copies and no ``model``, or copies that differ from ``model``'s weights; a
            QA-LoRA adapter (its A acts on group-pooled inputs; merge it instead).
    """
    refuse_qalora(adapter, "compress_adapter")
    if adapter.base_weights:
        if model is None:
            raise ValueError(f"lorakern: the adapter carries copies of base weights ({sorted(adapter.base_weights)}); "
                             "a compressed file keeps none, so they must first be checked against the base model "
                             "(compress_adapter(..., model=) or `lorakern compress-adapter --model`)")
        check_base_weights(model, adapter)
    return {m: compress_lora(l.B, l.A, rho=rho, bits_high=bits_high, group_size=group_size, scale=l.scale,
                             unbias=unbias)
            for m, l in adapter.layers.items()}


def save_compressed_adapter(path: str | os.PathLike, layers: dict[str, CompressedLoRA],
                            extra_metadata: dict[str, str] | None = None,
                            extra_tensors: dict[str, torch.Tensor] | None = None) -> None:
    """One safetensors file: each layer's parts as quantized weights under
    ``{module}.{a_hi,b_hi,a_lo,b_lo}`` and its rank, h, scale and shape in the metadata."""
    weights, index = {}, {}
    for m, c in layers.items():
        for part in ("a_hi", "b_hi", "a_lo", "b_lo"):
            w = getattr(c, part)
            if w is not None:
                weights[f"{m}.{part}"] = w
        index[m] = {"rank": c.rank, "h": c.h, "scale": c.scale, "shape": list(c.shape)}
    meta = {"module": "CompressedLoRA", **(extra_metadata or {})}  # (a MoLA file names its own module)
    if "lora_layers" in meta:
        raise ValueError("lorakern: metadata key 'lora_layers' is the format's own")
    meta["lora_layers"] = json.dumps(index)
    save_quantized(path, weights, extra_tensors=extra_tensors, extra_metadata=meta)


COMPRESSED_DIR_FILE = "lorakern_compressed.safetensors"


def save_compressed_adapter_dir(path: str | os.PathLike, layers: dict[str, CompressedLoRA], config: dict,
                                extra_metadata: dict[str, str] | None = None) -> Path:
    """A compressed adapter as a directory: the PEFT ``adapter_config.json`` (``config``) beside
    ``lorakern_compressed.safetensors`` (:func:`save_compressed_adapter`). vLLM with lorakern's plugin serves such a
    directory (``LoRARequest(name, id, path)``) without expanding it; :func:`load_compressed_adapter` reads it."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    save_compressed_adapter(out / COMPRESSED_DIR_FILE, layers, extra_metadata=extra_metadata)
    (out / "adapter_config.json").write_text(json.dumps(config, indent=1, default=str))
    return out


def load_compressed_adapter(path: str | os.PathLike) -> dict[str, CompressedLoRA]:
    """Read a file written by :func:`save_compressed_adapter`, or a directory written by
    :func:`save_compressed_adapter_dir` (every field validated)."""
    if os.path.isdir(path):
        path = os.path.join(path, COMPRESSED_DIR_FILE)
    weights, others, meta = load_quantized(path)
    if meta.get("module") == "CompressedMoLA":
        raise FormatError(f"{path}: a compressed MoLA adapter (read it with lorakern.adapters.load_mola_adapter)")
    if meta.get("module") != "CompressedLoRA" or others:
        raise FormatError(f"{path}: not a compressed LoRA adapter file")
    return compressed_layers(weights, meta, path)


def compressed_layers(weights: dict, meta: dict, path) -> dict[str, CompressedLoRA]:
    """The :class:`CompressedLoRA` layers of a file's quantized ``weights`` as its ``lora_layers`` metadata lists
    them (every weight must be used; raises FormatError). Shared by the LoRA and MoLA compressed files."""
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
