// casspec CPU kernels: the decode-time hot path of one forward on AVX2/FMA CPUs.
//
// Why hand-written: a forward over 1..64 query tokens is memory-bound, and on this class of CPU the
// maintained kernels in the stack are not. Measured on the project's 2-core AVX2 machine (µs, 1 row):
// oneDNN packed fp32 reaches 10-17 GB/s of the ~22 available, fbgemm's dynamic int8 linear costs
// 40-60 µs of fixed overhead per call, torch's own weight-only int8/int4 matmuls are 4-9x slower than
// fp32 here, and a forward spent ~16 ms in ~1 100 small aten ops around them. These kernels read
// weights in a tiled layout at memory bandwidth, fuse what sits around the matmuls (RMSNorm prologue,
// bias, residual accumulate, gated activation, RoPE, KV-cache write) and run decode attention with
// tree masks, so one layer is five or six calls.
//
// Numerics: every output of `linear` is accumulated in the same order whatever the number of rows
// (lane k % 8 sequentially over k, then a fixed horizontal sum), so a token's logits are bitwise the
// same when it is decoded alone or verified inside a tree. Attention, RoPE and norms work row by row.
//
// Weight layout ("tiled"): rows in tiles of 4, k in steps of 8: W[N, K] -> [N/4][K/8][4][8], so one
// tile is one contiguous stream and a k-step loads 4 rows x 8 columns. Gated MLPs interleave the gate
// and up projections two rows each per tile: tile b = (gate 2b, gate 2b+1, up 2b, up 2b+1).
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/extension.h>

#include <atomic>
#include <cmath>
#include <vector>
#include "argmax_bound.h"
#include "common.h"
#include "layer.h"
#include "native_linear.h"
#include "native_wide.h"
#include "ops.h"
#include "sampling.h"

namespace {

// Input checks: every tensor a kernel reads through a raw pointer is checked for dtype, contiguity and
// size first, so a bad call is a RuntimeError, never a read or write past a buffer.
void check_vec(const std::optional<at::Tensor>& t, at::ScalarType dtype, int64_t numel, const char* name) {
  if (!t) return;
  TORCH_CHECK(t->scalar_type() == dtype && t->is_contiguous() && t->numel() == numel, name, " must be a contiguous ",
              dtype, " tensor of ", numel, " elements, got ", t->scalar_type(), " ", t->sizes());
}

// ---- 4-bit weights: w = d * q + m per (row, group of G columns), q in [0, 15], d and m in fp16 ----
// Tile layout: [K/G groups][4 rows][G/2 bytes]; in each 16 bytes, byte j holds column j (low nibble) and
// column j + 16 (high nibble) of a 32-column chunk. Scales and mins: [K/G][4] fp16 per tile.
// y = sum_g d_g (q . x)_g + sum_g m_g xsum_g, with xsum the per-group sums of x (computed once per call).
inline void unpack32(const uint8_t* p, __m256 (&w)[4]) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)), low4 = _mm_set1_epi8(0x0F);
  const __m128i lo = _mm_and_si128(v, low4), hi = _mm_and_si128(_mm_srli_epi16(v, 4), low4);
  w[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
  w[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
  w[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
  w[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
}

struct Q4Dot {
  const LinearArgs& a;
  const uint8_t* w;      // this tile's packed weights
  const uint16_t* d;     // [K/G][4] fp16
  const uint16_t* mn;    // [K/G][4] fp16
  const float* xsum;     // [M][K/G]
  int64_t G;

  template <int MB>
  void run(int64_t m0, float (&v)[NB][3]) const {
    const int64_t groups = a.K / G;
    __m256 acc[NB][MB];
    __m128 macc[MB];
    for (int m = 0; m < MB; ++m) {
      macc[m] = _mm_setzero_ps();
      for (int r = 0; r < NB; ++r) acc[r][m] = _mm256_setzero_ps();
    }
    for (int64_t g = 0; g < groups; ++g) {
      alignas(16) float dg[NB];
      _mm_store_ps(dg, _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(d + g * NB))));
      const __m128 mg = _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(mn + g * NB)));
      for (int m = 0; m < MB; ++m) macc[m] = _mm_fmadd_ps(mg, _mm_set1_ps(xsum[(m0 + m) * groups + g]), macc[m]);
      const uint8_t* wg = w + g * NB * (G / 2);
#pragma GCC unroll 4
      for (int r = 0; r < NB; ++r) {
        __m256 part[MB];
        for (int m = 0; m < MB; ++m) part[m] = _mm256_setzero_ps();
        for (int64_t c = 0; c < G; c += 32) {
          __m256 wv[4];
          unpack32(wg + r * (G / 2) + c / 2, wv);
#pragma GCC unroll 3
          for (int m = 0; m < MB; ++m) {
            const float* xp = a.x + (m0 + m) * a.K + g * G + c;
            for (int i = 0; i < 4; ++i) part[m] = _mm256_fmadd_ps(wv[i], _mm256_loadu_ps(xp + i * KS), part[m]);
          }
        }
        const __m256 dr = _mm256_set1_ps(dg[r]);
        for (int m = 0; m < MB; ++m) acc[r][m] = _mm256_fmadd_ps(part[m], dr, acc[r][m]);
      }
    }
    for (int m = 0; m < MB; ++m) {
      alignas(16) float s[NB];
      _mm_store_ps(s, _mm_add_ps(hsum4(acc[0][m], acc[1][m], acc[2][m], acc[3][m]), macc[m]));
      for (int r = 0; r < NB; ++r) v[r][m] = s[r];
    }
  }
};

