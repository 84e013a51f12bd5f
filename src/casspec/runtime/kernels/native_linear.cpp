// y = rmsnorm(x) W^T + b with W in the blocks it ships in (gguf_blocks.h), fp32 activations.
//
// Why hand-written: reading a 4-bit model as fp32 reads 4-6x its bytes every step, and no maintained
// CPU kernel here multiplies fp32 activations by ggml blocks (torch's weight-only int4/int8 matmuls are
// 4-9x slower than fp32 on AVX2; llama.cpp quantizes the activations to 8 bits, a different function).
//
// A tile is 4 weight rows, each row a pointer into its tensor's blocks (the GGUF file, memory-mapped).
// Up to 3 input rows, the tile's 4 rows are decoded in registers, 32 at a time, interleaved (4 M
// independent FMA chains); 4 to 8 input rows, each weight row is decoded once and meets every input
// row in registers (up to a format's SPLIT_UP_TO rows, in balanced groups of 4-8); beyond, the tile is
// decoded once into an L1 scratch in the fp32 kernel's tiled layout and
// the fp32 tile kernel runs over it. Both paths accumulate every output in the fp32 kernel's order on bit-identical weights, so a
// native linear equals the fp32 linear on the dequantized model, whatever the number of rows.
// Fused projections: q|k|v run part by part (each part may be another type) into column ranges of one
// output; gate|up with one type run as GLU tiles (gate 2t, 2t+1, up 2t, 2t+1), otherwise as two parts; either
// way into gate | up columns that one vectorized pass gates (`gated`).
#include "native_linear.h"

#include <atomic>
#include <cstdlib>

#include "common.h"
#include "gguf_blocks.h"
#include "native_a8.h"
#include "native_a8_vnni.h"
#include "native_wide.h"

namespace {

template <class B>
struct RegDot {  // decode in registers, 4 weight rows interleaved: for 1..3 input rows (4 M FMA chains)
  const LinearArgs& a;
  Rows w;
  template <int MB>
  void run(int64_t m0, float (&v)[NB][3]) const {
    __m256 acc[NB][MB];
    for (int r = 0; r < NB; ++r)
      for (int m = 0; m < MB; ++m) acc[r][m] = _mm256_setzero_ps();
    const float* x = a.x + m0 * a.K;
    for (int64_t c = 0; c < a.K / 32; ++c) {
#pragma GCC unroll 4
      for (int r = 0; r < NB; ++r) {
        __m256 wv[4];
        B::decode(w.r[r], c, wv);
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j)
#pragma GCC unroll 3
          for (int m = 0; m < MB; ++m)
            acc[r][m] = _mm256_fmadd_ps(wv[j], _mm256_loadu_ps(x + m * a.K + c * 32 + j * KS), acc[r][m]);
      }
    }
    for (int m = 0; m < MB; ++m) {
      alignas(16) float s[NB];
      _mm_store_ps(s, hsum4(acc[0][m], acc[1][m], acc[2][m], acc[3][m]));
      for (int r = 0; r < NB; ++r) v[r][m] = s[r];
    }
  }
};

// Decode in registers, R weight rows at a time, for up to MAX_REG_ROWS input rows: each weight is
// decoded once and meets every input row while in registers. An FMA waits ~4 cycles on the one before
// it in its chain and two issue a cycle, so it takes ~8 chains (R * M accumulators) to keep the units
// busy: rows in pairs up to B::PAIRED_UP_TO input rows (Q8_0, M = 4: 0.86 ns per 8 weights and core
// instead of 1.25), one at a time beyond (2 M accumulators and the decoded vectors outgrow the 16 AVX2
// registers; each format's limit is where pairs measured faster).
constexpr int64_t MAX_REG_ROWS = 8;

template <class B, int R, int M>
void row_dots(const float* x, int64_t K, const uint8_t* const* rows, __m256 (*acc)[M]) {  // acc[R][M]
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = _mm256_setzero_ps();
  for (int64_t c = 0; c < K / 32; ++c) {
#pragma GCC unroll 2
    for (int r = 0; r < R; ++r) {
      __m256 wv[4];
      B::decode(rows[r], c, wv);
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j)
#pragma GCC unroll 8
        for (int m = 0; m < M; ++m)
          acc[r][m] = _mm256_fmadd_ps(wv[j], _mm256_loadu_ps(x + m * K + c * 32 + j * KS), acc[r][m]);
    }
  }
}

