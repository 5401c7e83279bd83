"""cltrace batch: the same graphs as cltrace attribute / a sequential run, byte for byte, from
local worker processes and a local Ray cluster; bad prompts recorded, lost workers' prompts
retraced, reruns resume, memory:// output, Ctrl-C, the recurring-feature summary."""
from __future__ import annotations

import functools
import json
import os
from collections import Counter
from pathlib import Path

import pytest

from cltrace.attribution import AttributionSettings
from cltrace.pipeline import PromptSpec, TraceSettings
from cltrace.batch.prompts import read_prompts, spec_from_row, spec_to_row
from cltrace.batch.runner import run_batch
from cltrace.batch.store import Store
from cltrace.batch.summary import summarize
from cltrace.cli import main
from support import batch as F
from support.numerics import torch_threads

SETTINGS = TraceSettings(AttributionSettings(max_feature_nodes=32, batch_size=16))
FLAGS = ["--max-feature-nodes", "32", "--batch-size", "16", "--quiet"]
GOOD = ["hello world", "the cat sat on", "crash here", "abc def"]
BAD = {"empty": "UsageError: the prompt is empty", "two-tokens": "a target must be one token"}
SPECS = [PromptSpec(p, p.replace(" ", "-")) for p in GOOD] + [
    PromptSpec("  ", "empty"), PromptSpec("xyz", "two-tokens", ("zz",))]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return str(F.save_tiny(tmp_path_factory.mktemp("tiny") / "tiny.pt"))


# Every run compared byte for byte uses one torch thread, as the workers here do (2 local
# workers on 2 cores, Ray actors of 1 CPU): a float32 forward of some shapes differs at the
# ulp level between thread counts on some CPUs (seen on AVX2-only AMD EPYC), see batch/README.md
THREADS = 1


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """This module traces at THREADS threads, as its workers do (restored after the module)."""
    with torch_threads(THREADS):
        yield


@pytest.fixture(scope="module")
def sequential(tiny, tmp_path_factory) -> dict:
    """{file name: bytes} of the batch traced in this process, one prompt after the other."""
    out = tmp_path_factory.mktemp("sequential")
    res = run_batch(SPECS, out, SETTINGS, functools.partial(F.load_tiny, tiny), workers=0,
                    threads=THREADS, progress=False)
    assert (res.ok, res.failed) == (len(GOOD), len(BAD))
    return {p.name: p.read_bytes() for p in out.iterdir() if p.name != "manifest.jsonl"}


def graphs(store: Store) -> dict:
    return {f"{s.slug}.json": store.get(f"{s.slug}.json") for s in SPECS if store.exists(f"{s.slug}.json")}


def check_batch(store: Store, sequential: dict, runs: int) -> list:
    """Every good prompt ok exactly once with the sequential run's bytes; each bad one failed
    once per run with its reason; graph-metadata.json as the sequential run's."""
    records = list(store.records())
    ok = Counter(r["slug"] for r in records if r["status"] == "ok")
    assert ok == Counter({s.slug: 1 for s in SPECS[:len(GOOD)]})
    assert graphs(store) == {k: v for k, v in sequential.items() if k.endswith(".json") and k != "graph-metadata.json"}
    assert store.get("graph-metadata.json") == sequential["graph-metadata.json"]
    for slug, reason in BAD.items():
        failed = [r for r in records if r["slug"] == slug]
        assert [r["attempt"] for r in failed] == list(range(1, runs + 1)) and reason in failed[0]["error"]
    for r in records:
        if r["status"] == "ok":
            assert r["n_nodes"] >= r["kept_nodes"] > 0 and r["kept_edges"] > 0 and r["features"]
            assert {"forward", "features", "prune", "export", "total"} <= set(r["times"])
            assert 0 <= r["scores"]["replacement"] <= 1 and r["worker"]
    return records


