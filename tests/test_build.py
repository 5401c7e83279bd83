"""The compiled extension loads, registers every op, and reports what it was built with."""
from __future__ import annotations

import pytest
import torch

import cltrace

OPS = ["jumprelu_encode", "jumprelu_encode_backward", "topk_encode", "topk_encode_backward",
       "sparse_decode", "sparse_decode_backward", "attribution_contract", "gather_columns"]
# Pruning passes: CPU only (graph edges always live in host memory).
CPU_OPS = ["edge_abs_row_sums", "edge_score_col_sums", "edge_score_histogram", "edge_score_mask"]


def test_build_info_reports_kernels():
    info = cltrace.build_info()
    assert info.cpu and info.version == cltrace.__version__
    assert info.torch_version == torch.__version__
    assert info.openmp > 0, "CPU kernels must be built with OpenMP (at::parallel_for)"
    if torch.version.cuda is None:
        assert not info.cuda and not info.cuda_available


def test_every_op_has_cpu_kernel_and_reference():
    from cltrace import reference
    for name in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"cltrace::{name}", "CPU"), name
        if cltrace.build_info().cuda:
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"cltrace::{name}", "CUDA"), name
        assert callable(getattr(reference, name)), f"reference twin of {name} missing"
    for name in CPU_OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"cltrace::{name}", "CPU"), name
        assert callable(getattr(reference, name)), f"reference twin of {name} missing"


@pytest.mark.cuda
def test_build_reports_cuda():
    info = cltrace.build_info()
    assert info.cuda and info.cuda_available, "cltrace._C was built without its CUDA kernels"
