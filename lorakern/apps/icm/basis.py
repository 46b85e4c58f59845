"""The generator's output space: a mean adapter plus a few principal directions, stored low-bit.

Adapters of related tasks trained from one initialisation differ in few directions
(on the default SmolLM2 task set, the top 16 principal directions of the 20 seen
tasks' normalized checkpoints hold most of their spread), so the generator does not
need to write all ``L`` numbers of an adapter freely: it writes ``k`` coefficients, and

    x = mean + coef @ basis        (normalized adapter space, see :mod:`.flatten`)

gives the adapter. The basis is the top ``k`` right singular vectors of the training
vectors (centred), stored as a :class:`~lorakern.formats.quantized.QuantizedWeight`
``[k, Lp]`` (RTN, ``bits`` in {2, 3, 4, 8}, groups of 128; ``Lp`` is ``L`` padded to
the group) or as float16 (``bits=16``); the mean is float16. Coefficients are always
computed against the *stored* (dequantized) basis by least squares, so a
reconstruction is the best the stored basis can give.
"""
from __future__ import annotations

import torch

from ...formats.io import FormatError
from ...formats.quantized import QuantizedWeight
from ...quant.rtn import quantize_rtn

__all__ = ["AdapterBasis"]

GROUP = 128


class AdapterBasis:
    """``mean`` (float16 ``[L]``) plus ``k`` directions (float16 ``[k, L]`` or a :class:`QuantizedWeight`
    ``[k, Lp]``, RTN in groups of 128); see the module docstring. Raises ValueError on other dtypes, shapes,
    group sizes or bits, or on NaN/Inf."""

    def __init__(self, mean: torch.Tensor, directions: torch.Tensor | QuantizedWeight, length: int):
        if mean.dtype != torch.float16 or mean.shape != (length,):
            raise ValueError(f"mean must be float16 [{length}], got {mean.dtype} {tuple(mean.shape)}")
        if type(length) is not int or length < 1:
            raise ValueError(f"length must be a positive integer, got {length!r}")
        if isinstance(directions, QuantizedWeight):
            if directions.group_size != GROUP or directions.bits not in (2, 3, 4, 8):
                raise ValueError(f"a quantized basis has bits 2, 3, 4 or 8 in groups of {GROUP}, got "
                                 f"{directions.bits} bits in groups of {directions.group_size}")
            k, lp = directions.shape
            if lp < length or lp - length >= directions.group_size:
                raise ValueError(f"quantized basis rows have {lp} values for adapters of {length}")
        elif directions.dtype != torch.float16 or directions.dim() != 2 or directions.shape[1] != length:
            raise ValueError(f"basis must be float16 [k, {length}], got {directions.dtype} {tuple(directions.shape)}")
        self.mean, self.directions, self.length = mean, directions, int(length)
        self._dense = self._dequantize()
        if not (torch.isfinite(self._dense).all() and torch.isfinite(mean).all()):
            raise ValueError("basis or mean has NaN or Inf")
        # least-squares coefficients against the stored basis: coef = (x - mean) @ V^T (V V^T)^-1
        V = self._dense.double()
        self._gram_inv_vt = torch.linalg.solve(V @ V.T + 1e-12 * torch.eye(V.shape[0], dtype=V.dtype), V).T

    @property
    def k(self) -> int:
        """Number of directions."""
        return self._dense.shape[0]

    @property
    def bits(self) -> int:
        """Bits per stored direction value (16: float16)."""
        return self.directions.bits if isinstance(self.directions, QuantizedWeight) else 16

    @classmethod
    def fit(cls, x: torch.Tensor, k: int, bits: int = 4) -> "AdapterBasis":
        """Mean and top-``k`` principal directions of ``x`` (``[n, L]`` normalized adapters), stored at ``bits``
        (2, 3, 4, 8: RTN in groups of 128; 16: float16). Raises ValueError for ``k`` < 1 or above ``n``."""
        if x.dim() != 2 or x.shape[0] < 1:
            raise ValueError(f"expected [n, L] vectors, got {tuple(x.shape)}")
        if x.shape[0] < 2 or not 1 <= k <= x.shape[0] - 1:  # n centred vectors span at most n - 1 directions
            raise ValueError(f"k must be in 1..{x.shape[0] - 1} (the number of vectors - 1), got {k}")
        if not torch.isfinite(x).all():
            raise ValueError("the vectors have NaN or Inf values")
        if bits not in (2, 3, 4, 8, 16):
            raise ValueError(f"bits must be 2, 3, 4, 8 or 16, got {bits}")
        x = x.double()
        mean = x.mean(0)
        _, _, Vh = torch.linalg.svd(x - mean, full_matrices=False)
        V = Vh[:k].float()
        mean16 = mean.half()
        if bits == 16:
            return cls(mean16, V.half(), x.shape[1])
        pad = -x.shape[1] % GROUP
        return cls(mean16, quantize_rtn(torch.nn.functional.pad(V, (0, pad)), bits, GROUP), x.shape[1])

    def _dequantize(self) -> torch.Tensor:
        if isinstance(self.directions, QuantizedWeight):
            return self.directions.dequantize()[:, :self.length]
        return self.directions.float()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Least-squares coefficients (float32 ``[n, k]``) of normalized adapters ``x`` ``[n, L]``."""
        if x.shape[-1] != self.length:
            raise ValueError(f"expected vectors of {self.length} values, got {tuple(x.shape)}")
        return ((x.double() - self.mean.double()) @ self._gram_inv_vt).float()

    def decode(self, coef: torch.Tensor) -> torch.Tensor:
        """Normalized adapters ``[n, L]`` (float64) from coefficients ``[n, k]``."""
        if coef.shape[-1] != self.k:
            raise ValueError(f"expected {self.k} coefficients, got {tuple(coef.shape)}")
        return self.mean.double() + coef.double() @ self._dense.double()

    def num_bytes(self) -> int:
        """Bytes stored (mean, codes, scales and zeros)."""
        d = self.directions
        return self.mean.numel() * 2 + (d.nbytes() if isinstance(d, QuantizedWeight) else d.numel() * 2)

    def tensors(self, prefix: str = "basis.") -> dict[str, torch.Tensor]:
        """The tensors to save (``{prefix}mean``, ``{prefix}qweight/scales/zeros`` or ``{prefix}dense``)."""
        out = {f"{prefix}mean": self.mean}
        d = self.directions
        if isinstance(d, QuantizedWeight):
            out.update({f"{prefix}qweight": d.qweight, f"{prefix}scales": d.scales, f"{prefix}zeros": d.zeros})
        else:
            out[f"{prefix}dense"] = d
        return {k: v.contiguous() for k, v in out.items()}

    def meta(self) -> dict:
        """The metadata :meth:`from_tensors` needs (``bits``, ``length``; groups are always 128)."""
        return {"bits": self.bits, "length": self.length}

    @classmethod
    def from_tensors(cls, tensors: dict, meta: dict, prefix: str = "basis.") -> "AdapterBasis":
        """Inverse of :meth:`tensors` + :meth:`meta`; raises FormatError on anything inconsistent."""
        try:
            bits, length = meta["bits"], meta["length"]
            if type(bits) is not int or bits not in (2, 3, 4, 8, 16) or type(length) is not int or length < 1:
                raise ValueError(f"basis metadata needs bits in 2, 3, 4, 8, 16 and a positive length, got {meta}")
            mean = tensors[f"{prefix}mean"]
            if bits == 16:
                return cls(mean, tensors[f"{prefix}dense"], length)
            q = QuantizedWeight(tensors[f"{prefix}qweight"], tensors[f"{prefix}scales"], tensors[f"{prefix}zeros"],
                                bits, GROUP)
            return cls(mean, q, length)
        except (KeyError, TypeError, ValueError, RuntimeError, OverflowError, NotImplementedError) as e:
            raise FormatError(f"bad adapter basis: {e}") from None
