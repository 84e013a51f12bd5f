// native_linear's registers path on AVX-512 for WIDE_FROM to WIDE_UP_TO input rows (native_wide.cpp), bitwise the
// AVX2 path's outputs; called from native_linear.cpp where the CPU has AVX-512 and it is switched on.
#pragma once
#include "block_part.h"

// Input rows it runs. Measured on a 2-vCPU Xeon (one linear, AVX2 -> AVX-512): 4-5 rows 0.92-1.07x, 6-8 rows
// 1.01-1.12x, 9-16 rows 1.12-1.45x (where the AVX2 path decodes the weights once per group of up to 8 rows).
constexpr int64_t WIDE_FROM = 6, WIDE_UP_TO = 16;

bool wide_supported();  // whether this CPU (and OS) has AVX-512 F / DQ / VL
bool wide_active();  // supported and switched on (CASSPEC_AVX512=0 or set_wide(false) turns it off)
void set_wide(bool on);  // for tests and A/B measurements: the outputs are the same either way
void native_part_wide(const BlockPart& p);  // p.xq unused: fp32 activations
