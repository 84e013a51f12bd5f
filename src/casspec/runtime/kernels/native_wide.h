// native_linear's registers path on AVX-512 for WIDE_FROM to WIDE_UP_TO input rows, and its fp32 tile kernel for more
// (native_wide.cpp), bitwise the AVX2 path's outputs; called from native_linear.cpp where the CPU has AVX-512 and it is switched on.
#pragma once
#include "block_part.h"

// Input rows it runs: WIDE_FROM to WIDE_UP_TO for every format, and fewer for the formats with a 512-bit pair decoder
// (wide_blocks.h: Q8_0, Q4_0, Q4_1, Q5_0), where 1-3 rows run two tiles at a time. Measured, one forward in-process
// (AVX2 -> AVX-512): on a 2-vCPU Xeon, 4-5 rows 0.92-1.07x, 6-8 rows 1.01-1.12x, 9-16 rows 1.12-1.45x (where the AVX2
// path decodes the weights once per group of up to 8 rows); on a 2-vCPU Zen 5 (full-width AVX-512) with the pair
// decoders, SmolLM2 1-3 rows 1.18-1.24x, 4-8 rows 1.12-1.27x.
constexpr int64_t WIDE_FROM = 6, WIDE_UP_TO = 16;

bool wide_supported();  // whether this CPU (and OS) has AVX-512 F / DQ / VL
bool avx512_env_on();  // CASSPEC_AVX512 is unset or not "0" (the AVX-512 linears' and attention's starting switch)
bool wide_active();  // supported and switched on (CASSPEC_AVX512=0 or set_wide(false) turns it off)
void set_wide(bool on);  // for tests and A/B measurements: the outputs are the same either way
bool wide_runs(int64_t type, int64_t M);  // whether native_part_wide runs M input rows of this ggml type
void native_part_wide(const BlockPart& p);  // p.xq unused: fp32 activations
// The fp32 tile kernel (common.h tile_dot, then the epilogue) over a tile decoded into [K/8][4][8] fp32, on AVX-512:
// the same outputs, bit for bit, at half the FMAs (native_linear.cpp's scratch path, past SPLIT_UP_TO input rows).
// A 128-token prefill chunk (last row's logits), in-process A/B on a 2-vCPU Xeon: SmolLM2 192 -> 166 ms (1.16x),
// Gemma-3 202 -> 170 ms (1.19x); 17-64 rows 1.06-1.25x.
// p's LinearArgs fields (w, up, rows, type unused); the tile's output columns first + r * stride.
void wide_dense_tile(const BlockPart& p, int64_t first, int64_t stride, const float* w);
