// Input validation shared by the CPU and CUDA implementations: every op checks its
// arguments here first (shapes, dtypes, devices, then index values), so both devices reject
// bad input with the same message. The kernels themselves check nothing.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/cat.h>

#include <initializer_list>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

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

// jumprelu_encode: as check_encode_inputs, and bandwidth >= 0.
inline void check_jumprelu_encode_inputs(const at::Tensor& x, const at::Tensor& W_enc,
                                         const at::Tensor& b_enc, const at::Tensor& threshold,
                                         double bandwidth) {
  const char* op = "jumprelu_encode";
  check_encode_inputs(x, W_enc, b_enc, &threshold, op);
  TORCH_CHECK(bandwidth >= 0, op, ": bandwidth must be >= 0, got ", bandwidth);
}

// topk_encode: as check_encode_inputs, and 1 <= k <= d_sae.
inline void check_topk_encode_inputs(const at::Tensor& x, const at::Tensor& W_enc,
                                     const at::Tensor& b_enc, int64_t k) {
  const char* op = "topk_encode";
  check_encode_inputs(x, W_enc, b_enc, nullptr, op);
  const int64_t d_sae = W_enc.size(1);
  TORCH_CHECK(k >= 1 && k <= d_sae, op, ": k must be in [1, d_sae = ", d_sae, "], got ", k);
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

// ---- index values ------------------------------------------------------------------------
// The kernels index with these values unchecked, so every op checks them here, with the same
// messages on every device. CPU reads the values in place; other devices reduce each index
// tensor to its extremes on the device and copy them to the host in one sync, and locate the
// offending entry (for the message) only when a check fails.

// An index tensor whose values must lie in [0, bound); `what` names the bound in messages,
// e.g. "W_dec with d_sae = 9".
struct IndexBound {
  const at::Tensor& idx;  // [M] int64
  int64_t bound;
  const char* name;
  std::string what;
};

// A CSR's row_offsets [N+1], which must run from 0 to nnz without decreasing.
struct CsrOffsets {
  const at::Tensor& row_offsets;
  int64_t nnz;
};

namespace detail {

[[noreturn]] inline void fail_range(const IndexBound& b, int64_t j, int64_t v, const char* op) {
  TORCH_CHECK(false, op, ": ", b.name, "[", j, "] = ", v, " is out of range for ", b.what);
}

inline void fail_ends(const CsrOffsets& c, int64_t first, int64_t last, const char* op) {
  TORCH_CHECK(first == 0 && last == c.nnz, op, ": row_offsets must run from 0 to nnz = ", c.nnz,
              ", got ", first, " .. ", last);
}

[[noreturn]] inline void fail_decrease(int64_t row, const char* op) {
  TORCH_CHECK(false, op, ": row_offsets decrease at row ", row);
}

inline void check_values_cpu(std::initializer_list<IndexBound> bounds, const CsrOffsets* csr,
                             const char* op) {
  for (const auto& b : bounds) {
    const auto t = b.idx.contiguous();
    const int64_t* p = t.data_ptr<int64_t>();
    for (int64_t j = 0; j < t.numel(); ++j)
      if (p[j] < 0 || p[j] >= b.bound) fail_range(b, j, p[j], op);
  }
  if (csr == nullptr) return;
  const auto ro = csr->row_offsets.contiguous();
  const int64_t* off = ro.data_ptr<int64_t>();
  const int64_t n = ro.numel() - 1;
  fail_ends(*csr, off[0], off[n], op);
  for (int64_t i = 0; i < n; ++i)
    if (off[i + 1] < off[i]) fail_decrease(i, op);
}

// [min, max] of each non-empty bound's values, then (first, last, min step) of the offsets,
// computed on the device and copied to the host together.
inline void check_values_device(std::initializer_list<IndexBound> bounds, const CsrOffsets* csr,
                                const char* op) {
  std::vector<at::Tensor> parts;
  for (const auto& b : bounds) {
    if (b.idx.numel() == 0) continue;
    const auto [mn, mx] = b.idx.aminmax();
    parts.push_back(mn.reshape({1}));
    parts.push_back(mx.reshape({1}));
  }
  const int64_t n = csr ? csr->row_offsets.numel() - 1 : 0;
  if (csr != nullptr) {
    const auto& ro = csr->row_offsets;
    parts.push_back(ro.narrow(0, 0, 1));
    parts.push_back(ro.narrow(0, n, 1));
    if (n > 0) parts.push_back(ro.narrow(0, 1, n).sub(ro.narrow(0, 0, n)).min().reshape({1}));
  }
  if (parts.empty()) return;
  const auto host = at::cat(parts).cpu();
  const int64_t* h = host.data_ptr<int64_t>();
  for (const auto& b : bounds) {
    if (b.idx.numel() == 0) continue;
    if (h[0] < 0 || h[1] >= b.bound) {  // locate the first offending entry for the message
      const auto j = b.idx.lt(0).logical_or_(b.idx.ge(b.bound)).nonzero()[0][0].item<int64_t>();
      fail_range(b, j, b.idx[j].item<int64_t>(), op);
    }
    h += 2;
  }
  if (csr == nullptr) return;
  fail_ends(*csr, h[0], h[1], op);
  if (n > 0 && h[2] < 0) {
    const auto& ro = csr->row_offsets;
    fail_decrease(ro.narrow(0, 1, n).lt(ro.narrow(0, 0, n)).nonzero()[0][0].item<int64_t>(), op);
  }
}

}  // namespace detail

// Every bound, and the CSR offsets when csr is given (shapes already checked).
inline void check_index_values(std::initializer_list<IndexBound> bounds, const CsrOffsets* csr,
                               const char* op) {
  if (bounds.size() == 0 && csr == nullptr) return;
  const bool cpu = bounds.size() ? bounds.begin()->idx.is_cpu() : csr->row_offsets.is_cpu();
  if (cpu)
    detail::check_values_cpu(bounds, csr, op);
  else
    detail::check_values_device(bounds, csr, op);
}

// ---- per op --------------------------------------------------------------------------------

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

// sparse_decode: CSR (row_offsets, feat_idx, acts) over N rows, W_dec [d_sae, n_out, d_model].
inline void check_decode_inputs(const at::Tensor& row_offsets, const at::Tensor& feat_idx,
                                const at::Tensor& acts, const at::Tensor& W_dec, const char* op) {
  check_floating(W_dec, "W_dec", op);
  check_dim(W_dec, 3, "W_dec [d_sae, n_out, d_model]", op);
  check_same(acts, W_dec, "acts", "W_dec", op);
  check_csr(row_offsets, feat_idx, acts, -1, "acts", op);
  const CsrOffsets csr{row_offsets, feat_idx.size(0)};
  check_index_values(
      {{feat_idx, W_dec.size(0), "feat_idx", c10::str("W_dec with d_sae = ", W_dec.size(0))}},
      &csr, op);
}

// sparse_decode_backward: as sparse_decode, and grad_out [N, n_out, d_model].
inline void check_decode_backward_inputs(const at::Tensor& grad_out, const at::Tensor& row_offsets,
                                         const at::Tensor& feat_idx, const at::Tensor& acts,
                                         const at::Tensor& W_dec) {
  const char* op = "sparse_decode_backward";
  check_decode_inputs(row_offsets, feat_idx, acts, W_dec, op);
  check_same(grad_out, W_dec, "grad_out", "W_dec", op);
  const int64_t n = row_offsets.size(0) - 1;
  TORCH_CHECK(grad_out.dim() == 3 && grad_out.size(0) == n && grad_out.size(1) == W_dec.size(1) &&
                  grad_out.size(2) == W_dec.size(2),
              op, ": grad_out must be [N, n_out, d_model] = [", n, ", ", W_dec.size(1), ", ",
              W_dec.size(2), "], got ", grad_out.sizes());
}

// Encoder backward: grad_acts [nnz] over the CSR of x [N, d_in], W_enc [d_in, d_sae], and the
// forward's per-entry values `saved` [nnz] (pre_acts for JumpReLU, acts for TopK).
inline void check_encoder_backward_inputs(const at::Tensor& grad, const at::Tensor& x,
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
  const CsrOffsets csr{row_offsets, feat_idx.size(0)};
  check_index_values(
      {{feat_idx, W_enc.size(1), "feat_idx", c10::str("W_enc with d_sae = ", W_enc.size(1))}},
      &csr, op);
}

// jumprelu_encode_backward: the encoder backward inputs, and threshold [d_sae].
inline void check_jumprelu_backward_inputs(const at::Tensor& grad_acts, const at::Tensor& x,
                                           const at::Tensor& W_enc, const at::Tensor& threshold,
                                           const at::Tensor& row_offsets,
                                           const at::Tensor& feat_idx, const at::Tensor& pre_acts,
                                           double bandwidth) {
  const char* op = "jumprelu_encode_backward";
  check_encoder_backward_inputs(grad_acts, x, W_enc, row_offsets, feat_idx, pre_acts, "pre_acts", op);
  check_same(threshold, x, "threshold", "x", op);
  TORCH_CHECK(threshold.dim() == 1 && threshold.size(0) == W_enc.size(1), op,
              ": threshold must be [d_sae = ", W_enc.size(1), "], got ", threshold.sizes());
  TORCH_CHECK(bandwidth >= 0, op, ": bandwidth must be >= 0, got ", bandwidth);
}

// topk_encode_backward: the encoder backward inputs (acts saved by the forward).
inline void check_topk_backward_inputs(const at::Tensor& grad_acts, const at::Tensor& x,
                                       const at::Tensor& W_enc, const at::Tensor& row_offsets,
                                       const at::Tensor& feat_idx, const at::Tensor& acts) {
  check_encoder_backward_inputs(grad_acts, x, W_enc, row_offsets, feat_idx, acts, "acts",
                                "topk_encode_backward");
}

// Pruning passes (CPU only): edges [R, N] float32/float64, row_mask [R] and col_mask [N] bool,
// and when given, scale and weight [R] of the edges' dtype.
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