void linear_q4_tiles(const LinearArgs& a, const uint8_t* w, const uint16_t* d, const uint16_t* mn, int64_t G) {
  const int64_t tiles = (a.N + NB - 1) / NB, groups = a.K / G;
  std::vector<float> xsum(a.M * groups);
  for (int64_t m = 0; m < a.M; ++m)
    for (int64_t g = 0; g < groups; ++g) {
      float s = 0.f;
      for (int64_t k = 0; k < G; ++k) s += a.x[m * a.K + g * G + k];
      xsum[m * groups + g] = s;
    }
  const int64_t tile_bytes = NB * a.K / 2, ahead = tiles_ahead(tile_bytes, tiles * tile_bytes, a.M);
  at::parallel_for(0, tiles, 4, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      if (t + ahead < t1) prefetch_bytes(w + (t + ahead) * tile_bytes, tile_bytes);
      tile_rows(a, TileCols::adjacent(t, is_glu(a.mode)), Q4Dot{a, w + t * tile_bytes, d + t * groups * NB, mn + t * groups * NB, xsum.data(), G});
    }
  });
}


}  // namespace

at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& scale,
                  const std::optional<at::Tensor>& mins, int64_t group, const std::optional<at::Tensor>& bias,
                  const std::optional<at::Tensor>& norm_w, double eps, int64_t n, int64_t mode,
                  const std::optional<at::Tensor>& out) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kFloat, "x must be contiguous [M, K] fp32");
  const int64_t M = x.size(0), K = x.size(1), rows = (n + NB - 1) / NB * NB;
  const bool q4 = w.scalar_type() == at::kByte;
  TORCH_CHECK(n > 0 && mode >= 0 && mode <= GLU_GELU_TANH, "linear needs n > 0 and a known mode, got n=", n,
              " mode=", mode);
  TORCH_CHECK(w.is_contiguous() && (q4 || w.scalar_type() == at::kFloat || w.scalar_type() == at::kChar),
              "tiled weight must be contiguous fp32, int8 or uint8 (int4), got ", w.scalar_type());
  TORCH_CHECK(K % KS == 0 && w.numel() == (q4 ? rows * K / 2 : rows * K), "tiled weight does not match [", n, ", ", K, "]");
  TORCH_CHECK(!q4 || (group > 0 && group % 32 == 0 && K % group == 0 && scale && mins),
              "4-bit weights need a group that divides K and fp16 scales and mins");
  if (q4) {
    check_vec(scale, at::kHalf, rows * K / group, "int4 scale");
    check_vec(mins, at::kHalf, rows * K / group, "int4 mins");
  } else if (w.scalar_type() == at::kChar) {
    check_vec(scale, at::kFloat, n, "int8 scale");
  }
  check_vec(bias, at::kFloat, n, "bias");
  check_vec(norm_w, at::kFloat, K, "norm weight");
  at::Tensor xin = x;
  if (norm_w) {
    xin = at::empty_like(x);
    rms_rows(x.data_ptr<float>(), M, K, norm_w->data_ptr<float>(), eps, xin.data_ptr<float>());
  }
  const bool glu = is_glu(mode);
  TORCH_CHECK(!glu || n % 4 == 0, "a gated linear needs an even gate width, got n=", n);
  at::Tensor y;
  if (mode == ACCUMULATE) {
    TORCH_CHECK(out && out->is_contiguous() && out->scalar_type() == at::kFloat && out->dim() == 2 &&
                out->size(0) == M && out->size(1) == n, "accumulate needs out [M, N] fp32");
    y = *out;
  } else {
    y = at::empty({M, n}, x.options());  // GLU: gate | up, gated below
  }
  LinearArgs a{xin.data_ptr<float>(), M, K, n, nullptr, bias ? bias->data_ptr<float>() : nullptr,
               y.data_ptr<float>(), y.size(1), mode, n / 2};
  if (q4) {
    linear_q4_tiles(a, w.data_ptr<uint8_t>(), reinterpret_cast<const uint16_t*>(scale->data_ptr()),
                    reinterpret_cast<const uint16_t*>(mins->data_ptr()), group);
  } else if (w.scalar_type() == at::kFloat) {
    linear_tiles<F32>(a, w.data_ptr<float>());
  } else {
    TORCH_CHECK(w.scalar_type() == at::kChar && scale, "int8 weights need per-row scales");
    a.scale = scale->data_ptr<float>();
    linear_tiles<I8>(a, w.data_ptr<int8_t>());
  }
  return glu ? gated(y, mode) : y;
}

