"""Quick check of the CPU kernels against python/cltrace/reference.py (run after changing a
kernel; the real tests live in tests/). float64 tight, float32/bf16 loose; covers the
row-wise and cache-blocked decode paths, unsorted and repeated features, several encode
row blocks and column tiles, with and without the threshold band.

    PYTHONPATH=python python benchmarks/verify_against_reference.py
"""
import torch
from cltrace import ops, reference as ref
torch.manual_seed(0)
def csr(n, s, k):
    m = torch.rand(n, s) < k / s
    r, f = m.nonzero(as_tuple=True)
    ro = torch.zeros(n + 1, dtype=torch.int64); ro[1:] = torch.bincount(r, minlength=n).cumsum(0)
    return ro, f, torch.rand(f.numel()) + 0.5
for dt, tol in [(torch.float64, 1e-10), (torch.float32, 1e-4), (torch.bfloat16, 3e-2)]:
    for (n, d, s, n_out) in [(300, 640, 3000, 1), (1000, 512, 9000, 1), (0, 8, 16, 1), (5, 7, 33, 1), (300, 640, 20000, 1), (37, 64, 3000, 18), (3, 10, 10, 2)]:
        ro, fi, a = csr(n, s, min(40, s // 2))
        a = a.to(dt); W = torch.randn(s, n_out, d, dtype=dt)
        o = ops.sparse_decode(ro, fi, a, W); r = ref.sparse_decode(ro, fi, a, W)
        assert torch.allclose(o.double(), r.double(), atol=tol * 10, rtol=tol), (dt, n, d, s, (o - r).abs().max())
        # duplicates / odd tails
        fi2 = fi.clone()
        if fi2.numel() > 3: fi2[1::3] = fi2[0]
        o = ops.sparse_decode(ro, fi2, a, W); r = ref.sparse_decode(ro, fi2, a, W)
        assert torch.allclose(o.double(), r.double(), atol=tol * 10, rtol=tol)
    for (n, d, s) in [(1500, 16, 5000), (0, 8, 16), (5, 7, 33), (300, 64, 20000), (600, 32, 9000)]:
        x = torch.randn(n, d, dtype=dt); W = torch.randn(d, s, dtype=dt); b = torch.randn(s, dtype=dt)
        thr = (torch.rand(s) * 2 + 1).to(dt)
        for bw in (0.0, 0.5):
            o = ops._ops.jumprelu_encode(x, W, b, thr, bw); r = ref.jumprelu_encode(x, W, b, thr, bw)
            if dt == torch.float64:
                assert all(torch.equal(p, q) for p, q in zip(o[:2], r[:2])), (n, d, s)
                assert all(torch.allclose(p, q, atol=1e-12) for p, q in zip(o[2:], r[2:]))
            else:  # float rounding may flip an entry sitting on the threshold
                assert abs(o[1].numel() - r[1].numel()) <= max(2, r[1].numel() // 500), (dt, o[1].numel(), r[1].numel())
print("all ok")
# blocked path with unsorted, repeated features
ro, fi, a = csr(400, 2000, 64); fi = fi[torch.randperm(fi.numel())]; W = torch.randn(2000, 1, 640)
assert fi.numel() >= 4000
o = ops.sparse_decode(ro, fi, a, W); r = ref.sparse_decode(ro, fi, a, W)
assert torch.allclose(o, r, atol=1e-4, rtol=1e-4); print("blocked ok")
