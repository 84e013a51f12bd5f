// Weights in the block formats they ship in (GGUF's ggml types, and bf16 / fp16 checkpoints), decoded
// in registers 32 at a time.
//
// `B::decode(row, c, w)` turns the c-th run of 32 weights of one row into four vectors of 8 floats,
// bit-identical to what gguf-py's `dequantize` (and so HF transformers' GGUF loader) computes: the
// same products and sums, in the same order (the kernels build with -ffp-contract=off). A scale times
// a quantized integer is exact in fp32 (an fp16 scale, even times a 6-bit sub-scale, has at most 17
// significant bits; the fused formats' q at most 4), so `d * q + m` is one FMA there: the single
// rounding of gguf-py's product-then-sum, four instructions fewer per 32 weights (Q4_1, 1 row: -10%).
// A kernel that decodes here and then runs the fp32 dot product computes exactly what the fp32 kernel
// computes on the dequantized model, so the native target's logits are those of the fp32 target.
//
// Layouts (ggml's, one row = K / QK blocks of BYTES bytes, fp16 scales little-endian):
//   Q8_0  34 B / 32:  d, q[32] int8                          w = d * q
//   Q4_0  18 B / 32:  d, 16 B nibbles (j: low of byte j, j + 16: high of byte j)   w = d * (q - 8)
//   Q4_1  20 B / 32:  d, m, nibbles as Q4_0                  w = d * q + m
//   Q5_0  22 B / 32:  d, qh (32 high bits), nibbles          w = d * ((q | h << 4) - 16)
//   Q4_K 144 B / 256: d, dmin, 12 B of 6-bit (scale, min) x 8, 128 B nibbles (sub-block 2i: low nibbles
//                     of bytes 32i.., 2i + 1: high)          w = (d sc) * q - (dmin m)
//   Q6_K 210 B / 256: ql[128], qh[64], int8 scales[16], d    w = (d scale) * (q - 32)
//   F32, F16, BF16:   plain values
// and two formats of casspec's own (not ggml types; the low-bit draft copies of runtime/lowbit.py):
//   Q2_1  12 B / 32:  d, m, 8 B of 2-bit q (weight j: bits 2 (j / 8) of byte j % 8)   w = d * q + m
//   Q3_1  16 B / 32:  d, m, the low 2 bits as Q2_1, 4 B of third bits (bit j: weight j)
#pragma once
#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace gguf {

enum Type : int64_t { F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q8_0 = 8, Q4_K = 12, Q6_K = 14, BF16 = 30,
                      Q2_1 = 252, Q3_1 = 253 };  // the last two: casspec's own

inline float f16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

inline __m256 i8x8(const uint8_t* p) {  // 8 signed bytes -> 8 floats
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// A run's 16 bytes of nibbles as four vectors of 8 int32, q[8j .. 8j + 7]: byte l holds weight l (low
// nibble) and weight l + 16 (high), so two 8-byte zero-extensions straight from memory give all four
// vectors by a mask or a shift. Decoding is bound by vector instructions (all 4 pipes busy), and this
// spends 6 where packing 32 bytes and widening them spends 12.
inline void nibble_dwords(const uint8_t* p, __m256i (&q)[4]) {
  const __m256i a = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8)));
  const __m256i low4 = _mm256_set1_epi32(0x0F);
  q[0] = _mm256_and_si256(a, low4);
  q[1] = _mm256_and_si256(b, low4);
  q[2] = _mm256_srli_epi32(a, 4);
  q[3] = _mm256_srli_epi32(b, 4);
}

// Q5_0's fifth bits as an int32 offset per weight: row b of the table holds, for the 8 weights whose
// high bits are the bits of byte b, 0 where the bit is set and -16 where not (q | h << 4) - 16 = q + that.
// One load a vector instead of spreading 32 bits over bytes (5 instructions) and widening them.
struct HighBits {
  alignas(32) int32_t row[256][8];
  constexpr HighBits() : row{} {
    for (int b = 0; b < 256; ++b)
      for (int l = 0; l < 8; ++l) row[b][l] = (b >> l) & 1 ? 0 : -16;
  }
};
inline constexpr HighBits HIGH_BITS{};

struct ThirdBits {  // Q3_1's third bits: row b holds 4 where bit l of byte b is set, else 0
  alignas(32) int32_t row[256][8];
  constexpr ThirdBits() : row{} {
    for (int b = 0; b < 256; ++b)
      for (int l = 0; l < 8; ++l) row[b][l] = (b >> l) & 1 ? 4 : 0;
  }
};
inline constexpr ThirdBits THIRD_BITS{};