// One tile for all M <= 8 input rows, then the epilogue in blocks of up to 3 rows.
template <class B, int M>
void tile_in_registers(const LinearArgs& a, const TileCols& o, const Rows& w) {
  constexpr int R = M <= B::PAIRED_UP_TO ? 2 : 1;  // a K-quant's decode spills registers in pairs
  __m256 acc[NB][M];
  for (int r = 0; r < NB; r += R) row_dots<B, R, M>(a.x, a.K, w.r + r, acc + r);
  for (int m0 = 0; m0 < M; m0 += 3) {
    const int mb = std::min<int>(3, M - m0);
    float v[NB][3];
    for (int m = 0; m < mb; ++m) {
      alignas(16) float s[NB];
      _mm_store_ps(s, hsum4(acc[0][m0 + m], acc[1][m0 + m], acc[2][m0 + m], acc[3][m0 + m]));
      for (int r = 0; r < NB; ++r) v[r][m] = s[r];
    }
    epilogue(a, o, m0, mb, v);
  }
}

template <class B>
void tile_small_m(const LinearArgs& a, const TileCols& o, const Rows& w) {
  switch (a.M) {
    case 4: tile_in_registers<B, 4>(a, o, w); break;
    case 5: tile_in_registers<B, 5>(a, o, w); break;
    case 6: tile_in_registers<B, 6>(a, o, w); break;
    case 7: tile_in_registers<B, 7>(a, o, w); break;
    default: tile_in_registers<B, 8>(a, o, w); break;
  }
}

// The tile's 4 rows decoded into [K/8][4][8] fp32, the layout the fp32 tile kernel reads.
template <class B>
void decode_tile(const Rows& w, int64_t K, float* out) {
  for (int64_t c = 0; c < K / 32; ++c)
    for (int r = 0; r < NB; ++r) {
      __m256 wv[4];
      B::decode(w.r[r], c, wv);
      for (int j = 0; j < 4; ++j) _mm256_storeu_ps(out + ((c * 4 + j) * NB + r) * KS, wv[j]);
    }
}

template <class B>
void native_tile(const LinearArgs& a, const TileCols& o, const Rows& r, float* scratch) {
  if (a.M <= 3) {
    tile_rows(a, o, RegDot<B>{a, r});
  } else if (a.M <= MAX_REG_ROWS) {
    tile_small_m<B>(a, o, r);
  } else if (a.M <= B::SPLIT_UP_TO) {
    // Balanced groups of 4-8 rows through the registers path, each decoding the tile again, rather than the L1
    // scratch and the fp32 tile kernel, whose 10- and 16-row shapes left a 1-row remainder (Gemma's Q8_0 head,
    // 10 rows: 28.1 -> 19.5 ms). Formats whose decoding costs more (K-quants) keep the scratch (gguf_blocks.h
    // SPLIT_UP_TO). Per output row the arithmetic is the registers path's: bitwise any other row count's.
    const int64_t groups = (a.M + MAX_REG_ROWS - 1) / MAX_REG_ROWS;
    for (int64_t g = 0, m0 = 0; g < groups; ++g) {
      LinearArgs part = a;
      part.M = (a.M - m0) / (groups - g);
      part.x = a.x + m0 * a.K;
      part.y = a.y + m0 * a.ldy;
      tile_small_m<B>(part, o, r);
      m0 += part.M;
    }
  } else {
    decode_tile<B>(r, a.K, scratch);
    if (wide_active())  // bitwise the same outputs, half the FMAs
      wide_dense_tile(BlockPart{a.x, a.M, a.K, a.N, a.bias, a.y, a.ldy, a.mode, a.ffn, nullptr, nullptr, nullptr,
                                nullptr, nullptr, 0, 0}, o.first, o.stride, scratch);
    else
      tile_rows(a, o, DenseDot<F32>{a, scratch});
  }
}

