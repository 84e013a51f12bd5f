// Coupled (Gumbel-max) sampling of rows of logits under temperature, top-k, top-p and min-p, in one call:
// the function verify/coupling.py computes as coupled_choice(candidates(x, cfg), keys, token_ids, top) (and the
// filtered probabilities of the columns it returns, Candidates.probs_of, when asked). Why hand-written: in
// torch the same work is ~30 small ops a call, 0.3 ms per Gemma position, most of what sampling adds to a
// decode step; here it is one pass for the block maxima, one for the row's normaliser, a selection inside
// the few blocks that can hold the ranked columns, and the noise of those columns only.
//
// Same definitions as the Python path: ranked columns are the W best raw logits (W = 64, widened 4x while
// the top-p nucleus is not inside them; top-k: W = k), tempered as v * (1 / t) in fp32; the nucleus is the
// shortest prefix whose mass exp(v - lse) (double) reaches top_p, lse = m / t + log sum exp((x - m) / t)
// over the row (top-k: over the k survivors); min-p keeps v >= v_0 + log(min_p); the sample is the argmax
// of v + g(key, column) over the survivors, g the splitmix64 Gumbel noise of coupling.gumbel. The
// normaliser is summed in a different order (per block of 64 in fp32, blocks in double), so a cut can
// differ from the Python path's only where the nucleus mass lands within rounding of top_p. A row with no
// top-k / top-p cut is "open": its survivors past the ranked prefix race as one aggregate (noise id -1), looked
// at only when log(#rest) + z_W + g(-1) could beat the best ranked score, then drawn in blocks
// (draw_aggregate), as coupling._draw_aggregate does; its sums are in double, torch's in fp32, so the
// aggregate's verdict can differ only where it lands within rounding of the best ranked score.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#include "common.h"
#include "sampling.h"

namespace {

constexpr int64_t BLOCK = 64;      // columns per block of the block-max prefilter (sampling.BLOCK)
constexpr int64_t PREFIX = 64;     // columns ranked first (sampling.K_PREFIX)
constexpr int64_t WIDEN = 4;       // growth of the ranked prefix while the nucleus is not inside it
constexpr int64_t AGG_WIDEN = 16;  // growth of the ranked blocks inside an open row's aggregate (sampling.WIDEN)
constexpr uint64_t GAMMA = 0x9E3779B97F4A7C15ULL, C1 = 0xBF58476D1CE4E5B9ULL, C2 = 0x94D049BB133111EBULL;

double gumbel(int64_t key, int64_t id) {  // coupling.gumbel: splitmix64 output id + 1 of the stream at key
  uint64_t x = (static_cast<uint64_t>(id) + 1) * GAMMA + static_cast<uint64_t>(key);
  x ^= x >> 30;
  x *= C1;
  x ^= x >> 27;
  x *= C2;
  x ^= x >> 31;
  const double u = (static_cast<double>(x >> 11) + 0.5) * 0x1p-53;
  return -std::log(-std::log(u));
}

struct RowStats {
  std::vector<float> block_max;  // [ceil(V / BLOCK)] of the raw logits
  float max;
};

// The max of p[0, n), NaN if any value is (max_ps drops NaN, so they are looked for apart): 8 at a time, then the tail.
float span_max(const float* p, int64_t n) {
  __m256 acc = _mm256_set1_ps(-INFINITY), unordered = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 x8 = _mm256_loadu_ps(p + j);
    acc = _mm256_max_ps(acc, x8);
    unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(x8, x8, _CMP_UNORD_Q));
  }
  float m = hmax(acc);
  bool nan = _mm256_movemask_ps(unordered) != 0;
  for (; j < n; ++j) nan |= std::isnan(p[j]), m = std::max(m, p[j]);
  return nan ? NAN : m;
}

RowStats block_maxima(const float* x, int64_t v) {
  const int64_t nb = (v + BLOCK - 1) / BLOCK;
  RowStats s{std::vector<float>(nb), -INFINITY};
  at::parallel_for(0, nb, 256, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) s.block_max[b] = span_max(x + b * BLOCK, std::min(BLOCK, v - b * BLOCK));
  });
  for (float m : s.block_max) s.max = std::isnan(m) || std::isnan(s.max) ? NAN : std::max(s.max, m);
  return s;
}

