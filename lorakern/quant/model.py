"""Whole-model quantization: replace the linear layers of a model (``nn.Linear`` and transformers'
``Conv1D``) by QuantLinear (dense methods) or GWQLinear (methods with outliers)."""
from __future__ import annotations

import fnmatch
import logging
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from ..formats.linear_like import is_conv1d, linear_shape, linear_weight
from ..formats.packing import SUPPORTED_GROUP_SIZES
from .calibration import collect_statistics
from .gptq import inverse_hessian_diag
from .gwq import quantize_dense, quantize_with_outliers
from .outliers import SCORES, outlier_scores, select_outliers

__all__ = ["METHODS", "quantize_model"]

log = logging.getLogger("lorakern")

# method -> (outlier score or None, default dense quantizer)
METHODS = {
    "rtn": (None, "rtn"),
    "gptq": (None, "gptq"),
    "gwq": ("grad", "gptq"),        # gradient outliers (GWQ)
    "spqr": ("hessian", "gptq"),    # SpQR-style Hessian outliers w^2 / [H^-1]_kk
    "magnitude": ("magnitude", "gptq"),
    "random": ("random", "gptq"),
}


def _skipped(name: str, patterns) -> bool:
    return any(name == p or name.endswith("." + p) or fnmatch.fnmatch(name, p) for p in patterns)


