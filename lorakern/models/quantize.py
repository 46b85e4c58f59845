"""Whole-model quantization: replace the linear layers of a model (``nn.Linear`` and transformers'
``Conv1D``) by QuantLinear (dense methods) or GWQLinear (methods with outliers).

``quantize_model(model, QuantConfig(...))`` or ``quantize_model(model, bits=..., method=...)`` (the
same fields as keywords), in the manner of torchao's ``quantize_(model, config)``. The stages:
pick the target layers (:func:`_targets`), gather the calibration statistics the method needs
(:func:`_statistics`), quantize each layer (:func:`_quantize_layer`) and swap it in
(:func:`lorakern.nn.replace_module`).
"""
from __future__ import annotations

import dataclasses
import fnmatch
import logging
import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..formats.linear_like import is_conv1d, linear_shape, linear_weight
from ..formats.lora import lora_group_size
from ..formats.packing import SUPPORTED_GROUP_SIZES
from ..nn import GWQLinear, QuantEmbedding, QuantLinear, replace_module
from ..quant.calibration import collect_statistics
from ..quant.gptq import inverse_hessian_diag
from ..quant.gwq import DENSE_QUANTIZERS, quantize_dense, quantize_with_outliers
from ..quant.outliers import SCORES, outlier_scores, select_outliers
from ..quant.rtn import quantize_rtn
from .awq import apply_awq
from .checkpoint import install_save_pretrained
from .decode import forget_compiled_call

__all__ = ["DENSE_ONLY", "METHODS", "QuantConfig", "quantize_model"]

log = logging.getLogger("lorakern")

# method -> (outlier score or None, default dense quantizer)
METHODS = {
    "rtn": (None, "rtn"),
    "gptq": (None, "gptq"),
    "gwq": ("grad", "gptq"),        # gradient outliers (GWQ)
    "spqr": ("hessian", "gptq"),    # SpQR-style Hessian outliers w^2 / [H^-1]_kk
    "magnitude": ("magnitude", "gptq"),
    "random": ("random", "gptq"),
    "awq": (None, "awq"),            # AWQ scales folded into the model, clipping search, RTN
    "gwq_awq": ("grad", "awq"),      # gradient outliers with the AWQ dense part
}
DENSE_ONLY = ("rtn", "gptq", "awq")


@dataclass(frozen=True)
class QuantConfig:
    """What :func:`quantize_model` does.

    Attributes:
        bits: 2, 3, 4 or 8.
        group_size: 32, 64 or 128. A layer whose in_features is not a multiple of it uses the largest
            supported group size that divides in_features (SmolLM2's 576 gets 64 when 128 is asked);
            a layer with none is kept.
        skip: module names or glob patterns left in full precision.
        head_bits: bits of the output head (``lm_head``, the model's ``get_output_embeddings()``): 8 (default)
            or 4 by round-to-nearest, or None to keep it in full precision. When the input embedding is tied
            to the head, the embedding becomes a :class:`~lorakern.nn.QuantEmbedding` reading the head's
            packed rows (stored once; the float table is dropped) and the config's ``tie_word_embeddings`` is
            cleared (the two are no longer tied float parameters). On SmolLM2-135M (WikiText-2, 8 x 512 tokens,
            benchmarks/eval_head_ppl.py) the 8-bit head moves perplexity 27.613 -> 27.629 (fp32 body) and
            39.133 -> 39.030 (4-bit body), a 4-bit head to 30.211 / 43.024; the 8-bit head reads 29 MB per
            decoded token instead of 108 MB.
        method: one of :data:`METHODS`: "rtn", "gptq" and "awq" (dense, QuantLinear); "gwq" (gradient
            outliers), "gwq_awq" (gradient outliers, AWQ dense part), "spqr" (Hessian outliers), "magnitude",
            "random" (GWQLinear with a fraction ``outliers`` kept in fp16). AWQ (:mod:`lorakern.quant.awq`,
            :mod:`lorakern.models.awq`) searches per-channel scales on the calibration activations, folds them
            into the RMSNorms and linear layers that produce the inputs, then quantizes with its clipping
            search and RTN (dense "awq") or with GPTQ (dense "awq_gptq").
        outliers: fraction of each matrix kept as fp16 outliers (outlier methods).
        score: override the method's outlier score (:data:`lorakern.quant.SCORES`).
        dense: the dense quantizer (default: the method's): "rtn", "gptq", "awq" (AWQ scales, clipping, RTN)
            or "awq_gptq" (AWQ scales, then GPTQ).
        per_row: budget ``round(outliers * K)`` outliers in every output row instead of
            ``round(outliers * N * K)`` per matrix.
        act_order: GPTQ column order by decreasing Hessian diagonal.
        percdamp: GPTQ damping (fraction of mean diag H).
        seed: for the "random" baseline.

    Raises:
        ValueError: (on construction) an unknown method or score, unsupported bits or group size, an
            outlier fraction outside [0, 1).
    """
    bits: int = 4
    group_size: int = 128
    skip: tuple = ()
    head_bits: int | None = 8
    method: str = "rtn"
    outliers: float = 0.01
    score: str | None = None
    dense: str | None = None
    per_row: bool = False
    act_order: bool = False
    percdamp: float = 0.01
    seed: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown quantization method {self.method!r} (available: {sorted(METHODS)})")
        if self.group_size not in SUPPORTED_GROUP_SIZES:
            raise ValueError(f"group_size must be one of {SUPPORTED_GROUP_SIZES}, got {self.group_size}")
        if self.bits not in (2, 3, 4, 8):
            raise ValueError(f"bits must be 2, 3, 4 or 8, got {self.bits}")
        if self.head_bits not in (None, 4, 8):
            raise ValueError(f"head_bits must be 8, 4 or None, got {self.head_bits}")
        default_score, default_dense = METHODS[self.method]
        score = None if self.method in DENSE_ONLY else (self.score or default_score)
        object.__setattr__(self, "score", score)
        object.__setattr__(self, "dense", self.dense or default_dense)
        object.__setattr__(self, "skip", tuple([self.skip] if isinstance(self.skip, str) else self.skip))
        if self.dense not in DENSE_QUANTIZERS:
            raise ValueError(f"unknown dense quantizer {self.dense!r} (one of {DENSE_QUANTIZERS})")
        if score is not None and score not in SCORES:
            raise ValueError(f"unknown outlier score {score!r} (one of {SCORES})")
        if score is not None and not 0 <= self.outliers < 1:
            raise ValueError(f"outliers must be a fraction in [0, 1), got {self.outliers}")

    @property
    def needs_gradients(self) -> bool:
        return self.score in ("grad", "grad_w", "grad_w2")

    @property
    def needs_hessians(self) -> bool:
        return self.dense != "rtn" or self.score == "hessian"

    @property
    def awq(self) -> bool:
        """AWQ scales are searched and folded into the model before the layers are quantized."""
        return self.dense in ("awq", "awq_gptq")


