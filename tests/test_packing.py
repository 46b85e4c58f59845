import pytest
import torch

from lorakern.formats import pack_codes, unpack_codes


def _naive_byte_layout(q, bits, G):
    """The layout of docs/formats.md written out one code at a time."""
    N, K = q.shape
    gb = G * bits // 8
    out = torch.zeros(N, K * bits // 8, dtype=torch.int64)
    for n in range(N):
        for k in range(K):
            g, i = divmod(k, G)
            base = g * gb
            v = int(q[n, k])
            if bits == 8:
                out[n, base + i] = v
            elif bits == 1:
                out[n, base + i // 8] |= v << (i % 8)
            elif bits in (2, 4):
                W = G * bits // 8
                out[n, base + i % W] |= v << ((i // W) * bits)
            else:  # 3
                W = G // 4
                out[n, base + i % W] |= (v & 3) << ((i // W) * 2)
                out[n, base + W + i // 8] |= ((v >> 2) & 1) << (i % 8)
    return out.to(torch.uint8)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("G", [32, 64, 128])
def test_pack_matches_documented_layout_and_roundtrips(bits, G):
    q = torch.randint(0, 1 << bits, (3, 2 * G), dtype=torch.int32)
    p = pack_codes(q, bits, G)
    assert p.dtype == torch.uint8 and p.shape == (3, 2 * G * bits // 8)
    assert torch.equal(p, _naive_byte_layout(q, bits, G))
    assert torch.equal(unpack_codes(p, bits, G).to(torch.int32), q)


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="out of range"):
        pack_codes(torch.full((2, 32), 16), 4, 32)
    with pytest.raises(ValueError, match="multiple"):
        pack_codes(torch.zeros(2, 48, dtype=torch.int32), 4, 32)
    with pytest.raises(ValueError, match="bits"):
        pack_codes(torch.zeros(2, 32, dtype=torch.int32), 5, 32)
    with pytest.raises(ValueError, match="out of range"):
        pack_codes(torch.full((2, 32), 2), 1, 32)
    with pytest.raises(ValueError, match="group_size"):
        pack_codes(torch.zeros(2, 96, dtype=torch.int32), 4, 96)
    with pytest.raises(TypeError):
        pack_codes(torch.zeros(2, 32), 4, 32)
    with pytest.raises(ValueError):
        unpack_codes(torch.zeros(2, 7, dtype=torch.uint8), 4, 32)