namespace {

// ---- RoPE + KV-cache write --------------------------------------------------------------------
// qkv [M, (H + 2 Hkv) D] -> q [M, H, D] rotated; k rotated and v written to cache[h, slots[m], :].
// RoPE in HF's half-split layout: (x1, x2) -> (x1 c - x2 s, x2 c + x1 s), c/s [M, D/2].
void rotate(const float* src, const float* c, const float* s, int64_t D, const float* norm_w, double eps, float* dst) {
  const int64_t h = D / 2;
  float scale = 1.f;
  std::vector<float> tmp;
  if (norm_w) {  // per-head RMSNorm (Qwen3, Gemma 3) before rotation
    float ss = 0.f;
    for (int64_t d = 0; d < D; ++d) ss += src[d] * src[d];
    scale = 1.f / std::sqrt(ss / static_cast<float>(D) + static_cast<float>(eps));
    tmp.resize(D);
    for (int64_t d = 0; d < D; ++d) tmp[d] = src[d] * scale * norm_w[d];
    src = tmp.data();
  }
  for (int64_t d = 0; d < h; ++d) {
    float x1 = src[d], x2 = src[d + h];
    dst[d] = x1 * c[d] - x2 * s[d];
    dst[d + h] = x2 * c[d] + x1 * s[d];
  }
}

}  // namespace

at::Tensor rope_kv(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& k_cache,
                   at::Tensor& v_cache, const at::Tensor& slots, int64_t heads, int64_t kv_heads,
                   const std::optional<at::Tensor>& q_norm, const std::optional<at::Tensor>& k_norm, double eps) {
  TORCH_CHECK(heads > 0 && kv_heads > 0, "rope_kv needs heads > 0 and kv_heads > 0");
  TORCH_CHECK(k_cache.dim() == 3 && k_cache.scalar_type() == at::kFloat && v_cache.scalar_type() == at::kFloat &&
              k_cache.sizes() == v_cache.sizes() && k_cache.size(0) == kv_heads,
              "caches must be fp32 [Hkv, S, D] with Hkv = ", kv_heads, ", got ", k_cache.sizes(), " and ",
              v_cache.sizes());
  const int64_t D = k_cache.size(-1), S = k_cache.size(-2);
  TORCH_CHECK(qkv.dim() == 2 && qkv.scalar_type() == at::kFloat, "qkv must be fp32 [M, (H + 2 Hkv) D]");
  const int64_t M = qkv.size(0);
  TORCH_CHECK(qkv.is_contiguous() && qkv.size(1) == (heads + 2 * kv_heads) * D, "qkv must be [M, (H + 2 Hkv) D]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous [Hkv, S, D]");
  TORCH_CHECK(D > 0 && D % 2 == 0, "head_dim must be even, got ", D);
  for (const at::Tensor* t : {&cos, &sin})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 2 && t->size(0) == M &&
                t->size(1) == D / 2, "cos and sin must be contiguous fp32 [M, D/2] = [", M, ", ", D / 2, "], got ",
                t->sizes());
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous() && slots.numel() == M,
              "slots must be contiguous int64 [M] = [", M, "], got ", slots.scalar_type(), " ", slots.sizes());
  check_vec(q_norm, at::kFloat, D, "q_norm");
  check_vec(k_norm, at::kFloat, D, "k_norm");
  auto q = at::empty({M, heads, D}, qkv.options());
  const float *src = qkv.data_ptr<float>(), *c = cos.data_ptr<float>(), *s = sin.data_ptr<float>();
  const float* qn = q_norm ? q_norm->data_ptr<float>() : nullptr;
  const float* kn = k_norm ? k_norm->data_ptr<float>() : nullptr;
  const int64_t* sl = slots.data_ptr<int64_t>();
  float *qp = q.data_ptr<float>(), *kp = k_cache.data_ptr<float>(), *vp = v_cache.data_ptr<float>();
  const int64_t row = (heads + 2 * kv_heads) * D;
  for (int64_t m = 0; m < M; ++m) {
    TORCH_CHECK(sl[m] >= 0 && sl[m] < S, "cache slot ", sl[m], " out of range");
    const float* r = src + m * row;
    for (int64_t h = 0; h < heads; ++h) rotate(r + h * D, c + m * D / 2, s + m * D / 2, D, qn, eps, qp + (m * heads + h) * D);
    for (int64_t h = 0; h < kv_heads; ++h) {
      rotate(r + (heads + h) * D, c + m * D / 2, s + m * D / 2, D, kn, eps, kp + (h * S + sl[m]) * D);
      std::copy_n(r + (heads + kv_heads + h) * D, D, vp + (h * S + sl[m]) * D);
    }
  }
  return q;
}

