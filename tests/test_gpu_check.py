"""benchmarks/gpu_check.py's CPU-side logic: the device table, the JUnit report parser, the byte counts and
rooflines of its rows, and its no-GPU path (it says so, writes a result file without rows, exits 0)."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def gc():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_peak_bandwidth_table(gc):
    assert gc.peak_bandwidth("NVIDIA H200") == 4.8e12
    assert gc.peak_bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12
    assert gc.peak_bandwidth("NVIDIA H100 PCIe") == 2.0e12  # the longer key wins
    assert gc.peak_bandwidth("NVIDIA A100-SXM4-80GB") == 2.039e12
    assert gc.peak_bandwidth("Some Future GPU") is None and gc.peak_bandwidth(None) is None


def test_parse_junit(gc, tmp_path):
    p = tmp_path / "r.xml"
    p.write_text("""<?xml version="1.0"?><testsuites><testsuite name="pytest">
<testcase classname="tests.test_cuda" name="test_a"/>
<testcase classname="tests.test_cuda" name="test_b"><failure message="AssertionError: max err 3">trace</failure></testcase>
<testcase classname="tests.test_cuda" name="test_c"><skipped message="no GPU"/></testcase>
<testcase classname="tests.test_cuda" name="test_d"><error message="">RuntimeError: CUDA error\nmore</error></testcase>
<testcase classname="tests.test_cuda" name="test_e"/>
</testsuite></testsuites>""")
    r = gc.parse_junit(p)
    assert (r["passed"], r["failed"], r["skipped"]) == (2, 2, 1)
    assert r["failures"] == [{"test": "tests.test_cuda::test_b", "message": "AssertionError: max err 3"},
                             {"test": "tests.test_cuda::test_d", "message": "RuntimeError: CUDA error"}]


def test_byte_counts_and_rows(gc):
    # 4-bit 256 x 512, group 128: codes 65536 B, scales+zeros 2*2*256*4 = 4096 B, x 2*512, y 2*256 (fp16)
    assert gc.quant_bytes(256, 512, 4, 128, 1) == 65536 + 4096 + 1024 + 512
    assert gc.quant_bytes(256, 512, 4, 128, 1, nnz=10) == 65536 + 4096 + 40 + 257 * 4 + 1536
    # rank 16, h = 4 at 2 bits: (4*2 + 12) * (N + K) / 8 code bytes
    assert gc.lora_bytes(256, 512, 16, 4, 2, 128, 1) == 20 * 768 // 8 + 2 * 2 * 16 * (4 + 2) + 1024 + 1024
    assert gc.dense_lora_bytes(256, 512, 16, 3, 2) == 3 * 16 * 768 * 2 + 2 * 512 * 2 + 2 * 2 * 256 * 2
    r = gc.row("quant_matmul", "x", (256, 512), 1, (0.01, 0.009, 0.012), 10_000_000, 4.8e12, bits=4)
    assert r["achieved_GBps"] == pytest.approx(1000.0) and r["roofline_ms"] == pytest.approx(10e6 / 4.8e12 * 1e3)
    assert r["fraction_of_peak"] == pytest.approx(1e12 / 4.8e12) and r["bits"] == 4
    assert "roofline_ms" not in gc.row("m", "x", (1, 1), 1, (1.0, 1.0, 1.0), 10, None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU path")
def test_without_a_gpu_it_says_so_and_writes_an_empty_result(gc, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    out = tmp_path / "gpu.json"
    assert gc.main(["--json", str(out)]) == 0
    assert "no CUDA device" in capsys.readouterr().out
    d = json.loads(out.read_text())
    assert d["device"] is None and d["rows"] == [] and d["tests_failed"] == 0
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert gc.main(["--json", str(out)]) == 2  # refuses to time the interpreter


def test_timing_code_runs_at_small_shapes_on_the_cpu(gc):
    """The timing section's calls (argument lists, byte counts) on the CPU kernels, timed by a stand-in."""
    calls = []

    def bench(fn):
        out = fn()
        assert torch.isfinite(out).all()
        calls.append(out.shape)
        return (1.0, 0.9, 1.1)
    rows = gc.timing_rows(True, 4.8e12, device="cpu", bench=bench, shapes=[(256, 512)], Ms=[1, 3],
                          lora_shape=(256, 512), adapters=4)
    ops = {(r["op"], r["impl"]) for r in rows}
    assert ops == {("matmul", "torch_fp16"), ("quant_matmul", "lorakern_4bit"), ("quant_matmul", "lorakern_3bit"),
                   ("gwq_matmul", "lorakern_4bit_1pct"), ("lora", "torch_fp16"), ("lora_mixed", "lorakern_loraquant"),
                   ("multi_lora", "torch_gather_bmm"), ("multi_lora", "lorakern_fp16_bank")}
    assert len(rows) == len(calls) and all(r["bytes"] > 0 and r["roofline_ms"] > 0 for r in rows)


def test_pytest_command(gc, tmp_path):
    import importlib.util
    cmd = gc.pytest_command(tmp_path / "r.xml", workers=8, extra=["-k", "quant"])
    assert cmd[1:3] == ["-m", "pytest"] and f"--junitxml={tmp_path / 'r.xml'}" in cmd and cmd[-2:] != ["-n", "1"]
    assert ("-n" in cmd) == (importlib.util.find_spec("xdist") is not None)
    assert "-n" not in gc.pytest_command(tmp_path / "r.xml", workers=1)


def test_a_run_without_a_report_counts_as_a_failure(gc, tmp_path, monkeypatch):
    import sys
    monkeypatch.setattr(gc, "pytest_command", lambda junit, extra=(): [sys.executable, "-c", "print('boom')"])
    r = gc.run_tests(tmp_path / "none.xml", timeout=60)
    assert r["failed"] == 1 and r["passed"] == 0 and "boom" in r["failures"][0]["message"]
    monkeypatch.setattr(gc, "pytest_command", lambda junit, extra=(): [sys.executable, "-c", "import time; time.sleep(5)"])
    r = gc.run_tests(tmp_path / "none.xml", timeout=1)
    assert r["failed"] == 1 and "timed out" in r["failures"][0]["message"]
