// Helpers shared by the CUDA kernels (csrc/cuda/*.cu): launch sizes, vectorised loads, warp
// reductions, and check_cuda. Argument validation (shapes, dtypes, devices, index values) is
// csrc/checks/<op>.h, the same for CPU and CUDA.
//
// Headers are kept light (ATen/core/Tensor.h and per-op headers, c10/cuda) so each .cu
// compiles quickly. c10::cuda::getCurrentCUDAStream is the function that
// at::cuda::getCurrentCUDAStream re-exports; using it here avoids ATen/cuda/CUDAContext.h,
// which pulls in the cuBLAS/cuSPARSE/cuSOLVER headers.
#pragma once
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>

namespace cltrace::cuda {

constexpr int kWarp = 32;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// All tensors of an op must be on one CUDA device (a CPU tensor mixed in is an error).
inline void check_cuda(const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " is on ", t.device(),
              " but the op runs on CUDA (another argument is on the GPU); move all arguments "
              "to one device");
}

// Elements moved per vector load: 16 bytes.
template <typename scalar_t>
constexpr int vec_size() {
  return static_cast<int>(16 / sizeof(scalar_t)) > 0 ? static_cast<int>(16 / sizeof(scalar_t)) : 1;
}

template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) Vec {
  scalar_t v[VEC];
};

template <typename scalar_t, int VEC>
__device__ __forceinline__ Vec<scalar_t, VEC> load_vec(const scalar_t* p) {
  return *reinterpret_cast<const Vec<scalar_t, VEC>*>(p);
}

// True when every row start base + r * ld (r >= 0) is aligned for VEC-wide loads.
template <typename scalar_t>
inline bool aligned_rows(const void* base, int64_t ld, int vec) {
  return vec > 1 && reinterpret_cast<uintptr_t>(base) % (sizeof(scalar_t) * vec) == 0 &&
         ld % vec == 0;
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Row of CSR entry j: the largest i with off[i] <= j (empty rows are skipped over).
__device__ __forceinline__ int64_t row_of(const int64_t* off, int64_t n_rows, int64_t j) {
  int64_t lo = 0, hi = n_rows;  // off[lo] <= j < off[hi]
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (off[mid] <= j) lo = mid; else hi = mid;
  }
  return lo;
}

}  // namespace cltrace::cuda
