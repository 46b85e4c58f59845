"""Safetensors I/O for quantized weights, with validation of every field.

A file holds one or more quantized weights under a prefix each
(``{prefix}.qweight``, ``{prefix}.scales``, ``{prefix}.zeros``) and string
metadata: ``format = "lorakern.quant"``, ``format_version``, and per prefix
``{prefix}.bits``, ``{prefix}.group_size``, ``{prefix}.shape`` ("N,K").
A GWQ weight adds its CSR outliers (``{prefix}.row_ptr``, ``{prefix}.col_idx``,
``{prefix}.values``) and ``{prefix}.outliers = "csr"``, ``{prefix}.nnz``.
Loading never unpickles: safetensors only. A truncated or corrupted file, or
metadata that disagrees with the tensors, raises :class:`FormatError`.
"""
from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .outliers import GWQWeight, SparseOutliers
from .quantized import FORMAT_VERSION, QuantizedWeight

__all__ = ["FormatError", "save_quantized", "load_quantized", "read_safetensors"]

FORMAT_NAME = "lorakern.quant"


class FormatError(ValueError):
    """A file is not a valid lorakern file (truncated, corrupted, inconsistent)."""


def save_quantized(path: str | os.PathLike, weights: dict[str, QuantizedWeight | GWQWeight],
                   extra_tensors: dict[str, torch.Tensor] | None = None,
                   extra_metadata: dict[str, str] | None = None) -> None:
    """Save quantized weights (:class:`QuantizedWeight` or :class:`GWQWeight`) and
    optional plain tensors such as biases to ``path``."""
    tensors: dict[str, torch.Tensor] = {}
    meta = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION),
            "weights": json.dumps(sorted(weights))}
    for prefix, w in weights.items():
        w.validate()
        if isinstance(w, GWQWeight):
            o = w.outliers
            tensors[f"{prefix}.row_ptr"] = o.row_ptr.detach().cpu().contiguous()
            tensors[f"{prefix}.col_idx"] = o.col_idx.detach().cpu().contiguous()
            tensors[f"{prefix}.values"] = o.values.detach().cpu().contiguous()
            meta[f"{prefix}.outliers"] = "csr"
            meta[f"{prefix}.nnz"] = str(o.nnz)
            w = w.dense
        N, K = w.shape
        tensors[f"{prefix}.qweight"] = w.qweight.detach().cpu().contiguous()
        tensors[f"{prefix}.scales"] = w.scales.detach().cpu().contiguous()
        tensors[f"{prefix}.zeros"] = w.zeros.detach().cpu().contiguous()
        meta[f"{prefix}.bits"] = str(w.bits)
        meta[f"{prefix}.group_size"] = str(w.group_size)
        meta[f"{prefix}.shape"] = f"{N},{K}"
    for k, t in (extra_tensors or {}).items():
        if k in tensors:
            raise ValueError(f"tensor name {k!r} collides with a quantized weight")
        tensors[k] = t.detach().cpu().contiguous()
    clash = set(extra_metadata or {}) & set(meta)
    if clash:
        raise ValueError(f"lorakern: metadata keys {sorted(clash)} are the format's own")
    meta.update(extra_metadata or {})
    save_file(tensors, str(path), metadata=meta)


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read every tensor and the metadata of a safetensors file, as FormatError on damage."""
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(path)
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise
    except Exception as e:  # safetensors raises SafetensorError / OSError / ValueError
        raise FormatError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    return tensors, meta


def _int(meta: dict, key: str, path: str) -> int:
    try:
        return int(meta[key])
    except KeyError:
        raise FormatError(f"{path}: metadata field {key!r} is missing") from None
    except ValueError:
        raise FormatError(f"{path}: metadata field {key!r}={meta[key]!r} is not an integer") from None


def load_quantized(path: str | os.PathLike) -> tuple[dict[str, QuantizedWeight | GWQWeight], dict[str, torch.Tensor],
                                                    dict[str, str]]:
    """Load a file written by :func:`save_quantized`.

    Returns ``(weights, other_tensors, metadata)``. Every field is validated.
    """
    path = str(path)
    tensors, meta = read_safetensors(path)
    if meta.get("format") != FORMAT_NAME:
        raise FormatError(f"{path}: not a lorakern quantized file (format={meta.get('format')!r})")
    version = _int(meta, "format_version", path)
    if version != FORMAT_VERSION:
        raise FormatError(f"{path}: format_version {version} is not supported (expected {FORMAT_VERSION})")
    try:
        prefixes = json.loads(meta["weights"])
        if not isinstance(prefixes, list) or not all(isinstance(p, str) for p in prefixes):
            raise ValueError
    except (KeyError, ValueError):
        raise FormatError(f"{path}: metadata field 'weights' is missing or malformed") from None
    weights = {}
    for prefix in prefixes:
        bits = _int(meta, f"{prefix}.bits", path)
        group_size = _int(meta, f"{prefix}.group_size", path)
        try:
            N, K = (int(v) for v in meta[f"{prefix}.shape"].split(","))
        except (KeyError, ValueError):
            raise FormatError(f"{path}: metadata field '{prefix}.shape' is missing or malformed") from None
        try:
            q = tensors.pop(f"{prefix}.qweight")
            s = tensors.pop(f"{prefix}.scales")
            z = tensors.pop(f"{prefix}.zeros")
        except KeyError as e:
            raise FormatError(f"{path}: tensor {e.args[0]!r} is missing") from None
        try:
            w = QuantizedWeight(q, s, z, bits, group_size)
        except (TypeError, ValueError) as e:
            raise FormatError(f"{path}: weight {prefix!r} is inconsistent: {e}") from None
        if w.shape != (N, K):
            raise FormatError(f"{path}: weight {prefix!r} metadata says shape {(N, K)}, tensors say {w.shape}")
        if not torch.isfinite(s).all() or not torch.isfinite(z).all():
            raise FormatError(f"{path}: weight {prefix!r} has non-finite scales or zeros")
        kind = meta.get(f"{prefix}.outliers")
        if kind is not None:
            if kind != "csr":
                raise FormatError(f"{path}: weight {prefix!r} has unknown outlier format {kind!r}")
            nnz = _int(meta, f"{prefix}.nnz", path)
            try:
                rp, ci, v = (tensors.pop(f"{prefix}.{t}") for t in ("row_ptr", "col_idx", "values"))
            except KeyError as e:
                raise FormatError(f"{path}: tensor {e.args[0]!r} is missing") from None
            try:
                o = SparseOutliers(rp, ci, v, (N, K))
            except (TypeError, ValueError) as e:
                raise FormatError(f"{path}: weight {prefix!r} has invalid outliers: {e}") from None
            if o.nnz != nnz:
                raise FormatError(f"{path}: weight {prefix!r} metadata says {nnz} outliers, tensors hold {o.nnz}")
            w = GWQWeight(w, o)
        weights[prefix] = w
    return weights, tensors, meta
