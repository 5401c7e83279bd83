// Contract of the pruning passes edge_abs_row_sums, edge_score_col_sums, edge_score_histogram
// and edge_score_mask (csrc/cpu/prune.cpp; CPU only). Metadata only, checked on every call:
// these ops take masks, not indices.
#pragma once
#include "checks/common.h"

#include <tuple>
#include <utility>

namespace cltrace {

// edges [R, N] float32/float64, row_mask [R] and col_mask [N] bool, and when given, scale and
// weight [R] of the edges' dtype; all on the CPU.
inline void check_edge_pass_inputs(const at::Tensor& edges, const at::Tensor* scale,
                                   const at::Tensor* weight, const at::Tensor& row_mask,
                                   const at::Tensor& col_mask, const char* op) {
  TORCH_CHECK(edges.dim() == 2, op, ": edges must be 2-D [R, N], got shape ", edges.sizes());
  TORCH_CHECK(edges.scalar_type() == at::kFloat || edges.scalar_type() == at::kDouble, op,
              ": edges must be float32 or float64, got ", edges.scalar_type());
  TORCH_CHECK(edges.device().is_cpu(), op, ": edges must be on the CPU, got ", edges.device());
  const int64_t R = edges.size(0), N = edges.size(1);
  for (auto [t, name, n] : {std::tuple{&row_mask, "row_mask", R}, std::tuple{&col_mask, "col_mask", N}}) {
    TORCH_CHECK(t->scalar_type() == at::kBool && t->dim() == 1 && t->size(0) == n, op, ": ", name,
                " must be a 1-D bool tensor of ", n, " entries, got ", t->scalar_type(), " ", t->sizes());
    TORCH_CHECK(t->device().is_cpu(), op, ": ", name, " must be on the CPU");
  }
  for (auto [t, name] : {std::pair{scale, "scale"}, std::pair{weight, "weight"}}) {
    if (t == nullptr) continue;
    TORCH_CHECK(t->scalar_type() == edges.scalar_type() && t->dim() == 1 && t->size(0) == R, op,
                ": ", name, " must be a 1-D ", edges.scalar_type(), " tensor of R = ", R,
                " entries, got ", t->scalar_type(), " ", t->sizes());
    TORCH_CHECK(t->device().is_cpu(), op, ": ", name, " must be on the CPU");
  }
}

}  // namespace cltrace