double row_lse(const float* x, int64_t v, float m, float t) {  // m / t + log sum exp((x - m) / t)
  const int64_t nb = (v + BLOCK - 1) / BLOCK;
  const float inv_t = 1.0f / t;
  std::vector<double> part(nb);
  at::parallel_for(0, nb, 256, [&](int64_t b0, int64_t b1) {
    const __m256 mv = _mm256_set1_ps(m), iv = _mm256_set1_ps(inv_t);
    for (int64_t b = b0; b < b1; ++b) {
      const float* p = x + b * BLOCK;
      const int64_t n = std::min(BLOCK, v - b * BLOCK);
      float sum = 0.f;
      if (n == BLOCK) {
        __m256 acc = _mm256_setzero_ps();
        for (int j = 0; j < BLOCK; j += 8)
          acc = _mm256_add_ps(acc, exp256(_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(p + j), mv), iv)));
        sum = hsum(acc);
      } else {
        for (int64_t j = 0; j < n; ++j) sum += std::exp((p[j] - m) * inv_t);
      }
      part[b] = sum;
    }
  });
  double total = 0.0;
  for (double s : part) total += s;
  return static_cast<double>(m * inv_t) + std::log(total);
}

// log sum exp z[0 .. n) in double, z sorted best first (n >= 1).
double log_sum_exp(const std::vector<float>& z, size_t n) {
  double sum = 0.0;
  for (size_t i = 0; i < n; ++i) sum += std::exp(static_cast<double>(z[i] - z[0]));
  return static_cast<double>(z[0]) + std::log(sum);
}

// The w best (value, column) of a row, best first (ties: lower column first).
std::vector<std::pair<float, int64_t>> top_columns(const float* x, int64_t v, const RowStats& s, int64_t w) {
  const int64_t nb = static_cast<int64_t>(s.block_max.size());
  float floor = -INFINITY;  // the w best values are >= the w-th best block maximum
  if (w < nb) {
    std::vector<float> bm = s.block_max;
    std::nth_element(bm.begin(), bm.begin() + (w - 1), bm.end(), std::greater<float>());
    floor = bm[w - 1];
  }
  std::vector<std::pair<float, int64_t>> cand;
  for (int64_t b = 0; b < nb; ++b) {
    if (!(s.block_max[b] >= floor)) continue;
    for (int64_t j = b * BLOCK; j < std::min(v, (b + 1) * BLOCK); ++j)
      if (x[j] >= floor) cand.emplace_back(x[j], j);
  }
  const auto better = [](const auto& a, const auto& b) { return a.first > b.first || (a.first == b.first && a.second < b.second); };
  const int64_t keep = std::min<int64_t>(w, static_cast<int64_t>(cand.size()));
  std::partial_sort(cand.begin(), cand.begin() + keep, cand.end(), better);
  cand.resize(keep);
  return cand;
}

// An open row's aggregate of survivors past the ranked prefix won the first race (coupling._draw_aggregate): draw
// inside it, one ranked block of ranked * (AGG_WIDEN - 1) columns at a time, the remainder racing as the next
// aggregate with noise id -2, -3, ... . `rest`: raw logits of the unranked survivors (-inf elsewhere; consumed),
// m: the row's max raw logit, best: the best ranked score. Returns the column drawn, or -1 if the ranked winner
// stands.
int64_t draw_aggregate(std::vector<float>& rest, float m, float inv_t, float t, int64_t key, const int64_t* ids,
                       double best, int64_t ranked) {
  const int64_t v = static_cast<int64_t>(rest.size());
  int64_t winner = -1;
  for (int64_t level = 1;; ++level) {
    const double lse = row_lse(rest.data(), v, m, t);  // -inf once nothing is left
    if (lse + gumbel(key, -level) <= best) return winner;
    std::vector<std::pair<float, int64_t>> alive;
    for (int64_t j = 0; j < v; ++j)
      if (rest[j] > -INFINITY) alive.emplace_back(rest[j], j);
    const int64_t block = std::min(v, ranked * (AGG_WIDEN - 1));
    if (static_cast<int64_t>(alive.size()) > block)
      std::nth_element(alive.begin(), alive.begin() + block, alive.end(),
                       [](const auto& a, const auto& b) { return a.first > b.first; });
    const int64_t n = std::min<int64_t>(block, static_cast<int64_t>(alive.size()));
    best = -INFINITY;  // the aggregate won: the token is the best of its block, or lies in the remainder
    for (int64_t i = 0; i < n; ++i) {
      const int64_t col = alive[i].second;
      const double score = static_cast<double>(alive[i].first * inv_t) + gumbel(key, ids ? ids[col] : col);
      if (score > best) best = score, winner = col;
      rest[col] = -INFINITY;
    }
    if (n < block || n == v) return winner;
    ranked += n;
  }
}

// The survivors of one row as (score z + g, column), best score first, and log sum exp z over them; none
// for a row with NaN or infinite logits (the caller's Python path handles it).
struct Draws {
  std::vector<std::pair<double, int64_t>> ranked;
  double log_norm = 0.0;
};

