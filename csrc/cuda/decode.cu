// CUDA sparse decode (per-layer and cross-layer transcoders) and its backward; mirrors
// csrc/cpu/decode.cpp.
//
// Forward: out[i, :] = sum_{j in row i} acts[j] * W_dec[feat_idx[j], :] over the flattened
// D = n_out * d_model output row; W_dec rows are read in place when each feature's block is
// contiguous, however far apart the rows (a CLT slice w_dec[:, i:, :], csrc/layouts.h).
// One block per (row, column chunk); each thread owns VEC
// consecutive columns (16-byte loads when D and the pointers allow) and walks the row's
// entries in order, accumulating in opmath. Work O(nnz * D), independent of d_sae.
// Backward: grad_acts[j] = <W_dec[feat_idx[j]], grad_out[row_j]> with one warp per entry;
// grad_W_dec[f] = sum_{j: feat_idx[j] = f} acts[j] * grad_out[row_j] after a stable sort of the
// entries by feature: one block per (feature segment, column chunk) writes its decoder row
// once, so there are no atomics, the result is deterministic, and only active rows are written.
// Method: Ameisen et al. 2025, "Circuit Tracing" (transcoder / cross-layer transcoder decoders).
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "checks/decode.h"
#include "cuda/common.cuh"
#include "layouts.h"

