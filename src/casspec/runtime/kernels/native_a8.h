// The activation-quantized linear: the paper's DSIA "activation quantization" draft over the target's
// own blocks. Each input row is quantized per 32 values to int8 (scale d = max|x| / 127), and each
// block's dot product runs on integers, scaled once per block: sum_i (a q_i + b) (d x_i) = a d (q . xq) +
// b d sum(xq). This is how llama.cpp computes its whole model; here it is a draft, a different function
// from the target (fp32 activations), so every token it proposes is still verified by the target.
//
// A tile is 4 weight rows. Per block and input row, the 4 rows' integer dot products (8 int32 lanes each)
// are reduced by one add tree into one vector, [lanes 0-3 of rows 0..3 | lanes 4-7 of rows 0..3] (values
// 0-15 and 16-31 of the block), which is converted and scaled once: one vector of 4 rows' scales instead of
// a conversion, a broadcast and an FMA per row, which is what bound a block's work before (the a8 SmolLM2
// body at one row read its weights at ~26 GB/s, and at 4-8 rows was slower than the fp32 decode it drafts for).
// With AVX-VNNI (VNNI = true, built by native_a8_vnni.cpp, chosen at run time) a dot product is one
// `vpdpbusd`, and since its products are summed in 32 bits, weights may be unsigned bytes up to 255: Q8_0 is
// offset by 128 instead of sign-flipping the activations, and 4-bit nibbles are masked in place (the high
// ones x16, their scale / 16, exact) instead of shifted; `maddubs` (VNNI = false) sums pairs in 16 bits,
// which those would overflow.
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

