// lk_decoder_layer_step: one Llama-family decoder layer for a decode step, in one call (the native decode
// step of lorakern.models.native). The projections go through lk_quant_matmul / lk_gwq_matmul (the active
// ISA's kernels); the rest (RMSNorm, rotary embedding, attention over the KV cache, SiLU gating, residuals)
// is plain C++ on a few KB per sequence, written after transformers' LlamaDecoderLayer / LlamaAttention /
// LlamaMLP (modeling_llama.py) so that it computes what they compute, in fp32. A layer with adapter banks adds
// each sequence's adapters to every projection's output with the multi-adapter kernels (lk_multi_lora_slices),
// as lorakern's MultiLoRALinear modules do on transformers' path.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <new>
#include <vector>

#include "common.h"
#include "driver.h"
#include "kernels.h"
#include "lorakern/lorakern.h"
#include "multi_lora.h"

namespace {

bool shape_ok(const lk_qweight& w, int64_t N, int64_t K) {
  return lk::check_weight(&w) == LK_OK && w.N == N && w.K == K;
}

bool outliers_ok(const lk_outliers& o) {  // O(1) checks; lk_gwq_matmul checks every row and column it uses
  return !o.row_ptr || (o.nnz >= 0 && (o.nnz == 0 || (o.col_idx && o.values)));
}

lk_status check_layer(const lk_decoder_layer* L) {
  if (!L || !L->input_norm || !L->post_norm) return LK_ERR_INVALID_ARG;
  const int64_t H = L->hidden, Hq = L->n_heads, Hkv = L->n_kv_heads, D = L->head_dim, I = L->intermediate;
  if (H <= 0 || Hq <= 0 || Hkv <= 0 || D <= 0 || D % 2 || I <= 0 || Hq % Hkv) return LK_ERR_INVALID_ARG;
  if (!(L->rms_eps >= 0.f) || !std::isfinite(L->attn_scale)) return LK_ERR_INVALID_ARG;
  if (!shape_ok(L->qkv, (Hq + 2 * Hkv) * D, H) || !shape_ok(L->o, H, Hq * D) || !shape_ok(L->gate_up, 2 * I, H) ||
      !shape_ok(L->down, H, I))
    return LK_ERR_INVALID_ARG;
  if (!outliers_ok(L->qkv_outliers) || !outliers_ok(L->o_outliers) || !outliers_ok(L->gate_up_outliers) ||
      !outliers_ok(L->down_outliers))
    return LK_ERR_INVALID_ARG;
  return LK_OK;
}

// y[M, w.N] = x @ W^T (+ outliers) (+ bias), fp32.
lk_status project(const float* x, int64_t M, const lk_qweight& w, const lk_outliers& o, const float* bias, float* y,
                  int nt) {
  return o.row_ptr ? lk_gwq_matmul(x, LK_F32, M, &w, &o, bias, y, nt) : lk_quant_matmul(x, LK_F32, M, &w, bias, y, nt);
}

// out = x / sqrt(mean(x^2) + eps) * w, per row (the sum of squares in double).
void rms_norm(const float* x, int64_t B, int64_t H, const float* w, float eps, float* out) {
  for (int64_t b = 0; b < B; ++b) {
    const float* xr = x + b * H;
    double ss = 0;
    for (int64_t i = 0; i < H; ++i) ss += (double)xr[i] * xr[i];
    const float r = 1.f / std::sqrt((float)(ss / (double)H) + eps);
    for (int64_t i = 0; i < H; ++i) out[b * H + i] = w[i] * (xr[i] * r);
  }
}

// v <- v cos + rotate_half(v) sin, rotate_half(v) = [-v[D/2:], v[:D/2]] (transformers' apply_rotary_pos_emb).
void rope(float* v, const float* cos, const float* sin, int64_t D) {
  const int64_t h = D / 2;
  for (int64_t i = 0; i < h; ++i) {
    const float a = v[i], b = v[i + h];
    v[i] = a * cos[i] - b * sin[i];
    v[i + h] = b * cos[i + h] + a * sin[i + h];
  }
}

// A per-thread block of at least n floats, reused by later calls on the thread (contents undefined).
float* scratch(size_t n) {
  return reinterpret_cast<float*>(lk::thread_scratch(lk::kScratchDecodeStep, n * sizeof(float)));
}

// A view of part of the scratch block (what the step's buffers were as vectors: data() and end()).
struct Buf {
  float* p;
  int64_t n;
  float* data() const { return p; }
  float* end() const { return p + n; }
  float& operator[](int64_t i) const { return p[i]; }
};

bool has_bank(const lk_bank& b) { return b.table || b.num_slots; }

// The (N, K) of each projection a bank may adapt (lk_projection order).
void projection_shape(const lk_decoder_layer* L, int p, int64_t* N, int64_t* K) {
  const int64_t H = L->hidden, q = L->n_heads * L->head_dim, kv = L->n_kv_heads * L->head_dim, I = L->intermediate;
  const int64_t n[] = {q, kv, kv, H, I, I, H}, k[] = {H, H, H, q, H, H, I};
  *N = n[p];
  *K = k[p];
}

// The step's adapters in one layer: the batch's slots resolved in each projection's bank (lk_bank_resolve), the
// segments renumbered to index them (the same for every bank).
struct LayerAdapters {
  std::vector<lk_lora_slot> slots[LK_NUM_PROJ];
  std::vector<int64_t> segments;
  lk_lora_batch batch{};
  bool on[LK_NUM_PROJ] = {};
  bool any = false;
};

// The batch fits the step (lk::check_batch_entries: lk_multi_lora checks it too, but in the middle of the layer,
// after the cache is written) and its weights are finite.
lk_status check_batch(const lk_lora_batch* b, int64_t B) {
  if (lk_status s = lk::check_batch_entries(b, B)) return s;
  for (int64_t e = 0; e < b->num_entries; ++e)
    if (!std::isfinite(b->weights[e])) return LK_ERR_INVALID_ARG;
  return LK_OK;
}

lk_status resolve_adapters(const lk_decoder_layer* L, const lk_lora_batch* b, LayerAdapters* out) {
  out->any = false;
  if (!b || !b->num_segments) return LK_OK;
  const int64_t ns = b->num_segments;
  out->segments.resize((size_t)(3 * ns));
  for (int p = 0; p < LK_NUM_PROJ; ++p) {
    out->on[p] = has_bank(L->adapters[p]);
    if (!out->on[p]) continue;
    int64_t N, K;
    projection_shape(L, p, &N, &K);
    out->slots[p].resize((size_t)ns);
    if (lk_status s = lk_bank_resolve(&L->adapters[p], N, K, b->segments, ns, -1, out->slots[p].data(),
                                      out->segments.data(), nullptr))
      return s;
    out->any = true;
  }
  out->batch = lk_lora_batch{out->segments.data(), ns, b->tokens, b->weights, b->num_entries};
  return LK_OK;
}

// y[:, cols of each projection in `ps`] += its adapters (x [B, K] its input; y [B, ldy], the projections' outputs
// side by side, in ps order).
lk_status add_adapters(const LayerAdapters& ad, const lk_decoder_layer* L, std::initializer_list<int> ps,
                       const float* x, int64_t B, int64_t K, float* y, int64_t ldy, int nt) {
  if (!ad.any) return LK_OK;
  lk_lora_slice slices[LK_NUM_PROJ];
  int64_t n = 0, col = 0;
  for (int p : ps) {
    int64_t N, Kp;
    projection_shape(L, p, &N, &Kp);
    if (ad.on[p]) slices[n++] = lk_lora_slice{ad.slots[p].data(), ad.batch.num_segments, N, col};
    col += N;
  }
  if (!n) return LK_OK;
  return lk_multi_lora_slices(x, LK_F32, B, K, slices, n, &ad.batch, ldy, y, y, nt);
}

// The layer step on checked arguments (lk_decoder_layer_step checks them; lk_decoder_stack_step checks every
// layer, and resolves every layer's adapters, once before its first layer writes anything).
lk_status layer_step(const lk_decoder_layer* L, const float* x, int64_t B, const float* cos, const float* sin,
                     int64_t pos, float* k_cache, float* v_cache, int64_t max_len, const uint8_t* key_mask,
                     const LayerAdapters& ad, float* y, int nt) {
  const int64_t H = L->hidden, Hq = L->n_heads, Hkv = L->n_kv_heads, D = L->head_dim, I = L->intermediate;
  const int64_t NQKV = (Hq + 2 * Hkv) * D, rep = Hq / Hkv;
  try {
    // the step's work buffers, carved from one per-thread scratch block that is kept between calls: fresh
    // vectors were zero-filled and, past malloc's mmap threshold, page-faulted in again at every layer (~2% of a
    // batch-64 step)
    float* const work = scratch((size_t)(B * (2 * H + NQKV + Hq * D + 2 * I)));
    const Buf h{work, B * H}, qkv{h.end(), B * NQKV}, att{qkv.end(), B * Hq * D}, x1{att.end(), B * H};
    const Buf gu{x1.end(), B * 2 * I};
    rms_norm(x, B, H, L->input_norm, L->rms_eps, h.data());
    if (lk_status s = project(h.data(), B, L->qkv, L->qkv_outliers, L->qkv_bias, qkv.data(), nt)) return s;
    if (lk_status s = add_adapters(ad, L, {LK_PROJ_Q, LK_PROJ_K, LK_PROJ_V}, h.data(), B, H, qkv.data(), NQKV, nt))
      return s;
    // rotary embedding of q and k; k and v into the cache at pos
    for (int64_t b = 0; b < B; ++b) {
      float* r = qkv.data() + b * NQKV;
      for (int64_t hd = 0; hd < Hq + Hkv; ++hd) rope(r + hd * D, cos + b * D, sin + b * D, D);
      for (int64_t kh = 0; kh < Hkv; ++kh) {
        const int64_t at = ((b * Hkv + kh) * max_len + pos) * D;
        std::copy(r + (Hq + kh) * D, r + (Hq + kh + 1) * D, k_cache + at);
        std::copy(r + (Hq + Hkv + kh) * D, r + (Hq + Hkv + kh + 1) * D, v_cache + at);
      }
    }
    // attention of each (sequence, query head) over positions 0..pos: softmax(scale q.k) . v
    const int64_t npos = pos + 1;
    const lk::CpuKernels& kern = lk::active_kernels();
    const bool par = B * Hq * npos * D > (1 << 15);
    bool bad_alloc = false;
#pragma omp parallel num_threads(par ? nt : 1)
    {
      std::vector<float> p;
      try {
        p.resize((size_t)npos);
      } catch (const std::bad_alloc&) {
#pragma omp atomic write
        bad_alloc = true;
      }
#pragma omp for schedule(static)
      for (int64_t bh = 0; bh < B * Hq; ++bh) {
        if (p.empty()) continue;
        const int64_t b = bh / Hq, hq = bh % Hq, kh = hq / rep;
        const float* q = qkv.data() + b * NQKV + hq * D;
        const float* kc = k_cache + (b * Hkv + kh) * max_len * D;
        const float* vc = v_cache + (b * Hkv + kh) * max_len * D;
        const uint8_t* mk = key_mask ? key_mask + b * max_len : nullptr;
        kern.attend(q, kc, vc, mk, npos, D, L->attn_scale, p.data(), att.data() + b * Hq * D + hq * D);
      }
    }
    if (bad_alloc) return LK_ERR_ALLOC;
    if (lk_status s = project(att.data(), B, L->o, L->o_outliers, L->o_bias, x1.data(), nt)) return s;
    if (lk_status s = add_adapters(ad, L, {LK_PROJ_O}, att.data(), B, Hq * D, x1.data(), H, nt)) return s;
    for (int64_t i = 0; i < B * H; ++i) x1[i] += x[i];
    rms_norm(x1.data(), B, H, L->post_norm, L->rms_eps, h.data());
    if (lk_status s = project(h.data(), B, L->gate_up, L->gate_up_outliers, L->gate_up_bias, gu.data(), nt)) return s;
    if (lk_status s = add_adapters(ad, L, {LK_PROJ_GATE, LK_PROJ_UP}, h.data(), B, H, gu.data(), 2 * I, nt)) return s;
#pragma omp parallel for num_threads(nt) schedule(static) if (B * I >= (1 << 14))
    for (int64_t b = 0; b < B; ++b) {  // act = silu(gate) * up, in place of the gate half (exp: worth threads)
      float* g = gu.data() + b * 2 * I;
      kern.silu_mul(g, g + I, I);
    }
    // down from the gate halves (row stride 2 I): compact them first
    for (int64_t b = 1; b < B; ++b) std::copy(gu.data() + b * 2 * I, gu.data() + b * 2 * I + I, gu.data() + b * I);
    if (lk_status s = project(gu.data(), B, L->down, L->down_outliers, L->down_bias, y, nt)) return s;
    if (lk_status s = add_adapters(ad, L, {LK_PROJ_DOWN}, gu.data(), B, I, y, H, nt)) return s;
    for (int64_t i = 0; i < B * H; ++i) y[i] += x1[i];
  } catch (const std::bad_alloc&) {
    return LK_ERR_ALLOC;
  }
  return LK_OK;
}

}  // namespace

