"""cltrace batch with image rows (a JSONL ``images`` column) on the tiny random multimodal Gemma 3:
the graphs (JSON and the image copies beside it) are the files ``cltrace attribute --image``
writes for the same prompts, byte for byte, in-process, from 2 local worker processes and from
Ray actors; a text row of the same batch runs on the multimodal model as ``cltrace attribute``
runs it; an interrupted batch resumes at its image row; bad rows are one-line errors naming the
prompts file's line and the image file, before any model loads; the commands that do not trace
images refuse the column; ``cltrace serve`` of the batch folder shows the images.
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import pytest

from cltrace.batch.prompts import read_prompts, spec_from_row, spec_to_row
from cltrace.batch.store import Store
from cltrace.cli import main
from cltrace.errors import UsageError
from support import batch as F
from support.cli import one_line_error
from support.numerics import torch_threads
from support.serve import browser  # noqa: F401  (fixture)

THREADS = 1  # the workers' torch threads (2 workers on 2 cores): the reference runs at the same
ROWS = [  # relative image paths: from the prompts file's folder
    {"prompt": F.IMAGE_PROMPT, "images": "pics/a.png", "slug": "pic-a"},
    {"prompt": "the cat sat on a", "images": ["pics/b.ppm"], "chat": True},  # no placeholder: image first
    {"prompt": "what is in this picture", "slug": "text"},  # text only, on the same model
]
SLUGS = ["pic-a", "the-cat-sat-on-a", "text"]
GRAPH_FILES = {"pic-a": ["pic-a.image1.png", "pic-a.json"],
               "the-cat-sat-on-a": ["the-cat-sat-on-a.image1.ppm", "the-cat-sat-on-a.json"],
               "text": ["text.json"]}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(THREADS):
        yield


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(root, model folder, transcoders folder, prompts file): the tiny multimodal checkpoint,
    a CLT calibrated on an image prompt, two pictures under root/pics, ROWS as JSONL."""
    root = tmp_path_factory.mktemp("batch-images")
    model, tcs, _ = F.multimodal_files(root)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return root, model, tcs, prompts


def options(model, tcs) -> list[str]:
    return ["--model", str(model), "--transcoders", str(tcs), "--device", "cpu", "--format", "json",
            "--quiet"]


@pytest.fixture(scope="module")
def reference(files, tmp_path_factory) -> dict:
    """{file name: bytes} that ``cltrace attribute`` writes for each row (``--image`` for the
    image rows, the image paths given as on a command line, not through the prompts file)."""
    root, model, tcs, _ = files
    out = tmp_path_factory.mktemp("reference")
    opts = options(model, tcs) + ["--out", str(out)]
    assert main(["attribute", F.IMAGE_PROMPT, "--image", str(root / "pics" / "a.png"), "--slug", "pic-a", *opts]) == 0
    assert main(["attribute", "the cat sat on a", "--chat", "--image", str(root / "pics" / "b.ppm"), *opts]) == 0
    assert main(["attribute", "what is in this picture", "--slug", "text", *opts]) == 0
    return {p.name: p.read_bytes() for p in out.iterdir() if p.name != "graph-metadata.json"}


def check_folder(out: Path, reference: dict, root: Path) -> list[dict]:
    """Every row ok once; its files (graph JSON and image copies) the reference's bytes and
    listed in its manifest record with the image files read; the copies equal the pictures;
    graph-metadata.json lists the three graphs as each JSON's metadata does."""
    records = list(Store(out).records())
    assert sorted(r["slug"] for r in records if r["status"] == "ok") == sorted(SLUGS)
    assert sorted(r["slug"] for r in records) == sorted(SLUGS), [r.get("error") for r in records]
    got = {p.name: p.read_bytes() for p in out.iterdir() if p.name not in ("graph-metadata.json", "manifest.jsonl")}
    assert sorted(got) == sorted(reference) and got == reference
    pics = {"pic-a": [root / "pics" / "a.png"], "the-cat-sat-on-a": [root / "pics" / "b.ppm"]}
    for r in records:
        assert r["files"] == GRAPH_FILES[r["slug"]]
        assert r.get("images") == ([str(p) for p in pics[r["slug"]]] if r["slug"] in pics else None)
        data = json.loads(got[f"{r['slug']}.json"])
        images = data["metadata"]["info"].get("images", [])
        assert [im["file"] for im in images] == [n for n in GRAPH_FILES[r["slug"]] if not n.endswith(".json")]
        for im, src in zip(images, pics.get(r["slug"], [])):
            assert got[im["file"]] == src.read_bytes()
            assert [n["ctx_idx"] for n in data["nodes"] if n["feature_type"] == "embedding"
                    and im["positions"][0] <= n["ctx_idx"] <= im["positions"][1]]  # soft-token nodes kept
    index = json.loads((out / "graph-metadata.json").read_text())["graphs"]
    assert [g["slug"] for g in index] == sorted(SLUGS)
    return records


