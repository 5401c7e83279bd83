"""The fast-path tokenizer (cltrace.models.fast_tokenizer) on small random Gemma-pipeline
tokenizers built with the tokenizers library (no real model needed): the BPE's tie-breaking and expired heap entries (merges that give the
same token from different splits, runs of one character), byte fallback and added tokens, checked
against the library on random texts over a small alphabet; the compact file's life cycle
(written once, rebuilt when the tokenizer.json changes, a header-only file for an unsupported
pipeline)."""
from __future__ import annotations

import json
import random

import pytest

from cltrace.models.fast_tokenizer import compact
from cltrace.models.fast_tokenizer import tokenizer as tokmod

SPECIAL = {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>"}
ALPHABET = ["a", "b", "c", " ", "\n", "é", "中"]  # '😀' and 'ß' are not in the vocabulary


def save_random_tokenizer(folder, seed: int, n_merges: int = 120) -> None:
    """A tokenizer.json with Gemma 3's pipeline: specials, byte tokens, the alphabet, and random
    merges of existing tokens (some giving a token that already exists from another split)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, \
        processors

    rng = random.Random(seed)
    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>"])}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for ch in ALPHABET:
        vocab.setdefault(ch.replace(" ", "\u2581"), len(vocab))
    vocab["\n\n"] = len(vocab)
    merges, seen = [], set()
    while len(merges) < n_merges:
        toks = [t for t in vocab if not t.startswith("<")]
        a, b = rng.choice(toks), rng.choice(toks)
        if (a, b) in seen or len(a + b) > 6:
            continue
        seen.add((a, b))
        merges.append((a, b))
        vocab.setdefault(a + b, len(vocab))
    tk = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tk.normalizer = normalizers.Replace(" ", "\u2581")
    tk.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                    decoders.Fuse()])
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                      special_tokens=[("<bos>", 2)])
    tk.add_special_tokens([AddedToken(t, normalized=False) for t in
                           ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>"]])
    tk.add_tokens([AddedToken("\n\n", normalized=False, special=False)])
    tk.save(str(folder / "tokenizer.json"))


def _texts(rng: random.Random, n: int) -> list[str]:
    pieces = ALPHABET * 3 + ["😀", "ß", "<bos>", "<start_of_turn>", "<st", "\n\n", "  "]
    return [""] + ["".join(rng.choice(pieces) for _ in range(rng.randrange(1, 40)))
                   for _ in range(n)]


@pytest.mark.parametrize("seed", range(6))
def test_random_tokenizers_match_the_library(tmp_path, seed):
    from transformers import PreTrainedTokenizerFast

    save_random_tokenizer(tmp_path, seed)
    ref = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"), **SPECIAL)
    fast = tokmod.fast_tokenizer(tmp_path, SPECIAL)
    assert fast is not None and (tmp_path / compact.FILE).is_file()
    rng = random.Random(100 + seed)
    texts = _texts(rng, 1500)
    for special in (True, False):
        want = ref(texts, add_special_tokens=special)["input_ids"]
        bad = [t for t, w in zip(texts, want)
               if fast(t, add_special_tokens=special)["input_ids"] != w]
        assert not bad, bad[:5]
    V = len(ref)
    seqs = [[rng.randrange(V + 3) for _ in range(rng.randrange(12))] for _ in range(500)]
    seqs += [ref.encode(t) for t in texts[:200]]
    for skip in (True, False):
        assert fast.batch_decode(seqs, skip_special_tokens=skip) == \
            ref.batch_decode(seqs, skip_special_tokens=skip)
    assert fast._full is None


def test_compact_file_is_written_once_and_rebuilt_when_the_json_changes(tmp_path):
    save_random_tokenizer(tmp_path, 0)
    tj, bin_ = tmp_path / "tokenizer.json", tmp_path / compact.FILE
    assert compact.load(tj) is not None
    first = bin_.stat().st_mtime_ns
    assert compact.load(tj) is not None and bin_.stat().st_mtime_ns == first
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files
    save_random_tokenizer(tmp_path, 1)  # another tokenizer.json in the same folder
    fast = tokmod.fast_tokenizer(tmp_path, SPECIAL)
    from transformers import PreTrainedTokenizerFast

    ref = PreTrainedTokenizerFast(tokenizer_file=str(tj), **SPECIAL)
    texts = _texts(random.Random(7), 300)
    assert [fast.encode(t) for t in texts] == [ref.encode(t) for t in texts]


def test_unsupported_pipeline_gives_none_once(tmp_path):
    save_random_tokenizer(tmp_path, 0)
    tj = tmp_path / "tokenizer.json"
    d = json.loads(tj.read_text())
    d["decoder"]["decoders"].append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    tj.write_text(json.dumps(d))
    assert tokmod.fast_tokenizer(tmp_path, SPECIAL) is None
    bin_ = tmp_path / compact.FILE
    first = bin_.stat().st_mtime_ns  # a header-only file records the answer
    assert compact.load(tj) is None and bin_.stat().st_mtime_ns == first


def test_byte_value_follows_the_library_byte_fallback():
    from tokenizers import decoders

    dec = decoders.ByteFallback()
    for t in ["<0x41>", "<0xff>", "<0x+A>", "<0x-1>", "<0x 1>", "<0xG0>", "<0x410>", "<0x4>",
              "<0x0a>", "<0xé>", "<0x_1>", "<1x41>"]:
        b = compact.byte_value(t)
        assert dec.decode([t]) == (t if b < 0 else bytes([b]).decode(errors="replace")), t