def test_attribute_and_batch_write_the_same_graph(tiny, sequential, tmp_path, monkeypatch):
    import cltrace.models
    import cltrace.training.starter

    rm, tok = F.load_tiny(tiny)
    monkeypatch.setattr(cltrace.models, "load_model", lambda *a, **k: cltrace.models.LoadedModel(rm.model, tok, "tiny"))
    monkeypatch.setattr(cltrace.training.starter, "starter_transcoders", lambda *a, **k: rm.transcoders)
    assert main(["attribute", "hello world", "--slug", "hello-world", "--out", str(tmp_path),
                 "--format", "json", *FLAGS]) == 0
    assert (tmp_path / "hello-world.json").read_bytes() == sequential["hello-world.json"]
    # ... and the CLI batch, in this process, the same again; --summary over its folder
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": s.prompt, "slug": s.slug, **(
        {"target": list(s.targets)} if s.targets else {})}) + "\n" for s in SPECS))
    out = tmp_path / "cli"
    assert main(["batch", str(prompts), "--out", str(out), "--workers", "0", *FLAGS]) == 3  # some failed
    check_batch(Store(out), sequential, runs=1)
    assert main(["batch", "--summary", str(out), "--min-count", "1"]) == 0
    assert (out / "features-summary.csv").read_text().startswith("layer,feature,count,fraction,mean_influence")


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{"prompt": \n')
    for argv, needle in [([str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "o")], "line 2: not JSON"),
                         ([str(tmp_path / "none.txt"), "--out", str(tmp_path / "o")], "cannot read"),
                         ([str(tmp_path / "bad.jsonl")], "give PROMPTS and --out"),
                         ([str(tmp_path / "bad.jsonl"), "--out", "x", "--node-threshold", "0"], "(0, 1]"),
                         (["--summary", str(tmp_path)], "no traced prompts")]:
        assert main(["batch", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and "\n" not in err, (needle, err)
    assert not (tmp_path / "o").exists()


def test_read_prompts(tmp_path):
    (tmp_path / "p.txt").write_text("The cat\n\n  \nthe cat\nDogs!\n")
    specs = read_prompts(tmp_path / "p.txt", chat=True)
    assert [(s.prompt, s.slug, s.chat) for s in specs] == [
        ("The cat", "the-cat", True), ("the cat", "the-cat-2", True), ("Dogs!", "dogs", True)]
    (tmp_path / "p.jsonl").write_text(
        '{"prompt": "a b", "slug": "a-b-2"}\n{"prompt": "a b", "target": [" x", " y"], "chat": true}\n'
        '{"prompt": "", "target_diff": [" F", " S"]}\n{"prompt": "q", "target_diff": [["a", "b"]]}\n')
    specs = read_prompts(tmp_path / "p.jsonl")
    assert [(s.slug, s.targets, s.chat) for s in specs] == [
        ("a-b-2", (), False), ("a-b", (" x", " y"), True), ("graph", ((" F", " S"),), False),
        ("q", (("a", "b"),), False)]
    for text, needle in [('{"slug": "x"}', "string 'prompt'"), ('{"prompt": "a", "slug": "a/b"}', "no '/'"),
                         ('{"prompt": "a", "slug": "s"}\n{"prompt": "b", "slug": "s"}', "used twice"),
                         ('{"prompt": "a", "target_diff": ["x"]}', "target_diff")]:
        (tmp_path / "e.jsonl").write_text(text + "\n")
        with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace("'", "'")):
            read_prompts(tmp_path / "e.jsonl")


def test_a_spec_round_trips_through_its_jsonl_row(tmp_path):
    (tmp_path / "p.jsonl").write_text(
        '{"prompt": "a b", "target": " x", "target_diff": [[" F", " S"], [" G", " H"]], "label": "A", "pair": 3}\n'
        '{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, '
        '{"role": "model", "content": "Sure"}], "slug": "conv", "chat": true}\n'
        '{"prompt": "plain"}\n')
    specs = read_prompts(tmp_path / "p.jsonl")
    rows = [json.loads(json.dumps(spec_to_row(s))) for s in specs]
    assert [spec_from_row(r, "row") for r in rows] == specs
    assert rows[0]["pair"] == "3" and rows[1]["messages"][0] == {"role": "system", "content": "Be brief."}
    with pytest.raises(ValueError, match="row: no 'slug'"):
        spec_from_row({"prompt": "x"}, "row")


@pytest.mark.slow
def test_local_workers(tiny, sequential, tmp_path):
    """2 spawned workers; one dies mid-prompt (its pool is restarted once and the prompts it
    held retraced); a rerun retries only the failed prompts, a third does nothing."""
    marker = tmp_path / "crashed"
    loader = functools.partial(F.load_tiny, tiny, "crash here", str(marker))
    store = Store(tmp_path / "out")
    res = run_batch(SPECS, store, SETTINGS, loader, workers=2, threads=THREADS, progress=False)
    assert marker.exists() and (res.ok, res.failed, res.skipped) == (len(GOOD), len(BAD), 0)
    check_batch(store, sequential, runs=1)
    res = run_batch(SPECS, store, SETTINGS, loader, workers=2, threads=THREADS, progress=False)
    assert (res.ok, res.failed, res.skipped) == (0, len(BAD), len(GOOD))
    records = check_batch(store, sequential, runs=2)
    assert len({r["worker"] for r in records}) >= 3  # a worker was replaced, then a new pool
    res = run_batch(SPECS, store, SETTINGS, loader, workers=2, threads=THREADS, progress=False)
    assert (res.ok, res.failed, res.skipped) == (0, 0, len(SPECS))
    assert len(list(store.records())) == len(records)
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.endswith(".tmp")]


