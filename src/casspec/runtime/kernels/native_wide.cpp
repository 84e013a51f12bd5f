// native_linear on AVX-512: the registers path for up to WIDE_UP_TO input rows (decoding, verify trees, batches; below
// WIDE_FROM only for the formats with a pair decoder, `wide_runs`), and the fp32 tile kernel over a decoded tile past
// that (prefill chunks, large batches; `wide_dense_tile`).
//
// From a few input rows most of the AVX2 registers path's instructions are FMAs (each decoded 8 weights meet
// every input row in one 256-bit FMA), and past 8 rows it decodes the weights again for each group of up to 8.
// Here two weight rows share one 512-bit FMA (lanes 0-7 row r, lanes 8-15 row r + 1, decoded together by
// wide_blocks.h, each half as gguf_blocks.h decodes it) against the input row's 8 k broadcast to both halves (a load,
// no shuffle), so each lane runs exactly the AVX2 build's FMA chain in the same k order and every output is bitwise the AVX2 kernel's, hence
// the fp32 kernel's on the dequantized model, at half the FMA instructions, and up to 16 rows meet each decoded
// weight once. Only this file is built for AVX-512 (a target pragma, as native_a8_vnni.cpp).
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <atomic>
#include <cstdlib>
#include <cstring>

#include "native_wide.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512vl")
#include "common.h"
#include "gguf_blocks.h"
#include "wide_blocks.h"

namespace {

// acc[q][m] = sum over k of w[2q | 2q + 1, k] x[m, k] for Q pairs of weight rows and M input rows: lanes 0-7 row 2q,
// lanes 8-15 row 2q + 1, each lane in the AVX2 path's k order; an input row's 8 k are broadcast to both halves.
template <class B, int Q, int M>
void pair_dots(const float* x, int64_t K, const uint8_t* const* rows, __m512 (*acc)[M]) {
  for (int q = 0; q < Q; ++q)
    for (int m = 0; m < M; ++m) acc[q][m] = _mm512_setzero_ps();
  for (int64_t c = 0; c < K / 32; ++c) {
#pragma GCC unroll 4
    for (int q = 0; q < Q; ++q) {
      __m512 w2[4];
      wide::PairDecode<B>::decode(rows[2 * q], rows[2 * q + 1], c, w2);
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j)
#pragma GCC unroll 16
        for (int m = 0; m < M; ++m)
          acc[q][m] = _mm512_fmadd_ps(w2[j], _mm512_broadcast_f32x8(_mm256_loadu_ps(x + m * K + c * 32 + j * KS)),
                                      acc[q][m]);
    }
  }
}

// The epilogue of one tile from its two pairs' sums (acc[0], acc[1]), in blocks of up to 3 input rows, as the AVX2 path.
template <int M>
__attribute__((always_inline)) inline void finish_tile(const LinearArgs& a, const TileCols& o, const __m512 (*acc)[M]) {
  for (int m0 = 0; m0 < M; m0 += 3) {
    const int mb = std::min(3, M - m0);
    float v[NB][3];
    for (int i = 0; i < mb; ++i) {
      const __m256 h[NB] = {_mm512_castps512_ps256(acc[0][m0 + i]), _mm512_extractf32x8_ps(acc[0][m0 + i], 1),
                            _mm512_castps512_ps256(acc[1][m0 + i]), _mm512_extractf32x8_ps(acc[1][m0 + i], 1)};
      alignas(16) float s[NB];
      _mm_store_ps(s, hsum4(h[0], h[1], h[2], h[3]));
      for (int r = 0; r < NB; ++r) v[r][i] = s[r];
    }
    epilogue(a, o, m0, mb, v);
  }
}

// One tile (4 weight rows) for every input row.
template <class B, int M>
void wide_tile(const LinearArgs& a, const TileCols& o, const Rows& w) {
  constexpr int Q = M <= 8 ? 2 : 1;  // Q * M <= 16 accumulators of the 32 vector registers
  __m512 acc[NB / 2][M];
  for (int q = 0; q < NB / 2; q += Q) pair_dots<B, Q, M>(a.x, a.K, w.r + 2 * q, acc + q);
  finish_tile<M>(a, o, acc);
}

// Up to RUN_ROWS input rows, two tiles at a time (four pairs) in each_block_tile's runs: a lane's chain waits ~4 cycles
// on its last FMA, and one tile's two pairs per input row would leave the FMA units idle on that latency.
template <class B, int M>
void wide_run_tiles(const LinearArgs& a, const uint8_t* w, const uint8_t* up, int64_t rows) {
  const int64_t row_bytes = a.K / B::QK * B::BYTES;
  const int64_t tiles = up ? (rows + 1) / 2 : (rows + NB - 1) / NB;
  const bool glu = up != nullptr;
  at::parallel_for(0, tiles, 4, [&](int64_t t0, int64_t t1) {
    const int64_t n = t1 - t0, ahead = run_ahead();
    for (int64_t i = 0; i < n; i += 2) {
      for (int64_t k = i + 2 * ahead; ahead && k < std::min(n, i + 2 * ahead + 2); ++k)
        prefetch_rows(tile_rows_of(w, up, rows, row_bytes, run_cols(t0, t1, k, glu)), row_bytes);
      const TileCols o0 = run_cols(t0, t1, i, glu);
      const Rows r0 = tile_rows_of(w, up, rows, row_bytes, o0);
      if (i + 1 == n) {
        wide_tile<B, M>(a, o0, r0);
        break;
      }
      const TileCols o1 = run_cols(t0, t1, i + 1, glu);
      const Rows r1 = tile_rows_of(w, up, rows, row_bytes, o1);
      const uint8_t* r[2 * NB] = {r0.r[0], r0.r[1], r0.r[2], r0.r[3], r1.r[0], r1.r[1], r1.r[2], r1.r[3]};
      __m512 acc[NB][M];
      pair_dots<B, NB, M>(a.x, a.K, r, acc);
      finish_tile<M>(a, o0, acc);
      finish_tile<M>(a, o1, acc + 2);
    }
  });
}

