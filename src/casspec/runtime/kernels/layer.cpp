// One decoder layer in one call: the ops runner._attention and runner._mlp call one by one from Python,
// called here in the same order on the same tensors, so the outputs are bitwise those of the separate calls.
// Why: a layer is six kernel calls, and between two of them the main thread runs Python and converts
// arguments while the other OpenMP thread waits. The projections and norms are converted once, when the layer
// is bound. Measured interleaved against the separate calls: 1.03x a SmolLM2 forward at 1 row, 1.01x Gemma's
// (most of the serial time between kernels is inside them: output allocation, RoPE, attention's merge).
#include <torch/extension.h>

#include <optional>

#include "common.h"
#include "layer.h"
#include "native_linear.h"
#include "ops.h"

at::Tensor Projection::apply(const at::Tensor& x, const std::optional<at::Tensor>& norm, double eps, int64_t mode,
                             const std::optional<at::Tensor>& out) const {
  if (!parts.empty()) return native_linear(x, parts, types, bias, norm, eps, mode, out, act8);
  return linear(x, *tiled, scale, mins, group, bias, norm, eps, n, mode, out);
}

namespace {

// h += sub-layer output: accumulated by the projection itself, or through a post-norm (Gemma 3's sandwich).
void add_output(const Projection& p, const at::Tensor& x, const std::optional<at::Tensor>& post_norm, double eps,
                at::Tensor& h) {
  if (!post_norm) {
    p.apply(x, std::nullopt, 0.0, ACCUMULATE, h);
    return;
  }
  add_rms_norm(h, p.apply(x, std::nullopt, 0.0, STORE, std::nullopt), *post_norm, eps);
}

}  // namespace

void layer_forward(const Layer& L, at::Tensor& h, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& k_cache,
                   at::Tensor& v_cache, const at::Tensor& slots, const at::Tensor& lo, const at::Tensor& lens,
                   const std::optional<at::Tensor>& mask, bool attn, bool mlp) {
  if (attn) {
    const at::Tensor qkv = L.qkv.apply(h, L.attn_norm, L.eps, STORE, std::nullopt);  // [M, (H + 2 Hkv) D]
    const at::Tensor q = rope_kv(qkv, cos, sin, k_cache, v_cache, slots, L.heads, L.kv_heads, L.q_norm, L.k_norm,
                                 L.eps);  // [M, H, D]
    const at::Tensor o = attention(q, k_cache, v_cache, lo, lens, mask, L.scale);  // [M, H D]
    add_output(L.o, o, L.post_attn_norm, L.eps, h);
  }
  if (mlp) {
    const at::Tensor g = L.gate_up.apply(h, L.mlp_norm, L.eps, L.gate_up.glu, std::nullopt);  // [M, F]
    add_output(L.down, g, L.post_mlp_norm, L.eps, h);
  }
}
