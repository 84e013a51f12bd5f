// The columns that may hold a row's exact argmax, given int8-activation logits l^ [M, V] of a symmetric block
// head and the rows h [M, K] they were computed from, x = rmsnorm(h) * norm (runtime/argmax_head.py derives
// the bound):
//
//   B[m, v] = sum_g s[m, g] T[g, v] + r[m] T[G, v],  s[m, g] = slack max_{i in group g} |x[m, i]| / 254,
//   r[m] = rounding max_i |x[m, i]|,  T [G + 1, V] = per group sum |w| and the row's sum |w|;
//   v is a candidate of row m when l^[m, v] + B[m, v] >= max_u (l^[m, u] - B[m, u]).
//
// Returns the sorted columns that are a candidate of any row (none when a row of x or its maximum is not finite).
// Why hand-written: in torch the bound, the row maxima and the union are ~10 ops over [M, V] (Gemma, one row:
// ~0.9 ms, half of what the bound saves); here one pass over the logits for block maxima, then the table (fp16,
// rounded up by the caller, so B stays an upper bound) is read only in blocks of 64 columns whose largest l^ plus
// largest B (block_max [G + 1, V / 64]) reaches the row's threshold, columns in parallel.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <cmath>
#include <vector>

#include "argmax_bound.h"
#include "common.h"

namespace {

constexpr int64_t COLS = 64;  // columns of a block whose largest bound (block_max) decides whether it is read
constexpr int64_t CHUNK_BLOCKS = 128;  // blocks per parallel work item

// Per row of h: the G group scales and the rounding factor [M, G + 1] of x = rmsnorm(h) * w (to rounding,
// which `slack` covers); empty when a row of x is not finite.
std::vector<float> bound_scales(const at::Tensor& h, const at::Tensor& w, double eps, const std::vector<int64_t>& edges,
                                double slack, double rounding) {
  const int64_t m = h.size(0), k = h.size(1), g = static_cast<int64_t>(edges.size()) - 1;
  const float* nw = w.data_ptr<float>();
  std::vector<float> s(m * (g + 1));
  for (int64_t r = 0; r < m; ++r) {
    const float* row = h.data_ptr<float>() + r * k;
    double ss = 0.0;
    for (int64_t i = 0; i < k; ++i) ss += static_cast<double>(row[i]) * row[i];
    const float inv = static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(k) + eps));
    float all = 0.f;
    for (int64_t j = 0; j < g; ++j) {
      float a = 0.f;
      for (int64_t i = edges[j]; i < edges[j + 1]; ++i) a = std::max(a, std::fabs(row[i] * inv * nw[i]));
      s[r * (g + 1) + j] = static_cast<float>(slack * a / 254.0);
      all = std::max(all, a);
    }
    if (!std::isfinite(all) || !std::isfinite(inv)) return {};
    s[r * (g + 1) + g] = static_cast<float>(rounding * all);
  }
  return s;
}

// B at column v of one row.
inline float bound1(const uint16_t* t, int64_t v_stride, const float* s, int64_t g1, int64_t v) {
  float b = 0.f;
  for (int64_t j = 0; j < g1; ++j) b = std::fma(s[j], _cvtsh_ss(t[j * v_stride + v]), b);
  return b;
}

}  // namespace

