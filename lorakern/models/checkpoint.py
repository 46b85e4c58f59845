"""Quantized model directories: a Hugging Face causal LM whose Linear layers are
QuantLinear / GWQLinear, saved and loaded without pickles.

A directory holds:

* ``config.json`` (and the tokenizer files, when given) -- Hugging Face's own, with ``quantization_config =
  {"quant_method": "lorakern", ...}`` (vLLM picks lorakern's method from it);
* ``lorakern_quantization.json`` -- ``{"format": "lorakern.model", "format_version": 1,
  "modules": {name: "QuantLinear" | "GWQLinear" | "QuantEmbedding"}, "tied": {embedding: head},
  "quantization": {...}}`` (a QuantEmbedding tied to a head reads the head's packed rows, stored once);
* ``quantized.safetensors`` -- every quantized layer (:func:`lorakern.save_quantized`,
  prefix = module name) and its bias as ``{name}.bias``;
* ``rest.safetensors`` -- every other parameter and buffer (embeddings, norms, an
  unquantized lm_head), tied tensors stored once.

transformers is imported inside the functions that build models: it is an optional dependency
(``lorakern[models]``) and slow to import; the kernel library never needs it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..formats.linear_like import is_conv1d, linear_shape
from ..formats.io import FormatError, load_quantized, read_safetensors, save_quantized
from ..formats.outliers import GWQWeight
from ..formats.quantized import QuantizedWeight
from ..nn import ADAPTER_MODULES, GWQLinear, QuantEmbedding, QuantLinear, replace_module
from .fuse import unfused
from .builtin import BUILTIN_MODELS, builtin_model, load_builtin
from .instance_method import InstanceMethod

__all__ = ["load_model", "load_quantized_model", "save_quantized_model"]

MODEL_FORMAT = "lorakern.model"
MODEL_FORMAT_VERSION = 1


def _quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (QuantLinear, GWQLinear, QuantEmbedding))}


def _refuse_if_adapters(model: nn.Module) -> None:
    if any(isinstance(m, ADAPTER_MODULES) for m in model.modules()):
        raise ValueError("lorakern: the model has adapters attached; detach them first (detach_adapters / "
                         "detach_adapter / detach_mola) and save the model and the adapters apart "
                         "(save_peft_adapter, save_compressed_adapter, save_mola_adapter)")


def _save_pretrained(self, save_directory, *args, **kwargs):
    """``save_pretrained`` of a model lorakern changed: a quantized model is written as a lorakern model
    directory (reload it with :func:`lorakern.models.load_quantized_model`); a model with adapters
    attached is refused; otherwise transformers' own ``save_pretrained``."""
    _refuse_if_adapters(self)
    if _quantized_modules(self):
        for k in kwargs:
            if k not in ("safe_serialization", "is_main_process", "max_shard_size"):
                raise TypeError(f"lorakern: save_pretrained of a quantized model does not take {k!r}")
        return save_quantized_model(self, save_directory)
    return type(self).save_pretrained(self, save_directory, *args, **kwargs)


def install_save_pretrained(model: nn.Module) -> None:
    """Make ``model.save_pretrained`` safe for what lorakern did to the model (see :func:`_save_pretrained`);
    transformers' own would write packed buffers a plain ``from_pretrained`` silently ignores."""
    if hasattr(type(model), "save_pretrained"):
        model.save_pretrained = InstanceMethod(_save_pretrained, model)  # held weakly: no reference cycle


def save_quantized_model(model: nn.Module, out_dir: str | os.PathLike, tokenizer=None) -> Path:
    """Write a model quantized by :func:`lorakern.quantize_model` to ``out_dir``.

    Raises:
        ValueError: the model has no quantized layers, or has adapters attached.
        TypeError: not a Hugging Face model.
    """
    _refuse_if_adapters(model)
    with unfused(model):  # the directory stores q/k/v and gate/up apart, as the model's config names them
        return _save_quantized_model(model, out_dir, tokenizer)