namespace {

// ---- decode attention -------------------------------------------------------------------------
// q [M, H, D], caches [Hkv, S, D]. Row m sees keys lo[m] .. lo[m] + len[m] - 1 (its sequence's region),
// filtered by allowed[m, j] (bool, [M, W], j relative to lo[m]) when given.
// Work items are (kv head, query row, block of KEY_BLOCK keys): the H/Hkv query heads of a kv head go three
// or two at a time, each key and value vector loaded once for them (one head at a time, loads outnumbered
// the multiply-adds: SmolLM2's attention of 470 new rows over 1,600 keys 12.5-14.0 -> 10.0 ms a layer, Gemma-3's
// 256-token prefill 1.65 -> 1.2 ms), and blocks let short queries over long contexts use every thread. Each block keeps
// (max, sum, unnormalized output); a fixed-order merge normalizes. Every reduction runs in the same
// order for a given key index whatever M is, so a token's attention is the same decoded alone or
// verified in a chain.
constexpr int64_t KEY_BLOCK = 256;

struct AttnArgs {
  const float *q, *k, *v;
  const int64_t *lo, *len;  // [M] first key slot and key count of each row
  const uint8_t* allowed;   // [M, W] or null
  int64_t M, H, G, D, S, W, blocks;
  float scale;
  float* part;  // [Hkv, M, blocks, G, D + 2]: unnormalized output, max, sum
  bool wide;    // the AVX-512 code (bitwise the same outputs)
};

constexpr int64_t MAX_WIDE_D = 256;  // the largest head size the AVX-512 code takes (its query buffer)

std::atomic<bool> attention_wide{avx512_env_on()};

// The 4 key rows of a scores chunk at j0, n of them real: missing ones repeat the last (never read past the cache).
inline void chunk_keys(const float* k, int64_t j0, int64_t n, int64_t D, const float* (&kt)[4]) {
  for (int t = 0; t < 4; ++t) kt[t] = k + (j0 + std::min<int64_t>(t, std::max<int64_t>(n - 1, 0))) * D;
}

// Scores of keys [j0, j0 + n), n <= 4, for Q query heads at once (missing keys score 0; the caller masks
// them): each key vector is loaded once for the Q heads of its group. A score's 8 lanes are summed by
// hsum4's tree, whatever Q and whichever 4 keys share the call.
template <int Q>
inline void scores4(const float* const* qg, const float* k, int64_t j0, int64_t n, int64_t D, __m128 (&s)[Q]) {
  __m256 acc[Q][4];
  for (int g = 0; g < Q; ++g)
    for (int t = 0; t < 4; ++t) acc[g][t] = _mm256_setzero_ps();
  const float* kt[4];
  chunk_keys(k, j0, n, D, kt);
  for (int64_t d = 0; d < D; d += KS) {
    __m256 qv[Q];
    for (int g = 0; g < Q; ++g) qv[g] = _mm256_loadu_ps(qg[g] + d);
#pragma GCC unroll 4
    for (int t = 0; t < 4; ++t) {
      if (t >= n) break;
      const __m256 kv = _mm256_loadu_ps(kt[t] + d);
      for (int g = 0; g < Q; ++g) acc[g][t] = _mm256_fmadd_ps(qv[g], kv, acc[g][t]);
    }
  }
  for (int g = 0; g < Q; ++g) s[g] = hsum4(acc[g][0], acc[g][1], acc[g][2], acc[g][3]);
}

// out_g[0 : 8 NV] = sum_j p_g[j] v[j, 0 : 8 NV] for Q heads (p_g = p + g ldp) over keys `keys` (in order), each
// value row loaded once for the Q heads. The keys are those some head gives a non-zero p: a key all Q heads give 0
// (masked) is skipped, as a lone head skips its zeros; a head's 0 among others adds 0 * v, which leaves its sum
// as it is (the keys it sees are written, finite).
template <int Q, int NV>
inline void pv(const float* p, int64_t ldp, const int32_t* keys, int64_t n, const float* v, int64_t ldv, float* out,
               int64_t ldo) {
  __m256 acc[Q][NV];
  for (int g = 0; g < Q; ++g)
    for (int i = 0; i < NV; ++i) acc[g][i] = _mm256_setzero_ps();
  for (int64_t k = 0; k < n; ++k) {
    const int64_t j = keys[k];
    __m256 pj[Q];
    for (int g = 0; g < Q; ++g) pj[g] = _mm256_broadcast_ss(p + g * ldp + j);
#pragma GCC unroll 4
    for (int i = 0; i < NV; ++i) {
      const __m256 vv = _mm256_loadu_ps(v + j * ldv + i * KS);
      for (int g = 0; g < Q; ++g) acc[g][i] = _mm256_fmadd_ps(pj[g], vv, acc[g][i]);
    }
  }
  for (int g = 0; g < Q; ++g)
    for (int i = 0; i < NV; ++i) _mm256_storeu_ps(out + g * ldo + i * KS, acc[g][i]);
}

// ---- the same attention on AVX-512 (where the CPU has it: `attention_avx512`), bitwise the AVX2 outputs ----
// Scores: two query heads share a 512-bit FMA (lanes 0-7 head 2i, lanes 8-15 head 2i + 1, from `qp`, the heads'
// d interleaved 8 and 8) against a key's 8 d broadcast to both halves, so each lane runs scores4's chain and each
// half is summed by the same hsum4. Values: 16 output columns a vector, each column summed over the keys in
// order as in pv. Half the FMAs of the AVX2 code (Gemma-3's 4 heads a kv head; SmolLM2's 3 use 2 pairs). Measured
// on a 2-vCPU Xeon, in-process A/B: 128 rows over ~1,600 keys 1.22x (SmolLM2's shape) and 1.47x (Gemma-3's); whole
// forwards: a 128-token prefill chunk after 1,200 / 3,000 tokens 1.05x / 1.12x (SmolLM2), 1.07x / 1.13x (Gemma-3),
// decoding one token at 1,600 1.12x / 1.08x (there the fp32 KV reads bound it). Short contexts: level.
#define WIDE_TARGET __attribute__((target("avx512f,avx512dq,avx512vl")))

template <int Q>
WIDE_TARGET inline void scores4_wide(const float* qp, const float* k, int64_t j0, int64_t n, int64_t D,
                                     __m128 (&s)[Q]) {
  constexpr int P = (Q + 1) / 2;
  __m512 acc[P][4];
  for (int i = 0; i < P; ++i)
    for (int t = 0; t < 4; ++t) acc[i][t] = _mm512_setzero_ps();
  const float* kt[4];
  chunk_keys(k, j0, n, D, kt);
  for (int64_t d = 0; d < D; d += KS) {
    __m512 qv[P];
    for (int i = 0; i < P; ++i) qv[i] = _mm512_loadu_ps(qp + (i * D + d) * 2);
#pragma GCC unroll 4
    for (int t = 0; t < 4; ++t) {
      if (t >= n) break;
      const __m512 kv = _mm512_broadcast_f32x8(_mm256_loadu_ps(kt[t] + d));
      for (int i = 0; i < P; ++i) acc[i][t] = _mm512_fmadd_ps(qv[i], kv, acc[i][t]);
    }
  }
  for (int g = 0; g < Q; ++g) {
    __m256 h[4];
    for (int t = 0; t < 4; ++t)
      h[t] = g % 2 ? _mm512_extractf32x8_ps(acc[g / 2][t], 1) : _mm512_castps512_ps256(acc[g / 2][t]);
    s[g] = hsum4(h[0], h[1], h[2], h[3]);
  }
}

// pv for NV vectors of 16 columns.
template <int Q, int NV>
WIDE_TARGET inline void pv_wide(const float* p, int64_t ldp, const int32_t* keys, int64_t n, const float* v, int64_t ldv,
                                float* out, int64_t ldo) {
  __m512 acc[Q][NV];
  for (int g = 0; g < Q; ++g)
    for (int i = 0; i < NV; ++i) acc[g][i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < n; ++k) {
    const int64_t j = keys[k];
    __m512 pj[Q];
    for (int g = 0; g < Q; ++g) pj[g] = _mm512_set1_ps(p[g * ldp + j]);
#pragma GCC unroll 4
    for (int i = 0; i < NV; ++i) {
      const __m512 vv = _mm512_loadu_ps(v + j * ldv + i * 16);
      for (int g = 0; g < Q; ++g) acc[g][i] = _mm512_fmadd_ps(pj[g], vv, acc[g][i]);
    }
  }
  for (int g = 0; g < Q; ++g)
    for (int i = 0; i < NV; ++i) _mm512_storeu_ps(out + g * ldo + i * 16, acc[g][i]);
}

// Scores (scaled, masked) of one block's keys for Q query heads into p[g * padded + j]; returns their maxima.
// (WIDE: scores4_wide over qp, the heads interleaved, inlined into block_scores_wide; else scores4 over qg.)
template <int Q, bool WIDE>
__attribute__((always_inline)) inline void block_scores_impl(const AttnArgs& a, const float* const* qg, const float* qp,
                                                             const float* kc, int64_t j0, int64_t len, int64_t padded,
                                                             const uint8_t* allow, float* p, float (&mx)[Q]) {
  const __m128 scale = _mm_set1_ps(a.scale), ninf = _mm_set1_ps(-INFINITY);
  __m128 vmx[Q];
  for (int g = 0; g < Q; ++g) vmx[g] = ninf;
  for (int64_t j = 0; j < padded; j += 4) {
    const int64_t n = std::max<int64_t>(0, std::min<int64_t>(4, len - j));
    __m128 s[Q];
    if constexpr (WIDE)
      scores4_wide<Q>(qp, kc, j0 + j, n, a.D, s);
    else
      scores4<Q>(qg, kc, j0 + j, n, a.D, s);
    __m128 keep = _mm_castsi128_ps(_mm_set1_epi32(-1));  // masked keys and the padding of the chunk score -inf
    if (allow || n < 4) {
      alignas(16) int32_t bits[4];
      for (int t = 0; t < 4; ++t) bits[t] = t < n && (!allow || allow[j0 + j + t]) ? -1 : 0;
      keep = _mm_castsi128_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(bits)));
    }
    for (int g = 0; g < Q; ++g) {
      const __m128 v = _mm_blendv_ps(ninf, _mm_mul_ps(s[g], scale), keep);
      _mm_storeu_ps(p + g * padded + j, v);
      vmx[g] = _mm_max_ps(vmx[g], v);
    }
  }
  for (int g = 0; g < Q; ++g) {
    alignas(16) float m4[4];
    _mm_store_ps(m4, vmx[g]);
    mx[g] = std::max(std::max(m4[0], m4[1]), std::max(m4[2], m4[3]));
  }
}

