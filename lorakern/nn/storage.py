"""Buffers that hold a storage format (packed codes, fp16 scales and zeros, fp32 biases of the kernels):
``model.to(dtype)`` / ``.half()`` / ``.bfloat16()`` must not convert them (the kernels read exactly these
dtypes; the compute dtype follows the activations), while device moves must carry them along."""
from __future__ import annotations

from torch import nn

__all__ = ["FormatBuffers"]


class FormatBuffers(nn.Module):
    """Mixin: the buffers named by :meth:`format_buffer_names` keep their dtype under ``_apply``
    (``.to(dtype)``, ``.half()``, ...) and follow device moves."""

    def format_buffer_names(self) -> tuple[str, ...]:
        return tuple(self._buffers)

    def _apply(self, fn, recurse=True):
        keep = {n: self._buffers[n] for n in self.format_buffer_names() if self._buffers.get(n) is not None}
        for n in keep:
            self._buffers[n] = None
        try:
            super()._apply(fn, recurse)
        finally:
            for n, t in keep.items():
                moved = fn(t)
                self._buffers[n] = moved if moved.dtype == t.dtype else t.to(moved.device)
        return self