struct QuantView {  // the same, borrowed
  const int8_t* q;
  const float* d;
  const float* s;
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

// ---- a tile's block c as integers: q[r] (32 bytes each), scale [a0 of rows 0..3 | a1 of rows 0..3] and
// offset [b of rows 0..3 | 0], with w = a q + b (a0 for values 0-15, a1 for 16-31) --------------------------
inline uint16_t load16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

inline int32_t load32(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// The fp16 scale that starts each row's block c, as [d0 d1 d2 d3].
template <int64_t BYTES>
inline __m128 scales4(const Rows& w, int64_t c) {
  const int64_t o = c * BYTES;
  return _mm_cvtph_ps(_mm_setr_epi16(load16(w.r[0] + o), load16(w.r[1] + o), load16(w.r[2] + o), load16(w.r[3] + o),
                                     0, 0, 0, 0));
}

inline __m256 twice(__m128 v) { return _mm256_set_m128(v, v); }
inline __m256 low_half(__m128 v) { return _mm256_set_m128(_mm_setzero_ps(), v); }

// 16 bytes of nibbles as 32 bytes: masked in place when wide (high nibbles x16), else shifted down.
template <bool WIDE>
inline __m256i nibbles(const uint8_t* p) {
  if constexpr (WIDE) {
    const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_and_si256(v, _mm256_setr_m128i(_mm_set1_epi8(0x0F), _mm_set1_epi8(static_cast<char>(0xF0))));
  } else {
    return gguf::nibbles32(p);
  }
}

inline constexpr float HIGH_NIBBLE = 1.f / 16.f;  // the scale of in-place high nibbles (exact)

// The other formats with an integer view (the K-quants): their scalar `ints`, one row at a time.
template <class B, bool WIDE>
struct TileInts {
  static constexpr bool SIGNED = B::SIGNED, OFFSET = B::OFFSET;
  static inline void get(const Rows& w, int64_t c, __m256i (&q)[NB], __m256& scale, __m256& off) {
    float a0[NB], a1[NB], b[NB];  // kept in registers: stored scalars read back as a vector stall the load
#pragma GCC unroll 4
    for (int r = 0; r < NB; ++r) q[r] = B::ints(w.r[r], c, a0[r], a1[r], b[r]);
    const __m128 lo = _mm_setr_ps(a0[0], a0[1], a0[2], a0[3]);
    scale = B::SPLIT ? _mm256_set_m128(_mm_setr_ps(a1[0], a1[1], a1[2], a1[3]), lo) : twice(lo);
    off = B::OFFSET ? low_half(_mm_setr_ps(b[0], b[1], b[2], b[3])) : _mm256_setzero_ps();
  }
};

// Scale and offset of formats with an fp16 (d, m) pair at the start of a block (w = d q + m): [d0..d3 | d0..d3]
// and [m0..m3 | 0] from one conversion; `high`: the factor of values 16-31 (in-place high nibbles).
template <int64_t BYTES>
inline void dm4(const Rows& w, int64_t c, float high, __m256& scale, __m256& off) {
  const int64_t o = c * BYTES;
  const __m256 dm = _mm256_cvtph_ps(  // [d0 m0 d1 m1 d2 m2 d3 m3]
      _mm_setr_epi32(load32(w.r[0] + o), load32(w.r[1] + o), load32(w.r[2] + o), load32(w.r[3] + o)));
  const __m256 d = _mm256_permutevar8x32_ps(dm, _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6));
  scale = high == 1.f ? d : _mm256_mul_ps(d, _mm256_setr_ps(1, 1, 1, 1, high, high, high, high));
  off = _mm256_blend_ps(_mm256_permutevar8x32_ps(dm, _mm256_setr_epi32(1, 3, 5, 7, 1, 3, 5, 7)),
                        _mm256_setzero_ps(), 0xF0);
}

template <bool WIDE>
struct TileInts<gguf::Q4_1B, WIDE> {  // w = d q + m
  static constexpr bool SIGNED = false, OFFSET = true;
  static inline void get(const Rows& w, int64_t c, __m256i (&q)[NB], __m256& scale, __m256& off) {
    for (int r = 0; r < NB; ++r) q[r] = nibbles<WIDE>(w.r[r] + c * gguf::Q4_1B::BYTES + 4);
    dm4<gguf::Q4_1B::BYTES>(w, c, WIDE ? HIGH_NIBBLE : 1.f, scale, off);
  }
};

template <bool THIRD, bool WIDE>
struct TileInts<gguf::LowBitB<THIRD>, WIDE> {  // casspec's Q2_1 / Q3_1: w = d q + m, q of 2 (3) bits
  using B = gguf::LowBitB<THIRD>;
  static constexpr bool SIGNED = false, OFFSET = true;
  static inline void get(const Rows& w, int64_t c, __m256i (&q)[NB], __m256& scale, __m256& off) {
    for (int r = 0; r < NB; ++r) {
      const uint8_t* b = w.r[r] + c * B::BYTES;
      q[r] = gguf::crumbs32(b + 4);
      if constexpr (THIRD)
        q[r] = _mm256_or_si256(q[r], _mm256_and_si256(gguf::bits32(static_cast<uint32_t>(load32(b + 12))),
                                                      _mm256_set1_epi8(4)));
    }
    dm4<B::BYTES>(w, c, 1.f, scale, off);
  }
};

template <bool WIDE>
struct TileInts<gguf::Q4_0B, WIDE> {  // w = d (q - 8) = d q - 8 d: unsigned q, offset -8 d
  static constexpr bool SIGNED = false, OFFSET = true;
  static inline void get(const Rows& w, int64_t c, __m256i (&q)[NB], __m256& scale, __m256& off) {
    const int64_t o = c * gguf::Q4_0B::BYTES;
    for (int r = 0; r < NB; ++r) q[r] = nibbles<WIDE>(w.r[r] + o + 2);
    const __m128 d = scales4<gguf::Q4_0B::BYTES>(w, c);
    scale = _mm256_set_m128(WIDE ? _mm_mul_ps(d, _mm_set1_ps(HIGH_NIBBLE)) : d, d);
    off = low_half(_mm_mul_ps(d, _mm_set1_ps(-8.f)));
  }
};

template <bool WIDE>
struct TileInts<gguf::Q5_0B, WIDE> {  // w = d (q5 - 16): unsigned q5 (0..31, fits maddubs too), offset -16 d
  static constexpr bool SIGNED = false, OFFSET = true;
  static inline void get(const Rows& w, int64_t c, __m256i (&q)[NB], __m256& scale, __m256& off) {
    const int64_t o = c * gguf::Q5_0B::BYTES;
    for (int r = 0; r < NB; ++r) {
      const __m256i high = _mm256_and_si256(gguf::bits32(static_cast<uint32_t>(load32(w.r[r] + o + 2))),
                                            _mm256_set1_epi8(16));
      q[r] = _mm256_or_si256(gguf::nibbles32(w.r[r] + o + 6), high);
    }
    const __m128 d = scales4<gguf::Q5_0B::BYTES>(w, c);
    scale = twice(d);
    off = low_half(_mm_mul_ps(d, _mm_set1_ps(-16.f)));
  }
};

template <bool WIDE>
struct TileInts<gguf::Q8_0B, WIDE> {  // signed q; wide: q + 128 unsigned, offset -128 d
  static constexpr bool SIGNED = !WIDE, OFFSET = WIDE;
  static inline void get(const Rows& w, int64_t c, __m256i (&q)[NB], __m256& scale, __m256& off) {
    const int64_t o = c * gguf::Q8_0B::BYTES;
    for (int r = 0; r < NB; ++r) {
      q[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.r[r] + o + 2));
      if constexpr (WIDE) q[r] = _mm256_xor_si256(q[r], _mm256_set1_epi8(static_cast<char>(0x80)));
    }
    const __m128 d = scales4<gguf::Q8_0B::BYTES>(w, c);
    scale = twice(d);
    off = low_half(_mm_mul_ps(d, _mm_set1_ps(-128.f)));
  }
};