def test_batch_in_process_writes_the_attribute_files(files, reference, tmp_path, monkeypatch):
    """``--workers 0`` from another working folder: the image paths resolve against the
    prompts file's folder."""
    root, model, tcs, prompts = files
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    out = tmp_path / "out"
    assert main(["batch", str(prompts), "--out", str(out), "--workers", "0", *options(model, tcs)]) == 0
    check_folder(out, reference, root)


@pytest.mark.slow
def test_two_local_workers(files, reference, tmp_path):
    """2 spawned worker processes, each loading the multimodal replacement model once: the same
    bytes as cltrace attribute, traced outside this process; a rerun does nothing."""
    root, model, tcs, prompts = files
    out = tmp_path / "out"
    argv = ["batch", str(prompts), "--out", str(out), "--workers", "2", "--threads", str(THREADS), *options(model, tcs)]
    assert main(argv) == 0
    records = check_folder(out, reference, root)
    # traced in the spawned workers, not here (which of the 2 takes which row is the scheduler's:
    # one that loads first may take all 3 rows)
    assert 1 <= len({r["worker"] for r in records}) <= 2
    assert all(r["worker"].split(":")[1] != str(os.getpid()) for r in records)
    assert main(argv) == 0
    assert len(list(Store(out).records())) == len(SLUGS)


def test_qk_on_image_rows(files, tmp_path):
    """--qk on a batch with image rows: each row's JSON (attention fields included) is the bytes
    ``cltrace attribute --qk`` writes for it."""
    root, model, tcs, prompts = files
    opts = options(model, tcs) + ["--qk"]
    ref = tmp_path / "ref"
    assert main(["attribute", F.IMAGE_PROMPT, "--image", str(root / "pics" / "a.png"), "--slug", "pic-a",
                 "--out", str(ref), *opts]) == 0
    out = tmp_path / "out"
    assert main(["batch", str(prompts), "--out", str(out), "--workers", "0", *opts]) == 0
    assert (out / "pic-a.json").read_bytes() == (ref / "pic-a.json").read_bytes()
    assert json.loads((out / "pic-a.json").read_text())["qk_traces"]  # (the attention fields are there)


def test_resume_after_an_interrupt_at_an_image_row(files, reference, tmp_path, monkeypatch, capsys):
    """Ctrl-C while the second (image) row is traced: exit 130, the first row recorded, nothing
    of the second written; the rerun skips the first and traces the rest, the same files."""
    import cltrace.batch.worker as worker

    root, model, tcs, prompts = files
    real = worker.trace_prompt

    def interrupted(rm, tok, spec, *a, **k):
        if spec.slug == "the-cat-sat-on-a":
            raise KeyboardInterrupt
        return real(rm, tok, spec, *a, **k)

    out = tmp_path / "out"
    argv = ["batch", str(prompts), "--out", str(out), "--workers", "0", *options(model, tcs)]
    monkeypatch.setattr(worker, "trace_prompt", interrupted)
    assert main(argv) == 130
    assert [r["slug"] for r in Store(out).records()] == ["pic-a"]
    assert not [p for p in out.iterdir() if p.name.startswith("the-cat") or p.name.endswith(".tmp")]
    monkeypatch.setattr(worker, "trace_prompt", real)
    capsys.readouterr()
    assert main(argv) == 0
    assert "2 ok, 0 failed, 1 skipped" in capsys.readouterr().out
    check_folder(out, reference, root)


