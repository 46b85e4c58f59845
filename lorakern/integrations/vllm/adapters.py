"""Compressed (LoRAQuant) adapters served by vLLM without being expanded to full precision.

vLLM loads an adapter into a ``LoRAModel`` (its CPU cache, ``max_cpu_loras`` of them) and, when a request needs
it, copies every layer's A and B into a slot of the layer's stacked tensors. For a compressed adapter lorakern
changes both steps:

* **load** (:func:`from_local_checkpoint`, in place of ``LoRAModel.from_local_checkpoint``): a directory written
  by ``lorakern compress-adapter PEFT_DIR OUT_DIR`` (``adapter_config.json`` + ``lorakern_compressed.safetensors``)
  becomes a ``LoRAModel`` whose layers hold 0-rank placeholder tensors carrying the
  :class:`~lorakern.formats.lora.CompressedLoRA` (attribute ``lorakern_compressed``). A plain PEFT directory is
  compressed at load when ``LORAKERN_VLLM_COMPRESS`` gives the settings, e.g. ``rho=0.9,bits_high=2,group_size=128``
  (every PEFT adapter of that process tree is then compressed; ``unbias=0`` keeps LoRAQuant's own scales instead
  of lorakern's unbiased components). vLLM's CPU cache thus holds codes, not fp32
  matrices: 1,000 resident adapters fit in memory.
* **activate** (:func:`activate_adapter`, wrapping ``LoRAModelManager.activate_adapter``): vLLM copies the
  placeholders (nothing) into the slot; lorakern then tells the LoRA backend which compressed layers the slot
  holds, and the backend places them in its banks as compressed slots (the multi-adapter kernels decode the codes
  on the fly).
"""
from __future__ import annotations

import os

import torch

from vllm.lora.lora_model import LoRAModel
from vllm.lora.lora_weights import LoRALayerWeights
from vllm.lora.model_manager import LoRAModelManager

from ...adapters.peft_io import COMPRESSED_DIR_FILE, compress_adapter, load_compressed_adapter, load_peft_adapter
from ...formats.lora import CompressedLoRA

__all__ = ["compress_settings", "from_local_checkpoint", "activate_adapter", "install"]

ENV = "LORAKERN_VLLM_COMPRESS"
# (module, group along K, group along N) of the first compressed adapter loaded in this process: a layer's bank holds
# compressed adapters of one pair of group sizes, so a later adapter with others is refused when it loads
_GROUPS: dict[str, tuple[int, int]] = {}
_orig_from_local_checkpoint = LoRAModel.from_local_checkpoint.__func__
_orig_activate = LoRAModelManager.activate_adapter


def compress_settings() -> dict | None:
    """The compression settings of ``LORAKERN_VLLM_COMPRESS`` (``rho``, ``bits_high``, ``group_size``, ``unbias``
    as 0/1), or None.

    Raises:
        ValueError: a malformed value or an unknown key.
    """
    text = os.environ.get(ENV, "").strip()
    if not text:
        return None
    out = {}
    casts = {"rho": float, "bits_high": int, "group_size": int, "unbias": _flag}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in casts:
            raise ValueError(f"lorakern: {ENV}={text!r}: expected comma-separated rho=..., bits_high=..., "
                             f"group_size=..., unbias=0|1 (got {item!r})")
        try:
            out[key] = casts[key](value)
        except ValueError:
            kind = "0 or 1" if key == "unbias" else "a number"
            raise ValueError(f"lorakern: {ENV}: {key}={value!r} is not {kind}") from None
    return out


def _flag(value: str) -> bool:
    """``1``/``true`` -> True, ``0``/``false`` -> False (ValueError otherwise)."""
    v = value.strip().lower()
    if v in ("1", "true"):
        return True
    if v in ("0", "false"):
        return False
    raise ValueError(value)


