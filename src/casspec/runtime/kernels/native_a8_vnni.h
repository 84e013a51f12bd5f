// The activation-quantized linear built for CPUs with AVX-VNNI (native_a8_vnni.cpp), called from
// native_linear.cpp when the CPU has it.
#pragma once
#include "block_part.h"

bool a8_vnni_supported();  // whether this CPU has AVX-VNNI
void a8_part_vnni(const BlockPart& p);  // a type with an integer view (gguf_blocks.h INTS)