def test_ctrl_c_leaves_nothing_half_written(tiny, sequential, tmp_path):
    store = Store(f"memory://{tmp_path}/interrupted")
    with pytest.raises(KeyboardInterrupt):
        run_batch(SPECS, store, SETTINGS, functools.partial(F.load_tiny, tiny, interrupt_on="crash here"),
                  workers=0, threads=THREADS, progress=False)
    names = store.fs.ls(store.root, detail=False)
    assert not [n for n in names if n.endswith(".tmp")]
    index = json.loads(store.get("graph-metadata.json"))  # lists what was done, nothing else
    assert [g["slug"] for g in index["graphs"]] == ["hello-world", "the-cat-sat-on"]
    res = run_batch(SPECS, store, SETTINGS, functools.partial(F.load_tiny, tiny), workers=0,
                    threads=THREADS, progress=False)
    assert (res.ok, res.skipped) == (2, 2)
    check_batch(store, sequential, runs=1)


@pytest.mark.parametrize("min_count", [1, 2])
def test_summary_counts(tiny, tmp_path, min_count):
    store = Store(f"memory://{tmp_path}/summary")
    run_batch(SPECS[:3], store, SETTINGS, functools.partial(F.load_tiny, tiny), workers=0, progress=False)
    data = json.loads(store.get("hello-world.json"))
    node = next(n for n in data["nodes"] if n["feature_type"] == "cross layer transcoder")
    node["clerp"] = "a label"
    store.put("hello-world.json", json.dumps(data).encode())
    layer, feat = (int(x) for x in node["jsNodeId"].removesuffix("-0").split("_"))
    rows = summarize(store, min_count=min_count)
    kept = [{(l, f) for l, f, _ in r["features"]} for r in store.records()]
    expect = Counter(k for s in kept for k in s)
    assert {(r.layer, r.feature): r.count for r in rows} == {k: c for k, c in expect.items() if c >= min_count}
    assert all(r.mean_influence > 0 and 0 < r.fraction <= 1 for r in rows)
    assert [r.count for r in rows] == sorted((r.count for r in rows), reverse=True)
    assert any(r.label == "a label" for r in rows if (r.layer, r.feature) == (layer, feat)) or expect[(layer, feat)] < min_count