def _save_quantized_model(model: nn.Module, out_dir, tokenizer) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    qmods = _quantized_modules(model)
    if not qmods:
        raise ValueError("the model has no QuantLinear or GWQLinear layers: quantize it first")
    if not hasattr(model, "config"):
        raise TypeError("expected a Hugging Face model (with .config)")
    weights, extra, kinds, tied = {}, {}, {}, {}
    for name, m in qmods.items():
        kinds[name] = type(m).__name__
        if isinstance(m, QuantEmbedding):
            head = qmods.get(m.tied_to) if m.tied_to else None
            if isinstance(head, QuantLinear) and head.qweight is m.qweight:
                tied[name] = m.tied_to  # the head's packed rows, stored once
            else:
                weights[name] = m.quantized_weight
            continue
        weights[name] = m.weight_gwq if isinstance(m, GWQLinear) else m.quantized_weight
        if m.bias is not None:
            extra[f"{name}.bias"] = m.bias
    save_quantized(out / "quantized.safetensors", weights, extra_tensors=extra,
                   extra_metadata={"module": "model"})
    rest, seen = {}, set()
    prefixes = tuple(n + "." for n in qmods)
    for k, t in model.state_dict(keep_vars=False).items():
        if k.startswith(prefixes):
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:  # tied (e.g. lm_head = embed_tokens): stored once, re-tied on load
            continue
        seen.add(key)
        rest[k] = t.detach().cpu().contiguous()
    save_file(rest, str(out / "rest.safetensors"), metadata={"format": MODEL_FORMAT})
    model.config.save_pretrained(out)
    _mark_config(out / "config.json")
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    meta = {"format": MODEL_FORMAT, "format_version": MODEL_FORMAT_VERSION, "modules": kinds, "tied": tied,
            "quantization": getattr(model, "lorakern_quantization", {})}
    (out / "lorakern_quantization.json").write_text(json.dumps(meta, indent=1))
    return out


