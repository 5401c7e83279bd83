// The cltrace op library: one schema per op. Implementations register themselves from
// csrc/cpu/<op>.cpp (CPU) and csrc/cuda/<op>.cu (CUDA). Pure-torch twins of every op live in
// python/cltrace/reference.py; typed wrappers, fake (meta) and autograd registration in
// python/cltrace/ops.py.
//
// Sparse activations are CSR over rows: row_offsets [N+1] int64, feat_idx [nnz] int64
// (ascending within a row for the encoders), values [nnz].
//
// Every op checks its arguments first (csrc/checks/<op>.h, the same for CPU and CUDA): dtypes,
// shapes, devices and scalar arguments on every call; index values (feat_idx, pos in range,
// row_offsets from 0 to nnz and non-decreasing) always on the CPU, and on CUDA only with the
// value-check switch on (CLTRACE_CHECK_VALUES=1, or cltrace.ops.set_check_values), since there
// they cost a host synchronisation per call. csrc/checks/common.h has the details.
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "checks/switch.h"

TORCH_LIBRARY(cltrace, m) {
  // JumpReLU encode, never holding the dense [N, d_sae] activations: z = x @ W_enc + b_enc,
  // keep (i, f) with z > threshold[f] (or z > threshold[f] - bandwidth/2 when bandwidth > 0,
  // so the threshold's straight-through band is visible to backward).
  // x [N, d_in], W_enc [d_in, d_sae], b_enc [d_sae], threshold [d_sae]
  //   -> row_offsets [N+1], feat_idx [nnz], acts [nnz] = z * (z > threshold), pre_acts [nnz] = z
  m.def("jumprelu_encode(Tensor x, Tensor W_enc, Tensor b_enc, Tensor threshold, float bandwidth=0.0) -> (Tensor, Tensor, Tensor, Tensor)");
  // Backward of jumprelu_encode w.r.t. acts: d acts/dz = 1[z > threshold];
  // d acts/d threshold = -(threshold/bandwidth) * 1[|z - threshold| < bandwidth/2] (rectangle STE).
  //   -> grad_x [N, d_in], grad_W_enc [d_in, d_sae], grad_b_enc [d_sae], grad_threshold [d_sae]
  m.def("jumprelu_encode_backward(Tensor grad_acts, Tensor x, Tensor W_enc, Tensor threshold, Tensor row_offsets, Tensor feat_idx, Tensor pre_acts, float bandwidth) -> (Tensor, Tensor, Tensor, Tensor)");
  // TopK encode: per row the k largest z = x @ W_enc + b_enc, then ReLU; CSR with k entries a row.
  //   -> row_offsets [N+1], feat_idx [N*k], acts [N*k]
  m.def("topk_encode(Tensor x, Tensor W_enc, Tensor b_enc, int k) -> (Tensor, Tensor, Tensor)");
  // Backward of topk_encode w.r.t. acts (the selection is held fixed; ReLU mask acts > 0).
  //   -> grad_x [N, d_in], grad_W_enc [d_in, d_sae], grad_b_enc [d_sae]
  m.def("topk_encode_backward(Tensor grad_acts, Tensor x, Tensor W_enc, Tensor row_offsets, Tensor feat_idx, Tensor acts) -> (Tensor, Tensor, Tensor)");
  // Sparse decode: out[i, o, :] = sum_{j in row i} acts[j] * W_dec[feat_idx[j], o, :].
  // W_dec [d_sae, n_out, d_model] (n_out = 1: per-layer transcoder; n_out > 1: cross-layer;
  // rows any distance apart, so a CLT slice w_dec[:, i:, :] is read in place)
  //   -> out [N, n_out, d_model]; cost O(nnz * n_out * d_model), independent of d_sae.
  m.def("sparse_decode(Tensor row_offsets, Tensor feat_idx, Tensor acts, Tensor W_dec) -> Tensor");
  // Backward of sparse_decode: grad_acts[j] = <W_dec[feat_idx[j]], grad_out[i]>,
  // grad_W_dec[f] = sum_{j: feat_idx[j] = f} acts[j] * grad_out[i]  (only active rows touched).
  //   -> grad_acts [nnz], grad_W_dec [d_sae, n_out, d_model]
  m.def("sparse_decode_backward(Tensor grad_out, Tensor row_offsets, Tensor feat_idx, Tensor acts, Tensor W_dec) -> (Tensor, Tensor)");
  // Attribution contraction (edge weights for a batch of targets):
  // edges[b, s] = acts[s] * <W_dec[feat_idx[s]], grad[b, pos[s]]>.
  // grad [B, n_pos, d_model], pos [S], W_dec [n_rows, d_model], feat_idx [S], acts [S]
  //   -> edges [B, S]. Read in place (csrc/layouts.h): grad with any strides over (b, pos) --
  // attribution passes the transposed view [k, n, d] of a position-major gradient -- and W_dec
  // with any row stride (a CLT slice W_dec[:, o, :]). Each decoder row is read once per batch
  // of targets.
  m.def("attribution_contract(Tensor grad, Tensor pos, Tensor W_dec, Tensor feat_idx, Tensor acts) -> Tensor");
  // Gather columns of an encoder: out[t, :] = W_enc[:, feat_idx[t]].
  // W_enc [d_in, d_sae], feat_idx [T] -> [T, d_in] (the gradient seeds of feature targets).
  m.def("gather_columns(Tensor W_enc, Tensor feat_idx) -> Tensor");
  // Pruning passes over an attribution graph's edge rows (CPU; one read of edges each), on the
  // block row_mask [R] x col_mask [N] (bool; other entries count as 0).
  // Absolute row sums: edges [R, N] -> [R] float64, out[i] = sum_j |edges[i, j]|.
  m.def("edge_abs_row_sums(Tensor edges, Tensor row_mask, Tensor col_mask) -> Tensor");
  // With the normalised scores s[i, j] = (|edges[i, j]| / scale[i]) * weight[i] (edges' dtype,
  // scale and weight [R] of that dtype): column sums -> [N] float64, sum_i s[i, j].
  m.def("edge_score_col_sums(Tensor edges, Tensor scale, Tensor weight, Tensor row_mask, Tensor col_mask) -> Tensor");
  // Sum of the scores s per bucket of their bit patterns (those of
  // cltrace.graph.pruning.find_threshold) -> [65536] float64.
  m.def("edge_score_histogram(Tensor edges, Tensor scale, Tensor weight, Tensor row_mask, Tensor col_mask) -> Tensor");
  // The entries with s >= min_score, and those of them with s < band_end (row-major):
  //   -> mask [R, N] bool, n_in [R] and n_out [N] int64 (its row and column counts),
  //      band_rows [E] int64, band_cols [E] int64, band_scores [E].
  m.def("edge_score_mask(Tensor edges, Tensor scale, Tensor weight, Tensor row_mask, Tensor col_mask, float min_score, float band_end) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

namespace {
// _C.set_check_values(on: bool) -> bool: sets the switch for index-value checks on CUDA
// (csrc/checks/common.h), returning its previous state. Wrapped by cltrace.ops.set_check_values.
PyObject* set_check_values(PyObject*, PyObject* arg) {
  const int on = PyObject_IsTrue(arg);
  if (on < 0) return nullptr;
  return PyBool_FromLong(cltrace::set_device_value_checks(on != 0));
}

// _C.check_values() -> bool: the switch's state.
PyObject* check_values(PyObject*, PyObject*) {
  return PyBool_FromLong(cltrace::device_value_checks());
}

PyMethodDef module_methods[] = {
    {"set_check_values", set_check_values, METH_O,
     "Switch index-value checks on CUDA on or off; returns the previous state."},
    {"check_values", check_values, METH_NOARGS, "Whether index-value checks run on CUDA."},
    {nullptr, nullptr, 0, nullptr}};

// Python module stub: `import cltrace._C` loads this library, whose static initialisers
// register the ops above with the dispatcher.
PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "cltrace compiled ops", -1,
                          module_methods};
}  // namespace

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* mod = PyModule_Create(&module_def);
  if (mod == nullptr) return nullptr;
#ifdef CLTRACE_WITH_CUDA
  PyModule_AddIntConstant(mod, "with_cuda", 1);
#else
  PyModule_AddIntConstant(mod, "with_cuda", 0);
#endif
  PyModule_AddStringConstant(mod, "torch_cuda_version", CLTRACE_TORCH_CUDA);
  PyModule_AddStringConstant(mod, "compiler", __VERSION__);
#ifdef _OPENMP
  PyModule_AddIntConstant(mod, "openmp", _OPENMP);
#else
  PyModule_AddIntConstant(mod, "openmp", 0);
#endif
  return mod;
}
