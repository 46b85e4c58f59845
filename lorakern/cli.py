"""The ``lorakern`` command line.

    lorakern demo   quantize SmolLM2-135M to 4 and 3 bits; WikiText-2 perplexity and decode tokens/s vs fp32
    lorakern info   versions, CPU kernel paths, build
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time

__all__ = ["main"]


def _info(args) -> int:
    import torch

    import lorakern
    print(f"lorakern {lorakern.__version__}  torch {torch.__version__}")
    try:
        print(f"CPU kernel paths: available {lorakern.available_isas()}, active {lorakern.active_isa()}")
    except lorakern.NativeLibraryError as e:
        print(f"C++ extension: NOT AVAILABLE ({e})")
        return 1
    print(f"threads: {torch.get_num_threads()}")
    return 0


def _demo(args) -> int:
    import torch

    import lorakern
    from lorakern.eval import decode_tokens_per_second, perplexity, read_wikitext, token_windows
    from lorakern.models import load_smollm2

    torch.manual_seed(0)
    t0 = time.time()
    model, tok = load_smollm2()
    windows = token_windows(tok, read_wikitext("test"), args.window, args.windows)
    print(f"SmolLM2-135M-Instruct, WikiText-2 test: first {args.windows} windows of {args.window} tokens; "
          f"decode {args.decode_tokens} tokens; CPU path {lorakern.active_isa()}, {torch.get_num_threads()} threads")
    rows = []

    def evaluate(name, m, bits, avg_bits):
        ppl = perplexity(m, windows, desc=f"ppl {name}")
        tps = decode_tokens_per_second(m, tok, new_tokens=args.decode_tokens)
        rows.append({"model": name, "bits": bits, "avg_bits": avg_bits, "ppl": ppl, "decode_tok_s": tps})
        print(f"  {name:10} bits/weight {avg_bits:6.2f}   ppl {ppl:8.3f}   decode {tps:6.1f} tok/s", flush=True)

    evaluate("fp32", model, 32, 32.0)
    for bits in args.bits:
        qm = lorakern.quantize_model(copy.deepcopy(model), bits=bits, group_size=args.group_size)
        layers = [m for m in qm.modules() if isinstance(m, lorakern.QuantLinear)]
        avg = sum(8 * m.quantized_weight.nbytes() for m in layers) / sum(m.in_features * m.out_features for m in layers)
        groups = sorted(set(qm.lorakern_quantization["layers"].values()))
        evaluate(f"rtn-{bits}bit", qm, bits, avg)
        rows[-1]["group_sizes"] = groups
        del qm
    print(f"(quantized: every linear layer but lm_head, round to nearest, group {args.group_size}; "
          f"layers with in_features=576 use group 64. {time.time() - t0:.0f} s in all)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": "SmolLM2-135M-Instruct", "windows": args.windows, "window": args.window,
                       "isa": lorakern.active_isa(), "rows": rows}, f, indent=1)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="lorakern", description="lorakern: kernels for low-bit LLMs with many LoRA adapters")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="quantize SmolLM2-135M; WikiText-2 perplexity and decode speed vs fp32")
    d.add_argument("--bits", type=int, nargs="+", default=[4, 3], help="bit widths (default 4 3)")
    d.add_argument("--group-size", type=int, default=128)
    d.add_argument("--windows", type=int, default=8, help="512-token windows of test.txt (default 8)")
    d.add_argument("--window", type=int, default=512)
    d.add_argument("--decode-tokens", type=int, default=32)
    d.add_argument("--json", help="also write the results here")
    d.set_defaults(fn=_demo)
    i = sub.add_parser("info", help="versions and CPU kernel paths")
    i.set_defaults(fn=_info)
    args = ap.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
