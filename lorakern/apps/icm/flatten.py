"""Adapters as flat vectors, with per-tensor normalization whose round trip is exact.

An :class:`AdapterLayout` fixes the order and shapes of an adapter's tensors
(module by module, ``lora_A`` then ``lora_B``); :func:`flatten_adapter` writes
them into one vector and :func:`unflatten_adapter` reads it back.

A :class:`Normalizer` z-scores each tensor *position* (e.g. the ``lora_B`` of
layer 3's ``v_proj``) with a mean and a scale fitted over a set of adapters
(the ICM-LoRA recipe). The scale is the standard deviation rounded to a power
of two and the arithmetic is done in float64, so ``denormalize(normalize(v))``
gives back every float32 value bit for bit: ``x - m`` of two float32 numbers is
exact in float64, dividing and multiplying by a power of two is exact, and
adding ``m`` back is exact again. (The one exception: a nonzero value more
than 2^29 times smaller than its tensor's mean, where ``x - m`` already needs
more than float64's 53 bits; LoRA weights are centred near zero, so this does
not occur in practice. Zeros come back as ``+0.0``.)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...adapters.peft_io import LoraAdapter, LoraLayer

__all__ = ["AdapterLayout", "Normalizer", "flatten_adapter", "unflatten_adapter"]


@dataclass(frozen=True)
class AdapterLayout:
    """Order and shapes of an adapter's tensors in the flat vector.

    Attributes:
        modules: module names (``model.layers.0.self_attn.q_proj``...), in vector order.
        a_shapes, b_shapes: ``(r, in)`` of each ``lora_A`` and ``(out, r)`` of each ``lora_B``.
        scales: each module's LoRA scale (alpha / r), carried through to generated adapters.
    """

    modules: tuple[str, ...]
    a_shapes: tuple[tuple[int, int], ...]
    b_shapes: tuple[tuple[int, int], ...]
    scales: tuple[float, ...]

    @classmethod
    def of(cls, adapter: LoraAdapter) -> "AdapterLayout":
        """The layout of ``adapter`` (modules sorted by name)."""
        if not adapter.layers:
            raise ValueError("the adapter has no layers")
        mods = tuple(sorted(adapter.layers))
        return cls(mods, tuple(tuple(adapter.layers[m].A.shape) for m in mods),
                   tuple(tuple(adapter.layers[m].B.shape) for m in mods),
                   tuple(float(adapter.layers[m].scale) for m in mods))

    @property
    def segments(self) -> list[tuple[str, int, int]]:
        """``(name, offset, numel)`` of every tensor in vector order (``{module}.A``, ``{module}.B``)."""
        out, off = [], 0
        for m, a, b in zip(self.modules, self.a_shapes, self.b_shapes):
            for which, shape in (("A", a), ("B", b)):
                n = shape[0] * shape[1]
                out.append((f"{m}.{which}", off, n))
                off += n
        return out

    @property
    def numel(self) -> int:
        """Length of the flat vector."""
        return sum(a[0] * a[1] + b[0] * b[1] for a, b in zip(self.a_shapes, self.b_shapes))

    def check(self, adapter: LoraAdapter) -> None:
        """Raise ValueError unless ``adapter`` has exactly this layout's modules and shapes."""
        if set(adapter.layers) != set(self.modules):
            extra, missing = set(adapter.layers) - set(self.modules), set(self.modules) - set(adapter.layers)
            raise ValueError(f"adapter modules differ from the layout: extra {sorted(extra)[:3]}, "
                             f"missing {sorted(missing)[:3]}")
        for m, a, b in zip(self.modules, self.a_shapes, self.b_shapes):
            layer = adapter.layers[m]
            if tuple(layer.A.shape) != a or tuple(layer.B.shape) != b:
                raise ValueError(f"{m}: lora_A {tuple(layer.A.shape)} / lora_B {tuple(layer.B.shape)}, "
                                 f"layout has {a} / {b}")

    def to_dict(self) -> dict:
        return {"modules": list(self.modules), "a_shapes": [list(s) for s in self.a_shapes],
                "b_shapes": [list(s) for s in self.b_shapes], "scales": list(self.scales)}

    @classmethod
    def from_dict(cls, d: dict) -> "AdapterLayout":
        try:
            mods = tuple(str(m) for m in d["modules"])
            a = tuple((int(s[0]), int(s[1])) for s in d["a_shapes"])
            b = tuple((int(s[0]), int(s[1])) for s in d["b_shapes"])
            sc = tuple(float(s) for s in d["scales"])
        except (KeyError, TypeError, ValueError, IndexError, OverflowError) as e:
            raise ValueError(f"malformed adapter layout: {e!r}") from None
        if not mods or not len(mods) == len(a) == len(b) == len(sc):
            raise ValueError("malformed adapter layout: lists of different lengths")
        for m, (r, k), (n, r2), s in zip(mods, a, b, sc):
            if min(r, k, n) < 1 or r != r2 or not (math.isfinite(s) and s > 0):
                raise ValueError(f"malformed adapter layout at {m}: A ({r}, {k}), B ({n}, {r2}), scale {s}")
        return cls(mods, a, b, sc)


