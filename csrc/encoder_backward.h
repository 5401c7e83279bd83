// The device-independent part of the encoder backwards, shared by csrc/cpu/encode.cpp and
// csrc/cuda/encode.cu and written with ATen ops:
//   JumpReLU  acts = z * 1[z > theta]:  grad_z = grad_acts * 1[z > theta],
//             grad_theta[f] = sum_{j: f_j = f} grad_acts[j] * (-theta_f / bandwidth)
//                             * 1[|z_j - theta_f| < bandwidth / 2]   (rectangle STE; 0 if bandwidth = 0)
//   TopK      acts = relu(z) on the kept set:  grad_z = grad_acts * 1[acts > 0].
// Each device supplies the sparse linear backward for z = x @ W_enc + b_enc,
//   sparse_linear_backward(grad_z [nnz], x [N, d_in], W_enc [d_in, d_sae], row_offsets [N+1],
//                          feat_idx [nnz]) -> (grad_x [N, d_in], grad_W_enc, grad_b_enc [d_sae]),
// which touches only the nnz entries. Inputs are checked first (csrc/checks/encode.h), by the caller.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros_like.h>

#include <tuple>

namespace cltrace {

// -> grad_x [N, d_in], grad_W_enc [d_in, d_sae], grad_b_enc [d_sae], grad_threshold [d_sae].
template <typename SparseLinearBackward>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> jumprelu_backward(
    const at::Tensor& grad_acts, const at::Tensor& x, const at::Tensor& W_enc,
    const at::Tensor& threshold, const at::Tensor& row_offsets, const at::Tensor& feat_idx,
    const at::Tensor& pre_acts, double bandwidth, SparseLinearBackward&& sparse_linear_backward) {
  const auto theta = threshold.index_select(0, feat_idx);  // [nnz]
  const auto grad_z = grad_acts.mul(pre_acts.gt(theta));
  auto [grad_x, grad_W, grad_b] = sparse_linear_backward(grad_z, x, W_enc, row_offsets, feat_idx);
  auto grad_thr = at::zeros_like(threshold);
  if (bandwidth > 0) {
    const auto in_band = pre_acts.sub(theta).abs_().lt(bandwidth / 2);
    grad_thr.index_add_(0, feat_idx, grad_acts.mul(in_band).mul(theta.neg().div(bandwidth)));
  }
  return {grad_x, grad_W, grad_b, grad_thr};
}

// -> grad_x [N, d_in], grad_W_enc [d_in, d_sae], grad_b_enc [d_sae].
template <typename SparseLinearBackward>
std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_backward(
    const at::Tensor& grad_acts, const at::Tensor& x, const at::Tensor& W_enc,
    const at::Tensor& row_offsets, const at::Tensor& feat_idx, const at::Tensor& acts,
    SparseLinearBackward&& sparse_linear_backward) {
  return sparse_linear_backward(grad_acts.mul(acts.gt(0)), x, W_enc, row_offsets, feat_idx);
}

}  // namespace cltrace