template <int Q>
void block_scores(const AttnArgs& a, const float* const* qg, const float* kc, int64_t j0, int64_t len, int64_t padded,
                  const uint8_t* allow, float* p, float (&mx)[Q]) {
  block_scores_impl<Q, false>(a, qg, nullptr, kc, j0, len, padded, allow, p, mx);
}

template <int Q>
WIDE_TARGET void block_scores_wide(const AttnArgs& a, const float* const* qg, const float* kc, int64_t j0, int64_t len,
                                   int64_t padded, const uint8_t* allow, float* p, float (&mx)[Q]) {
  constexpr int P = (Q + 1) / 2;
  alignas(64) float qp[P * 2 * MAX_WIDE_D];  // head pairs, d interleaved 8 and 8 (a lone last head beside zeros)
  for (int i = 0; i < P; ++i)
    for (int64_t d = 0; d < a.D; d += KS)
      for (int h = 0; h < 2; ++h)
        for (int e = 0; e < KS; ++e) qp[(i * a.D + d) * 2 + h * KS + e] = 2 * i + h < Q ? qg[2 * i + h][d + e] : 0.f;
  block_scores_impl<Q, true>(a, qg, qp, kc, j0, len, padded, allow, p, mx);
}

// p @ V of one block's keys for Q heads into out (stride D + 2 a head): 64 columns a call, a rest of 32 / 16 / 8.
template <int Q>
void block_pv(const AttnArgs& a, const float* p, int64_t padded, const int32_t* keys, int64_t n, const float* v,
              float* out, int64_t d0) {
  for (; d0 < a.D; d0 += 4 * KS) {
    switch (std::min<int64_t>(4, (a.D - d0) / KS)) {
      case 4: pv<Q, 4>(p, padded, keys, n, v + d0, a.D, out + d0, a.D + 2); break;
      case 2: pv<Q, 2>(p, padded, keys, n, v + d0, a.D, out + d0, a.D + 2); break;
      case 1: pv<Q, 1>(p, padded, keys, n, v + d0, a.D, out + d0, a.D + 2); break;
      default: break;  // (attention refuses other head sizes)
    }
  }
}

