"""``--qk`` on image prompts: head loadings and QK attribution where an image's soft tokens sit in
the prompt and attend both ways among themselves (multimodal Gemma 3), on the tiny random
multimodal Gemma 3 of :mod:`support.tiny_gemma_vision` in fp64 with exact norms.

The oracles are independent of cltrace.attention: the queries and keys transformers' own
``Gemma3ForConditionalGeneration`` computes on the same image prompt (recorded inside its eager
attention: the score of a head by hand, ``scaling · q · k``), and the frozen linear model run
forward from one source alone, with all heads, none, or one (the same brute force as
tests/test_attention.py for text). The pairs tested include a key AFTER its query inside one
image, which only the bidirectional image rule makes attend; a causal treatment of the image
leaves that score unexplained (:func:`test_a_causal_image_mask_would_not_explain_the_score`).
"""
from __future__ import annotations

import json

import pytest
import torch

from cltrace.attention.explain import explain_attention
from cltrace.attention.loadings import Sources, head_loadings
from cltrace.attention.maps import QKMaps
from cltrace.attention.qk import CONST, constant_streams, decompose, side
from cltrace.attention.settings import QKSettings
from cltrace.attribution import attribute
from cltrace.attribution.rows import EdgeRows
from cltrace.errors import UsageError
from cltrace.frozen.model import Seeds
from cltrace.graph import prune
from cltrace.models.multimodal import load_multimodal
from cltrace.replacement import ReplacementModel
from support.attention import check_attention_json, edge_by_forward, rel, source_write, stream_of, with_heads
from support.serve import browser  # noqa: F401  (fixture)
from support.tiny_gemma import exact_norms
from support.tiny_gemma_vision import IMAGE_SIZE, SOFT, SOFT_TOKENS, save_tiny_gemma_vision
from support.transcoders import random_transcoders

PROMPT = "what is in this picture <start_of_image> the cat sat on a <start_of_image> mat"
# <bos> what is in this picture <boi> [7 8 9 10] <eoi> the cat sat on a <boi> [18 19 20 21] <eoi> mat
IMAGE1, IMAGE2 = [7, 8, 9, 10], [18, 19, 20, 21]
# (layer, head, query, key): layer 2 is global, 0, 1, 3 slide with a window of 3 keys
AFTER = [(2, 1, 8, 10), (1, 3, 7, 9), (3, 2, 18, 21)]  # a key after its query inside one image
OTHERS = [(3, 0, 20, 19),  # inside image 2, key before query
          (2, 2, 23, 9),  # the last text token reading a soft token of image 1
          (2, 3, 19, 8),  # a soft token of image 2 reading one of image 1
          (1, 0, 11, 10)]  # <end_of_image> reading the last soft token
PAIRS = AFTER + OTHERS


