// CPU passes over an attribution graph's edge rows for pruning and influence
// (python/cltrace/graph/pruning.py, influence.py and scores.py).
//
// Each op reads edges [R, N] once, row by row, computing on the fly what the pure-torch
// version would materialise as whole [R, N] copies (|A|, the normalised rows, the scores, a
// mask). All of them work on the block row_mask x col_mask only; other entries count as 0.
// The normalised edge score of an entry is, in the edges' dtype (rounded after each step,
// as torch computes `edges.abs() / scale[:, None] * weight[:, None]`):
//     s[i, j] = (|edges[i, j]| / scale[i]) * weight[i].
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <tuple>
#include <vector>

#include "checks/prune.h"
#include "cpu/vec.h"

namespace cltrace::cpu {
namespace {

constexpr int64_t kBuckets = 1 << 16;  // histogram buckets (see bucket_of)
constexpr int64_t kColBlock = 2048;    // columns per accumulator block of edge_score_col_sums
constexpr int64_t kRowChunk = 16;      // rows per work item of the histogram and the mask
constexpr int64_t kSegment = 1024;     // scores computed per vectorised step (histogram, mask)
constexpr int64_t kGroup = 16;         // scores per skip test in those steps
constexpr int64_t kLanes = 4;          // interleaved histograms per thread

// Rows kept by row_mask, ascending.
std::vector<int64_t> selected_rows(const at::Tensor& row_mask) {
  const auto m = row_mask.contiguous();
  const bool* p = m.data_ptr<bool>();
  std::vector<int64_t> rows;
  for (int64_t i = 0; i < m.size(0); ++i)
    if (p[i]) rows.push_back(i);
  return rows;
}

// f(thread, c) for every c in [0, n): item c runs on thread c % T of T threads (fixed), so
// that rows of growing density (a causal graph's later layers) are spread evenly and the
// result does not depend on timing.
template <typename F>
void parallel_interleaved(int64_t n, const F& f) {
  const int64_t T = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t c = t; c < n; c += T) f(t, c);
  });
}

// --- inner loops (one row segment), vectorised for AVX-512 / AVX2 / baseline -------------
// The column mask comes in as `keep` [N] of the edges' dtype (1 kept, 0 dropped): multiplying
// by it is exact and keeps the loops free of branches.

template <typename T>
inline double abs_sum(const T* e, const T* keep, int64_t n) {
  double s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) s += static_cast<double>(std::abs(e[j] * keep[j]));
  return s;
}
// s[j] = (|e[j]| / scale) * weight * keep[j] over a row segment, and top[g] = the maximum
// of group g (entries [16 g, 16 g + 16)), so that the scalar loops of the histogram and the
// mask can skip groups without a wanted score (most of the causally masked part of a row).
template <typename T>
inline void scores(const T* __restrict e, const T* __restrict keep, T scale, T weight,
                   T* __restrict s, T* __restrict top, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) s[j] = (std::abs(e[j]) / scale) * weight * keep[j];
  const int64_t full = n / kGroup;
  for (int64_t g = 0; g < full; ++g) {
    T mx = 0;
#pragma omp simd reduction(max : mx)
    for (int64_t j = 0; j < kGroup; ++j) mx = s[g * kGroup + j] > mx ? s[g * kGroup + j] : mx;
    top[g] = mx;
  }
  if (full * kGroup < n) {
    T mx = 0;
    for (int64_t j = full * kGroup; j < n; ++j) mx = s[j] > mx ? s[j] : mx;
    top[full] = mx;
  }
}

// acc[j] += s[j] over a row segment.
template <typename T>
inline void add_scores(const T* e, const T* keep, T scale, T weight, double* acc, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j)
    acc[j] += static_cast<double>((std::abs(e[j]) / scale) * weight * keep[j]);
}

// mask[j] = s[j] >= lo and the column is kept (keep[j] = 1); band[j] = mask[j] and s[j] < hi;
// counts[j] += mask[j]; returns the number of entries in the mask.
template <typename T>
inline int32_t mark_entries(const T* s, const T* keep, T lo, T hi, uint8_t* mask, uint8_t* band,
                            int32_t* counts, int64_t n) {
  int32_t total = 0;
  for (int64_t j = 0; j < n; ++j) {
    const int32_t k = (s[j] >= lo) & (keep[j] != 0);
    mask[j] = static_cast<uint8_t>(k);
    counts[j] += k;
    total += k;
  }
  for (int64_t j = 0; j < n; ++j) band[j] = mask[j] & (s[j] < hi);
  return total;
}