def quantize_model(model: nn.Module, bits: int = 4, group_size: int = 128, skip=("lm_head",),
                   method: str = "rtn", progress: bool = True, *, calibration: torch.Tensor | None = None,
                   outliers: float = 0.01, score: str | None = None, dense: str | None = None,
                   per_row: bool = False, act_order: bool = False, percdamp: float = 0.01,
                   seed: int = 0, statistics: dict | None = None) -> nn.Module:
    """Quantize every linear layer of ``model`` in place: ``nn.Linear`` and transformers' ``Conv1D``
    (GPT-2 style, weight stored ``[in, out]``: its transpose is quantized and the layer becomes a
    QuantLinear computing the same ``x @ W + b``).

    Args:
        model: any module; methods that need calibration expect a Hugging Face
            causal LM (``model(ids, labels=ids).loss``).
        bits: 2, 3, 4 or 8.
        group_size: 32, 64 or 128. A layer whose in_features is not a multiple
            of it uses the largest supported group size that divides in_features
            (SmolLM2's 576 gets 64 when 128 is asked); a layer with none is kept.
        skip: module names or glob patterns left in full precision.
        method: one of :data:`METHODS`: "rtn" and "gptq" (dense, QuantLinear);
            "gwq" (gradient outliers), "spqr" (Hessian outliers), "magnitude",
            "random" (GWQLinear with a fraction ``outliers`` kept in fp16).
        calibration: ``[n, seqlen]`` token ids (e.g. from
            :func:`lorakern.quant.calibration_windows`); needed by every method
            but "rtn" (and "magnitude"/"random" with ``dense="rtn"``).
        outliers: fraction of each matrix kept as fp16 outliers (outlier methods).
        score: override the method's outlier score (:data:`lorakern.quant.SCORES`).
        dense: "rtn" or "gptq" for the dense part (default: the method's).
        per_row: budget ``round(outliers * K)`` outliers in every output row
            instead of ``round(outliers * N * K)`` per matrix.
        act_order: GPTQ column order by decreasing Hessian diagonal.
        percdamp: GPTQ damping (fraction of mean diag H).
        seed: for the "random" baseline.
        statistics: precomputed :func:`lorakern.quant.collect_statistics` output
            for these layers (reused across methods instead of ``calibration``).
        progress: show progress bars.

    Layers calibration never reaches (an extra head, an expert no token is routed to) are
    quantized by round-to-nearest with a warning and listed in ``"fallback"``; inputs that are
    always zero in the calibration text keep their round-to-nearest values (see
    :mod:`lorakern.quant.gptq`). No weight is set from missing data.

    Returns the model. ``model.lorakern_quantization`` records what was done:
    the arguments, ``"layers": {name: group_size}``, ``"kept": {name: reason}`` (every
    linear-like layer left in full precision, with why), ``"fallback": {name: reason}``,
    ``"avg_bits"`` (codes + scales + zeros + outliers over all quantized
    weights) and ``"seconds"``.

    Raises:
        ValueError: bad arguments, no layer to quantize (the message lists every layer kept and
            why), or a layer that cannot be quantized (the message names it).
    """
    from ..nn.gwq_linear import GWQLinear  # nn imports quant: import here
    from ..nn.quant_linear import QuantLinear

    t0 = time.time()
    if method not in METHODS:
        raise ValueError(f"unknown quantization method {method!r} (available: {sorted(METHODS)})")
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"group_size must be one of {SUPPORTED_GROUP_SIZES}, got {group_size}")
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"bits must be 2, 3, 4 or 8, got {bits}")
    default_score, default_dense = METHODS[method]
    score = score or default_score
    dense = dense or default_dense
    if score is not None and score not in SCORES:
        raise ValueError(f"unknown outlier score {score!r} (one of {SCORES})")
    if score is None and method not in ("rtn", "gptq"):
        raise ValueError(f"method {method!r} needs an outlier score")
    if method in ("rtn", "gptq"):
        score = None
    if score is not None and not 0 <= outliers < 1:
        raise ValueError(f"outliers must be a fraction in [0, 1), got {outliers}")
    need_grad = score in ("grad", "grad_w", "grad_w2")
    need_h = dense == "gptq" or score == "hessian"
    if (need_grad or need_h) and calibration is None and statistics is None:
        raise ValueError(f"method {method!r} (score={score}, dense={dense}) needs calibration token windows")

    targets = []
    kept: dict[str, str] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, (QuantLinear, GWQLinear)):
            continue
        shape = linear_shape(mod)
        if shape is None:
            continue
        if not (isinstance(mod, nn.Linear) or is_conv1d(mod)):
            if isinstance(getattr(mod, "weight", None), torch.Tensor):
                kept[name] = f"a {type(mod).__name__}, not nn.Linear or Conv1D"
            continue
        if _skipped(name, skip):
            kept[name] = "skipped (skip=)"
            continue
        g = next((g for g in sorted(SUPPORTED_GROUP_SIZES, reverse=True)
                  if g <= group_size and shape[1] % g == 0), None)
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
    stats = {}
    if statistics is not None:
        stats = dict(statistics)
        for n, _, _ in targets:
            st = stats.get(n)
            if st is not None and getattr(st, "tokens", 1) == 0:
                continue  # unreached in calibration: RTN below
            if st is None or (need_h and st.hessian is None) or (score in ("grad", "grad_w") and st.grad is None) \
                    or (score == "grad_w2" and st.grad_sq is None):
                raise ValueError(f"statistics lack what method {method!r} needs for layer {n}")
    elif need_grad or need_h:
        stats = collect_statistics(model, calibration, [n for n, _, _ in targets], gradients=score in ("grad", "grad_w"),
                                   grad_squares=score == "grad_w2", hessians=need_h, progress=progress)
    gen = torch.Generator().manual_seed(seed)
    record = {"bits": bits, "group_size": group_size, "method": method, "score": score, "dense": dense,
              "outliers": outliers if score else 0.0, "per_row": per_row, "act_order": act_order,
              "calibration": list(calibration.shape) if calibration is not None else
              ([next(iter(statistics.values())).nsamples] if statistics else None),
              "layers": {}, "kept": kept, "fallback": {}}
    stored_bits, n_weights = 0.0, 0
    for name, lin, g in tqdm(targets, desc=f"quantize {method} {bits}-bit", disable=not progress, leave=False):
        w = linear_weight(lin).detach().float().cpu()
        st = stats.pop(name, None)
        if (need_grad or need_h) and (st is None or st.tokens == 0):
            log.warning("lorakern: %s is never reached by the calibration data: round-to-nearest, no outliers", name)
            record["fallback"][name] = "not reached by the calibration data: rtn"
            lin_score, lin_dense, st = None, "rtn", None
        else:
            lin_score, lin_dense = score, dense
        try:
            H = st.hessian if st is not None else None
            if lin_score is None:
                qw, _ = quantize_dense(w, bits, g, lin_dense, H, act_order=act_order, percdamp=percdamp)
                new = QuantLinear(qw, lin.bias)
            else:
                s = outlier_scores(lin_score, w, grad=st.grad if st else None, grad_sq=st.grad_sq if st else None,
                                   hinv_diag=inverse_hessian_diag(H, percdamp) if lin_score == "hessian" else None,
                                   generator=gen)
                mask = select_outliers(s, outliers, per_row)
                qw = quantize_with_outliers(w, mask, bits, g, lin_dense, H, act_order, percdamp)
                new = GWQLinear(qw, lin.bias)
        except (ValueError, TypeError, RuntimeError) as e:
            raise type(e)(f"quantize_model: layer {name} ({tuple(w.shape)}): {e}") from e
        stored_bits += qw.bits_per_weight() * w.numel()
        n_weights += w.numel()
        new = new.to(lin.weight.device)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
        record["layers"][name] = g
    record["avg_bits"] = stored_bits / max(n_weights, 1)
    record["seconds"] = time.time() - t0
    model.lorakern_quantization = record
    from ..models.checkpoint import install_save_pretrained  # TODO(issue 13): move model directories below quant
    install_save_pretrained(model)
    return model
