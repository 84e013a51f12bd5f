// Linears over weights in their shipped block formats (GGUF ggml types, bf16, fp16): see native_linear.cpp.
#pragma once
#include <torch/extension.h>

#include <optional>
#include <vector>

at::Tensor native_linear(const at::Tensor& x, const std::vector<at::Tensor>& parts, const std::vector<int64_t>& types,
                         const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& norm_w, double eps,
                         int64_t mode, const std::optional<at::Tensor>& out, int64_t act8);  // act8: 0 off, 1 fastest, 2 portable
at::Tensor dequantize_rows(const at::Tensor& blocks, int64_t type, int64_t k, const std::optional<at::Tensor>& ids);
bool native_type_supported(int64_t type);