template <int Q>
WIDE_TARGET void block_pv_wide(const AttnArgs& a, const float* p, int64_t padded, const int32_t* keys, int64_t n,
                               const float* v, float* out) {
  int64_t d0 = 0;
  for (; d0 + 64 <= a.D; d0 += 64) pv_wide<Q, 4>(p, padded, keys, n, v + d0, a.D, out + d0, a.D + 2);
  block_pv<Q>(a, p, padded, keys, n, v, out, d0);
}

struct AttnScratch {  // a thread's buffers: the heads' p [Q, padded], the keys they add up
  std::vector<float> p;
  std::vector<int32_t> keys;
};

// Q query heads of one kv head, one row and one block of keys: (unnormalized output, max, sum) of each.
template <int Q>
void attend_heads(const AttnArgs& a, int64_t h, int64_t m, int64_t b, int64_t g0, AttnScratch& buf) {
  const int64_t j0 = b * KEY_BLOCK, len = std::min(a.len[m], j0 + KEY_BLOCK) - j0;
  const int64_t padded = (std::max<int64_t>(len, 0) + KS - 1) / KS * KS;
  const float* kc = a.k + (h * a.S + a.lo[m]) * a.D;  // keys of this row's region, relative index j
  const float* vc = a.v + (h * a.S + a.lo[m]) * a.D;
  float* out = a.part + (((h * a.M + m) * a.blocks + b) * a.G + g0) * (a.D + 2);  // head g0 + g at g (D + 2)
  if (len <= 0) {  // this row's keys end before the block: it contributes nothing
    for (int g = 0; g < Q; ++g) out[g * (a.D + 2) + a.D] = -INFINITY, out[g * (a.D + 2) + a.D + 1] = 0.f;
    return;
  }
  const float* qg[Q];
  for (int g = 0; g < Q; ++g) qg[g] = a.q + (m * a.H + h * a.G + g0 + g) * a.D;
  buf.p.resize(Q * padded);
  float* p = buf.p.data();
  float mx[Q];
  const uint8_t* allow = a.allowed ? a.allowed + m * a.W : nullptr;
  if (a.wide)
    block_scores_wide<Q>(a, qg, kc, j0, len, padded, allow, p, mx);
  else
    block_scores<Q>(a, qg, kc, j0, len, padded, allow, p, mx);
  for (int g = 0; g < Q; ++g) {  // p = exp(s - max), summed 8 keys to a lane
    __m256 sum = _mm256_setzero_ps();
    const __m256 bmx = _mm256_set1_ps(mx[g]);
    for (int64_t j = 0; j < padded; j += KS) {
      float* pj = p + g * padded + j;
      const __m256 e = mx[g] == -INFINITY ? _mm256_setzero_ps() : exp256(_mm256_sub_ps(_mm256_loadu_ps(pj), bmx));
      _mm256_storeu_ps(pj, e);
      sum = _mm256_add_ps(sum, e);
    }
    out[g * (a.D + 2) + a.D] = mx[g];
    out[g * (a.D + 2) + a.D + 1] = hsum(sum);
  }
  buf.keys.resize(len);  // the keys some head gives a non-zero p
  int32_t* keys = buf.keys.data();
  int64_t n = 0;
  for (int64_t j = 0; j < len; ++j) {
    bool any = false;
    for (int g = 0; g < Q; ++g) any |= p[g * padded + j] != 0.f;
    if (any) keys[n++] = static_cast<int32_t>(j);
  }
  if (a.wide)  // unnormalized p @ V
    block_pv_wide<Q>(a, p, padded, keys, n, vc + j0 * a.D, out);
  else
    block_pv<Q>(a, p, padded, keys, n, vc + j0 * a.D, out, 0);
}

