// One part of a native linear (or a gate|up pair) as plain fields, for the kernels built in their own
// translation unit for wider instructions (native_a8_vnni.cpp, native_wide.cpp): the kernels' own structs live in
// anonymous namespaces, so they cross files as this.
#pragma once
#include <cstdint>

struct BlockPart {  // LinearArgs' fields, the quantized rows (act8 only), the blocks
  const float* x;
  int64_t M, K, N;
  const float* bias;
  float* y;
  int64_t ldy, mode, ffn;
  const int8_t* xq;
  const float *xd, *xs;
  const uint8_t *w, *up;
  int64_t rows, type;
};
