"""Ahead-of-time compilation of every Triton kernel and config, without a GPU.

``python -m lorakern.triton.aot [--arch 80 90] [--quick] [--json PATH]`` builds
PTX and cubins for sm_80 and sm_90 with ``triton.compile`` and a ``GPUTarget``,
then reads each cubin's resource use with the ptxas that Triton ships
(registers, spill stores/loads, shared memory) and checks the PTX uses tensor
cores (``mma``) where a ``tl.dot`` is meant. Exits non-zero if anything fails.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

__all__ = ["jobs", "compile_one", "main"]

_DT = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}


def jobs(quick: bool = False):
    """Every (kernel, parameters) pair to build (kernel modules imported when needed: import time)."""
    from .quant_matmul import CONFIGS
    out = []
    bits_list = (4, 3) if quick else (1, 2, 3, 4, 8)
    groups = (128, 32) if quick else (32, 64, 128)
    for bits in bits_list:
        for G in groups:
            for cfg in CONFIGS:
                dtypes = ("fp16", "bf16", "fp32") if (bits, G) == (4, 128) else ("fp16",)
                for dt in dtypes:
                    out.append(("quant_matmul", dict(bits=bits, G=G, config=cfg, dtype=dt)))
            out.append(("dequantize", dict(bits=bits, G=G)))
    # gwq_matmul: the same kernel with the outlier epilogue
    for bits in ((4, 3) if quick else (2, 3, 4)):
        for cfg in CONFIGS:
            for dt in (("fp16", "bf16", "fp32") if bits == 4 else ("fp16",)):
                out.append(("gwq_matmul", dict(bits=bits, G=128, config=cfg, dtype=dt)))
    # training on a quantized base: the gradient kernel; unmerged QA-LoRA: quant_matmul with the pooled adapter
    from .grad_input import CONFIGS as GRAD_CONFIGS
    for bits in ((4, 2) if quick else (1, 2, 3, 4, 8)):
        for cfg in GRAD_CONFIGS:
            for dt in (("fp16", "bf16", "fp32") if bits == 4 else ("fp16",)):
                out.append(("grad_input", dict(bits=bits, G=64, config=cfg, dtype=dt)))
    for bits in ((4,) if quick else (2, 3, 4)):
        for R in (16, 64):
            for cfg in (("decode", "large") if quick else CONFIGS):
                if cfg == "large" and R > 16:
                    continue  # launch_matmul runs "medium" there
                for dt in (("fp16", "bf16", "fp32") if (bits, R) == (4, 16) else ("fp16",)):
                    out.append(("qalora_matmul", dict(bits=bits, G=64, config=cfg, dtype=dt, R=R)))
    # compressed LoRA: shrink per part (high bits, and the 1-bit low part), expand over both parts
    ranks = (16,) if quick else (16, 64)
    for bits in ((2, 1) if quick else (1, 2, 3, 4, 8)):
        for G in ((128,) if quick else (32, 64, 128)):
            for M in (1, 64):
                for R in (ranks if G == 128 else (16,)):
                    for dt in (("fp16", "bf16", "fp32") if (bits, G, M, R) == (2, 128, 1, 16) else ("fp16",)):
                        out.append(("lora_shrink", dict(bits=bits, G=G, M=M, R=R, dtype=dt)))
                    if bits != 1:
                        out.append(("lora_expand", dict(bits=bits, G=G, M=M, R=R, dtype="fp16")))
    # multi-adapter shrink/expand (bits are per row at run time: bits=0 here), M = the largest segment
    for G in ((128,) if quick else (32, 64, 128)):
        for M in (1, 64):
            for R in (ranks if G == 128 else (16,)):
                for dt in (("fp16", "bf16", "fp32") if (G, M, R) == (128, 1, 16) else ("fp16",)):
                    for sk in ((1, 4) if M == 1 else (1,)):
                        out.append(("multi_shrink", dict(bits=0, G=G, M=M, R=R, dtype=dt, split_k=sk)))
                    for atomic in (False, True):
                        out.append(("multi_expand", dict(bits=0, G=G, M=M, R=R, dtype=dt, atomic=atomic)))
    return out


def _ptxas_info(ptx: str, arch: int) -> dict:
    from triton.backends.nvidia.compiler import get_ptxas
    ptxas = get_ptxas(arch).path  # the same ptxas Triton used for this arch
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        sm = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
        r = subprocess.run([ptxas, "-v", f"--gpu-name={sm}", src, "-o", os.path.join(d, "k.cubin")],
                           capture_output=True, text=True)
    text = r.stdout + r.stderr
    if r.returncode:
        raise RuntimeError(f"ptxas failed: {text[-2000:]}")
    regs = re.findall(r"Used (\d+) registers", text)
    st = re.findall(r"(\d+) bytes spill stores", text)
    ld = re.findall(r"(\d+) bytes spill loads", text)
    return {"registers": int(regs[-1]) if regs else -1, "spill_stores": int(st[-1]) if st else 0,
            "spill_loads": int(ld[-1]) if ld else 0}


def compile_one(args):
    """Compile one kernel for one arch; returns a result row (never raises)."""
    kernel, params, arch = args
    row = {"kernel": kernel, "arch": f"sm_{arch}", **params}
    t0 = time.time()
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        from . import quant_matmul as qm
        bits, G = params["bits"], params["G"]
        if kernel in ("quant_matmul", "gwq_matmul", "qalora_matmul"):
            cfg = dict(qm.CONFIGS[params["config"]])
            dt = params["dtype"]
            sig = {"x_ptr": _DT[dt], "qw_ptr": "*u8", "s_ptr": "*fp16", "z_ptr": "*fp16", "b_ptr": "*fp32",
                   "y_ptr": _DT[dt], "rp_ptr": "*i32", "col_ptr": "*u16", "val_ptr": "*fp16", "nnz": "i32",
                   "a_ptr": "*fp32", "bt_ptr": "*fp32", "rank": "i32", "qa_scale": "fp32",
                   "M": "i32", "N": "i32", "K": "i32", "row_bytes": "i32",
                   "stride_xm": "i32", "stride_ym": "i32", "HAS_BIAS": "constexpr", "HAS_OUTLIERS": "constexpr",
                   "BITS": "constexpr", "G": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
                   "BLOCK_K": "constexpr", "DOT_FP32": "constexpr", "HAS_QALORA": "constexpr",
                   "BLOCK_R": "constexpr"}
            const = {"HAS_BIAS": True, "HAS_OUTLIERS": kernel == "gwq_matmul", "BITS": bits, "G": G,
                     "BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"], "BLOCK_K": qm.BLOCK_K,
                     "DOT_FP32": dt == "fp32", "HAS_QALORA": kernel == "qalora_matmul",
                     "BLOCK_R": qm.qalora_block_r(params.get("R", 16))}
            fn, opts = qm.quant_matmul_kernel, dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        elif kernel == "grad_input":
            from . import grad_input as gi
            cfg = dict(gi.CONFIGS[params["config"]])
            dt = params["dtype"]
            sig = {"g_ptr": _DT[dt], "qw_ptr": "*u8", "s_ptr": "*fp16", "z_ptr": "*fp16", "dx_ptr": _DT[dt],
                   "M": "i32", "N": "i32", "K": "i32", "row_bytes": "i32", "stride_gm": "i32", "stride_dm": "i32",
                   "BITS": "constexpr", "G": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
                   "BLOCK_K": "constexpr", "DOT_FP32": "constexpr"}
            const = {"BITS": bits, "G": G, "BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"],
                     "BLOCK_K": gi.BLOCK_K, "DOT_FP32": dt == "fp32"}
            fn, opts = gi.grad_input_kernel, dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        elif kernel == "lora_shrink":
            from . import lora_mixed as lm
            dt = params["dtype"]
            sig = {"x_ptr": _DT[dt], "qw_ptr": "*u8", "s_ptr": "*fp16", "z_ptr": "*fp16", "t_ptr": "*fp32",
                   "M": "i32", "R": "i32", "K": "i32", "row_bytes": "i32", "stride_xm": "i32", "stride_tm": "i32",
                   "t_col0": "i32", "BITS": "constexpr", "G": "constexpr", "BLOCK_M": "constexpr",
                   "BLOCK_R": "constexpr", "BLOCK_K": "constexpr", "DOT_FP32": "constexpr"}
            const = {"BITS": bits, "G": G, "BLOCK_M": lm.block_m(params["M"], params["R"]),
                     "BLOCK_R": lm.block_r(params["R"]),
                     "BLOCK_K": lm.shrink_block_k(G), "DOT_FP32": dt == "fp32"}
            fn, opts = lm.lora_shrink_kernel, dict(num_warps=4)
        elif kernel == "lora_expand":
            from . import lora_mixed as lm
            dt = params["dtype"]
            sig = {"t_ptr": "*fp32", "base_ptr": _DT[dt], "y_ptr": _DT[dt], "qh_ptr": "*u8", "sh_ptr": "*fp16",
                   "zh_ptr": "*fp16", "ql_ptr": "*u8", "sl_ptr": "*fp16", "zl_ptr": "*fp16", "M": "i32", "N": "i32",
                   "H": "i32", "RL": "i32", "rb_hi": "i32", "rb_lo": "i32", "stride_tm": "i32", "stride_bm": "i32",
                   "stride_ym": "i32", "scale": "fp32", "BITS_HI": "constexpr", "G": "constexpr",
                   "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_RH": "constexpr", "BLOCK_RL": "constexpr",
                   "HAS_HI": "constexpr", "HAS_LO": "constexpr", "HAS_BASE": "constexpr"}
            R = params["R"]
            const = {"BITS_HI": bits, "G": G, "BLOCK_M": lm.block_m(params["M"], R),
                     "BLOCK_N": lm.expand_block_n(G, R),
                     "BLOCK_RH": lm.block_r(R // 4), "BLOCK_RL": lm.block_r(R - R // 4), "HAS_HI": True,
                     "HAS_LO": True, "HAS_BASE": True}
            fn, opts = lm.lora_expand_kernel, dict(num_warps=4)
        elif kernel == "multi_shrink":
            from . import multi_lora as ml
            dt, R = params["dtype"], params["R"]
            sig = {"x_ptr": _DT[dt], "tok_ptr": "*i64", "w_ptr": "*fp32", "seg_ptr": "*i64", "table_ptr": "*i64",
                   "scales_ptr": "*fp32", "da_ptr": _DT[dt], "qa_ptr": "*u8", "qas_ptr": "*fp16", "qaz_ptr": "*fp16",
                   "t_ptr": "*fp32", "T": "i32", "K": "i32", "stride_xm": "i32", "ldt": "i32", "nga": "i32",
                   "k_per_split": "i32", "num_slots": "i32", "E": "i32", "drows": "i32", "qrows": "i32",
                   "qa_bytes": "i64", "GA": "constexpr", "BLOCK_M": "constexpr", "BLOCK_R": "constexpr",
                   "BLOCK_K": "constexpr", "DOT_FP32": "constexpr", "SPLIT_K": "constexpr"}
            BR = ml._block_r(R)
            const = {"GA": G, "BLOCK_M": ml.shrink_block_m(params["M"], BR), "BLOCK_R": BR, "BLOCK_K": ml.shrink_block_k(BR),
                     "DOT_FP32": dt == "fp32", "SPLIT_K": params["split_k"]}
            fn, opts = ml.multi_shrink_kernel, dict(num_warps=4)
        elif kernel == "multi_expand":
            from . import multi_lora as ml
            dt, R = params["dtype"], params["R"]
            sig = {"t_ptr": "*fp32", "tok_ptr": "*i64", "seg_ptr": "*i64", "table_ptr": "*i64", "db_ptr": _DT[dt],
                   "qb_ptr": "*u8", "qbs_ptr": "*fp16", "qbz_ptr": "*fp16",
                   "y_ptr": "*fp32" if params["atomic"] else _DT[dt], "T": "i32", "N": "i32", "ldt": "i32",
                   "stride_ym": "i32", "ngb": "i32", "num_slots": "i32", "E": "i32", "drows": "i32", "qrows": "i32",
                   "qb_bytes": "i64", "GB": "constexpr", "BLOCK_M": "constexpr", "BLOCK_R": "constexpr",
                   "BLOCK_N": "constexpr", "ATOMIC": "constexpr"}
            BR = ml._block_r(R)
            const = {"GB": G, "BLOCK_M": ml._block_m(params["M"], BR), "BLOCK_R": BR,
                     "BLOCK_N": ml.expand_block_n(BR, G), "ATOMIC": params["atomic"]}
            fn, opts = ml.multi_expand_kernel, dict(num_warps=4)
        else:
            sig = {"qw_ptr": "*u8", "s_ptr": "*fp16", "z_ptr": "*fp16", "out_ptr": "*fp32", "N": "i32", "K": "i32",
                   "row_bytes": "i32", "BITS": "constexpr", "G": "constexpr", "BLOCK_N": "constexpr"}
            const = {"BITS": bits, "G": G, "BLOCK_N": qm.DEQUANT_BLOCK_N}
            fn, opts = qm.dequantize_kernel, dict(num_warps=4)
        src = ASTSource(fn, sig, constexprs=const)
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)
        ptx = k.asm["ptx"]
        row.update(_ptxas_info(ptx, arch))
        row["shared_bytes"] = int(k.metadata.shared)
        row["cubin_bytes"] = len(k.asm["cubin"])
        row["mma"] = bool(re.search(r"\bmma\.sync|\bwgmma\.", ptx))
        row["ok"] = True
        if kernel != "dequantize" and not row["mma"]:
            row["ok"] = False
            row["error"] = "no tensor-core instruction (mma/wgmma) in the PTX"
    except Exception as e:  # report, don't raise: the summary decides the exit code
        row["ok"] = False
        row["error"] = f"{type(e).__name__}: {str(e)[:500]}"
    row["seconds"] = round(time.time() - t0, 2)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lorakern.triton.aot", description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities (default 80 90)")
    ap.add_argument("--quick", action="store_true", help="a subset of bit widths and group sizes")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", help="write the per-kernel rows here")
    a = ap.parse_args(argv)
    work = [(k, p, arch) for arch in a.arch for k, p in jobs(a.quick)]
    with ProcessPoolExecutor(max_workers=a.jobs) as ex:
        rows = list(ex.map(compile_one, work))
    hdr = f"{'kernel':13} {'arch':6} {'bits':>4} {'G':>4} {'config':7} {'dtype':5} {'regs':>4} {'spill':>5} {'smem':>6} {'mma':>4}  status"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        cfg = r.get("config") or (f"M{r['M']}R{r['R']}" if "R" in r else "-")
        print(f"{r['kernel']:13} {r['arch']:6} {r['bits']:>4} {r['G']:>4} {cfg:7} "
              f"{r.get('dtype', 'fp32'):5} {r.get('registers', -1):>4} {r.get('spill_stores', -1):>5} "
              f"{r.get('shared_bytes', -1):>6} {str(r.get('mma', '-')):>4}  {'ok' if r['ok'] else 'FAIL ' + r['error']}")
    bad = [r for r in rows if not r["ok"]]
    spills = [r for r in rows if r.get("spill_stores", 0) > 0]
    print(f"\n{len(rows) - len(bad)}/{len(rows)} kernels compiled; {len(spills)} with register spills")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
