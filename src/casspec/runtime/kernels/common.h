// Shared pieces of casspec's CPU kernels: tiles, dot products over them, the linear epilogue, norms.
// Included by cpu_kernels.cpp (fp32/int8/int4 tiled weights, attention) and native_linear.cpp
// (weights in their GGUF / bf16 blocks). See cpu_kernels.cpp for the layout and the numerics contract.
#pragma once
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <vector>

// Runs of rows of blocks (each_block_tile, at 1-3 input rows) request their next rows while the current tile
// computes: `run_ahead()` tiles on in each run (0: the hardware prefetcher alone). On a 2-vCPU Xeon with AVX-512
// and a 480 MB L3 (session w) the fp32 path read weights from L3 at ~8 GB/s without it, its tile compute not
// overlapping the misses (one row of a Q4_1 3072 x 576 linear cycled through 71 MB of copies: 128 -> 78 us; in one
// process, alternating: SmolLM2's one-row forward 12.6 -> 7.6 ms, Gemma's 19.5 -> 15.3, the int8-activation plans
// ~1.25x); 1 to 3 tiles ahead measured alike, 8 slower. Default 1; CASSPEC_RUN_AHEAD (read once) or
// `set_run_ahead` (`ops.run_ahead(n)`) set it; the outputs are the same either way. (The AMD Zen 3 VM on which
// runs were chosen over adjacent prefetched tiles never measured runs with this prefetch.)
int64_t run_ahead();
void set_run_ahead(int64_t tiles);

namespace {

constexpr int64_t NB = 4;  // weight rows per tile
constexpr int64_t KS = 8;  // k per step (one AVX2 vector)

enum Mode : int64_t { STORE = 0, ACCUMULATE = 1, GLU_SILU = 2, GLU_GELU_TANH = 3 };
inline bool is_glu(int64_t mode) { return mode == GLU_SILU || mode == GLU_GELU_TANH; }

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float hmax(__m256 v) {
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
}

// [sum(a), sum(b), sum(c), sum(d)]: four horizontal sums in one vector, each by the same add tree.
inline __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

// exp for a vector of floats: range reduction x = n ln2 + r, |r| <= ln2/2, degree-6 polynomial.
inline __m256 exp256(__m256 x) {
  const __m256 underflow = _mm256_cmp_ps(x, _mm256_set1_ps(-87.3f), _CMP_LT_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(underflow, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));  // exp(-inf) = 0 exactly
}

// ---- weights: how one k-step of a tile row becomes 8 floats -----------------------------------
struct F32 {
  using T = float;
  static inline __m256 load(const float* p) { return _mm256_loadu_ps(p); }
};
struct I8 {
  using T = int8_t;
  static inline __m256 load(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
};

// acc[r][m] = sum_k w[r, k] * x[m, k] for one tile (4 rows) and MB input rows.
template <class W, int MB>
inline void tile_dot(const float* __restrict x, int64_t K, const typename W::T* __restrict w, float (&out)[NB][3]) {
  __m256 acc[NB][MB];
#pragma GCC unroll 4
  for (int r = 0; r < NB; ++r)
#pragma GCC unroll 3
    for (int m = 0; m < MB; ++m) acc[r][m] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += KS) {
    __m256 xv[MB];
#pragma GCC unroll 3
    for (int m = 0; m < MB; ++m) xv[m] = _mm256_loadu_ps(x + m * K + k);
#pragma GCC unroll 4
    for (int r = 0; r < NB; ++r) {
      __m256 wv = W::load(w + k * NB + r * KS);
#pragma GCC unroll 3
      for (int m = 0; m < MB; ++m) acc[r][m] = _mm256_fmadd_ps(wv, xv[m], acc[r][m]);
    }
  }
  for (int m = 0; m < MB; ++m) {
    alignas(16) float s[NB];
    _mm_store_ps(s, hsum4(acc[0][m], acc[1][m], acc[2][m], acc[3][m]));
    for (int r = 0; r < NB; ++r) out[r][m] = s[r];
  }
}

// The gated activations, 8 at a time: silu(g) = g / (1 + exp(-g)), and the tanh GELU through
// 0.5 (1 + tanh(u)) = 1 / (1 + exp(-2u)), u = sqrt(2 / pi) (g + 0.044715 g^3). Libm's scalar expf / tanhf
// took a fifth of a Gemma-3 prefill (9.4M calls for 256 tokens) and ~4% of a SmolLM2 decode step.
inline __m256 glu_act(__m256 g, int64_t mode) {
  const __m256 one = _mm256_set1_ps(1.f);
  __m256 z = _mm256_sub_ps(_mm256_setzero_ps(), g);  // -g
  if (mode == GLU_GELU_TANH) {
    const __m256 g3 = _mm256_mul_ps(_mm256_mul_ps(g, g), g);
    const __m256 u = _mm256_mul_ps(_mm256_set1_ps(0.7978845608028654f),
                                   _mm256_add_ps(g, _mm256_mul_ps(_mm256_set1_ps(0.044715f), g3)));
    z = _mm256_mul_ps(_mm256_set1_ps(-2.f), u);
  }
  return _mm256_div_ps(g, _mm256_add_ps(one, exp256(z)));
}

// y[m, f] = act(gu[m, f]) * gu[m, F + f] -> y [M, F], from gate and up side by side ([M, 2F], as GLU tiles
// store them: epilogue). A row's last F % 8 features go through a padded vector: the same arithmetic wherever
// a feature sits.
inline at::Tensor gated(const at::Tensor& gu, int64_t mode) {
  const int64_t M = gu.size(0), F = gu.size(1) / 2;
  at::Tensor out = at::empty({M, F}, gu.options());
  const float* gp = gu.data_ptr<float>();
  float* yp = out.data_ptr<float>();
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / std::max<int64_t>(F, 1)), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const float* g = gp + m * 2 * F;
      const float* u = g + F;
      float* y = yp + m * F;
      int64_t f = 0;
      for (; f + 8 <= F; f += 8)
        _mm256_storeu_ps(y + f, _mm256_mul_ps(glu_act(_mm256_loadu_ps(g + f), mode), _mm256_loadu_ps(u + f)));
      if (f < F) {
        alignas(32) float gt[8] = {}, ut[8] = {}, ot[8];
        std::copy(g + f, g + F, gt);
        std::copy(u + f, u + F, ut);
        _mm256_store_ps(ot, _mm256_mul_ps(glu_act(_mm256_load_ps(gt), mode), _mm256_load_ps(ut)));
        std::copy(ot, ot + (F - f), y + f);
      }
    }
  });
  return out;
}