@pytest.mark.ray
def test_ray_cluster(tiny, sequential, tmp_path, monkeypatch):
    """A local Ray cluster, 2 CPUs, output to memory://: the sequential run's bytes; an actor
    killed mid-prompt is replaced and its prompt retraced; a rerun retries the failed ones."""
    ray = __import__("ray") if os.environ.get("CI") else pytest.importorskip("ray")  # the test extra: CI runs it
    import cltrace

    here = Path(__file__).parent
    # the actors import this test's helpers and the cltrace this process runs (an installed
    # package in CI; a checkout with its built _C here), not the checkout's uncompiled sources
    package_root = str(Path(cltrace.__file__).resolve().parents[1])
    ray.init(num_cpus=2, log_to_driver=False, include_dashboard=False, runtime_env={"env_vars": {
        "PYTHONPATH": os.pathsep.join([str(here), package_root, os.environ.get("PYTHONPATH", "")])}})
    try:
        marker = tmp_path / "crashed"
        loader = functools.partial(F.load_tiny, tiny, "crash here", str(marker))
        store = Store(f"memory://{tmp_path}/ray")
        res = run_batch(SPECS, store, SETTINGS, loader, ray=True, threads=THREADS, progress=False)
        assert marker.exists() and (res.ok, res.failed) == (len(GOOD), len(BAD))
        check_batch(store, sequential, runs=1)
        res = run_batch(SPECS, store, SETTINGS, loader, ray=True, threads=THREADS, progress=False)
        assert (res.ok, res.failed, res.skipped) == (0, len(BAD), len(GOOD))
        check_batch(store, sequential, runs=2)
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_feature_pages_label_the_graphs(tiny, tmp_path):
    """With feature pages (a worker process): every graph is the file trace_prompt writes with
    the same pages (as cltrace attribute), its feature nodes labelled, the kept features' pages
    under features/ byte for byte; the summary carries the labels."""
    from cltrace.pipeline import trace_prompt
    from cltrace.features import FeaturePages

    pages_dir = F.build_tiny_pages(tiny, tmp_path / "pages")
    good = SPECS[:2]
    res = run_batch(good, tmp_path / "batch", SETTINGS,
                    functools.partial(F.load_tiny_with_pages, tiny, str(pages_dir)), workers=1,
                    threads=THREADS, progress=False)
    assert (res.ok, res.failed) == (2, 0)
    rm, tok = F.load_tiny(tiny)
    for spec in good:
        trace_prompt(rm, tok, spec, SETTINGS, tmp_path / "ref", pages=FeaturePages(pages_dir))
    ref = {p.relative_to(tmp_path / "ref").as_posix(): p.read_bytes() for p in (tmp_path / "ref").rglob("*.json")
           if p.name != "graph-metadata.json"}
    got = {p.relative_to(tmp_path / "batch").as_posix(): p.read_bytes() for p in (tmp_path / "batch").rglob("*.json")
           if p.name not in ("graph-metadata.json", "features-summary.json")}
    assert got == ref and sum(k.startswith("features/") for k in got) > 5
    for spec in good:
        data = json.loads(got[f"{spec.slug}.json"])
        feats = [n for n in data["nodes"] if n["feature_type"] == "cross layer transcoder"]
        assert feats and all(n["clerp"] for n in feats) and data["metadata"]["scan"] == "./data/features"
        assert all(f"features/{n['feature']}.json" in got for n in feats)
    records = [r for r in Store(tmp_path / "batch").records()]
    assert all(r["feature_pages"] > 0 and not any(f.startswith("features/") for f in r["files"]) for r in records)
    rows = summarize(str(tmp_path / "batch"), min_count=1)
    assert rows and all(r.label for r in rows)


def test_ray_actors_never_ask_more_than_their_share_of_the_cluster():
    """N actors of T threads on C CPUs ask at most C/N each (else the last ones would wait for
    CPUs the others hold until the end: a hang)."""
    from cltrace.ray_pool import actor_options

    for threads, n, cpus in [(2, 3, 2), (1, 4, 2), (8, 2, 16), (4, 1, 2)]:
        asked = actor_options(threads, False, n, cpus)["num_cpus"]
        assert asked * n <= cpus and min(threads, cpus / n) - 1e-4 <= asked <= threads
    assert actor_options(2, False)["num_cpus"] == 2
