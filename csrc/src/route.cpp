// Top-k routing of a mixture of adapters (MoLA's router, Gao et al., arXiv 2402.08562): per token a
// softmax over E logits, the k largest kept (ties to the lower expert), their probabilities renormalised;
// then the (token, expert, weight) entries grouped by expert as the multi-adapter kernels take them.
#include <cmath>
#include <cstdint>
#include <vector>

#include "lorakern/lorakern.h"

extern "C" lk_status lk_route_top_k(const float* logits, int64_t T, int64_t E, int64_t k, int64_t* segments,
                                    int64_t* tokens, float* weights) {
  if (T < 0 || E < 1 || k < 1 || k > E || E > (int64_t)1 << 20) return LK_ERR_INVALID_ARG;
  if (!segments || (T > 0 && (!logits || !tokens || !weights))) return LK_ERR_INVALID_ARG;
  std::vector<int64_t> ids((size_t)(T * k));
  std::vector<float> w((size_t)(T * k));
  std::vector<int64_t> count((size_t)E, 0);
  for (int64_t t = 0; t < T; ++t) {
    const float* l = logits + t * E;
    float m = l[0];
    for (int64_t e = 0; e < E; ++e) {
      if (!std::isfinite(l[e])) return LK_ERR_INVALID_ARG;  // NaN / Inf logits: no meaningful routing
      m = l[e] > m ? l[e] : m;
    }
    double sum = 0.0;
    for (int64_t e = 0; e < E; ++e) sum += std::exp((double)l[e] - (double)m);
    // the k largest, ties to the lower index: insertion into a sorted list of k (E is small)
    int64_t* top = ids.data() + t * k;
    int64_t n = 0;
    for (int64_t e = 0; e < E; ++e) {
      int64_t pos = n;
      while (pos > 0 && l[top[pos - 1]] < l[e]) --pos;  // strictly greater moves ahead: stable
      if (pos >= k) continue;
      for (int64_t j = (n < k ? n : k - 1); j > pos; --j) top[j] = top[j - 1];
      top[pos] = e;
      if (n < k) ++n;
    }
    double kept = 0.0;
    for (int64_t j = 0; j < k; ++j) kept += std::exp((double)l[top[j]] - (double)m) / sum;
    for (int64_t j = 0; j < k; ++j) {
      w[(size_t)(t * k + j)] = (float)((std::exp((double)l[top[j]] - (double)m) / sum) / kept);
      ++count[(size_t)top[j]];
    }
  }
  std::vector<int64_t> next((size_t)E);
  int64_t start = 0;
  for (int64_t e = 0; e < E; ++e) {
    segments[3 * e] = e;
    segments[3 * e + 1] = start;
    segments[3 * e + 2] = count[(size_t)e];
    next[(size_t)e] = start;
    start += count[(size_t)e];
  }
  for (int64_t t = 0; t < T; ++t)  // tokens ascending within each expert (a token meets an expert once)
    for (int64_t j = 0; j < k; ++j) {
      const int64_t e = ids[(size_t)(t * k + j)];
      const int64_t at = next[(size_t)e]++;
      tokens[at] = t;
      weights[at] = w[(size_t)(t * k + j)];
    }
  return LK_OK;
}