// A work item: the G query heads of kv head h for row m over key block b, three or two at a time (registers).
void attend_block(const AttnArgs& a, int64_t h, int64_t m, int64_t b, AttnScratch& buf) {
  int64_t g = 0;
  for (; a.G - g >= 3 && a.G - g != 4; g += 3) attend_heads<3>(a, h, m, b, g, buf);
  for (; a.G - g >= 2; g += 2) attend_heads<2>(a, h, m, b, g, buf);
  if (g < a.G) attend_heads<1>(a, h, m, b, g, buf);
}

// out[m, h*G + g] = sum_b w_b o_b / sum_b w_b s_b, with w_b = exp(max_b - max).
void merge_blocks(const AttnArgs& a, int64_t h, int64_t m, float* out) {
  for (int64_t g = 0; g < a.G; ++g) {
    const int64_t stride = a.G * (a.D + 2);
    const float* first = a.part + ((h * a.M + m) * a.blocks * a.G + g) * (a.D + 2);
    float mx = -INFINITY;
    for (int64_t b = 0; b < a.blocks; ++b) mx = std::max(mx, first[b * stride + a.D]);
    float* dst = out + (m * a.H + h * a.G + g) * a.D;
    std::fill_n(dst, a.D, 0.f);
    float tot = 0.f;
    for (int64_t b = 0; b < a.blocks; ++b) {
      const float* blk = first + b * stride;
      if (blk[a.D + 1] == 0.f) continue;
      const float w = std::exp(blk[a.D] - mx);  // exactly 1 for the block holding the max
      tot += w * blk[a.D + 1];
      for (int64_t d = 0; d < a.D; ++d) dst[d] += w * blk[d];
    }
    const float inv = 1.f / tot;
    for (int64_t d = 0; d < a.D; ++d) dst[d] *= inv;
  }
}

}  // namespace

at::Tensor attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& lo,
                     const at::Tensor& len, const std::optional<at::Tensor>& allowed, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 3 && q.scalar_type() == at::kFloat &&
              k_cache.scalar_type() == at::kFloat && v_cache.scalar_type() == at::kFloat &&
              k_cache.sizes() == v_cache.sizes(),
              "attention needs fp32 q [M, H, D] and caches [Hkv, S, D] of one shape");
  const int64_t M = q.size(0), H = q.size(1), D = q.size(2), Hkv = k_cache.size(0), S = k_cache.size(1);
  TORCH_CHECK(Hkv > 0 && k_cache.size(2) == D, "caches must be [Hkv, S, D] with D = ", D, ", got ", k_cache.sizes());
  TORCH_CHECK(q.is_contiguous() && D % KS == 0 && H % Hkv == 0, "bad attention shapes");
  TORCH_CHECK(D % 32 == 0 || D % 32 == 8 || D % 32 == 16, "head_dim must be 32 k, 32 k + 8 or 32 k + 16, got ", D);
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous [Hkv, S, D]");
  TORCH_CHECK(lo.numel() == M && len.numel() == M && lo.scalar_type() == at::kLong && len.scalar_type() == at::kLong &&
              lo.is_contiguous() && len.is_contiguous(), "lo and len must be contiguous int64 [M]");
  const int64_t *lp = lo.data_ptr<int64_t>(), *np = len.data_ptr<int64_t>();
  int64_t W = 0;
  for (int64_t m = 0; m < M; ++m) {
    TORCH_CHECK(np[m] > 0 && lp[m] >= 0 && lp[m] + np[m] <= S, "row ", m, " keys out of the cache");
    W = std::max(W, np[m]);
  }
  const uint8_t* al = nullptr;
  if (allowed) {
    TORCH_CHECK(allowed->scalar_type() == at::kBool && allowed->dim() == 2 && allowed->is_contiguous() &&
                allowed->size(0) == M && allowed->size(1) >= W, "allowed must be a contiguous bool [M, W] tensor, got ",
                allowed->scalar_type(), " ", allowed->sizes());
    al = reinterpret_cast<const uint8_t*>(allowed->data_ptr());
    W = allowed->size(1);
  }
  const int64_t G = H / Hkv, blocks = (W + KEY_BLOCK - 1) / KEY_BLOCK;
  auto part = at::empty({Hkv * M * blocks * G * (D + 2)}, q.options());
  auto out = at::empty({M, H * D}, q.options());
  AttnArgs a{q.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), lp, np, al, M, H, G, D, S, W,
             blocks, static_cast<float>(scale), part.data_ptr<float>(),
             attention_wide.load(std::memory_order_relaxed) && wide_supported() && D <= MAX_WIDE_D};
  // A work item of fewer than ~64k multiply-adds is not worth waking a second thread for.
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, G * D * std::min(W, KEY_BLOCK) * 2));
  float* op = out.data_ptr<float>();
  at::parallel_for(0, Hkv * M * blocks, grain, [&](int64_t i0, int64_t i1) {
    AttnScratch buf;
    for (int64_t i = i0; i < i1; ++i) attend_block(a, i / (M * blocks), (i / blocks) % M, i % blocks, buf);
  });
  for (int64_t i = 0; i < Hkv * M; ++i) merge_blocks(a, i / M, i % M, op);
  return out;
}