def flatten_adapter(adapter: LoraAdapter, layout: AdapterLayout | None = None) -> torch.Tensor:
    """The adapter's tensors as one float32 vector, in ``layout`` order (default: its own layout)."""
    layout = layout or AdapterLayout.of(adapter)
    layout.check(adapter)
    return torch.cat([t.detach().float().reshape(-1) for m in layout.modules
                      for t in (adapter.layers[m].A, adapter.layers[m].B)])


def unflatten_adapter(vec: torch.Tensor, layout: AdapterLayout, config: dict | None = None) -> LoraAdapter:
    """Inverse of :func:`flatten_adapter`: a :class:`LoraAdapter` (float32) with ``layout``'s modules and
    scales. ``config`` is the PEFT config to carry (default: a minimal LoRA config of the layout's rank)."""
    if vec.dim() != 1 or vec.numel() != layout.numel:
        raise ValueError(f"expected a vector of {layout.numel} values, got shape {tuple(vec.shape)}")
    vec = vec.detach().float().cpu()
    adapter = LoraAdapter(dict(config) if config else {"peft_type": "LORA", "r": layout.a_shapes[0][0],
                                                       "lora_alpha": layout.scales[0] * layout.a_shapes[0][0]})
    off = 0
    for m, a, b, s in zip(layout.modules, layout.a_shapes, layout.b_shapes, layout.scales):
        A = vec[off:off + a[0] * a[1]].reshape(a).clone()
        off += a[0] * a[1]
        B = vec[off:off + b[0] * b[1]].reshape(b).clone()
        off += b[0] * b[1]
        adapter.layers[m] = LoraLayer(A, B, s)
    return adapter


class Normalizer:
    """Per-tensor z-scoring of flat adapter vectors, fitted over a set of them.

    ``mean[i]`` and ``scale[i]`` belong to segment ``i`` of the layout (one tensor);
    the scale is a power of two near the standard deviation, so the round trip is exact
    (see the module docstring). Normalized vectors are float64; :meth:`denormalize`
    returns float32.
    """

    def __init__(self, layout: AdapterLayout, mean: torch.Tensor, scale: torch.Tensor):
        nseg = len(layout.segments)
        if mean.shape != (nseg,) or scale.shape != (nseg,):
            raise ValueError(f"expected {nseg} means and scales, got {tuple(mean.shape)} and {tuple(scale.shape)}")
        if mean.dtype not in (torch.float32, torch.float64) or scale.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"normalizer statistics must be float32, got {mean.dtype} and {scale.dtype}")
        if not (torch.isfinite(mean).all() and torch.isfinite(scale).all() and (scale > 0).all()):
            raise ValueError("normalizer statistics must be finite with positive scales")
        m, e = torch.frexp(scale.double())
        if not bool((m == 0.5).all()):
            raise ValueError("normalizer scales must be powers of two")
        self.layout = layout
        self.mean = mean.float()
        self.scale = scale.float()
        lengths = torch.tensor([n for _, _, n in layout.segments])
        self._mean_full = torch.repeat_interleave(self.mean.double(), lengths)
        self._scale_full = torch.repeat_interleave(self.scale.double(), lengths)

    @classmethod
    def fit(cls, vectors: torch.Tensor, layout: AdapterLayout) -> "Normalizer":
        """Statistics of ``vectors`` (``[n, layout.numel]``), per tensor over all of them."""
        if vectors.dim() != 2 or vectors.shape[1] != layout.numel:
            raise ValueError(f"expected [n, {layout.numel}] vectors, got {tuple(vectors.shape)}")
        means, scales = [], []
        for _, off, n in layout.segments:
            seg = vectors[:, off:off + n].double()
            mu = seg.mean()
            sd = float(seg.std(unbiased=False)) if seg.numel() > 1 else 0.0
            means.append(float(mu.float()))  # float32 means, so that x - m is exact in float64
            scales.append(2.0 ** round(math.log2(sd)) if sd > 0 else 1.0)
        return cls(layout, torch.tensor(means), torch.tensor(scales))

    def normalize(self, vec: torch.Tensor) -> torch.Tensor:
        """``(vec - mean) / scale`` per tensor, in float64 (``vec``: ``[L]`` or ``[n, L]``)."""
        if vec.shape[-1] != self.layout.numel:
            raise ValueError(f"expected vectors of {self.layout.numel} values, got {tuple(vec.shape)}")
        return (vec.float().double() - self._mean_full) / self._scale_full

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`normalize`: ``z * scale + mean`` per tensor, as float32."""
        if z.shape[-1] != self.layout.numel:
            raise ValueError(f"expected vectors of {self.layout.numel} values, got {tuple(z.shape)}")
        return (z.double() * self._scale_full + self._mean_full).float()