Draws sample_row(const float* x, int64_t v, int64_t key, const int64_t* ids, float t, int64_t top_k, double top_p,
                 double min_p, int64_t want, bool with_probs) {
  const RowStats s = block_maxima(x, v);
  if (!std::isfinite(s.max)) return {};
  const bool cut_k = top_k > 0;
  const float inv_t = 1.0f / t;  // torch divides by a scalar as a multiply by its reciprocal
  int64_t w = cut_k ? std::min(top_k, v) : std::min(PREFIX, v);
  std::vector<std::pair<float, int64_t>> top;
  std::vector<float> z;  // tempered logits of `top`
  const auto rank = [&] {
    top = top_columns(x, v, s, w);
    z.resize(top.size());
    for (size_t i = 0; i < top.size(); ++i) z[i] = top[i].first * inv_t;
  };
  rank();
  size_t last = top.size();  // survivors: top[0 .. last)
  if (top_p < 1.0) {  // the nucleus is a share of the k survivors' mass (torch.logsumexp), or of the row's
    const double lse = cut_k ? log_sum_exp(z, z.size()) : row_lse(x, v, s.max, t);
    while (true) {
      double cum = 0.0;
      last = top.size();
      for (size_t i = 0; i < top.size(); ++i) {
        if (cum >= top_p) { last = i; break; }  // keep i while the mass before it is < top_p
        cum += std::exp(static_cast<double>(z[i]) - lse);
      }
      if (cut_k || last < top.size() || cum >= top_p || w >= v) break;
      w = std::min(v, w * WIDEN);  // the nucleus is not inside the ranked prefix: rank more columns
      rank();
    }
  }
  if (min_p > 0.0) {
    const float floor = z[0] + static_cast<float>(std::log(min_p));
    while (last > 1 && !(z[last - 1] >= floor)) --last;
  }
  Draws d;
  for (size_t i = 0; i < last; ++i) {
    const int64_t col = top[i].second;
    d.ranked.emplace_back(static_cast<double>(z[i]) + gumbel(key, ids ? ids[col] : col), col);
  }
  const size_t keep = std::min<size_t>(d.ranked.size(), static_cast<size_t>(want));
  std::partial_sort(d.ranked.begin(), d.ranked.begin() + keep, d.ranked.end(),
                    [](const auto& a, const auto& b) { return a.first > b.first; });
  d.ranked.resize(keep);
  const bool open = !cut_k && top_p >= 1.0 && w < v && last == top.size();
  if (!open) {
    d.log_norm = log_sum_exp(z, last);
    return d;
  }
  // an open row: every column past the ranked prefix with z >= floor survives too (coupling.coupled_choice);
  // they are read only when their aggregate could win, or for the normaliser of the probabilities
  const double bound = std::log(static_cast<double>(v - w)) + static_cast<double>(z[w - 1]) + gumbel(key, -1);
  const bool contest = bound > d.ranked[0].first;
  if (!contest && !with_probs) return d;
  const float floor = min_p > 0.0 ? z[0] + static_cast<float>(std::log(min_p)) : -INFINITY;
  std::vector<float> rest(x, x + v);  // raw logits of the survivors not ranked yet, -inf elsewhere
  for (int64_t j = 0; j < v; ++j)
    if (!(rest[j] * inv_t >= floor)) rest[j] = -INFINITY;
  if (with_probs) d.log_norm = row_lse(rest.data(), v, s.max, t);  // over every survivor
  for (const auto& c : top) rest[c.second] = -INFINITY;
  if (contest) {
    const int64_t winner = draw_aggregate(rest, s.max, inv_t, t, key, ids, d.ranked[0].first, w);
    if (winner >= 0) {
      d.ranked.insert(d.ranked.begin(), {INFINITY, winner});
      d.ranked.resize(std::min<size_t>(d.ranked.size(), static_cast<size_t>(want)));
    }
  }
  return d;
}

// The first column of a row's max (torch.argmax), or -1 when the max is not finite (a NaN anywhere, +inf, or no
// finite value). One vectorized pass for the max, one that stops at its first occurrence.
int64_t row_argmax(const float* p, int64_t v) {
  const float m = span_max(p, v);
  if (!std::isfinite(m)) return -1;
  const __m256 target = _mm256_set1_ps(m);
  int64_t j = 0;
  for (; j + 8 <= v; j += 8) {
    const int hit = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(p + j), target, _CMP_EQ_OQ));
    if (hit) return j + __builtin_ctz(static_cast<unsigned>(hit));
  }
  for (; j < v; ++j)
    if (p[j] == m) return j;
  return -1;
}

}  // namespace