def test_bad_rows_are_one_line_errors_before_any_model_loads(files, tmp_path, capsys, monkeypatch):
    """A missing image file, a file that is not an image, a folder, more placeholders than
    images, images with messages, a bad 'images' value: one line naming the prompts file's line
    and the image file, exit 2; a text-only --model, no --transcoders: refused too; no
    model loaded, nothing written."""
    import cltrace.models
    import cltrace.models.multimodal as mm

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(mm, "load_multimodal", no_loading)
    monkeypatch.setattr(cltrace.models, "load_model", no_loading)
    root, model, tcs, _ = files
    (tmp_path / "notes.png").write_text("not an image\n")
    (tmp_path / "folder.png").mkdir()
    good = json.dumps({"prompt": "the cat", "images": str(root / "pics" / "a.png")})
    cases = [
        ({"prompt": "a <start_of_image> b", "images": "nope.png"}, [f"{tmp_path / 'nope.png'}", "no such image file"]),
        ({"prompt": "a <start_of_image> b", "images": ["notes.png"]}, ["notes.png", "not an image"]),
        ({"prompt": "a <start_of_image> b", "images": "folder.png"}, ["folder.png", "a folder"]),
        ({"prompt": "<start_of_image> a <start_of_image>", "images": [str(root / "pics" / "a.png")]},
         ["2 <start_of_image> placeholder(s) for 1 image(s)"]),
        ({"messages": [{"role": "user", "content": "hi"}], "images": ["x.png"]}, ["not with 'messages'"]),
        ({"prompt": "a", "images": 3}, ["'images' must be an image file or a list"]),
    ]
    out = tmp_path / "out"
    capsys.readouterr()
    for row, needles in cases:
        path = tmp_path / "p.jsonl"
        path.write_text(good + "\n" + json.dumps(row) + "\n")
        assert main(["batch", str(path), "--out", str(out), *options(model, tcs)]) == 2, row
        one_line_error(capsys, f"PROMPTS {path} line 2", *needles)
    path = tmp_path / "p.jsonl"
    path.write_text(good + "\n")
    for argv, needles in [(["--transcoders", str(tcs)], ["gemma-3-270m is text-only"]),
                          (["--model", str(model)], ["image rows need --transcoders"])]:
        assert main(["batch", str(path), "--out", str(out), *argv]) == 2, argv
        one_line_error(capsys, f"PROMPTS {path}", *needles)
    assert not out.exists()


def test_readers_without_images_refuse_the_column(files, tmp_path):
    """read_prompts without images_allowed (cltrace steer --prompts, cltrace contrast): an
    image row is an error naming its line, not a row whose images are dropped."""
    _, _, _, prompts = files
    with pytest.raises(UsageError, match=r"line 1: this command does not take image prompts \(column 'images'"):
        read_prompts(prompts)
    (tmp_path / "t.jsonl").write_text('{"prompt": "a", "images": []}\n')  # no image: a text row
    assert read_prompts(tmp_path / "t.jsonl")[0].images == ()


def test_image_rows_round_trip(files, tmp_path, monkeypatch):
    """read with images: absolute paths, the placeholder prepended where the row has none, the
    slug from the text; spec_to_row -> JSON -> spec_from_row gives the same spec, read from
    another working folder."""
    root, _, _, prompts = files
    specs = read_prompts(prompts, images_allowed=True)
    assert [s.slug for s in specs] == SLUGS
    assert specs[0].images == (str(root / "pics" / "a.png"),) and specs[0].prompt == F.IMAGE_PROMPT
    assert specs[1].images == (str(root / "pics" / "b.ppm"),) and specs[1].chat
    assert specs[1].prompt == "<start_of_image> the cat sat on a" and specs[2].images == ()
    rows = [json.loads(json.dumps(spec_to_row(s))) for s in specs]
    monkeypatch.chdir(tmp_path)
    assert [spec_from_row(r, "row") for r in rows] == specs


def test_each_image_file_is_decoded_once_per_read(files, tmp_path, monkeypatch):
    """Many questions about one picture: the file is read and decoded once when PROMPTS is read."""
    import cltrace.models.images as images

    root, _, _, _ = files
    decoded = []
    real = images.read_image
    monkeypatch.setattr(images, "read_image", lambda path: decoded.append(str(path)) or real(path))
    a, b = str(root / "pics" / "a.png"), str(root / "pics" / "b.ppm")
    (tmp_path / "q.jsonl").write_text("".join(json.dumps({"prompt": f"what {w}", "images": im}) + "\n" for w, im in
                                              [("red", a), ("blue", a), ("green", [b, a]), ("square", a)]))
    specs = read_prompts(tmp_path / "q.jsonl", images_allowed=True)
    assert sorted(decoded) == [a, b] and [len(s.images) for s in specs] == [1, 1, 2, 1]


