"""Loading transcoders: layouts round-trip and agree, loading is lazy, errors are clear."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from cltrace.transcoders import (LayerTranscoder, SafetensorsError, SafetensorsFile, TranscoderLoadError,
                                 TranscoderSet, load_transcoders)
from cltrace.transcoders.safetensors_mmap import is_file_backed
from support import layouts as S
from support.transcoders import MODEL_NAME, random_transcoders

PLT_WRITERS = {"gemmascope": S.write_gemmascope_plt, "circuit_tracer": S.write_circuit_tracer_plt}
CLT_WRITERS = {
    "gemmascope": S.write_gemmascope_clt,
    "gemmascope_short_w_dec": lambda d, ts: S.write_gemmascope_clt(d, ts, full_width=False,
                                                                   config=False),
    "circuit_tracer": S.write_circuit_tracer_clt,
}


def _load(path, **kw):
    ts = load_transcoders(path, **kw)
    ts.model_name = MODEL_NAME  # circuit-tracer files carry no model name
    return ts


@pytest.mark.parametrize("skip", [False, True], ids=["plain", "skip"])
@pytest.mark.parametrize("layout", sorted(PLT_WRITERS))
def test_plt_round_trip(tmp_path, layout, skip):
    ts = random_transcoders("plt", n_layers=3, skip=skip, seed=1)
    folder = PLT_WRITERS[layout](tmp_path / layout, ts)
    got = _load(folder)
    S.assert_sets_equal(ts, got)
    assert got.kind == "plt" and got.n_layers == 3 and got.info["skip"] == skip
    assert got.info["layout"] == f"{layout}_plt"


@pytest.mark.parametrize("skip", [False, True], ids=["plain", "skip"])
@pytest.mark.parametrize("layout", sorted(CLT_WRITERS))
def test_clt_round_trip(tmp_path, layout, skip):
    ts = random_transcoders("clt", n_layers=4, skip=skip, seed=2)
    got = _load(CLT_WRITERS[layout](tmp_path / layout, ts))
    S.assert_sets_equal(ts, got)
    assert [tc.n_out for _, tc in sorted(got.layers.items())] == [4, 3, 2, 1]
    assert got.sources_writing_to(2) == [0, 1, 2]


@pytest.mark.parametrize("kind", ["plt", "clt"])
def test_same_weights_give_identical_sets_in_every_layout(tmp_path, kind):
    ts = random_transcoders(kind, n_layers=3, skip=True, seed=3, dtype=torch.bfloat16)
    writers = PLT_WRITERS if kind == "plt" else CLT_WRITERS
    sets = [_load(w(tmp_path / name, ts)) for name, w in writers.items()]
    for other in sets[1:]:
        S.assert_sets_equal(sets[0], other)
    assert sets[0].dtype == torch.bfloat16


@pytest.mark.parametrize("layout", ["gemmascope_plt", "gemmascope_clt", "circuit_tracer_plt",
                                    "circuit_tracer_clt"])
def test_layer_subset(tmp_path, layout):
    kind = layout.rsplit("_", 1)[1]
    ts = random_transcoders(kind, n_layers=4, seed=4)
    writers = PLT_WRITERS if kind == "plt" else CLT_WRITERS
    folder = writers[layout.rsplit("_", 1)[0]](tmp_path / "set", ts)
    got = load_transcoders(folder, layers=[1, 3])
    assert sorted(got.layers) == [1, 3] and got.n_layers == 4
    for i in (1, 3):
        assert torch.equal(got.layers[i].W_dec, ts.layers[i].W_dec)
    with pytest.raises(TranscoderLoadError, match=r"no transcoders for layers \[7\]"):
        load_transcoders(folder, layers=[1, 7])


def test_gemmascope_variants_and_single_folders(tmp_path):
    root = tmp_path / "transcoder_all"
    small = random_transcoders("plt", n_layers=2, seed=5)
    big = random_transcoders("plt", n_layers=2, d_sae=48, skip=True, seed=6)
    S.write_gemmascope_plt(root, small, variant="width_16k_l0_small")
    S.write_gemmascope_plt(root, big, variant="width_16k_l0_big")
    with pytest.raises(TranscoderLoadError, match="width_16k_l0_big_affine, width_16k_l0_small"):
        load_transcoders(root)
    S.assert_sets_equal(small, _load(root / "width_16k_l0_small"))
    got = _load(root / "width_16k_l0_big_affine")
    S.assert_sets_equal(big, got)
    assert got.info["variant"] == "width_16k_l0_big_affine" and got.info["affine"]
    one = load_transcoders(root / "layer_1_width_16k_l0_small")  # a single layer's folder
    assert sorted(one.layers) == [1]
    assert torch.equal(one.layers[1].W_enc, small.layers[1].W_enc)
    with pytest.raises(TranscoderLoadError, match=r"layers \[0\]"):
        load_transcoders(root / "layer_1_width_16k_l0_small", layers=[0])


def test_lazy_tensors_are_file_backed_views(tmp_path):
    ts = random_transcoders("plt", n_layers=2, skip=True, seed=7)
    for name, writer in PLT_WRITERS.items():
        folder = writer(tmp_path / name, ts)
        got = load_transcoders(folder)
        for i, tc in got.layers.items():
            for key, t in tc.tensors().items():
                file = (folder / f"layer_{i}_width_16k_l0_small_affine/params.safetensors"
                        if name == "gemmascope" else folder / f"layer_{i}.safetensors")
                assert is_file_backed(t, file), (name, i, key)
        moved = got.to(dtype=torch.float64)  # asking for a dtype copies
        assert moved.dtype == torch.float64
        assert not is_file_backed(moved.layers[1].W_dec, file)
        assert torch.equal(moved.layers[0].W_enc, ts.layers[0].W_enc.double())


def _rss_file_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssFile:"):
                return int(line.split()[1]) * 1024
    pytest.skip("no RssFile in /proc/self/status")


def test_loading_does_not_read_the_decoders(tmp_path):
    """A 64 MiB decoder: loading (default verify) and reading 3 rows maps only a few pages."""
    d_model, d_sae = 64, 1 << 18
    ts = random_transcoders("plt", n_layers=1, d_model=d_model, d_sae=16, seed=8)
    tc = ts.layers[0]
    big = LayerTranscoder(W_enc=torch.randn(d_model, d_sae), b_enc=torch.zeros(d_sae),
                            threshold=torch.ones(d_sae), W_dec=torch.randn(d_sae, 1, d_model),
                            b_dec=tc.b_dec)
    S.write_circuit_tracer_plt(tmp_path, TranscoderSet("plt", 1, {0: big}))
    del big
    S.write_circuit_tracer_plt(tmp_path / "warm", ts)
    load_transcoders(tmp_path / "warm").layers[0].W_dec[[1]]  # imports and first-use costs
    before = _rss_file_bytes()
    got = load_transcoders(tmp_path, verify="none")
    rows = got.layers[0].W_dec[[5, 70_000, 200_000], 0]  # [3, d_model]
    assert rows.shape == (3, d_model)
    grown = _rss_file_bytes() - before
    assert grown < 16 << 20, f"{grown} bytes of the 128 MiB file were mapped in"
    # the default check (encoder) reads W_enc (64 MiB) but still not W_dec
    load_transcoders(tmp_path)
    assert _rss_file_bytes() - before < (64 + 16) << 20


def test_inconsistent_widths(tmp_path):
    ts = random_transcoders("plt", n_layers=2, seed=9)
    other = random_transcoders("plt", n_layers=2, d_sae=40, seed=9)
    ts.layers[1] = other.layers[1]
    S.write_circuit_tracer_plt(tmp_path, ts)
    with pytest.raises(TranscoderLoadError, match="inconsistent widths: layer 1 has 40"):
        load_transcoders(tmp_path)


def test_missing_layers_of_the_model(tmp_path):
    ts = random_transcoders("plt", n_layers=4, seed=10, layers=[0, 1, 3])
    S.write_gemmascope_plt(tmp_path, ts)
    config = SimpleNamespace(num_hidden_layers=4, hidden_size=16)
    with pytest.raises(TranscoderLoadError, match=r"missing transcoders for layers \[2\]"):
        load_transcoders(tmp_path, model_config=config)
    got = load_transcoders(tmp_path, model_config=config, layers=[0, 1, 3])
    assert got.n_layers == 4


def test_transcoders_for_another_model(tmp_path):
    S.write_gemmascope_plt(tmp_path, random_transcoders("plt", n_layers=2, seed=11))
    from transformers import Gemma3TextConfig

    config = Gemma3TextConfig(hidden_size=64, num_hidden_layers=2)
    with pytest.raises(TranscoderLoadError, match="d_model 16 but the model .* hidden_size 64"):
        load_transcoders(tmp_path, model_config=config)
    config = Gemma3TextConfig(hidden_size=16, num_hidden_layers=2)
    assert load_transcoders(tmp_path, model_config=config).d_model == 16
    # a config.json naming a real Gemma 3 size whose d_model differs from the weights
    cfg = tmp_path / "layer_0_width_16k_l0_small" / "config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()),
                               "model_name": "google/gemma-3-270m-pt"}))
    with pytest.raises(TranscoderLoadError, match="gemma-3-270m-pt.*d_model 640"):
        load_transcoders(tmp_path, layers=[0])


def test_truncated_and_corrupt_files(tmp_path):
    S.write_circuit_tracer_plt(tmp_path, random_transcoders("plt", n_layers=2, seed=12))
    path = tmp_path / "layer_1.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(SafetensorsError, match=r"layer_1.safetensors.*truncated"):
        load_transcoders(tmp_path)
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(SafetensorsError, match=r"layer_1.safetensors.*not JSON"):
        load_transcoders(tmp_path)
    path.write_bytes(b"\xff" * 64)
    with pytest.raises(SafetensorsError, match="does not fit"):
        SafetensorsFile(path)


def test_nan_weights(tmp_path):
    ts = random_transcoders("plt", n_layers=2, seed=13)
    ts.layers[1].W_dec[3, 0, 2] = math.nan
    S.write_gemmascope_plt(tmp_path / "dec", ts)
    load_transcoders(tmp_path / "dec")  # decoders are not scanned by default
    with pytest.raises(TranscoderLoadError, match="layer 1: W_dec contains NaN"):
        load_transcoders(tmp_path / "dec", verify="all")
    ts.layers[0].threshold[0] = math.inf
    S.write_circuit_tracer_plt(tmp_path / "thr", ts)
    with pytest.raises(TranscoderLoadError, match="layer 0: threshold contains NaN or inf"):
        load_transcoders(tmp_path / "thr")
    load_transcoders(tmp_path / "thr", verify="none")


@pytest.mark.parametrize("change, match", [
    ({"hf_hook_point_in": "blocks.0.hook_resid_pre"}, "not a hook point cltrace reads"),
    ({"hf_hook_point_out": "model.layers.1.post_feedforward_layernorm.output"},
     "a hook point of layer 1, but the folder is for layer 0"),
    ({"architecture": "topk"}, "architecture 'topk' is not supported"),
    ({"width": 999}, "width 999 but the weights have 32"),
    ({"affine_connection": True}, "affine_skip_connection is missing"),
])
def test_bad_gemmascope_config(tmp_path, change, match):
    S.write_gemmascope_plt(tmp_path, random_transcoders("plt", n_layers=1, seed=14))
    cfg = tmp_path / "layer_0_width_16k_l0_small" / "config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), **change}))
    with pytest.raises(TranscoderLoadError, match=match):
        load_transcoders(tmp_path)


def test_not_found_and_unknown_layouts(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a local folder"):
        load_transcoders(tmp_path / "nope")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(TranscoderLoadError, match="no transcoders found.*subfolders: sub"):
        load_transcoders(tmp_path / "empty")


def test_hub_reference_offline_from_cache(tmp_path, monkeypatch):
    """A hub reference resolves through huggingface_hub's cache when HF_HUB_OFFLINE is set."""
    import huggingface_hub.constants as hc

    repo, commit = "google/gemma-scope-2-270m-pt", "0123456789abcdef0123456789abcdef01234567"
    store = tmp_path / "hub" / ("models--" + repo.replace("/", "--"))
    (store / "refs").mkdir(parents=True)
    (store / "refs" / "main").write_text(commit)
    snap = store / "snapshots" / commit
    ts = random_transcoders("plt", n_layers=3, skip=True, seed=15)
    S.write_gemmascope_plt(snap / "transcoder_all", ts, variant="width_16k_l0_small")
    S.write_circuit_tracer_clt(snap / "clt" / "native", random_transcoders("clt", n_layers=3, seed=16))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    got = _load(f"{repo}/transcoder_all/width_16k_l0_small_affine")
    S.assert_sets_equal(ts, got)
    assert got.source == f"{repo}/transcoder_all/width_16k_l0_small_affine"
    assert load_transcoders(f"{repo}/clt/native@main").kind == "clt"
    with pytest.raises(FileNotFoundError, match="offline"):
        load_transcoders("google/gemma-scope-2-1b-pt/transcoder_all/width_16k_l0_small")


