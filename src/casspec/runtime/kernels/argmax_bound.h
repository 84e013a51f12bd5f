// Candidates for the target's greedy token from activation-quantized logits and their error bound: see
// argmax_bound.cpp and runtime/argmax_head.py.
#pragma once
#include <torch/extension.h>

#include <vector>

at::Tensor bound_candidates(const at::Tensor& h, const at::Tensor& norm, double eps, const at::Tensor& logits,
                            const at::Tensor& table, const at::Tensor& block_max, const std::vector<int64_t>& edges,
                            double slack, double rounding);
