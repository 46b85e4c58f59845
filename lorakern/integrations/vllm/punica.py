"""vLLM's LoRA backend ("punica wrapper") on lorakern's multi-adapter kernels.

vLLM keeps every LoRA layer's adapters in stacked slot tensors, one per output slice:
A ``[max_loras, 1, max_rank, K]`` and B ``[max_loras, 1, N_slice, max_rank]`` (ranks zero-padded, alpha/r
folded into B). This wrapper turns each layer's slots into lorakern :class:`~lorakern.multilora.LayerBank`\\ s
(one copy, with each slot's true rank) when vLLM writes a slot (``tensor._version`` changes: an adapter
loaded or evicted), never per step, and applies all slices of a fused layer (q/k/v, gate/up) in one call of the
C++ core (``multi_lora_slices``, through :func:`~lorakern.multilora.apply_slices_`: added into vLLM's base output in
place). A token without an adapter (index -1) gets none, also when
every slot is full (stock vLLM's CPU path reads the last slot for it).

Which method does what:

* ``add_lora_linear`` (every linear layer; the hot path): lorakern's kernels.
* ``add_lora_logits`` (an adapter on lm_head): lorakern's kernels over the vocabulary; free when no loaded
  adapter touches lm_head (every slot then has rank 0 and the call returns at once).
* ``add_shrink`` / ``add_expand`` (called directly only by vLLM's fully-sharded tensor-parallel layers) and
  ``add_lora_embedding`` (adapters that add vocabulary): exact plain-torch per-slot products, with -1 tokens
  left alone. lorakern has no kernel for a bare shrink into vLLM's buffers or for the embedding's expand.
* fused-MoE LoRA and ``apply_lora_full_linear``: not supported; they raise ``NotImplementedError`` naming
  themselves.

With compilation (vLLM's default; it turns compilation off whenever LoRA is on, and :func:`install` turns it back on
for this backend): vLLM traces the model once with Dynamo, so the Python state this wrapper keeps (the step's token
mapping, the banks, the slot versions) must not be read while tracing. ``add_lora_linear`` and
``add_lora_embedding`` then record one opaque custom op each (``torch.ops.lorakern_vllm.add_lora_linear`` /
``add_lora_embedding``, mutating ``y``) that runs the eager path above at run time; the rest of the layer (base
matmul, norms, attention) is compiled around them. ``LORAKERN_VLLM_LORA_COMPILE=0`` keeps vLLM's eager LoRA.
"""
from __future__ import annotations

import itertools
import os
import weakref

import torch

from vllm.forward_context import get_forward_context, is_forward_context_available
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

from ...multilora.bank import LayerBank, apply_slices_
from ...multilora.batch import LoRABatch

__all__ = ["LorakernPunicaWrapper", "slot_ranks", "install"]


