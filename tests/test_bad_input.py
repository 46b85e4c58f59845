"""Bad input gets a clear Python exception before any kernel runs."""
import pytest
import torch

from lorakern.testing import random_qweight

OP = torch.ops.lorakern.quant_matmul


@pytest.fixture
def w():
    return random_qweight(16, 128, 4, 64)


def test_wrong_activation_dtype(w):
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        OP(torch.randint(0, 5, (2, 128)), w.qweight, w.scales, w.zeros, 4, 64)
    with pytest.raises(TypeError):
        OP(torch.randn(2, 128, dtype=torch.float64), w.qweight, w.scales, w.zeros, 4, 64)


def test_wrong_k(w):
    with pytest.raises(ValueError, match="last dimension K=128"):
        OP(torch.randn(2, 96), w.qweight, w.scales, w.zeros, 4, 64)


def test_k_not_multiple_of_group():
    q = torch.zeros(4, 48, dtype=torch.uint8)  # K = 96
    s = torch.ones(4, 1, dtype=torch.float16)
    with pytest.raises(ValueError, match="multiple of group_size"):
        OP(torch.randn(1, 96), q, s, s, 4, 64)


def test_bad_bits_and_group(w):
    with pytest.raises(ValueError, match="bits"):
        OP(torch.randn(1, 128), w.qweight, w.scales, w.zeros, 5, 64)
    with pytest.raises(ValueError, match="group_size"):
        OP(torch.randn(1, 128), w.qweight, w.scales, w.zeros, 4, 16)


def test_mismatched_scales_and_dtypes(w):
    with pytest.raises(ValueError, match="scales must have shape"):
        OP(torch.randn(1, 128), w.qweight, w.scales[:, :1].contiguous(), w.zeros, 4, 64)
    with pytest.raises(TypeError, match="zeros must be float16"):
        OP(torch.randn(1, 128), w.qweight, w.scales, w.zeros.float(), 4, 64)
    with pytest.raises(TypeError, match="uint8"):
        OP(torch.randn(1, 128), w.qweight.to(torch.int8), w.scales, w.zeros, 4, 64)


def test_bias_checks(w):
    with pytest.raises(ValueError, match="bias must have shape"):
        OP(torch.randn(1, 128), w.qweight, w.scales, w.zeros, 4, 64, torch.randn(15))
    with pytest.raises(TypeError, match="bias must be floating"):
        OP(torch.randn(1, 128), w.qweight, w.scales, w.zeros, 4, 64, torch.ones(16, dtype=torch.int32))


def test_device_mismatch(w):
    with pytest.raises(ValueError, match="is on meta"):
        OP(torch.randn(1, 128, device="meta"), w.qweight, w.scales, w.zeros, 4, 64)


def test_isa_switch_rejects_unknown():
    import lorakern
    with pytest.raises(ValueError, match="unknown ISA"):
        lorakern.set_isa("sse9")


def test_missing_extension_is_a_clear_error_at_first_use():
    """Import works without lorakern._C; the first CPU kernel call says what is wrong."""
    import subprocess
    import sys
    code = ("import sys; sys.modules['lorakern._C'] = None\n"
            "import torch, lorakern\n"
            "w = lorakern.quantize_rtn(torch.randn(8, 64), 4, 32)\n"
            "try:\n"
            "    torch.ops.lorakern.quant_matmul(torch.randn(1, 64), w.qweight, w.scales, w.zeros, 4, 32)\n"
            "except lorakern.NativeLibraryError as e:\n"
            "    print('ERR', e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "ERR" in r.stdout and "pip install -e ." in r.stdout