template <class B, int M>
void wide_tiles(const LinearArgs& a, const uint8_t* w, const uint8_t* up, int64_t rows) {
  if constexpr (M <= RUN_ROWS) return wide_run_tiles<B, M>(a, w, up, rows);
  block_tiles<B>(a, w, up, rows, [&](const TileCols& o, const Rows& r) { wide_tile<B, M>(a, o, r); });
}

template <class B, int M = 1>
void wide_rows(const LinearArgs& a, const uint8_t* w, const uint8_t* up, int64_t rows) {
  if constexpr (M < WIDE_UP_TO) {
    if (a.M != M) return wide_rows<B, M + 1>(a, w, up, rows);
  }
  wide_tiles<B, M>(a, w, up, rows);
}

// The fp32 tile kernel's sums (tile_dot: acc[r][m] = sum_k w[r, k] x[m, k], lane k % 8) over a tile decoded into
// [K/8][4][8] fp32, for MB input rows from m0: rows 0|1 and 2|3 of a k-step are one 512-bit load each, meeting each
// input row's 8 k broadcast to both halves, so every lane runs tile_dot's chain and each output is bitwise its.
template <int MB>
void dense_block(const LinearArgs& a, const TileCols& o, const float* w, int64_t m0) {
  __m512 acc[2][MB];
  for (int m = 0; m < MB; ++m) acc[0][m] = acc[1][m] = _mm512_setzero_ps();
  const float* x = a.x + m0 * a.K;
  for (int64_t k = 0; k < a.K; k += KS) {
    const __m512 w01 = _mm512_loadu_ps(w + k * NB), w23 = _mm512_loadu_ps(w + k * NB + 2 * KS);
#pragma GCC unroll 6
    for (int m = 0; m < MB; ++m) {
      const __m512 xv = _mm512_broadcast_f32x8(_mm256_loadu_ps(x + m * a.K + k));
      acc[0][m] = _mm512_fmadd_ps(w01, xv, acc[0][m]);
      acc[1][m] = _mm512_fmadd_ps(w23, xv, acc[1][m]);
    }
  }
  for (int mm = 0; mm < MB; mm += 3) {
    const int mb = std::min(3, MB - mm);
    float v[NB][3];
    for (int i = 0; i < mb; ++i) {
      const __m512 p = acc[0][mm + i], q = acc[1][mm + i];
      alignas(16) float s[NB];
      _mm_store_ps(s, hsum4(_mm512_castps512_ps256(p), _mm512_extractf32x8_ps(p, 1), _mm512_castps512_ps256(q),
                            _mm512_extractf32x8_ps(q, 1)));
      for (int r = 0; r < NB; ++r) v[r][i] = s[r];
    }
    epilogue(a, o, m0 + mm, mb, v);
  }
}

}  // namespace

void wide_dense_tile(const BlockPart& p, int64_t first, int64_t stride, const float* w) {
  const LinearArgs a{p.x, p.M, p.K, p.N, nullptr, p.bias, p.y, p.ldy, p.mode, p.ffn};
  const TileCols o{first, stride};
  int64_t m = 0;
  for (; a.M - m >= 6; m += 6) dense_block<6>(a, o, w, m);
  switch (a.M - m) {
    case 5: dense_block<5>(a, o, w, m); break;
    case 4: dense_block<4>(a, o, w, m); break;
    case 3: dense_block<3>(a, o, w, m); break;
    case 2: dense_block<2>(a, o, w, m); break;
    case 1: dense_block<1>(a, o, w, m); break;
    default: break;
  }
}

bool wide_runs(int64_t type, int64_t M) {
  if (M >= WIDE_FROM && M <= WIDE_UP_TO) return true;
  bool paired = false;
  gguf::dispatch(type, [&](auto b) { paired = wide::PairDecode<decltype(b)>::NATIVE; });
  return M >= 1 && M < WIDE_FROM && paired;
}

void native_part_wide(const BlockPart& p) {
  TORCH_CHECK(wide_runs(p.type, p.M), "the AVX-512 path does not run ", p.M, " rows of type ", p.type);
  const LinearArgs a{p.x, p.M, p.K, p.N, nullptr, p.bias, p.y, p.ldy, p.mode, p.ffn};
  gguf::dispatch(p.type, [&](auto b) { wide_rows<decltype(b)>(a, p.w, p.up, p.rows); });
}
#pragma GCC pop_options

namespace {
std::atomic<bool> wide_on{avx512_env_on()};
}  // namespace

bool wide_supported() {
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                          __builtin_cpu_supports("avx512vl");
  return yes;
}

bool avx512_env_on() {
  const char* env = std::getenv("CASSPEC_AVX512");
  return env == nullptr || std::strcmp(env, "0") != 0;
}

bool wide_active() { return wide_on.load(std::memory_order_relaxed) && wide_supported(); }

void set_wide(bool on) { wide_on.store(on, std::memory_order_relaxed); }
