// CUDA attribution contraction and encoder-column gather (the hot path of graph building);
// mirrors csrc/cpu/contract.cpp.
//
// edges[b, s] = acts[s] * <W_dec[feat_idx[s]], grad[b, pos[s]]>: one block per source s
// loads its decoder row once into shared memory (16-byte loads where aligned), then its warps
// loop over the B targets, each a coalesced dot against grad[b, pos[s]] reduced with shuffles.
// Decoder bytes are read once per batch of targets (S * d_model); grad rows at one position
// are shared by the sources there and stay in L2 (sources come in position order from the
// CSR). Both are read in place (csrc/layouts.h): grad strided over (b, pos) -- attribution
// passes the transposed view [k, n, d] of its position-major [n, k, d] gradient, so the B
// rows a block reads at one position are adjacent -- and W_dec rows strided (a CLT slice
// W_dec[:, o, :]); only unit stride within a row is needed.
//
// gather_columns: out[t, :] = W_enc[:, feat_idx[t]] through a 32x32 shared-memory transpose,
// so the writes of out are coalesced.
// Method: Ameisen et al. 2025, "Circuit Tracing" (edge weights = activation x gradient).
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "checks/contract.h"
#include "cuda/common.cuh"
#include "layouts.h"

namespace cltrace::cuda {
namespace {

constexpr int64_t kMaxSmemBytes = 48 * 1024;

// Block per source s; warps over targets b. grad [B, n_pos, d] with row b, pos p at
// b * sb + p * sp; W rows at f * ld; edges [B, S].
// SMEM: cache the decoder row in shared memory (d * sizeof(scalar_t) bytes, dynamic).
// VEC > 1 requires d, sb, sp and ld to be multiples of VEC and aligned grad / W pointers.
template <typename scalar_t, int VEC, bool SMEM>
__global__ void contract_kernel(const scalar_t* __restrict__ grad, int64_t sb, int64_t sp,
                                const int64_t* __restrict__ pos, const scalar_t* __restrict__ W,
                                int64_t ld, const int64_t* __restrict__ f,
                                const scalar_t* __restrict__ a, int64_t B, int64_t d, int64_t S,
                                scalar_t* __restrict__ edges) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vec<scalar_t, VEC>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int64_t s = blockIdx.x;
  const scalar_t* w = W + f[s] * ld;
  if constexpr (SMEM) {
    scalar_t* w_s = reinterpret_cast<scalar_t*>(smem_raw);
    for (int64_t c = static_cast<int64_t>(threadIdx.x) * VEC; c < d; c += blockDim.x * VEC)
      *reinterpret_cast<V*>(w_s + c) = load_vec<scalar_t, VEC>(w + c);
    __syncthreads();
    w = w_s;
  }
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, n_warps = blockDim.x / kWarp;
  const int64_t p = pos[s];
  const acc_t as = static_cast<acc_t>(a[s]);
  for (int64_t b = warp; b < B; b += n_warps) {
    const scalar_t* gr = grad + b * sb + p * sp;
    acc_t sum = 0;
    for (int64_t c = static_cast<int64_t>(lane) * VEC; c < d; c += kWarp * VEC) {
      const V gv = load_vec<scalar_t, VEC>(gr + c);
      const V wv = load_vec<scalar_t, VEC>(w + c);
#pragma unroll
      for (int q = 0; q < VEC; ++q) sum += static_cast<acc_t>(wv.v[q]) * static_cast<acc_t>(gv.v[q]);
    }
    sum = warp_sum(sum);
    if (lane == 0) edges[b * S + s] = static_cast<scalar_t>(as * sum);
  }
}

template <typename scalar_t, int VEC, bool SMEM>
void launch_contract_kernel(const at::Tensor& grad, const at::Tensor& pos, const at::Tensor& W,
                            const at::Tensor& fi, const at::Tensor& acts, at::Tensor& edges) {
  const int64_t B = grad.size(0), d = grad.size(2), S = fi.size(0);
  const int threads = static_cast<int>(std::min<int64_t>(8, B)) * kWarp;
  const size_t smem = SMEM ? d * sizeof(scalar_t) : 0;
  contract_kernel<scalar_t, VEC, SMEM><<<S, threads, smem, stream()>>>(
      grad.data_ptr<scalar_t>(), grad.stride(0), grad.stride(1), pos.data_ptr<int64_t>(),
      W.data_ptr<scalar_t>(), W.stride(0), fi.data_ptr<int64_t>(), acts.data_ptr<scalar_t>(), B,
      d, S, edges.data_ptr<scalar_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The decoder row goes to shared memory when it fits in the default 48 KiB.
template <typename scalar_t, int VEC>
void launch_contract(const at::Tensor& grad, const at::Tensor& pos, const at::Tensor& W,
                     const at::Tensor& fi, const at::Tensor& acts, at::Tensor& edges) {
  if (grad.size(2) * static_cast<int64_t>(sizeof(scalar_t)) <= kMaxSmemBytes)
    launch_contract_kernel<scalar_t, VEC, true>(grad, pos, W, fi, acts, edges);
  else
    launch_contract_kernel<scalar_t, VEC, false>(grad, pos, W, fi, acts, edges);
}

at::Tensor attribution_contract_cuda(const at::Tensor& grad_, const at::Tensor& pos_,
                                     const at::Tensor& W_dec_, const at::Tensor& feat_idx_,
                                     const at::Tensor& acts_) {
  check_contract_inputs(grad_, pos_, W_dec_, feat_idx_, acts_);
  check_cuda(grad_, "grad", "attribution_contract");
  c10::cuda::CUDAGuard guard(grad_.device());
  const auto grad = unit_row_stride(grad_);  // read in place: strided over (b, pos)
  const auto pos = pos_.contiguous();
  const auto fi = feat_idx_.contiguous();
  const auto acts = acts_.contiguous();
  const auto W = unit_row_stride(W_dec_);  // rows may be strided (a CLT slice W_dec[:, o, :])
  const int64_t B = grad.size(0), d = grad.size(2), S = fi.size(0);
  auto edges = at::empty({B, S}, grad.options());
  if (B == 0 || S == 0) return edges;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "attribution_contract", [&] {
    constexpr int V = vec_size<scalar_t>();
    const bool vec = aligned_rows<scalar_t>(grad.data_ptr(), grad.stride(0), V) &&
                     aligned_rows<scalar_t>(grad.data_ptr(), grad.stride(1), V) &&
                     aligned_rows<scalar_t>(W.data_ptr(), W.stride(0), V) && d % V == 0;
    if (vec)
      launch_contract<scalar_t, V>(grad, pos, W, fi, acts, edges);
    else
      launch_contract<scalar_t, 1>(grad, pos, W, fi, acts, edges);
  });
  return edges;
}

// Block (32 targets t, 32 input dims k): read W[k, f[t]] into a tile, write out[t, k] coalesced.
// W [d_in, d_sae] with strides (s0, s1), out [T, d_in].
template <typename scalar_t>
__global__ void gather_columns_kernel(const scalar_t* __restrict__ W, const int64_t* __restrict__ f,
                                      int64_t d_in, int64_t s0, int64_t s1, int64_t T,
                                      scalar_t* __restrict__ out) {
  __shared__ scalar_t tile[32][33];
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * 32, k0 = static_cast<int64_t>(blockIdx.y) * 32;
  const int tx = threadIdx.x, ty = threadIdx.y;
  if (t0 + tx < T) {
    const int64_t ft = f[t0 + tx];
    for (int kk = ty; kk < 32; kk += blockDim.y)
      if (k0 + kk < d_in) tile[kk][tx] = W[(k0 + kk) * s0 + ft * s1];
  }
  __syncthreads();
  for (int tt = ty; tt < 32; tt += blockDim.y)
    if (t0 + tt < T && k0 + tx < d_in) out[(t0 + tt) * d_in + k0 + tx] = tile[tx][tt];
}

at::Tensor gather_columns_cuda(const at::Tensor& W_enc_, const at::Tensor& feat_idx_) {
  check_gather_inputs(W_enc_, feat_idx_);
  check_cuda(W_enc_, "W_enc", "gather_columns");
  c10::cuda::CUDAGuard guard(W_enc_.device());
  const auto& W = W_enc_;  // any strides (a transposed circuit-tracer W_enc is read in place)
  const auto fi = feat_idx_.contiguous();
  const int64_t d_in = W.size(0), T = fi.size(0);
  auto out = at::empty({T, d_in}, W.options());
  if (T == 0 || d_in == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, W.scalar_type(), "gather_columns", [&] {
    const dim3 grid(ceil_div(T, 32), ceil_div(d_in, 32));
    gather_columns_kernel<scalar_t><<<grid, dim3(32, 8), 0, stream()>>>(
        W.data_ptr<scalar_t>(), fi.data_ptr<int64_t>(), d_in, W.stride(0), W.stride(1), T,
        out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(cltrace, CUDA, m) {
  m.impl("attribution_contract", &attribution_contract_cuda);
  m.impl("gather_columns", &gather_columns_cuda);
}

}  // namespace cltrace::cuda
