// CPU sparse encoders (JumpReLU and TopK) and their backward.
//
// Forward: x @ W_enc is computed tile by tile ([kRowBlock, kColTile] with BLAS, into one
// reused buffer), each tile is scanned (adding b_enc on the fly) for the kept entries, so
// memory is O(tile + N * L0)
// instead of O(N * d_sae). Backward touches only the sparse entries: grad_x and grad_W_enc
// are computed together, parallel over rows of W_enc so each thread streams its own rows.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "checks/encode.h"
#include "encoder_backward.h"
#include "topk_blocks.h"
#include "cpu/vec.h"

namespace cltrace::cpu {
namespace {

constexpr int64_t kRowBlock = 1024;  // [1024, 4096] tiles: as fast as one big mm here
constexpr int64_t kColTile = 4096;  // (256 x 8192 was ~15% slower at d_model 2304)
constexpr int64_t kTileElems = kRowBlock * kColTile;  // few rows -> wider tiles, same bound

// Per-row lists of (feature, z) found while scanning tiles.
template <typename scalar_t>
struct RowLists {
  std::vector<std::vector<int64_t>> feats;
  std::vector<std::vector<scalar_t>> z;
  explicit RowLists(int64_t n) : feats(n), z(n) {}
};

// Concatenate per-row lists into CSR; acts = z * (z > threshold).
template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lists_to_csr(
    RowLists<scalar_t>& lists, const scalar_t* thr, const at::TensorOptions& opts) {
  const int64_t n = static_cast<int64_t>(lists.feats.size());
  auto row_offsets = at::empty({n + 1}, opts.dtype(at::kLong));
  int64_t* off = row_offsets.data_ptr<int64_t>();
  off[0] = 0;
  for (int64_t i = 0; i < n; ++i) off[i + 1] = off[i] + static_cast<int64_t>(lists.feats[i].size());
  const int64_t nnz = off[n];
  auto feat_idx = at::empty({nnz}, opts.dtype(at::kLong));
  auto acts = at::empty({nnz}, opts);
  auto pre = at::empty({nnz}, opts);
  int64_t* fi = feat_idx.data_ptr<int64_t>();
  scalar_t* a = acts.data_ptr<scalar_t>();
  scalar_t* p = pre.data_ptr<scalar_t>();
  at::parallel_for(0, n, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) {
      int64_t o = off[i];
      for (size_t q = 0; q < lists.feats[i].size(); ++q, ++o) {
        const int64_t f = lists.feats[i][q];
        const scalar_t z = lists.z[i][q];
        fi[o] = f;
        p[o] = z;
        a[o] = z > thr[f] ? z : scalar_t(0);
      }
      std::vector<int64_t>().swap(lists.feats[i]);
      std::vector<scalar_t>().swap(lists.z[i]);
    }
  });
  return {row_offsets, feat_idx, acts, pre};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> jumprelu_encode_cpu(
    const at::Tensor& x_, const at::Tensor& W_enc, const at::Tensor& b_enc,
    const at::Tensor& threshold_, double bandwidth) {
  check_jumprelu_encode_inputs(x_, W_enc, b_enc, threshold_, bandwidth);
  const auto x = x_.contiguous();
  const auto threshold = threshold_.contiguous();
  const int64_t n = x.size(0), d_sae = W_enc.size(1);
  // Entries kept for backward: z > threshold - bandwidth/2 (in the data's dtype, as the reference).
  const auto keep_thr = bandwidth > 0 ? (threshold - bandwidth / 2).contiguous() : threshold;
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "jumprelu_encode", [&] {
    RowLists<scalar_t> lists(n);
    const scalar_t* keep = keep_thr.data_ptr<scalar_t>();
    const auto b = b_enc.contiguous();
    const scalar_t* bp = b.data_ptr<scalar_t>();
    // One z buffer for all tiles (no allocation, no page faults per tile); the bias is added
    // in the scan, as z = (x @ W_enc) + b_enc rounded to scalar_t like the reference.
    // With few rows the tile widens (up to kTileElems): fewer, larger BLAS calls and scans.
    const int64_t col_tile = std::max(kColTile, kTileElems / std::max<int64_t>(1, std::min(kRowBlock, n)));
    auto z_buf = at::empty({std::min(kRowBlock, n) * std::min(col_tile, d_sae)}, x.options());
    for (int64_t r0 = 0; r0 < n; r0 += kRowBlock) {
      const int64_t rows = std::min(kRowBlock, n - r0);
      const auto x_blk = x.narrow(0, r0, rows);
      for (int64_t c0 = 0; c0 < d_sae; c0 += col_tile) {
        const int64_t cols = std::min(col_tile, d_sae - c0);
        auto z = z_buf.narrow(0, 0, rows * cols).view({rows, cols});
        at::mm_out(z, x_blk, W_enc.narrow(1, c0, cols));  // [rows, cols]
        const scalar_t* zp = z.data_ptr<scalar_t>();
        at::parallel_for(0, rows, 16, [&](int64_t i0, int64_t i1) {
          for (int64_t i = i0; i < i1; ++i) {
            const scalar_t* zr = zp + i * cols;
            auto& feats = lists.feats[r0 + i];
            auto& zs = lists.z[r0 + i];
            const scalar_t* br = bp + c0;
            const scalar_t* kr = keep + c0;
            // Most 16-wide chunks hold no kept entry (L0 << d_sae): test each chunk with a
            // branch-free (vectorisable) pass, walk only the chunks that hit.
            for (int64_t c = 0; c < cols; c += 16) {
              const int64_t ce = std::min(c + 16, cols);
              bool hit = false;
              for (int64_t q = c; q < ce; ++q)
                hit |= static_cast<scalar_t>(zr[q] + br[q]) > kr[q];
              if (!hit) continue;
              for (int64_t q = c; q < ce; ++q) {
                const scalar_t zq = static_cast<scalar_t>(zr[q] + br[q]);
                if (zq > kr[q]) {
                  feats.push_back(c0 + q);
                  zs.push_back(zq);
                }
              }
            }
          }
        });
      }
    }
    result = lists_to_csr(lists, threshold.data_ptr<scalar_t>(), x.options());
  });
  return result;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_encode_cpu(
    const at::Tensor& x_, const at::Tensor& W_enc, const at::Tensor& b_enc, int64_t k) {
  check_topk_encode_inputs(x_, W_enc, b_enc, k);
  // z blocks of ~16M elements (64 MiB in fp32).
  return topk_encode_blocks(x_.contiguous(), W_enc, b_enc, k, int64_t{16} << 20);
}

// grad_x = G @ W_enc^T, grad_W_enc = x^T @ G, grad_b_enc = G.sum(0) for the sparse G given
// by (row_offsets, feat_idx, grad_z). Parallel over k (rows of W_enc): no write conflicts.
std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_linear_backward(
    const at::Tensor& grad_z_, const at::Tensor& x_, const at::Tensor& W_enc_,
    const at::Tensor& row_offsets_, const at::Tensor& feat_idx_) {
  const auto grad_z = grad_z_.contiguous();
  const auto x = x_.contiguous();
  const auto W = W_enc_.contiguous();
  const auto ro = row_offsets_.contiguous();
  const auto fi = feat_idx_.contiguous();
  const int64_t n = x.size(0), d_in = x.size(1), d_sae = W.size(1);
  auto acc_opts = x.options().dtype(at::toOpMathType(x.scalar_type()));
  auto grad_x = at::zeros({n, d_in}, acc_opts);
  auto grad_W = at::zeros({d_in, d_sae}, acc_opts);
  auto grad_b = at::zeros({d_sae}, acc_opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "sparse_linear_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t* off = ro.data_ptr<int64_t>();
    const int64_t* f = fi.data_ptr<int64_t>();
    const scalar_t* g = grad_z.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = W.data_ptr<scalar_t>();
    acc_t* gx = grad_x.data_ptr<acc_t>();
    acc_t* gw = grad_W.data_ptr<acc_t>();
    at::parallel_for(0, d_in, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        const scalar_t* w_row = wp + k * d_sae;
        acc_t* gw_row = gw + k * d_sae;
        for (int64_t i = 0; i < n; ++i) {
          const acc_t xik = static_cast<acc_t>(xp[i * d_in + k]);
          acc_t s = 0;
          for (int64_t j = off[i]; j < off[i + 1]; ++j) {
            const acc_t gj = static_cast<acc_t>(g[j]);
            s += gj * static_cast<acc_t>(w_row[f[j]]);
            gw_row[f[j]] += xik * gj;
          }
          gx[i * d_in + k] = s;
        }
      }
    });
    acc_t* gb = grad_b.data_ptr<acc_t>();
    const int64_t nnz = fi.size(0);
    for (int64_t j = 0; j < nnz; ++j) gb[f[j]] += static_cast<acc_t>(g[j]);
  });
  const auto dt = x.scalar_type();
  return {grad_x.to(dt), grad_W.to(dt), grad_b.to(dt)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> jumprelu_encode_backward_cpu(
    const at::Tensor& grad_acts, const at::Tensor& x, const at::Tensor& W_enc,
    const at::Tensor& threshold, const at::Tensor& row_offsets, const at::Tensor& feat_idx,
    const at::Tensor& pre_acts, double bandwidth) {
  check_jumprelu_backward_inputs(grad_acts, x, W_enc, threshold, row_offsets, feat_idx, pre_acts,
                                 bandwidth);
  return jumprelu_backward(grad_acts, x, W_enc, threshold, row_offsets, feat_idx, pre_acts,
                           bandwidth, sparse_linear_backward);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_encode_backward_cpu(
    const at::Tensor& grad_acts, const at::Tensor& x, const at::Tensor& W_enc,
    const at::Tensor& row_offsets, const at::Tensor& feat_idx, const at::Tensor& acts) {
  check_topk_backward_inputs(grad_acts, x, W_enc, row_offsets, feat_idx, acts);
  return topk_backward(grad_acts, x, W_enc, row_offsets, feat_idx, acts, sparse_linear_backward);
}

}  // namespace

TORCH_LIBRARY_IMPL(cltrace, CPU, m) {
  m.impl("jumprelu_encode", &jumprelu_encode_cpu);
  m.impl("jumprelu_encode_backward", &jumprelu_encode_backward_cpu);
  m.impl("topk_encode", &topk_encode_cpu);
  m.impl("topk_encode_backward", &topk_encode_backward_cpu);
}

}  // namespace cltrace::cpu
