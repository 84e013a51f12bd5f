// A decoder layer bound once (layer.cpp): its projections as the kernels take them, its norms and shape.
#pragma once
#include <torch/extension.h>

#include <optional>
#include <vector>

struct Projection {
  std::vector<at::Tensor> parts;  // native: one block tensor per fused part (empty: tiled)
  std::vector<int64_t> types;     // native: their ggml types
  std::optional<at::Tensor> tiled, scale, mins;  // tiled fp32 / int8 / int4 weights
  int64_t group = 0, n = 0;      // tiled: int4 columns per scale, output rows
  std::optional<at::Tensor> bias;
  int64_t glu = 0;               // GLU mode of a gate-up projection (0: none)
  bool act8 = false;             // native: int8 activations

  at::Tensor apply(const at::Tensor& x, const std::optional<at::Tensor>& norm, double eps, int64_t mode,
                   const std::optional<at::Tensor>& out) const;
};

struct Layer {
  Projection qkv, o, gate_up, down;
  at::Tensor attn_norm, mlp_norm;
  std::optional<at::Tensor> post_attn_norm, post_mlp_norm, q_norm, k_norm;
  int64_t heads = 0, kv_heads = 0;
  double eps = 0.0, scale = 0.0;
};

// h += attention sub-layer (attn), then h += gated MLP sub-layer (mlp), in place.
void layer_forward(const Layer& L, at::Tensor& h, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& k_cache,
                   at::Tensor& v_cache, const at::Tensor& slots, const at::Tensor& lo, const at::Tensor& lens,
                   const std::optional<at::Tensor>& mask, bool attn, bool mlp);