def test_circuit_tracer_config_yaml(tmp_path, monkeypatch):
    """A circuit-tracer config.yaml listing Gemma Scope 2 files by hf:// URI (from the cache,
    offline) and circuit-tracer files by relative path."""
    import huggingface_hub.constants as hc

    repo, commit = "google/gemma-scope-2-270m-pt", "89abcdef0123456789abcdef0123456789abcdef"
    store = tmp_path / "hub" / ("models--" + repo.replace("/", "--"))
    (store / "refs").mkdir(parents=True)
    (store / "refs" / "main").write_text(commit)
    ts = random_transcoders("plt", n_layers=3, skip=True, seed=19)
    S.write_gemmascope_plt(store / "snapshots" / commit / "transcoder_all", ts)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    uris = [f"hf://{repo}/transcoder_all/layer_{i}_width_16k_l0_small_affine/params.safetensors"
            for i in range(3)]
    yaml_dir = tmp_path / "ct-set"
    yaml_dir.mkdir()
    (yaml_dir / "config.yaml").write_text(
        "model_kind: transcoder_set\nfeature_input_hook: mlp.hook_in\n"
        "feature_output_hook: mlp.hook_out\ntranscoders:\n" + "".join(f"  - {u}\n" for u in uris))
    S.assert_sets_equal(ts, _load(yaml_dir))
    assert sorted(load_transcoders(yaml_dir, layers=[2]).layers) == [2]
    S.write_circuit_tracer_plt(yaml_dir / "files", ts)
    (yaml_dir / "config.yaml").write_text(
        "model_kind: transcoder_set\ntranscoders:\n"
        + "".join(f"  - files/layer_{i}.safetensors\n" for i in range(3)))
    got = _load(yaml_dir)
    S.assert_sets_equal(ts, got)
    assert got.info["layout"] == "circuit_tracer_yaml" and got.info["bytes"] > 0