#define CLTRACE_PRUNE_LOOPS(T, sfx)                                                             \
  CLTRACE_MULTIVERSION double abs_sum_##sfx(const T* e, const T* k, int64_t n) {                \
    return abs_sum(e, k, n);                                                                    \
  }                                                                                             \
  CLTRACE_MULTIVERSION void scores_##sfx(const T* e, const T* k, T sc, T w, T* s, T* top,       \
                                         int64_t n) {                                           \
    scores(e, k, sc, w, s, top, n);                                                             \
  }                                                                                             \
  CLTRACE_MULTIVERSION void add_scores_##sfx(const T* e, const T* k, T sc, T w, double* acc,    \
                                             int64_t n) {                                       \
    add_scores(e, k, sc, w, acc, n);                                                            \
  }                                                                                             \
  inline double row_abs_sum(const T* e, const T* k, int64_t n) { return abs_sum_##sfx(e, k, n); } \
  inline void row_scores(const T* e, const T* k, T sc, T w, T* s, T* top, int64_t n) {          \
    scores_##sfx(e, k, sc, w, s, top, n);                                                       \
  }                                                                                             \
  inline void row_add_scores(const T* e, const T* k, T sc, T w, double* acc, int64_t n) {       \
    add_scores_##sfx(e, k, sc, w, acc, n);                                                      \
  }                                                                                             \
  CLTRACE_MULTIVERSION int32_t mark_##sfx(const T* s, const T* k, T lo, T hi, uint8_t* mask,     \
                                          uint8_t* band, int32_t* counts, int64_t n) {          \
    return mark_entries(s, k, lo, hi, mask, band, counts, n);                                   \
  }                                                                                             \
  inline int32_t mark(const T* s, const T* k, T lo, T hi, uint8_t* mask, uint8_t* band,          \
                      int32_t* counts, int64_t n) {                                             \
    return mark_##sfx(s, k, lo, hi, mask, band, counts, n);                                     \
  }
CLTRACE_PRUNE_LOOPS(float, f32)
CLTRACE_PRUNE_LOOPS(double, f64)
#undef CLTRACE_PRUNE_LOOPS

// col_mask as 0/1 of the edges' dtype.
template <typename T>
std::vector<T> keep_of(const at::Tensor& col_mask) {
  const auto m = col_mask.contiguous();
  const bool* p = m.data_ptr<bool>();
  std::vector<T> keep(m.size(0));
  for (int64_t j = 0; j < m.size(0); ++j) keep[j] = p[j] ? T(1) : T(0);
  return keep;
}

// Histogram bucket of a non-negative score: its IEEE bit pattern shifted right by
// (bits - 17), i.e. the exponent and leading mantissa bits below the (zero) sign bit, so
// buckets ascend with the score (the same buckets as cltrace.graph.pruning.find_threshold).
inline int64_t bucket_of(float s) {
  uint32_t b;
  std::memcpy(&b, &s, sizeof b);
  return b >> 15 & (kBuckets - 1);
}
inline int64_t bucket_of(double s) {
  uint64_t b;
  std::memcpy(&b, &s, sizeof b);
  return static_cast<int64_t>(b >> 47 & (kBuckets - 1));
}

// --- ops ---------------------------------------------------------------------------------

// edges with unit column stride (a copy only if the caller passed a transposed view).
at::Tensor row_major(const at::Tensor& edges) {
  return edges.stride(1) == 1 ? edges : edges.contiguous();
}

at::Tensor edge_abs_row_sums_cpu(const at::Tensor& edges_, const at::Tensor& row_mask,
                                 const at::Tensor& col_mask) {
  check_edge_pass_inputs(edges_, nullptr, nullptr, row_mask, col_mask, "edge_abs_row_sums");
  const auto edges = row_major(edges_);
  const int64_t N = edges.size(1), ld = edges.stride(0);
  const auto rows = selected_rows(row_mask);
  auto out = at::zeros({edges.size(0)}, edges.options().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES(edges.scalar_type(), "edge_abs_row_sums", [&] {
    const auto keep = keep_of<scalar_t>(col_mask);
    const scalar_t* e = edges.data_ptr<scalar_t>();
    at::parallel_for(0, static_cast<int64_t>(rows.size()), 1, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) o[rows[r]] = row_abs_sum(e + rows[r] * ld, keep.data(), N);
    });
  });
  return out;
}

