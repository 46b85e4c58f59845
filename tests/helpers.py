"""Shared test helpers: random quantized weights and error bounds."""
import torch

from lorakern.formats import QuantizedWeight, pack_codes


def random_qweight(N, K, bits, G, gen=None, device="cpu") -> QuantizedWeight:
    """Random codes, positive scales and fractional zeros (not an RTN result)."""
    q = torch.randint(0, 1 << bits, (N, K), generator=gen, dtype=torch.int32)
    s = (torch.rand(N, K // G, generator=gen) * 0.05 + 0.005).half()
    z = (torch.rand(N, K // G, generator=gen) * ((1 << bits) - 1)).half()
    return QuantizedWeight(pack_codes(q, bits, G), s, z, bits, G).to(device)


def int8_act_bound(x, w: QuantizedWeight):
    """Worst-case |kernel - fp32 reference| from int8 activation rounding:
    |x - xhat| <= xs_b / 2 per element (xs_b = max|x_b| / 127 over blocks b of
    min(G, 64) values), times |W|."""
    K = w.in_features
    B = min(w.group_size, 64)
    half_step = x.reshape(-1, K // B, B).float().abs().amax(-1, keepdim=True) / 127.0 / 2
    return half_step.expand(-1, -1, B).reshape(-1, K) @ w.dequantize().abs().t()


def fp_bound(x, w: QuantizedWeight, eps: float):
    """|x| @ |W|^T * eps: the size of rounding of terms of the dot product."""
    return x.reshape(-1, w.in_features).float().abs() @ w.dequantize().abs().t() * eps


OUTLIER_PATTERNS = ("none", "one_per_row", "1pct", "5pct", "full_row")


def random_outliers(N, K, pattern, gen=None, device="cpu"):
    """CSR outliers of a given pattern: none, one per row, ~1%, ~5%, or one row of
    only outliers with empty rows elsewhere. Values ~ 4*U(-1, 1)."""
    from lorakern.formats import SparseOutliers
    if pattern == "none":
        mask = torch.zeros(N, K, dtype=torch.bool)
    elif pattern == "one_per_row":
        mask = torch.zeros(N, K, dtype=torch.bool)
        mask[torch.arange(N), torch.randint(0, K, (N,), generator=gen)] = True
    elif pattern in ("1pct", "5pct"):
        mask = torch.rand(N, K, generator=gen) < (0.01 if pattern == "1pct" else 0.05)
    else:
        mask = torch.zeros(N, K, dtype=torch.bool)
        mask[N // 2] = True
    vals = (torch.rand(N, K, generator=gen) * 2 - 1) * 4
    return SparseOutliers.from_mask(mask, vals).to(device)