extern "C" lk_status lk_decoder_layer_step(const lk_decoder_layer* L, const float* x, int64_t B, const float* cos,
                                           const float* sin, int64_t pos, float* k_cache, float* v_cache,
                                           int64_t max_len, const uint8_t* key_mask, const lk_lora_batch* batch,
                                           float* y, int num_threads) {
  if (lk_status s = check_layer(L)) return s;
  if (B < 0 || max_len <= 0 || pos < 0 || pos >= max_len) return LK_ERR_INVALID_ARG;
  if (batch)
    if (lk_status s = check_batch(batch, B)) return s;
  if (B == 0) return LK_OK;
  if (!x || !y || !cos || !sin || !k_cache || !v_cache) return LK_ERR_INVALID_ARG;
  try {
    LayerAdapters ad;
    if (lk_status s = resolve_adapters(L, batch, &ad)) return s;
    return layer_step(L, x, B, cos, sin, pos, k_cache, v_cache, max_len, key_mask, ad, y,
                      lk::threads_for(num_threads));
  } catch (const std::bad_alloc&) {
    return LK_ERR_ALLOC;
  }
}

extern "C" lk_status lk_decoder_stack_step(const lk_decoder_stack* S, int64_t B, const int64_t* ids, const float* x,
                                           const int64_t* positions, const float* cos, const float* sin,
                                           int64_t* const* lengths, float* const* k_caches, float* const* v_caches,
                                           int64_t max_len, const uint8_t* key_mask, const lk_lora_batch* batch,
                                           float* y, int num_threads) {
  // every argument is checked before anything is written
  if (!S || !S->layers || S->n_layers <= 0 || B < 0 || max_len <= 0 || !lengths || !k_caches || !v_caches)
    return LK_ERR_INVALID_ARG;
  const int64_t n = S->n_layers;
  int64_t pos = -1;
  for (int64_t i = 0; i < n; ++i) {
    const lk_decoder_layer* L = S->layers[i];
    if (!L || !lengths[i] || !k_caches[i] || !v_caches[i]) return LK_ERR_INVALID_ARG;
    if (lk_status s = check_layer(L)) return s;
    if (L->hidden != S->layers[0]->hidden || L->head_dim != S->layers[0]->head_dim) return LK_ERR_INVALID_ARG;
    if (i == 0) pos = *lengths[0];
    if (*lengths[i] != pos) return LK_ERR_INVALID_ARG;  // the layers' caches are out of step
  }
  if (pos < 0 || pos >= max_len) return LK_ERR_INVALID_ARG;
  const int64_t H = S->layers[0]->hidden, D = S->layers[0]->head_dim;
  if (S->final_norm && !(S->final_eps >= 0.f)) return LK_ERR_INVALID_ARG;
  if (S->embed && (lk::check_weight(S->embed) != LK_OK || S->embed->K != H)) return LK_ERR_INVALID_ARG;
  if (S->head && (lk::check_weight(S->head) != LK_OK || S->head->K != H)) return LK_ERR_INVALID_ARG;
  if (S->rope_inv_freq && !std::isfinite(S->rope_scaling)) return LK_ERR_INVALID_ARG;
  if (B == 0) return LK_OK;
  const bool lookup = !x;  // the input: x when given, else the rows of ids in the embedding table
  if (!y || (lookup && (!ids || !S->embed)) || (!S->rope_inv_freq && (!cos || !sin))) return LK_ERR_INVALID_ARG;
  if (lookup)
    for (int64_t b = 0; b < B; ++b)
      if (ids[b] < 0 || ids[b] >= S->embed->N) return LK_ERR_INDEX;
  if (S->rope_inv_freq && positions)
    for (int64_t b = 0; b < B; ++b)
      if (positions[b] < 0) return LK_ERR_INVALID_ARG;
  if (batch)
    if (lk_status s = check_batch(batch, B)) return s;
  const int64_t out_w = S->head ? S->head->N : H;
  if (!lookup && x < y + B * out_w && y < x + B * H) return LK_ERR_INVALID_ARG;
  const int nt = lk::threads_for(num_threads);
  try {
    // every layer's adapters: the batch's slots resolved in each bank before the first layer writes anything
    std::vector<LayerAdapters> ads((size_t)(batch ? n : 1));
    if (batch)
      for (int64_t i = 0; i < n; ++i)
        if (lk_status s = resolve_adapters(S->layers[i], batch, &ads[i])) return s;
    std::vector<float> in0, a((size_t)(B * H)), b2((size_t)(B * H)), cs, sn;
    const float* in = x;
    if (lookup) {  // the tokens' rows of the (quantized) table, as lk_dequantize computes them
      in0.resize((size_t)(B * H));
      const lk_qweight& E = *S->embed;
      const int64_t rb = lk::row_bytes(E.K, E.bits), ng = E.K / E.group_size;
      for (int64_t b = 0; b < B; ++b) {
        const lk_qweight row{E.qweight + ids[b] * rb, E.scales + ids[b] * ng, E.zeros + ids[b] * ng, 1, E.K,
                             E.bits, E.group_size};
        if (lk_status s = lk_dequantize(&row, in0.data() + b * H, 1)) return s;
      }
      in = in0.data();
    }
    if (S->rope_inv_freq) {  // transformers' rotary embedding: fp32 pos * inv_freq, cos / sin, halves repeated
      cs.resize((size_t)(B * D));
      sn.resize((size_t)(B * D));
      for (int64_t b = 0; b < B; ++b)
        for (int64_t i = 0; i < D / 2; ++i) {
          const float f = (float)(positions ? positions[b] : pos) * S->rope_inv_freq[i];
          const float c = std::cos(f) * S->rope_scaling, s = std::sin(f) * S->rope_scaling;
          cs[b * D + i] = cs[b * D + i + D / 2] = c;
          sn[b * D + i] = sn[b * D + i + D / 2] = s;
        }
      cos = cs.data();
      sin = sn.data();
    }
    for (int64_t i = 0; i < n; ++i) {
      const bool direct = i == n - 1 && !S->final_norm && !S->head;
      float* out = direct ? y : (i % 2 ? b2.data() : a.data());
      if (lk_status s = layer_step(S->layers[i], in, B, cos, sin, pos, k_caches[i], v_caches[i], max_len, key_mask,
                                   ads[batch ? i : 0], out, nt))
        return s;
      in = out;
    }
    if (S->final_norm) {
      float* out = S->head ? (in == a.data() ? b2.data() : a.data()) : y;
      rms_norm(in, B, H, S->final_norm, S->final_eps, out);
      in = out;
    }
    if (S->head)
      if (lk_status s = lk_quant_matmul(in, LK_F32, B, S->head, S->head_bias, y, nt)) return s;
  } catch (const std::bad_alloc&) {
    return LK_ERR_ALLOC;
  }
  for (int64_t i = 0; i < n; ++i) {  // each count once, also where two layers share one
    bool seen = false;
    for (int64_t j = 0; j < i && !seen; ++j) seen = lengths[j] == lengths[i];
    if (!seen) *lengths[i] += 1;
  }
  return LK_OK;
}
