"""cltrace's own Gemma 3 (cltrace.models.gemma3) equals transformers' Gemma3ForCausalLM: logits
(SDPA and eager), attention patterns, left-padded KV-cache generation step by step, config
layouts (transformers 5 and older hub configs), sharded and multimodal checkpoints; and a warm
load_model imports none of transformers' modeling stack."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from cltrace.models.gemma3 import Gemma3ForCausalLM
from cltrace.models.gemma3_config import config_from_dict, read_config
from cltrace.models.gemma3_load import from_transformers, load_gemma3

# (n_layers, heads, kv heads, head_dim, window, query_pre_attn_scalar, rope scaling)
CASES = {
    "gqa-sliding": (6, 4, 2, 16, 4, 16, None),
    "mqa-linear-rope": (4, 4, 1, 8, 3, 24, {"rope_type": "linear", "factor": 4.0}),
    "mha": (3, 2, 2, 32, 5, 32, None),
}


def hf_tiny(case: str, seed: int = 0):
    """A random transformers Gemma3ForCausalLM (norm gains random so they matter)."""
    from transformers import Gemma3TextConfig, Gemma3ForCausalLM as HF

    n, h, kv, hd, w, qs, scaling = CASES[case]
    types = ["full_attention" if i % 3 == 2 else "sliding_attention" for i in range(n)]
    rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0, **(scaling or {})}}
    cfg = Gemma3TextConfig(vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=n,
                           num_attention_heads=h, num_key_value_heads=kv, head_dim=hd,
                           sliding_window=w, layer_types=types, query_pre_attn_scalar=qs,
                           rope_parameters=rope, max_position_embeddings=128, rms_norm_eps=1e-5)
    torch.manual_seed(seed)
    model = HF(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.3) if "norm" in name else p.normal_(0.0, 0.2 if "embed" in name
                                                                 else p.shape[1] ** -0.5)
    return model.eval()


def close(a, b, rel=1e-5):
    err = (a - b).abs().max().item() / max(b.abs().max().item(), 1e-30)
    assert err <= rel, err


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_logits_and_patterns_equal_transformers(case, attn):
    hf = hf_tiny(case)
    ours = from_transformers(hf, case)
    assert type(ours) is Gemma3ForCausalLM and ours.model.layers[0].self_attn.sliding_window
    hf.set_attn_implementation(attn)
    ours.set_attn_implementation(attn)
    ids = torch.randint(0, 97, (2, 13))  # longer than every window
    pats = []
    hooks = [L.self_attn.register_forward_hook(lambda m, a, o: pats.append(o[1]))
             for L in ours.model.layers]
    with torch.no_grad():
        ref = hf(ids, output_attentions=attn == "eager")
        got = ours(input_ids=ids, use_cache=False)
        last = ours(ids, logits_to_keep=1).logits
    for h in hooks:
        h.remove()
    close(got.logits, ref.logits)
    close(last, ref.logits[:, -1:])
    if attn == "eager":
        for p, r in zip(pats, ref.attentions):
            close(p, r)
    else:
        assert all(p is None for p in pats)


@pytest.mark.parametrize("case", ["gqa-sliding", "mqa-linear-rope"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_left_padded_kv_cache_generation_equals_transformers(case, attn):
    """corpus.generated_texts' loop: left padding, attention_mask, position_ids, the cache."""
    hf = hf_tiny(case, seed=1)
    ours = from_transformers(hf, case)
    hf.set_attn_implementation(attn)
    ours.set_attn_implementation(attn)
    lens = [7, 3, 5]
    n = max(lens)
    g = torch.Generator().manual_seed(0)
    x = torch.stack([torch.cat([torch.zeros(n - k, dtype=torch.long),
                                torch.randint(1, 97, (k,), generator=g)]) for k in lens])
    mask = torch.stack([torch.cat([torch.zeros(n - k), torch.ones(k)]).long() for k in lens])
    pos = (mask.cumsum(1) - 1).clamp_min(0)
    real = mask.bool()
    runs = {}
    for name, model in (("hf", hf), ("ours", ours)):
        step, m, p, past, out = x, mask, pos, None, []
        with torch.no_grad():
            for _ in range(8):  # past the windows
                o = model(input_ids=step, attention_mask=m, position_ids=p, past_key_values=past,
                          use_cache=True)
                past = o.past_key_values
                out.append(o.logits)
                step = o.logits[:, -1:].argmax(-1) if name == "hf" else runs["hf"][1][len(out) - 1]
                m, p = torch.cat([m, torch.ones_like(step)], 1), p[:, -1:] + 1
        runs[name] = (out, [o[:, -1:].argmax(-1) for o in out])
    for i, (a, b) in enumerate(zip(runs["ours"][0], runs["hf"][0])):
        if i == 0:  # the prompt: padded positions are garbage in both
            a, b = a[real], b[real]
        close(a, b)
    # the cached steps equal one uncached pass over the whole sequence
    seq = torch.cat([x] + runs["hf"][1][:-1], 1)
    full_mask = torch.cat([mask, torch.ones(3, 7, dtype=torch.long)], 1)
    full_pos = (full_mask.cumsum(1) - 1).clamp_min(0)
    with torch.no_grad():
        full = ours(input_ids=seq, attention_mask=full_mask, position_ids=full_pos).logits
    close(torch.cat([o[:, -1:] for o in runs["ours"][0]], 1), full[:, n - 1:])


