"""What quantizing the output head costs: SmolLM2-135M WikiText-2 perplexity with the head (and the embedding
tied to it) in fp32, 8-bit and 4-bit RTN, over a body in fp32 and at 4-bit RTN.

    python benchmarks/eval_head_ppl.py [--windows N] [--json PATH]

Rows ``{"body", "head_bits", "ppl", "head_mb"}`` (head_mb: bytes of the head's storage, the embedding reading
the same rows) in benchmarks/results/head_ppl.json and a markdown table beside it. The default windows are the
demo's (the first 8 windows of 512 tokens of test.txt).
"""
from __future__ import annotations

import argparse
import copy
import os

import torch

from common import machine_info, write_json

import lorakern
from lorakern.apps.evaluation import perplexity, read_wikitext, token_windows
from lorakern.models import load_smollm2

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--json", default=os.path.join(RESULTS, "head_ppl.json"))
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    model, tok = load_smollm2()
    win = token_windows(tok, read_wikitext("test"), 512, a.windows)
    rows = []
    for body in ("fp32", "rtn4"):
        for head_bits in (None, 8, 4):
            if body == "fp32" and head_bits is None:
                m, head_mb = model, model.lm_head.weight.numel() * 4 / 2**20
            elif body == "fp32":
                m = _head_only(model, head_bits)
                head_mb = _head_mb(m)
            else:
                m = lorakern.quantize_model(copy.deepcopy(model), bits=4, head_bits=head_bits, progress=False)
                head_mb = _head_mb(m) if head_bits else model.lm_head.weight.numel() * 4 / 2**20
            with torch.no_grad():
                ppl = perplexity(m, win, progress=False)
            rows.append({"body": body, "head_bits": head_bits or 32, "ppl": ppl, "head_mb": head_mb})
            print(f"  body {body:5} head {head_bits or 32:>2}-bit: ppl {ppl:8.3f}  head {head_mb:6.1f} MB", flush=True)
    write_json(a.json, {"machine": machine_info(), "model": "SmolLM2-135M-Instruct", "windows": a.windows,
                        "window": 512, "rows": rows})
    md = os.path.splitext(a.json)[0] + ".md"
    with open(md, "w") as f:
        f.write(f"# Output head quantization (SmolLM2-135M, WikiText-2 test, {a.windows} x 512 tokens)\n\n")
        f.write("| body | head | ppl | head MB |\n|---|---|---|---|\n")
        for r in rows:
            f.write(f"| {r['body']} | {r['head_bits']}-bit | {r['ppl']:.3f} | {r['head_mb']:.1f} |\n")
    print(f"wrote {md}")
    return 0


def _head_only(model, head_bits):
    """The fp32 model with only its head (and the tied embedding) quantized."""
    from lorakern.models.quantize import QuantConfig, _quantize_head
    m = copy.deepcopy(model)
    _quantize_head(m, "lm_head", QuantConfig(bits=8, group_size=128, head_bits=head_bits))
    return m


def _head_mb(m) -> float:
    h = m.lm_head
    return sum(t.numel() * t.element_size() for t in (h.qweight, h.scales, h.zeros)) / 2**20


if __name__ == "__main__":
    raise SystemExit(main())
