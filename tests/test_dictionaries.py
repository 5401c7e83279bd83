"""Dictionaries beyond transcoders: the sites of a Gemma 3 layer (recorded and replaced by
hooks, checked against identities of the block), and SAEs and crosscoders in the Gemma Scope
2 layout, read by the one loader with their sites, layers and errors."""
from __future__ import annotations

import json

import pytest
import torch

from cltrace.models.anatomy import text_parts
from cltrace.models.sites import SITES, hook_point, parse_hook, site_hooks, site_width
from cltrace.transcoders import TranscoderLoadError, load_transcoders
from cltrace.transcoders.checks import check_transcoders
from cltrace.transcoders.write import save_gemmascope
from support.tiny_gemma import TOKENS, tiny_gemma
from support.transcoders import random_transcoders




def test_hook_points_parse_back():
    for site in SITES:
        assert parse_hook(hook_point(site, 7)) == (site, 7)
        assert parse_hook(hook_point(site, "{L}")) == (site, None)
    assert parse_hook("blocks.3.hook_resid_post") is None
    with pytest.raises(ValueError, match="unknown site 'resid_pre'"):
        hook_point("resid_pre", 0)


def test_sites_satisfy_the_block_identities():
    """Recorded sites of every layer satisfy what a Gemma 3 block computes:
    o_proj(attn_out) is the attention output, and resid_post_L = resid_post_{L-1} +
    post_attention_layernorm(o_proj(attn_out_L)) + mlp_out_L, with resid_post_{-1} the
    scaled embedding; mlp_in_L = pre_feedforward_layernorm of the stream before the MLP."""
    model = tiny_gemma(n_layers=3, dtype=torch.float64)
    parts = text_parts(model)
    ids = torch.tensor([TOKENS])
    sites = [(s, L) for s in SITES for L in range(3)]
    with site_hooks(parts, record=sites) as rec:
        logits = model(ids).logits
    prev = parts.embed(ids)
    for L, block in enumerate(parts.layers):
        attn = block.post_attention_layernorm(block.self_attn.o_proj(rec["attn_out", L]))
        mid = prev + attn
        torch.testing.assert_close(rec["mlp_in", L], block.pre_feedforward_layernorm(mid),
                                   rtol=0, atol=1e-12)
        torch.testing.assert_close(rec["resid_post", L], mid + rec["mlp_out", L], rtol=0, atol=1e-12)
        assert rec["attn_out", L].shape[-1] == site_width(parts.config, "attn_out")
        prev = rec["resid_post", L]
    # the final norm and unembedding of the last resid_post are the logits
    torch.testing.assert_close(parts.lm_head(parts.norm(prev)), logits, rtol=0, atol=1e-10)


def test_site_edits_replace_the_activation():
    """An identity edit changes nothing; zeroing attn_out at layer 1 is zeroing that layer's
    o_proj; adding v to resid_post of the last layer adds norm-then-unembed of the sum."""
    model = tiny_gemma(n_layers=3, dtype=torch.float64)
    parts = text_parts(model)
    ids = torch.tensor([TOKENS])
    clean = model(ids).logits
    with site_hooks(parts, edit={(s, L): (lambda a: a) for s in SITES for L in range(3)}):
        assert torch.equal(model(ids).logits, clean)
    with site_hooks(parts, edit={("attn_out", 1): torch.zeros_like}):
        zeroed = model(ids).logits
    w = parts.layers[1].self_attn.o_proj.weight.data.clone()
    parts.layers[1].self_attn.o_proj.weight.data.zero_()
    torch.testing.assert_close(zeroed, model(ids).logits, rtol=0, atol=1e-12)
    parts.layers[1].self_attn.o_proj.weight.data.copy_(w)
    v = torch.randn(64, dtype=torch.float64)
    with site_hooks(parts, record=[("resid_post", 2)], edit={("resid_post", 2): lambda a: a + v}) as rec:
        steered = model(ids).logits
    torch.testing.assert_close(steered, parts.lm_head(parts.norm(rec["resid_post", 2] + v)),
                               rtol=0, atol=1e-10)