at::Tensor edge_score_col_sums_cpu(const at::Tensor& edges_, const at::Tensor& scale_,
                                   const at::Tensor& weight_, const at::Tensor& row_mask,
                                   const at::Tensor& col_mask) {
  check_edge_pass_inputs(edges_, &scale_, &weight_, row_mask, col_mask, "edge_score_col_sums");
  const auto edges = row_major(edges_);
  const auto scale = scale_.contiguous(), weight = weight_.contiguous();
  const int64_t N = edges.size(1), ld = edges.stride(0);
  const auto rows = selected_rows(row_mask);
  auto out = at::zeros({N}, edges.options().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES(edges.scalar_type(), "edge_score_col_sums", [&] {
    const auto keep = keep_of<scalar_t>(col_mask);
    const scalar_t* e = edges.data_ptr<scalar_t>();
    const scalar_t* sc = scale.data_ptr<scalar_t>();
    const scalar_t* w = weight.data_ptr<scalar_t>();
    // Parallel over column blocks: each block's accumulators stay in L1 while the rows stream by.
    at::parallel_for(0, (N + kColBlock - 1) / kColBlock, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t j0 = b * kColBlock, n = std::min(kColBlock, N - j0);
        for (const int64_t i : rows)
          row_add_scores(e + i * ld + j0, keep.data() + j0, sc[i], w[i], o + j0, n);
      }
    });
  });
  return out;
}

