// Helpers shared by the CUDA kernels (csrc/cuda/*.cu): launch sizes, vectorised loads, warp
// reductions, and the index-range checks that give CUDA the same argument validation as the
// CPU ops (csrc/checks.h covers shapes, dtypes and devices; this file covers index values).
//
// Headers are kept light (ATen/core/Tensor.h and per-op headers, c10/cuda) so each .cu
// compiles quickly. c10::cuda::getCurrentCUDAStream is the function that
// at::cuda::getCurrentCUDAStream re-exports; using it here avoids ATen/cuda/CUDAContext.h,
// which pulls in the cuBLAS/cuSPARSE/cuSOLVER headers.
#pragma once
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/aminmax.h>
#include <ATen/ops/cat.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <initializer_list>
#include <vector>

#include "checks.h"

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

// One host sync for all index checks of an op: returns [min_0, max_0, min_1, max_1, ...] on
// the CPU; an empty tensor contributes (0, -1) so that any range accepts it.
inline std::vector<int64_t> index_bounds(std::initializer_list<at::Tensor> idx) {
  std::vector<at::Tensor> parts;
  std::vector<bool> empty;
  for (const auto& t : idx) {
    empty.push_back(t.numel() == 0);
    if (t.numel() == 0) continue;
    auto [mn, mx] = at::aminmax(t);
    parts.push_back(mn.reshape({1}));
    parts.push_back(mx.reshape({1}));
  }
  std::vector<int64_t> out;
  at::Tensor host;
  if (!parts.empty()) host = at::cat(parts).cpu();
  const int64_t* h = parts.empty() ? nullptr : host.data_ptr<int64_t>();
  size_t q = 0;
  for (bool e : empty) {
    if (e) {
      out.push_back(0);
      out.push_back(-1);
    } else {
      out.push_back(h[q]);
      out.push_back(h[q + 1]);
      q += 2;
    }
  }
  return out;
}

// Checks lo..hi (from index_bounds) lies in [0, bound).
inline void check_range(const int64_t* lo_hi, int64_t bound, const char* name, const char* what,
                        const char* op) {
  if (lo_hi[1] < lo_hi[0]) return;  // empty
  TORCH_CHECK(lo_hi[0] >= 0 && lo_hi[1] < bound, op, ": ", name, " has values in [", lo_hi[0],
              ", ", lo_hi[1], "], out of range for ", what, " = ", bound);
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