// 8 int32 lanes of u . x, 4 byte products each: one vpdpbusd, or maddubs (pairs summed in 16 bits) + madd.
template <bool VNNI>
inline __m256i dot_bytes(__m256i u, __m256i x) {
  if constexpr (VNNI) {
    return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, x);
  } else {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, x), _mm256_set1_epi16(1));
  }
}

// [sum of lanes 0-3 of d[0..3] | sum of lanes 4-7 of d[0..3]] by unpacks and adds (one-cycle instructions
// where hadd is a few).
inline __m256i sum4(const __m256i (&d)[NB]) {
  const __m256i t0 = _mm256_add_epi32(_mm256_unpacklo_epi32(d[0], d[1]), _mm256_unpackhi_epi32(d[0], d[1]));
  const __m256i t1 = _mm256_add_epi32(_mm256_unpacklo_epi32(d[2], d[3]), _mm256_unpackhi_epi32(d[2], d[3]));
  return _mm256_add_epi32(_mm256_unpacklo_epi64(t0, t1), _mm256_unpackhi_epi64(t0, t1));
}

template <class B, bool VNNI>
struct A8Dot {
  const LinearArgs& a;
  QuantView x;
  Rows w;
  template <int MB>
  void run(int64_t m0, float (&v)[NB][3]) const {
    using T = TileInts<B, VNNI>;
    const int64_t blocks = a.K / 32;
    __m256 acc[MB];  // [values 0-15 of rows 0..3 (+ offsets) | values 16-31 of rows 0..3]
    for (int m = 0; m < MB; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t c = 0; c < blocks; ++c) {
      __m256i q[NB], u[NB];
      __m256 scale, off;
      T::get(w, c, q, scale, off);
      for (int r = 0; r < NB; ++r) u[r] = T::SIGNED ? _mm256_sign_epi8(q[r], q[r]) : q[r];
#pragma GCC unroll 3
      for (int m = 0; m < MB; ++m) {
        const int64_t i = (m0 + m) * blocks + c;
        const __m256i xq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q + i * 32));
        __m256i d[NB];
#pragma GCC unroll 4
        for (int r = 0; r < NB; ++r) d[r] = dot_bytes<VNNI>(u[r], T::SIGNED ? _mm256_sign_epi8(xq, q[r]) : xq);
        const __m256i h = sum4(d);
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(h), _mm256_mul_ps(scale, _mm256_set1_ps(x.d[i])), acc[m]);
        if constexpr (T::OFFSET) acc[m] = _mm256_fmadd_ps(off, _mm256_set1_ps(x.s[i]), acc[m]);
      }
    }
    for (int m = 0; m < MB; ++m) {
      alignas(16) float s[NB];
      _mm_store_ps(s, _mm_add_ps(_mm256_castps256_ps128(acc[m]), _mm256_extractf128_ps(acc[m], 1)));
      for (int r = 0; r < NB; ++r) v[r][m] = s[r];
    }
  }
};

template <class B, bool VNNI>
void a8_tiles(const LinearArgs& a, const QuantView& x, const uint8_t* w, const uint8_t* up, int64_t rows) {
  block_tiles<B>(a, w, up, rows, [&](const TileCols& o, const Rows& r) { tile_rows(a, o, A8Dot<B, VNNI>{a, x, r}); });
}

}  // namespace