struct LinearArgs {
  const float* x;      // [M, K] input rows (already normalized if the op had a norm prologue)
  int64_t M, K, N;     // N = weight rows (before GLU halving)
  const float* scale;  // [N] per-row weight scale or nullptr
  const float* bias;   // [N] or nullptr (GLU: bias in weight-row order, gate then up)
  float* y;            // [M, N]; GLU: gate and up values side by side, [M, 2 ffn] (`gated` gates them)
  int64_t ldy;
  int64_t mode;
  int64_t ffn;         // GLU: N / 2
};

// The output columns of one tile: columns first + r * stride (r = 0..3); a GLU tile's features first +
// j * stride (j = 0, 1: gate rows at r = j, up rows at r = 2 + j). Columns past the end are dropped.
struct TileCols {
  int64_t first, stride;
  static TileCols adjacent(int64_t tile, bool glu) { return {tile * (glu ? 2 : NB), 1}; }  // tile t's rows 4t..
};

// Finish one tile: per-row scale and bias, then store or accumulate (GLU: store gate and up side by side).
inline void epilogue(const LinearArgs& a, const TileCols& o, int64_t m0, int mb, float (&v)[NB][3]) {
  const bool glu = is_glu(a.mode);
  for (int r = 0; r < NB; ++r) {  // scales are per kernel row of a tiled layout (adjacent tiles only)
    int64_t n = (glu ? 2 * o.first : o.first) + r;
    float s = !a.scale ? 1.f : n < a.N ? a.scale[n] : 0.f;
    for (int m = 0; m < mb; ++m) v[r][m] *= s;
  }
  if (a.mode == STORE || a.mode == ACCUMULATE) {
    for (int r = 0; r < NB; ++r) {
      int64_t n = o.first + r * o.stride;
      if (n >= a.N) break;
      float b = a.bias ? a.bias[n] : 0.f;
      for (int m = 0; m < mb; ++m) {
        float* dst = a.y + (m0 + m) * a.ldy + n;
        *dst = (a.mode == ACCUMULATE ? *dst : 0.f) + v[r][m] + b;
      }
    }
    return;
  }
  for (int j = 0; j < 2; ++j) {  // tile rows: gate f_j at r=j, up f_j at r=2+j
    int64_t f = o.first + j * o.stride;
    if (f >= a.ffn) break;
    float bg = a.bias ? a.bias[f] : 0.f, bu = a.bias ? a.bias[a.ffn + f] : 0.f;
    for (int m = 0; m < mb; ++m) {
      float* row = a.y + (m0 + m) * a.ldy;  // [2F]: gate, then up (`gated` gates them)
      row[f] = v[j][m] + bg;
      row[a.ffn + f] = v[2 + j][m] + bu;
    }
  }
}

