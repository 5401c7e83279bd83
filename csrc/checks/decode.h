// Contracts of sparse_decode and sparse_decode_backward (csrc/cpu/decode.cpp and
// csrc/cuda/decode.cu). Metadata is checked on every call; feat_idx and the CSR offsets'
// values always on the CPU and on CUDA only with the value-check switch (csrc/checks/common.h).
#pragma once
#include "checks/common.h"

namespace cltrace {
namespace detail {

// CSR (row_offsets, feat_idx, acts) over N rows, W_dec [d_sae, n_out, d_model]: metadata.
inline void check_decode_shapes(const at::Tensor& row_offsets, const at::Tensor& feat_idx,
                                const at::Tensor& acts, const at::Tensor& W_dec, const char* op) {
  check_floating(W_dec, "W_dec", op);
  check_dim(W_dec, 3, "W_dec [d_sae, n_out, d_model]", op);
  check_same(acts, W_dec, "acts", "W_dec", op);
  check_csr(row_offsets, feat_idx, acts, -1, "acts", op);
}

}  // namespace detail

// sparse_decode: CSR (row_offsets, feat_idx, acts) over N rows, W_dec [d_sae, n_out, d_model].
inline void check_decode_inputs(const at::Tensor& row_offsets, const at::Tensor& feat_idx,
                                const at::Tensor& acts, const at::Tensor& W_dec) {
  const char* op = "sparse_decode";
  detail::check_decode_shapes(row_offsets, feat_idx, acts, W_dec, op);
  check_csr_values(row_offsets, feat_idx, W_dec.size(0), "W_dec", op);
}

// sparse_decode_backward: as sparse_decode, and grad_out [N, n_out, d_model].
inline void check_decode_backward_inputs(const at::Tensor& grad_out, const at::Tensor& row_offsets,
                                         const at::Tensor& feat_idx, const at::Tensor& acts,
                                         const at::Tensor& W_dec) {
  const char* op = "sparse_decode_backward";
  detail::check_decode_shapes(row_offsets, feat_idx, acts, W_dec, op);
  check_same(grad_out, W_dec, "grad_out", "W_dec", op);
  const int64_t n = row_offsets.size(0) - 1;
  TORCH_CHECK(grad_out.dim() == 3 && grad_out.size(0) == n && grad_out.size(1) == W_dec.size(1) &&
                  grad_out.size(2) == W_dec.size(2),
              op, ": grad_out must be [N, n_out, d_model] = [", n, ", ", W_dec.size(1), ", ",
              W_dec.size(2), "], got ", grad_out.sizes());
  check_csr_values(row_offsets, feat_idx, W_dec.size(0), "W_dec", op);
}

}  // namespace cltrace
