"""Banded sliding-window patterns against their dense twins (:mod:`cltrace.frozen.attention`)."""
import pytest
import torch

from cltrace.frozen.attention import BandedPattern, mix, mix_t


def sliding_pattern(H: int, n: int, window: int, seed: int = 0) -> torch.Tensor:
    """A random causal sliding-window pattern: rows sum to 1 over keys q - window < k <= q."""
    g = torch.Generator().manual_seed(seed)
    q, k = torch.arange(n)[:, None], torch.arange(n)[None]
    allowed = (k <= q) & (k > q - window)
    logits = torch.randn(H, n, n, generator=g, dtype=torch.float64)
    return logits.masked_fill(~allowed, float("-inf")).softmax(-1)


@pytest.mark.parametrize("n,window,block", [(7, 3, None), (9, 3, 2), (10, 4, None), (16, 4, 3), (5, 8, None),
                                            (13, 5, 1)])
def test_band_round_trip(n, window, block):
    P = sliding_pattern(4, n, window)
    B = BandedPattern.from_dense(P, window, block)
    assert B.shape == (4, n, n)
    torch.testing.assert_close(B.dense(), P, rtol=0, atol=0)
    Bq = B.block
    assert B.blocks.numel() == -(-n // Bq) * 4 * Bq * (Bq + window)


def test_band_saves_memory_only_on_long_prompts():
    assert not BandedPattern.saves_memory(512, 512) and not BandedPattern.saves_memory(600, 512)
    assert BandedPattern.saves_memory(1024, 512) and BandedPattern.saves_memory(10, 3)
    B = BandedPattern.from_dense(sliding_pattern(1, 4096, 512)[:, :, :].float(), 512)
    assert B.blocks.numel() * 6 < 4096 * 4096


def test_band_rejects_mass_outside_the_window():
    P = sliding_pattern(2, 9, 5)
    with pytest.raises(ValueError, match="outside its sliding window of 3"):
        BandedPattern.from_dense(P, 3)


@pytest.mark.parametrize("n_kv", [1, 2])
@pytest.mark.parametrize("start", [0, 1, 4, 6])
def test_mix_matches_dense(n_kv, start):
    H, n, W, C = 4, 11, 3, 5
    P = sliding_pattern(H, n, W, seed=1)
    v = torch.randn(n_kv, n - start, C, dtype=torch.float64)
    ref = mix(P, v, start)
    for block in (None, 2):
        torch.testing.assert_close(mix(BandedPattern.from_dense(P, W, block), v, start), ref, rtol=1e-12, atol=1e-12)
    rep = H // n_kv  # the reference written out: z[h, q] = sum_k P[h, q, k] v[g(h), k]
    for h in range(H):
        want = P[h, start:, start:] @ v[h // rep]
        torch.testing.assert_close(ref[h // rep, h % rep], want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n_kv", [1, 2])
@pytest.mark.parametrize("n,start", [(n, s) for n in (1, 3, 8, 11) for s in (0, 1, 4) if s < n])
def test_mix_t_matches_dense(n_kv, n, start):
    H, N, W, C, B = 4, 11, 3, 6, 5
    P = sliding_pattern(H, N, W, seed=2)
    rep, nq = H // n_kv, n - start
    s_q, s_k = torch.rand(n, dtype=torch.float64) + 0.5, torch.rand(n, dtype=torch.float64) + 0.5
    for g in range(n_kv):
        # B seeds, a strided view as the backward passes it (every other column block)
        gz = torch.randn(B, nq * rep, 2, C, dtype=torch.float64)[:, :, 1]
        main, pre = mix_t(P, gz, s_q, s_k, g, rep, start)
        assert main.shape == (B, nq, C) and pre.shape == (B, start, C)
        for block in (None, 2):
            m2, p2 = mix_t(BandedPattern.from_dense(P, W, block), gz, s_q, s_k, g, rep, start)
            torch.testing.assert_close(m2, main, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(p2, pre, rtol=1e-12, atol=1e-12)
        # written out: grad_v[b, j] = sum_{h in g, q >= start} s_q[q] P[h, q, j] s_k[j] gz[b, (q, h)]
        gzv = gz.reshape(B, nq, rep, C)
        A = s_q[:, None] * P[:, :n, :n] * s_k[None]  # [H, n, n]
        for b in range(B):
            want = sum(A[g * rep + r, start:].T @ gzv[b, :, r] for r in range(rep))  # [n, C]: every key
            torch.testing.assert_close(torch.cat([pre[b], main[b]]), want, rtol=1e-12, atol=1e-12)

