"""Attention in the graph (cltrace.attention): the frozen query/key maps, the QK split of a score
and the head split of an edge, each against an identity it must satisfy and a brute-force
oracle through the frozen model, on tiny fp64 Gemma 3 models whose norms compute in fp64
(:func:`support.tiny_gemma.exact_norms`), so that every identity holds to 1e-9."""
from __future__ import annotations


import pytest
import torch

from cltrace.attention.explain import explain_attention
from cltrace.attention.loadings import Sources, head_loadings
from cltrace.attention.maps import QKMaps
from cltrace.attention.qk import CONST, constant_streams, decompose
from cltrace.attention.settings import QKSettings
from cltrace.attribution import attribute
from cltrace.attribution.rows import EdgeRows
from cltrace.errors import UsageError
from cltrace.frozen.model import Seeds
from cltrace.graph import prune
from support.attention import (check_attention_json, edge_by_forward, rel, source_write, stream_of,
                               with_heads)
from support.tiny_gemma import TOKENS, exact_norms, tiny_replacement

KINDS = ["plt", "plt+skip", "clt", "clt+skip"]


def exact_tiny(kind: str, skip_positions: int = 1, n_kv: int = 2, rope_scaling: bool = False):
    rm = tiny_replacement(kind, skip_positions=skip_positions, n_kv=n_kv, rope_scaling=rope_scaling)
    exact_norms(rm.model)
    return rm


# --- the query and key maps --------------------------------------------------------------


def recorded_queries_and_keys(rm, tokens):
    """The post-RoPE queries and keys the model itself computed: [n_layers] of ([H, n, hd],
    [H_kv, n, hd]), recorded by wrapping transformers' eager attention."""
    from transformers.models.gemma3 import modeling_gemma3 as mg

    seen, original = [], mg.eager_attention_forward

    def record(module, query, key, *args, **kwargs):
        seen.append((query[0].detach(), key[0].detach()))
        return original(module, query, key, *args, **kwargs)

    mg.eager_attention_forward = record
    try:
        rm.run(torch.tensor(tokens))
    finally:
        mg.eager_attention_forward = original
    return seen


