// CPU attribution contraction and encoder-column gather (the hot path of graph building).
//
// edges[b, s] = acts[s] * <W_dec[feat_idx[s]], grad[b, pos[s]]>: parallel over sources, each
// decoder row is loaded once and dotted against the B gradient rows at its position, so the
// decoder is read once per batch of targets (bytes ~ S * d_model + B * n_pos * d_model). grad
// may be strided over (b, pos).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "checks/contract.h"
#include "cpu/vec.h"
#include "layouts.h"

namespace cltrace::cpu {
namespace {

at::Tensor attribution_contract_cpu(const at::Tensor& grad_, const at::Tensor& pos_,
                                    const at::Tensor& W_dec_, const at::Tensor& feat_idx_,
                                    const at::Tensor& acts_) {
  check_contract_inputs(grad_, pos_, W_dec_, feat_idx_, acts_);
  const auto grad = unit_row_stride(grad_);  // read in place: strided over (b, pos) (layouts.h)
  const auto pos = pos_.contiguous();
  const auto fi = feat_idx_.contiguous();
  const auto acts = acts_.contiguous();
  const auto W = unit_row_stride(W_dec_);  // rows may be strided (a CLT slice W_dec[:, o, :])
  const int64_t B = grad.size(0), d = grad.size(2), S = fi.size(0), ld = W.stride(0);
  const int64_t sb = grad.stride(0), sp = grad.stride(1);
  auto edges = at::empty({B, S}, grad.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "attribution_contract", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    const scalar_t* wp = W.data_ptr<scalar_t>();
    const scalar_t* a = acts.data_ptr<scalar_t>();
    const int64_t* p = pos.data_ptr<int64_t>();
    const int64_t* f = fi.data_ptr<int64_t>();
    scalar_t* e = edges.data_ptr<scalar_t>();
    at::parallel_for(0, S, 16, [&](int64_t s0, int64_t s1) {
      for (int64_t s = s0; s < s1; ++s) {
        const scalar_t* w = wp + f[s] * ld;
        const acc_t as = static_cast<acc_t>(a[s]);
        for (int64_t b = 0; b < B; ++b)
          e[b * S + s] = static_cast<scalar_t>(as * dot<scalar_t>(w, gp + b * sb + p[s] * sp, d));
      }
    });
  });
  return edges;
}

// Any strides: a memory-mapped or transposed encoder (circuit-tracer stores W_enc [d_sae, d_in])
// is read in place, touching only the requested columns.
at::Tensor gather_columns_cpu(const at::Tensor& W, const at::Tensor& feat_idx_) {
  check_gather_inputs(W, feat_idx_);
  const auto fi = feat_idx_.contiguous();
  const int64_t d_in = W.size(0), T = fi.size(0);
  const int64_t s0 = W.stride(0), s1 = W.stride(1);
  const int64_t* f = fi.data_ptr<int64_t>();
  auto out = at::empty({T, d_in}, W.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, W.scalar_type(), "gather_columns", [&] {
    const scalar_t* wp = W.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    if (s1 == 1) {  // [d_in, d_sae] rows: parallel over rows, each thread streams its own
      at::parallel_for(0, d_in, 8, [&](int64_t k0, int64_t k1) {
        for (int64_t k = k0; k < k1; ++k)
          for (int64_t t = 0; t < T; ++t) o[t * d_in + k] = wp[k * s0 + f[t]];
      });
    } else {  // columns are contiguous or strided: one column per target
      at::parallel_for(0, T, 4, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t)
          for (int64_t k = 0; k < d_in; ++k) o[t * d_in + k] = wp[k * s0 + f[t] * s1];
      });
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(cltrace, CPU, m) {
  m.impl("attribution_contract", &attribution_contract_cpu);
  m.impl("gather_columns", &gather_columns_cpu);
}

}  // namespace cltrace::cpu
