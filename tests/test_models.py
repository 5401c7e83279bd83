"""Loading Gemma 3 models: local folders, multimodal checkpoints, dtypes, errors, the real 270M."""
from __future__ import annotations

import pytest
import torch

from cltrace.models import LoadedModel, load_config, load_model, resolve_dtype, resolve_device
from support.tiny_gemma import CAPITAL_WORDS, save_word_tokenizer


def tiny_text_config():
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                            head_dim=32, sliding_window=8)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A random 2-layer Gemma 3 (d_model 64) saved with save_pretrained, and its model."""
    from transformers import Gemma3ForCausalLM

    torch.manual_seed(0)
    model = Gemma3ForCausalLM(tiny_text_config()).eval()
    folder = tmp_path_factory.mktemp("tiny-gemma3")
    model.save_pretrained(folder)
    save_word_tokenizer(folder, CAPITAL_WORDS)
    return folder, model


IDS = torch.tensor([[2, 4, 5, 6, 7, 8]])  # <bos> the capital of france is


def test_load_local_folder(tiny_dir):
    folder, ref = tiny_dir
    lm = load_model(folder, device="cpu")
    assert isinstance(lm, LoadedModel) and lm.name == str(folder)
    assert type(lm.model).__name__ == "Gemma3ForCausalLM" and not lm.model.training
    assert lm.model.dtype == torch.float32
    assert lm.tokenizer("the capital of france is").input_ids[-5:] == IDS[0, 1:].tolist()
    with torch.no_grad():
        torch.testing.assert_close(lm.model(IDS).logits, ref(IDS).logits, rtol=0, atol=0)
    assert load_config(folder).hidden_size == 64


@pytest.mark.parametrize("dtype, want", [("bf16", torch.bfloat16), (torch.float64, torch.float64),
                                         ("float16", torch.float16)])
def test_dtypes(tiny_dir, dtype, want):
    lm = load_model(tiny_dir[0], device="cpu", dtype=dtype)
    assert lm.model.dtype == want
    assert all(p.dtype == want for p in lm.model.parameters())


def test_default_device_and_dtype():
    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert resolve_dtype(None, torch.device("cuda")) == torch.bfloat16
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="unknown dtype 'int3'"):
        resolve_dtype("int3", torch.device("cpu"))


def test_multimodal_checkpoint_gives_the_text_tower(tmp_path):
    from transformers import (Gemma3Config, Gemma3ForConditionalGeneration,
                              SiglipVisionConfig)

    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=2, image_size=28, patch_size=14)
    config = Gemma3Config(text_config=tiny_text_config().to_dict(),
                          vision_config=vision.to_dict(), mm_tokens_per_image=4,
                          image_token_index=120, boi_token_index=121, eoi_token_index=122)
    torch.manual_seed(1)
    full = Gemma3ForConditionalGeneration(config).eval()
    full.save_pretrained(tmp_path)
    save_word_tokenizer(tmp_path, CAPITAL_WORDS)
    lm = load_model(tmp_path, device="cpu")
    assert type(lm.model).__name__ == "Gemma3ForCausalLM"
    assert lm.model.config.model_type == "gemma3_text"
    assert not any("vision" in n for n, _ in lm.model.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(lm.model(IDS).logits, full(input_ids=IDS).logits)
    assert load_config(tmp_path).hidden_size == 64


def test_errors(tmp_path, tiny_dir, monkeypatch):
    with pytest.raises(ValueError, match="unknown model 'gemma-7'"):
        load_model("gemma-7")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model("weights/model.gguf")
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="must be a .gguf"):
        load_model(tmp_path / "model.bin")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json and no .gguf"):
        load_model(tmp_path / "empty")
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2))
    llama.save_pretrained(tmp_path / "llama")
    with pytest.raises(ValueError, match="'llama' model, not Gemma 3"):
        load_model(tmp_path / "llama")


def test_hub_id_offline_without_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OSError, match="google/gemma-3-1b-pt.*HF_HUB_OFFLINE"):
        load_model("google/gemma-3-1b-pt")


@pytest.mark.real_model
def test_real_gemma3_270m_capital_of_france(real_gemma):
    """The embedded Gemma 3 270M: " Paris" in the top 5 after "The capital of France is", and
    its next-token distribution is transformers' own Gemma3ForCausalLM's (eager attention, the
    reference implementation) on the same cached weights."""
    from transformers import Gemma3ForCausalLM as Reference

    from cltrace.models import embedded_model_dir

    lm = real_gemma
    cfg = lm.model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (18, 640, 2048)
    assert lm.model.dtype == torch.float32
    ids = lm.tokenizer("The capital of France is", return_tensors="pt").input_ids
    assert ids[0, 0].item() == lm.tokenizer.bos_token_id
    ref = Reference.from_pretrained(embedded_model_dir(), dtype=torch.float32,
                                    attn_implementation="eager").eval()
    with torch.no_grad():
        logits = lm.model(ids).logits[0]
        want = ref(ids).logits[0]
    # float32 rounding of the same computation in another order (measured 1.8e-5 at logits up
    # to 22.4; transformers' SDPA path: bit-identical)
    torch.testing.assert_close(logits, want, rtol=0, atol=1e-4)
    probs, ref_probs = logits[-1].double().softmax(-1), want[-1].double().softmax(-1)
    top = probs.topk(5)
    assert top.indices.tolist() == ref_probs.topk(5).indices.tolist()
    words = [lm.tokenizer.decode(int(i)) for i in top.indices]
    paris = lm.tokenizer.encode(" Paris", add_special_tokens=False)
    assert len(paris) == 1 and " Paris" in words, words
    # p(" Paris") = 0.0840 in both (measured 7e-6 apart, relative)
    assert probs[paris[0]].item() == pytest.approx(ref_probs[paris[0]].item(), rel=1e-4)


def test_embedded_model_cache_is_atomic(tmp_path, tiny_dir, monkeypatch):
    """The first use converts once into $CLTRACE_CACHE (temp dir + rename); a failed conversion
    leaves nothing behind; later uses load the cached copy."""
    import shutil

    from cltrace.models import load as models

    monkeypatch.setenv("CLTRACE_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_convert(pkg, tmp):  # stands in for the GGUF dequantization (tested by real_model)
        calls.append(tmp)
        if len(calls) == 1:
            raise RuntimeError("conversion interrupted")
        shutil.copytree(tiny_dir[0], tmp / "model")
        return tmp / "model"

    monkeypatch.setattr(models, "_convert_embedded", fake_convert)
    messages = []
    with pytest.raises(RuntimeError, match="interrupted"):
        load_model("gemma-3-270m", progress=messages.append)
    entries = tmp_path / "cache" / "models"
    assert list(entries.iterdir()) == []  # no partial entry, no temp dir
    lm = load_model("gemma-3-270m", device="cpu", progress=messages.append)
    assert lm.model.config.hidden_size == 64 and lm.name == "gemma-3-270m"
    assert [p.name for p in entries.iterdir()] == ["gemma-3-270m-q4_k_m"]
    assert "converting the embedded GGUF" in messages[0] and "cached" in messages[-1]
    n = len(messages)
    load_model("gemma-3-270m", device="cpu", progress=messages.append)
    assert len(calls) == 2 and len(messages) == n  # cached: no conversion, no message


@pytest.mark.real_model
def test_cached_tokenizer_equals_autotokenizer(real_gemma):
    """The embedded model's tokenizer, read straight from the cached tokenizer.json, gives
    AutoTokenizer's ids and texts (special tokens, chat turns, unicode, spaces, digits)."""
    from transformers import AutoTokenizer

    from cltrace.models import embedded_model_dir

    fast = real_gemma.tokenizer
    auto = AutoTokenizer.from_pretrained(embedded_model_dir())
    assert type(fast) is not type(auto)  # the fast path was taken
    texts = ["The capital of France is", " leading space", "<start_of_turn>user\nhi<end_of_turn>\n",
             "ünïcödé 😀 中文", "x = 12345 + 0.5e-3;\n\tdef f(): pass", "", "  many   spaces  "]
    for t in texts:
        for special in (True, False):
            a = auto(t, add_special_tokens=special)["input_ids"]
            assert fast(t, add_special_tokens=special)["input_ids"] == a, t
            assert fast.decode(a) == auto.decode(a)
    for tok in ("<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", "<pad>"):
        assert fast.convert_tokens_to_ids(tok) == auto.convert_tokens_to_ids(tok)
    assert (fast.bos_token_id, fast.eos_token_id) == (auto.bos_token_id, auto.eos_token_id)
    assert fast.encode(" Paris", add_special_tokens=False) == auto.encode(" Paris", add_special_tokens=False)