def test_dtype_and_device_conversion(tmp_path):
    ts = random_transcoders("clt", n_layers=2, seed=20)
    folder = S.write_circuit_tracer_clt(tmp_path, ts)
    got = load_transcoders(folder, device="cpu", dtype="bf16")
    assert got.dtype == torch.bfloat16 and got.layers[0].W_dec.dtype == torch.bfloat16
    torch.testing.assert_close(got.layers[1].W_enc, ts.layers[1].W_enc.bfloat16())
    ts.layers[0].W_enc[0, 0] = 1e6  # finite in float32, inf in float16
    S.write_circuit_tracer_clt(tmp_path / "big", ts)
    load_transcoders(tmp_path / "big")
    with pytest.raises(TranscoderLoadError, match="layer 0: W_enc contains NaN or inf"):
        load_transcoders(tmp_path / "big", dtype=torch.float16)


def test_hub_download_fetches_only_the_asked_files(tmp_path, monkeypatch):
    """Online: the repository listing is planned, and only the asked layers' files are
    requested from snapshot_download (a fake Hub here, serving a local folder)."""
    import fnmatch
    import shutil

    import huggingface_hub as hf
    import huggingface_hub.constants as hc

    remote = tmp_path / "remote"
    S.write_gemmascope_plt(remote / "transcoder_all", random_transcoders("plt", n_layers=3, seed=21))
    S.write_gemmascope_plt(remote / "transcoder_all", random_transcoders("plt", n_layers=3, seed=22),
                           variant="width_262k_l0_big")
    S.write_gemmascope_clt(remote / "clt" / "width_16k_l0_small",
                           random_transcoders("clt", n_layers=3, seed=23))
    listing = [p.relative_to(remote).as_posix() for p in remote.rglob("*") if p.is_file()]
    asked = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None,
                               local_files_only=False, **kw):
        assert not local_files_only and repo_id == "google/gemma-scope-2-270m-pt"
        asked.append(sorted(allow_patterns))
        root = tmp_path / "cache" / (revision or "main")
        for f in listing:
            if any(fnmatch.fnmatch(f, pat) for pat in allow_patterns):
                (root / f).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(remote / f, root / f)
        return str(root)

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf, "list_repo_files", lambda repo_id, revision=None: listing)
    monkeypatch.setattr(hf, "snapshot_download", fake_snapshot_download)
    monkeypatch.chdir(tmp_path)
    ref = "google/gemma-scope-2-270m-pt/transcoder_all/width_262k_l0_big"
    got = load_transcoders(ref + "@v1", layers=[0, 2])
    assert sorted(got.layers) == [0, 2] and got.source == ref + "@v1"
    assert asked[-1] == [f"transcoder_all/layer_{i}_width_262k_l0_big/{f}"
                         for i in (0, 2) for f in ("config.json", "params.safetensors")]
    clt = load_transcoders("google/gemma-scope-2-270m-pt/clt/width_16k_l0_small")
    assert clt.kind == "clt" and sorted(clt.layers) == [0, 1, 2]
    assert len(asked[-1]) == 4  # 3 params_layer files + config.json
    one = load_transcoders("google/gemma-scope-2-270m-pt/clt/width_16k_l0_small@r2", layers=[1])
    assert asked[-1] == ["clt/width_16k_l0_small/config.json",
                         "clt/width_16k_l0_small/params_layer_1.safetensors"]
    assert one.n_layers == 3 and one.layers[1].n_out == 2  # known from the listing
    with pytest.raises(TranscoderLoadError, match="2 widths/L0s"):
        load_transcoders("google/gemma-scope-2-270m-pt/transcoder_all")
    with pytest.raises(FileNotFoundError, match="no files under transcoder/"):
        load_transcoders("google/gemma-scope-2-270m-pt/transcoder/width_16k_l0_small")
