// Memory layouts the kernels read in place, one rule for CPU and CUDA: what an op takes as it
// comes, and what it copies first. Attribution passes strided views on its hot path (a
// transposed gradient, CLT decoder slices), so these are read where they lie.
#pragma once
#include <ATen/core/Tensor.h>

namespace cltrace {

// attribution_contract's grad [B, n_pos, d_model] and W_dec [n_rows, d_model]: any strides
// over the leading dimensions, unit stride within a row (else copied). Attribution passes
// grad as the transposed view [k, n, d] of a position-major [n, k, d] gradient, strides
// (d, k * d, 1), and W_dec as a CLT slice w_dec[:, o, :], rows n_out * d apart.
inline at::Tensor unit_row_stride(const at::Tensor& t) {
  return t.stride(-1) == 1 ? t : t.contiguous();
}

// sparse_decode(_backward)'s W_dec [d_sae, n_out, d_model]: each feature's [n_out, d_model]
// block contiguous (a flattened row of D = n_out * d_model elements), rows any distance apart
// (row stride = result.stride(0)). A memory-mapped CLT slice w_dec[:, i:, :] is used in place
// (only active rows are touched); other layouts are copied.
inline at::Tensor decoder_row_blocks(const at::Tensor& W) {
  const bool dense_rows = W.stride(2) == 1 && (W.size(1) == 1 || W.stride(1) == W.size(2));
  return dense_rows ? W : W.contiguous();
}

}  // namespace cltrace
