"""The fast-path tokenizer (cltrace.models.fast_tokenizer) against the library on the cached
embedded model's tokenizer.json: the same ids (corpus documents and random substrings of them, whitespace, byte fallback, every
added token inside text), the same decoded strings (random ids, byte runs valid and invalid
UTF-8, special ids, out-of-range ids), delegation of what the fast path does not answer, and
what a fresh process loads (the fast path, without importing transformers). Its load time is
measured in benchmarks/end_to_end/bench_tokenizer.py, not here: a wall-clock limit in a test
fails from machine load alone."""
from __future__ import annotations

import pickle
import random
import subprocess
import sys

import pytest
import torch

from cltrace.models.fast_tokenizer import tokenizer as tokmod

pytestmark = pytest.mark.real_model

SPECIAL = {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>",
           "mask_token": "<mask>"}


@pytest.fixture(scope="module")
def folder():
    from cltrace.models import embedded_model_dir

    return embedded_model_dir()


@pytest.fixture(scope="module")
def ref(folder):
    """The library tokenizer cltrace used before: PreTrainedTokenizerFast on the same file."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), **SPECIAL)


@pytest.fixture
def fast(folder, monkeypatch):
    """A fresh fast-path tokenizer that never hands encoding to the full one (no budget)."""
    monkeypatch.setattr(tokmod, "BUDGET", 10 ** 12)
    monkeypatch.setattr(tokmod, "LONG_TEXT", 10 ** 12)
    tok = tokmod.fast_tokenizer(folder, SPECIAL)
    assert tok is not None
    return tok


def _corpus() -> list[str]:
    from cltrace.training.corpus import language_reference, package_descriptions, stdlib_texts

    docs = stdlib_texts() + package_descriptions()[:600] + language_reference()[:400]
    rng = random.Random(0)
    subs = []
    for _ in range(3000):
        d = rng.choice(docs)
        a = rng.randrange(len(d))
        subs.append(d[a:a + rng.randrange(1, 400)])
    return docs + subs


EDGE = ["", " ", "  ", "     ", "\t", "\t\t x", "\n", "\n\n\n", "\n" * 40, "\t" * 40, " \n ", "\r\n",
        "a\r\nb", " leading", "trailing ", "  both  ", "x  y   z", "\u3000\xa0\u2009", "▁", "▁▁ ▁",
        "😀", "👩\u200d👩\u200d👧", "𠀀𠀁𪚥", "\U0010ffff", "\x00\x01\x7f", "\ufffd", "e\u0301",
        "ünïcödé 😀 中文", "x = 12345 + 0.5e-3;\n\tdef f(): pass", "<", "<<bos>>", "<bos><bos>",
        "<unused99", "<unused99>", "<unused9999>", "</td><td>", "<start_of_turn>user\nhi<end_of_turn>\n",
        "text <bos> inside", "a<eos>b<pad>c", "<start_of_image>", "[multimodal]x", "<0x41>", "<0xZZ>"]


def test_ids_equal_the_library(fast, ref):
    from cltrace.models.fast_tokenizer.compact import load

    texts = _corpus() + EDGE
    added = [a[1] for a in load(fast._folder / "tokenizer.json").added]
    rng = random.Random(1)
    texts += [f"a {t}b" for t in added] + ["".join(rng.sample(added, 3)) + " x" for _ in range(300)]
    for special in (True, False):
        want = ref(texts, add_special_tokens=special)["input_ids"]
        got = [fast(t, add_special_tokens=special)["input_ids"] for t in texts]
        bad = [t for t, g, w in zip(texts, got, want) if g != w]
        assert not bad, bad[:5]
    print(f"{len(texts)} texts ({sum(map(len, texts))} characters) compared, both ways")
    for t in EDGE + texts[:50]:
        assert fast.encode(t) == ref.encode(t)
        assert fast.encode(t, add_special_tokens=False) == ref.encode(t, add_special_tokens=False)
        a, b = fast(t, return_tensors="pt"), ref(t, return_tensors="pt")
        assert a.keys() == b.keys() and a["input_ids"].dtype == b["input_ids"].dtype
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert dict(fast(t)) == dict(ref(t))
    assert dict(fast(EDGE)) == dict(ref(EDGE))
    assert fast._full is None  # all of it answered by the fast path


def test_decode_equals_the_library(fast, ref):
    V = len(ref)
    byte_ids = ref.convert_tokens_to_ids([f"<0x{b:02X}>" for b in range(256)])
    utf8 = [ref.convert_tokens_to_ids(f"<0x{b:02X}>") for b in "é😀中".encode()]
    rng = random.Random(2)

    def draw():
        kind = rng.randrange(6)
        if kind == 0:
            return rng.choice(byte_ids)
        if kind == 1:
            return rng.randrange(300)  # specials, <unusedN>, newline/tab runs
        if kind == 2:
            return rng.randrange(V - 10, V + 10)  # the vocabulary's end and beyond it
        return rng.randrange(V)

    seqs = [[draw() for _ in range(rng.randrange(40))] for _ in range(3000)]
    seqs += [utf8, utf8[:-1], utf8[1:], utf8 + [2] + utf8[:2], [], [2], [V], byte_ids]
    for skip in (True, False):
        for s in seqs:
            assert fast.decode(s, skip_special_tokens=skip) == ref.decode(s, skip_special_tokens=skip), s
        assert fast.batch_decode(seqs, skip_special_tokens=skip) == \
            ref.batch_decode(seqs, skip_special_tokens=skip)
    t = torch.tensor(seqs[5][:8])
    assert fast.decode(t) == ref.decode(t) and fast.decode(7) == ref.decode(7)
    assert fast.decode(torch.tensor(8)) == ref.decode(torch.tensor(8))
    assert fast.batch_decode(t.view(2, -1)) == ref.batch_decode(t.view(2, -1))
    assert fast.batch_decode([[i] for i in range(2000)]) == ref.batch_decode([[i] for i in range(2000)])
    ids = [rng.randrange(V) for _ in range(2000)] + [V + 5]
    assert fast.convert_ids_to_tokens(ids) == ref.convert_ids_to_tokens(ids)
    assert fast.convert_ids_to_tokens(106) == ref.convert_ids_to_tokens(106)
    toks = ref.convert_ids_to_tokens(ids[:-1]) + ["not-a-token-zz", "<start_of_turn>"]
    assert fast.convert_tokens_to_ids(toks) == ref.convert_tokens_to_ids(toks)
    for name in ("bos", "eos", "unk", "pad", "mask"):
        assert getattr(fast, f"{name}_token") == getattr(ref, f"{name}_token")
        assert getattr(fast, f"{name}_token_id") == getattr(ref, f"{name}_token_id")
    assert len(fast) == len(ref) and fast.chat_template == ref.chat_template
    assert fast._full is None


def test_delegation_and_the_full_tokenizer(folder, ref):
    tok = tokmod.fast_tokenizer(folder, SPECIAL)
    assert tok("hi there")["input_ids"] == ref("hi there")["input_ids"] and tok._full is None
    assert pickle.loads(pickle.dumps(tok)).encode("a b") == ref.encode("a b")
    # a long text goes to the full tokenizer (building it), with the same ids
    long = "word " * (tokmod.LONG_TEXT // 5 + 1)
    assert tok.encode(long) == ref.encode(long) and tok._full is not None
    assert tok.get_vocab() == ref.get_vocab()
    assert tok.all_special_ids == ref.all_special_ids and tok.tokenize("a b") == ref.tokenize("a b")
    assert tok("a", padding="max_length", max_length=4)["input_ids"] == \
        ref("a", padding="max_length", max_length=4)["input_ids"]
    tok.padding_side = "left"  # set on the full tokenizer, which answers from now on
    assert tok.full_tokenizer().padding_side == "left" and tok.padding_side == "left"
    assert tok.decode([2, 106]) == ref.decode([2, 106])


def test_load_model_takes_the_fast_path(real_gemma):
    assert isinstance(real_gemma.tokenizer, tokmod.FastPathTokenizer)


def test_fresh_process_takes_the_fast_path_without_transformers(folder):
    from cltrace.models.load import _cached_tokenizer

    _cached_tokenizer(folder)  # the compact form exists from here on
    code = ("import sys, time, torch\n"
            "from cltrace.models.load import _cached_tokenizer, embedded_model_dir\n"
            "f = embedded_model_dir(); t = time.perf_counter(); tok = _cached_tokenizer(f)\n"
            "enc = tok('The capital of France is', return_tensors='pt')\n"
            "assert enc.input_ids.shape == (1, 6) and tok.decode(enc['input_ids'][0])\n"
            "print(type(tok).__name__, time.perf_counter() - t, 'transformers' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    name, seconds, imported = out.stdout.split()
    print(f"fast-path tokenizer built and used in {float(seconds):.3f} s (informative only; "
          "timed in benchmarks/end_to_end/bench_tokenizer.py)")
    # transformers itself is not imported (it is ~0.7 s of a start)
    assert name == "FastPathTokenizer" and imported == "False"
