"""Safetensors files: round trips exact; truncated, corrupted and lying files rejected."""
import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from lorakern.formats import FormatError, load_quantized, save_quantized
from lorakern.nn import QuantLinear

from lorakern.testing import random_qweight


@pytest.fixture
def saved(tmp_path):
    w = random_qweight(9, 96, 3, 32)
    p = tmp_path / "w.safetensors"
    save_quantized(p, {"layer": w}, extra_tensors={"bias": torch.randn(9)})
    return p, w


def test_roundtrip_exact(saved):
    p, w = saved
    ws, others, meta = load_quantized(p)
    v = ws["layer"]
    assert (v.bits, v.group_size, v.shape) == (3, 32, (9, 96))
    for a, b in ((v.qweight, w.qweight), (v.scales, w.scales), (v.zeros, w.zeros)):
        assert torch.equal(a, b)
    assert torch.equal(v.codes(), w.codes())
    assert set(others) == {"bias"} and meta["format"] == "lorakern.quant"


def _rewrite_meta(path, **changes):
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    header["__metadata__"].update(changes)
    new = json.dumps(header).encode()
    new += b" " * ((8 - len(new) % 8) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def test_truncated_file(saved):
    p, _ = saved
    raw = p.read_bytes()
    for cut in (4, 20, len(raw) - 7):
        p.write_bytes(raw[:cut])
        with pytest.raises(FormatError):
            load_quantized(p)


def test_garbage_header(saved):
    p, _ = saved
    raw = bytearray(p.read_bytes())
    raw[10:30] = b"\xff" * 20
    p.write_bytes(bytes(raw))
    with pytest.raises(FormatError):
        load_quantized(p)


def test_huge_header_length(saved):
    p, _ = saved
    raw = p.read_bytes()
    p.write_bytes(struct.pack("<Q", 2**62) + raw[8:])
    with pytest.raises(FormatError):
        load_quantized(p)


@pytest.mark.parametrize("changes, match", [
    ({"layer.bits": "4"}, "inconsistent"),
    ({"layer.bits": "four"}, "not an integer"),
    ({"layer.group_size": "64"}, "inconsistent"),
    ({"layer.shape": "9,128"}, "metadata says shape"),
    ({"layer.shape": "oops"}, "malformed"),
    ({"format": "gguf"}, "not a lorakern"),
    ({"format_version": "99"}, "not supported"),
    ({"weights": '["layer", "ghost"]'}, "missing"),
    ({"weights": "{not json"}, "malformed"),
])
def test_lying_metadata(saved, changes, match):
    p, _ = saved
    _rewrite_meta(p, **changes)
    with pytest.raises(FormatError, match=match):
        load_quantized(p)


def test_wrong_tensor_shapes_and_dtypes(tmp_path):
    w = random_qweight(4, 64, 4, 32)
    meta = {"format": "lorakern.quant", "format_version": "1", "weights": '["a"]', "a.bits": "4",
            "a.group_size": "32", "a.shape": "4,64"}
    cases = [
        {"a.qweight": w.qweight[:, :-1].contiguous(), "a.scales": w.scales, "a.zeros": w.zeros},
        {"a.qweight": w.qweight, "a.scales": w.scales.float(), "a.zeros": w.zeros},
        {"a.qweight": w.qweight, "a.scales": w.scales[:3].contiguous(), "a.zeros": w.zeros},
        {"a.qweight": w.qweight, "a.scales": torch.full_like(w.scales, float("nan")), "a.zeros": w.zeros},
        {"a.qweight": w.qweight, "a.scales": w.scales},
    ]
    for i, tensors in enumerate(cases):
        p = tmp_path / f"c{i}.safetensors"
        save_file(tensors, str(p), metadata=meta)
        with pytest.raises(FormatError):
            load_quantized(p)


def test_quantlinear_load_rejects_other_files(tmp_path):
    p = tmp_path / "two.safetensors"
    save_quantized(p, {"a": random_qweight(4, 64, 4, 32), "b": random_qweight(4, 64, 4, 32)})
    with pytest.raises(FormatError, match="not a QuantLinear"):
        QuantLinear.load(p)
    with pytest.raises(FileNotFoundError):
        QuantLinear.load(tmp_path / "missing.safetensors")
