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

from dataclasses import dataclass, field

import torch

from ..formats.bank import BankSlabs, SlotKind, SlotRow, TABLE_COLUMNS, compressed_code_bytes, slot_nbytes
from ..formats.lora import CompressedLoRA, LoraAdapter
from .batch import LoRABatch
from ..ops.registry import eager_cpu, eager_helper

__all__ = ["AdapterBank", "LayerBank", "apply_slices", "apply_slices_"]

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
        self._max_rank = 0
        self._fields = None
        self._padded = False

    def __deepcopy__(self, memo):
        """A copy with its own slabs; the caches (raw pointers into these slabs) are not copied."""
        import copy
        new = LayerBank.__new__(LayerBank)
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            new.__dict__[k] = None if k in ("_dev_table", "_fields") else copy.deepcopy(v, memo)
        return new

    @classmethod
    def from_padded(cls, a: torch.Tensor, bt: torch.Tensor, ranks: torch.Tensor, scales: torch.Tensor | float = 1.0
                    ) -> "LayerBank":
        """A bank over slot-major, rank-padded dense adapters (vLLM's stacked LoRA slots), in one copy.

        Args:
            a: ``[S, R, K]`` A of each slot, rows past the slot's rank ignored.
            bt: ``[S, R, N]`` B^T of each slot (same dtype, one of float32/float16/bfloat16).
            ranks: int ``[S]``, each in ``[-1, R]`` (0: the slot adds nothing to this layer; -1: the slot is left
                empty, for :meth:`set` to fill, e.g. with a compressed adapter).
            scales: the slots' scales (a float, or fp32 ``[S]``).

        Slot ``s`` uses rows ``[s*R, s*R + ranks[s])`` of the dense slabs. Only the empty slots may be
        :meth:`set` afterwards, and only with compressed adapters (the dense slabs have no free rows).

        Raises:
            ValueError / TypeError: shapes, dtypes or ranks that do not fit.
        """
        if a.dim() != 3 or bt.dim() != 3 or a.shape[:2] != bt.shape[:2] or a.dtype != bt.dtype:
            raise ValueError(f"lorakern: from_padded needs A [S, R, K] and B^T [S, R, N] of one dtype, got "
                             f"{a.dtype} {tuple(a.shape)} / {bt.dtype} {tuple(bt.shape)}")
        S, R, K = a.shape
        N = bt.shape[2]
        ranks = torch.as_tensor(ranks, dtype=torch.int64).cpu()
        if tuple(ranks.shape) != (S,) or bool((ranks < -1).any()) or bool((ranks > R).any()):
            raise ValueError(f"lorakern: ranks must be {S} integers in [-1, {R}], got {ranks.tolist()}")
        lb = cls(N, K, a.dtype, a.device)
        lb.dense.tensors = [a.reshape(S * R, K).clone(memory_format=torch.contiguous_format),
                            bt.reshape(S * R, N).clone(memory_format=torch.contiguous_format)]
        lb._padded = True  # the dense slabs have no free rows: set() takes compressed adapters only
        lb.dense.used = S * R
        lb.dense.free = []
        table = torch.zeros(S, len(TABLE_COLUMNS), dtype=torch.int64)
        table[:, TABLE_COLUMNS.index("kind")] = torch.where(ranks >= 0, int(SlotKind.DENSE), int(SlotKind.EMPTY))
        table[:, TABLE_COLUMNS.index("rank")] = ranks.clamp_min(0)
        table[:, TABLE_COLUMNS.index("row")] = torch.where(ranks >= 0, torch.arange(S, dtype=torch.int64) * R, 0)
        lb.table = table
        if isinstance(scales, (int, float)):
            lb.scales = torch.full((S,), float(scales), dtype=torch.float32)
        else:
            lb.scales = torch.as_tensor(scales, dtype=torch.float32).cpu().clone()
            if tuple(lb.scales.shape) != (S,):
                raise ValueError(f"lorakern: scales must be a float or [{S}], got {tuple(lb.scales.shape)}")
        lb._changed()
        return lb

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
        self._fields = None
        live = self.table[:, TABLE_COLUMNS.index("kind")] != SlotKind.EMPTY
        ranks = self.table[live, TABLE_COLUMNS.index("rank")]
        self._max_rank = int(ranks.max()) if bool(live.any()) else 0

    @property
    def num_slots(self) -> int:
        return self.table.shape[0]

    def row(self, slot: int) -> SlotRow:
        """The slot's table row (all zeros, i.e. empty, past the table's end)."""
        if slot >= self.num_slots:
            return SlotRow(SlotKind.EMPTY, 0, 0, 0, 0, 0, 0)
        return SlotRow(*(int(v) for v in self.table[slot].tolist()))

    def rank(self, slot: int) -> int:
        return self.row(slot).rank

    def max_rank(self) -> int:
        """The largest rank among the live adapters (the intermediate's width); kept up to date by every
        change, so that reading it inside torch.compile is a constant, never a tensor-to-int conversion."""
        return self._max_rank

    def _write(self, slot: int, row: SlotRow, scale: float) -> None:
        self._ensure_slot(slot)
        self.table[slot] = torch.tensor(row)
        self.scales[slot] = scale

    def set(self, slot: int, adapter) -> None:
        """Store ``adapter`` in ``slot``: a dense adapter (an object with ``A [r, K]``, ``B [N, r]`` and
        ``scale``, e.g. :class:`~lorakern.adapters.LoraLayer`), a :class:`~lorakern.quant.CompressedLoRA`,
        or None (the adapter does not touch this layer: rank 0)."""
        if self.row(slot).kind != SlotKind.EMPTY:
            raise ValueError(f"lorakern: slot {slot} is in use; clear it first")
        if adapter is None:
            self._write(slot, SlotRow(SlotKind.DENSE, 0, 0, 0, 0, 0, 0), 0.0)
        elif isinstance(adapter, CompressedLoRA):
            self._set_compressed(slot, adapter)
        else:
            self._set_dense(slot, adapter)
        self._changed()

    def _set_dense(self, slot, ad):
        if self._padded:
            raise ValueError("lorakern: a bank built by from_padded takes only compressed adapters in its empty slots "
                             "(rebuild it to change dense ones)")
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
        self._write(slot, SlotRow(SlotKind.DENSE, r, row, 0, 0, 0, 0), scale)

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
        p = c.parts()  # a_hi, b_hi, a_lo, b_lo: (codes, scales, zeros) each; high rows, then 1-bit rows
        row = self.qrows.alloc(r)
        na, nb = compressed_code_bytes(self.K, r, h, bits), compressed_code_bytes(self.N, r, h, bits)
        aoff, boff = self.qa.alloc(na), self.qb.alloc(nb)
        qas, qaz, qbs, qbz = self.qrows.tensors
        dev = self.device
        self.qa.tensors[0][aoff: aoff + na] = torch.cat([p.a_hi[0].reshape(-1), p.a_lo[0].reshape(-1)]).to(dev)
        self.qb.tensors[0][boff: boff + nb] = torch.cat([p.b_hi[0].reshape(-1), p.b_lo[0].reshape(-1)]).to(dev)
        qas[row: row + r] = torch.cat([p.a_hi[1], p.a_lo[1]]).to(dev)
        qaz[row: row + r] = torch.cat([p.a_hi[2], p.a_lo[2]]).to(dev)
        qbs[row: row + r] = torch.cat([p.b_hi[1], p.b_lo[1]]).to(dev)
        qbz[row: row + r] = torch.cat([p.b_hi[2], p.b_lo[2]]).to(dev)
        self._write(slot, SlotRow(SlotKind.COMPRESSED, r, row, h, bits, aoff, boff), float(c.scale))

    def clear(self, slot: int) -> None:
        """Free the slot's rows and mark it empty (a kernel that meets it raises)."""
        if slot >= self.num_slots:
            return
        t = self.row(slot)
        if t.kind == SlotKind.DENSE:
            self.dense.release(t.row, t.rank)
        elif t.kind == SlotKind.COMPRESSED:
            self.qrows.release(t.row, t.rank)
            self.qa.release(t.a_off, compressed_code_bytes(self.K, t.rank, t.h, t.bits_hi))
            self.qb.release(t.b_off, compressed_code_bytes(self.N, t.rank, t.h, t.bits_hi))
        self.table[slot] = 0
        self.scales[slot] = 0.0
        self._changed()

    # ---- what the ops take -------------------------------------------------------------------------
    def slabs(self) -> BankSlabs:
        """The eight slabs (:class:`~lorakern.formats.bank.BankSlabs`, the ops' ``bank`` argument)."""
        q = self.qrows.tensors if self.qrows is not None else \
            [torch.zeros(0, 1, dtype=torch.float16, device=self.device)] * 4
        return BankSlabs(*self.dense.tensors, self.qa.tensors[0], q[0], q[1], self.qb.tensors[0], q[2], q[3])

    def op_args(self) -> tuple:
        """``(bank, table, scales, group_a, group_b)`` as the ops take them, on the bank's device."""
        if self._dev_table is None:
            if self.device.type == "cpu":
                self._dev_table = (self.table, self.scales)
            else:
                self._dev_table = (self.table.to(self.device), self.scales.to(self.device))
        return (list(self.slabs()), *self._dev_table, self.group_a, self.group_b)

    def apply(self, x: torch.Tensor, base: torch.Tensor, batch) -> torch.Tensor:
        """``base + the batch's adapters applied to x`` (x ``[T, K]``, base ``[T, N]``): the C++ kernel
        directly for eager CPU calls (the bank's pointers prepared once per change), otherwise
        ``torch.ops.lorakern.multi_lora``."""
        if eager_cpu(x) and self.device.type == "cpu":
            return self.prepared().multi_lora(self.N, self.K, x, base, batch)
        if torch.compiler.is_compiling():  # launch hints as constants: no recompile per batch composition
            return torch.ops.lorakern.multi_lora(x, base, *self.op_args(), *batch.op_args(), self.max_rank(), -1, True)
        return torch.ops.lorakern.multi_lora(x, base, *self.op_args(), *batch.op_args(), self.max_rank(),
                                             batch.max_count, batch.mixture)

    def apply_(self, x: torch.Tensor, y: torch.Tensor, batch) -> torch.Tensor:
        """``y += the batch's adapters applied to x`` in place (x ``[T, K]``, y ``[T, N]``, one dtype); returns ``y``.
        Eager CPU calls with a contiguous y write into it directly (no new output tensor and no copy: vLLM's LoRA
        layers add into their base output this way; fp16/bf16 still go through an fp32 work buffer inside the
        C++ core); otherwise ``y.copy_(apply(x, y, batch))``.

        Raises:
            ValueError: y overlaps x (direct path), or what :meth:`apply` raises.
            RuntimeError: y requires grad (direct path)."""
        if eager_cpu(x) and self.device.type == "cpu" and y.is_contiguous():
            return self.prepared().multi_lora(self.N, self.K, x, y, batch, inplace=True)
        return y.copy_(self.apply(x, y, batch))

    def prepared(self):
        """The bank's pointers for eager CPU calls (``lorakern.ops.cpu.PreparedBank``), checked once per change."""
        if self._fields is None:
            self._fields = eager_helper("prepared_bank")(*self.op_args())
        return self._fields

    def nbytes(self, slot: int) -> int:
        """Bytes of adapter weights the slot holds (dense: A and B; compressed: codes, scales, zeros)."""
        return slot_nbytes(self.row(slot), self.N, self.K, self.dense.tensors[0].element_size(), self.group_a,
                           self.group_b)


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

        ``adapter``: a :class:`~lorakern.formats.lora.LoraAdapter` or a dict ``{module name: LoraLayer |
        CompressedLoRA}`` (files: :func:`lorakern.adapters.load_adapter`, or the bank that
        :func:`lorakern.attach_adapters` gives a model, which loads paths itself). Every layer is checked
        before the bank changes.

        Raises:
            ValueError: a bad or duplicate name, layers the bank does not know or that do not fit, NaN/Inf
                weights, or base-weight copies that :meth:`check_base_weights` refuses.
            TypeError: ``adapter`` is neither a LoraAdapter nor a dict.
        """
        if not isinstance(name, str) or not name or name == "__base__":
            raise ValueError(f"lorakern: adapter name must be a non-empty string other than '__base__', got {name!r}")
        if name in self._by_name:
            raise ValueError(f"lorakern: an adapter named {name!r} is already loaded; remove it first")
        layers = self.adapter_layers(adapter, name)
        self.check_layers(name, layers)
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

    def adapter_layers(self, adapter, name: str) -> dict:
        """``{module: layer}`` of an in-memory adapter; a LoraAdapter's base-weight copies go through
        :meth:`check_base_weights` first."""
        if isinstance(adapter, LoraAdapter):
            if adapter.base_weights:
                self.check_base_weights(adapter, name)
            return dict(adapter.layers)
        if isinstance(adapter, dict):
            return dict(adapter)
        raise TypeError(f"lorakern: adapter {name!r}: expected a LoraAdapter or a dict of module name -> layer, got "
                        f"{type(adapter).__name__} (load files with lorakern.adapters.load_adapter)")

    def check_base_weights(self, adapter: LoraAdapter, name: str) -> None:
        """Base-weight copies (PEFT's saved ``lm_head`` / ``embed_tokens``) need the model to be checked
        against: a bare bank refuses them; the bank :func:`lorakern.attach_adapters` makes checks them."""
        raise ValueError(f"lorakern: adapter {name!r} carries copies of base weights ({sorted(adapter.base_weights)}) "
                         "that must be checked against the model: add it through attach_adapters")

    def check_layers(self, name: str, layers: dict) -> None:
        """Check that every layer of an adapter is one of the bank's and fits it (nothing changes)."""
        unknown = sorted(set(layers) - set(self.layers))
        if unknown:
            raise ValueError(f"lorakern: adapter {name!r} has layers the bank does not know: {unknown[:4]}"
                             f"{' ...' if len(unknown) > 4 else ''}")
        for lname, layer in layers.items():
            lb = self.layers[lname]
            if isinstance(layer, CompressedLoRA):
                if layer.shape != (lb.N, lb.K):
                    raise ValueError(f"lorakern: {lname}: compressed adapter for {layer.shape}, layer is {(lb.N, lb.K)}")
                if lb.qrows is not None and layer.group_sizes != (lb.group_a, lb.group_b):
                    raise ValueError(f"lorakern: {lname}: groups {layer.group_sizes} differ from the bank's "
                                     f"{(lb.group_a, lb.group_b)}")
                continue
            A, B = layer.A, layer.B
            if A.dim() != 2 or B.dim() != 2 or A.shape[1] != lb.K or B.shape[0] != lb.N or A.shape[0] != B.shape[1]:
                raise ValueError(f"lorakern: {lname}: A {tuple(A.shape)} / B {tuple(B.shape)} do not fit "
                                 f"{(lb.N, lb.K)}")

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
        return LoRABatch.build(self, adapters, weights, device=device or self.device)


def apply_slices_(banks: list, x: torch.Tensor, y: torch.Tensor, batch) -> torch.Tensor:
    """:func:`apply_slices` added into ``y`` ``[T, sum of N]`` in place; returns ``y``. Eager CPU calls with a
    contiguous y write into it directly (see :meth:`LayerBank.apply_`: y must not overlap x nor require grad), others
    copy the result in. A failure in the C++ core (out of memory) can leave some slices added."""
    if eager_cpu(x) and all(lb.device.type == "cpu" for lb in banks) and y.is_contiguous():
        return eager_helper("multi_lora_slices_prepared")(banks, x, y, batch, inplace=True)
    return y.copy_(apply_slices(banks, x, y, batch))


def apply_slices(banks: list, x: torch.Tensor, base: torch.Tensor, batch) -> torch.Tensor:
    """Several layers that read the same input (q/k/v of different widths) in one call:
    ``base [T, sum of N]`` plus each bank's adapters in its own columns (``torch.ops.lorakern.multi_lora_slices``).
    ``banks``: LayerBanks of one AdapterBank (the batch's ids mean the same adapter in each)."""
    if eager_cpu(x) and all(lb.device.type == "cpu" for lb in banks):  # pointers prepared once per bank change
        return eager_helper("multi_lora_slices_prepared")(banks, x, base, batch)
    args = [lb.op_args() for lb in banks]
    return torch.ops.lorakern.multi_lora_slices(
        x, base, [t for a in args for t in a[0]], [a[1] for a in args], [a[2] for a in args],
        [a[3] for a in args], [a[4] for a in args], *batch.op_args(), max(lb.max_rank() for lb in banks),
        batch.max_count, batch.mixture)
