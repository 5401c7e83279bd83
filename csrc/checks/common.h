// Argument checks shared by every op's contract (csrc/checks/<op>.h): dtype, shape and device
// helpers, and the index-value checks with their device policy. Each op's own checks live in
// csrc/checks/<op>.h, included by both csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu, so both devices
// reject bad input with the same message. The kernels themselves check nothing.
//
// What is checked when:
//   * Metadata (dtype, rank, sizes, devices, scalar arguments such as k or bandwidth): always,
//     on every device, on every call. These read only tensor metadata: no device work, no sync.
//   * Index values (feat_idx / pos in range, CSR row_offsets from 0 to nnz, non-decreasing):
//       - CPU: always (a read of the index in place, cheap next to the op);
//       - CUDA: only when value checks are switched on, because they reduce the index on the
//         device and copy the result to the host, a synchronisation on each call (attribution
//         calls the ops once per batch x layer x writing layer). Switch: the environment
//         variable CLTRACE_CHECK_VALUES=1 (read when cltrace._C is loaded), or from Python
//         cltrace.ops.set_check_values(True) / `with cltrace.ops.checking_values(): ...`.
//         With the switch off an out-of-range index on CUDA is undefined behaviour (typically
//         an illegal memory access, reported by a later CUDA call); turn it on to get the same
//         message as on the CPU.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/cat.h>

#include <initializer_list>
#include <string>
#include <vector>

#include "checks/switch.h"

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

// row_offsets [N+1], feat_idx [nnz], values [nnz] describing a CSR over N rows (n_rows < 0:
// any N). Shapes only; the offsets' values are checked by check_index_values.
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
// The kernels index with these values unchecked. The CPU reads the values in place; other
// devices (when the switch is on) reduce each index tensor to its extremes on the device and
// copy them to the host in one sync, and locate the offending entry (for the message) only
// when a check fails. The messages are the same on every device.

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
// computed on the device and copied to the host together: one host synchronisation.
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

// Every bound, and the CSR offsets when csr is given (shapes and devices already checked, so
// all the index tensors are on one device): always on the CPU; on other devices only with
// the switch on (device_value_checks()), as the check costs a host synchronisation there.
inline void check_index_values(std::initializer_list<IndexBound> bounds, const CsrOffsets* csr,
                               const char* op) {
  if (bounds.size() == 0 && csr == nullptr) return;
  const bool cpu = bounds.size() ? bounds.begin()->idx.is_cpu() : csr->row_offsets.is_cpu();
  if (cpu)
    detail::check_values_cpu(bounds, csr, op);
  else if (device_value_checks())
    detail::check_values_device(bounds, csr, op);
}

// A CSR's values: feat_idx < d_sae (the rows of `matrix`, named in the message) and row_offsets
// running from 0 to nnz without decreasing; as check_index_values.
inline void check_csr_values(const at::Tensor& row_offsets, const at::Tensor& feat_idx,
                             int64_t d_sae, const char* matrix, const char* op) {
  const CsrOffsets csr{row_offsets, feat_idx.size(0)};
  check_index_values({{feat_idx, d_sae, "feat_idx", c10::str(matrix, " with d_sae = ", d_sae)}},
                     &csr, op);
}

}  // namespace cltrace