def quantize_model(model: nn.Module, config: QuantConfig | None = None, progress: bool = True, *,
                   calibration: torch.Tensor | None = None, statistics: dict | None = None,
                   **kwargs) -> nn.Module:
    """Quantize every linear layer of ``model`` in place: ``nn.Linear`` and transformers' ``Conv1D``
    (GPT-2 style, weight stored ``[in, out]``: its transpose is quantized and the layer becomes a
    QuantLinear computing the same ``x @ W + b``).

    Args:
        model: any module; methods that need calibration expect a Hugging Face causal LM
            (``model(ids, labels=ids).loss``).
        config: a :class:`QuantConfig`; or give its fields as keywords (``bits=3, method="gwq"``), or
            an int as the bits (``quantize_model(model, 4)``).
        calibration: ``[n, seqlen]`` token ids (e.g. from :func:`lorakern.quant.calibration_windows`);
            needed by every method but "rtn" (and "magnitude"/"random" with ``dense="rtn"``).
        statistics: precomputed :func:`lorakern.quant.collect_statistics` output for these layers
            (reused across methods instead of ``calibration``).
        progress: show progress bars.

    Layers calibration never reaches (an extra head, an expert no token is routed to) are quantized by
    round-to-nearest with a warning and listed in ``"fallback"``; inputs that are always zero in the
    calibration text keep their round-to-nearest values (see :mod:`lorakern.quant.gptq`). No weight is
    set from missing data.

    Returns the model. ``model.lorakern_quantization`` records what was done: the config's fields,
    ``"layers": {name: group_size}``, ``"kept": {name: reason}`` (every linear-like layer left in full
    precision, with why), ``"fallback": {name: reason}``, ``"head"`` (the output head's bits, group size and
    whether a tied embedding now reads it), ``"avg_bits"`` (codes + scales + zeros + outliers over the
    quantized body, the head not counted) and ``"seconds"``.

    Raises:
        ValueError: bad arguments, no layer to quantize (the message lists every layer kept and why),
            or a layer that cannot be quantized (the message names it).
        TypeError: both a config and keyword fields, or an unknown keyword.
    """
    if isinstance(config, int) and not isinstance(config, bool):
        kwargs = {"bits": config, **kwargs}
        config = None
    if config is not None and kwargs:
        raise TypeError(f"quantize_model: give a QuantConfig or keyword fields, not both ({sorted(kwargs)})")
    cfg = config if config is not None else QuantConfig(**kwargs)
    t0 = time.time()
    if (cfg.needs_gradients or cfg.needs_hessians) and calibration is None and statistics is None:
        raise ValueError(f"method {cfg.method!r} (score={cfg.score}, dense={cfg.dense}) needs calibration token "
                         "windows")
    head = _head(model)
    targets, kept = _targets(model, cfg, head)
    stats = _statistics(model, cfg, targets, calibration, statistics, progress)
    awq_record = None
    if cfg.awq:
        stats, awq_record = apply_awq(model, {n: g for n, _, g in targets}, stats, cfg.bits, cfg.group_size,
                                      progress_bar=lambda it: tqdm(it, desc="AWQ scales", disable=not progress,
                                                                   leave=False))
    gen = torch.Generator().manual_seed(cfg.seed)
    record = {**{k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("skip", "percdamp", "seed",
                                                                                "head_bits")},
              "outliers": cfg.outliers if cfg.score else 0.0,
              "calibration": list(calibration.shape) if calibration is not None else
              ([next(iter(statistics.values())).nsamples] if statistics else None),
              "layers": {}, "kept": kept, "fallback": {}}
    if awq_record is not None:
        record["awq"] = awq_record
    stored_bits, n_weights = 0.0, 0
    for name, lin, g in tqdm(targets, desc=f"quantize {cfg.method} {cfg.bits}-bit", disable=not progress,
                             leave=False):
        st = stats.pop(name, None)
        if (cfg.needs_gradients or cfg.needs_hessians) and (st is None or st.tokens == 0):
            log.warning("lorakern: %s is never reached by the calibration data: round-to-nearest, no outliers", name)
            record["fallback"][name] = "not reached by the calibration data: rtn"
            layer_cfg, st = dataclasses.replace(cfg, method="rtn", dense="rtn"), None
        else:
            layer_cfg = cfg
        new, qw, numel = _quantize_layer(name, lin, g, layer_cfg, st, gen)
        stored_bits += qw.bits_per_weight() * numel
        n_weights += numel
        replace_module(model, name, new.to(lin.weight.device))
        record["layers"][name] = g
    if head is not None and head not in kept:
        record["head"] = _quantize_head(model, head, cfg)
    record["avg_bits"] = stored_bits / max(n_weights, 1)
    record["seconds"] = time.time() - t0
    model.lorakern_quantization = record
    forget_compiled_call(model)  # a compiled decode step of the float model (or of the model it was copied from)
    install_save_pretrained(model)
    return model


