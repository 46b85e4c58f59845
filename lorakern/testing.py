"""Test support: exact models of the CPU kernels' numerics, random formats, and error bounds.

The kernels are tested against two things: :mod:`lorakern.ops.reference` (the ops' definition in
fp32) and the *exact models* here, which reproduce the CPU kernels' int8 activation quantization
(``docs/formats.md``, "Numerics") in fp64, so that a kernel may differ from its model only by fp32
rounding. The random generators make formats that are not RTN results (fractional zeros, every code
used); the bounds turn dtype epsilons into per-element tolerances. Used by ``tests/`` and the
benchmarks' correctness checks; not needed at run time.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from .formats import QuantizedWeight, SparseOutliers, pack_codes, unpack_codes
from .formats.lora import CompressedLoRA, LoraLayer
from .multilora import AdapterBank
from .ops.reference import dequantize, lora_delta, multi_lora_fp64, multi_lora_slices_fp64, outliers_dense
from .ops.schemas import check_gwq_matmul, check_lora_mixed, check_multi_lora, check_quant_matmul, \
    check_quant_matmul_lora

__all__ = ["char_tokenizer", "count_native_calls", "save_random_peft_adapters", "tiny_llama", "DOT_EPS", "EPS", "OUTLIER_PATTERNS", "act_block", "fp_bound", "gwq_matmul_int8_act", "int8_act_bound",
           "interpreter_bf16_dot_xfail", "outlier_terms", "random_bank", "lora_mixed_int8_act", "multi_lora_int8_act", "multi_lora_slices_int8_act",
           "quant_matmul_int8_act", "quant_matmul_lora_int8_act", "quantize_activations_int8", "random_compressed",
           "random_outliers", "random_qweight", "terms_bound"]

#: unit roundoff of each dtype
EPS = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
#: per-product rounding of Triton dot inputs (fp32 runs as 3xTF32, about fp32) plus the output cast
DOT_EPS = {torch.float32: 2.0**-20, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def interpreter_bf16_dot_xfail():
    """pytest mark for bf16 ``tl.dot`` tests under the Triton interpreter (strict xfail)."""
    import pytest  # a test-only dependency
    return pytest.mark.xfail(
        strict=True, reason="triton 3.9's interpreter computes bf16 tl.dot wrongly (a 16x32 bf16 dot is off by "
        "~1e10); bf16 is checked by the sm_80/sm_90 AOT compile only")


# ---- exact models of the CPU kernels ---------------------------------------------------------------

def act_block(group_size: int) -> int:
    """Activation quantization block of the CPU kernels: 64, or the group if smaller."""
    return min(group_size, 64)


def quantize_activations_int8(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """The CPU kernels' activation quantization, dequantized: each block of
    ``act_block(group_size)`` values along the last dim is rounded (half to even)
    to int8 with scale max|x|/127 (a block whose 127 / max|x| overflows is zero). Returns fp32 ``xhat``."""
    K = x.shape[-1]
    B = act_block(group_size)
    xb = x.reshape(-1, K // B, B).float()
    amax = xb.abs().amax(-1, keepdim=True)
    # true division (torch evaluates `127.0 / t` as reciprocal(t) * 127, which rounds differently); a block whose
    # 127 / max|x| overflows (max 0, or below ~3.7e-37) is a zero block, as in the kernels (act_block_special)
    inv = torch.full_like(amax, 127.0).div(amax)
    inv = torch.where(torch.isfinite(inv), inv, torch.zeros_like(amax))
    xq = torch.round(xb * inv).clamp(-127, 127)
    return (xq * (amax / 127.0)).view(x.shape)


def quant_matmul_int8_act(x, qweight, scales, zeros, bits: int, group_size: int, bias=None) -> torch.Tensor:
    """Exact model (fp64) of the CPU kernels: ``xhat @ W^T (+ bias)`` with
    ``xhat = quantize_activations_int8(x)``. The kernels differ from it only by
    fp32 rounding."""
    N, K = check_quant_matmul(x, qweight, scales, zeros, bits, group_size, bias)
    xhat = quantize_activations_int8(x, group_size).reshape(-1, K).double()
    y = xhat @ dequantize(qweight, scales, zeros, bits, group_size).double().t()
    if bias is not None:
        y = y + bias.double()
    return y.view(*x.shape[:-1], N)



def gwq_matmul_int8_act(x, qweight, scales, zeros, bits: int, group_size: int, row_ptr, col_idx, values,
                        bias=None) -> torch.Tensor:
    """Exact model (fp64) of the CPU gwq kernels: the dense part on the int8
    activations (:func:`quant_matmul_int8_act`), the outliers on the unquantized ones."""
    N, K = check_gwq_matmul(x, qweight, scales, zeros, bits, group_size, row_ptr, col_idx, values, bias)
    y = quant_matmul_int8_act(x, qweight, scales, zeros, bits, group_size, bias)
    s = outliers_dense(row_ptr, col_idx, values, N, K).double()
    return y + (x.reshape(-1, K).double() @ s.t()).view(*x.shape[:-1], N)



def lora_mixed_int8_act(x, base, adapter, bits_hi: int, group_a: int, group_b: int, scale: float) -> torch.Tensor:
    """Exact model (fp64) of the CPU lora_mixed: the shrink on the int8 activations of
    :func:`quantize_activations_int8` (group ``group_a``), everything else exact."""
    check_lora_mixed(x, base, adapter, bits_hi, group_a, group_b, scale)
    xhat = quantize_activations_int8(x, group_a)
    return base.double() + lora_delta(x, adapter, bits_hi, group_a, group_b, scale, xhat=xhat)



def quant_matmul_lora_int8_act(x, qweight, scales, zeros, bits: int, group_size: int, bias, adapter, bits_hi: int,
                               group_a: int, group_b: int, scale: float) -> torch.Tensor:
    """Exact model (fp64) of the CPU quant_matmul_lora."""
    check_quant_matmul_lora(x, qweight, scales, zeros, bits, group_size, bias, adapter, bits_hi, group_a, group_b,
                            scale)
    y = quant_matmul_int8_act(x, qweight, scales, zeros, bits, group_size, bias)
    xhat = quantize_activations_int8(x, group_a)
    return y + lora_delta(x, adapter, bits_hi, group_a, group_b, scale, xhat=xhat)



def multi_lora_int8_act(x, base, bank, table, scales, group_a, group_b, segments, tokens, weights, max_rank):
    """Exact model (fp64) of the CPU multi_lora."""
    return multi_lora_fp64(x, base, bank, table, scales, group_a, group_b, segments, tokens, weights, max_rank,
                           quantize_activations_int8)



def multi_lora_slices_int8_act(x, base, banks, tables, scales, group_a, group_b, segments, tokens, weights, max_rank):
    """Exact model (fp64) of the CPU multi_lora_slices."""
    return multi_lora_slices_fp64(x, base, banks, tables, scales, group_a, group_b, segments, tokens, weights,
                                  max_rank, quantize_activations_int8)


# ---- random formats and bounds ---------------------------------------------------------------------

def random_qweight(N, K, bits, G, gen=None, device="cpu") -> QuantizedWeight:
    """Random codes, positive scales and fractional zeros (not an RTN result)."""
    q = torch.randint(0, 1 << bits, (N, K), generator=gen, dtype=torch.int32)
    s = (torch.rand(N, K // G, generator=gen) * 0.05 + 0.005).half()
    z = (torch.rand(N, K // G, generator=gen) * ((1 << bits) - 1)).half()
    return QuantizedWeight(pack_codes(q, bits, G), s, z, bits, G).to(device)


def int8_act_bound(x, w: QuantizedWeight):
    """Worst-case |kernel - fp32 reference| from int8 activation rounding:
    |x - xhat| <= xs_b / 2 per element (xs_b = max|x_b| / 127 over blocks b of
    min(G, 64) values), times |W|."""
    K = w.in_features
    B = min(w.group_size, 64)
    half_step = x.reshape(-1, K // B, B).float().abs().amax(-1, keepdim=True) / 127.0 / 2
    return half_step.expand(-1, -1, B).reshape(-1, K) @ w.dequantize().abs().t()


def fp_bound(x, w: QuantizedWeight, eps: float):
    """|x| @ |W|^T * eps: the size of rounding of terms of the dot product."""
    return x.reshape(-1, w.in_features).float().abs() @ w.dequantize().abs().t() * eps


OUTLIER_PATTERNS = ("none", "one_per_row", "1pct", "5pct", "full_row")


def random_outliers(N, K, pattern, gen=None, device="cpu"):
    """CSR outliers of a given pattern: none, one per row, ~1%, ~5%, or one row of
    only outliers with empty rows elsewhere. Values ~ 4*U(-1, 1)."""
    if pattern == "none":
        mask = torch.zeros(N, K, dtype=torch.bool)
    elif pattern == "one_per_row":
        mask = torch.zeros(N, K, dtype=torch.bool)
        mask[torch.arange(N), torch.randint(0, K, (N,), generator=gen)] = True
    elif pattern in ("1pct", "5pct"):
        mask = torch.rand(N, K, generator=gen) < (0.01 if pattern == "1pct" else 0.05)
    else:
        mask = torch.zeros(N, K, dtype=torch.bool)
        mask[N // 2] = True
    vals = (torch.rand(N, K, generator=gen) * 2 - 1) * 4
    return SparseOutliers.from_mask(mask, vals).to(device)


def random_compressed(N, K, r, h, bits_hi, ga, gb, gen, scale=1.5) -> CompressedLoRA:
    """Random codes, scales and fractional zeros in every part of a compressed adapter (not an RTN result)."""
    parts = dict(a_hi=random_qweight(h, K, bits_hi, ga, gen) if h else None,
                 b_hi=random_qweight(h, N, bits_hi, gb, gen) if h else None,
                 a_lo=random_qweight(r - h, K, 1, ga, gen) if h < r else None,
                 b_lo=random_qweight(r - h, N, 1, gb, gen) if h < r else None)
    return CompressedLoRA(**parts, shape=(N, K), rank=r, h=h, scale=scale)


def random_bank(gen, ranks=(8, 16, 5, 64, 16, 1), kinds="dcdccd", dtype=torch.float16, N=192, K=320, ga=64, gb=64):
    """An :class:`~lorakern.multilora.AdapterBank` with one layer ``"l"`` ``[N, K]`` and adapters ``a0, a1, ...`` of
    mixed ranks, dense (``'d'``, stored in ``dtype``) and compressed (``'c'``: 2, 3, then 4 high bits), scale 0.5 + i.
    The defaults are multiples of the compressed groups (64) with N not a multiple of the 128-column tile."""
    bank = AdapterBank({"l": (N, K)}, dtype=dtype)
    nc = 0
    for i, (r, kind) in enumerate(zip(ranks, kinds)):
        if kind == "c":
            layer = random_compressed(N, K, r, r // 2, (2, 3, 4)[nc % 3], ga, gb, gen, scale=0.5 + i)
            nc += 1
        else:
            layer = LoraLayer(torch.randn(r, K, generator=gen) * 0.2, torch.randn(N, r, generator=gen) * 0.2, 0.5 + i)
        bank.add(f"a{i}", {"l": layer})
    return bank


def outlier_terms(x, o: SparseOutliers):
    """``|x| @ |S|^T`` and the longest row of the outliers S: bounds the fp32 rounding of the sparse sums."""
    S = o.to_dense().abs()
    longest = int((o.row_ptr[1:] - o.row_ptr[:-1]).max()) if o.shape[0] else 0
    return x.reshape(-1, o.shape[1]).float().abs() @ S.t(), longest


def terms_bound(x, w, bias):
    """Upper bound on the sum of |terms| the CPU kernel adds in fp32 (lane partial sums of |s*q*xhat| and
    |s*z*xhat|)."""
    N, K = w.shape
    G = w.group_size
    q = unpack_codes(w.qweight, w.bits, G).float().view(N, K // G, G)
    a = (w.scales.float().abs().unsqueeze(-1) * (q + w.zeros.float().abs().unsqueeze(-1))).view(N, K)
    t = x.reshape(-1, K).float().abs() @ a.t() * 1.01
    return t + (bias.abs() if bias is not None else 0)



# ---- tiny models and adapters (need transformers / peft: the test-only extras) ---------------------

def char_tokenizer():
    """A real (fast) tokenizer with one token per printable ASCII character (id 0 is pad and eos): tiny
    models can learn the suite tasks' format with it."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    chars = ["<pad>"] + [chr(i) for i in range(32, 127)] + ["\n"]
    tk = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<pad>")