def slot_ranks(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int64 ``[S]``: each slot's rank with vLLM's zero padding cut off (the last component whose A row and
    B column are both non-zero, plus one; 0 for an empty slot). ``a`` ``[S, R, K]``, ``b`` ``[S, N, R]``."""
    live = (a.abs().amax(dim=2) > 0) & (b.abs().amax(dim=1) > 0)  # [S, R]
    idx = torch.arange(1, a.shape[1] + 1, device=a.device)
    return (live * idx).amax(dim=1).to(torch.int64).cpu() if a.shape[1] else torch.zeros(a.shape[0], dtype=torch.int64)


class _LayerSlots:
    """The banks of one LoRA layer, rebuilt when vLLM writes one of its slot tensors or lorakern places a
    compressed adapter in one of its slots."""

    def __init__(self, a_stacked: tuple, b_stacked: tuple):
        self.a, self.b = a_stacked, b_stacked
        self.versions = None
        self.banks: list[LayerBank] = []
        self.scale = None
        self.max_rank = 0
        self.compressed: dict[int, list] = {}  # slot -> the CompressedLoRA (or None) of each slice
        self.generation = 0  # bumped by every change of `compressed`

    def refresh(self, scale: float) -> list[LayerBank]:
        versions = (*(t._version for t in (*self.a, *self.b)), self.generation)
        if versions != self.versions or scale != self.scale:
            banks = []
            for i, (a, b) in enumerate(zip(self.a, self.b)):
                a3, b3 = a[:, 0], b[:, 0]  # [S, R, K], [S, N, R]
                ranks = slot_ranks(a3, b3)
                for slot in self.compressed:
                    ranks[slot] = -1
                lb = LayerBank.from_padded(a3, b3.transpose(1, 2), ranks, float(scale))
                for slot, parts in self.compressed.items():
                    lb.set(slot, parts[i])  # a compressed layer (its own scale), or None: rank 0
                banks.append(lb)
            self.banks, self.versions, self.scale = banks, versions, scale
            self.max_rank = max(lb.max_rank() for lb in banks)
        return self.banks


def _batch(indices: torch.Tensor, num_slots: int) -> LoRABatch | None:
    """The LoRABatch of per-token slot indices (-1: none); None when no token has an adapter."""
    ids = indices.to("cpu", torch.int64)
    if ids.numel() == 0 or not bool((ids >= 0).any()):
        return None
    return LoRABatch.from_ids(ids, num_slots=num_slots, device=indices.device)


def _fit(batch: LoRABatch, rows: int) -> LoRABatch:
    """The batch for ``rows`` tokens (vLLM may pad the activations past the tokens it mapped)."""
    if batch.num_tokens == rows:
        return batch
    if batch.num_tokens > rows:
        raise ValueError(f"lorakern: the LoRA mapping has {batch.num_tokens} tokens, the activations {rows} rows")
    return LoRABatch(rows, batch.tokens, batch.weights, batch.segments, batch.max_count, batch.ids, batch.mixture)


# ---- the compiled model's entry points: opaque to Dynamo, they run the wrapper's eager methods at run time ----
# A wrapper is found by a name that is the same in every run of the same engine (vLLM may load a compiled graph
# from its disk cache): vLLM's forward context of the engine running the graph holds it (the engine's
# ``static_forward_context``, where vLLM's own layers register for their custom ops), this process's table
# otherwise.
_WRAPPERS: "weakref.WeakValueDictionary[str, LorakernPunicaWrapper]" = weakref.WeakValueDictionary()
_IDS = itertools.count()
_NAME = "lorakern.punica_wrapper"


def _register(wrapper) -> str:
    """The name the compiled graph finds ``wrapper`` by (registered in the engine's forward context if vLLM is
    building one)."""
    from vllm.config import get_current_vllm_config_or_none

    cfg = get_current_vllm_config_or_none()
    ctx = None if cfg is None else cfg.compilation_config.static_forward_context
    if ctx is None:
        name = f"{_NAME}.process{next(_IDS)}"
    else:
        i = 0
        while f"{_NAME}.{i}" in ctx:
            i += 1
        name = f"{_NAME}.{i}"
        ctx[name] = wrapper
    _WRAPPERS[name] = wrapper
    return name


def _wrapper(name: str) -> "LorakernPunicaWrapper":
    if is_forward_context_available():
        w = get_forward_context().no_compile_layers.get(name)
        if w is not None:
            return w
    try:
        return _WRAPPERS[name]
    except KeyError:
        raise RuntimeError(f"lorakern: no LoRA backend named {name!r} in this process (a compiled graph of another "
                           "engine?)") from None


# Defined with torch.library.Library, not torch.library.custom_op: the custom_op wrapper's Python dispatch (autograd,
# ADInplaceOrView and default filling in Python) cost ~20 us a call against ~4 us here, measured on this machine,
# 120 calls per decode step. Inference only (no autograd kernel: vLLM runs under inference_mode).
_LIB = torch.library.Library("lorakern_vllm", "DEF")
_LIB.define("add_lora_linear(Tensor(a!) y, Tensor x, Tensor[] lora_a, Tensor[] lora_b, float scale, str wrapper) -> ()")
_LIB.define("add_lora_embedding(Tensor(a!) y, Tensor x, Tensor lora_b, bool add_inputs, str wrapper) -> ()")


def _add_lora_linear_op(y: torch.Tensor, x: torch.Tensor, lora_a: list[torch.Tensor], lora_b: list[torch.Tensor],
                        scale: float, wrapper: str) -> None:
    """``LorakernPunicaWrapper.add_lora_linear`` of the wrapper named ``wrapper``, in place into ``y``."""
    _wrapper(wrapper)._add_lora_linear(y, x, lora_a, lora_b, scale)


def _add_lora_embedding_op(y: torch.Tensor, x: torch.Tensor, lora_b: torch.Tensor, add_inputs: bool,
                           wrapper: str) -> None:
    """``LorakernPunicaWrapper.add_lora_embedding`` of the wrapper named ``wrapper``, in place into ``y``."""
    _wrapper(wrapper)._add_lora_embedding(y, x, lora_b, add_inputs)


def _nothing(*args) -> None:  # the ops' fake (meta) kernels: they only mutate y
    return None


for _name, _fn in (("add_lora_linear", _add_lora_linear_op), ("add_lora_embedding", _add_lora_embedding_op)):
    _LIB.impl(_name, _fn, "CPU")
    torch.library.register_fake(f"lorakern_vllm::{_name}", _nothing, lib=_LIB)


def install() -> None:
    """Make vLLM's CPU platform use this backend and, unless ``LORAKERN_VLLM_LORA_COMPILE=0``, keep the compilation
    mode it would have used without LoRA (it sets ``CompilationMode.NONE`` whenever LoRA is on; its own choice
    for a model without LoRA is ``DYNAMO_TRACE_ONCE``; fully-sharded LoRA layers, whose ``add_shrink`` /
    ``add_expand`` are plain Python loops, stay eager). Idempotent; called by
    :func:`lorakern.integrations.vllm.register` in every vLLM process."""
    from vllm.config import CompilationMode
    from vllm.platforms.cpu import CpuPlatform

    from . import PUNICA_WRAPPER

    CpuPlatform.get_punica_wrapper = classmethod(lambda cls: PUNICA_WRAPPER)
    orig = CpuPlatform.check_and_update_config
    if os.environ.get("LORAKERN_VLLM_LORA_COMPILE", "1") == "0" or getattr(orig, "_lorakern", False):
        return

    def check_and_update_config(cls, vllm_config) -> None:
        cc = vllm_config.compilation_config
        asked = cc.mode
        orig.__func__(cls, vllm_config)
        lc = vllm_config.lora_config
        if asked != CompilationMode.NONE and lc is not None and cc.mode == CompilationMode.NONE \
                and not lc.fully_sharded_loras:  # what the platform chose before its LoRA rule
            cc.mode = CompilationMode.STOCK_TORCH_COMPILE if asked == CompilationMode.STOCK_TORCH_COMPILE \
                else CompilationMode.DYNAMO_TRACE_ONCE

    check_and_update_config._lorakern = True
    CpuPlatform.check_and_update_config = classmethod(check_and_update_config)


class LorakernPunicaWrapper(PunicaWrapperCPU):
    """vLLM's punica wrapper on lorakern's kernels (see the module docstring). One instance serves every LoRA
    layer of a model; per-layer state is keyed on the layer's stacked A tensor."""

    def __init__(self, max_num_batched_tokens: int, max_batches: int, device, **kwargs):
        super().__init__(max_num_batched_tokens, max_batches, device, **kwargs)
        self._layers: dict[int, _LayerSlots] = {}
        self._pending: dict[int, dict] = {}  # compressed-slot changes not yet applied, by layer
        self._num_slots = 0
        self._token_batch: LoRABatch | None = None
        self._sampler_batch: LoRABatch | None = None
        self._op_id = _register(self)  # the compiled model's custom ops find this wrapper by it

    # ---- metadata (once per step, shared by every layer) ---------------------------------------------
    def update_metadata(self, mapping, lora_index_to_id, max_loras: int, vocab_size: int, **kwargs):
        super().update_metadata(mapping, lora_index_to_id, max_loras, vocab_size, **kwargs)
        self._num_slots = max_loras
        self._token_batch = _batch(self.token_lora_indices, max_loras)
        self._sampler_batch = _batch(self.sampler_indices, max_loras)

    def _slots(self, a_stacked, b_stacked, scale: float) -> _LayerSlots:
        key = id(a_stacked[0])
        st = self._layers.get(key)
        if st is None or st.a[0] is not a_stacked[0]:
            st = self._layers[key] = _LayerSlots(tuple(a_stacked), tuple(b_stacked))
        pending = self._pending.pop(key, None)
        if pending is not None:  # compressed slots set (or cleared: None) since the layer's last call
            st.compressed.update(pending)
            st.compressed = {k: v for k, v in st.compressed.items() if v is not None}
            st.generation += 1
        st.refresh(scale)
        return st

    def set_compressed(self, a_stacked0: torch.Tensor, slot: int, parts: list | None) -> None:
        """Record that ``slot`` of the layer whose first stacked A is ``a_stacked0`` holds these compressed layers
        (one :class:`~lorakern.formats.lora.CompressedLoRA` or None per output slice), or (``parts=None``) a dense
        adapter vLLM wrote into the slot itself. Called by :func:`lorakern.integrations.vllm.adapters.activate_adapter`."""
        self._pending.setdefault(id(a_stacked0), {})[slot] = parts

    # ---- the hot path --------------------------------------------------------------------------------
    def add_lora_linear(self, y: torch.Tensor, x: torch.Tensor, lora_a_stacked, lora_b_stacked, scale: float,
                        output_slices, *, buffer=None, **kwargs) -> None:
        """``y[:, slice i] += scale · x A_i[slot]^T B_i[slot]^T`` per token (slot -1: nothing), all slices in one
        call; in place into ``y`` ``[T, sum(output_slices)]``."""
        if len(lora_a_stacked) != len(lora_b_stacked) or len(lora_b_stacked) != len(output_slices):
            raise ValueError("lorakern: one A and one B per output slice expected")
        if torch.compiler.is_compiling():  # one opaque op in the graph; the state is read when it runs
            torch.ops.lorakern_vllm.add_lora_linear(y, x, list(lora_a_stacked), list(lora_b_stacked), float(scale),
                                                    self._op_id)
            return
        self._add_lora_linear(y, x, lora_a_stacked, lora_b_stacked, scale)

    def _add_lora_linear(self, y, x, lora_a_stacked, lora_b_stacked, scale: float) -> None:
        if self._token_batch is None:
            return
        st = self._slots(lora_a_stacked, lora_b_stacked, scale)
        if st.max_rank == 0:  # no loaded adapter touches this layer
            return
        x2 = x.reshape(-1, x.shape[-1])
        y2 = y.view(-1, y.shape[-1])
        batch = _fit(self._token_batch, x2.shape[0])
        if x2.dtype != y2.dtype:
            x2 = x2.to(y2.dtype)
        if len(st.banks) == 1:  # in place into y (its columns are the slices' in order)
            st.banks[0].apply_(x2, y2, batch)
        else:
            apply_slices_(st.banks, x2, y2, batch)

    def add_lora_logits(self, y: torch.Tensor, x: torch.Tensor, lora_a_stacked: torch.Tensor,
                        lora_b_stacked: torch.Tensor, scale, *, buffer=None, **kwargs) -> None:
        """``y += scale · x A[slot]^T B[slot]^T`` per sampled row (an adapter on lm_head), by the sampler's
        indices; returns at once when no loaded adapter targets lm_head."""
        if self._sampler_batch is None:
            return
        st = self._slots((lora_a_stacked,), (lora_b_stacked,), scale)
        if st.max_rank == 0:
            return
        x2 = x.reshape(-1, x.shape[-1])
        y2 = y.view(-1, y.shape[-1])
        lb = st.banks[0]
        batch = _fit(self._sampler_batch, x2.shape[0])
        n = min(lb.N, y2.shape[1])  # vLLM may pad the vocabulary differently from the adapter
        if n == lb.N == y2.shape[1]:
            y2.copy_(lb.apply(x2.to(y2.dtype), y2, batch))
        else:
            base = torch.zeros(y2.shape[0], lb.N, dtype=y2.dtype, device=y2.device)
            y2[:, :n] += lb.apply(x2.to(y2.dtype), base, batch)[:, :n]

    # ---- exact plain-torch paths (not on the hot path; see the module docstring) ----------------------
    def _per_slot(self, indices: torch.Tensor, rows: int):
        """``(slot, row indices)`` for every slot used by the first ``rows`` tokens."""
        ids = indices[:rows]
        for s in torch.unique(ids).tolist():
            if s >= 0:
                yield s, (ids == s).nonzero(as_tuple=True)[0]

    def _refuse_compressed(self, a_stacked0: torch.Tensor, what: str) -> None:
        """These plain-torch paths read vLLM's tensors only: a batch using a compressed slot is refused."""
        key = id(a_stacked0)
        slots = set(self._layers[key].compressed) if key in self._layers else set()
        slots |= {s for s, v in self._pending.get(key, {}).items() if v is not None}
        used = set(self.token_lora_indices.tolist()) & slots
        if used:
            raise NotImplementedError(f"lorakern: {what} with a compressed adapter (slot {min(used)}) is not supported "
                                      "(vLLM's fully-sharded LoRA layers and vocabulary-extending adapters)")

    def add_shrink(self, y, x: torch.Tensor, lora_a_stacked, scale: float, **kwargs) -> None:
        """``y[i] = scale · x A_i[slot]^T`` per token (slot -1: left as is), for each slice i."""
        self._refuse_compressed(lora_a_stacked[0], "add_shrink")
        x = x.reshape(-1, x.shape[-1])
        for i, a in enumerate(lora_a_stacked):
            for s, rows in self._per_slot(self.token_lora_indices, x.shape[0]):
                y[i][rows] = (scale * (x[rows].to(a.dtype) @ a[s, 0].t())).to(y[i].dtype)

    def add_expand(self, y: torch.Tensor, x, lora_b_stacked, output_slices, offset_start: int = 0, add_inputs=True,
                   **kwargs) -> None:
        """``y[:, slice i] (+)= x[i] B_i[slot]^T`` per token (slot -1: left as is)."""
        y2 = y.view(-1, y.shape[-1])
        off = offset_start
        for i, (b, n) in enumerate(zip(lora_b_stacked, output_slices)):
            for s, rows in self._per_slot(self.token_lora_indices, y2.shape[0]):
                upd = (x[i][rows].to(b.dtype) @ b[s, 0, :n].t()).to(y2.dtype)
                if add_inputs:
                    y2[rows, off: off + n] += upd
                else:
                    y2[rows, off: off + n] = upd
            off += n

    def add_lora_embedding(self, y: torch.Tensor, x: torch.Tensor, lora_b_stacked: torch.Tensor,
                           add_inputs: bool = True, **kwargs) -> None:
        """``y (+)= x B[slot]^T`` per token (x: the A rows vLLM gathered; slot -1: left as is)."""
        if torch.compiler.is_compiling():
            torch.ops.lorakern_vllm.add_lora_embedding(y, x, lora_b_stacked, bool(add_inputs), self._op_id)
            return
        self._add_lora_embedding(y, x, lora_b_stacked, add_inputs)

    def _add_lora_embedding(self, y, x, lora_b_stacked, add_inputs: bool) -> None:
        y2 = y.view(-1, y.shape[-1])
        n = min(lora_b_stacked.shape[2], y2.shape[1])
        for s, rows in self._per_slot(self.token_lora_indices, y2.shape[0]):
            upd = (x[rows].to(lora_b_stacked.dtype) @ lora_b_stacked[s, 0, :n].t()).to(y2.dtype)
            if add_inputs:
                y2[rows, :n] += upd
            else:
                y2[rows, :n] = upd

    def apply_lora_full_linear(self, *args, **kwargs):
        raise NotImplementedError("lorakern: apply_lora_full_linear (request-routed full linear weights) is not "
                                  "supported by lorakern's LoRA backend")

    def add_lora_fused_moe(self, *args, **kwargs):
        raise NotImplementedError("lorakern: LoRA on fused-MoE layers (add_lora_fused_moe) is not supported by "
                                  "lorakern's LoRA backend")