def _group_for(in_features: int, group_size: int) -> int | None:
    """The largest supported group size <= ``group_size`` dividing ``in_features`` (None: none does)."""
    try:
        return lora_group_size(in_features, group_size)
    except ValueError:
        return None


def _head(model: nn.Module) -> str | None:
    """The module name of the model's output head (transformers' ``get_output_embeddings()``), if linear."""
    get = getattr(model, "get_output_embeddings", None)
    out = get() if callable(get) else None
    if out is None or not isinstance(out, nn.Linear):
        return None
    return next((n for n, m in model.named_modules() if m is out), None)


def _targets(model: nn.Module, cfg: QuantConfig, head: str | None) -> tuple[list, dict]:
    """``([(name, module, group size)], {kept name: reason})`` of the body (the head is quantized apart);
    ValueError when nothing is left."""
    targets, kept = [], {}
    for name, mod in model.named_modules():
        if isinstance(mod, (QuantLinear, GWQLinear)):
            continue
        if name == head:
            if cfg.head_bits is None or _skipped(name, cfg.skip):
                kept[name] = "skipped (skip=)" if _skipped(name, cfg.skip) else "output head (head_bits=None)"
            continue
        shape = linear_shape(mod)
        if shape is None:
            continue
        if not (isinstance(mod, nn.Linear) or is_conv1d(mod)):
            if isinstance(getattr(mod, "weight", None), torch.Tensor):
                kept[name] = f"a {type(mod).__name__}, not nn.Linear or Conv1D"
            continue
        if _skipped(name, cfg.skip):
            kept[name] = "skipped (skip=)"
            continue
        g = _group_for(shape[1], cfg.group_size)
        if g is None:
            kept[name] = f"in_features={shape[1]} is not a multiple of any supported group size {SUPPORTED_GROUP_SIZES}"
        else:
            targets.append((name, mod, g))
    for name, why in kept.items():
        if why != "skipped (skip=)":
            log.warning("lorakern: keeping %s in full precision: %s", name, why)
    if not targets:
        raise ValueError("quantize_model: no layer to quantize; kept in full precision: "
                         + ("; ".join(f"{n}: {w}" for n, w in kept.items()) or "none (the model has no linear layers)"))
    return targets, kept


