"""Triton kernels in the interpreter (TRITON_INTERPRET=1, set in conftest) on CPU tensors."""
import pytest
import torch

from lorakern.ops import reference as ref
from lorakern.triton.quant_matmul import CONFIGS, dequantize_triton, quant_matmul_triton

from lorakern.testing import DOT_EPS, fp_bound, interpreter_bf16_dot_xfail, random_qweight

INTERPRETER_BF16_DOT = interpreter_bf16_dot_xfail()


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("G", [32, 64, 128])
def test_triton_dequantize_exact(bits, G):
    w = random_qweight(45, 3 * G, bits, G)
    assert torch.equal(dequantize_triton(w.qweight, w.scales, w.zeros, bits, G), w.dequantize())


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("G", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=INTERPRETER_BF16_DOT),
                                   torch.float32])
def test_triton_quant_matmul_matches_reference(bits, G, dtype, rng):
    M, N, K = 5, 67, 2 * G
    w = random_qweight(N, K, bits, G, rng)
    x = torch.randn(M, K, generator=rng).to(dtype)
    bias = torch.randn(N, generator=rng)
    y = quant_matmul_triton(x, w.qweight, w.scales, w.zeros, bits, G, bias)
    assert y.dtype == dtype and y.shape == (M, N)
    expect = ref.quant_matmul(x, w.qweight, w.scales, w.zeros, bits, G, bias).float()
    # w is rounded to the dot dtype once per element; accumulation is fp32
    tol = fp_bound(x, w, 2 * DOT_EPS[dtype]) + DOT_EPS[dtype] * expect.abs() + 1e-5
    assert ((y.float() - expect).abs() <= tol).all()


@pytest.mark.parametrize("config", list(CONFIGS))
def test_triton_every_config_with_partial_tiles(config):
    M = {"decode": 3, "small": 19, "medium": 37, "large": 70}[config]
    w = random_qweight(70, 128, 4, 64)
    x = torch.randn(M, 128, dtype=torch.float16)
    y = quant_matmul_triton(x, w.qweight, w.scales, w.zeros, 4, 64, None, config=config)
    expect = ref.quant_matmul(x, w.qweight, w.scales, w.zeros, 4, 64).float()
    tol = fp_bound(x, w, 2 * DOT_EPS[torch.float16]) + DOT_EPS[torch.float16] * expect.abs() + 1e-5
    assert ((y.float() - expect).abs() <= tol).all()
