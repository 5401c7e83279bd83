// Contracts of the encoders and their backward (csrc/cpu/encode.cpp and csrc/cuda/encode.cu).
// Metadata (and k, bandwidth) is checked on every call; the backward's feat_idx and CSR offsets
// values always on the CPU and on CUDA only with the value-check switch (csrc/checks/common.h).
// The forwards take no index.
#pragma once
#include "checks/common.h"

namespace cltrace {
namespace detail {

// x [N, d_in], W_enc [d_in, d_sae], b_enc [d_sae] (and threshold [d_sae] when given).
inline void check_encode_inputs(const at::Tensor& x, const at::Tensor& W_enc,
                                const at::Tensor& b_enc, const at::Tensor* threshold,
                                const char* op) {
  check_floating(x, "x", op);
  check_dim(x, 2, "x [N, d_in]", op);
  check_dim(W_enc, 2, "W_enc [d_in, d_sae]", op);
  check_dim(b_enc, 1, "b_enc [d_sae]", op);
  check_same(W_enc, x, "W_enc", "x", op);
  check_same(b_enc, x, "b_enc", "x", op);
  TORCH_CHECK(W_enc.size(0) == x.size(1), op, ": x has d_in = ", x.size(1),
              " but W_enc is [", W_enc.size(0), ", ", W_enc.size(1),
              "] (expected [d_in, d_sae]; a transcoder for another model, or W_enc stored "
              "transposed?)");
  TORCH_CHECK(b_enc.size(0) == W_enc.size(1), op, ": b_enc has ", b_enc.size(0),
              " entries but W_enc has d_sae = ", W_enc.size(1));
  if (threshold != nullptr) {
    check_dim(*threshold, 1, "threshold [d_sae]", op);
    check_same(*threshold, x, "threshold", "x", op);
    TORCH_CHECK(threshold->size(0) == W_enc.size(1), op, ": threshold has ",
                threshold->size(0), " entries but W_enc has d_sae = ", W_enc.size(1));
  }
}

// Encoder backward metadata: grad_acts [nnz] over the CSR of x [N, d_in], W_enc [d_in, d_sae],
// and the forward's per-entry values `saved` [nnz] (pre_acts for JumpReLU, acts for TopK).
inline void check_encoder_backward_shapes(const at::Tensor& grad, const at::Tensor& x,
                                          const at::Tensor& W_enc, const at::Tensor& row_offsets,
                                          const at::Tensor& feat_idx, const at::Tensor& saved,
                                          const char* saved_name, const char* op) {
  check_floating(x, "x", op);
  check_dim(x, 2, "x [N, d_in]", op);
  check_dim(W_enc, 2, "W_enc [d_in, d_sae]", op);
  check_same(W_enc, x, "W_enc", "x", op);
  check_same(grad, x, "grad_acts", "x", op);
  check_same(saved, x, saved_name, "x", op);
  TORCH_CHECK(W_enc.size(0) == x.size(1), op, ": x has d_in = ", x.size(1), " but W_enc is ",
              W_enc.sizes());
  check_csr(row_offsets, feat_idx, grad, x.size(0), "grad_acts", op);
  TORCH_CHECK(saved.dim() == 1 && saved.numel() == grad.numel(), op, ": ", saved_name,
              " and grad_acts differ in length (", saved.sizes(), " vs ", grad.sizes(), ")");
}

}  // namespace detail

// jumprelu_encode: x, W_enc, b_enc and threshold [d_sae]; bandwidth >= 0.
inline void check_jumprelu_encode_inputs(const at::Tensor& x, const at::Tensor& W_enc,
                                         const at::Tensor& b_enc, const at::Tensor& threshold,
                                         double bandwidth) {
  const char* op = "jumprelu_encode";
  detail::check_encode_inputs(x, W_enc, b_enc, &threshold, op);
  TORCH_CHECK(bandwidth >= 0, op, ": bandwidth must be >= 0, got ", bandwidth);
}

// topk_encode: x, W_enc, b_enc; 1 <= k <= d_sae.
inline void check_topk_encode_inputs(const at::Tensor& x, const at::Tensor& W_enc,
                                     const at::Tensor& b_enc, int64_t k) {
  const char* op = "topk_encode";
  detail::check_encode_inputs(x, W_enc, b_enc, nullptr, op);
  const int64_t d_sae = W_enc.size(1);
  TORCH_CHECK(k >= 1 && k <= d_sae, op, ": k must be in [1, d_sae = ", d_sae, "], got ", k);
}

// jumprelu_encode_backward: the encoder backward inputs, threshold [d_sae], bandwidth >= 0.
inline void check_jumprelu_backward_inputs(const at::Tensor& grad_acts, const at::Tensor& x,
                                           const at::Tensor& W_enc, const at::Tensor& threshold,
                                           const at::Tensor& row_offsets,
                                           const at::Tensor& feat_idx, const at::Tensor& pre_acts,
                                           double bandwidth) {
  const char* op = "jumprelu_encode_backward";
  detail::check_encoder_backward_shapes(grad_acts, x, W_enc, row_offsets, feat_idx, pre_acts,
                                        "pre_acts", op);
  check_same(threshold, x, "threshold", "x", op);
  TORCH_CHECK(threshold.dim() == 1 && threshold.size(0) == W_enc.size(1), op,
              ": threshold must be [d_sae = ", W_enc.size(1), "], got ", threshold.sizes());
  TORCH_CHECK(bandwidth >= 0, op, ": bandwidth must be >= 0, got ", bandwidth);
  check_csr_values(row_offsets, feat_idx, W_enc.size(1), "W_enc", op);
}

// topk_encode_backward: the encoder backward inputs (acts saved by the forward).
inline void check_topk_backward_inputs(const at::Tensor& grad_acts, const at::Tensor& x,
                                       const at::Tensor& W_enc, const at::Tensor& row_offsets,
                                       const at::Tensor& feat_idx, const at::Tensor& acts) {
  const char* op = "topk_encode_backward";
  detail::check_encoder_backward_shapes(grad_acts, x, W_enc, row_offsets, feat_idx, acts, "acts",
                                        op);
  check_csr_values(row_offsets, feat_idx, W_enc.size(1), "W_enc", op);
}

}  // namespace cltrace
