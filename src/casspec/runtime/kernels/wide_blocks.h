// Two weight rows decoded into 512-bit vectors at once, for the AVX-512 kernels (native_wide.cpp; include it only
// under their target pragma): `PairDecode<B>::decode(r0, r1, c, w)` gives w[j] = [row r0's values 8j .. 8j + 7 |
// row r1's], each half bitwise gguf_blocks.h's B::decode of that row (the same integer, the same one product or
// FMA per weight), with half its vector instructions: one 512-bit widening, conversion and scaling per 16 weights
// instead of two 256-bit ones. Formats without their own (the K-quants, plain floats, casspec's low-bit copies)
// decode each row at 256 bits and join the halves.
#pragma once
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "gguf_blocks.h"

namespace wide {

template <class T>
inline T at(const uint8_t* p) {  // an unaligned little-endian field
  T v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// [v0 x 8 | v1 x 8] from lanes i0 and i1 of v.
inline __m512 halves(__m128 v, int i0, int i1) {
  const __m512i idx = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set1_epi32(i0)), _mm256_set1_epi32(i1), 1);
  return _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(v));
}

// The fp16 scale that starts each row's block, as [d0 x 8 | d1 x 8].
inline __m512 scale_pair(const uint8_t* b0, const uint8_t* b1) {
  return halves(_mm_cvtph_ps(_mm_setr_epi16(at<int16_t>(b0), at<int16_t>(b1), 0, 0, 0, 0, 0, 0)), 0, 1);
}

// 16 bytes of nibbles from each row (layout of gguf_blocks.h nibble_dwords) as q[j] = [row 0's weights 8j ..
// 8j + 7 | row 1's] in int32: bytes 0-7 of both rows widened once give weights 0-7 (low nibbles) and 16-23 (high).
inline void nibble_pair(const uint8_t* p0, const uint8_t* p1, __m512i (&q)[4]) {
  const __m128i x0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p0));
  const __m128i x1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p1));
  const __m512i a = _mm512_cvtepu8_epi32(_mm_unpacklo_epi64(x0, x1)), b = _mm512_cvtepu8_epi32(_mm_unpackhi_epi64(x0, x1));
  const __m512i low4 = _mm512_set1_epi32(0x0F);
  q[0] = _mm512_and_si512(a, low4);
  q[1] = _mm512_and_si512(b, low4);
  q[2] = _mm512_srli_epi32(a, 4);
  q[3] = _mm512_srli_epi32(b, 4);
}

template <class B>
inline void join(const uint8_t* r0, const uint8_t* r1, int64_t c, __m512 (&w)[4]) {  // each row at 256 bits, joined
  __m256 lo[4], hi[4];
  B::decode(r0, c, lo);
  B::decode(r1, c, hi);
  for (int j = 0; j < 4; ++j) w[j] = _mm512_insertf32x8(_mm512_castps256_ps512(lo[j]), hi[j], 1);
}

template <class B>
struct PairDecode {  // any format: joined
  static constexpr bool NATIVE = false;
  static inline void decode(const uint8_t* r0, const uint8_t* r1, int64_t c, __m512 (&w)[4]) { join<B>(r0, r1, c, w); }
};

template <>
struct PairDecode<gguf::Q8_0B> {  // w = q * d
  static constexpr bool NATIVE = true;
  static inline void decode(const uint8_t* r0, const uint8_t* r1, int64_t c, __m512 (&w)[4]) {
    const uint8_t *b0 = r0 + c * gguf::Q8_0B::BYTES, *b1 = r1 + c * gguf::Q8_0B::BYTES;
    const __m512 d = scale_pair(b0, b1);
    const __m256i y0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b0 + 2));
    const __m256i y1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b1 + 2));
    const __m256i u = _mm256_unpacklo_epi64(y0, y1), v = _mm256_unpackhi_epi64(y0, y1);  // j = 0 | 2, 1 | 3
    const __m128i part[4] = {_mm256_castsi256_si128(u), _mm256_castsi256_si128(v), _mm256_extracti128_si256(u, 1),
                             _mm256_extracti128_si256(v, 1)};
    for (int j = 0; j < 4; ++j) w[j] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(part[j])), d);
  }
};

template <>
struct PairDecode<gguf::Q4_0B> {  // w = d (q - 8)
  static constexpr bool NATIVE = true;
  static inline void decode(const uint8_t* r0, const uint8_t* r1, int64_t c, __m512 (&w)[4]) {
    const uint8_t *b0 = r0 + c * gguf::Q4_0B::BYTES, *b1 = r1 + c * gguf::Q4_0B::BYTES;
    const __m512 d = scale_pair(b0, b1);
    __m512i q[4];
    nibble_pair(b0 + 2, b1 + 2, q);
    for (int j = 0; j < 4; ++j) w[j] = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_sub_epi32(q[j], _mm512_set1_epi32(8))));
  }
};

template <>
struct PairDecode<gguf::Q4_1B> {  // w = d q + m, one FMA (d q exact)
  static constexpr bool NATIVE = true;
  static inline void decode(const uint8_t* r0, const uint8_t* r1, int64_t c, __m512 (&w)[4]) {
    const uint8_t *b0 = r0 + c * gguf::Q4_1B::BYTES, *b1 = r1 + c * gguf::Q4_1B::BYTES;
    const __m128 dm = _mm_cvtph_ps(_mm_setr_epi32(at<int32_t>(b0), at<int32_t>(b1), 0, 0));  // [d0 m0 d1 m1]
    const __m512 d = halves(dm, 0, 2), m = halves(dm, 1, 3);
    __m512i q[4];
    nibble_pair(b0 + 4, b1 + 4, q);
    for (int j = 0; j < 4; ++j) w[j] = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(q[j]), m);
  }
};

template <>
struct PairDecode<gguf::Q5_0B> {  // w = d ((q | h << 4) - 16), the fifth bits from gguf_blocks.h HIGH_BITS
  static constexpr bool NATIVE = true;
  static inline void decode(const uint8_t* r0, const uint8_t* r1, int64_t c, __m512 (&w)[4]) {
    const uint8_t *b0 = r0 + c * gguf::Q5_0B::BYTES, *b1 = r1 + c * gguf::Q5_0B::BYTES;
    const __m512 d = scale_pair(b0, b1);
    __m512i q[4];
    nibble_pair(b0 + 6, b1 + 6, q);
    for (int j = 0; j < 4; ++j) {
      const __m256i h0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(gguf::HIGH_BITS.row[b0[2 + j]]));
      const __m256i h1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(gguf::HIGH_BITS.row[b1[2 + j]]));
      const __m512i h = _mm512_inserti64x4(_mm512_castsi256_si512(h0), h1, 1);
      w[j] = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_add_epi32(q[j], h)));
    }
  }
};

}  // namespace wide
