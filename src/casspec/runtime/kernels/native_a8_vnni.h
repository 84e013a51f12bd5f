// The activation-quantized linear built for CPUs with AVX-VNNI (native_a8_vnni.cpp), called from
// native_linear.cpp when the CPU has it. Plain fields: the kernels' own structs live in anonymous namespaces.
#pragma once
#include <cstdint>

struct A8Part {  // one part of a linear (or a gate|up pair): LinearArgs' fields, the quantized rows, the blocks
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

bool a8_vnni_supported();  // whether this CPU has AVX-VNNI
void a8_part_vnni(const A8Part& p);  // a type with an integer view (gguf_blocks.h INTS)