// 8 bytes of 2-bit values (weight j: bits 2 (j / 8) of byte j % 8) as weights 8v .. 8v + 7 in int32.
inline __m256i crumb_dwords(const uint8_t* p, int v) {
  const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  return _mm256_and_si256(_mm256_srli_epi32(b, 2 * v), _mm256_set1_epi32(3));
}

// The same 8 bytes as 32 bytes q[0..31]: one 64-bit lane per 8 weights, each shifted by its own amount.
inline __m256i crumbs32(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  const __m256i s = _mm256_srlv_epi64(_mm256_set1_epi64x(static_cast<int64_t>(v)), _mm256_setr_epi64x(0, 2, 4, 6));
  return _mm256_and_si256(s, _mm256_set1_epi8(3));
}

// ---- integer view for the activation-quantized kernels (native_a8.h) -----------------------------
// `B::ints(row, c, a0, a1, b)`: the c-th run of 32 weights as 32 int8 q with w = a * q + b, where a is a0
// for values 0..15 and a1 for 16..31 (they differ only for Q6_K's 16-value sub-blocks). SIGNED says
// whether q may be negative (unsigned q feed `maddubs` directly; signed ones need the sign trick),
// SPLIT whether a0 may differ from a1, OFFSET whether b may be non-zero. Q8_0, Q4_0, Q4_1, Q5_0, Q2_1 and Q3_1
// have only INTS here: their views are built four rows at a time, scales included, by native_a8.h's TileInts.
inline __m256i nibbles32(const uint8_t* p) {  // 16 bytes of nibbles -> 32 bytes q[0..31]
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)), low4 = _mm_set1_epi8(0x0F);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), low4), _mm_and_si128(v, low4));
}

inline __m256i bits32(uint32_t bits) {  // byte j = 0xFF where bit j of `bits` is set
  const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int32_t>(bits)),
                                             _mm256_setr_epi64x(0, 0x0101010101010101LL, 0x0202020202020202LL,
                                                                0x0303030303030303LL));
  const __m256i bit = _mm256_set1_epi64x(0x8040201008040201LL);  // byte j tests bit j % 8
  return _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
}

struct Q8_0B {
  static constexpr int PAIRED_UP_TO = 6;  // rows decoded in pairs up to this many input rows
  static constexpr int SPLIT_UP_TO = 16;  // input rows run as groups through the registers (native_linear.cpp)
  static constexpr int64_t QK = 32, BYTES = 34;
  static inline void decode(const uint8_t* row, int64_t c, __m256 (&w)[4]) {
    const uint8_t* b = row + c * BYTES;
    const __m256 d = _mm256_set1_ps(f16(b));
    for (int j = 0; j < 4; ++j) w[j] = _mm256_mul_ps(i8x8(b + 2 + 8 * j), d);
  }
  static constexpr bool INTS = true;  // integer view: native_a8.h TileInts, four rows at a time
};

struct Q4_0B {
  static constexpr int PAIRED_UP_TO = 6;
  static constexpr int SPLIT_UP_TO = 16;
  static constexpr int64_t QK = 32, BYTES = 18;
  static inline void decode(const uint8_t* row, int64_t c, __m256 (&w)[4]) {
    const uint8_t* b = row + c * BYTES;
    const __m256 d = _mm256_set1_ps(f16(b));
    __m256i q[4];
    nibble_dwords(b + 2, q);
    for (int j = 0; j < 4; ++j) w[j] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_sub_epi32(q[j], _mm256_set1_epi32(8))));
  }
  static constexpr bool INTS = true;  // integer view: native_a8.h TileInts, four rows at a time
};

struct Q4_1B {
  static constexpr int PAIRED_UP_TO = 6;
  static constexpr int SPLIT_UP_TO = 16;
  static constexpr int64_t QK = 32, BYTES = 20;
  static inline void decode(const uint8_t* row, int64_t c, __m256 (&w)[4]) {
    const uint8_t* b = row + c * BYTES;
    const __m256 d = _mm256_set1_ps(f16(b)), m = _mm256_set1_ps(f16(b + 2));
    __m256i q[4];
    nibble_dwords(b + 4, q);
    for (int j = 0; j < 4; ++j) w[j] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(q[j]), m);  // d q exact: one rounding
  }
  static constexpr bool INTS = true;  // integer view: native_a8.h TileInts, four rows at a time
};