at::Tensor bound_candidates(const at::Tensor& h, const at::Tensor& norm, double eps, const at::Tensor& logits,
                            const at::Tensor& table, const at::Tensor& block_max, const std::vector<int64_t>& edges,
                            double slack, double rounding) {
  TORCH_CHECK(h.dim() == 2 && h.is_contiguous() && h.scalar_type() == at::kFloat, "h must be contiguous [M, K] fp32");
  TORCH_CHECK(norm.dim() == 1 && norm.is_contiguous() && norm.scalar_type() == at::kFloat && norm.size(0) == h.size(1),
              "norm must be [K] fp32");
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous() && logits.scalar_type() == at::kFloat &&
                  logits.size(0) == h.size(0), "logits must be contiguous [M, V] fp32");
  const int64_t m = logits.size(0), v = logits.size(1), g1 = static_cast<int64_t>(edges.size());
  const int64_t blocks = (v + COLS - 1) / COLS;
  TORCH_CHECK(table.dim() == 2 && table.is_contiguous() && table.scalar_type() == at::kHalf && table.size(0) == g1 &&
                  table.size(1) == v, "table must be contiguous [G + 1, V] fp16");
  TORCH_CHECK(block_max.dim() == 2 && block_max.is_contiguous() && block_max.scalar_type() == at::kFloat &&
                  block_max.size(0) == g1 && block_max.size(1) == blocks, "block_max must be contiguous [G + 1, V / 64]");
  TORCH_CHECK(edges.front() == 0 && edges.back() == h.size(1), "edges must run from 0 to K");
  const at::Tensor none = at::empty({0}, logits.options().dtype(at::kLong));
  const std::vector<float> s = bound_scales(h, norm, eps, edges, slack, rounding);
  if (s.empty()) return none;
  const float* l = logits.data_ptr<float>();
  const uint16_t* t = reinterpret_cast<const uint16_t*>(table.data_ptr<at::Half>());
  const float* tb = block_max.data_ptr<float>();
  const int64_t chunks = (blocks + CHUNK_BLOCKS - 1) / CHUNK_BLOCKS;
  std::vector<float> bmax(m * blocks);  // [M, blocks] max l^ of each block of 64 columns
  std::vector<int64_t> best(chunks * m);  // per chunk and row: a column of the chunk's largest l^
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c)
      for (int64_t r = 0; r < m; ++r) {
        const float* lr = l + r * v;
        int64_t arg = c * CHUNK_BLOCKS * COLS;
        for (int64_t b = c * CHUNK_BLOCKS; b < std::min(blocks, (c + 1) * CHUNK_BLOCKS); ++b) {
          const int64_t a = b * COLS, e = std::min(v, a + COLS);
          float mx = lr[a];
          int64_t i = a;
          if (e - a == COLS) {
            __m256 vm = _mm256_loadu_ps(lr + a);
            for (i = a + 8; i < e; i += 8) vm = _mm256_max_ps(vm, _mm256_loadu_ps(lr + i));
            mx = hmax(vm);
          }
          for (; i < e; ++i) mx = std::max(mx, lr[i]);
          bmax[r * blocks + b] = mx;
          if (mx > lr[arg]) arg = std::find(lr + a, lr + e, mx) - lr;
        }
        best[c * m + r] = arg;
      }
  });
  // lo[r] = l^ - B at a column of the row's largest l^: at most max_u (l^ - B), so the candidates below are a
  // superset of that rule's; a block is read with the table only when its max l^ + max B reaches lo
  std::vector<float> lo(m);
  for (int64_t r = 0; r < m; ++r) {
    int64_t j = best[r];
    for (int64_t c = 1; c < chunks; ++c)
      if (l[r * v + best[c * m + r]] > l[r * v + j]) j = best[c * m + r];
    lo[r] = l[r * v + j] - bound1(t, v, s.data() + r * g1, g1, j);
    if (!std::isfinite(lo[r])) return none;
  }
  std::vector<std::vector<int64_t>> found(chunks);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c)
      for (int64_t b = c * CHUNK_BLOCKS; b < std::min(blocks, (c + 1) * CHUNK_BLOCKS); ++b) {
        const int64_t a = b * COLS, e = std::min(v, a + COLS);
        uint64_t bits = 0;
        for (int64_t r = 0; r < m; ++r) {
          const float* sr = s.data() + r * g1;
          float reach = 0.f;
          for (int64_t g = 0; g < g1; ++g) reach = std::fma(sr[g], tb[g * blocks + b], reach);
          if (!(bmax[r * blocks + b] + reach >= lo[r])) continue;
          for (int64_t i = a; i < e; ++i)  // few blocks get here: scalar is enough
            if (l[r * v + i] + bound1(t, v, sr, g1, i) >= lo[r]) bits |= uint64_t{1} << (i - a);
        }
        for (; bits; bits &= bits - 1) found[c].push_back(a + __builtin_ctzll(bits));
      }
  });
  int64_t n = 0;
  for (const auto& f : found) n += static_cast<int64_t>(f.size());
  at::Tensor out = at::empty({n}, logits.options().dtype(at::kLong));
  int64_t* o = out.data_ptr<int64_t>();
  for (const auto& f : found) o = std::copy(f.begin(), f.end(), o);
  return out;
}