def _quantize_head(model: nn.Module, name: str, cfg: QuantConfig) -> dict:
    """Round-to-nearest of the output head at ``cfg.head_bits``; a tied input embedding becomes a
    QuantEmbedding over the same packed rows. Returns what was done (the record's ``"head"``)."""
    lin = model.get_submodule(name)
    K = lin.in_features
    g = _group_for(K, cfg.group_size)
    if g is None:
        return {"name": name, "kept": f"in_features={K} is not a multiple of any supported group size"}
    emb = model.get_input_embeddings() if callable(getattr(model, "get_input_embeddings", None)) else None
    tied = isinstance(emb, nn.Embedding) and emb.weight is lin.weight
    w = quantize_rtn(lin.weight.detach().float().cpu(), cfg.head_bits, g)
    new = QuantLinear(w, lin.bias).to(lin.weight.device)
    replace_module(model, name, new)
    out = {"name": name, "bits": cfg.head_bits, "group_size": g, "tied_embedding": tied,
           "avg_bits": w.bits_per_weight()}
    if tied:
        emb_name = next(n for n, m in model.named_modules() if m is emb)
        try:
            scale = QuantEmbedding.scale_of(emb)
        except ValueError as e:  # an embedding that does more than a (scaled) lookup keeps its float table
            log.warning("lorakern: %s keeps its float table: %s", emb_name, e)
            out["embedding_kept"] = str(e)
        else:
            qe = QuantEmbedding(new.quantized_weight, dtype=emb.weight.dtype, padding_idx=emb.padding_idx,
                                tied_to=name, scale=scale)
            replace_module(model, emb_name, qe)
            out["embedding"] = emb_name
        for c in (model.config, getattr(model.config, "get_text_config", lambda: None)()):
            if c is not None and hasattr(c, "tie_word_embeddings"):
                c.tie_word_embeddings = False  # no longer tied float parameters: the packed rows are shared
    return out


def _statistics(model, cfg: QuantConfig, targets, calibration, statistics, progress) -> dict:
    """The per-layer calibration statistics the method needs (given, checked, or collected)."""
    names = [n for n, _, _ in targets]
    if statistics is not None:
        stats = dict(statistics)
        for n in names:
            st = stats.get(n)
            if st is not None and getattr(st, "tokens", 1) == 0:
                continue  # unreached in calibration: RTN
            if st is None or (cfg.needs_hessians and st.hessian is None) or \
                    (cfg.awq and getattr(st, "act_mean", None) is None) or \
                    (cfg.score in ("grad", "grad_w") and st.grad is None) or \
                    (cfg.score == "grad_w2" and st.grad_sq is None):
                raise ValueError(f"statistics lack what method {cfg.method!r} needs for layer {n}")
        return stats
    if cfg.needs_gradients or cfg.needs_hessians:
        return collect_statistics(model, calibration, names, gradients=cfg.score in ("grad", "grad_w"),
                                  grad_squares=cfg.score == "grad_w2", hessians=cfg.needs_hessians,
                                  act_means=cfg.awq, progress=progress)
    return {}


def _quantize_layer(name: str, lin: nn.Module, g: int, cfg: QuantConfig, st, gen):
    """``(new module, its weight record, number of weights)`` for one layer; errors name the layer."""
    w = linear_weight(lin).detach().float().cpu()
    # llm-awq searches no clipping for q and k ("due to the qk bmm, it is hard to clip precisely")
    dense = "rtn" if cfg.dense == "awq" and name.rsplit(".", 1)[-1] in ("q_proj", "k_proj") else cfg.dense
    try:
        H = st.hessian if st is not None else None
        if cfg.score is None:
            qw, _ = quantize_dense(w, cfg.bits, g, dense, H, act_order=cfg.act_order, percdamp=cfg.percdamp)
            return QuantLinear(qw, lin.bias), qw, w.numel()
        s = outlier_scores(cfg.score, w, grad=st.grad if st else None, grad_sq=st.grad_sq if st else None,
                           hinv_diag=inverse_hessian_diag(H, cfg.percdamp) if cfg.score == "hessian" else None,
                           generator=gen)
        mask = select_outliers(s, cfg.outliers, cfg.per_row)
        qw = quantize_with_outliers(w, mask, cfg.bits, g, dense, H, cfg.act_order, cfg.percdamp)
        return GWQLinear(qw, lin.bias), qw, w.numel()
    except (ValueError, TypeError, RuntimeError) as e:
        raise type(e)(f"quantize_model: layer {name} ({tuple(w.shape)}): {e}") from e


def _skipped(name: str, patterns) -> bool:
    return any(name == p or name.endswith("." + p) or fnmatch.fnmatch(name, p) for p in patterns)
