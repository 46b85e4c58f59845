"""Sparse fp16 outliers in CSR, and the GWQ weight (dense low-bit codes + outliers).

A :class:`GWQWeight` is ``W = dequant(dense) + S`` where ``S`` is a sparse
``[N, K]`` matrix in CSR:

* ``row_ptr``: int32 ``[N + 1]``, ``row_ptr[0] = 0``, non-decreasing, ``row_ptr[N] = nnz``;
* ``col_idx``: uint16 ``[nnz]``, strictly increasing within a row, each ``< K`` (so ``K <= 65536``);
* ``values``:  fp16 ``[nnz]``, finite.

GWQ stores at an outlier position the residual ``w - dequant(q)``, so the dense
pass needs no mask and the sum reproduces the outlier to fp16 precision.
Storage per outlier: 16 (value) + 16 (column) bits, plus 32 bits per row pointer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .quantized import QuantizedWeight

__all__ = ["SparseOutliers", "GWQWeight", "MAX_OUTLIER_K"]

MAX_OUTLIER_K = 65536  # uint16 column indices


@dataclass(frozen=True)
class SparseOutliers:
    """CSR outliers of a logical ``[N, K]`` matrix (see the module docstring)."""

    row_ptr: torch.Tensor
    col_idx: torch.Tensor
    values: torch.Tensor
    shape: tuple[int, int]

    def __post_init__(self):
        object.__setattr__(self, "shape", (int(self.shape[0]), int(self.shape[1])))
        self.validate()

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    @property
    def device(self) -> torch.device:
        return self.values.device

    def nbytes(self) -> int:
        """Bytes of row pointers, column indices and values."""
        return sum(t.numel() * t.element_size() for t in (self.row_ptr, self.col_idx, self.values))

    def validate(self) -> None:
        """Check dtypes, sizes, row pointers, column order and range, finiteness.

        Raises TypeError/ValueError naming the first problem found."""
        N, K = self.shape
        rp, ci, v = self.row_ptr, self.col_idx, self.values
        if N < 0 or K <= 0:
            raise ValueError(f"outliers: bad shape {self.shape}")
        if K > MAX_OUTLIER_K:
            raise ValueError(f"outliers: K={K} exceeds {MAX_OUTLIER_K} (uint16 column indices)")
        if rp.dtype != torch.int32 or rp.dim() != 1 or rp.numel() != N + 1:
            raise TypeError(f"outliers: row_ptr must be int32 of shape ({N + 1},), got {rp.dtype} {tuple(rp.shape)}")
        if ci.dtype != torch.uint16 or ci.dim() != 1:
            raise TypeError(f"outliers: col_idx must be a 1-D uint16 tensor, got {ci.dtype} {tuple(ci.shape)}")
        if v.dtype != torch.float16 or v.dim() != 1:
            raise TypeError(f"outliers: values must be a 1-D float16 tensor, got {v.dtype} {tuple(v.shape)}")
        if ci.numel() != v.numel():
            raise ValueError(f"outliers: {ci.numel()} column indices but {v.numel()} values")
        if len({rp.device, ci.device, v.device}) != 1:
            raise ValueError("outliers: row_ptr, col_idx and values are on different devices")
        nnz = v.numel()
        rpl = rp.to(torch.int64)
        if int(rpl[0]) != 0 or int(rpl[-1]) != nnz:
            raise ValueError(f"outliers: row_ptr must start at 0 and end at nnz={nnz}, "
                             f"got {int(rpl[0])} .. {int(rpl[-1])}")
        if N and bool((rpl[1:] < rpl[:-1]).any()):
            raise ValueError("outliers: row_ptr is not non-decreasing")
        if nnz:
            c = ci.to(torch.int64)
            if int(c.max()) >= K:
                raise ValueError(f"outliers: a column index is >= K={K}")
            # strictly increasing within each row: a step down or repeat only where a row starts
            row_start = torch.zeros(nnz, dtype=torch.bool, device=c.device)
            starts = rpl[:-1][rpl[1:] > rpl[:-1]]
            row_start[starts] = True
            if bool(((c[1:] <= c[:-1]) & ~row_start[1:]).any()):
                raise ValueError("outliers: column indices are not strictly increasing within a row")
            if not bool(torch.isfinite(v).all()):
                raise ValueError("outliers: values contain NaN or Inf")

    @classmethod
    def from_mask(cls, mask: torch.Tensor, values: torch.Tensor) -> "SparseOutliers":
        """CSR of ``values[mask]`` (both ``[N, K]``); values are rounded to fp16."""
        if mask.shape != values.shape or mask.dim() != 2:
            raise ValueError(f"mask {tuple(mask.shape)} and values {tuple(values.shape)} must be the same 2-D shape")
        N, K = mask.shape
        rows, cols = mask.nonzero(as_tuple=True)  # row-major order: sorted rows, then columns
        counts = torch.bincount(rows, minlength=N)
        row_ptr = torch.zeros(N + 1, dtype=torch.int64, device=mask.device)
        row_ptr[1:] = counts.cumsum(0)
        return cls(row_ptr.to(torch.int32), cols.to(torch.int32).to(torch.uint16),
                   values[rows, cols].to(torch.float16), (N, K))

    @classmethod
    def empty(cls, N: int, K: int, device="cpu") -> "SparseOutliers":
        """No outliers."""
        return cls(torch.zeros(N + 1, dtype=torch.int32, device=device), torch.zeros(0, dtype=torch.uint16, device=device),
                   torch.zeros(0, dtype=torch.float16, device=device), (N, K))

    @classmethod
    def vstack(cls, parts: list["SparseOutliers"]) -> "SparseOutliers":
        """The outliers of layers stacked row-wise (fused q/k/v, gate/up): ``[sum of N, K]``, parts in order.

        Raises:
            ValueError: no parts, or parts with different K.
        """
        if not parts or len({o.shape[1] for o in parts}) != 1:
            raise ValueError(f"lorakern: vstack needs one or more outlier sets with one K, got "
                             f"{[o.shape for o in parts]}")
        if len(parts) == 1:
            return parts[0]
        offsets = torch.tensor([0] + [o.nnz for o in parts], device=parts[0].device).cumsum(0).to(torch.int32)
        row_ptr = torch.cat([parts[0].row_ptr[:1]] + [o.row_ptr[1:] + off for o, off in zip(parts, offsets)])
        return cls(row_ptr, torch.cat([o.col_idx for o in parts]), torch.cat([o.values for o in parts]),
                   (sum(o.shape[0] for o in parts), parts[0].shape[1]))

    def rows(self) -> torch.Tensor:
        """Row index (int64) of every stored value."""
        counts = (self.row_ptr[1:].to(torch.int64) - self.row_ptr[:-1].to(torch.int64))
        return torch.repeat_interleave(torch.arange(self.shape[0], device=self.device), counts)

    def to_dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense ``[N, K]`` matrix (zeros off the outliers)."""
        out = torch.zeros(self.shape, dtype=dtype, device=self.device)
        out[self.rows(), self.col_idx.to(torch.int64)] = self.values.to(dtype)
        return out

    def to(self, device) -> "SparseOutliers":
        return SparseOutliers(self.row_ptr.to(device), self.col_idx.to(device), self.values.to(device), self.shape)