@pytest.mark.parametrize("site", ["resid_post", "attn_out", "mlp_out"])
def test_saes_round_trip_in_the_gemma_scope_layout(tmp_path, site):
    """SAEs written in the Gemma Scope 2 layout (``{site}_all/layer_{L}_width_.../``) load
    back with their site, weights and layers; without config.json the folder names the site."""
    ts = random_transcoders(n_layers=3, d_model=64, d_sae=32, site=site, seed=3)
    root = save_gemmascope(ts, tmp_path / f"{site}_all", l0="small")
    cfg = json.loads((root / "layer_1_width_32_l0_small" / "config.json").read_text())
    assert cfg["hf_hook_point_in"] == hook_point(site, 1) and "hf_hook_point_out" not in cfg
    got = load_transcoders(tmp_path / f"{site}_all" / "width_32_l0_small", layers=[0, 2],
                           model_config=tiny_gemma(n_layers=3))
    assert (got.site_in, got.site_out, sorted(got.layers)) == (site, site, [0, 2])
    assert got.what == f"SAEs at {site}" and not got.is_transcoder
    for L in (0, 2):
        for name, t in ts.layers[L].tensors().items():
            assert torch.equal(got.layers[L].tensors()[name], t), name
    for f in root.glob("*/config.json"):
        f.unlink()
    assert load_transcoders(root).site_in == site  # from the folder's name
    with pytest.raises(TranscoderLoadError, match="SAEs at .*need transcoders"):
        check_transcoders(got, "saes")


def test_crosscoder_writes_to_its_later_layers(tmp_path):
    """A crosscoder over layers 0, 2, 3: file i holds the features read at the i-th layer,
    whose decoder slices go to that layer and the later ones."""
    ts = random_transcoders(n_layers=4, d_model=64, d_sae=16, sites=[0, 2, 3], seed=5)
    root = save_gemmascope(ts, tmp_path / "crosscoder" / "layer_0_2_3_width_16_l0_medium")
    assert sorted(p.name for p in root.glob("*.safetensors")) == [
        f"params_layer_{i}.safetensors" for i in range(3)]
    got = load_transcoders(root, model_config=tiny_gemma(n_layers=4))
    assert got.sites == (0, 2, 3) and got.what == "crosscoder at resid_post"
    assert got.targets(2) == [2, 3] and got.sources_writing_to(3) == [0, 2, 3]
    assert got.sources_writing_to(1) == []
    for S in (0, 2, 3):
        for T in got.targets(S):
            assert torch.equal(got.decoder_slice(S, T), ts.decoder_slice(S, T))
    with pytest.raises(ValueError, match="do not write to layer 1"):
        got.decoder_slice(0, 1)
    (root / "params_layer_2.safetensors").unlink()
    with pytest.raises(TranscoderLoadError, match=r"needs params_layer_0..2"):
        load_transcoders(root)


def test_sae_errors_name_the_problem(tmp_path):
    from transformers import Gemma3TextConfig

    ts = random_transcoders(n_layers=2, d_model=64, d_sae=32, site="attn_out", seed=7)
    save_gemmascope(ts, tmp_path / "attn_out_all")
    narrow = Gemma3TextConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, head_dim=8)
    with pytest.raises(TranscoderLoadError, match="input width 64 but .* heads x head_dim 32"):
        load_transcoders(tmp_path / "attn_out_all", model_config=narrow)
    with pytest.raises(TranscoderLoadError, match=r"no transcoders for layers \[5\]"):
        load_transcoders(tmp_path / "attn_out_all", layers=[5])
    cfg = tmp_path / "attn_out_all" / "layer_1_width_32_l0_custom" / "config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "hf_hook_point_in": hook_point("resid_post", 1)}))
    with pytest.raises(TranscoderLoadError, match="layers read or write different sites"):
        load_transcoders(tmp_path / "attn_out_all")


def test_inspect_describes_the_sites(tmp_path, capsys):
    from cltrace.cli import main

    ts = random_transcoders(n_layers=4, d_model=64, d_sae=16, sites=[0, 2, 3], seed=9)
    root = save_gemmascope(ts, tmp_path / "crosscoder" / "layer_0_2_3_width_16_l0_small")
    assert main(["inspect", str(root), "--per-layer"]) == 0
    out = capsys.readouterr().out
    for text in ("crosscoder at resid_post", "reads resid_post, writes resid_post (layers 0,2-3)",
                 "gemmascope_crosscoder", "    0       16      0,2-3"):
        assert text in out, (text, out)
    assert main(["inspect", str(root), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["sites"] == [0, 2, 3] and summary["per_layer"][1]["writes_to"] == [2, 3]


def test_attribute_refuses_saes_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import cltrace.models
    from cltrace.cli import main

    def no_load(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(cltrace.models, "load_model", no_load)
    root = save_gemmascope(random_transcoders(n_layers=2, d_model=64, d_sae=16, site="mlp_out"),
                           tmp_path / "mlp_out_all")
    assert main(["attribute", "hello", "--transcoders", str(root), "--out", str(tmp_path / "g")]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # progress lines, then the one error line
    assert "holds SAEs at mlp_out; attribution graphs" in err[-1] and "Traceback" not in str(err), err
    assert not any((tmp_path / "g").iterdir())  # --out is made writable up front; nothing in it
