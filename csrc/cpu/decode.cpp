// CPU sparse decode (per-layer and cross-layer transcoders) and its backward.
//
// Forward: out[i] = sum_{j in row i} acts[j] * W_dec[feat_idx[j]] over the flattened
// n_out * d_model output row, parallel over rows; work O(nnz * n_out * d_model). Decoder
// rows are added four at a time with prefetch; when rows repeat often (nnz >= 2 d_sae) the
// loop is cache-blocked over W_dec so each row is fetched from DRAM about once per tile.
// Backward: grad_acts is a dot per entry (parallel over entries); grad_W_dec is accumulated
// parallel over column slices of the flattened decoder row, so threads never collide even
// when a feature repeats, and only the decoder rows of active features are written.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "checks/decode.h"
#include "cpu/vec.h"
#include "layouts.h"

namespace cltrace::cpu {
namespace {

// Row index of each CSR entry.
std::vector<int64_t> rows_of(const int64_t* off, int64_t n_rows) {
  std::vector<int64_t> rows(off[n_rows]);
  for (int64_t i = 0; i < n_rows; ++i)
    for (int64_t j = off[i]; j < off[i + 1]; ++j) rows[j] = i;
  return rows;
}

// Cache-blocked path: a W_dec block of kBlockBytes meets kTileRows token rows at a time, so
// a decoder row is fetched from DRAM once per tile and reused ~ kTileRows * L0 / d_sae times
// from L3 while the output tile (kTileRows rows) streams through once per block.
constexpr int64_t kBlockBytes = int64_t{8} << 20;
constexpr int64_t kTileRows = 2048;

// acc[0:D] += sum_{j in [j0, j1), lo <= f[j] < hi} a[j] * W[f[j]], four rows per pass
// (axpy4). With pf_end > 0, the decoder row of entry j + 4 (< pf_end) is prefetched.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
void accumulate_entries(const int64_t* f, const scalar_t* a, int64_t j0, int64_t j1, int64_t lo,
                        int64_t hi, int64_t pf_end, const scalar_t* wp, int64_t ld, int64_t D,
                        acc_t* acc) {
  const scalar_t* rows4[4];
  acc_t a4[4];
  int k = 0;
  for (int64_t j = j0; j < j1; ++j) {
    if (f[j] < lo || f[j] >= hi) continue;
    if (j + 4 < pf_end) prefetch_row(wp + f[j + 4] * ld, D * int64_t(sizeof(scalar_t)));
    rows4[k] = wp + f[j] * ld;
    a4[k] = static_cast<acc_t>(a[j]);
    if (++k == 4) {
      axpy4<scalar_t>(a4, rows4, acc, D);
      k = 0;
    }
  }
  for (int q = 0; q < k; ++q) axpy<scalar_t>(a4[q], rows4[q], acc, D);
}

at::Tensor sparse_decode_cpu(const at::Tensor& row_offsets_, const at::Tensor& feat_idx_,
                             const at::Tensor& acts_, const at::Tensor& W_dec_) {
  check_decode_inputs(row_offsets_, feat_idx_, acts_, W_dec_);
  const auto ro = row_offsets_.contiguous();
  const auto fi = feat_idx_.contiguous();
  const auto acts = acts_.contiguous();
  const auto W = decoder_row_blocks(W_dec_);
  const int64_t n = ro.size(0) - 1, d_sae = W.size(0), D = W.size(1) * W.size(2), ld = W.stride(0);
  auto out = at::empty({n, W.size(1), W.size(2)}, W.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, W.scalar_type(), "sparse_decode", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t* off = ro.data_ptr<int64_t>();
    const int64_t* f = fi.data_ptr<int64_t>();
    const scalar_t* a = acts.data_ptr<scalar_t>();
    const scalar_t* wp = W.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t nnz = fi.size(0);
    const int64_t block_rows = std::max<int64_t>(1, kBlockBytes / (D * int64_t(sizeof(scalar_t))));
    // Cache-blocked when decoder rows repeat (nnz >= 2 * d_sae) and fp32/fp64 (accumulate
    // in the output): rows of a tile of tokens meet one L3-sized block of W_dec at a time,
    // so each decoder row comes from DRAM about once per tile instead of once per use.
    const bool blocked = std::is_same_v<scalar_t, acc_t> && nnz >= 2 * d_sae && d_sae > block_rows;
    at::parallel_for(0, n, 1, [&](int64_t i0, int64_t i1) {
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        if (blocked) {
          std::fill(op + i0 * D, op + i1 * D, scalar_t(0));
          for (int64_t t0 = i0; t0 < i1; t0 += kTileRows) {
            const int64_t t1 = std::min(t0 + kTileRows, i1);
            for (int64_t lo = 0; lo < d_sae; lo += block_rows)
              for (int64_t i = t0; i < t1; ++i)
                accumulate_entries<scalar_t>(f, a, off[i], off[i + 1], lo, lo + block_rows, 0,
                                             wp, ld, D, op + i * D);
          }
          return;
        }
      }
      std::vector<acc_t> acc(D);
      for (int64_t i = i0; i < i1; ++i) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        accumulate_entries<scalar_t>(f, a, off[i], off[i + 1], 0, d_sae, nnz, wp, ld, D, acc.data());
        for (int64_t c = 0; c < D; ++c) op[i * D + c] = static_cast<scalar_t>(acc[c]);
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> sparse_decode_backward_cpu(
    const at::Tensor& grad_out_, const at::Tensor& row_offsets_, const at::Tensor& feat_idx_,
    const at::Tensor& acts_, const at::Tensor& W_dec_) {
  check_decode_backward_inputs(grad_out_, row_offsets_, feat_idx_, acts_, W_dec_);
  const int64_t n = row_offsets_.size(0) - 1;
  const auto g = grad_out_.contiguous();
  const auto ro = row_offsets_.contiguous();
  const auto fi = feat_idx_.contiguous();
  const auto acts = acts_.contiguous();
  const auto W = decoder_row_blocks(W_dec_);
  const int64_t nnz = fi.size(0), D = W.size(1) * W.size(2), ld = W.stride(0);
  auto grad_acts = at::empty({nnz}, acts.options());
  auto grad_W = at::zeros(W.sizes(), W.options().dtype(at::toOpMathType(W.scalar_type())));  // contiguous
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, W.scalar_type(), "sparse_decode_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t* off = ro.data_ptr<int64_t>();
    const int64_t* f = fi.data_ptr<int64_t>();
    const auto rows = rows_of(off, n);
    const scalar_t* a = acts.data_ptr<scalar_t>();
    const scalar_t* wp = W.data_ptr<scalar_t>();
    const scalar_t* gp = g.data_ptr<scalar_t>();
    scalar_t* ga = grad_acts.data_ptr<scalar_t>();
    acc_t* gw = grad_W.data_ptr<acc_t>();
    at::parallel_for(0, nnz, 64, [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j)
        ga[j] = static_cast<scalar_t>(dot<scalar_t>(wp + f[j] * ld, gp + rows[j] * D, D));
    });
    // Column slices of at least 64 elements; each thread owns its slice for every entry.
    at::parallel_for(0, D, 64, [&](int64_t c0, int64_t c1) {
      for (int64_t j = 0; j < nnz; ++j)
        axpy<scalar_t>(static_cast<acc_t>(a[j]), gp + rows[j] * D + c0, gw + f[j] * D + c0, c1 - c0);
    });
  });
  return {grad_acts, grad_W.to(W.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(cltrace, CPU, m) {
  m.impl("sparse_decode", &sparse_decode_cpu);
  m.impl("sparse_decode_backward", &sparse_decode_backward_cpu);
}

}  // namespace cltrace::cpu
