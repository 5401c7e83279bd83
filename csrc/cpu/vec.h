// Inner loops of the CPU kernels (dot products and axpy), compiled for AVX-512, AVX2+FMA
// and baseline x86-64 and picked at load time (GCC function multiversioning), so one wheel
// runs everywhere and still uses the wide units where they exist. acc_t is the
// accumulation type (float for fp32/bf16/fp16 inputs, double for fp64).
#pragma once
#include <ATen/OpMathType.h>
#include <cstdint>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CLTRACE_MULTIVERSION \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CLTRACE_MULTIVERSION
#endif

namespace cltrace::cpu {

// sum_k a[k] * b[k], accumulated in acc_t.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
inline acc_t dot(const scalar_t* a, const scalar_t* b, int64_t n) {
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t k = 0; k < n; ++k) s += static_cast<acc_t>(a[k]) * static_cast<acc_t>(b[k]);
  return s;
}

CLTRACE_MULTIVERSION static float dot_f32(const float* a, const float* b, int64_t n) {
  float s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t k = 0; k < n; ++k) s += a[k] * b[k];
  return s;
}

template <>
inline float dot<float, float>(const float* a, const float* b, int64_t n) {
  return dot_f32(a, b, n);
}

// y[k] += alpha * x[k], y in acc_t.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
inline void axpy(acc_t alpha, const scalar_t* x, acc_t* y, int64_t n) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) y[k] += alpha * static_cast<acc_t>(x[k]);
}

CLTRACE_MULTIVERSION static void axpy_f32(float alpha, const float* x, float* y, int64_t n) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) y[k] += alpha * x[k];
}

template <>
inline void axpy<float, float>(float alpha, const float* x, float* y, int64_t n) {
  axpy_f32(alpha, x, y, n);
}

}  // namespace cltrace::cpu
