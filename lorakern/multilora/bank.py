"""AdapterBank: many LoRA adapters per layer in slab storage, added and removed at run time.

Each layer of the model gets a :class:`LayerBank`: dense adapters (fp32/fp16/bf16) live in two
slabs ``A [rows, K]`` and ``B^T [rows, N]``; compressed (LoRAQuant) adapters in byte slabs of
packed codes plus fp16 scale/zero slabs. An adapter occupies exactly its own rows (no padding to
the largest rank); a slot table (one row per adapter id) holds its kind, rank and offsets. The
kernels (``torch.ops.lorakern.lora_shrink`` / ``lora_expand`` / ``multi_lora``) read the slabs
through the table. Adding an adapter appends (or reuses freed rows); removing one frees its rows
and marks its slot empty; no other adapter moves except when a slab grows (one copy, amortized).

Adapter ids are never reused: a batch built before ``remove`` that still names the removed adapter
gets a clear error instead of silently running another adapter.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..quant.loraquant import CompressedLoRA

__all__ = ["AdapterBank", "LayerBank", "apply_slices", "KIND_EMPTY", "KIND_DENSE", "KIND_COMPRESSED", "TABLE_COLUMNS"]

KIND_EMPTY, KIND_DENSE, KIND_COMPRESSED = 0, 1, 2
TABLE_COLUMNS = ("kind", "rank", "row", "h", "bits_hi", "a_off", "b_off")
DENSE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class _Slab:
    """Rows of fixed widths in growable tensors sharing one row allocation (first fit over freed ranges)."""

    def __init__(self, columns: list[tuple[int, torch.dtype]], device, flat: bool = False):
        self.columns, self.device, self.flat = columns, torch.device(device), flat
        self.tensors = [self._empty(0, w, dt) for w, dt in columns]
        self.used, self.free = 0, []  # free: sorted list of [start, length]

    def _empty(self, rows, w, dt):
        return torch.zeros(rows, dtype=dt, device=self.device) if self.flat else \
            torch.zeros(rows, w, dtype=dt, device=self.device)

    @property
    def capacity(self) -> int:
        return self.tensors[0].shape[0]

    def alloc(self, n: int) -> int:
        if n == 0:
            return 0
        for i, (s, m) in enumerate(self.free):
            if m >= n:
                if m == n:
                    self.free.pop(i)
                else:
                    self.free[i] = [s + n, m - n]
                return s
        if self.used + n > self.capacity:
            cap = max(2 * self.capacity, self.used + n, 64)
            grown = []
            for t, (w, dt) in zip(self.tensors, self.columns):
                g = self._empty(cap, w, dt)
                g[: self.used] = t[: self.used]
                grown.append(g)
            self.tensors = grown
        s, self.used = self.used, self.used + n
        return s

    def release(self, s: int, n: int) -> None:
        if n == 0:
            return
        self.free.append([s, n])
        self.free.sort()
        merged = []
        for a, m in self.free:
            if merged and merged[-1][0] + merged[-1][1] == a:
                merged[-1][1] += m
            else:
                merged.append([a, m])
        if merged and merged[-1][0] + merged[-1][1] == self.used:  # a free tail shrinks the used part
            self.used = merged.pop()[0]
        self.free = merged


def _row_bytes(cols: int, bits: int) -> int:
    return cols * bits // 8


class LayerBank:
    """The adapters of one linear layer ``[N, K]`` (out_features, in_features).

    Args:
        N, K: the layer's output and input features.
        dtype: storage dtype of dense adapters (float16 by default).
        device: where the slabs live (the layer's device).

    Compressed adapters of one layer must share their group sizes along K and N (set by the first
    one added; LoRAQuant's default ``lora_group_size`` depends only on the layer's shape).
    """

    def __init__(self, N: int, K: int, dtype: torch.dtype = torch.float16, device="cpu"):
        if dtype not in DENSE_DTYPES:
            raise TypeError(f"lorakern: bank dtype must be float32, float16 or bfloat16, got {dtype}")
        self.N, self.K, self.dtype, self.device = int(N), int(K), dtype, torch.device(device)
        self.dense = _Slab([(self.K, dtype), (self.N, dtype)], device)
        self.qa = _Slab([(1, torch.uint8)], device, flat=True)
        self.qb = _Slab([(1, torch.uint8)], device, flat=True)
        self.qrows = None  # _Slab of A and B^T scales/zeros, made with the first compressed adapter
        self.group_a = self.group_b = 0
        self.table = torch.zeros(0, len(TABLE_COLUMNS), dtype=torch.int64)  # host copy
        self.scales = torch.zeros(0, dtype=torch.float32)
        self.version = 0
        self._dev_table = None
        self._max_rank = None
        self._fields = None

    def __deepcopy__(self, memo):
        """A copy with its own slabs; the caches (raw pointers into these slabs) are not copied."""
        import copy
        new = LayerBank.__new__(LayerBank)
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            new.__dict__[k] = None if k in ("_dev_table", "_max_rank", "_fields") else copy.deepcopy(v, memo)
        return new

    # ---- slots -------------------------------------------------------------------------------------
    def _ensure_slot(self, slot: int) -> None:
        if slot >= self.table.shape[0]:
            cap = max(2 * self.table.shape[0], slot + 1, 16)
            t = torch.zeros(cap, len(TABLE_COLUMNS), dtype=torch.int64)
            t[: self.table.shape[0]] = self.table
            s = torch.zeros(cap, dtype=torch.float32)
            s[: self.scales.shape[0]] = self.scales
            self.table, self.scales = t, s

    def _changed(self):
        self.version += 1
        self._dev_table = None
        self._max_rank = None
        self._fields = None

    @property
    def num_slots(self) -> int:
        return self.table.shape[0]

    def rank(self, slot: int) -> int:
        return int(self.table[slot, 1]) if slot < self.num_slots else 0

    def max_rank(self) -> int:
        """The largest rank among the live adapters (the intermediate's width)."""
        if self._max_rank is None:
            live = self.table[:, 0] != KIND_EMPTY
            self._max_rank = int(self.table[live, 1].max()) if bool(live.any()) else 0
        return self._max_rank

    def set(self, slot: int, adapter) -> None:
        """Store ``adapter`` in ``slot``: a dense adapter (an object with ``A [r, K]``, ``B [N, r]`` and
        ``scale``, e.g. :class:`~lorakern.adapters.LoraLayer`), a :class:`~lorakern.quant.CompressedLoRA`,
        or None (the adapter does not touch this layer: rank 0)."""
        if slot < self.num_slots and int(self.table[slot, 0]) != KIND_EMPTY:
            raise ValueError(f"lorakern: slot {slot} is in use; clear it first")
        if adapter is None:
            self._ensure_slot(slot)
            self.table[slot] = torch.tensor([KIND_DENSE, 0, 0, 0, 0, 0, 0])
            self.scales[slot] = 0.0
        elif isinstance(adapter, CompressedLoRA):
            self._set_compressed(slot, adapter)
        else:
            self._set_dense(slot, adapter)
        self._changed()

    def _set_dense(self, slot, ad):
        A, B, scale = ad.A, ad.B, float(ad.scale)
        if A.dim() != 2 or B.dim() != 2 or A.shape[1] != self.K or B.shape[0] != self.N or A.shape[0] != B.shape[1]:
            raise ValueError(f"lorakern: adapter A {tuple(A.shape)} / B {tuple(B.shape)} does not fit a "
                             f"{self.K} -> {self.N} layer")
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()) or scale != scale or abs(scale) == float("inf"):
            raise ValueError("lorakern: adapter weights or scale contain NaN or Inf")
        r = A.shape[0]
        row = self.dense.alloc(r)
        a, bt = self.dense.tensors
        a[row: row + r] = A.detach().to(self.device, self.dtype)
        bt[row: row + r] = B.detach().t().to(self.device, self.dtype)
        self._ensure_slot(slot)
        self.table[slot] = torch.tensor([KIND_DENSE, r, row, 0, 0, 0, 0])
        self.scales[slot] = scale

    def _set_compressed(self, slot, c: CompressedLoRA):
        if c.shape != (self.N, self.K):
            raise ValueError(f"lorakern: compressed adapter is for a {c.shape} layer, the bank's is {(self.N, self.K)}")
        ga, gb = c.group_sizes
        if self.qrows is None:
            self.group_a, self.group_b = ga, gb
            self.qrows = _Slab([(self.K // ga, torch.float16)] * 2 + [(self.N // gb, torch.float16)] * 2, self.device)
        elif (ga, gb) != (self.group_a, self.group_b):
            raise ValueError(f"lorakern: this layer's compressed adapters use groups {(self.group_a, self.group_b)}, "
                             f"the new one {(ga, gb)}: compress it with the same group sizes")
        r, h, bits = c.rank, c.h, c.bits_high
        parts = c.op_tensors()  # a_hi, b_hi, a_lo, b_lo: (codes, scales, zeros) each
        row = self.qrows.alloc(r)
        na = h * _row_bytes(self.K, bits) + (r - h) * _row_bytes(self.K, 1)
        nb = h * _row_bytes(self.N, bits) + (r - h) * _row_bytes(self.N, 1)
        aoff, boff = self.qa.alloc(na), self.qb.alloc(nb)
        qa, qb = self.qa.tensors[0], self.qb.tensors[0]
        qas, qaz, qbs, qbz = self.qrows.tensors
        dev = self.device
        qa[aoff: aoff + na] = torch.cat([parts[0].reshape(-1), parts[6].reshape(-1)]).to(dev)
        qb[boff: boff + nb] = torch.cat([parts[3].reshape(-1), parts[9].reshape(-1)]).to(dev)
        qas[row: row + r] = torch.cat([parts[1], parts[7]]).to(dev)
        qaz[row: row + r] = torch.cat([parts[2], parts[8]]).to(dev)
        qbs[row: row + r] = torch.cat([parts[4], parts[10]]).to(dev)
        qbz[row: row + r] = torch.cat([parts[5], parts[11]]).to(dev)
        self._ensure_slot(slot)
        self.table[slot] = torch.tensor([KIND_COMPRESSED, r, row, h, bits, aoff, boff])
        self.scales[slot] = float(c.scale)

    def clear(self, slot: int) -> None:
        """Free the slot's rows and mark it empty (a kernel that meets it raises)."""
        if slot >= self.num_slots:
            return
        kind, r, row, h, bits, aoff, boff = (int(v) for v in self.table[slot])
        if kind == KIND_DENSE:
            self.dense.release(row, r)
        elif kind == KIND_COMPRESSED:
            self.qrows.release(row, r)
            self.qa.release(aoff, h * _row_bytes(self.K, bits) + (r - h) * _row_bytes(self.K, 1))
            self.qb.release(boff, h * _row_bytes(self.N, bits) + (r - h) * _row_bytes(self.N, 1))
        self.table[slot] = 0
        self.scales[slot] = 0.0
        self._changed()

    # ---- what the ops take -------------------------------------------------------------------------
    def slabs(self) -> list[torch.Tensor]:
        """``[A, B^T, A codes, A scales, A zeros, B^T codes, B^T scales, B^T zeros]`` (the ops' ``bank``)."""
        q = self.qrows.tensors if self.qrows is not None else \
            [torch.zeros(0, 1, dtype=torch.float16, device=self.device)] * 4
        return [*self.dense.tensors, self.qa.tensors[0], q[0], q[1], self.qb.tensors[0], q[2], q[3]]

    def op_args(self) -> tuple:
        """``(bank, table, scales, group_a, group_b)`` as the ops take them, on the bank's device."""
        if self._dev_table is None:
            if self.device.type == "cpu":
                self._dev_table = (self.table, self.scales)
            else:
                self._dev_table = (self.table.to(self.device), self.scales.to(self.device))
        return (self.slabs(), *self._dev_table, self.group_a, self.group_b)

    def apply(self, x: torch.Tensor, base: torch.Tensor, batch) -> torch.Tensor:
        """``base + the batch's adapters applied to x`` (x ``[T, K]``, base ``[T, N]``): the C++ kernel
        directly for eager CPU calls (the bank's pointers prepared once per change), otherwise
        ``torch.ops.lorakern.multi_lora``."""
        if x.device.type == "cpu" and self.device.type == "cpu" and type(x) is torch.Tensor \
                and not torch.compiler.is_compiling():
            from ..ops.cpu import bank_fields, multi_lora_prepared
            if self._fields is None:
                self._fields = bank_fields(*self.op_args())
            return multi_lora_prepared(self._fields, self.N, self.K, x, base, batch)
        return torch.ops.lorakern.multi_lora(x, base, *self.op_args(), *batch.op_args(), self.max_rank(),
                                             batch.max_count, batch.mixture)

    def nbytes(self, slot: int) -> int:
        """Bytes of adapter weights the slot holds (dense: A and B; compressed: codes, scales, zeros)."""
        kind, r, row, h, bits, _, _ = (int(v) for v in self.table[slot])
        if kind == KIND_DENSE:
            return r * (self.N + self.K) * self.dense.tensors[0].element_size()
        if kind == KIND_COMPRESSED:
            codes = h * (_row_bytes(self.K, bits) + _row_bytes(self.N, bits)) + \
                (r - h) * (_row_bytes(self.K, 1) + _row_bytes(self.N, 1))
            return codes + r * 4 * (self.K // self.group_a + self.N // self.group_b)
        return 0


@dataclass
class _Entry:
    name: str
    id: int
    layers: list = field(default_factory=list)


class AdapterBank:
    """Many adapters for a model's linear layers, one :class:`LayerBank` per layer, one id per adapter
    shared by every layer.

    Args:
        layers: ``{module name: (out_features, in_features)}`` of the layers adapters may touch
            (:func:`lorakern.attach_adapters` fills it from the model).
        dtype: storage dtype of dense adapters.
        device: the slabs' device.
    """

    def __init__(self, layers: dict[str, tuple[int, int]] | None = None, dtype: torch.dtype = torch.float16,
                 device="cpu"):
        self.dtype, self.device = dtype, torch.device(device)
        self.layers: dict[str, LayerBank] = {}
        self._by_name: dict[str, _Entry] = {}
        self._next_id = 0
        #: checks the base-weight copies a PEFT adapter carries (lm_head, embed_tokens) against the model;
        #: set by :func:`lorakern.attach_adapters`. With none, such adapters are refused.
        self.base_weight_check = None
        for name, (N, K) in (layers or {}).items():
            self.add_layer(name, N, K)

    def add_layer(self, name: str, N: int, K: int) -> LayerBank:
        if name in self.layers:
            raise ValueError(f"lorakern: layer {name!r} is already in the bank")
        lb = self.layers[name] = LayerBank(N, K, self.dtype, self.device)
        for e in self._by_name.values():  # existing adapters do not touch the new layer
            lb.set(e.id, None)
        return lb

    @property
    def num_slots(self) -> int:
        return self._next_id

    @property
    def names(self) -> list[str]:
        return list(self._by_name)

    def id(self, name: str) -> int:
        """The id of a loaded adapter (``KeyError`` naming the loaded ones if unknown)."""
        try:
            return self._by_name[name].id
        except KeyError:
            raise KeyError(f"lorakern: no adapter {name!r} in the bank (loaded: {sorted(self._by_name)})") from None

    def live(self) -> torch.Tensor:
        """bool ``[num_slots]``: which ids hold an adapter."""
        m = torch.zeros(self._next_id, dtype=torch.bool)
        for e in self._by_name.values():
            m[e.id] = True
        return m

    def add(self, name: str, adapter) -> int:
        """Add an adapter under ``name``; returns its id.

        ``adapter``: a :class:`~lorakern.adapters.LoraAdapter`, a dict ``{module name: LoraLayer |
        CompressedLoRA}``, a PEFT adapter directory, or a compressed adapter file/directory
        (``lorakern compress-adapter``). Every layer is checked before the bank changes.
        """
        if not isinstance(name, str) or not name or name == "__base__":
            raise ValueError(f"lorakern: adapter name must be a non-empty string other than '__base__', got {name!r}")
        if name in self._by_name:
            raise ValueError(f"lorakern: an adapter named {name!r} is already loaded; remove it first")
        layers = _adapter_layers(adapter, name, self.base_weight_check)
        unknown = sorted(set(layers) - set(self.layers))
        if unknown:
            raise ValueError(f"lorakern: adapter {name!r} has layers the bank does not know: {unknown[:4]}"
                             f"{' ...' if len(unknown) > 4 else ''}")
        for lname, layer in layers.items():  # validate every layer before changing any
            _check_fits(self.layers[lname], layer, lname)
        slot = self._next_id
        done = []
        try:
            for lname, lb in self.layers.items():
                lb.set(slot, layers.get(lname))
                done.append(lb)
        except Exception:
            for lb in done:
                lb.clear(slot)
            raise
        self._next_id += 1
        self._by_name[name] = _Entry(name, slot, list(layers))
        return slot

    def remove(self, name: str) -> None:
        """Remove an adapter: its rows are freed in every layer and its id is retired."""
        e = self._by_name.pop(name, None)
        if e is None:
            raise KeyError(f"lorakern: no adapter {name!r} in the bank")
        for lb in self.layers.values():
            lb.clear(e.id)

    def nbytes(self, name: str) -> int:
        """Bytes of the adapter's weights over all layers."""
        i = self.id(name)
        return sum(lb.nbytes(i) for lb in self.layers.values())

    def batch(self, adapters, weights=None, device=None):
        """A :class:`~lorakern.multilora.LoRABatch` for per-token adapters: names or ids (``None``,
        ``'__base__'`` or -1: no adapter), or ``[T, k]`` ids with ``weights [T, k]`` for mixtures."""
        from .batch import LoRABatch
        return LoRABatch.build(self, adapters, weights, device=device or self.device)


def _adapter_layers(adapter, name: str = "the adapter", base_weight_check=None) -> dict:
    """``{module: layer}`` of an in-memory adapter or a file (loaded by :func:`lorakern.adapters.load_adapter`).
    An adapter carrying base-weight copies goes through ``base_weight_check(adapter, name)`` (or is refused)."""
    from ..adapters.loading import load_adapter  # adapters imports the bank: load lazily
    from ..adapters.peft_io import LoraAdapter
    adapter = load_adapter(adapter)
    if isinstance(adapter, LoraAdapter):
        if adapter.base_weights:
            if base_weight_check is None:
                raise ValueError(f"lorakern: {name} carries copies of base weights ({sorted(adapter.base_weights)}) "
                                 "that must be checked against the model: add it through attach_adapters")
            base_weight_check(adapter, name)
        return dict(adapter.layers)
    return dict(adapter)


def _check_fits(lb: LayerBank, layer, lname: str) -> None:
    if isinstance(layer, CompressedLoRA):
        if layer.shape != (lb.N, lb.K):
            raise ValueError(f"lorakern: {lname}: compressed adapter for {layer.shape}, layer is {(lb.N, lb.K)}")
        if lb.qrows is not None and layer.group_sizes != (lb.group_a, lb.group_b):
            raise ValueError(f"lorakern: {lname}: groups {layer.group_sizes} differ from the bank's "
                             f"{(lb.group_a, lb.group_b)}")
        return
    A, B = layer.A, layer.B
    if A.dim() != 2 or B.dim() != 2 or tuple(A.shape) [1:] != (lb.K,) or B.shape[0] != lb.N or A.shape[0] != B.shape[1]:
        raise ValueError(f"lorakern: {lname}: A {tuple(A.shape)} / B {tuple(B.shape)} do not fit {(lb.N, lb.K)}")


def apply_slices(banks: list, x: torch.Tensor, base: torch.Tensor, batch) -> torch.Tensor:
    """Several layers that read the same input (q/k/v of different widths) in one call:
    ``base [T, sum of N]`` plus each bank's adapters in its own columns (``torch.ops.lorakern.multi_lora_slices``).
    ``banks``: LayerBanks of one AdapterBank (the batch's ids mean the same adapter in each)."""
    args = [lb.op_args() for lb in banks]
    return torch.ops.lorakern.multi_lora_slices(
        x, base, [t for a in args for t in a[0]], [a[1] for a in args], [a[2] for a in args],
        [a[3] for a in args], [a[4] for a in args], *batch.op_args(), max(lb.max_rank() for lb in banks),
        batch.max_count, batch.mixture)
