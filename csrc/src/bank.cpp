// The adapter bank's slot table decoded into lk_lora_slot records (lk_bank_resolve): the one place
// where table rows become pointers, every offset checked against the slabs first. The layout is
// lk_bank / lk_slot_column in lorakern.h and lorakern/formats/bank.py on the Python side.
#include "lorakern/lorakern.h"

namespace {

// Bytes of a compressed factor's codes: h rows at `bits` then rank - h 1-bit rows of `cols` columns
// (lorakern.formats.bank.compressed_code_bytes).
int64_t code_bytes(int64_t cols, int64_t rank, int64_t h, int64_t bits) {
  return h * (cols * bits / 8) + (rank - h) * (cols / 8);
}

lk_status resolve_one(const lk_bank& b, int64_t N, int64_t K, int64_t id, int64_t max_rank, lk_lora_slot& sl) {
  if (id < 0 || id >= b.num_slots) return LK_ERR_SLOT_RANGE;
  const int64_t* r = b.table + LK_SLOT_NUM_COLUMNS * id;
  const int64_t kind = r[LK_SLOT_KIND], rank = r[LK_SLOT_RANK], row = r[LK_SLOT_ROW], h = r[LK_SLOT_H];
  const int64_t bits = r[LK_SLOT_BITS_HI], aoff = r[LK_SLOT_A_OFF], boff = r[LK_SLOT_B_OFF];
  sl = lk_lora_slot{};
  sl.scale = b.scales[id];
  if (kind == LK_SLOT_EMPTY) return LK_ERR_SLOT_EMPTY;
  if (rank < 0 || row < 0) return LK_ERR_BAD_SLOT;
  if (max_rank >= 0 && rank > max_rank) return LK_ERR_RANK;
  if (kind == LK_SLOT_DENSE) {
    if (rank > b.dense_rows - row || (rank && (!b.a || !b.bt))) return LK_ERR_BAD_SLOT;
    const size_t esz = b.dtype == LK_F32 ? 4 : 2;
    sl.kind = LK_SLOT_DENSE;
    sl.dtype = b.dtype;
    sl.rank = rank;
    sl.a = static_cast<const char*>(b.a) + (size_t)(row * K) * esz;
    sl.bt = static_cast<const char*>(b.bt) + (size_t)(row * N) * esz;
    return LK_OK;
  }
  if (kind != LK_SLOT_COMPRESSED) return LK_ERR_BAD_SLOT;
  if (h < 0 || h > rank || rank > b.qrows - row || aoff < 0 || boff < 0 || b.group_a <= 0 || b.group_b <= 0 ||
      !(bits == 2 || bits == 3 || bits == 4 || bits == 8) || K % b.group_a || N % b.group_b || K % 8 || N % 8)
    return LK_ERR_BAD_SLOT;
  if (code_bytes(K, rank, h, bits) > b.qa_bytes - aoff || code_bytes(N, rank, h, bits) > b.qb_bytes - boff)
    return LK_ERR_BAD_SLOT;
  const int64_t rl = rank - h, nga = K / b.group_a, ngb = N / b.group_b;
  const int32_t hb = (int32_t)bits;
  sl.kind = LK_SLOT_COMPRESSED;
  sl.q.a_hi = lk_qweight{b.qa + aoff, b.qa_scales + row * nga, b.qa_zeros + row * nga, h, K, hb, b.group_a};
  sl.q.a_lo = lk_qweight{b.qa + aoff + h * (K * bits / 8), b.qa_scales + (row + h) * nga,
                         b.qa_zeros + (row + h) * nga, rl, K, 1, b.group_a};
  sl.q.b_hi = lk_qweight{b.qb + boff, b.qb_scales + row * ngb, b.qb_zeros + row * ngb, h, N, hb, b.group_b};
  sl.q.b_lo = lk_qweight{b.qb + boff + h * (N * bits / 8), b.qb_scales + (row + h) * ngb,
                         b.qb_zeros + (row + h) * ngb, rl, N, 1, b.group_b};
  return LK_OK;
}

}  // namespace

extern "C" lk_status lk_bank_resolve(const lk_bank* bank, int64_t N, int64_t K, const int64_t* segments,
                                     int64_t num_segments, int64_t max_rank, lk_lora_slot* slots,
                                     int64_t* segments_out, int64_t* failed) {
  if (!bank || N < 0 || K < 0 || num_segments < 0 || (num_segments && (!segments || !slots)) ||
      (bank->num_slots && (!bank->table || !bank->scales)) || bank->num_slots < 0)
    return LK_ERR_INVALID_ARG;
  for (int64_t s = 0; s < num_segments; ++s) {
    const int64_t id = segments[3 * s];
    const lk_status st = resolve_one(*bank, N, K, id, max_rank, slots[s]);
    if (st != LK_OK) {
      if (failed) *failed = id;
      return st;
    }
    if (segments_out) {
      segments_out[3 * s] = s;
      segments_out[3 * s + 1] = segments[3 * s + 1];
      segments_out[3 * s + 2] = segments[3 * s + 2];
    }
  }
  return LK_OK;
}
