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

// y[k] += a[0] * x[0][k] + a[1] * x[1][k] + a[2] * x[2][k] + a[3] * x[3][k]: four rows per
// pass over y, so y is loaded and stored once per four rows and four independent row streams
// are in flight (memory-level parallelism for the random rows of a sparse decode).
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
inline void axpy4(const acc_t* a, const scalar_t* const* x, acc_t* y, int64_t n) {
  const scalar_t *x0 = x[0], *x1 = x[1], *x2 = x[2], *x3 = x[3];
#pragma omp simd
  for (int64_t k = 0; k < n; ++k)
    y[k] += a[0] * static_cast<acc_t>(x0[k]) + a[1] * static_cast<acc_t>(x1[k]) +
            a[2] * static_cast<acc_t>(x2[k]) + a[3] * static_cast<acc_t>(x3[k]);
}

CLTRACE_MULTIVERSION static void axpy4_f32(const float* a, const float* const* x, float* y,
                                           int64_t n) {
  const float *x0 = x[0], *x1 = x[1], *x2 = x[2], *x3 = x[3];
  const float a0 = a[0], a1 = a[1], a2 = a[2], a3 = a[3];
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) y[k] += a0 * x0[k] + a1 * x1[k] + a2 * x2[k] + a3 * x3[k];
}

template <>
inline void axpy4<float, float>(const float* a, const float* const* x, float* y, int64_t n) {
  axpy4_f32(a, x, y, n);
}

// Ask for the first `bytes` (at most 4 KiB) of a row ahead of its use; the hardware
// prefetcher streams the rest of a long row once it is started.
inline void prefetch_row(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  const int64_t end = bytes < 4096 ? bytes : 4096;
  for (int64_t o = 0; o < end; o += 64) __builtin_prefetch(c + o, 0, 1);
}

}  // namespace cltrace::cpu