// h += rms_norm(x) * w (Gemma 3's post-attention / post-feedforward norms), in place.
void add_rms_norm(at::Tensor& h, const at::Tensor& x, const at::Tensor& w, double eps) {
  TORCH_CHECK(h.is_contiguous() && x.is_contiguous() && h.sizes() == x.sizes(), "h and x must match");
  TORCH_CHECK(x.dim() == 2 && h.scalar_type() == at::kFloat && x.scalar_type() == at::kFloat,
              "h and x must be fp32 [M, K]");
  const int64_t M = x.size(0), K = x.size(1);
  check_vec(w, at::kFloat, K, "norm weight");
  std::vector<float> tmp(M * K);
  rms_rows(x.data_ptr<float>(), M, K, w.data_ptr<float>(), eps, tmp.data());
  float* hp = h.data_ptr<float>();
  for (int64_t i = 0; i < M * K; ++i) hp[i] += tmp[i];
}

// Bound with pybind11 rather than registered as torch ops: a call costs ~0.4 us instead of ~3 us of
// dispatcher boxing, and a forward makes ~180 of them.
// The ops run without the GIL (they touch no Python object): a server's event loop thread formats and
// sends what its worker thread produced while the worker computes, instead of waiting for the GIL
// between kernel calls.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using nogil = py::call_guard<py::gil_scoped_release>;
  m.def("linear", &linear, nogil(), "y = rmsnorm(x) W^T + b: fp32, int8 or int4 tiled weights; store, accumulate or GLU");
  m.def("rope_kv", &rope_kv, nogil(), "RoPE on q and k, k and v written to the caches at slots; returns q [M, H, D]");
  m.def("attention", &attention, nogil(), "decode attention: row m over keys lo[m] .. lo[m] + len[m] - 1, optional [M, W] mask");
  m.def("add_rms_norm", &add_rms_norm, nogil(), "h += rmsnorm(x) * w, in place");
  m.def("native_linear", &native_linear, nogil(), "y = rmsnorm(x) W^T + b over weights in GGUF / bf16 / fp16 blocks, per part; act8: int8 activations");
  m.def("run_ahead", [](std::optional<int64_t> n) { if (n) set_run_ahead(*n); return run_ahead(); },
        "Tiles requested ahead in each run of rows at 1-3 input rows (common.h; n None: read only); the value now",
        py::arg("n") = py::none());
  m.def("attention_avx512", [](std::optional<bool> on) {
          if (on) attention_wide.store(*on, std::memory_order_relaxed);
          return attention_wide.load(std::memory_order_relaxed) && wide_supported();
        }, py::arg("on") = py::none(),
        "whether attention runs its AVX-512 code (bitwise the AVX2 code's outputs; CASSPEC_AVX512=0 turns it off); on=True/False switches");
  m.def("avx512_linear", [](std::optional<bool> on) { if (on) set_wide(*on); return wide_active(); },
        py::arg("on") = py::none(),
        "whether native linears of 6 rows or more run on AVX-512 (bitwise the AVX2 path's outputs); on=True/False switches");
  m.def("dequantize_rows", &dequantize_rows, nogil(), "rows of a block tensor as fp32 (bit-identical to gguf-py)");
  m.def("native_type_supported", &native_type_supported, "whether a ggml type has a kernel");
  py::class_<Projection>(m, "Projection", "a projection bound for layer_forward (native blocks, or tiled weights)")
      .def(py::init([](std::vector<at::Tensor> parts, std::vector<int64_t> types, std::optional<at::Tensor> tiled,
                       std::optional<at::Tensor> scale, std::optional<at::Tensor> mins, int64_t group, int64_t n,
                       std::optional<at::Tensor> bias, int64_t glu, bool act8) {
        TORCH_CHECK(!parts.empty() ? parts.size() == types.size() : tiled.has_value(), "native parts or tiled weights");
        return Projection{std::move(parts), std::move(types), std::move(tiled), std::move(scale), std::move(mins), group,
                          n, std::move(bias), glu, act8};
      }));
  py::class_<Layer>(m, "Layer", "a decoder layer bound for layer_forward")
      .def(py::init([](Projection qkv, Projection o, Projection gate_up, Projection down, at::Tensor attn_norm,
                       at::Tensor mlp_norm, std::optional<at::Tensor> post_attn_norm,
                       std::optional<at::Tensor> post_mlp_norm, std::optional<at::Tensor> q_norm,
                       std::optional<at::Tensor> k_norm, int64_t heads, int64_t kv_heads, double eps, double scale) {
        return Layer{std::move(qkv), std::move(o), std::move(gate_up), std::move(down), std::move(attn_norm),
                     std::move(mlp_norm), std::move(post_attn_norm), std::move(post_mlp_norm), std::move(q_norm),
                     std::move(k_norm), heads, kv_heads, eps, scale};
      }));
  m.def("layer_forward", &layer_forward, nogil(), "h += attention, then h += MLP of one bound Layer, in place (the ops one by one)");
  m.def("bound_candidates", &bound_candidates, nogil(), "columns that may hold a row's exact argmax, from int8-activation logits and their error bound ([C] int64, sorted)");
  m.def("first_argmax", &first_argmax, nogil(), "first column of each row's max ([N] int64; -1 where the max is not finite)");
  m.def("top_softmax", &top_softmax, nogil(), "k best columns of each row with their softmax probabilities ([N, k] each; -1 / 0: none)");
  m.def("coupled_sample", &coupled_sample, nogil(), "coupled (Gumbel-max) draws per row under top-k / top-p / min-p: (columns [N, top] best first, -1 past the survivors; their filtered probabilities)");
}