struct Q5_0B {
  static constexpr int PAIRED_UP_TO = 6;
  static constexpr int SPLIT_UP_TO = 16;
  static constexpr int64_t QK = 32, BYTES = 22;
  static inline void decode(const uint8_t* row, int64_t c, __m256 (&w)[4]) {
    const uint8_t* b = row + c * BYTES;
    const __m256 d = _mm256_set1_ps(f16(b));
    __m256i q[4];
    nibble_dwords(b + 6, q);
    for (int j = 0; j < 4; ++j) {
      const __m256i h = _mm256_load_si256(reinterpret_cast<const __m256i*>(HIGH_BITS.row[b[2 + j]]));
      w[j] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_add_epi32(q[j], h)));
    }
  }
  static constexpr bool INTS = true;  // integer view: native_a8.h TileInts, four rows at a time
};

struct Q4_KB {
  static constexpr int PAIRED_UP_TO = 0;
  static constexpr int SPLIT_UP_TO = 8;
  static constexpr int64_t QK = 256, BYTES = 144;
  static inline void decode(const uint8_t* row, int64_t c, __m256 (&w)[4]) {
    const uint8_t* b = row + (c / 8) * BYTES;
    const int j = static_cast<int>(c % 8);
    const uint8_t* s = b + 4;
    const int sc = j < 4 ? s[j] & 63 : (s[j + 4] & 0x0F) | ((s[j - 4] >> 2) & 0x30);
    const int mn = j < 4 ? s[j + 4] & 63 : (s[j + 4] >> 4) | ((s[j] >> 2) & 0x30);
    const __m256 ds = _mm256_set1_ps(f16(b) * static_cast<float>(sc));
    const __m256 dm = _mm256_set1_ps(f16(b + 2) * static_cast<float>(mn));
    const uint8_t* q = b + 16 + (j / 2) * 32;  // sub-block j: the low (j even) or high nibbles of 32 bytes
    for (int k = 0; k < 4; ++k) {
      const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + 8 * k)));
      const __m256i n = j % 2 ? _mm256_srli_epi32(v, 4) : _mm256_and_si256(v, _mm256_set1_epi32(0x0F));
      w[k] = _mm256_fmsub_ps(ds, _mm256_cvtepi32_ps(n), dm);  // ds q exact: one rounding
    }
  }
  static constexpr bool INTS = true, SIGNED = false, SPLIT = false, OFFSET = true;
  static inline __m256i ints(const uint8_t* row, int64_t c, float& a0, float& a1, float& off) {
    const uint8_t* b = row + (c / 8) * BYTES;
    const int j = static_cast<int>(c % 8);
    const uint8_t* s = b + 4;
    const int sc = j < 4 ? s[j] & 63 : (s[j + 4] & 0x0F) | ((s[j - 4] >> 2) & 0x30);
    const int mn = j < 4 ? s[j + 4] & 63 : (s[j + 4] >> 4) | ((s[j] >> 2) & 0x30);
    a0 = a1 = f16(b) * static_cast<float>(sc);
    off = -(f16(b + 2) * static_cast<float>(mn));
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 16 + (j / 2) * 32));
    return _mm256_and_si256(j % 2 ? _mm256_srli_epi16(v, 4) : v, _mm256_set1_epi8(0x0F));
  }
};

struct Q6_KB {
  static constexpr int PAIRED_UP_TO = 5;
  static constexpr int SPLIT_UP_TO = 8;
  static constexpr int64_t QK = 256, BYTES = 210;
  static inline void decode(const uint8_t* row, int64_t c, __m256 (&w)[4]) {  // the integer view, widened
    float a0, a1, unused_off;
    const __m256i q = ints(row, c, a0, a1, unused_off);
    const __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
    const __m128i part[4] = {lo, _mm_unpackhi_epi64(lo, lo), hi, _mm_unpackhi_epi64(hi, hi)};
    for (int k = 0; k < 4; ++k)  // values 16h .. 16h + 15 share scale a_h
      w[k] = _mm256_mul_ps(_mm256_set1_ps(k < 2 ? a0 : a1), _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(part[k])));
  }
  static constexpr bool INTS = true, SIGNED = true, SPLIT = true, OFFSET = false;
  static inline __m256i ints(const uint8_t* row, int64_t c, float& a0, float& a1, float& off) {
    const uint8_t* b = row + (c / 8) * BYTES;
    const int j = static_cast<int>(c % 8), half = j / 4, t = j % 4;
    const float d = f16(b + 208);
    const int8_t* scales = reinterpret_cast<const int8_t*>(b + 192);
    a0 = d * static_cast<float>(scales[2 * j]);
    a1 = d * static_cast<float>(scales[2 * j + 1]);
    off = 0.f;
    __m256i l = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + half * 64 + (t % 2) * 32));
    l = _mm256_and_si256(t / 2 ? _mm256_srli_epi16(l, 4) : l, _mm256_set1_epi8(0x0F));
    __m256i u = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 128 + half * 32));
    u = _mm256_and_si256(_mm256_srl_epi16(u, _mm_cvtsi32_si128(2 * t)), _mm256_set1_epi8(3));
    return _mm256_sub_epi8(_mm256_or_si256(l, _mm256_slli_epi16(u, 4)), _mm256_set1_epi8(32));
  }
};