// Rows in blocks of 3 and 2 (never 1 unless M == 1: a lone row leaves the FMA units waiting on latency);
// a tile's weights stay in L1 across the blocks. `dot.run<MB>(m0, v)` fills v for rows m0 .. m0 + MB.
template <class Dot>
void tile_rows(const LinearArgs& a, const TileCols& o, const Dot& dot) {
  float v[NB][3];
  for (int64_t m = 0; m < a.M;) {
    const int mb = a.M == 1 ? 1 : (a.M - m > 4 || a.M - m == 3) ? 3 : 2;
    if (mb == 1) dot.template run<1>(m, v);
    else if (mb == 2) dot.template run<2>(m, v);
    else dot.template run<3>(m, v);
    epilogue(a, o, m, mb, v);
    m += mb;
  }
}

// Ask for weights ahead of use: a tile is computed in a few hundred ns, less than DRAM takes to deliver
// under load, so the tile ~20 KB on is requested while this one is computed (measured on the 262k x 640
// Q8_0 head: 1 tile ahead 6.8 ms, 8 tiles (22 KB) 6.3 ms, 16 and 32 no better). Rows of blocks at up to
// RUN_ROWS input rows go in runs instead (below), each run's next rows requested `run_ahead()` tiles on.
constexpr int64_t PREFETCH_BYTES = 20 << 10;
inline int64_t tiles_ahead(int64_t tile_bytes, int64_t total_bytes, int64_t rows_in) {
  return total_bytes > (8 << 20) && rows_in <= 3 ? std::max<int64_t>(1, PREFETCH_BYTES / tile_bytes) : 1;
}

inline void prefetch_bytes(const void* p, int64_t bytes) {
  for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(static_cast<const char*>(p) + b, _MM_HINT_T0);
}

template <class W>
struct DenseDot {  // fp32 or int8 tile
  const LinearArgs& a;
  const typename W::T* w;
  template <int MB>
  void run(int64_t m0, float (&v)[NB][3]) const { tile_dot<W, MB>(a.x + m0 * a.K, a.K, w, v); }
};

template <class W>
void linear_tiles(const LinearArgs& a, const typename W::T* w) {
  const int64_t tiles = (a.N + NB - 1) / NB, tile_len = NB * a.K;
  const int64_t ahead = tiles_ahead(tile_len * sizeof(typename W::T), tiles * tile_len * sizeof(typename W::T), a.M);
  at::parallel_for(0, tiles, 4, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      if (t + ahead < t1) prefetch_bytes(w + (t + ahead) * tile_len, tile_len * sizeof(typename W::T));
      tile_rows(a, TileCols::adjacent(t, is_glu(a.mode)), DenseDot<W>{a, w + t * tile_len});
    }
  });
}

// x * rsqrt(mean(x^2) + eps) * w, row by row (the HF RMSNorm, in fp32).
inline void rms_rows(const float* x, int64_t M, int64_t K, const float* w, double eps, float* out) {
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * K;
    float ss = 0.f;
    for (int64_t k = 0; k < K; ++k) ss += xr[k] * xr[k];
    float s = 1.f / std::sqrt(ss / static_cast<float>(K) + static_cast<float>(eps));
    for (int64_t k = 0; k < K; ++k) out[m * K + k] = xr[k] * s * w[k];
  }
}

// ---- tiles over rows of blocks (native_linear.cpp, native_a8.cpp) ----
struct Rows {  // the 4 row pointers of one tile
  const uint8_t* r[NB];
};