template <class B>
void native_tiles(const LinearArgs& a, const uint8_t* w, const uint8_t* up, int64_t rows) {
  const int64_t row_bytes = a.K / B::QK * B::BYTES;
  const int64_t tiles = up ? (rows + 1) / 2 : (rows + NB - 1) / NB;
  at::parallel_for(0, tiles, 4, [&](int64_t t0, int64_t t1) {
    std::vector<float> scratch(a.M > B::SPLIT_UP_TO ? NB * a.K : 0);  // the scratch path's only
    each_block_tile(a, w, up, rows, row_bytes, t0, t1,
                    [&](const TileCols& o, const Rows& r) { native_tile<B>(a, o, r, scratch.data()); });
  });
}

// Activation quantization (native_linear's act8): off, integer dot products with the fastest instructions the
// CPU has, or without AVX-VNNI whatever the CPU (the path every AVX2 CPU runs; tests compare the two).
enum Act8 : int64_t { ACT8_OFF = 0, ACT8_FASTEST = 1, ACT8_PORTABLE = 2 };

struct Quantized {  // the input rows quantized for an act8 linear, and which build runs them
  QuantRows rows;
  bool vnni;
};

// One part (or a gate|up pair) over every tile; `xq` set: activations quantized (native_a8.h) where the
// format has an integer view.
void run_part(const LinearArgs& a, int64_t type, const at::Tensor& w, const uint8_t* up, const Quantized* xq) {
  const bool ok = gguf::dispatch(type, [&](auto b) {
    using B = decltype(b);
    TORCH_CHECK(a.K % B::QK == 0, "K = ", a.K, " is not a multiple of the block size ", B::QK, " of type ", type);
    TORCH_CHECK(w.size(1) == a.K / B::QK * B::BYTES, "weight rows hold ", w.size(1), " bytes, expected ",
                a.K / B::QK * B::BYTES, " for K = ", a.K);
    const uint8_t* wp = w.data_ptr<uint8_t>();
    if (!B::INTS || !xq) {
      if (wide_active() && wide_runs(type, a.M))  // bitwise the same outputs, half the FMAs
        return native_part_wide(BlockPart{a.x, a.M, a.K, a.N, a.bias, a.y, a.ldy, a.mode, a.ffn, nullptr, nullptr,
                                          nullptr, wp, up, w.size(0), type});
      return native_tiles<B>(a, wp, up, w.size(0));
    }
    const QuantView x{xq->rows.q.data(), xq->rows.d.data(), xq->rows.s.data()};
    if (!xq->vnni) return a8_tiles<B, false>(a, x, wp, up, w.size(0));
    a8_part_vnni(BlockPart{a.x, a.M, a.K, a.N, a.bias, a.y, a.ldy, a.mode, a.ffn, x.q, x.d, x.s, wp, up, w.size(0), type});
  });
  TORCH_CHECK(ok, "no kernel for ggml type ", type);
}

std::atomic<int64_t> run_ahead_tiles{[] {  // common.h, run_ahead
  const char* env = std::getenv("CASSPEC_RUN_AHEAD");
  return env != nullptr ? std::max<int64_t>(0, std::atoll(env)) : int64_t{1};
}()};
}  // namespace

int64_t run_ahead() { return run_ahead_tiles.load(std::memory_order_relaxed); }
void set_run_ahead(int64_t tiles) { run_ahead_tiles.store(std::max<int64_t>(0, tiles), std::memory_order_relaxed); }

bool native_type_supported(int64_t type) {
  return gguf::dispatch(type, [](auto) {});
}

