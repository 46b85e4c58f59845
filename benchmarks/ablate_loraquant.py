"""Why lorakern's LoRAQuant unbiases its components: the roundings tried on the way, on the harder suite.

Every variant compresses the same trained adapter at rho = 0.9 with 2-bit high components (LoRAQuant's setting at
~1.6 bits) and differs only in how the factors are rounded:

* ``fp16``: the adapter itself (the reference the others lose against);
* ``paper``: LoRAQuant as published (min/max RTN of the high part, ``sign(w) * mean|w|`` of the rest);
* ``unbiased``: lorakern's default (:func:`lorakern.quant.unbias_components`: each component rescaled so that its
  projection onto the original component is exact);
* ``clip``: the high part's groups clipped to the range that minimizes their squared error (a 15 x 15 grid of
  shrink factors of min and max), then as ``paper``;
* ``lloyd1``: the 1-bit groups at their two k-means levels (optimal 2-level quantizer) instead of +-mean|w|;
* ``gptq_free``: A' as ``paper``, then B' re-fitted by least squares to ``B' A'`` through the quantized A' and
  quantized with GPTQ's error feedback across its columns (1-bit columns first), data-free;
* ``gptq_wiki`` / ``gptq_task``: GPTQ on A' with the layer's input Hessian (WikiText-2 valid, 8 x 512 tokens; or
  the task's own training prompts and answers), then B' as in ``gptq_free`` under the same input statistics;
* ``*_unbiased``: the same, then :func:`unbias_components`.

For each: the mean relative Frobenius error of the adapter's update, its activation-weighted error (WikiText-2
Hessians), the mean projection ratio of the 1-bit components (1 = unbiased), the answers' mean negative
log-likelihood and exact match on the task's 400 held-out examples. Writes
benchmarks/results/loraquant_ablation.{json,md}.

    python benchmarks/ablate_loraquant.py [--tasks caesar_pos,mul] [--variants paper,unbiased] [--json PATH]
    python benchmarks/ablate_loraquant.py --variants paper,unbiased --eval-seed 2027 --json ...  # fresh examples:
        # the variants were chosen on the default examples (seed 12345), so check the choice on others
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from common import machine_info

from lorakern.adapters import apply_adapter, load_peft_adapter
from lorakern.apps.train.suite import adapter_dir, ensure_suite
from lorakern.apps.train.tasks import get_task
from lorakern.apps.train.trainer import answer_nll, exact_match
from lorakern.formats.lora import CompressedLoRA, lora_group_size
from lorakern.formats.packing import pack_codes
from lorakern.formats.quantized import QuantizedWeight
from lorakern.models.smollm2 import load_smollm2
from lorakern.quant import (calibration_windows, choose_h, collect_statistics, compress_lora, quantize_rtn,
                            quantize_sign, rtn_params, svd_reparameterize, unbias_components)
from lorakern.quant.gptq import _cholesky_inverse_upper, prepare_hessian

VARIANTS = ["fp16", "paper", "unbiased", "clip", "clip_unbiased", "lloyd1", "gptq_free", "gptq_wiki", "gptq_wiki_unbiased",
            "gptq_task"]
RHO, BITS_HI, EXAMPLES = 0.9, 2, 400


def clip_rtn(w: torch.Tensor, bits: int, G: int) -> QuantizedWeight:
    """Group-wise RTN with each group's [min, max] shrunk to the pair of factors (15 x 15 grid, 1 .. 0.3) that
    minimizes the group's squared error."""
    N, K = w.shape
    g = w.float().reshape(N, K // G, G)
    qmax = (1 << bits) - 1
    mn, mx = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
    best = torch.full(mn.shape, float("inf"))
    bs, bz = torch.ones_like(mn), torch.zeros_like(mn)
    for fl in torch.linspace(1.0, 0.3, 15):
        for fh in torch.linspace(1.0, 0.3, 15):
            s = ((mx * fh - mn * fl) / qmax).clamp_min(1e-8).half().float()
            z = (-mn * fl / s).half().float()
            q = torch.clamp(torch.round(g / s.unsqueeze(-1) + z.unsqueeze(-1)), 0, qmax)
            e = ((s.unsqueeze(-1) * (q - z.unsqueeze(-1)) - g) ** 2).sum(-1)
            better = e < best
            best, bs, bz = torch.where(better, e, best), torch.where(better, s, bs), torch.where(better, z, bz)
    q = torch.clamp(torch.round(g / bs.unsqueeze(-1) + bz.unsqueeze(-1)), 0, qmax).to(torch.uint8)
    return QuantizedWeight(pack_codes(q.reshape(N, K), bits, G), bs.half().contiguous(), bz.half().contiguous(), bits, G)


def lloyd_1bit(w: torch.Tensor, G: int, iters: int = 10) -> QuantizedWeight:
    """Each group at its two k-means levels (Lloyd's iterations from the split at 0)."""
    N, K = w.shape
    g = w.float().reshape(N, K // G, G)
    hi_mask = g >= 0
    for _ in range(iters):
        lo = torch.where(~hi_mask, g, 0.0).sum(-1) / (~hi_mask).sum(-1).clamp_min(1)
        hi = torch.where(hi_mask, g, 0.0).sum(-1) / hi_mask.sum(-1).clamp_min(1)
        hi_mask = g >= ((lo + hi) / 2).unsqueeze(-1)
    s = torch.where(hi > lo, hi - lo, torch.full_like(hi, 1e-4)).half()
    z = (-lo / s.float()).half()
    l0, l1 = (s.float() * (0 - z.float())).unsqueeze(-1), (s.float() * (1 - z.float())).unsqueeze(-1)
    q = ((g - l0).abs() > (g - l1).abs()).to(torch.uint8).reshape(N, K)
    return QuantizedWeight(pack_codes(q, 1, G), s.contiguous(), z.contiguous(), 1, G)


def cat_rows(ws: list) -> QuantizedWeight | None:
    """One QuantizedWeight from row blocks of equal format (codes are packed per row)."""
    ws = [w for w in ws if w is not None]
    if not ws:
        return None
    return QuantizedWeight(torch.cat([w.qweight for w in ws]), torch.cat([w.scales for w in ws]),
                           torch.cat([w.zeros for w in ws]), ws[0].bits, ws[0].group_size)


def quant_rows(w: torch.Tensor, bits: int, G: int) -> QuantizedWeight:
    """LoRAQuant's quantizer of a block of rows: RTN at 2+ bits, sign * mean|w| at 1 bit."""
    return quantize_rtn(w.contiguous(), bits, G) if bits > 1 else quantize_sign(w.contiguous(), G)


def gptq_rows(W: torch.Tensor, H: torch.Tensor, bits: int, G: int) -> QuantizedWeight:
    """GPTQ over the columns of ``W [n, K]`` with input Hessian H; each group's parameters from its updated
    weights (min/max RTN, or sign * mean|w| at 1 bit)."""
    n, K = W.shape
    W = W.float().clone()
    U = _cholesky_inverse_upper(prepare_hessian(H, 0.01)[0].double()).float()  # GPTQ's upper factor of H^-1
    qmax = (1 << bits) - 1
    codes = torch.zeros(n, K, dtype=torch.uint8)
    S, Z = torch.zeros(n, K // G, dtype=torch.float16), torch.zeros(n, K // G, dtype=torch.float16)
    for i in range(K):
        if i % G == 0:
            grp = W[:, i:i + G]
            if bits == 1:
                S[:, i // G] = (2 * grp.abs().mean(-1)).clamp_min(6.1e-5).half()
                Z[:, i // G] = 0.5
            else:
                s16, z16 = rtn_params(grp, bits, G)
                S[:, i // G], Z[:, i // G] = s16[:, 0], z16[:, 0]
            s, z = S[:, i // G].float(), Z[:, i // G].float()
        q = torch.clamp(torch.round(W[:, i] / s + z), 0, qmax)
        codes[:, i] = q.to(torch.uint8)
        err = (W[:, i] - s * (q - z)) / U[i, i]
        W[:, i:] -= err.unsqueeze(1) * U[i, i:].unsqueeze(0)
    return QuantizedWeight(pack_codes(codes, bits, G), S, Z, bits, G)


def compensate_b(Bt: torch.Tensor, Ap: torch.Tensor, Aq: torch.Tensor, Sigma: torch.Tensor, h: int, G: int) -> tuple:
    """B' re-fitted to ``B' A'`` through the quantized ``Aq`` under input statistics Sigma (identity: data-free),
    then quantized a column at a time (1-bit columns first) with GPTQ's error feedback (Hessian ``Aq Sigma Aq^T``)."""
    r = Bt.shape[0]
    S, Aqd = Sigma.double(), Aq.double()
    C = Aqd @ S @ Aqd.t()
    C = C + 0.01 * C.diagonal().mean() * torch.eye(r, dtype=torch.float64)
    Bstar = (Bt.t().double() @ (Ap.double() @ S @ Aqd.t()) @ torch.linalg.inv(C)).t()  # [r, d]
    order = list(range(h, r)) + list(range(h))
    perm = torch.tensor(order)
    U = _cholesky_inverse_upper(C[perm][:, perm])
    W = Bstar[perm].clone()
    rows = [None] * r
    for i in range(r):
        row = order[i]
        qw = quant_rows(W[i:i + 1].float(), BITS_HI if row < h else 1, G)
        rows[row] = qw
        err = (W[i] - qw.dequantize().double()[0]) / U[i, i]
        W[i + 1:] -= U[i, i + 1:].unsqueeze(1) * err.unsqueeze(0)
    return cat_rows(rows[:h]), cat_rows(rows[h:])


def compress(variant: str, B: torch.Tensor, A: torch.Tensor, scale: float, hess: dict) -> CompressedLoRA:
    """One layer's adapter compressed by ``variant`` (``hess``: input Hessians by calibration name)."""
    if variant in ("paper", "unbiased"):
        return compress_lora(B, A, rho=RHO, bits_high=BITS_HI, scale=scale, unbias=variant == "unbiased")
    base = variant.removesuffix("_unbiased")
    Bp, Ap, s = svd_reparameterize(B, A)
    (d, r), k = B.shape, A.shape[1]
    h = choose_h(s, RHO)
    gd, gk = lora_group_size(d), lora_group_size(k)
    Bt = Bp.t().contiguous()
    if base == "clip":
        parts = (clip_rtn(Ap[:h], BITS_HI, gk), clip_rtn(Bt[:h], BITS_HI, gd),
                 quantize_sign(Ap[h:], gk), quantize_sign(Bt[h:], gd))
    elif base == "lloyd1":
        parts = (quantize_rtn(Ap[:h], BITS_HI, gk), quantize_rtn(Bt[:h], BITS_HI, gd),
                 lloyd_1bit(Ap[h:], gk), lloyd_1bit(Bt[h:], gd))
    elif base.startswith("gptq_"):
        Sigma = torch.eye(k) if base == "gptq_free" else hess[base.removeprefix("gptq_")]
        if base == "gptq_free":
            a_hi, a_lo = quant_rows(Ap[:h], BITS_HI, gk), quant_rows(Ap[h:], 1, gk)
        else:
            a_hi, a_lo = gptq_rows(Ap[:h], Sigma, BITS_HI, gk), gptq_rows(Ap[h:], Sigma, 1, gk)
        Aq = torch.cat([a_hi.dequantize(), a_lo.dequantize()])
        b_hi, b_lo = compensate_b(Bt, Ap, Aq, Sigma, h, gd)
        parts = (a_hi, b_hi, a_lo, b_lo)
    else:
        raise ValueError(f"unknown variant {variant!r}")
    if h == r:
        raise ValueError("the ablation needs a 1-bit part (h < r)")
    c = CompressedLoRA(*parts, (d, k), r, h, float(scale))
    return unbias_components(c, Bt, Ap) if variant.endswith("_unbiased") else c


def errors(B, A, c: CompressedLoRA, H: torch.Tensor) -> tuple[float, float, float]:
    """(relative Frobenius error, relative activation-weighted error, mean projection ratio of the 1-bit
    components) of ``c`` against the adapter (B, A)."""
    T = B.double() @ A.double()
    Bq, Aq = c.factors()
    E = T - Bq.double() @ Aq.double()
    S = H.double()
    fro = float(E.norm() / T.norm())
    act = float((torch.trace(E @ S @ E.t()) / torch.trace(T @ S @ T.t())).clamp_min(0).sqrt())
    Bp, Ap, _ = svd_reparameterize(B, A)
    proj = ((Bq.double() * Bp.double()).sum(0) * (Aq.double() * Ap.double()).sum(1)
            / ((Bp.double() ** 2).sum(0) * (Ap.double() ** 2).sum(1)).clamp_min(1e-300))
    return fro, act, float(proj[c.h:].mean())


def task_windows(tok, task, seqlen: int = 512) -> torch.Tensor:
    """The task's training-seed prompts and answers, packed into windows of ``seqlen`` tokens."""
    ids = []
    for x, y in task.examples(400, seed=777):
        ids += tok(task.prompt(x) + " " + y + "\n", add_special_tokens=False).input_ids
    n = len(ids) // seqlen
    return torch.tensor(ids[:n * seqlen]).reshape(n, seqlen)


def markdown(out: dict) -> str:
    lines = ["# Roundings of LoRAQuant compared (SmolLM2-135M, harder suite)", "",
             f"rho = {RHO}, {BITS_HI}-bit high part, same bits for every variant; exact match on {EXAMPLES} held-out "
             f"examples (seed {out.get('eval_seed', 12345)}), answer NLL on 200. Errors are means over the adapter's 210 layers: relative Frobenius error of "
             "the update, its activation-weighted error (WikiText-2 input Hessians), and the 1-bit components' "
             "projection onto themselves (1 = unbiased). Generated by `benchmarks/ablate_loraquant.py`.", "",
             "| task | variant | avg bits | Frobenius err | activation err | 1-bit projection | answer NLL | exact match |",
             "|---|---|---|---|---|---|---|---|"]
    for r in out["rows"]:
        lines.append(f"| {r['task']} | {r['variant']} | {r['avg_bits']:.3f} | {r['fro_err']:.3f} | {r['act_err']:.3f} "
                     f"| {r['lo_projection']:.2f} | {r['nll']:.3f} | {r['exact_match']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="caesar_pos", help="comma-separated tasks of the harder suite")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    ap.add_argument("--eval-seed", type=int, default=12345, help="seed of the held-out examples (default: the "
                    "suite's, 12345)")
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "loraquant_ablation.json"))
    args = ap.parse_args(argv)
    variants = args.variants.split(",")
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    torch.manual_seed(0)
    model, tok = load_smollm2()
    names = args.tasks.split(",")
    ensure_suite(model, tok, names)
    rows, t0 = [], time.perf_counter()
    for name in names:
        task, adapter = get_task(name), load_peft_adapter(adapter_dir(name))
        layers = list(adapter.layers)
        hess = {"wiki": collect_statistics(model, calibration_windows(tok, 8, 512), layers, gradients=False,
                                           progress=False)}
        if any(v.startswith("gptq_task") for v in variants):
            hess["task"] = collect_statistics(model, task_windows(tok, task), layers, gradients=False, progress=False)
        for v in variants:
            if v == "fp16":
                with apply_adapter(model, adapter, dtype=torch.float16):
                    nll = answer_nll(model, tok, task, n=200, seed=args.eval_seed)
                    em = exact_match(model, tok, task, n=EXAMPLES, seed=args.eval_seed)
                rows.append(dict(task=name, variant=v, avg_bits=16.0, fro_err=0.0, act_err=0.0, lo_projection=1.0,
                                 nll=nll, exact_match=em))
                print(f"{name:10s} fp16 nll {nll:.3f} exact {em:.3f}", flush=True)
                continue
            comp, errs = {}, []
            for m in tqdm(layers, desc=f"{name} {v}", leave=False):
                l = adapter.layers[m]
                comp[m] = compress(v, l.B, l.A, l.scale, {k: st[m].hessian for k, st in hess.items()})
                errs.append(errors(l.B, l.A, comp[m], hess["wiki"][m].hessian))
            params = sum(c.rank * sum(c.shape) for c in comp.values())
            bits = sum(c.bits_per_param() * c.rank * sum(c.shape) for c in comp.values()) / params
            with apply_adapter(model, comp, dtype=torch.float16):
                nll = answer_nll(model, tok, task, n=200, seed=args.eval_seed)
                em = exact_match(model, tok, task, n=EXAMPLES, seed=args.eval_seed)
            fro, act, proj = (sum(e[i] for e in errs) / len(errs) for i in range(3))
            rows.append(dict(task=name, variant=v, avg_bits=bits, fro_err=fro, act_err=act, lo_projection=proj,
                             nll=nll, exact_match=em))
            print(f"{name:10s} {v:20s} bits {bits:.3f} fro {fro:.3f} act {act:.3f} 1-bit proj {proj:.2f} "
                  f"nll {nll:.3f} exact {em:.3f}   ({time.perf_counter() - t0:.0f} s)", flush=True)
    out = {"machine": machine_info(), "model": "SmolLM2-135M-Instruct (fp32 base)", "rho": RHO, "bits_high": BITS_HI,
           "examples": EXAMPLES, "eval_seed": args.eval_seed, "rows": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2))
    md = markdown(out)
    Path(args.json).with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