def test_old_hub_config_layout_reads_as_transformers_does(tmp_path):
    """google/gemma-3-1b-pt-style config.json (rope_theta, rope_local_base_freq, rope_scaling,
    sliding_window_pattern), and a sparse multimodal text_config (transformers' defaults)."""
    from transformers import AutoConfig

    old = {"model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"], "hidden_size": 48,
           "intermediate_size": 96, "num_hidden_layers": 7, "num_attention_heads": 4,
           "num_key_value_heads": 1, "head_dim": 16, "rope_theta": 500000, "vocab_size": 97,
           "rope_local_base_freq": 20000, "rope_scaling": {"rope_type": "linear", "factor": 8.0},
           "sliding_window": 4, "sliding_window_pattern": 3, "query_pre_attn_scalar": 16}
    multimodal = {"model_type": "gemma3", "text_config": {"hidden_size": 2560, "model_type":
                  "gemma3_text", "num_hidden_layers": 34, "intermediate_size": 10240,
                  "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024},
                  "vision_config": {"model_type": "siglip_vision_model"}}
    for i, raw in enumerate((old, multimodal)):
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "config.json").write_text(json.dumps(raw))
        ref = AutoConfig.from_pretrained(tmp_path / str(i))
        ref = getattr(ref, "text_config", ref)
        ours = read_config(tmp_path / str(i))
        assert ours.layer_types == ref.layer_types
        for t in ("full_attention", "sliding_attention"):
            want = {k: v for k, v in ref.rope_parameters[t].items() if v is not None}
            assert {k: float(v) if k != "rope_type" else v for k, v in ours.rope_parameters[t].items()} == \
                   {k: float(v) if k != "rope_type" else v for k, v in want.items()}, t
        for k in ("vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads",
                  "head_dim", "sliding_window", "query_pre_attn_scalar", "rms_norm_eps",
                  "max_position_embeddings", "intermediate_size"):
            assert getattr(ours, k) == getattr(ref, k), k
    # and the model built from the old layout equals transformers' on the same weights
    from transformers import Gemma3ForCausalLM as HF

    torch.manual_seed(0)
    hf = HF(AutoConfig.from_pretrained(tmp_path / "0")).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.normal_(0.0, 0.3) if "norm" in name else p.normal_(0.0, p.shape[1] ** -0.5)
    hf.save_pretrained(tmp_path / "saved")
    (tmp_path / "saved" / "config.json").write_text(json.dumps(old))  # the old layout on disk
    ours = load_gemma3(tmp_path / "saved", torch.float32)
    ids = torch.randint(0, 97, (1, 11))
    with torch.no_grad():
        close(ours(ids).logits, hf(ids).logits)


def test_sharded_checkpoint_and_dtype(tmp_path):
    hf = hf_tiny("gqa-sliding")
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ours = load_gemma3(tmp_path, torch.float32)
    ids = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, rtol=0, atol=0)
        from transformers import Gemma3ForCausalLM as HF

        hf16 = HF.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
        b16 = load_gemma3(tmp_path, torch.bfloat16)
        assert all(p.dtype == torch.bfloat16 for p in b16.parameters())
        assert b16.lm_head.weight is b16.model.embed_tokens.weight
        torch.testing.assert_close(b16(ids).logits, hf16(ids).logits, rtol=0, atol=0)