at::Tensor native_linear(const at::Tensor& x, const std::vector<at::Tensor>& parts, const std::vector<int64_t>& types,
                         const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& norm_w, double eps,
                         int64_t mode, const std::optional<at::Tensor>& out, int64_t act8) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kFloat, "x must be contiguous [M, K] fp32");
  TORCH_CHECK(!parts.empty() && parts.size() == types.size(), "one type per part");
  int64_t n = 0;
  for (const auto& p : parts) {
    TORCH_CHECK(p.dim() == 2 && p.is_contiguous() && p.scalar_type() == at::kByte, "parts must be uint8 [N, row bytes]");
    n += p.size(0);
  }
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor xin = x;
  if (norm_w) {
    xin = at::empty_like(x);
    rms_rows(x.data_ptr<float>(), M, K, norm_w->data_ptr<float>(), eps, xin.data_ptr<float>());
  }
  const float* b = bias ? bias->data_ptr<float>() : nullptr;
  TORCH_CHECK(act8 >= ACT8_OFF && act8 <= ACT8_PORTABLE, "act8 must be 0 (off), 1 (fastest) or 2 (portable)");
  TORCH_CHECK(!act8 || K % 32 == 0, "activation quantization needs K a multiple of 32");
  const Quantized xq{act8 ? quantize_rows(xin.data_ptr<float>(), M, K) : QuantRows{},
                     act8 == ACT8_FASTEST && a8_vnni_supported()};
  const Quantized* xqp = act8 ? &xq : nullptr;
  if (is_glu(mode)) {
    TORCH_CHECK(parts.size() == 2 && parts[0].size(0) == parts[1].size(0), "GLU needs gate and up of equal rows");
    const int64_t F = parts[0].size(0);
    at::Tensor gu;  // [M, 2F]: gate | up
    if (types[0] == types[1] && F % 2 == 0) {
      gu = at::empty({M, 2 * F}, x.options());
      LinearArgs a{xin.data_ptr<float>(), M, K, 2 * F, nullptr, b, gu.data_ptr<float>(), 2 * F, mode, F};
      run_part(a, types[0], parts[0], parts[1].data_ptr<uint8_t>(), xqp);
    } else {
      gu = native_linear(xin, parts, types, bias, std::nullopt, eps, STORE, std::nullopt, act8);
    }
    return gated(gu, mode);
  }
  at::Tensor y;
  if (mode == ACCUMULATE) {
    TORCH_CHECK(out && out->is_contiguous() && out->size(0) == M && out->size(1) == n, "accumulate needs out [M, N]");
    y = *out;
  } else {
    y = at::empty({M, n}, x.options());
  }
  int64_t col = 0;
  for (size_t i = 0; i < parts.size(); ++i) {
    const int64_t rows = parts[i].size(0);
    LinearArgs a{xin.data_ptr<float>(), M, K, rows, nullptr, b ? b + col : nullptr, y.data_ptr<float>() + col, n,
                 mode, 0};
    run_part(a, types[i], parts[i], nullptr, xqp);
    col += rows;
  }
  return y;
}

// Rows `ids` (all rows when absent) of a block tensor [N, row bytes] as fp32 [len(ids), K].
at::Tensor dequantize_rows(const at::Tensor& blocks, int64_t type, int64_t k, const std::optional<at::Tensor>& ids) {
  TORCH_CHECK(blocks.dim() == 2 && blocks.is_contiguous() && blocks.scalar_type() == at::kByte, "blocks must be uint8 [N, B]");
  const int64_t N = blocks.size(0), M = ids ? ids->numel() : N;
  const int64_t* id = ids ? ids->data_ptr<int64_t>() : nullptr;
  at::Tensor y = at::empty({M, k}, at::kFloat);
  float* yp = y.data_ptr<float>();
  for (int64_t m = 0; id && m < M; ++m) TORCH_CHECK(id[m] >= 0 && id[m] < N, "row ", id[m], " out of range");
  const bool ok = gguf::dispatch(type, [&](auto b) {
    using B = decltype(b);
    TORCH_CHECK(k % B::QK == 0 && blocks.size(1) == k / B::QK * B::BYTES, "blocks do not hold rows of ", k, " weights");
    at::parallel_for(0, M, 64, [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) {
        const int64_t row = id ? id[m] : m;
        for (int64_t c = 0; c < k / 32; ++c) {
          __m256 w[4];
          B::decode(blocks.data_ptr<uint8_t>() + row * blocks.size(1), c, w);
          for (int j = 0; j < 4; ++j) _mm256_storeu_ps(yp + m * k + c * 32 + j * KS, w[j]);
        }
      }
    });
  });
  TORCH_CHECK(ok, "no kernel for ggml type ", type);
  return y;
}