@pytest.mark.parametrize("n_kv,rope_scaling", [(1, False), (2, False), (2, True)])
def test_query_key_maps_are_the_models_own(n_kv, rope_scaling):
    """GQA (1 or 2 KV heads for 4 query heads), sliding and global layers, and linear RoPE
    scaling on the global layer (Gemma 3 4B+): the maps give the model's own q and k."""
    rm = exact_tiny("plt", n_kv=n_kv, rope_scaling=rope_scaling)
    if not type(rm.model).__module__.startswith("transformers"):
        pytest.skip("records transformers' attention")
    state = rm.run(torch.tensor(TOKENS))
    maps = QKMaps(state, rm.parts)
    seen = recorded_queries_and_keys(rm, TOKENS)
    worst = 0.0
    for L, (q, k) in enumerate(seen):  # the model's own q and k, per head
        for h in range(maps.n_heads):
            for p in range(state.n_pos):
                worst = max(worst, float((maps.query_map(L, h, p) @ maps.resid(L, p) - q[h, p]).abs().max()),
                            float((maps.key_map(L, h, p) @ maps.resid(L, p) - k[h // maps.rep, p]).abs().max()))
        # the scores' softmax over the allowed keys is the captured pattern
        for h in range(maps.n_heads):
            P = maps.pattern(L, h)
            S = torch.tensor([[maps.score(L, h, qi, ki) for ki in range(state.n_pos)]
                              for qi in range(state.n_pos)], dtype=torch.float64)
            allowed = P > 0
            S[~allowed] = float("-inf")
            assert torch.allclose(torch.softmax(S, -1), P, atol=1e-12)
    assert worst < 1e-12


# --- QK attribution ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("skip", [0, 1])
def test_qk_split_sums_to_the_score_and_matches_the_oracle(kind, skip):
    rm = exact_tiny(kind, skip_positions=skip)
    state = rm.run(torch.tensor(TOKENS))
    maps, rows = QKMaps(state, rm.parts), EdgeRows(state, carry_prefix=True)
    fz = state.frozen
    for layer, head, q, k in [(2, 1, 7, 4), (3, 3, 6, 0), (1, 0, 5, 5)]:  # k = 0: <bos>
        d = decompose(rows, maps, layer, head, q, k)
        # identities: all pairs, each side's marginals with its constants, each side's total
        assert rel(d.pair_matrix().sum(), d.score) < 1e-9
        q_const = float(d.scaling * (d.q.const @ d.k.total))
        assert rel(d.q_marginals().sum() + q_const, d.score) < 1e-9
        assert rel(d.k_marginals().sum() + d.scaling * (d.q.total @ d.k.const), d.score) < 1e-9
        assert rel(d.score, maps.score(layer, head, q, k)) < 1e-12
        # the constants: r_L from b_dec (and the prefix's MLP outputs) alone
        const = constant_streams(rows, layer)
        assert torch.allclose(d.q.const, maps.query_map(layer, head, q) @ const[q], atol=1e-12)
        # brute force: each source alone through the frozen model, read by the maps
        live = [c for c in (d.q.M != 0).any(0).nonzero().flatten().tolist()]
        assert live, "no source reaches the query"
        for col in live[:: max(1, len(live) // 6)] + [rows.token_start + q]:
            e, s = source_write(state, rows, col)
            r = stream_of(fz, layer, e, s)
            assert torch.allclose(d.q.M[:, col], maps.query_map(layer, head, q) @ r[q], atol=1e-10)
            assert torch.allclose(d.k.M[:, col], maps.key_map(layer, head, k) @ r[k], atol=1e-10)
        # the summary's identities and its top pairs are the pair matrix's top entries
        tr = d.summary(6, 4, 0.5)
        assert (tr.query_pos, tr.key_pos, tr.prob) == (q, k, 0.5)
        af = state.active_features()
        for col in [rows.token_start + 3, rows.error_start + 2 * state.n_pos + 5, 0, rows.n_features - 1, CONST]:
            name = d.source_name(col)
            if col == CONST:
                assert name == f"constants into layer {layer}"
            elif col >= rows.token_start:
                assert name == f"token 3 '<{TOKENS[3]}>'"
            elif col >= rows.error_start:
                assert name == "error L2@5"
            else:
                assert name.startswith(f"feature L{int(af.layer[col])}#{int(af.feature[col])}@{int(af.pos[col])} ")
        pm = d.pair_matrix()
        top = pm.flatten().abs().topk(6).values
        assert torch.allclose(torch.tensor([abs(v) for *_, v in tr.pairs], dtype=torch.float64), top, atol=1e-12)
        n = pm.shape[0] - 1
        for i, j, v in tr.pairs:
            assert pm[n if i == CONST else i, n if j == CONST else j] == pytest.approx(v, abs=1e-12)
        assert rel(sum(v for *_, v in tr.pairs) + tr.pairs_rest, d.score) < 1e-9
        assert rel(sum(v for _, v in tr.q_marginals) + tr.q_rest + tr.q_constant, d.score) < 1e-9
        assert rel(sum(v for _, v in tr.k_marginals) + tr.k_rest + tr.k_constant, d.score) < 1e-9


def test_qk_bad_requests_name_the_value():
    rm = exact_tiny("plt")
    state = rm.run(torch.tensor(TOKENS))
    maps, rows = QKMaps(state, rm.parts), EdgeRows(state, carry_prefix=True)
    for args, word in [((4, 0, 3, 1), "layer 4"), ((0, 4, 3, 1), "head 4"), ((0, 0, 8, 1), "query position 8"),
                       ((0, 0, 3, -1), "key position -1"), ((0, 0, 3, 5), "comes after")]:
        with pytest.raises(UsageError, match=word):
            decompose(rows, maps, *args)
    with pytest.raises(ValueError, match="carry_prefix"):
        decompose(EdgeRows(state), maps, 0, 0, 3, 1)
    # a model whose attention weights were not loaded (on the meta device)
    attn = rm.parts.layers[2].self_attn
    real_weight = attn.k_proj.weight
    attn.k_proj.weight = torch.nn.Parameter(torch.empty_like(real_weight, device="meta"))
    try:
        with pytest.raises(UsageError, match=r"layer 2: the model's attention weights \(k_proj\)"):
            QKMaps(state, rm.parts)
    finally:
        attn.k_proj.weight = real_weight


def test_pattern_entries_read_the_band():
    """Entries and rows of a sliding-window pattern, read from its blocks, are the dense ones."""
    from cltrace.frozen.attention import BandedPattern, entries, pattern_rows

    n, W = 300, 130
    q = torch.arange(n)[:, None]
    k = torch.arange(n)[None]
    band = (k <= q) & (k > q - W)
    P = torch.rand(3, n, n, dtype=torch.float64) * band
    P = P / P.sum(-1, keepdim=True)
    banded = BandedPattern.from_dense(P, W)
    qs, ks = torch.randint(0, n, (2, 5000))
    assert torch.equal(entries(banded, qs, ks), P[:, qs, ks].T)
    assert torch.equal(entries(P, qs, ks), P[:, qs, ks].T)
    rows = torch.tensor([0, 129, 130, 299])
    assert torch.equal(pattern_rows(banded, 2, rows), P[2, rows])


# --- head loadings -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_head_loadings_match_the_oracle(kind):
    rm = exact_tiny(kind)
    state = rm.run(torch.tensor(TOKENS))
    fz = state.frozen
    rows = EdgeRows(state, carry_prefix=True)
    af = state.active_features()
    # targets: two features late in the prompt and a logit direction at the last position
    late = (af.pos >= 5) & (af.layer >= 2)
    pick = late.nonzero().flatten()[:2]
    feat = state.feature_seeds(af.layer[pick], af.pos[pick], af.feature[pick])
    logit = fz.logit_direction(torch.tensor([7]))
    targets = Seeds(torch.cat([feat.layer, torch.tensor([fz.n_layers])]),
                    torch.cat([feat.pos, torch.tensor([state.n_pos - 1])]),
                    torch.cat([feat.vec, logit]).to(fz.dtype))
    # sources: tokens (one at the target's position), errors, features at earlier layers
    cols = [rows.token_start + 1, rows.token_start + 5, rows.token_start + 7,
            rows.error_start + 0 * state.n_pos + 3, rows.error_start + 1 * state.n_pos + 7]
    cols += (af.layer <= 1).nonzero().flatten()[:4].tolist()
    writes = [source_write(state, rows, c) for c in cols]
    pos = torch.tensor([int(e.abs().sum(1).nonzero()[0]) if e.abs().sum() > 0 else int(s.abs().sum((0, 2)).nonzero()[0])
                        for e, s in writes])
    embed = torch.stack([e[p] for (e, _), p in zip(writes, pos.tolist())])
    per_layer = torch.stack([s[:, p] for (_, s), p in zip(writes, pos.tolist())])
    sources = Sources(pos, embed, per_layer)
    T, S = targets.n, len(cols)
    t_idx = torch.arange(T).repeat_interleave(S)
    s_idx = torch.arange(S).repeat(T)
    got = head_loadings(rows, targets, sources, t_idx, s_idx, torch.tensor(cols))
    none = with_heads(fz, lambda L, h: False)
    checked_cross = 0
    for e in range(T * S):
        t, s = int(t_idx[e]), int(s_idx[e])
        tgt = Seeds(*(x[t:t + 1] for x in targets))
        emb, src = writes[s]
        full = edge_by_forward(fz, emb, src, tgt)
        assert got.edge[e] == pytest.approx(full, abs=1e-10)
        base = edge_by_forward(none, emb, src, tgt)
        assert got.residual[e] == pytest.approx(base, abs=1e-10)
        if int(targets.pos[t]) != int(pos[s]):
            assert base == 0.0
            checked_cross += 1
        for L in range(fz.n_layers):
            for h in range(fz.n_heads):
                one = edge_by_forward(with_heads(fz, lambda a, b: (a, b) == (L, h)), emb, src, tgt) - base
                assert got.one_hop[e, L, h] == pytest.approx(one, abs=1e-10)
        total = got.residual[e] + got.one_hop[e].sum() + got.multi_hop[e]
        assert total == pytest.approx(full, abs=1e-12)
    assert checked_cross > 0


# --- the whole report --------------------------------------------------------------------


def test_explain_attention_on_a_graph():
    rm = exact_tiny("clt+skip")
    graph = attribute(TOKENS, rm, max_feature_nodes=None)
    result = prune(graph, 0.8, 0.85)
    report = explain_attention(rm, graph, result, QKSettings(qk=True, qk_nodes=3, qk_trace=((3, 1, 7, 0),)))
    kept = int(result.edge_mask.sum())
    assert report.edges.shape == (kept, 2)
    r, c = result.edge_mask.nonzero(as_tuple=True)
    assert torch.equal(report.edges, torch.stack([graph.edge_targets[r], c], 1))
    # the targets and sources it builds from the graph's nodes are the edges' own: each sampled
    # source's writes, forwarded alone through the frozen model and read by its target, give
    # the graph's edge (token, error and feature sources; feature and logit targets)
    from cltrace.attention.explain import _columns, _logit_vectors, _sources, _target_seeds

    state = rm.run(torch.tensor(TOKENS))
    fz, af = state.frozen, state.active_features()
    rows = EdgeRows(state, carry_prefix=True)
    cols = _columns(graph, state, af, rows)
    kinds = graph.nodes().kind
    picked = []
    for kind in (0, 1, 2):  # feature, error, token sources
        for tgt_kind in (0, 3):  # feature, logit targets
            hit = ((kinds[report.edges[:, 1]] == kind) & (kinds[report.edges[:, 0]] == tgt_kind)).nonzero()
            picked += hit.flatten()[:3].tolist()
    assert len(picked) >= 8
    for e in picked:
        t_node, s_node = report.edges[e].tolist()
        src = _sources(graph, state, af, torch.tensor([s_node]), cols[[s_node]])
        tgt = _target_seeds(graph, state, torch.tensor([t_node]), _logit_vectors(graph, state, rm, None))
        embed = torch.zeros(state.n_pos, fz.d_model, dtype=fz.dtype)
        writes = torch.zeros(fz.n_layers, state.n_pos, fz.d_model, dtype=fz.dtype)
        p = int(src.pos[0])
        embed[p], writes[:, p] = src.embed[0], src.writes[0]
        assert edge_by_forward(fz, embed, writes, tgt) == pytest.approx(float(report.loadings.edge[e]), rel=1e-5, abs=1e-6)
    assert len(report.traces) >= 2 and report.traces[-1].layer == 3 and report.trace_edges[-1] is None
    assert report.trace_edges[0] is not None
    for tr in report.traces:
        for i, j, _ in tr.pairs:
            assert (tr.layer, i) in report.contributors or (tr.layer, i, tr.query_pos) in report.contributors
    for (L, h), (queries, rows) in report.patterns.items():
        assert queries.tolist() == list(range(graph.n_pos)) and rows.shape == (graph.n_pos, graph.n_pos)
        assert torch.allclose(rows.sum(1), torch.ones(graph.n_pos), atol=1e-5)  # probabilities
    with pytest.raises(UsageError, match="head 9"):
        explain_attention(rm, graph, result, QKSettings(qk=True, qk_trace=((1, 9, 3, 1),)))


# --- the command line and the JSON --------------------------------------------------------


def test_attribute_qk_cli(monkeypatch, tmp_path, capsys):
    import json

    from cltrace.cli import main
    from support.tiny_gemma import use_tiny_model

    use_tiny_model(monkeypatch, tiny_replacement("clt+skip", dtype=torch.float32, skip_positions=1))
    out = tmp_path / "g"
    assert main(["attribute", "hello world", "--out", str(out), "--format", "json", "--qk",
                 "--qk-trace", "3.1@6:0", "--quiet"]) == 0
    assert "attention" in capsys.readouterr().out  # its time is reported
    data = json.loads((out / "hello-world.json").read_text())
    check_attention_json(data)
    assert any(t["layer"] == 3 and t["head"] == 1 and "target" not in t for t in data["qk_traces"])
    assert data["metadata"]["attention_settings"]["qk_trace"] == [[3, 1, 6, 0]]
    # without --qk: relevance only
    assert main(["attribute", "hello world", "--out", str(out), "--slug", "plain", "--format", "json",
                 "--quiet"]) == 0
    plain = json.loads((out / "plain.json").read_text())
    assert "relevance" in plain and "qk_traces" not in plain and all("heads" not in x for x in plain["links"])
    # bad requests: one line, exit 2, nothing written
    for argv, needle in [(["--qk-trace", "3.9@6:0"], "head 9"), (["--qk-trace", "3.1@2:6"], "comes after"),
                         (["--qk-trace", "7.0@2:1"], "layer 7"), (["--qk-trace", "3.1@40:1"], "query position 40"),
                         (["--qk-nodes", "-1"], "--qk-nodes")]:
        bad = tmp_path / "bad"
        assert main(["attribute", "hello world", "--out", str(bad), "--qk", "--quiet", *argv]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert needle in err and "\n" not in err and "Traceback" not in err, err
        assert not bad.exists() or list(bad.iterdir()) == []
    with pytest.raises(SystemExit):
        main(["attribute", "hello", "--qk-trace", "3:1"])
    assert "LAYER.HEAD@QUERY:KEY" in capsys.readouterr().err


def test_batch_qk(monkeypatch, tmp_path):
    import json

    from cltrace.cli import main
    from support.tiny_gemma import use_tiny_model

    use_tiny_model(monkeypatch, tiny_replacement("plt", dtype=torch.float32, skip_positions=1))
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello world\nsecond prompt\n")
    out = tmp_path / "b"
    assert main(["batch", str(prompts), "--out", str(out), "--workers", "0", "--qk", "--qk-nodes", "2",
                 "--quiet"]) == 0
    graphs = sorted(p for p in out.rglob("*.json") if p.name not in ("graph-metadata.json",)
                    and "qk_traces" in p.read_text())
    assert len(graphs) == 2
    for p in graphs:
        check_attention_json(json.loads(p.read_text()))


# --- what it means, on the real Gemma 3 270M -----------------------------------------------


@pytest.fixture(scope="module")
def real_rm(real_gemma):
    from cltrace.replacement import ReplacementModel
    from support.transcoders import synthetic_starter_transcoders

    return ReplacementModel(real_gemma.model, synthetic_starter_transcoders(real_gemma),
                            tokenizer=real_gemma.tokenizer)


def contribution_to_stream(state, rows: EdgeRows, col: int, layer: int):
    """r_layer [n_pos, d] from source ``col`` alone, through the frozen model."""
    embed, src = source_write(state, rows, col)
    return stream_of(state.frozen, layer, embed, src)


@pytest.mark.real_model
def test_ablating_a_key_source_moves_the_unfrozen_head_as_predicted(real_rm):
    """Unfreeze one head's pattern (its scores recomputed from the streams, norms frozen as in
    the replacement model), remove the top key-side source of a traced (q, k) from every
    stream, and compare the change of P[q, k] with the first-order prediction from the QK
    marginals at every key of that query: Δs(k') ≈ -(q marginal + k marginal of the source)
    (exact up to the pair term Q_j·K_j, checked), Δp_k ≈ p_k (Δs_k - Σ p_k' Δs_k'), for 1 %,
    10 % and all of the source (first order: within 3 % at 1 %; the sign and size at 100 %)."""
    prompt = "The capital of France is"
    graph = attribute(prompt, real_rm, max_feature_nodes=500)
    result = prune(graph)
    report = explain_attention(real_rm, graph, result, QKSettings(qk=True, qk_nodes=2))
    state = real_rm.run(prompt)
    maps, rows = QKMaps(state, real_rm.parts), EdgeRows(state, carry_prefix=True)
    agreement = []
    for tr in report.traces[:3]:
        L, h, q, k = tr.layer, tr.head, tr.query_pos, tr.key_pos
        j = next(c for c, _ in tr.k_marginals if c != CONST)
        c = contribution_to_stream(state, rows, j, L)
        keys = [kk for kk in range(q + 1) if maps.prob(L, h, q, kk) > 0]
        sides = {}
        decs = {kk: decompose(rows, maps, L, h, q, kk, sides=sides) for kk in keys}
        A_q, r = maps.query_map(L, h, q), [maps.resid(L, p) for p in range(state.n_pos)]
        p_old = torch.tensor([maps.prob(L, h, q, kk) for kk in keys], dtype=torch.float64)
        for frac in (0.01, 0.1, 1.0):
            s_old, s_new, ds_pred = [], [], []
            for kk in keys:
                A_k = maps.key_map(L, h, kk)
                s_old.append(maps.scaling * (A_q @ r[q]) @ (A_k @ r[kk]))
                s_new.append(maps.scaling * (A_q @ (r[q] - frac * c[q])) @ (A_k @ (r[kk] - frac * c[kk])))
                d = decs[kk]
                ds_pred.append(-frac * (d.q_marginals()[j] + d.k_marginals()[j]))
                pair = frac * frac * d.scaling * (d.q.M[:, j] @ d.k.M[:, j])
                # the bilinear score: the change is exactly the marginals' and the pair's
                assert float(s_new[-1] - s_old[-1]) == pytest.approx(float(ds_pred[-1] + pair), rel=1e-3, abs=1e-3)
            s_old, s_new, ds_pred = (torch.stack(x).double() for x in (s_old, s_new, ds_pred))
            assert torch.allclose(torch.softmax(s_old, 0), p_old, atol=1e-4)  # the frozen pattern
            i = keys.index(k)
            actual = float(torch.softmax(s_new, 0)[i] - p_old[i])
            predicted = float(p_old[i] * (ds_pred[i] - (p_old * ds_pred).sum()))
            agreement.append((L, h, q, k, frac, actual, predicted))
            if frac == 0.01:  # a small ablation: first order holds
                assert predicted == pytest.approx(actual, rel=0.03, abs=1e-5), agreement[-1]
            elif frac == 1.0:  # the whole source: the softmax's curvature shows, the sign and size hold
                assert predicted * actual > 0 and 1 / 3 < predicted / actual < 3, agreement[-1]
    print("\n(layer, head, q, k, fraction ablated, Δp actual, Δp first-order):")
    for row in agreement:
        print("  ", row[:5], f"{row[5]:+.5f} {row[6]:+.5f}")


@pytest.mark.real_model
def test_induction_heads_read_the_earlier_copy(real_rm):
    """On [<bos>] + S + S (S: 12 random tokens), the heads that attend from each token of the
    second copy to the position after its earlier copy (k = q - 11) are found from the
    patterns; their QK traces put the earlier copy itself (the key's previous token, k - 1,
    the same token as the query's) at the top of the key side, and the pair (the query's own
    token, that earlier copy) at the top of the pairs: the induction mechanism."""
    g = torch.Generator().manual_seed(0)
    m = 12
    seq = torch.randint(1000, 30000, (m,), generator=g)
    tokens = torch.cat([torch.tensor([2]), seq, seq])
    state = real_rm.run(tokens)
    maps, rows = QKMaps(state, real_rm.parts), EdgeRows(state, carry_prefix=True)
    qs = torch.arange(m + 1, len(tokens))
    score = torch.stack([torch.stack([maps.pattern(L, h)[qs, qs - m + 1].mean() for h in range(maps.n_heads)])
                         for L in range(maps.n_layers)])  # [n_layers, n_heads]: mean P[q, q - 11]
    heads = [divmod(int(f), maps.n_heads) for f in score.flatten().argsort(descending=True)[:2]]
    assert all(score[L, h] > 0.4 for L, h in heads), score
    tok = lambda col: col - rows.token_start if col >= rows.token_start else None  # noqa: E731
    hits, pair_hits, n = 0, 0, 0
    for L, h in heads:
        for q in qs[1::2].tolist():
            k = q - m + 1
            tr = decompose(rows, maps, L, h, q, k).summary(3, 3, maps.prob(L, h, q, k))
            top_k = tr.k_marginals[0][0]
            hits += tok(top_k) == k - 1
            pair_hits += (tok(tr.pairs[0][0]), tok(tr.pairs[0][1])) == (q, k - 1)
            n += 1
            print(f"L{L}.h{h} q={q} k={k} p={tr.prob:.2f}: top key-side {top_k} (pos {tok(top_k)}), "
                  f"top pair {tr.pairs[0][:2]}")
    print(f"induction heads {heads} (mean P[q, q-11] {[round(float(score[L, h]), 3) for L, h in heads]}): "
          f"top key-side source = the earlier copy in {hits}/{n}, top pair = (query token, earlier copy) "
          f"in {pair_hits}/{n}")
    assert hits >= 0.75 * n and pair_hits >= 0.5 * n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_explain_attention_in_model_precision(device, dtype):
    """fp32 and bf16 (CPU, and CUDA where there is one), with a 4-position prefix without
    nodes (a chat turn's): the report's splits sum to the graph's edges and its traces' scores
    are the fp64 model's, to the precision's rounding."""
    from cltrace.replacement import ReplacementModel

    ref = exact_tiny("plt+skip", skip_positions=4)
    low = tiny_replacement("plt+skip", dtype=torch.float32, skip_positions=4)  # the same weights
    rm = ReplacementModel(low.model.to(device=device, dtype=dtype), low.transcoders, dtype=dtype,
                          skip_positions=4)
    graph = attribute(TOKENS, rm, max_feature_nodes=None)
    result = prune(graph, 0.8, 0.85)
    trace = (3, 2, 7, 0)  # a key at <bos>, inside the prefix
    report = explain_attention(rm, graph, result, QKSettings(qk=True, qk_nodes=2, qk_trace=(trace,)))
    L = report.loadings
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    # an edge whose paths can cross only one attention layer (the target one layer above the
    # source's write; a token into layer 0) has no multi-hop part: the residual and one-hop
    # terms, computed in this precision, make up the whole edge
    table = graph.nodes()
    span = table.layer[report.edges[:, 0]] - table.layer[report.edges[:, 1]]  # attention layers crossed
    single = span == 1
    assert int(single.sum()) >= 3
    assert (L.multi_hop[single].abs() <= tol * L.edge.abs().max()).all()
    assert (L.one_hop[single].abs().sum((1, 2)) > 0).any()
    assert (graph.features[:, 1] >= 4).all()  # no feature in the prefix
    hand = next(t for t in report.traces if (t.layer, t.head, t.query_pos, t.key_pos) == trace)
    state64 = ref.run(torch.tensor(TOKENS))
    exact = QKMaps(state64, ref.parts).score(*trace)
    assert hand.score == pytest.approx(exact, rel=tol, abs=tol)
    assert sum(v for *_, v in hand.pairs) + hand.pairs_rest == pytest.approx(hand.score, rel=1e-6, abs=1e-6)
