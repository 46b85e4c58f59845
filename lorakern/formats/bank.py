"""The adapter bank's layout: what a layer's slot table and slabs hold, shared by every floor.

A layer bank (:class:`lorakern.multilora.LayerBank`) stores its adapters in eight slabs
(:class:`BankSlabs`) and one int64 slot table ``[num_slots, len(SlotRow._fields)]``, one row per
adapter id (:class:`SlotRow`). The same record is named in the C ABI (``lk_slot_column``,
``lk_slot_kind``, ``lk_bank`` in ``csrc/include/lorakern/lorakern.h``) and in the Triton kernels
(``lorakern/triton/multi_lora.py``); :func:`lorakern._native.native` checks at load time that the
compiled library names the same columns, kinds and bank fields in the same order.

A compressed adapter of rank r with h high components at ``bits_hi`` bits occupies, in the A code
slab, ``h`` rows of ``K * bits_hi / 8`` bytes then ``r - h`` 1-bit rows of ``K / 8`` bytes starting at
``a_off`` (B^T likewise with N at ``b_off``), and rows ``[row, row + r)`` of the fp16 scale / zero
slabs (``K / group_a`` and ``N / group_b`` per row). A dense adapter occupies rows ``[row, row + r)``
of the A ``[rows, K]`` and B^T ``[rows, N]`` slabs. See docs/formats.md, "Adapter bank".
"""
from __future__ import annotations

from enum import IntEnum
from typing import NamedTuple

import torch

__all__ = ["BankSlabs", "BankView", "SlotKind", "SlotRow", "TABLE_COLUMNS", "compressed_code_bytes",
           "slot_nbytes"]


class SlotKind(IntEnum):
    """What a slot holds (``lk_slot_kind`` in C)."""
    EMPTY = 0       #: no adapter (removed, or never filled): a kernel that meets it raises
    DENSE = 1       #: fp32/fp16/bf16 A and B^T rows (rank 0: the adapter does not touch this layer)
    COMPRESSED = 2  #: LoRAQuant codes: h high rows at bits_hi, r - h 1-bit rows


class SlotRow(NamedTuple):
    """One row of the slot table (the columns of ``lk_slot_column`` in C, in order)."""
    kind: int     #: :class:`SlotKind`
    rank: int     #: r (0: no update in this layer)
    row: int      #: first row in the dense slabs (dense) or the scale/zero slabs (compressed)
    h: int        #: compressed: the number of high-precision components
    bits_hi: int  #: compressed: bits of the high components (2, 3, 4 or 8)
    a_off: int    #: compressed: first byte in the A code slab
    b_off: int    #: compressed: first byte in the B^T code slab


TABLE_COLUMNS = SlotRow._fields


class BankSlabs(NamedTuple):
    """The eight slab tensors of a layer bank, in the order the ops take them (``bank`` argument)."""
    a: torch.Tensor          #: dense A rows ``[rows, K]`` (fp32/fp16/bf16)
    bt: torch.Tensor         #: dense B^T rows ``[rows, N]``, same dtype
    qa: torch.Tensor         #: uint8 compressed A codes (flat)
    qa_scales: torch.Tensor  #: fp16 ``[qrows, K / group_a]``
    qa_zeros: torch.Tensor   #: fp16 ``[qrows, K / group_a]``
    qb: torch.Tensor         #: uint8 compressed B^T codes (flat)
    qb_scales: torch.Tensor  #: fp16 ``[qrows, N / group_b]``
    qb_zeros: torch.Tensor   #: fp16 ``[qrows, N / group_b]``


class BankView(NamedTuple):
    """A layer bank as the C++ core reads it (``lk_bank`` in C): addresses and sizes, field for field.

    Built by :func:`lorakern.ops.cpu.bank_view`; the C++ side decodes the table and checks every
    offset against these sizes before a kernel reads a byte (``lk_bank_resolve``)."""
    table: int       #: address of the int64 slot table
    scales: int      #: address of the fp32 per-slot scales
    num_slots: int
    dtype: int       #: lk_dtype of the dense slabs
    group_a: int
    group_b: int
    a: int
    dense_rows: int
    bt: int
    qa: int
    qa_bytes: int
    qa_scales: int
    qa_zeros: int
    qrows: int
    qb: int
    qb_bytes: int
    qb_scales: int
    qb_zeros: int


def compressed_code_bytes(cols: int, rank: int, h: int, bits_hi: int) -> int:
    """Bytes of one compressed factor's codes: h rows of ``cols * bits_hi / 8`` and ``rank - h`` 1-bit rows."""
    return h * (cols * bits_hi // 8) + (rank - h) * (cols // 8)


def slot_nbytes(row: SlotRow, N: int, K: int, dense_element_size: int, group_a: int, group_b: int) -> int:
    """Bytes of adapter weights one slot holds in a ``[N, K]`` layer bank (dense: A and B^T; compressed:
    codes plus fp16 scales and zeros of both factors)."""
    if row.kind == SlotKind.DENSE:
        return row.rank * (N + K) * dense_element_size
    if row.kind == SlotKind.COMPRESSED:
        codes = compressed_code_bytes(K, row.rank, row.h, row.bits_hi) + \
            compressed_code_bytes(N, row.rank, row.h, row.bits_hi)
        return codes + row.rank * 4 * (K // group_a + N // group_b)
    return 0
