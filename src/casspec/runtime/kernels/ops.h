// The ops of cpu_kernels.cpp that a fused layer (layer.cpp) calls as Python would, one after another.
#pragma once
#include <torch/extension.h>

#include <optional>

at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& scale,
                  const std::optional<at::Tensor>& mins, int64_t group, const std::optional<at::Tensor>& bias,
                  const std::optional<at::Tensor>& norm_w, double eps, int64_t n, int64_t mode,
                  const std::optional<at::Tensor>& out);
at::Tensor rope_kv(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& k_cache,
                   at::Tensor& v_cache, const at::Tensor& slots, int64_t heads, int64_t kv_heads,
                   const std::optional<at::Tensor>& q_norm, const std::optional<at::Tensor>& k_norm, double eps);
at::Tensor attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& lo,
                     const at::Tensor& len, const std::optional<at::Tensor>& allowed, double scale);
void add_rms_norm(at::Tensor& h, const at::Tensor& x, const at::Tensor& w, double eps);