def test_unsupported_configs_raise_one_line_errors(tmp_path):
    base = {"model_type": "gemma3_text", "num_hidden_layers": 2}
    bad = [({"model_type": "llama"}, "'llama' model, not Gemma 3"),
           ({**base, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "rope_type 'yarn'"),
           ({**base, "use_bidirectional_attention": True}, "use_bidirectional_attention"),
           ({**base, "hidden_activation": "relu"}, "hidden_activation 'relu'"),
           ({**base, "layer_types": ["full_attention"]}, "layer_types must list 2")]
    for raw, msg in bad:
        with pytest.raises(ValueError, match=msg):
            config_from_dict(raw, str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({**base, "hidden_size": 8}))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_gemma3(tmp_path, torch.float32)


_HEAVY = ("transformers.modeling_utils", "transformers.models.gemma3.modeling_gemma3",
          "transformers.masking_utils", "torch._dynamo")


def _imports_after_load(target: str, heavy=_HEAVY) -> dict:
    """Which of ``heavy`` a fresh process has imported after ``cltrace.load_model(target)``."""
    code = ("import sys, json, cltrace; lm = cltrace.load_model(sys.argv[1], device='cpu'); "
            f"print(json.dumps({{m: m in sys.modules for m in {list(heavy)!r}}}))")
    out = subprocess.run([sys.executable, "-c", code, target], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_load_model_does_not_import_transformers_modeling(tmp_path):
    from support.tiny_gemma import CAPITAL_WORDS, save_word_tokenizer

    hf_tiny("mha").save_pretrained(tmp_path)
    save_word_tokenizer(tmp_path, CAPITAL_WORDS)
    # (AutoTokenizer, used for folders other than the embedded model's cache, imports the
    # lazy transformers.models.gemma3 package for its tokenizer mapping, not the modeling)
    assert not any(_imports_after_load(str(tmp_path)).values())


@pytest.mark.real_model
def test_real_270m_warm_load_imports_no_transformers(real_gemma):
    """With the cached copy's own tokenizer (cltrace.models.fast_tokenizer), a warm load_model
    of the embedded model imports no transformers at all."""
    assert not any(_imports_after_load("gemma-3-270m", _HEAVY + ("transformers",)).values())


@pytest.mark.real_model
def test_real_270m_equals_transformers(real_gemma):
    """The real Gemma 3 270M: logits (SDPA and eager) and patterns equal transformers'."""
    from transformers import AutoModelForCausalLM

    from cltrace.models import embedded_model_dir

    lm = real_gemma
    assert type(lm.model) is Gemma3ForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(embedded_model_dir(), dtype=torch.float32).eval()
    ids = lm.tokenizer("The capital of France is Paris, and the capital of Italy is",
                       return_tensors="pt").input_ids
    with torch.no_grad():
        close(lm.model(ids).logits, hf(ids).logits, rel=1e-4)
        hf.set_attn_implementation("eager")
        lm.model.set_attn_implementation("eager")
        pats = []
        hooks = [L.self_attn.register_forward_hook(lambda m, a, o: pats.append(o[1]))
                 for L in lm.model.model.layers]
        try:
            ref = hf(ids, output_attentions=True)
            got = lm.model(ids).logits
        finally:
            for h in hooks:
                h.remove()
            lm.model.set_attn_implementation("sdpa")
    close(got, ref.logits, rel=1e-4)
    for p, r in zip(pats, ref.attentions):
        close(p, r, rel=1e-4)


def test_save_pretrained_round_trips_and_transformers_reads_it(tmp_path):
    from transformers import Gemma3ForCausalLM as HF

    ours = from_transformers(hf_tiny("mqa-linear-rope"), "tiny")
    ours.save_pretrained(tmp_path)
    again = load_gemma3(tmp_path, torch.float32)
    hf = HF.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        want = ours(ids).logits
        torch.testing.assert_close(again(ids).logits, want, rtol=0, atol=0)
        torch.testing.assert_close(hf(ids).logits, want, rtol=0, atol=0)


def test_hub_id_from_the_hf_cache_offline(tmp_path, monkeypatch):
    """A hub id resolves through huggingface_hub's cache (offline here) to cltrace's model."""
    import huggingface_hub.constants as hc

    from cltrace.models import load_config, load_model
    from support.tiny_gemma import CAPITAL_WORDS, save_word_tokenizer

    commit = "0" * 40
    repo = tmp_path / "models--someone--tiny-gemma3"
    snap = repo / "snapshots" / commit
    hf = hf_tiny("gqa-sliding")
    hf.save_pretrained(snap)
    save_word_tokenizer(snap, CAPITAL_WORDS)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path))
    lm = load_model("someone/tiny-gemma3", device="cpu")
    assert type(lm.model) is Gemma3ForCausalLM and lm.model.config.name_or_path == "someone/tiny-gemma3"
    assert load_config("someone/tiny-gemma3").num_hidden_layers == 6
    ids = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids).logits, hf(ids).logits, rtol=0, atol=0)


def test_bin_checkpoint_is_read_by_transformers_and_adopted(tmp_path):
    from safetensors.torch import load_file

    from cltrace.models import load_model
    from support.tiny_gemma import CAPITAL_WORDS, save_word_tokenizer

    hf = hf_tiny("mha")
    hf.save_pretrained(tmp_path)
    save_word_tokenizer(tmp_path, CAPITAL_WORDS)
    torch.save(load_file(tmp_path / "model.safetensors"), tmp_path / "pytorch_model.bin")
    (tmp_path / "model.safetensors").unlink()
    lm = load_model(tmp_path, device="cpu")
    assert type(lm.model) is Gemma3ForCausalLM
    ids = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids).logits, hf(ids).logits, rtol=0, atol=0)