@pytest.mark.browser
def test_serve_shows_the_batch_images(files, tmp_path, browser):
    """cltrace serve of a batch folder: each image graph draws its picture (the PNG as it is,
    the PPM converted by the server) with one heatmap cell per soft token, a click on a cell
    selects that soft token's embedding node; the text graph has no image panel; no JS error,
    no foreign request."""
    from PIL import Image

    from support.serve import serving, watch_page

    root, model, tcs, prompts = files
    out = tmp_path / "out"
    assert main(["batch", str(prompts), "--out", str(out), "--workers", "0", *options(model, tcs)]) == 0
    with serving(out) as url:
        page = browser.new_page()
        errors, foreign = watch_page(page, url)
        for slug, pic in [("pic-a", root / "pics" / "a.png"), ("the-cat-sat-on-a", root / "pics" / "b.ppm")]:
            data = json.loads((out / f"{slug}.json").read_text())
            info = data["metadata"]["info"]["images"][0]
            page.goto("about:blank")
            page.goto(f"{url}/#graph={slug}.json")
            page.wait_for_function("document.body.dataset.ready === '1'", timeout=15000)
            assert page.is_visible("#image-pane") and page.evaluate("document.body.dataset.images") == "1"
            page.wait_for_function("document.querySelector('#image-list img').complete")
            size = page.evaluate("[...document.querySelectorAll('#image-list img')].map(i => [i.naturalWidth, i.naturalHeight])")
            with Image.open(pic) as im:
                assert size == [list(im.size)], slug
            rows, cols = info["grid"]
            assert page.locator('#image-list .icell[data-image="0"]').count() == rows * cols == 4
            emb = {n["ctx_idx"]: n["node_id"] for n in data["nodes"] if n["feature_type"] == "embedding"}
            for r in range(rows):
                for c in range(cols):
                    page.click(f'#image-list .icell[data-r="{r}"][data-c="{c}"]')
                    assert page.evaluate("document.body.dataset.selected") == emb[info["positions"][0] + r * cols + c]
        page.goto("about:blank")
        page.goto(f"{url}/#graph=text.json")
        page.wait_for_function("document.body.dataset.ready === '1'", timeout=15000)
        assert page.is_hidden("#image-pane") and page.evaluate("document.body.dataset.images") == "0"
        page.close()
        assert errors == [] and foreign == []


@pytest.mark.ray
def test_ray_actors(files, reference, tmp_path):
    """Two Ray actors of a local cluster load the multimodal model (the command's picklable
    loader) and write the same bytes, into memory:// then copied out for the comparison."""
    ray = __import__("ray") if os.environ.get("CI") else pytest.importorskip("ray")
    import cltrace
    from cltrace.batch.runner import run_batch
    from cltrace.commands.batch import load_multimodal_for_worker
    from cltrace.pipeline import TraceSettings

    root, model, tcs, prompts = files
    package_root = str(Path(cltrace.__file__).resolve().parents[1])
    ray.init(num_cpus=2, log_to_driver=False, include_dashboard=False, runtime_env={"env_vars": {
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), package_root, os.environ.get("PYTHONPATH", "")])}})
    try:
        store = Store(f"memory://{tmp_path}/ray")
        loader = functools.partial(load_multimodal_for_worker, str(model), str(tcs), "cpu", None, "auto")
        res = run_batch(read_prompts(prompts, images_allowed=True), store, TraceSettings(), loader,
                        workers=2, ray=True, threads=THREADS, progress=False)
        assert (res.ok, res.failed) == (3, 0)
        out = tmp_path / "copied"
        out.mkdir()
        for name in store.fs.ls(store.root, detail=False):
            base = name.rsplit("/", 1)[-1]
            (out / base).write_bytes(store.get(base))
        check_folder(out, reference, root)
    finally:
        ray.shutdown()
