// Contracts of attribution_contract and gather_columns (csrc/cpu/contract.cpp and
// csrc/cuda/contract.cu). Metadata is checked on every call; index values always on the CPU
// and on CUDA only with the value-check switch (csrc/checks/common.h).
#pragma once
#include "checks/common.h"

namespace cltrace {

// attribution_contract: grad [B, n_pos, d_model] (any strides), pos / feat_idx / acts [S],
// W_dec [n_rows, d_model] (rows any distance apart); pos < n_pos and feat_idx < n_rows.
inline void check_contract_inputs(const at::Tensor& grad, const at::Tensor& pos,
                                  const at::Tensor& W_dec, const at::Tensor& feat_idx,
                                  const at::Tensor& acts) {
  const char* op = "attribution_contract";
  check_floating(grad, "grad", op);
  check_dim(grad, 3, "grad [B, n_pos, d_model]", op);
  check_dim(W_dec, 2, "W_dec [n_rows, d_model]", op);
  check_same(W_dec, grad, "W_dec", "grad", op);
  check_same(acts, grad, "acts", "grad", op);
  check_index(pos, grad, "pos", op);
  check_index(feat_idx, grad, "feat_idx", op);
  check_dim(acts, 1, "acts [S]", op);
  TORCH_CHECK(W_dec.size(1) == grad.size(2), op, ": grad has d_model = ", grad.size(2),
              " but W_dec rows have ", W_dec.size(1));
  TORCH_CHECK(pos.size(0) == feat_idx.size(0) && acts.size(0) == feat_idx.size(0), op,
              ": pos, feat_idx and acts must have one entry per source, got ", pos.size(0), ", ",
              feat_idx.size(0), " and ", acts.size(0));
  check_index_values(
      {{feat_idx, W_dec.size(0), "feat_idx", c10::str("W_dec with ", W_dec.size(0), " rows")},
       {pos, grad.size(1), "pos", c10::str("grad with n_pos = ", grad.size(1))}},
      nullptr, op);
}

// gather_columns: W_enc [d_in, d_sae] (any strides), feat_idx [T] < d_sae.
inline void check_gather_inputs(const at::Tensor& W_enc, const at::Tensor& feat_idx) {
  const char* op = "gather_columns";
  check_floating(W_enc, "W_enc", op);
  check_dim(W_enc, 2, "W_enc [d_in, d_sae]", op);
  check_index(feat_idx, W_enc, "feat_idx", op);
  check_index_values(
      {{feat_idx, W_enc.size(1), "feat_idx", c10::str("W_enc with d_sae = ", W_enc.size(1))}},
      nullptr, op);
}

}  // namespace cltrace