namespace cltrace::cuda {
namespace {

constexpr int kThreads = 128;

// Block (row i, column chunk): out[i, c .. c+VEC) = sum_j acts[j] * W[f[j], c .. c+VEC).
// W rows of D elements at f * ld, out [N, D]; VEC > 1 requires D % VEC == 0, ld % VEC == 0
// and aligned W/out.
template <typename scalar_t, int VEC>
__global__ void decode_kernel(const int64_t* __restrict__ off, const int64_t* __restrict__ f,
                              const scalar_t* __restrict__ a, const scalar_t* __restrict__ W,
                              int64_t ld, int64_t D, scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t i = blockIdx.x;
  const int64_t c = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * VEC;
  if (c >= D) return;
  acc_t acc[VEC];
#pragma unroll
  for (int q = 0; q < VEC; ++q) acc[q] = 0;
  for (int64_t j = off[i]; j < off[i + 1]; ++j) {
    const acc_t aj = static_cast<acc_t>(a[j]);
    const auto w = load_vec<scalar_t, VEC>(W + f[j] * ld + c);
#pragma unroll
    for (int q = 0; q < VEC; ++q) acc[q] += aj * static_cast<acc_t>(w.v[q]);
  }
  Vec<scalar_t, VEC> o;
#pragma unroll
  for (int q = 0; q < VEC; ++q) o.v[q] = static_cast<scalar_t>(acc[q]);
  *reinterpret_cast<Vec<scalar_t, VEC>*>(out + i * D + c) = o;
}

at::Tensor sparse_decode_cuda(const at::Tensor& row_offsets_, const at::Tensor& feat_idx_,
                              const at::Tensor& acts_, const at::Tensor& W_dec_) {
  const char* op = "sparse_decode";
  check_decode_inputs(row_offsets_, feat_idx_, acts_, W_dec_);
  check_cuda(W_dec_, "W_dec", op);
  c10::cuda::CUDAGuard guard(W_dec_.device());
  const auto ro = row_offsets_.contiguous();
  const auto fi = feat_idx_.contiguous();
  const auto acts = acts_.contiguous();
  const auto W = decoder_row_blocks(W_dec_);  // rows of D elements, ld = W.stride(0) apart
  const int64_t n = ro.size(0) - 1, D = W.size(1) * W.size(2), ld = W.stride(0);
  auto out = at::empty({n, W.size(1), W.size(2)}, W.options());
  if (n == 0 || D == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, W.scalar_type(), "sparse_decode", [&] {
    constexpr int V = vec_size<scalar_t>();
    const bool vec = aligned_rows<scalar_t>(W.data_ptr(), ld, V) &&
                     aligned_rows<scalar_t>(out.data_ptr(), D, V);
    const int v = vec ? V : 1;
    const dim3 grid(n, ceil_div(D, int64_t{kThreads} * v));
    if (vec) {
      decode_kernel<scalar_t, V><<<grid, kThreads, 0, stream()>>>(
          ro.data_ptr<int64_t>(), fi.data_ptr<int64_t>(), acts.data_ptr<scalar_t>(),
          W.data_ptr<scalar_t>(), ld, D, out.data_ptr<scalar_t>());
    } else {
      decode_kernel<scalar_t, 1><<<grid, kThreads, 0, stream()>>>(
          ro.data_ptr<int64_t>(), fi.data_ptr<int64_t>(), acts.data_ptr<scalar_t>(),
          W.data_ptr<scalar_t>(), ld, D, out.data_ptr<scalar_t>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// Warp per entry j: grad_acts[j] = <W[f[j]], grad_out[row_j]> over D. W rows of D elements
// at f * ld, g [N, D].
template <typename scalar_t, int VEC>
__global__ void grad_acts_kernel(const int64_t* __restrict__ off, int64_t n,
                                 const int64_t* __restrict__ f, const scalar_t* __restrict__ W,
                                 int64_t ld, const scalar_t* __restrict__ g, int64_t D,
                                 int64_t nnz, scalar_t* __restrict__ grad_acts) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t j = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (j >= nnz) return;  // whole warp exits together
  const scalar_t* w = W + f[j] * ld;
  const scalar_t* gr = g + row_of(off, n, j) * D;
  acc_t s = 0;
  for (int64_t c = static_cast<int64_t>(lane) * VEC; c < D; c += kWarp * VEC) {
    const auto wv = load_vec<scalar_t, VEC>(w + c);
    const auto gv = load_vec<scalar_t, VEC>(gr + c);
#pragma unroll
    for (int q = 0; q < VEC; ++q) s += static_cast<acc_t>(wv.v[q]) * static_cast<acc_t>(gv.v[q]);
  }
  s = warp_sum(s);
  if (lane == 0) grad_acts[j] = static_cast<scalar_t>(s);
}

// Block (sorted position p, column chunk); only the first position of each feature's segment
// works: grad_W[f, c..c+VEC) = sum over the segment of acts[j] * g[row_j, c..c+VEC).
// sorted_f, perm [nnz]: entries stably sorted by feature. grad_W [d_sae, D] (zero-filled).
template <typename scalar_t, int VEC>
__global__ void grad_w_dec_kernel(const int64_t* __restrict__ off, int64_t n,
                                  const int64_t* __restrict__ sorted_f,
                                  const int64_t* __restrict__ perm, const scalar_t* __restrict__ a,
                                  const scalar_t* __restrict__ g, int64_t D, int64_t nnz,
                                  scalar_t* __restrict__ grad_W) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t p0 = blockIdx.x;
  const int64_t feat = sorted_f[p0];
  if (p0 > 0 && sorted_f[p0 - 1] == feat) return;
  const int64_t c = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * VEC;
  if (c >= D) return;
  acc_t acc[VEC];
#pragma unroll
  for (int q = 0; q < VEC; ++q) acc[q] = 0;
  for (int64_t p = p0; p < nnz && sorted_f[p] == feat; ++p) {
    const int64_t j = perm[p];
    const acc_t aj = static_cast<acc_t>(a[j]);
    const auto gv = load_vec<scalar_t, VEC>(g + row_of(off, n, j) * D + c);
#pragma unroll
    for (int q = 0; q < VEC; ++q) acc[q] += aj * static_cast<acc_t>(gv.v[q]);
  }
  Vec<scalar_t, VEC> o;
#pragma unroll
  for (int q = 0; q < VEC; ++q) o.v[q] = static_cast<scalar_t>(acc[q]);
  *reinterpret_cast<Vec<scalar_t, VEC>*>(grad_W + feat * D + c) = o;
}

template <typename scalar_t, int VEC>
void launch_decode_backward(const at::Tensor& ro, const at::Tensor& fi, const at::Tensor& acts,
                            const at::Tensor& W, const at::Tensor& g, at::Tensor& grad_acts,
                            at::Tensor& grad_W) {
  const int64_t n = ro.size(0) - 1, nnz = fi.size(0), D = W.size(1) * W.size(2);
  const int64_t* off = ro.data_ptr<int64_t>();
  constexpr int warps = 8;
  grad_acts_kernel<scalar_t, VEC><<<ceil_div(nnz, warps), warps * kWarp, 0, stream()>>>(
      off, n, fi.data_ptr<int64_t>(), W.data_ptr<scalar_t>(), W.stride(0), g.data_ptr<scalar_t>(),
      D, nnz, grad_acts.data_ptr<scalar_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const auto sorted = at::sort(fi, /*stable=*/true, 0, false);
  const dim3 grid(nnz, ceil_div(D, int64_t{kThreads} * VEC));
  grad_w_dec_kernel<scalar_t, VEC><<<grid, kThreads, 0, stream()>>>(
      off, n, std::get<0>(sorted).data_ptr<int64_t>(), std::get<1>(sorted).data_ptr<int64_t>(),
      acts.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), D, nnz, grad_W.data_ptr<scalar_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> sparse_decode_backward_cuda(
    const at::Tensor& grad_out_, const at::Tensor& row_offsets_, const at::Tensor& feat_idx_,
    const at::Tensor& acts_, const at::Tensor& W_dec_) {
  check_decode_backward_inputs(grad_out_, row_offsets_, feat_idx_, acts_, W_dec_);
  check_cuda(W_dec_, "W_dec", "sparse_decode_backward");
  c10::cuda::CUDAGuard guard(W_dec_.device());
  const auto g = grad_out_.contiguous();
  const auto ro = row_offsets_.contiguous();
  const auto fi = feat_idx_.contiguous();
  const auto acts = acts_.contiguous();
  const auto W = decoder_row_blocks(W_dec_);  // rows of D elements, W.stride(0) apart
  const int64_t nnz = fi.size(0), D = W.size(1) * W.size(2);
  auto grad_acts = at::empty({nnz}, acts.options());
  auto grad_W = at::zeros(W.sizes(), W.options());  // contiguous [d_sae, n_out, d_model]
  if (nnz == 0) return {grad_acts, grad_W};
  if (D == 0) return {grad_acts.zero_(), grad_W};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, W.scalar_type(), "sparse_decode_backward", [&] {
    constexpr int V = vec_size<scalar_t>();
    const bool vec = aligned_rows<scalar_t>(W.data_ptr(), W.stride(0), V) && D % V == 0 &&
                     aligned_rows<scalar_t>(g.data_ptr(), D, V) &&
                     aligned_rows<scalar_t>(grad_W.data_ptr(), D, V);
    if (vec)
      launch_decode_backward<scalar_t, V>(ro, fi, acts, W, g, grad_acts, grad_W);
    else
      launch_decode_backward<scalar_t, 1>(ro, fi, acts, W, g, grad_acts, grad_W);
  });
  return {grad_acts, grad_W};
}

}  // namespace

TORCH_LIBRARY_IMPL(cltrace, CUDA, m) {
  m.impl("sparse_decode", &sparse_decode_cuda);
  m.impl("sparse_decode_backward", &sparse_decode_backward_cuda);
}

}  // namespace cltrace::cuda
