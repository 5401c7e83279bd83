// CUDA sparse encoders (JumpReLU and TopK) and their backward; mirrors csrc/cpu/encode.cpp.
//
// JumpReLU forward never holds the dense [N, d_sae] activations. z = x @ W_enc + b_enc is
// computed one [kRowBlock, kColTile] tile at a time with cuBLAS (at::mm); a kernel (block per
// tile row) counts the kept entries of its row, reserves that many slots in a pool with one
// atomicAdd, and writes (feature, z) in ascending feature order with a block scan. After all
// tiles, the per-(tile, row) counts are scanned into row_offsets and a merge kernel copies the
// segments into the final CSR, tile by tile, so features ascend within a row. The only host
// sync is reading nnz (the pool cursor) to size the output; if the pool (sized for a typical
// L0) overflowed, the tiles are recomputed once with a pool of exactly nnz.
//
// TopK forward takes at::topk of z per row block, as the CPU code does.
//
// Backward (sparse linear layer: grad_x = G W_enc^T, grad_W_enc = x^T G, grad_b_enc = sum G for
// the sparse G [N, d_sae]) touches only the nnz entries: grad_x by rows (block per row), and
// grad_W_enc / grad_b_enc by feature after a stable sort of the entries by feature (no atomics,
// deterministic, only the columns of active features are written).
// Method: Ameisen et al. 2025, "Circuit Tracing" (transcoder encoders), Gemma Scope 2 JumpReLU.
#include <ATen/Dispatch.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/searchsorted.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/topk.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "checks/encode.h"
#include "cuda/common.cuh"
#include "encoder_backward.h"
#include "topk_blocks.h"

