// TopK encode by row blocks with ATen ops (matmul, topk, sort, gather), shared by the CPU and
// CUDA implementations, which differ only in device checks and the block size.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <tuple>

namespace cltrace {

// x [N, d_in] contiguous, W_enc [d_in, d_sae], b_enc [d_sae]; z blocks of about block_elems
// elements. -> row_offsets [N+1] (= i * k), feat_idx [N*k] ascending per row, acts [N*k].
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_encode_blocks(
    const at::Tensor& x, const at::Tensor& W_enc, const at::Tensor& b_enc, int64_t k,
    int64_t block_elems) {
  const int64_t n = x.size(0), d_sae = W_enc.size(1);
  auto feat_idx = at::empty({n, k}, x.options().dtype(at::kLong));
  auto acts = at::empty({n, k}, x.options());
  const int64_t block = std::max<int64_t>(1, block_elems / d_sae);
  for (int64_t r0 = 0; r0 < n; r0 += block) {
    const int64_t rows = std::min(block, n - r0);
    auto z = at::mm(x.narrow(0, r0, rows), W_enc);  // [rows, d_sae]
    z.add_(b_enc);
    auto idx = std::get<1>(at::topk(z, k, 1, true, false));
    idx = std::get<0>(at::sort(idx, 1));
    feat_idx.narrow(0, r0, rows).copy_(idx);
    acts.narrow(0, r0, rows).copy_(z.gather(1, idx).relu_());
  }
  auto row_offsets = at::arange(n + 1, x.options().dtype(at::kLong)).mul_(k);
  return {row_offsets, feat_idx.view({-1}), acts.view({-1})};
}

}  // namespace cltrace