def _mark_config(path: Path) -> None:
    """Name lorakern in config.json's ``quantization_config``: vLLM then picks lorakern's quantization method with no
    flag (lorakern.integrations.vllm). transformers only warns about the unknown method and keeps the dict in the
    config (a model loaded back by :func:`load_quantized_model` carries it and writes it again)."""
    cfg = json.loads(path.read_text())
    cfg["quantization_config"] = {"quant_method": "lorakern", "format": MODEL_FORMAT, "format_version": MODEL_FORMAT_VERSION}
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def load_quantized_model(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """Load a directory written by :func:`save_quantized_model`; returns the model
    (eval mode). Every file is validated; nothing is unpickled."""
    from transformers import AutoConfig, AutoModelForCausalLM

    d = Path(path)
    try:
        meta = json.loads((d / "lorakern_quantization.json").read_text())
    except FileNotFoundError:
        raise FormatError(f"{d}: not a lorakern model directory (no lorakern_quantization.json)") from None
    except json.JSONDecodeError as e:
        raise FormatError(f"{d}/lorakern_quantization.json is not valid JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != MODEL_FORMAT:
        raise FormatError(f"{d}: lorakern_quantization.json has format {meta.get('format') if isinstance(meta, dict) else None!r}")
    if meta.get("format_version") != MODEL_FORMAT_VERSION:
        raise FormatError(f"{d}: model format_version {meta.get('format_version')!r} is not supported")
    kinds = meta.get("modules")
    if not isinstance(kinds, dict) or not kinds:
        raise FormatError(f"{d}: 'modules' is missing or empty")
    config = AutoConfig.from_pretrained(d, local_files_only=True)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    weights, others, _ = load_quantized(d / "quantized.safetensors")
    tied = meta.get("tied", {})
    if not isinstance(tied, dict) or any(kinds.get(e) != "QuantEmbedding" or kinds.get(h) != "QuantLinear"
                                         for e, h in tied.items()):
        raise FormatError(f"{d}: 'tied' must map QuantEmbedding modules to QuantLinear heads, got {tied!r}")
    if set(weights) != set(kinds) - set(tied):
        raise FormatError(f"{d}: quantized.safetensors holds {len(weights)} layers, the index lists "
                          f"{len(set(kinds) - set(tied))}")
    embeddings = {n: k for n, k in kinds.items() if k == "QuantEmbedding"}
    for name, kind in kinds.items():
        if kind == "QuantEmbedding":
            continue  # after the heads they may read
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise FormatError(f"{d}: layer {name!r} does not exist in this model") from None
        w = weights[name]
        if not (isinstance(old, nn.Linear) or is_conv1d(old)) or linear_shape(old) != tuple(w.shape):
            raise FormatError(f"{d}: layer {name!r} does not match the model's Linear/Conv1D there")
        bias = others.pop(f"{name}.bias", None)
        if kind == "GWQLinear" and isinstance(w, GWQWeight):
            new = GWQLinear(w, bias)
        elif kind == "QuantLinear" and isinstance(w, QuantizedWeight):
            new = QuantLinear(w, bias)
        else:
            raise FormatError(f"{d}: layer {name!r} is listed as {kind!r} but stored as {type(w).__name__}")
        replace_module(model, name, new)
    for name in embeddings:
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise FormatError(f"{d}: layer {name!r} does not exist in this model") from None
        w = model.get_submodule(tied[name]).quantized_weight if name in tied else weights[name]
        if not isinstance(old, nn.Embedding) or not isinstance(w, QuantizedWeight) or \
                (old.num_embeddings, old.embedding_dim) != tuple(w.shape):
            raise FormatError(f"{d}: {name!r} does not match the model's embedding there")
        try:
            scale = QuantEmbedding.scale_of(old)
        except ValueError as e:
            raise FormatError(f"{d}: {name!r}: {e}") from None
        replace_module(model, name, QuantEmbedding(w, dtype=old.weight.dtype, padding_idx=old.padding_idx,
                                                   tied_to=tied.get(name), scale=scale))
    if others:
        raise FormatError(f"{d}: unexpected tensors in quantized.safetensors: {sorted(others)[:5]}")
    rest, _ = read_safetensors(d / "rest.safetensors")
    expected = {k for k, _ in model.state_dict().items() if not k.startswith(tuple(n + "." for n in kinds))}
    unexpected = set(rest) - expected
    if unexpected:
        raise FormatError(f"{d}: rest.safetensors has tensors the model lacks: {sorted(unexpected)[:5]}")
    try:
        missing = model.load_state_dict(rest, strict=False).missing_keys
    except RuntimeError as e:  # shape mismatches
        raise FormatError(f"{d}: rest.safetensors does not fit the model: {str(e)[:300]}") from None
    model.tie_weights()
    missing = [k for k in missing if not k.startswith(tuple(n + "." for n in kinds))]
    tied = {k for k in missing if getattr(config, "tie_word_embeddings", False) and k.endswith("lm_head.weight")}
    if set(missing) - tied:
        raise FormatError(f"{d}: rest.safetensors lacks {sorted(set(missing) - tied)[:5]}")
    model.lorakern_quantization = meta.get("quantization", {})
    install_save_pretrained(model)
    return model.to(device).eval()


def load_model(name_or_path: str):
    """``(model, tokenizer)`` in fp32 eval mode: a built-in model (``"smollm2"``, the default, or
    ``"gemma3"``: :data:`lorakern.models.builtin.BUILTIN_MODELS`) or a local Hugging Face model directory.

    Raises:
        FileNotFoundError: neither a built-in name nor a directory, or the built-in model's package is missing.
        FormatError: transformers cannot load the directory (the cause is in the message).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if builtin_model(name_or_path) is not None:
        return load_builtin(name_or_path)
    p = Path(name_or_path)
    if not p.is_dir():
        raise FileNotFoundError(f"{name_or_path}: not a built-in model ({', '.join(BUILTIN_MODELS)}) and not a "
                                "local model directory")
    try:
        model = AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32, local_files_only=True).eval()
        tok = AutoTokenizer.from_pretrained(p, local_files_only=True)
    except Exception as e:  # transformers raises many kinds; the user needs the directory and the cause
        raise FormatError(f"{p}: cannot load the model ({type(e).__name__}: {' '.join(str(e).split())[:300]})") from e
    return model, tok
