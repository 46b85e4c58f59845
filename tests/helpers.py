"""Shared test helpers: random quantized weights and error bounds."""
import torch

from lorakern.formats import QuantizedWeight, pack_codes
from lorakern.formats.packing import unpack_codes


def random_qweight(N, K, bits, G, gen=None, device="cpu") -> QuantizedWeight:
    """Random codes, positive scales and fractional zeros (not an RTN result)."""
    q = torch.randint(0, 1 << bits, (N, K), generator=gen, dtype=torch.int32)
    s = (torch.rand(N, K // G, generator=gen) * 0.05 + 0.005).half()
    z = (torch.rand(N, K // G, generator=gen) * ((1 << bits) - 1)).half()
    return QuantizedWeight(pack_codes(q, bits, G), s, z, bits, G).to(device)


def int8_act_bound(x, w: QuantizedWeight):
    """Worst-case |kernel - fp32 reference| from int8 activation rounding:
    sum_g |s_g| * (xs_g / 2) * sum_i q_i, with xs_g = max|x_g| / 127."""
    N, K = w.shape
    G = w.group_size
    xg = x.reshape(-1, K).float().view(-1, K // G, G)
    half_step = xg.abs().amax(-1) / 127.0 / 2  # [M, ng]
    qsum = unpack_codes(w.qweight, w.bits, G).float().view(N, K // G, G).sum(-1)  # [N, ng]
    return half_step @ (w.scales.float().abs() * qsum).t()  # [M, N]


def fp_bound(x, w: QuantizedWeight, eps: float):
    """|x| @ |W|^T * eps: the size of rounding of terms of the dot product."""
    return x.reshape(-1, w.in_features).float().abs() @ w.dequantize().abs().t() * eps