def images(n: int = 2):
    g = torch.Generator().manual_seed(0)
    sizes = [(40, 70), (IMAGE_SIZE, IMAGE_SIZE)]
    return [torch.randint(0, 256, (3, *sizes[i % 2]), generator=g, dtype=torch.uint8) for i in range(n)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(model folder, multimodal model in fp64 with exact norms, its two-image prompt, replacement
    model with a CLT calibrated on the prompt's MLP inputs, transformers' model of the same
    folder in fp64 with exact norms): window 3, so the sliding layers cut into the images."""
    from cltrace.frozen.capture import capture
    from cltrace.models.anatomy import text_parts

    folder = tmp_path_factory.mktemp("qk-vision") / "model"
    hf = save_tiny_gemma_vision(folder, seed=1, window=3).to(torch.float64)
    exact_norms(hf.model.language_model)
    lm = load_multimodal(folder, device="cpu", dtype=torch.float64)
    exact_norms(lm.model)
    prompt = lm.prompt(PROMPT, images(2))
    assert [torch.nonzero(prompt.image_groups[0] == g).flatten().tolist() for g in (0, 1)] == [IMAGE1, IMAGE2]
    cap = capture(text_parts(lm.model), prompt.input_ids[0], inputs_embeds=lm.embed(prompt)[0],
                  image_groups=prompt.image_groups[0])
    mlp_in = torch.stack([c.mlp_in for c in cap.layers])  # [n_layers, n_pos, d_model]
    tcs = random_transcoders("clt", mlp_in=mlp_in, d_sae=48, skip=True)
    return folder, lm, prompt, ReplacementModel.from_multimodal(lm, tcs, dtype=torch.float64), hf


@pytest.fixture(scope="module")
def recorded(setup):
    """transformers' own post-RoPE queries and keys on the image prompt, per layer:
    ([H, n_pos, hd], [H_kv, n_pos, hd]), and its scaling."""
    from transformers.models.gemma3 import modeling_gemma3 as mg

    _, _, prompt, _, hf = setup
    seen, original = [], mg.eager_attention_forward

    def record(module, query, key, *args, **kwargs):
        seen.append((query[0].detach(), key[0].detach()))
        return original(module, query, key, *args, **kwargs)

    hf.model.language_model.set_attn_implementation("eager")  # the vision tower's as cltrace's
    mg.eager_attention_forward = record
    try:
        with torch.no_grad():
            hf(input_ids=prompt.input_ids, pixel_values=prompt.pixel_values.to(torch.float64),
               token_type_ids=(prompt.input_ids == SOFT).long())
    finally:
        mg.eager_attention_forward = original
    assert len(seen) == hf.config.text_config.num_hidden_layers
    return seen, hf.config.text_config.query_pre_attn_scalar ** -0.5


def score_by_hand(recorded, layer: int, head: int, query: int, key: int) -> float:
    """The head's pre-softmax score from transformers' own q and k: scaling · q · k."""
    seen, scaling = recorded
    q, k = seen[layer]
    rep = q.shape[0] // k.shape[0]
    return float(scaling * (q[head, query] @ k[head // rep, key]))


@pytest.fixture(scope="module")
def state(setup):
    return setup[3].run(setup[2], all_logits=False)


# --- the maps and the mask ----------------------------------------------------------------------


def test_maps_and_mask_at_image_positions(state, setup, recorded):
    """At every position (soft tokens included) the frozen maps give transformers' own q and k;
    the softmax of the maps' scores over the keys the captured pattern attends is that pattern;
    and a key after its query is attended exactly where both are soft tokens of one image,
    which is where QKMaps allows it."""
    rm = setup[3]
    maps = QKMaps(state, rm.parts)
    seen, _ = recorded
    n = state.n_pos
    groups = state.image_groups.tolist()
    worst = 0.0
    for L, (q, k) in enumerate(seen):
        for h in range(maps.n_heads):
            for p in range(n):
                worst = max(worst, float((maps.query_map(L, h, p) @ maps.resid(L, p) - q[h, p]).abs().max()),
                            float((maps.key_map(L, h, p) @ maps.resid(L, p) - k[h // maps.rep, p]).abs().max()))
            P = maps.pattern(L, h)  # [n, n]
            S = torch.tensor([[maps.score(L, h, a, b) for b in range(n)] for a in range(n)], dtype=torch.float64)
            S[P == 0] = float("-inf")
            assert torch.allclose(torch.softmax(S, -1), P, atol=1e-12)
            for a in range(n):
                for b in range(a + 1, n):
                    same_image = groups[a] >= 0 and groups[a] == groups[b]
                    assert bool(P[a, b] > 0) == same_image == maps.key_after_query_allowed(a, b), (L, h, a, b)
    assert worst < 1e-10


def test_bad_pairs_name_the_rule(state, setup):
    """Keys after the query outside one image are refused with one line naming the rule; the
    same pair in one image is allowed (no error)."""
    maps, rows = QKMaps(state, setup[3].parts), EdgeRows(state, carry_prefix=True)
    for q, k in [(12, 18), (10, 18), (5, 7), (21, 22)]:  # text -> image, image 1 -> image 2, ...
        with pytest.raises(UsageError, match=f"key position {k} comes after query position {q} and "
                                             "they are not soft tokens of one image"):
            decompose(rows, maps, 2, 0, q, k)
    maps.check(2, 0, 7, 10)
    maps.check(2, 0, 21, 18)


# --- QK attribution ------------------------------------------------------------------------------


@pytest.mark.parametrize("layer,head,q,k", PAIRS)
def test_qk_split_at_image_positions_matches_the_oracle(state, setup, recorded, layer, head, q, k):
    """The split of the score sums to transformers' own score (by hand from its q and k): every
    pair, each side's marginals with its constants; each source's column is that source alone
    forwarded through the frozen model and read by the map (soft-token vectors, features and
    errors at image positions among them, and for the pairs inside one image the soft tokens
    after the key, which reach it only both ways)."""
    rows, maps = EdgeRows(state, carry_prefix=True), QKMaps(state, setup[3].parts)
    fz = state.frozen
    d = decompose(rows, maps, layer, head, q, k)
    real = score_by_hand(recorded, layer, head, q, k)
    assert abs(real) > 1e-3
    assert rel(d.score, real) < 1e-9 and rel(maps.score(layer, head, q, k), real) < 1e-9
    assert rel(d.pair_matrix().sum(), real) < 1e-9
    assert rel(d.q_marginals().sum() + d.scaling * (d.q.const @ d.k.total), real) < 1e-9
    assert rel(d.k_marginals().sum() + d.scaling * (d.q.total @ d.k.const), real) < 1e-9
    const = constant_streams(rows, layer)
    assert torch.allclose(d.k.const, maps.key_map(layer, head, k) @ const[k], atol=1e-12)
    af = state.active_features()
    soft = IMAGE1 + IMAGE2
    at_image = [c for c in range(rows.n_features) if int(af.pos[c]) in soft]
    errors = [rows.error_start + L * state.n_pos + p for L in range(layer) for p in (q, k)]
    tokens = [rows.token_start + p for p in sorted(set(soft + [q, k]))]
    cols = tokens + errors + at_image[:: max(1, len(at_image) // 8)]
    checked = 0
    for col in cols:
        e, s = source_write(state, rows, col)
        r = stream_of(fz, layer, e, s)
        want_q, want_k = maps.query_map(layer, head, q) @ r[q], maps.key_map(layer, head, k) @ r[k]
        assert torch.allclose(d.q.M[:, col], want_q, atol=1e-10), col
        assert torch.allclose(d.k.M[:, col], want_k, atol=1e-10), col
        checked += int(bool((want_k != 0).any()))
    assert checked >= 5
    if k > q:  # inside one image: the later soft tokens reach the key's stream (layers >= 1)
        later = [rows.token_start + p for p in IMAGE1 + IMAGE2 if p > k and state.image_groups[p] == state.image_groups[k]]
        earlier_image = [rows.token_start + p for p in IMAGE1 + IMAGE2 if p > q and state.image_groups[p] == state.image_groups[q]]
        assert bool(d.q.M[:, earlier_image].abs().amax() > 0)  # later soft tokens into the query's stream
        if later:
            assert bool(d.k.M[:, later].abs().amax() > 0)
    tr = d.summary(6, 4, maps.prob(layer, head, q, k))
    assert (tr.query_pos, tr.key_pos) == (q, k) and tr.prob > 0
    assert rel(sum(v for *_, v in tr.pairs) + tr.pairs_rest, real) < 1e-9
    assert rel(sum(v for _, v in tr.q_marginals) + tr.q_rest + tr.q_constant, real) < 1e-9
    assert rel(sum(v for _, v in tr.k_marginals) + tr.k_rest + tr.k_constant, real) < 1e-9
    pm = d.pair_matrix()
    n = pm.shape[0] - 1
    for i, j, v in tr.pairs:
        assert pm[n if i == CONST else i, n if j == CONST else j] == pytest.approx(v, abs=1e-12)
    # a soft token is named by its cell
    assert d.source_name(rows.token_start + IMAGE1[1]) == "token 8 '<img 1:0,1>'"
    assert d.source_name(rows.token_start + 2) == "token 2 '<14>'"


def test_a_causal_image_mask_would_not_explain_the_score(state, setup, recorded):
    """For a key after its query inside one image the score is explained exactly (non-zero,
    transformers' own); with the frozen model treated as causal the request is refused, and
    sides built anyway miss the later soft tokens' contributions: their pairs no longer sum to
    the real score."""
    rm = setup[3]
    layer, head, q, k = 2, 1, 7, 9  # the first soft token of image 1 against the third
    real = score_by_hand(recorded, layer, head, q, k)
    rows, maps = EdgeRows(state, carry_prefix=True), QKMaps(state, rm.parts)
    d = decompose(rows, maps, layer, head, q, k)
    assert abs(real) > 1e-3 and rel(d.pair_matrix().sum(), real) < 1e-9
    later = [rows.token_start + p for p in (8, 9, 10)]
    assert bool(d.q.M[:, later].abs().amax() > 1e-3 * d.q.M.abs().amax())
    state.frozen.causal = True
    try:
        with pytest.raises(UsageError, match="comes after"):
            decompose(EdgeRows(state, carry_prefix=True), maps, layer, head, q, k)
        causal_rows = EdgeRows(state, carry_prefix=True)
        const = constant_streams(causal_rows, layer)
        qs = side(causal_rows, maps, maps.query_map(layer, head, q), layer, q, const)
        ks = side(causal_rows, maps, maps.key_map(layer, head, k), layer, k, const)
    finally:
        state.frozen.causal = False
    assert bool((qs.M[:, later] == 0).all())  # causal: nothing after the query reaches it
    Q = torch.cat([qs.M, qs.const[:, None]], 1)
    K = torch.cat([ks.M, ks.const[:, None]], 1)
    wrong = float(maps.scaling * (Q.sum(1) @ K.sum(1)))
    assert rel(wrong, real) > 1e-2


# --- head loadings -------------------------------------------------------------------------------


def test_head_loadings_at_image_positions_match_the_oracle(state, setup):
    """The head split of edges into soft-token features from sources at LATER soft tokens of the
    same image (only the image rule carries them), from soft-token vectors, text tokens and
    errors, and into a logit: each one-hop term is the frozen forward with that one head kept
    minus the one with none, and the residual is the one with none."""
    fz = state.frozen
    rows = EdgeRows(state, carry_prefix=True)
    af = state.active_features()
    feat = [i for i in range(len(af.pos)) if int(af.pos[i]) in (7, 8) and int(af.layer[i]) >= 2][:2]
    assert len(feat) == 2
    seeds = state.feature_seeds(af.layer[feat], af.pos[feat], af.feature[feat])
    logit = fz.logit_direction(torch.tensor([9]))
    targets = Seeds(torch.cat([seeds.layer, torch.tensor([fz.n_layers])]),
                    torch.cat([seeds.pos, torch.tensor([state.n_pos - 1])]), torch.cat([seeds.vec, logit]).to(fz.dtype))
    later = [i for i in range(len(af.pos)) if int(af.pos[i]) in (9, 10) and int(af.layer[i]) <= 1][:3]
    cols = [rows.token_start + p for p in (7, 10, 20, 3)] + [rows.error_start + 0 * state.n_pos + 10,
                                                               rows.error_start + 1 * state.n_pos + 8] + later
    writes = [source_write(state, rows, c) for c in cols]
    pos = torch.tensor([int(e.abs().sum(1).nonzero()[0]) if e.abs().sum() > 0 else int(s.abs().sum((0, 2)).nonzero()[0])
                        for e, s in writes])
    sources = Sources(pos, torch.stack([e[p] for (e, _), p in zip(writes, pos.tolist())]),
                      torch.stack([s[:, p] for (_, s), p in zip(writes, pos.tolist())]))
    T, S = targets.n, len(cols)
    t_idx, s_idx = torch.arange(T).repeat_interleave(S), torch.arange(S).repeat(T)
    got = head_loadings(rows, targets, sources, t_idx, s_idx, torch.tensor(cols))
    none = with_heads(fz, lambda L, h: False)
    single = {(L, h): with_heads(fz, lambda a, b: (a, b) == (L, h)) for L in range(fz.n_layers) for h in range(fz.n_heads)}
    backwards = 0
    for e in range(T * S):
        t, s = int(t_idx[e]), int(s_idx[e])
        tgt = Seeds(*(x[t:t + 1] for x in targets))
        emb, src = writes[s]
        full = edge_by_forward(fz, emb, src, tgt)
        assert got.edge[e] == pytest.approx(full, abs=1e-10)
        base = edge_by_forward(none, emb, src, tgt)
        assert got.residual[e] == pytest.approx(base, abs=1e-10)
        for (L, h), one_head in single.items():
            one = edge_by_forward(one_head, emb, src, tgt) - base
            assert got.one_hop[e, L, h] == pytest.approx(one, abs=1e-10)
        if int(pos[s]) > int(targets.pos[t]) and t < 2:  # a later soft token into an earlier one
            backwards += int(got.one_hop[e].abs().max() > 1e-6)
    assert backwards >= 4


# --- the whole report ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def graph(setup):
    prompt, rm = setup[2], setup[3]
    return attribute(prompt, rm, batch_size=16, max_feature_nodes=None, prompt_text=PROMPT)


def test_explain_attention_on_an_image_graph(state, setup, recorded, graph):
    """explain_attention on the image prompt: the kept edges' split (edges from soft-token
    vectors and image features among them, the graph's own edges), the traces of the top heads
    and of a key after its query inside an image, with their identities and transformers'
    score; without the image prompt, or with a key no mask lets the query see, one line."""
    from cltrace.attention.explain import _columns, _logit_vectors, _sources, _target_seeds

    lm, prompt, rm = setup[1], setup[2], setup[3]
    result = prune(graph, 0.9, 0.95)  # (more soft-token edges kept than by the defaults)
    report = explain_attention(rm, graph, result, QKSettings(qk=True, qk_nodes=4, qk_trace=(AFTER[0],)),
                               prompt=prompt)
    r, c = result.edge_mask.nonzero(as_tuple=True)
    assert torch.equal(report.edges, torch.stack([graph.edge_targets[r], c], 1))
    fz, af = state.frozen, state.active_features()
    cols = _columns(graph, state, af, EdgeRows(state, carry_prefix=True))
    table = graph.nodes()
    soft = torch.tensor(IMAGE1 + IMAGE2)
    src = report.edges[:, 1]
    from_soft = torch.isin(table.pos[src], soft)
    picked = []
    for kind in (0, 1, 2):  # feature, error, token (soft-token vector) sources at image positions
        picked += ((table.kind[src] == kind) & from_soft).nonzero().flatten()[:3].tolist()
    assert len(picked) >= 6 and any(int(table.kind[report.edges[e, 1]]) == 2 for e in picked)
    logit_vecs = _logit_vectors(graph, state, rm, None)
    for e in picked:
        t_node, s_node = report.edges[e].tolist()
        one = _sources(graph, state, af, torch.tensor([s_node]), cols[[s_node]])
        tgt = _target_seeds(graph, state, torch.tensor([t_node]), logit_vecs)
        embed = torch.zeros(state.n_pos, fz.d_model, dtype=fz.dtype)
        writes = torch.zeros(fz.n_layers, state.n_pos, fz.d_model, dtype=fz.dtype)
        p = int(one.pos[0])
        embed[p], writes[:, p] = one.embed[0], one.writes[0]
        if int(table.kind[s_node]) == 2:
            assert torch.equal(one.embed[0], lm.embed(prompt)[0, p])  # the soft token vector
        assert edge_by_forward(fz, embed, writes, tgt) == pytest.approx(float(graph.edges[r[e], c[e]]), rel=1e-5, abs=1e-6)
        assert float(report.loadings.edge[e]) == float(graph.edges[r[e], c[e]])
    L = report.loadings
    assert torch.allclose(L.residual + L.one_hop.sum((1, 2)) + L.multi_hop, L.edge, atol=1e-6)
    assert report.trace_edges[0] is not None and len(report.traces) >= 2
    for tr in report.traces:
        real = score_by_hand(recorded, tr.layer, tr.head, tr.query_pos, tr.key_pos)
        assert rel(tr.score, real) < 1e-9
        assert rel(sum(v for *_, v in tr.pairs) + tr.pairs_rest, real) < 1e-9
        assert rel(sum(v for _, v in tr.q_marginals) + tr.q_rest + tr.q_constant, real) < 1e-9
    after = [tr for tr in report.traces if (tr.layer, tr.head, tr.query_pos, tr.key_pos) == AFTER[0]]
    assert len(after) == 1 and after[0].prob > 0
    contributors = [report.contributors.get((after[0].layer, i)) for i, _, _ in after[0].pairs]
    assert any(c is not None and c.kind == "token" and c.pos in IMAGE1 for c in contributors)
    for (Lh, (queries, rows_)) in report.patterns.items():
        assert queries.tolist() == list(range(state.n_pos))
        assert bool((rows_[8, 9:11] > 0).all())  # a soft token attends the later ones of its image
    with pytest.raises(UsageError, match="the graph's prompt has images"):
        explain_attention(rm, graph, result, QKSettings(qk=True))
    with pytest.raises(UsageError, match="not soft tokens of one image"):
        explain_attention(rm, graph, result, QKSettings(qk=True, qk_trace=((2, 0, 9, 19),)), prompt=prompt)


# --- the command line, the JSON and the viewer --------------------------------------------------


def write_ppm(path, image) -> None:
    """``image`` (RGB uint8 [3, H, W]) as a binary PPM file."""
    _, h, w = image.shape
    path.write_bytes(f"P6\n{w} {h}\n255\n".encode() + image.permute(1, 2, 0).contiguous().numpy().tobytes())


@pytest.fixture(scope="module")
def cli_graph(setup, recorded, tmp_path_factory):
    """(served folder, graph dict): ``cltrace attribute --image A --image B --qk --qk-trace``
    (a key after its query inside image 1) on the tiny checkpoint, fp32."""
    from cltrace.cli import main
    from support.layouts import write_circuit_tracer_clt

    folder, rm = setup[0], setup[3]
    root = tmp_path_factory.mktemp("qk-image-cli")
    tcs = write_circuit_tracer_clt(root / "tcs", rm.transcoders.to(dtype=torch.float32))
    files = []
    for i, im in enumerate(images(2)):
        files.append(root / f"pic{i}.ppm")
        write_ppm(files[-1], im)
    out = root / "served"
    L, h, q, k = AFTER[0]
    argv = ["attribute", PROMPT, "--model", str(folder), "--transcoders", str(tcs), "--out", str(out),
            "--slug", "pics", "--quiet", "--format", "json", "--device", "cpu", "--qk",
            "--qk-trace", f"{L}.{h}@{q}:{k}"]
    for f in files:
        argv += ["--image", str(f)]
    assert main(argv) == 0
    return out, json.loads((out / "pics.json").read_text())


def test_attribute_qk_cli_with_images(cli_graph, recorded, capsys):
    """The JSON of ``cltrace attribute --image ... --qk``: schema-valid, the attention fields
    consistent (every link split and summing to its weight, the traces' identities, every
    contributor a node), the requested trace with transformers' score (fp32), soft-token
    embedding nodes among the contributors and link sources."""
    _, data = cli_graph
    check_attention_json(data)
    tokens = data["metadata"]["prompt_tokens"]
    assert [tokens[p] for p in IMAGE1] == ["<img 1:0,0>", "<img 1:0,1>", "<img 1:1,0>", "<img 1:1,1>"]
    L, h, q, k = AFTER[0]
    tr = next(t for t in data["qk_traces"] if (t["layer"], t["head"], t["query_pos"], t["key_pos"]) == (L, h, q, k))
    assert "target" not in tr and tr["prob"] > 0
    assert tr["score"] == pytest.approx(score_by_hand(recorded, L, h, q, k), rel=1e-4)
    assert data["metadata"]["attention_settings"]["qk_trace"] == [[L, h, q, k]]
    nodes = {n["node_id"]: n for n in data["nodes"]} | data["qk_only_nodes"]
    refs = [i for t in data["qk_traces"] for i, j, _ in t["pair_wise_contributors"] for i in (i, j)]
    soft_refs = [r for r in refs if nodes[r]["feature_type"] == "embedding" and nodes[r]["ctx_idx"] in IMAGE1 + IMAGE2]
    assert soft_refs
    soft_links = [lk for lk in data["links"] if nodes[lk["source"]]["ctx_idx"] in IMAGE1 + IMAGE2]
    assert soft_links and all("heads" in lk for lk in soft_links)
    pattern = next(p for p in data["head_patterns"] if (p["layer"], p["head"]) == (L, h))
    assert pattern["pattern"][pattern["queries"].index(q)][k] > 0


@pytest.mark.browser
def test_viewer_opens_the_image_qk_graph(cli_graph, browser):
    """The viewer on the CLI's graph: the image panel drawn, the Heads tab lists the traces; the
    trace of a key after its query opens its head's pattern with that cell outlined; no JS
    error, no foreign request."""
    from support.serve import serving, watch_page

    folder, data = cli_graph
    L, h, q, k = AFTER[0]
    i = next(i for i, t in enumerate(data["qk_traces"]) if (t["layer"], t["head"], t["query_pos"], t["key_pos"]) == (L, h, q, k))
    with serving(folder) as url:
        page = browser.new_page()
        errors, foreign = watch_page(page, url)
        page.goto(f"{url}/#graph=pics.json")
        page.wait_for_function("document.body.dataset.ready === '1'", timeout=15000)
        assert page.locator('#image-list .icell[data-image="0"]').count() == SOFT_TOKENS
        page.click("#tab-heads")
        assert page.locator("#trace-list tr.trace-row").count() == len(data["qk_traces"])
        page.locator(f'#trace-list tr.trace-row[data-trace="{i}"] button.open-trace').click()
        assert page.evaluate("document.body.dataset.head") == f"{L}:{h}"
        active = page.locator("#head-body .tracecell.active")
        assert (active.get_attribute("data-r"), active.get_attribute("data-c")) == (str(q), str(k))
        block = page.locator("#head-body .trace.active")
        assert block.locator(".pairs tr.pair").count() == len(data["qk_traces"][i]["pair_wise_contributors"])
        page.close()
    assert errors == [] and foreign == []