@dataclass(frozen=True)
class GWQWeight:
    """Dense low-bit weight plus sparse fp16 outliers of the same ``[N, K]``."""

    dense: QuantizedWeight
    outliers: SparseOutliers

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        self.dense.validate()
        self.outliers.validate()
        if self.dense.shape != self.outliers.shape:
            raise ValueError(f"dense weight is {self.dense.shape} but outliers are {self.outliers.shape}")
        if self.dense.device != self.outliers.device:
            raise ValueError(f"dense weight is on {self.dense.device} but outliers on {self.outliers.device}")

    @property
    def shape(self) -> tuple[int, int]:
        return self.dense.shape

    @property
    def bits(self) -> int:
        return self.dense.bits

    @property
    def group_size(self) -> int:
        return self.dense.group_size

    @property
    def device(self) -> torch.device:
        return self.dense.device

    def nbytes(self) -> int:
        return self.dense.nbytes() + self.outliers.nbytes()

    def bits_per_weight(self) -> float:
        """Average stored bits per weight: codes, scales, zeros, outlier values,
        column indices and row pointers."""
        N, K = self.shape
        return 8.0 * self.nbytes() / (N * K)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense ``[N, K]`` weight in plain torch (the reference)."""
        return (self.dense.dequantize(torch.float32) + self.outliers.to_dense(torch.float32)).to(dtype)

    def to(self, device) -> "GWQWeight":
        return GWQWeight(self.dense.to(device), self.outliers.to(device))
