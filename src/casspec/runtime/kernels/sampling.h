// Coupled (Gumbel-max) sampling of rows of logits in one call, and greedy's argmax: see sampling.cpp.
#pragma once
#include <torch/extension.h>

#include <optional>
#include <vector>

std::vector<at::Tensor> coupled_sample(const at::Tensor& x, const at::Tensor& keys, double temperature, int64_t top_k,
                                       double top_p, double min_p, const std::optional<at::Tensor>& token_ids,
                                       int64_t top, bool with_probs);

at::Tensor first_argmax(const at::Tensor& x);  // [N] first column of each row's max; -1: the max is not finite
std::vector<at::Tensor> top_softmax(const at::Tensor& x, int64_t k);  // [N, k] best columns, their softmax probs