at::Tensor edge_score_histogram_cpu(const at::Tensor& edges_, const at::Tensor& scale_,
                                    const at::Tensor& weight_, const at::Tensor& row_mask,
                                    const at::Tensor& col_mask) {
  check_edge_pass_inputs(edges_, &scale_, &weight_, row_mask, col_mask, "edge_score_histogram");
  const auto edges = row_major(edges_);
  const auto scale = scale_.contiguous(), weight = weight_.contiguous();
  const int64_t N = edges.size(1), ld = edges.stride(0);
  const auto rows = selected_rows(row_mask);
  // kLanes histograms per thread (entry j adds to lane j % kLanes, so that runs of similar
  // scores do not wait on each other's read-modify-write of one bucket), summed below.
  const int64_t n_chunks = (static_cast<int64_t>(rows.size()) + kRowChunk - 1) / kRowChunk;
  const int64_t n_hist = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n_chunks)) * kLanes;
  std::vector<double> hist(n_hist * kBuckets, 0.0);
  AT_DISPATCH_FLOATING_TYPES(edges.scalar_type(), "edge_score_histogram", [&] {
    const auto keep = keep_of<scalar_t>(col_mask);
    const scalar_t* e = edges.data_ptr<scalar_t>();
    const scalar_t* sc = scale.data_ptr<scalar_t>();
    const scalar_t* w = weight.data_ptr<scalar_t>();
    parallel_interleaved(n_chunks, [&](int64_t t, int64_t c) {
      double* h = hist.data() + t * kLanes * kBuckets;
      scalar_t s[kSegment], top[kSegment / kGroup];
      const int64_t r1 = std::min<int64_t>(rows.size(), (c + 1) * kRowChunk);
      for (int64_t r = c * kRowChunk; r < r1; ++r) {
        const int64_t i = rows[r];
        for (int64_t j0 = 0; j0 < N; j0 += kSegment) {
          const int64_t n = std::min(kSegment, N - j0);
          row_scores(e + i * ld + j0, keep.data() + j0, sc[i], w[i], s, top, n);
          for (int64_t g = 0; g * kGroup < n; ++g) {
            if (top[g] == 0) continue;  // zeros add nothing
            // Branch-free: a zero lands in bucket 0 and adds 0.
            for (int64_t j = g * kGroup; j < std::min(n, (g + 1) * kGroup); ++j)
              h[j % kLanes * kBuckets + bucket_of(s[j])] += s[j];
          }
        }
      }
    });
  });
  auto out = at::zeros({kBuckets}, edges.options().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  for (int64_t t = 0; t < n_hist; ++t)
    for (int64_t k = 0; k < kBuckets; ++k) o[k] += hist[t * kBuckets + k];
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
edge_score_mask_cpu(const at::Tensor& edges_, const at::Tensor& scale_, const at::Tensor& weight_,
                    const at::Tensor& row_mask_, const at::Tensor& col_mask_, double min_score,
                    double band_end) {
  check_edge_pass_inputs(edges_, &scale_, &weight_, row_mask_, col_mask_, "edge_score_mask");
  const auto edges = row_major(edges_);
  const auto scale = scale_.contiguous(), weight = weight_.contiguous();
  const auto row_mask = row_mask_.contiguous(), col_mask = col_mask_.contiguous();
  const int64_t R = edges.size(0), N = edges.size(1), ld = edges.stride(0);
  const int64_t n_chunks = (R + kRowChunk - 1) / kRowChunk;
  const int64_t T = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n_chunks));
  auto mask = at::empty({R, N}, edges.options().dtype(at::kBool));
  auto n_in = at::zeros({R}, edges.options().dtype(at::kLong));
  std::vector<int32_t> thread_out(T * N, 0);  // per-thread column counts, summed below
  std::vector<int64_t> band_count(R + 1, 0);  // band entries of row i at [i + 1], then prefix sums
  const bool* rm = row_mask.data_ptr<bool>();
  auto* mk = reinterpret_cast<uint8_t*>(mask.data_ptr<bool>());  // bools are bytes 0/1
  int64_t* in = n_in.data_ptr<int64_t>();
  at::Tensor band_rows, band_cols, band_scores;
  AT_DISPATCH_FLOATING_TYPES(edges.scalar_type(), "edge_score_mask", [&] {
    const auto keep = keep_of<scalar_t>(col_mask);
    const scalar_t* e = edges.data_ptr<scalar_t>();
    const scalar_t* sc = scale.data_ptr<scalar_t>();
    const scalar_t* w = weight.data_ptr<scalar_t>();
    const auto lo = static_cast<scalar_t>(min_score);  // compared as torch compares s >= min_score
    const auto hi = static_cast<scalar_t>(band_end);
    // Each chunk of rows collects its band entries on its own; concatenated in row order.
    std::vector<std::vector<int64_t>> chunk_cols(n_chunks);
    std::vector<std::vector<scalar_t>> chunk_scores(n_chunks);
    parallel_interleaved(n_chunks, [&](int64_t t, int64_t c) {
      int32_t* out = thread_out.data() + t * N;
      scalar_t s[kSegment], top[kSegment / kGroup];
      uint8_t band[kSegment];
      for (int64_t i = c * kRowChunk; i < std::min(R, (c + 1) * kRowChunk); ++i) {
        uint8_t* row_mask_out = mk + i * N;
        if (!rm[i]) {
          std::fill(row_mask_out, row_mask_out + N, false);
          continue;
        }
        const size_t before = chunk_cols[c].size();
        int64_t count = 0;
        for (int64_t j0 = 0; j0 < N; j0 += kSegment) {
          const int64_t n = std::min(kSegment, N - j0);
          row_scores(e + i * ld + j0, keep.data() + j0, sc[i], w[i], s, top, n);
          count += mark(s, keep.data() + j0, lo, hi, row_mask_out + j0, band, out + j0, n);
          for (int64_t g = 0; g * kGroup < n; ++g) {
            if (top[g] < lo) continue;  // nothing in the band
            uint64_t any[2] = {0, 0};  // the group's 16 band flags, tested 8 at a time
            std::memcpy(any, band + g * kGroup, std::min<int64_t>(kGroup, n - g * kGroup));
            if ((any[0] | any[1]) == 0) continue;
            for (int64_t j = g * kGroup; j < std::min(n, (g + 1) * kGroup); ++j)
              if (band[j]) {
                chunk_cols[c].push_back(j0 + j);
                chunk_scores[c].push_back(s[j]);
              }
          }
        }
        in[i] = count;
        band_count[i + 1] = static_cast<int64_t>(chunk_cols[c].size() - before);
      }
    });
    for (int64_t i = 0; i < R; ++i) band_count[i + 1] += band_count[i];
    const int64_t E = band_count[R];
    band_rows = at::empty({E}, edges.options().dtype(at::kLong));
    band_cols = at::empty({E}, edges.options().dtype(at::kLong));
    band_scores = at::empty({E}, edges.options());
    int64_t* ro = band_rows.data_ptr<int64_t>();
    int64_t* co = band_cols.data_ptr<int64_t>();
    scalar_t* so = band_scores.data_ptr<scalar_t>();
    for (int64_t c = 0; c < n_chunks; ++c) {
      const int64_t i0 = c * kRowChunk, i1 = std::min(R, i0 + kRowChunk);
      std::copy(chunk_cols[c].begin(), chunk_cols[c].end(), co + band_count[i0]);
      std::copy(chunk_scores[c].begin(), chunk_scores[c].end(), so + band_count[i0]);
      for (int64_t i = i0; i < i1; ++i) std::fill(ro + band_count[i], ro + band_count[i + 1], i);
    }
  });
  auto n_out = at::zeros({N}, edges.options().dtype(at::kLong));
  int64_t* o = n_out.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < N; ++j) o[j] += thread_out[t * N + j];
  return {mask, n_in, n_out, band_rows, band_cols, band_scores};
}

}  // namespace

TORCH_LIBRARY_IMPL(cltrace, CPU, m) {
  m.impl("edge_abs_row_sums", &edge_abs_row_sums_cpu);
  m.impl("edge_score_col_sums", &edge_score_col_sums_cpu);
  m.impl("edge_score_histogram", &edge_score_histogram_cpu);
  m.impl("edge_score_mask", &edge_score_mask_cpu);
}

}  // namespace cltrace::cpu