namespace cltrace::cuda {
namespace {

constexpr int64_t kRowBlock = 1024;
constexpr int64_t kColTile = 16384;
constexpr int kScanThreads = 256;

// One block per row of a z tile [rows, cols]: count z > keep, reserve a pool segment, then
// compact the kept (feature, z) pairs into it in ascending column order.
// counts, seg_start: [n_tiles, N] (this tile's column written at rows row0 .. row0 + rows).
template <typename scalar_t>
__global__ void compact_tile_kernel(const scalar_t* __restrict__ z, int64_t cols,
                                    const scalar_t* __restrict__ keep, int64_t c0, int64_t row0,
                                    int64_t tile_base, int64_t* __restrict__ counts,
                                    int64_t* __restrict__ seg_start,
                                    unsigned long long* __restrict__ cursor,
                                    int32_t* __restrict__ pool_feat, scalar_t* __restrict__ pool_z,
                                    int64_t capacity) {
  using acc_t = at::opmath_type<scalar_t>;
  using Reduce = cub::BlockReduce<int, kScanThreads>;
  using Scan = cub::BlockScan<int, kScanThreads>;
  __shared__ union {
    typename Reduce::TempStorage reduce;
    typename Scan::TempStorage scan;
  } tmp;
  __shared__ long long base;
  __shared__ int total;
  const int64_t r = blockIdx.x;
  const scalar_t* zr = z + r * cols;
  int cnt = 0;
  for (int64_t c = threadIdx.x; c < cols; c += kScanThreads)
    cnt += static_cast<acc_t>(zr[c]) > static_cast<acc_t>(keep[c0 + c]);
  const int sum = Reduce(tmp.reduce).Sum(cnt);  // valid in thread 0 only
  if (threadIdx.x == 0) {
    total = sum;
    base = static_cast<long long>(atomicAdd(cursor, static_cast<unsigned long long>(sum)));
    counts[tile_base + row0 + r] = total;
    seg_start[tile_base + row0 + r] = base;
  }
  __syncthreads();
  if (base + total > capacity) return;  // pool overflow: counted only, the host recomputes
  int64_t w = base;
  for (int64_t cc = 0; cc < cols; cc += kScanThreads) {
    const int64_t c = cc + threadIdx.x;
    const bool flag = c < cols && static_cast<acc_t>(zr[c]) > static_cast<acc_t>(keep[c0 + c]);
    int prefix, chunk_total;
    Scan(tmp.scan).ExclusiveSum(static_cast<int>(flag), prefix, chunk_total);
    if (flag) {
      pool_feat[w + prefix] = static_cast<int32_t>(c0 + c);
      pool_z[w + prefix] = zr[c];
    }
    w += chunk_total;
    __syncthreads();  // temp storage is reused by the next chunk
  }
}

// Block (row, tile): copy the pool segment of (tile, row) to its place in the final CSR.
// out position = row_offsets[row] + tile_off[tile, row]; acts = z * (z > threshold).
template <typename scalar_t>
__global__ void merge_tiles_kernel(int64_t n, const int64_t* __restrict__ row_offsets,
                                   const int64_t* __restrict__ tile_off,
                                   const int64_t* __restrict__ counts,
                                   const int64_t* __restrict__ seg_start,
                                   const int32_t* __restrict__ pool_feat,
                                   const scalar_t* __restrict__ pool_z,
                                   const scalar_t* __restrict__ thr, int64_t* __restrict__ feat_idx,
                                   scalar_t* __restrict__ acts, scalar_t* __restrict__ pre) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t row = blockIdx.x, q = static_cast<int64_t>(blockIdx.y) * n + row;
  const int64_t cnt = counts[q], src = seg_start[q], dst = row_offsets[row] + tile_off[q];
  for (int64_t e = threadIdx.x; e < cnt; e += blockDim.x) {
    const int64_t f = pool_feat[src + e];
    const scalar_t zv = pool_z[src + e];
    feat_idx[dst + e] = f;
    pre[dst + e] = zv;
    acts[dst + e] = static_cast<acc_t>(zv) > static_cast<acc_t>(thr[f]) ? zv : scalar_t(0);
  }
}

// Runs every z tile through compact_tile_kernel; returns nnz (one host sync).
template <typename scalar_t>
int64_t scan_tiles(const at::Tensor& x, const at::Tensor& W_enc, const at::Tensor& b_enc,
                   const at::Tensor& keep, at::Tensor& counts, at::Tensor& seg_start,
                   at::Tensor& pool_feat, at::Tensor& pool_z) {
  const int64_t n = x.size(0), d_sae = W_enc.size(1);
  auto cursor = at::zeros({1}, x.options().dtype(at::kLong));
  const int64_t capacity = pool_z.size(0);
  for (int64_t r0 = 0; r0 < n; r0 += kRowBlock) {
    const int64_t rows = std::min(kRowBlock, n - r0);
    const auto x_blk = x.narrow(0, r0, rows);
    for (int64_t t = 0, c0 = 0; c0 < d_sae; ++t, c0 += kColTile) {
      const int64_t cols = std::min(kColTile, d_sae - c0);
      auto z = at::mm(x_blk, W_enc.narrow(1, c0, cols));  // [rows, cols]
      z.add_(b_enc.narrow(0, c0, cols));
      compact_tile_kernel<scalar_t><<<rows, kScanThreads, 0, stream()>>>(
          z.data_ptr<scalar_t>(), cols, keep.data_ptr<scalar_t>(), c0, r0, t * n,
          counts.data_ptr<int64_t>(), seg_start.data_ptr<int64_t>(),
          reinterpret_cast<unsigned long long*>(cursor.data_ptr<int64_t>()),
          pool_feat.data_ptr<int32_t>(), pool_z.data_ptr<scalar_t>(), capacity);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
  return cursor.item<int64_t>();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> jumprelu_encode_cuda(
    const at::Tensor& x_, const at::Tensor& W_enc_, const at::Tensor& b_enc_,
    const at::Tensor& threshold_, double bandwidth) {
  const char* op = "jumprelu_encode";
  check_jumprelu_encode_inputs(x_, W_enc_, b_enc_, threshold_, bandwidth);
  check_cuda(x_, "x", op);
  // A limit of this implementation (int32 feature ids in the pool), not of the op.
  TORCH_CHECK(W_enc_.size(1) < (int64_t{1} << 31), op, ": d_sae must be < 2^31 on CUDA");
  c10::cuda::CUDAGuard guard(x_.device());
  const auto x = x_.contiguous();
  const auto& W_enc = W_enc_;  // at::mm takes any strides (e.g. a transposed [d_sae, d_in])
  const auto& b_enc = b_enc_;
  const auto threshold = threshold_.contiguous();
  const int64_t n = x.size(0), d_sae = W_enc.size(1);
  const int64_t n_tiles = ceil_div(d_sae, kColTile);
  // Entries kept for backward: z > threshold - bandwidth/2 (in the data's dtype, as the CPU op).
  const auto keep = bandwidth > 0 ? threshold.sub(bandwidth / 2).contiguous() : threshold;
  const auto lopts = x.options().dtype(at::kLong);
  auto counts = at::zeros({n_tiles, n}, lopts);
  auto seg_start = at::zeros({n_tiles, n}, lopts);
  // Pool sized for an average L0 of 512 (entries beyond it trigger one exact recomputation).
  int64_t capacity = std::min(n * d_sae, n * 512 + 65536);
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "jumprelu_encode", [&] {
    auto pool_feat = at::empty({capacity}, x.options().dtype(at::kInt));
    auto pool_z = at::empty({capacity}, x.options());
    int64_t nnz = scan_tiles<scalar_t>(x, W_enc, b_enc, keep, counts, seg_start, pool_feat, pool_z);
    if (nnz > capacity) {
      capacity = nnz;
      pool_feat = at::empty({capacity}, x.options().dtype(at::kInt));
      pool_z = at::empty({capacity}, x.options());
      nnz = scan_tiles<scalar_t>(x, W_enc, b_enc, keep, counts, seg_start, pool_feat, pool_z);
    }
    auto row_offsets = at::zeros({n + 1}, lopts);
    if (n > 0) row_offsets.narrow(0, 1, n).copy_(at::cumsum(counts.sum(0), 0));
    const auto tile_off = at::cumsum(counts, 0).sub_(counts);  // [n_tiles, N], exclusive
    auto feat_idx = at::empty({nnz}, lopts);
    auto acts = at::empty({nnz}, x.options());
    auto pre = at::empty({nnz}, x.options());
    if (n > 0 && n_tiles > 0 && nnz > 0) {
      merge_tiles_kernel<scalar_t><<<dim3(n, n_tiles), 128, 0, stream()>>>(
          n, row_offsets.data_ptr<int64_t>(), tile_off.data_ptr<int64_t>(),
          counts.data_ptr<int64_t>(), seg_start.data_ptr<int64_t>(),
          pool_feat.data_ptr<int32_t>(), pool_z.data_ptr<scalar_t>(),
          threshold.data_ptr<scalar_t>(), feat_idx.data_ptr<int64_t>(),
          acts.data_ptr<scalar_t>(), pre.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    result = {row_offsets, feat_idx, acts, pre};
  });
  return result;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_encode_cuda(
    const at::Tensor& x_, const at::Tensor& W_enc, const at::Tensor& b_enc, int64_t k) {
  check_topk_encode_inputs(x_, W_enc, b_enc, k);
  check_cuda(x_, "x", "topk_encode");
  c10::cuda::CUDAGuard guard(x_.device());
  // z blocks of ~64M elements.
  return topk_encode_blocks(x_.contiguous(), W_enc, b_enc, k, int64_t{64} << 20);
}

// grad_x[i, k] = sum_{j in row i} g[j] * W[k, f[j]]. Block per row i, threads over k; the row's
// entries are staged in shared memory. grad_x [N, d_in].
template <typename scalar_t>
__global__ void grad_x_kernel(const int64_t* __restrict__ off, const int64_t* __restrict__ f,
                              const scalar_t* __restrict__ g, const scalar_t* __restrict__ W,
                              int64_t d_in, int64_t d_sae, scalar_t* __restrict__ grad_x) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kStage = 128;
  __shared__ int64_t sf[kStage];
  __shared__ acc_t sg[kStage];
  const int64_t i = blockIdx.x, j0 = off[i], j1 = off[i + 1];
  for (int64_t kb = 0; kb < d_in; kb += blockDim.x) {
    const int64_t k = kb + threadIdx.x;
    acc_t s = 0;
    for (int64_t js = j0; js < j1; js += kStage) {
      const int m = static_cast<int>(j1 - js < kStage ? j1 - js : kStage);
      __syncthreads();
      for (int q = threadIdx.x; q < m; q += blockDim.x) {
        sf[q] = f[js + q];
        sg[q] = static_cast<acc_t>(g[js + q]);
      }
      __syncthreads();
      if (k < d_in)
        for (int q = 0; q < m; ++q) s += sg[q] * static_cast<acc_t>(W[k * d_sae + sf[q]]);
    }
    if (k < d_in) grad_x[i * d_in + k] = static_cast<scalar_t>(s);
  }
}

// Per active feature f (entries sorted by feature: perm, col_off [d_sae+1]):
// grad_W[k, f] = sum_j x[row_j, k] * g[j], grad_b[f] = sum_j g[j]. Threads x over 32
// consecutive features (coalesced writes), y over k. grad_W was zero-filled.
template <typename scalar_t>
__global__ void grad_w_kernel(const int64_t* __restrict__ col_off, const int64_t* __restrict__ perm,
                              const int64_t* __restrict__ rows, const scalar_t* __restrict__ g,
                              const scalar_t* __restrict__ x, int64_t d_in, int64_t d_sae,
                              scalar_t* __restrict__ grad_W, scalar_t* __restrict__ grad_b) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t fidx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (fidx >= d_sae) return;
  const int64_t p0 = col_off[fidx], p1 = col_off[fidx + 1];
  if (p0 == p1) return;
  if (threadIdx.y == 0 && blockIdx.y == 0) {
    acc_t sb = 0;
    for (int64_t p = p0; p < p1; ++p) sb += static_cast<acc_t>(g[perm[p]]);
    grad_b[fidx] = static_cast<scalar_t>(sb);
  }
  const int64_t k_step = static_cast<int64_t>(blockDim.y) * gridDim.y;
  for (int64_t k = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; k < d_in; k += k_step) {
    acc_t s = 0;
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t j = perm[p];
      s += static_cast<acc_t>(x[rows[j] * d_in + k]) * static_cast<acc_t>(g[j]);
    }
    grad_W[k * d_sae + fidx] = static_cast<scalar_t>(s);
  }
}

// Row of every CSR entry: rows [nnz]. Block per row.
__global__ void rows_kernel(const int64_t* __restrict__ off, int64_t* __restrict__ rows) {
  const int64_t i = blockIdx.x;
  for (int64_t j = off[i] + threadIdx.x; j < off[i + 1]; j += blockDim.x) rows[j] = i;
}

// grad_x = G @ W_enc^T, grad_W_enc = x^T @ G, grad_b_enc = G.sum(0) for the sparse G given by
// (row_offsets, feat_idx, grad_z). Inputs already validated and on one device.
std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_linear_backward(
    const at::Tensor& grad_z_, const at::Tensor& x_, const at::Tensor& W_enc_,
    const at::Tensor& row_offsets_, const at::Tensor& feat_idx_) {
  const auto grad_z = grad_z_.contiguous();
  const auto x = x_.contiguous();
  const auto W = W_enc_.contiguous();
  const auto ro = row_offsets_.contiguous();
  const auto fi = feat_idx_.contiguous();
  const int64_t n = x.size(0), d_in = x.size(1), d_sae = W.size(1), nnz = fi.size(0);
  auto grad_x = at::empty({n, d_in}, x.options());
  auto grad_W = at::zeros({d_in, d_sae}, x.options());
  auto grad_b = at::zeros({d_sae}, x.options());
  if (n == 0) return {grad_x, grad_W, grad_b};  // then nnz == 0 (row_offsets == [0])
  // Entries sorted by feature (stable: row order kept within a feature, as the CPU sums).
  const auto sorted = at::sort(fi, /*stable=*/true, 0, false);
  const at::Tensor& sorted_f = std::get<0>(sorted);
  const at::Tensor& perm = std::get<1>(sorted);
  const auto col_off = at::searchsorted(sorted_f, at::arange(d_sae + 1, fi.options()));
  auto rows = at::empty({nnz}, fi.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "sparse_linear_backward", [&] {
    if (nnz > 0) {
      rows_kernel<<<n, 128, 0, stream()>>>(ro.data_ptr<int64_t>(), rows.data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (d_in > 0) {
      grad_x_kernel<scalar_t><<<n, 128, 0, stream()>>>(
          ro.data_ptr<int64_t>(), fi.data_ptr<int64_t>(), grad_z.data_ptr<scalar_t>(),
          W.data_ptr<scalar_t>(), d_in, d_sae, grad_x.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (nnz > 0 && d_sae > 0) {
      const dim3 threads(32, 8);
      // y-blocks split d_in (at least one, which also sums grad_b when d_in == 0).
      const int64_t k_blocks = std::max<int64_t>(1, std::min<int64_t>(ceil_div(d_in, 8), 16));
      const dim3 blocks(ceil_div(d_sae, 32), k_blocks);
      grad_w_kernel<scalar_t><<<blocks, threads, 0, stream()>>>(
          col_off.data_ptr<int64_t>(), perm.data_ptr<int64_t>(), rows.data_ptr<int64_t>(),
          grad_z.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), d_in, d_sae,
          grad_W.data_ptr<scalar_t>(), grad_b.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {grad_x, grad_W, grad_b};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> jumprelu_encode_backward_cuda(
    const at::Tensor& grad_acts, const at::Tensor& x, const at::Tensor& W_enc,
    const at::Tensor& threshold, const at::Tensor& row_offsets, const at::Tensor& feat_idx,
    const at::Tensor& pre_acts, double bandwidth) {
  check_jumprelu_backward_inputs(grad_acts, x, W_enc, threshold, row_offsets, feat_idx, pre_acts,
                                 bandwidth);
  check_cuda(x, "x", "jumprelu_encode_backward");
  c10::cuda::CUDAGuard guard(x.device());
  return jumprelu_backward(grad_acts, x, W_enc, threshold, row_offsets, feat_idx, pre_acts,
                           bandwidth, sparse_linear_backward);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_encode_backward_cuda(
    const at::Tensor& grad_acts, const at::Tensor& x, const at::Tensor& W_enc,
    const at::Tensor& row_offsets, const at::Tensor& feat_idx, const at::Tensor& acts) {
  check_topk_backward_inputs(grad_acts, x, W_enc, row_offsets, feat_idx, acts);
  check_cuda(x, "x", "topk_encode_backward");
  c10::cuda::CUDAGuard guard(x.device());
  return topk_backward(grad_acts, x, W_enc, row_offsets, feat_idx, acts, sparse_linear_backward);
}

}  // namespace

TORCH_LIBRARY_IMPL(cltrace, CUDA, m) {
  m.impl("jumprelu_encode", &jumprelu_encode_cuda);
  m.impl("jumprelu_encode_backward", &jumprelu_encode_backward_cuda);
  m.impl("topk_encode", &topk_encode_cuda);
  m.impl("topk_encode_backward", &topk_encode_backward_cuda);
}

}  // namespace cltrace::cuda