// Greedy verification's argmax of every row of x [N, V] fp32 in one call (rows in parallel): in torch it is
// ~8 small ops a step (~0.1 ms on this CPU, the block-max prefilter included), here a few microseconds a row.
at::Tensor first_argmax(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kFloat && x.size(1) > 0,
              "x must be contiguous [N, V] fp32");
  const int64_t n = x.size(0), v = x.size(1);
  at::Tensor out = at::empty({n}, x.options().dtype(at::kLong));
  int64_t* o = out.data_ptr<int64_t>();
  const float* rows = x.data_ptr<float>();
  at::parallel_for(0, n, std::max<int64_t>(1, (int64_t{1} << 18) / v), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) o[r] = row_argmax(rows + r * v, v);
  });
  return out;
}

// The k most likely columns of each row of logits x [N, V] fp32 with their softmax probabilities, best first (ties:
// lower column first, so column 0 is torch.argmax's): a greedy draft's token and runner-ups in one call instead of
// a softmax over the (pruned) vocabulary, a top-k and an argmax in torch (~0.1 ms a draft step). -1 / 0 past a
// row's end and for a row whose max is not finite (it drafts nothing).
std::vector<at::Tensor> top_softmax(const at::Tensor& x, int64_t k) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kFloat && x.size(1) > 0,
              "x must be contiguous [N, V] fp32");
  TORCH_CHECK(k >= 1, "k must be >= 1");
  const int64_t n = x.size(0), v = x.size(1);
  at::Tensor cols = at::full({n, k}, -1, x.options().dtype(at::kLong));
  at::Tensor probs = at::zeros({n, k}, x.options());
  // rows in parallel; a row's own passes run inline inside (one row: no thread is woken, which in a decode
  // loop costs more than the ~20 us the passes take)
  at::parallel_for(0, n, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* row = x.data_ptr<float>() + r * v;
      const RowStats s = block_maxima(row, v);
      if (!std::isfinite(s.max)) continue;
      const double lse = row_lse(row, v, s.max, 1.0f);
      const auto top = top_columns(row, v, s, std::min(k, v));
      for (size_t i = 0; i < top.size(); ++i) {
        cols.data_ptr<int64_t>()[r * k + i] = top[i].second;
        probs.data_ptr<float>()[r * k + i] = static_cast<float>(std::exp(static_cast<double>(top[i].first) - lse));
      }
    }
  });
  return {cols, probs};
}

std::vector<at::Tensor> coupled_sample(const at::Tensor& x, const at::Tensor& keys, double temperature, int64_t top_k,
                                       double top_p, double min_p, const std::optional<at::Tensor>& token_ids,
                                       int64_t top, bool with_probs) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kFloat && x.size(1) > 0,
              "x must be contiguous [N, V] fp32");
  TORCH_CHECK(keys.dim() == 1 && keys.is_contiguous() && keys.scalar_type() == at::kLong && keys.size(0) == x.size(0),
              "keys must be int64 [N]");
  TORCH_CHECK(!token_ids || (token_ids->dim() == 1 && token_ids->is_contiguous() &&
                             token_ids->scalar_type() == at::kLong && token_ids->size(0) == x.size(1)),
              "token_ids must be int64 [V]");
  TORCH_CHECK(top_k >= 0 && top_p > 0.0 && top_p <= 1.0 && min_p >= 0.0 && min_p <= 1.0 && top >= 1, "invalid filters");
  const int64_t n = x.size(0), v = x.size(1);
  const float t = static_cast<float>(std::max(temperature, 1e-5));
  at::Tensor cols = at::full({n, top}, -1, x.options().dtype(at::kLong));
  at::Tensor probs = at::zeros({n, top}, x.options());
  const int64_t* ids = token_ids ? token_ids->data_ptr<int64_t>() : nullptr;
  for (int64_t r = 0; r < n; ++r) {
    const float* row = x.data_ptr<float>() + r * v;
    const Draws d = sample_row(row, v, keys.data_ptr<int64_t>()[r], ids, t, top_k, top_p, min_p, top, with_probs);
    for (int64_t i = 0; i < static_cast<int64_t>(d.ranked.size()); ++i) {
      const int64_t col = d.ranked[i].second;
      cols.data_ptr<int64_t>()[r * top + i] = col;
      if (with_probs)
        probs.data_ptr<float>()[r * top + i] = static_cast<float>(std::exp(static_cast<double>(row[col] * (1.0f / t)) - d.log_norm));
    }
  }
  return {cols, probs};
}