template <bool THIRD>  // Q2_1 (false) and Q3_1 (true): casspec's low-bit draft formats
struct LowBitB {
  static constexpr int PAIRED_UP_TO = 6;
  static constexpr int SPLIT_UP_TO = 8;
  static constexpr int64_t QK = 32, BYTES = THIRD ? 16 : 12;
  static inline void decode(const uint8_t* row, int64_t c, __m256 (&w)[4]) {
    const uint8_t* b = row + c * BYTES;
    const __m256 d = _mm256_set1_ps(f16(b)), m = _mm256_set1_ps(f16(b + 2));
    for (int v = 0; v < 4; ++v) {
      __m256i q = crumb_dwords(b + 4, v);
      if constexpr (THIRD)
        q = _mm256_add_epi32(q, _mm256_load_si256(reinterpret_cast<const __m256i*>(THIRD_BITS.row[b[12 + v]])));
      w[v] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(q), m);  // d q exact: one rounding
    }
  }
  static constexpr bool INTS = true;  // integer view: native_a8.h TileInts, four rows at a time
};

struct F32B {
  static constexpr int PAIRED_UP_TO = 6;
  static constexpr int SPLIT_UP_TO = 8;
  static constexpr bool INTS = false, SIGNED = true, SPLIT = false, OFFSET = false;
  static inline __m256i ints(const uint8_t*, int64_t, float&, float&, float&) { return _mm256_setzero_si256(); }
  static constexpr int64_t QK = 32, BYTES = 128;
  static inline void decode(const uint8_t* row, int64_t c, __m256 (&w)[4]) {
    const float* p = reinterpret_cast<const float*>(row + c * BYTES);
    for (int j = 0; j < 4; ++j) w[j] = _mm256_loadu_ps(p + 8 * j);
  }
};

struct F16B {
  static constexpr int PAIRED_UP_TO = 6;
  static constexpr int SPLIT_UP_TO = 8;
  static constexpr bool INTS = false, SIGNED = true, SPLIT = false, OFFSET = false;
  static inline __m256i ints(const uint8_t*, int64_t, float&, float&, float&) { return _mm256_setzero_si256(); }
  static constexpr int64_t QK = 32, BYTES = 64;
  static inline void decode(const uint8_t* row, int64_t c, __m256 (&w)[4]) {
    const uint8_t* p = row + c * BYTES;
    for (int j = 0; j < 4; ++j) w[j] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * j)));
  }
};

struct BF16B {
  static constexpr int PAIRED_UP_TO = 6;
  static constexpr int SPLIT_UP_TO = 8;
  static constexpr bool INTS = false, SIGNED = true, SPLIT = false, OFFSET = false;
  static inline __m256i ints(const uint8_t*, int64_t, float&, float&, float&) { return _mm256_setzero_si256(); }
  static constexpr int64_t QK = 32, BYTES = 64;
  static inline void decode(const uint8_t* row, int64_t c, __m256 (&w)[4]) {
    const uint8_t* p = row + c * BYTES;
    for (int j = 0; j < 4; ++j) {
      const __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * j)));
      w[j] = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    }
  }
};

// Call fn(B{}) with the decoder of `type`; false for a type without one.
template <class Fn>
inline bool dispatch(int64_t type, Fn&& fn) {
  switch (type) {
    case Q8_0: fn(Q8_0B{}); return true;
    case Q4_0: fn(Q4_0B{}); return true;
    case Q4_1: fn(Q4_1B{}); return true;
    case Q5_0: fn(Q5_0B{}); return true;
    case Q4_K: fn(Q4_KB{}); return true;
    case Q6_K: fn(Q6_KB{}); return true;
    case F32: fn(F32B{}); return true;
    case F16: fn(F16B{}); return true;
    case BF16: fn(BF16B{}); return true;
    case Q2_1: fn(LowBitB<false>{}); return true;
    case Q3_1: fn(LowBitB<true>{}); return true;
    default: return false;
  }
}

}  // namespace gguf