def _placeholder(c: CompressedLoRA, module_name: str) -> LoRALayerWeights:
    """A 0-rank LoRALayerWeights carrying ``c``: vLLM copies nothing into its slots for it."""
    N, K = c.shape
    a = torch.zeros(0, K)
    b = torch.zeros(N, 0)
    a.lorakern_compressed = c
    return LoRALayerWeights(module_name, c.rank, c.rank, a, b, scaling=1.0)


@classmethod
def from_local_checkpoint(cls, lora_dir: str, expected_lora_modules, peft_helper, *, lora_model_id=None, **kwargs):
    """``LoRAModel.from_local_checkpoint`` that keeps lorakern-compressed adapters compressed (module docstring)."""
    path = os.path.join(lora_dir, COMPRESSED_DIR_FILE)
    settings = compress_settings()
    if os.path.isfile(path):
        layers = load_compressed_adapter(path)
    elif settings is not None:
        layers = compress_adapter(load_peft_adapter(lora_dir), **settings)
    else:
        return _orig_from_local_checkpoint(cls, lora_dir, expected_lora_modules, peft_helper,
                                           lora_model_id=lora_model_id, **kwargs)
    mapper = kwargs.get("weights_mapper")
    if mapper is not None:  # the model's checkpoint-to-vLLM renames, as vLLM applies them to PEFT names
        mapped = {}
        for m, c in layers.items():
            new = mapper.map_name(m)
            if new is not None:
                mapped[new] = c
        layers = mapped
    skip = kwargs.get("skip_prefixes") or []
    layers = {m: c for m, c in layers.items() if not (skip and LoRAModel._should_skip_module(m, skip))}
    expected = set(expected_lora_modules)
    unknown = sorted({m.rsplit(".", 1)[-1] for m in layers} - expected)
    if unknown:
        raise ValueError(f"lorakern: the compressed adapter {lora_dir} targets {unknown}, which this model's LoRA "
                         f"layers do not include ({sorted(expected)})")
    for m, c in layers.items():
        want = _GROUPS.setdefault(m, c.group_sizes)
        if c.group_sizes != want:
            raise ValueError(f"lorakern: {lora_dir}: layer {m} is compressed with groups {c.group_sizes}, the adapters "
                             f"already loaded use {want}; compress every adapter of one engine with the same "
                             "--group-size (LORAKERN_VLLM_COMPRESS too)")
    loras = {m: _placeholder(c, m) for m, c in layers.items()}
    return cls(lora_model_id, peft_helper.r, loras)


def _compressed_of(weights) -> list | None:
    """The CompressedLoRA of each slice of a (packed) LoRALayerWeights, or None when it is a dense adapter."""
    if weights is None:
        return None
    a = weights.lora_a if isinstance(weights.lora_a, (list, tuple)) else [weights.lora_a]
    found = [getattr(t, "lorakern_compressed", None) if t is not None else None for t in a]
    return found if any(c is not None for c in found) else None


def activate_adapter(self, lora_id: int) -> bool:
    """``LoRAModelManager.activate_adapter``, then the compressed layers of the adapter handed to lorakern's LoRA
    backend for the slot it took (dense adapters: the slot's entry cleared)."""
    done = _orig_activate(self, lora_id)
    if not done:
        return done
    index = self.lora_index_to_id.index(lora_id)
    lora_model = self._registered_adapters[lora_id]
    for module_name, module in self.modules.items():
        wrapper = getattr(module, "punica_wrapper", None)
        if wrapper is None or not hasattr(wrapper, "set_compressed") or not hasattr(module, "lora_a_stacked"):
            continue
        comp = _compressed_of(self._get_lora_layer_weights(lora_model, module_name))
        stacked = module.lora_a_stacked if isinstance(module.lora_a_stacked, (list, tuple)) else (module.lora_a_stacked,)
        wrapper.set_compressed(stacked[0], index, comp)
    return done


def install() -> None:
    """Put the two hooks in place (idempotent)."""
    LoRAModel.from_local_checkpoint = from_local_checkpoint
    LoRAModelManager.activate_adapter = activate_adapter
