// Input validation shared by the CPU and CUDA implementations: every op checks its
// arguments here first, so both devices reject bad input with the same message.
#pragma once
#include <ATen/core/Tensor.h>

namespace cltrace {

inline void check_floating(const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name,
              " must be a floating tensor (float32, float64, bfloat16 or float16), got ",
              t.scalar_type());
}

inline void check_same(const at::Tensor& t, const at::Tensor& ref, const char* name,
                       const char* ref_name, const char* op) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ",
              t.scalar_type(), " but ", ref_name, " has ", ref.scalar_type(),
              "; convert them to one dtype");
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ",
              ref_name, " is on ", ref.device());
}

inline void check_index(const at::Tensor& t, const at::Tensor& ref, const char* name,
                        const char* op) {
  TORCH_CHECK(t.scalar_type() == at::kLong, op, ": ", name, " must be int64, got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 1, op, ": ", name, " must be 1-D, got shape ", t.sizes());
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(),
              " but the data is on ", ref.device());
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name, const char* op) {
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must be ", dim, "-D, got shape ", t.sizes());
}

// x [N, d_in], W_enc [d_in, d_sae], b_enc [d_sae] (and threshold [d_sae] when defined).
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

// row_offsets [N+1], feat_idx [nnz], values [nnz] describing a CSR over N rows.
inline void check_csr(const at::Tensor& row_offsets, const at::Tensor& feat_idx,
                      const at::Tensor& values, int64_t n_rows, const char* values_name,
                      const char* op) {
  check_index(row_offsets, values, "row_offsets", op);
  check_index(feat_idx, values, "feat_idx", op);
  check_dim(values, 1, values_name, op);
  if (n_rows >= 0) {
    TORCH_CHECK(row_offsets.size(0) == n_rows + 1, op, ": row_offsets must have N + 1 = ",
                n_rows + 1, " entries, got ", row_offsets.size(0));
  } else {
    TORCH_CHECK(row_offsets.size(0) >= 1, op, ": row_offsets must have N + 1 >= 1 entries");
  }
  TORCH_CHECK(feat_idx.size(0) == values.size(0), op, ": feat_idx has ", feat_idx.size(0),
              " entries but ", values_name, " has ", values.size(0));
}

// attribution_contract: grad [B, n_pos, d_model], pos / feat_idx / acts [S], W_dec [n_rows,
// d_model]. Shapes, dtypes and devices; each device checks the index values itself.
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
}

// gather_columns: W_enc [d_in, d_sae] (any strides), feat_idx [T].
inline void check_gather_inputs(const at::Tensor& W_enc, const at::Tensor& feat_idx) {
  const char* op = "gather_columns";
  check_floating(W_enc, "W_enc", op);
  check_dim(W_enc, 2, "W_enc [d_in, d_sae]", op);
  check_index(feat_idx, W_enc, "feat_idx", op);
}

// sparse_decode(_backward): CSR (row_offsets, feat_idx, acts) and W_dec [d_sae, n_out, d_model].
inline void check_decode_inputs(const at::Tensor& row_offsets, const at::Tensor& feat_idx,
                                const at::Tensor& acts, const at::Tensor& W_dec, const char* op) {
  check_floating(W_dec, "W_dec", op);
  check_dim(W_dec, 3, "W_dec [d_sae, n_out, d_model]", op);
  check_same(acts, W_dec, "acts", "W_dec", op);
  check_csr(row_offsets, feat_idx, acts, -1, "acts", op);
}

// Encoder backward: grad_acts [nnz] over the CSR of x [N, d_in], W_enc [d_in, d_sae].
inline void check_encoder_backward_inputs(const at::Tensor& grad, const at::Tensor& x,
                                          const at::Tensor& W_enc, const at::Tensor& row_offsets,
                                          const at::Tensor& feat_idx, const char* op) {
  check_floating(x, "x", op);
  check_dim(x, 2, "x [N, d_in]", op);
  check_dim(W_enc, 2, "W_enc [d_in, d_sae]", op);
  check_same(W_enc, x, "W_enc", "x", op);
  check_same(grad, x, "grad_acts", "x", op);
  TORCH_CHECK(W_enc.size(0) == x.size(1), op, ": x has d_in = ", x.size(1), " but W_enc is ",
              W_enc.sizes());
  check_csr(row_offsets, feat_idx, grad, x.size(0), "grad_acts", op);
}

// Index values of a CPU CSR: row_offsets start at 0, never decrease and end at nnz; every
// feat_idx lies in [0, n_cols). (CUDA checks the same bounds with one host sync.)
inline void check_csr_values_cpu(const at::Tensor& row_offsets, const at::Tensor& feat_idx,
                                 int64_t n_cols, const char* cols_name, const char* op) {
  const auto ro = row_offsets.contiguous();
  const auto fi = feat_idx.contiguous();
  const int64_t* off = ro.data_ptr<int64_t>();
  const int64_t* f = fi.data_ptr<int64_t>();
  const int64_t n = ro.size(0) - 1, nnz = fi.size(0);
  TORCH_CHECK(off[0] == 0 && off[n] == nnz, op, ": row_offsets must run from 0 to nnz = ", nnz,
              ", got ", off[0], " .. ", off[n]);
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(off[i + 1] >= off[i], op, ": row_offsets decrease at row ", i);
  for (int64_t j = 0; j < nnz; ++j)
    TORCH_CHECK(f[j] >= 0 && f[j] < n_cols, op, ": feat_idx[", j, "] = ", f[j],
                " is out of range for ", cols_name, " = ", n_cols);
}

}  // namespace cltrace