def tiny_llama(seed: int = 0, vocab_size: int = 128, hidden_size: int = 64, intermediate_size: int = 96, **config):
    """A random 2-layer Llama (grouped-query attention, 4 heads / 2 KV heads) in eval mode; token ids 0, 1, 2
    are pad, bos and eos. ``config`` overrides further ``LlamaConfig`` fields."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    fields = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(LlamaConfig(**{**fields, **config})).eval()


def save_random_peft_adapters(model, root, targets: dict, std: float, rank=lambda i: 4) -> dict:
    """Save one PEFT LoRA adapter per ``{name: target modules}`` under ``root/name`` with random B
    (N(0, std), seeded by the adapter's position i) and rank ``rank(i)``, lora_alpha 8; returns
    ``{name: directory}``."""
    root = Path(root)
    import copy

    import peft
    paths = {}
    for i, (name, mods) in enumerate(targets.items()):
        pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=rank(i), lora_alpha=8, target_modules=mods,
                                                                        init_lora_weights=False))
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, std, generator=torch.Generator().manual_seed(i))
        pm.save_pretrained(root / name)
        paths[name] = root / name
    return paths


@contextlib.contextmanager
def count_native_calls(stacks=None):
    """A list that gets one entry per decoder layer stepped natively inside the block: one per
    lk_decoder_layer_step call and one per layer of each lk_decoder_stack_step call (the calls are unchanged);
    ``stacks``, a list, gets one entry per stack call."""
    import lorakern.models.native as nm
    real = nm.native()
    calls = []

    class Spy:
        def __getattr__(self, name):
            return getattr(real, name)

        def decoder_layer_step(self, *a, **k):
            calls.append(1)
            return real.decoder_layer_step(*a, **k)

        def decoder_stack_step(self, stack, *a, **k):
            out = real.decoder_stack_step(stack, *a, **k)
            calls.extend([1] * len(stack))
            if stacks is not None:
                stacks.append(1)
            return out
    saved = nm.native
    nm.native = lambda: Spy()
    try:
        yield calls
    finally:
        nm.native = saved
