// native_a8.h's kernels compiled with AVX-VNNI (vpdpbusd on 256-bit vectors), for the CPUs that have it
// (Intel since Alder Lake / Sapphire Rapids, AMD since Zen 4's AVX512-VNNI and Zen 5's AVX-VNNI); everything
// else runs the maddubs build in native_linear.cpp. Only this file is built for the extension: the target
// pragma covers the kernels' own code, not torch's headers.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include "native_a8_vnni.h"

#pragma GCC push_options
#pragma GCC target("avxvnni")
#include "common.h"
#include "gguf_blocks.h"
#include "native_a8.h"

void a8_part_vnni(const BlockPart& p) {
  const LinearArgs a{p.x, p.M, p.K, p.N, nullptr, p.bias, p.y, p.ldy, p.mode, p.ffn};
  const QuantView x{p.xq, p.xd, p.xs};
  gguf::dispatch(p.type, [&](auto b) {
    using B = decltype(b);
    if constexpr (B::INTS) a8_tiles<B, true>(a, x, p.w, p.up, p.rows);
  });
}
#pragma GCC pop_options

bool a8_vnni_supported() {
  static const bool yes = __builtin_cpu_supports("avxvnni");
  return yes;
}