// A thread's tiles [t0, t1) over rows of blocks. At one to three input rows a step is bound by reading the
// weights, and the tiles go as four long runs: tile i computes columns lo + i + r * q (q = t1 - t0; GLU:
// features lo + i + j * q), the same columns as tiles of adjacent rows. Rows of blocks are read in place,
// row after row, so each run is sequential in memory, which the hardware prefetcher follows; four adjacent
// rows read 32 weights at a time are four interleaved runs a few lines long, which it does not (the 262k x
// 640 Q8_0 head at one input row: 16.3 ms with no software prefetch, 6.0 with it, 3.9 in runs; a Gemma-3
// forward at 1 / 2 / 3 rows 24% / 16% / 4% faster). From 4 input rows the arithmetic bounds the step, and
// adjacent tiles with the tile `ahead` prefetched measured faster (the head at 4 rows: 11.1 ms, 19.0 in runs).
// Each run's next rows are requested `run_ahead()` tiles ahead (top of this file).
constexpr int64_t RUN_ROWS = 3;

inline TileCols run_cols(int64_t t0, int64_t t1, int64_t i, bool glu) { return {t0 * (glu ? 2 : NB) + i, t1 - t0}; }

// Row pointers of a tile: its columns' rows of one tensor, or (GLU) the gate and up rows of its two features.
// Rows past the end repeat the last one; the epilogue drops their outputs.
inline Rows tile_rows_of(const uint8_t* w, const uint8_t* up, int64_t rows, int64_t row_bytes, const TileCols& o) {
  Rows out;
  for (int r = 0; r < NB; ++r) {
    const bool gate_part = up == nullptr || r < 2;
    const int64_t n = std::min(rows - 1, o.first + (up ? r % 2 : r) * o.stride);
    out.r[r] = (gate_part ? w : up) + n * row_bytes;
  }
  return out;
}

inline void prefetch_rows(const Rows& w, int64_t row_bytes) {
  for (int r = 0; r < NB; ++r) prefetch_bytes(w.r[r], row_bytes);
}

// fn(o, rows) for every tile of a thread's range [t0, t1) over rows of blocks (`up`: GLU gate|up pairs), in
// the order that reads fastest: four runs at up to RUN_ROWS input rows, else adjacent rows with the tile
// `ahead` on prefetched (tiles_ahead).
template <class Fn>
void each_block_tile(const LinearArgs& a, const uint8_t* w, const uint8_t* up, int64_t rows, int64_t row_bytes,
                     int64_t t0, int64_t t1, Fn&& fn) {
  const bool glu = up != nullptr;
  if (a.M <= RUN_ROWS) {
    const int64_t ahead = run_ahead();
    for (int64_t i = 0; i < t1 - t0; ++i) {
      if (ahead && i + ahead < t1 - t0)
        prefetch_rows(tile_rows_of(w, up, rows, row_bytes, run_cols(t0, t1, i + ahead, glu)), row_bytes);
      const TileCols o = run_cols(t0, t1, i, glu);
      fn(o, tile_rows_of(w, up, rows, row_bytes, o));
    }
    return;
  }
  const int64_t ahead = tiles_ahead(NB * row_bytes, rows * row_bytes, a.M);
  for (int64_t t = t0; t < t1; ++t) {
    if (t + ahead < t1) prefetch_rows(tile_rows_of(w, up, rows, row_bytes, TileCols::adjacent(t + ahead, glu)), row_bytes);
    const TileCols o = TileCols::adjacent(t, glu);
    fn(o, tile_rows_of(w, up, rows, row_bytes, o));
  }
}

// fn(o, rows) for every tile of one part over rows of blocks of format B (`up`: GLU gate|up pairs), the tiles
// split over threads, each thread's range in each_block_tile's order.
template <class B, class Fn>
void block_tiles(const LinearArgs& a, const uint8_t* w, const uint8_t* up, int64_t rows, Fn&& fn) {
  const int64_t row_bytes = a.K / B::QK * B::BYTES;
  const int64_t tiles = up ? (rows + 1) / 2 : (rows + NB - 1) / NB;
  at::parallel_for(0, tiles, 4, [&](int64_t t0, int64_t t1) { each_block_tile(a, w, up, rows, row_bytes, t0, t1, fn); });
}

}  // namespace
