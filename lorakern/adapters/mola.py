"""MoLA adapters: files (dense and LoRAQuant-compressed), compression, attaching to a model.

Dense format, a directory (docs/formats.md, "MoLA adapter"):

- ``mola_config.json``: ``{"format": "lorakern.mola", "format_version": 1, "experts_per_layer": [E_0, ...],
  "target_modules": [...], "rank": r, "lora_alpha": alpha, "top_k": k, "aux_loss_coef": c}``;
- ``mola_model.safetensors``: per adapted module ``{module}.router.weight [E, K]`` and per expert e
  ``{module}.experts.{e}.lora_A.weight [r_e, K]`` / ``{module}.experts.{e}.lora_B.weight [N, r_e]``
  (an expert of rank r_e is scaled by ``alpha / r_e``); string metadata kept as the adapter's metadata.

Compressed format, one safetensors file (what ``lorakern compress-adapter`` writes for a MoLA directory): the
compressed-LoRA layout of :func:`~lorakern.adapters.save_compressed_adapter` with one layer per expert
(``{module}.experts.{e}``), the routers as plain tensors and the config under the ``mola_config`` metadata key.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..formats.io import FormatError, load_quantized, read_safetensors
from ..formats.lora import CompressedLoRA, LoraLayer
from ..formats.mola import MoLAAdapter, MoLAConfig, MoLALayer
from ..nn.mola_linear import MoLALinear
from ..quant.loraquant import compress_lora
from .attach import adapter_target, attached, detach_adapter, swap_in
from .peft_io import compressed_layers, save_compressed_adapter

__all__ = ["apply_mola", "attach_mola", "compress_mola_adapter", "detach_mola", "is_mola_adapter",
           "load_mola_adapter", "save_compressed_mola", "save_mola_adapter"]

FORMAT = "lorakern.mola"
FORMAT_VERSION = 1
CONFIG_FILE, WEIGHTS_FILE = "mola_config.json", "mola_model.safetensors"
_EXPERT = re.compile(r"^(.+)\.experts\.(0|[1-9]\d*)\.lora_([AB])\.weight$")  # canonical indices only
_ROUTER = re.compile(r"^(.+)\.router\.weight$")


def is_mola_adapter(path) -> bool:
    """Whether ``path`` is a MoLA directory or a compressed MoLA file (by its config / metadata, not its name)."""
    p = Path(path)
    if p.is_dir():
        return (p / CONFIG_FILE).is_file()
    if p.is_file() and p.suffix == ".safetensors":
        try:  # the header alone, no tensor read
            with safe_open(str(p), framework="pt", device="cpu") as f:
                return "mola_config" in (f.metadata() or {})
        except Exception:  # safetensors raises SafetensorError / OSError on a damaged file: not a MoLA file
            return False
    return False


def _config_dict(adapter: MoLAAdapter) -> dict:
    return {"format": FORMAT, "format_version": FORMAT_VERSION, **adapter.config.to_json()}


def save_mola_adapter(adapter: MoLAAdapter, path: str | os.PathLike) -> Path:
    """Write a dense MoLA adapter directory (``mola_config.json`` + ``mola_model.safetensors``); returns it.

    Raises:
        ValueError: the adapter is invalid, holds compressed experts (use :func:`save_compressed_mola`), or an
            expert's scale is not ``alpha / r_e`` (the format stores no per-expert scale).
    """
    adapter.validate()
    alpha = adapter.config.alpha
    tensors = {}
    for m, layer in adapter.layers.items():
        if layer.compressed:
            raise ValueError(f"lorakern: {m} holds compressed experts; save them with save_compressed_mola")
        tensors[f"{m}.router.weight"] = layer.router.detach().float().contiguous().cpu()
        for e, ex in enumerate(layer.experts):
            if abs(float(ex.scale) - alpha / ex.rank) > 1e-6 * alpha / ex.rank:
                raise ValueError(f"lorakern: {m} expert {e}: scale {ex.scale} is not alpha/r = {alpha / ex.rank}")
            tensors[f"{m}.experts.{e}.lora_A.weight"] = ex.A.detach().contiguous().cpu()
            tensors[f"{m}.experts.{e}.lora_B.weight"] = ex.B.detach().contiguous().cpu()
    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(d / WEIGHTS_FILE), metadata={str(k): str(v) for k, v in adapter.metadata.items()})
    (d / CONFIG_FILE).write_text(json.dumps(_config_dict(adapter), indent=2))
    return d


def _parse_config(d: dict, where) -> MoLAConfig:
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise FormatError(f"{where}: not a MoLA config (format {d.get('format') if isinstance(d, dict) else None!r})")
    if d.get("format_version") != FORMAT_VERSION:
        raise FormatError(f"{where}: format_version {d.get('format_version')!r} is not supported "
                          f"(expected {FORMAT_VERSION})")
    try:
        return MoLAConfig.from_json(d)
    except (TypeError, ValueError) as e:
        raise FormatError(f"{where}: {str(e).removeprefix('lorakern: ')}") from None


def _validated(adapter: MoLAAdapter, where) -> MoLAAdapter:
    try:
        adapter.validate()
    except (TypeError, ValueError) as e:
        raise FormatError(f"{where}: {str(e).removeprefix('lorakern: ')}") from None
    return adapter


def _load_dense(d: Path) -> MoLAAdapter:
    cfg_path, w_path = d / CONFIG_FILE, d / WEIGHTS_FILE
    if not w_path.is_file():
        raise FormatError(f"{d}: no {WEIGHTS_FILE}")
    try:
        raw = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise FormatError(f"{cfg_path}: not valid JSON ({e})") from None
    cfg = _parse_config(raw, cfg_path)
    tensors, meta = read_safetensors(w_path)
    routers, experts = {}, {}
    for name, t in tensors.items():
        if not t.dtype.is_floating_point:
            raise FormatError(f"{w_path}: tensor {name!r} is {t.dtype}, not floating point")
        if (m := _ROUTER.match(name)) is not None:
            routers[m.group(1)] = t.float()
        elif (m := _EXPERT.match(name)) is not None:
            experts.setdefault(m.group(1), {}).setdefault(int(m.group(2)), {})[m.group(3)] = t
        else:
            raise FormatError(f"{w_path}: unexpected tensor {name!r}")

    def expert(mod, e, ab):
        if set(ab) != {"A", "B"}:
            raise FormatError(f"{w_path}: {mod} expert {e} lacks lora_A or lora_B")
        A, B = ab["A"], ab["B"]
        if A.dim() != 2 or A.shape[0] < 1 or B.dim() != 2:
            raise FormatError(f"{w_path}: {mod} expert {e}: lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)} "
                              "are not [r, K] / [N, r]")
        return LoraLayer(A, B, cfg.alpha / A.shape[0])
    return _validated(MoLAAdapter(cfg, _layers(routers, experts, w_path, expert), dict(meta)), d)


def _layers(routers: dict, experts: dict, where, expert) -> dict:
    """``{module: MoLALayer}`` from a file's routers and ``{module: {e: item}}`` experts (``expert(module, e, item)``
    makes each one): every module has both, experts numbered 0..E-1. Raises FormatError."""
    if set(experts) != set(routers):
        raise FormatError(f"{where}: modules with experts {sorted(set(experts) - set(routers))[:3]} lack a router, "
                          f"or routers {sorted(set(routers) - set(experts))[:3]} lack experts")
    layers = {}
    for mod, ex in experts.items():
        if sorted(ex) != list(range(len(ex))):
            raise FormatError(f"{where}: {mod}: experts {sorted(ex)} are not numbered 0..{len(ex) - 1}")
        layers[mod] = MoLALayer(routers[mod], [expert(mod, e, ex[e]) for e in range(len(ex))])
    return layers


def _load_compressed(path: Path) -> MoLAAdapter:
    weights, others, meta = load_quantized(path)
    try:
        raw = json.loads(meta["mola_config"])
    except (KeyError, ValueError):
        raise FormatError(f"{path}: metadata 'mola_config' is missing or malformed") from None
    cfg = _parse_config(raw, path)
    layers_by_key = compressed_layers(weights, meta, path)
    routers = {}
    for name, t in others.items():
        m = _ROUTER.match(name)
        if m is None or not t.dtype.is_floating_point:
            raise FormatError(f"{path}: unexpected tensor {name!r}")
        routers[m.group(1)] = t.float()
    experts = {}
    for key, c in layers_by_key.items():
        mod, _, e = key.rpartition(".experts.")
        if not mod or not e.isdigit() or str(int(e)) != e:
            raise FormatError(f"{path}: layer {key!r} is not '<module>.experts.<e>'")
        experts.setdefault(mod, {})[int(e)] = c
    keep = {k: v for k, v in meta.items() if k.startswith("lorakern_")}
    return _validated(MoLAAdapter(cfg, _layers(routers, experts, path, lambda mod, e, c: c), keep), path)


def load_mola_adapter(path: str | os.PathLike) -> MoLAAdapter:
    """Read a MoLA adapter: a directory (dense, :func:`save_mola_adapter`) or a ``.safetensors`` file
    (compressed, :func:`save_compressed_mola`). Every field is validated (shapes, expert counts against the
    config, finite values, no stray tensors); anything malformed raises :class:`~lorakern.formats.FormatError`."""
    p = Path(path)
    if p.is_dir():
        if not (p / CONFIG_FILE).is_file():
            raise FormatError(f"{p}: no {CONFIG_FILE} (not a MoLA adapter directory)")
        return _load_dense(p)
    if p.is_file():
        return _load_compressed(p)
    raise FileNotFoundError(str(p))


def compress_mola_adapter(adapter: MoLAAdapter, rho: float = 0.9, bits_high: int = 2,
                          group_size: int = 128, unbias: bool = True) -> MoLAAdapter:
    """LoRAQuant-compress every expert (:func:`lorakern.quant.compress_lora`, ``unbias`` as there); routers stay
    fp32. Returns a new adapter whose experts are :class:`CompressedLoRA` (serve it with :func:`attach_mola`)."""
    adapter.validate()
    layers = {}
    for m, layer in adapter.layers.items():
        ex = [e if isinstance(e, CompressedLoRA) else
              compress_lora(e.B, e.A, rho=rho, bits_high=bits_high, group_size=group_size, scale=e.scale,
                            unbias=unbias)
              for e in layer.experts]
        layers[m] = MoLALayer(layer.router.clone(), ex)
    return MoLAAdapter(adapter.config, layers, dict(adapter.metadata))


def save_compressed_mola(path: str | os.PathLike, adapter: MoLAAdapter, extra_metadata: dict | None = None) -> None:
    """One safetensors file for a MoLA adapter with compressed experts (every expert must be compressed)."""
    adapter.validate()
    experts, routers = {}, {}
    for m, layer in adapter.layers.items():
        for e, ex in enumerate(layer.experts):
            if not isinstance(ex, CompressedLoRA):
                raise ValueError(f"lorakern: {m} expert {e} is not compressed (compress_mola_adapter first)")
            experts[f"{m}.experts.{e}"] = ex
        routers[f"{m}.router.weight"] = layer.router.detach().float()
    meta = {k: str(v) for k, v in adapter.metadata.items() if k.startswith("lorakern_")}
    meta.update(extra_metadata or {})
    meta.update({"mola_config": json.dumps(_config_dict(adapter)), "module": "CompressedMoLA"})  # not overridable
    save_compressed_adapter(path, experts, extra_metadata=meta, extra_tensors=routers)


def attach_mola(model: nn.Module, adapter, dtype: torch.dtype = torch.float16) -> dict[str, nn.Module]:
    """Replace every module ``adapter`` adapts by a :class:`~lorakern.nn.MoLALinear` around it.

    ``adapter``: a :class:`MoLAAdapter` or a path for :func:`load_mola_adapter`. Dense experts are stored in
    ``dtype`` (compressed ones keep their codes). Everything is checked before the model changes. Returns the
    replaced modules, for :func:`detach_mola`.

    Raises:
        ValueError: a module the model lacks, one already wrapped, or shapes that do not fit.
    """
    if not isinstance(adapter, MoLAAdapter):
        adapter = load_mola_adapter(adapter)
    adapter.validate()
    wrapped = {}
    for name, layer in adapter.layers.items():
        wrapped[name] = MoLALinear(adapter_target(model, name, "the MoLA adapter"), layer, adapter.config.top_k,
                                   dtype=dtype)
    return swap_in(model, wrapped)


#: undo :func:`attach_mola` (``old`` is what it returned): the modules go back, as :func:`detach_adapter` does
detach_mola = detach_adapter


def apply_mola(model: nn.Module, adapter, dtype: torch.dtype = torch.float16):
    """``with apply_mola(model, adapter): ...`` runs the model with the MoLA adapter attached."""
    return attached(attach_mola, model, adapter, dtype)
