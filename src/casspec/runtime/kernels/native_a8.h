// The activation-quantized linear: the paper's DSIA "activation quantization" draft over the target's
// own blocks. Each input row is quantized per 32 values to int8 (scale d = max|x| / 127), and each
// block's dot product runs on integers (maddubs + madd: 32 multiply-adds in two instructions), scaled
// once per block: sum_i (a q_i + b) (d x_i) = a d (q . xq) + b d sum(xq). This is how llama.cpp computes
// its whole model; here it is a draft, a different function from the target (fp32 activations), so
// every token it proposes is still verified by the target. About 3x fewer instructions per weight than
// decoding blocks to fp32, which is what a CPU step is bound by once the weights are 4-6 bits.
#pragma once
#include <cmath>
#include <vector>

#include "common.h"
#include "gguf_blocks.h"

namespace {

struct QuantRows {  // input rows as int8 per 32 values
  std::vector<int8_t> q;  // [M, K]
  std::vector<float> d;   // [M, K / 32] scale
  std::vector<float> s;   // [M, K / 32] d * sum(q)
};

// One block of 32: q = round(x / d), d = max|x| / 127 (nearest-even, as std::nearbyint), s = d * sum(q).
inline void quantize_block(const float* xb, int8_t* q, float& d, float& s) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 v[4], m = _mm256_setzero_ps();
  for (int j = 0; j < 4; ++j) {
    v[j] = _mm256_loadu_ps(xb + 8 * j);
    m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v[j]));
  }
  d = hmax(m) / 127.f;
  const __m256 id = _mm256_set1_ps(d > 0.f ? 1.f / d : 0.f);
  __m256i i[4];
  for (int j = 0; j < 4; ++j) i[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], id));  // MXCSR: nearest-even
  const __m256i sum = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
  __m128i t = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1));
  s = d * static_cast<float>(_mm_cvtsi128_si32(t));
  // packs interleave 128-bit lanes: dwords come out as i0 lo, i1 lo, i2 lo, i3 lo, i0 hi, ... -> reorder
  const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3]));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q),
                      _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
}

inline QuantRows quantize_rows(const float* x, int64_t M, int64_t K) {
  const int64_t blocks = K / 32;
  QuantRows out{std::vector<int8_t>(M * K), std::vector<float>(M * blocks), std::vector<float>(M * blocks)};
  for (int64_t i = 0; i < M * blocks; ++i) quantize_block(x + i * 32, out.q.data() + i * 32, out.d[i], out.s[i]);
  return out;
}

template <class B>
struct A8Dot {
  const LinearArgs& a;
  const QuantRows& x;
  Rows w;
  template <int MB>
  void run(int64_t m0, float (&v)[NB][3]) const {
    const int64_t blocks = a.K / 32;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[NB][MB];
    float off[NB][MB] = {};
    for (int r = 0; r < NB; ++r)
      for (int m = 0; m < MB; ++m) acc[r][m] = _mm256_setzero_ps();
    for (int64_t c = 0; c < blocks; ++c) {
#pragma GCC unroll 4
      for (int r = 0; r < NB; ++r) {
        float a0, a1, b;
        const __m256i q = B::ints(w.r[r], c, a0, a1, b);
        const __m256i uq = B::SIGNED ? _mm256_sign_epi8(q, q) : q;
#pragma GCC unroll 3
        for (int m = 0; m < MB; ++m) {
          const int64_t i = (m0 + m) * blocks + c;
          __m256i xq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q.data() + i * 32));
          if (B::SIGNED) xq = _mm256_sign_epi8(xq, q);
          const __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(uq, xq), ones);  // [8] int32, 4 values each
          const float dx = x.d[i];
          __m256 scale;
          if constexpr (B::SPLIT) scale = _mm256_set_m128(_mm_set1_ps(a1 * dx), _mm_set1_ps(a0 * dx));
          else scale = _mm256_set1_ps(a0 * dx);
          acc[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scale, acc[r][m]);
          if constexpr (B::OFFSET) off[r][m] += b * x.s[i];
        }
      }
    }
    for (int m = 0; m < MB; ++m) {
      alignas(16) float s[NB];
      _mm_store_ps(s, hsum4(acc[0][m], acc[1][m], acc[2][m], acc[3][m]));
      for (int r = 0; r < NB; ++r) v[r][m] = s[r] + off[r][m];
    }
  }
};

template <class B>
void a8_tiles(const LinearArgs& a, const QuantRows& x, const uint8_t* w, const uint8_t* up, int64_t rows) {
  const int64_t row_bytes = a.K / B::QK * B::BYTES;
  const int64_t tiles = up ? (rows + 1) / 2 : (rows + NB - 1) / NB;
  at::parallel_for(0, tiles, 4, [&](int64_t t0, int64_t t1) {
    each_block_tile(a, w, up, rows, row_bytes, t0, t1,
                    [&](const TileCols& o, const Rows& r) { tile_rows(a, o, A8Dot<B>{a, x, r}); });
  });
}

}  // namespace
