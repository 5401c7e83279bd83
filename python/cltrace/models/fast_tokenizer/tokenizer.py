"""A start-up-cheap tokenizer for cltrace's cached embedded model: the library's token ids and
texts, computed in Python from the compact form of its tokenizer.json (:mod:`.compact`). What
it supports and what goes to transformers is summed up in the package docstring
(:mod:`cltrace.models.fast_tokenizer`).

``transformers.PreTrainedTokenizerFast(tokenizer_file=...)`` costs 1.3-1.6 s of every start,
most of it the Rust library building 514,906 BPE merges. ``FastPathTokenizer`` loads the compact
form in milliseconds and answers the calls cltrace makes itself:

* ``tokenizer(text_or_list, add_special_tokens=, return_tensors=None|"pt")``, ``encode``:
  the added tokens are cut out first, as the library does (leftmost start, then the longest
  match, on the raw text); every other piece gets the normalizer (' ' -> '▁') and then BPE over
  its characters: characters missing from the vocabulary become their UTF-8 bytes' ``<0xXX>``
  tokens, then the adjacent pair of lowest merge rank (leftmost on ties) is merged until none is
  left; ``<bos>`` goes in front with ``add_special_tokens``. The result is an :class:`Encoded`
  (a dict of input_ids and attention_mask with attribute access and ``.to``, as a
  ``BatchEncoding``; there are no Rust ``Encoding`` objects);
* ``decode``, ``batch_decode``: the library's decoder chain: ids outside the vocabulary dropped,
  special added tokens dropped with ``skip_special_tokens``, '▁' -> ' ' in each token, runs of
  ``<0xXX>`` tokens joined into their bytes (one U+FFFD per byte token when those bytes are not
  valid UTF-8), then concatenated;
* ``convert_tokens_to_ids``, ``convert_ids_to_tokens``, ``len()``, ``bos_token``/``eos_token``/
  ``unk_token``/``pad_token``/``mask_token`` and their ``_id``, ``chat_template``.

Everything else (other arguments of these calls, ``get_vocab``, ``save_pretrained``,
``apply_chat_template``, ``backend_tokenizer``, ...) is delegated through ``__getattr__`` to the
full ``PreTrainedTokenizerFast`` on the same files, built on first need; so is encoding once the
Python BPE would cost more than that build (a text over ``LONG_TEXT`` characters, or over
``BUDGET`` characters encoded in all). Once the full tokenizer exists every call goes to it, and
setting a public attribute builds it and sets it there, so later calls see the setting. The
object is not a subclass of the transformers classes (``isinstance`` against them is False).
"""
from __future__ import annotations

import heapq
import re
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .compact import Compact
from .compact import load as load_compact

# Chosen by measurement (benchmarks/RESULTS_attribution.md, "Start-up"): the Python BPE encodes
# about 200k characters per second (load 4, its pair cache cold), the full tokenizer takes
# 1.3-2.3 s to build; so one call stays under ~0.25 s and all of them under ~1 s here.
LONG_TEXT = 50_000  # characters in one call: beyond, build the full tokenizer
BUDGET = 200_000  # characters encoded here in all: beyond, build it and use it from then on
_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token", "mask_token")


class Encoded(dict):
    """What the fast path's ``tokenizer(...)`` returns: ``input_ids`` and ``attention_mask``, read
    as keys or attributes, ``.to(device)`` for tensors, as transformers' ``BatchEncoding`` (not
    used: importing transformers costs ~0.7 s of a start)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device) -> "Encoded":
        return Encoded({k: v.to(device) if hasattr(v, "to") else v for k, v in self.items()})


class _Codec:
    """Encoding and decoding exactly as the tokenizers pipeline :mod:`.compact` accepts."""

    def __init__(self, c: Compact):
        self.c = c
        self.V = c.vocab_size
        self.added = {content: i for i, content, _ in c.added if content}
        self.special_ids = {i for i, _, special in c.added if special}
        by_first: dict = {}
        for content in self.added:
            by_first.setdefault(content[0], set()).add(len(content))
        self.lengths = {ch: sorted(ls, reverse=True) for ch, ls in by_first.items()}
        # where an added token may start: one of their first characters (never, without any)
        self.first = re.compile("[" + "".join(re.escape(ch) for ch in sorted(by_first)) + "]"
                                if by_first else "(?!)")
        self.pairs: dict = {}  # left * V + right -> (rank, merged id) or None, filled as met
        self.strings: dict = {}  # id -> token text, filled as met
        self._vocab: Optional[dict] = None

    # --- encoding ---

    def split(self, text: str) -> list:
        """The text cut at the added tokens: their ids (int) and the pieces between (str)."""
        out, pos, added, lengths = [], 0, self.added, self.lengths
        for m in self.first.finditer(text):
            p = m.start()
            if p < pos:
                continue
            for n in lengths[text[p]]:
                i = added.get(text[p:p + n])
                if i is not None:
                    if p > pos:
                        out.append(text[pos:p])
                    out.append(i)
                    pos = p + n
                    break
        if pos < len(text):
            out.append(text[pos:])
        return out

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        ids = [self.c.bos_id] if add_special_tokens else []
        for part in self.split(text):
            if isinstance(part, int):
                ids.append(part)
            else:
                ids += self.bpe(part.replace(" ", "\u2581"))
        return ids

    def _lookup(self, keys: list) -> list:
        """(rank, merged id) or None for each pair key, through the searchsorted arrays."""
        pairs = self.pairs
        if len(pairs) > 2_000_000:  # a bound on the memo, far above what a text needs
            pairs.clear()
        miss = [k for k in keys if k not in pairs]
        K = self.c.merge_keys
        if miss and not len(K):
            pairs.update(dict.fromkeys(miss))
        elif miss:
            arr = np.array(miss, np.int64)
            idx = np.minimum(np.searchsorted(K, arr), len(K) - 1)
            hit = (K[idx] == arr).tolist()
            ranks, new = self.c.merge_rank[idx].tolist(), self.c.merge_new[idx].tolist()
            for k, h, r, n in zip(miss, hit, ranks, new):
                pairs[k] = (r, n) if h else None
        return [pairs[k] for k in keys]

    def _lookup1(self, k: int):
        """``_lookup([k])[0]`` without the array round trip (the BPE loop's one new pair)."""
        K = self.c.merge_keys
        i = int(K.searchsorted(k))
        m = (int(self.c.merge_rank[i]), int(self.c.merge_new[i])) if i < len(K) and K[i] == k \
            else None
        self.pairs[k] = m
        return m

    def bpe(self, word: str) -> list[int]:
        """The BPE ids of one normalized piece (the library's ``Word::merge_all``: a heap of
        (rank, position) over adjacent pairs, stale entries skipped)."""
        singles, byte_ids = self.c.singles, self.c.byte_ids
        sym = []
        for ch in word:
            i = singles.get(ch)
            if i is not None:
                sym.append(i)
            else:
                sym += [byte_ids[b] for b in ch.encode()]
        n = len(sym)
        if n < 2:
            return sym
        V = self.V
        heap = [(m[0], p, m[1]) for p, m in
                enumerate(self._lookup([a * V + b for a, b in zip(sym, sym[1:])])) if m is not None]
        heapq.heapify(heap)
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        prv = list(range(-1, n - 1))
        alive = [True] * n
        pairs, lookup, pop, push = self.pairs, self._lookup1, heapq.heappop, heapq.heappush
        while heap:
            _, p, new = pop(heap)
            q = nxt[p]
            if not alive[p] or q < 0:
                continue
            k = sym[p] * V + sym[q]
            m = pairs[k] if k in pairs else lookup(k)
            if m is None or m[1] != new:
                continue  # an expired entry
            sym[p] = new
            alive[q] = False
            r = nxt[q]
            nxt[p] = r
            if r >= 0:
                prv[r] = p
                k = new * V + sym[r]
                m = pairs[k] if k in pairs else lookup(k)
                if m is not None:
                    push(heap, (m[0], p, m[1]))
            left = prv[p]
            if left >= 0:
                k = sym[left] * V + new
                m = pairs[k] if k in pairs else lookup(k)
                if m is not None:
                    push(heap, (m[0], left, m[1]))
        out, p = [], 0
        while p >= 0:
            out.append(sym[p])
            p = nxt[p]
        return out

    # --- decoding ---

    def token(self, i: int) -> str:
        s = self.strings.get(i)
        if s is None:
            off = self.c.offsets
            s = self.strings[i] = self.c.blob[int(off[i]):int(off[i + 1])].tobytes().decode()
        return s

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        """ids in [0, 2**32): the library's ``Tokenizer::decode`` with the Replace, ByteFallback,
        Fuse decoders."""
        V, special = self.V, self.special_ids
        keep = [i for i in ids if i < V and not (skip_special_tokens and i in special)]
        byteval = self.c.byteval[np.array(keep, np.int64)].tolist() if keep else []
        out, run = [], bytearray()
        for i, b in zip(keep, byteval):
            if b >= 0:
                run.append(b)
                continue
            if run:
                out.append(_bytes_text(run))
                run = bytearray()
            out.append(self.token(i).replace("\u2581", " "))
        if run:
            out.append(_bytes_text(run))
        return "".join(out)

    def token_to_id(self, token: str) -> Optional[int]:
        i = self.added.get(token)
        if i is None:
            if self._vocab is None:
                b, off = self.c.blob.tobytes(), self.c.offsets.tolist()
                self._vocab = {b[off[j]:off[j + 1]].decode(): j for j in range(self.V)}
            i = self._vocab.get(token)
        return i


def _bytes_text(run: bytearray) -> str:
    try:
        return run.decode("utf-8")
    except UnicodeDecodeError:
        return "\ufffd" * len(run)


def _id_list(x) -> Optional[list]:
    """``x`` (one id or a sequence of ids: list, tuple, numpy, torch) as a list of Python ints
    in [0, 2**32), or None when it is anything else (a batch, a float, a negative id, ...)."""
    if hasattr(x, "tolist") and not isinstance(x, (list, tuple)):
        x = x.tolist()
    if type(x) is int:
        x = [x]
    if not isinstance(x, (list, tuple)):
        return None
    out = []
    for i in x:
        if type(i) is not int:
            if not isinstance(i, np.integer):
                return None
            i = int(i)
        if not 0 <= i < 2 ** 32:
            return None
        out.append(i)
    return out


class FastPathTokenizer:
    """The embedded model's tokenizer: the common calls answered from the compact form, the rest
    delegated to the full ``PreTrainedTokenizerFast`` (see the module docstring)."""

    _OWN = frozenset({"_codec", "_config", "_make_full", "_full", "_chars", "_folder"})

    def __init__(self, codec: _Codec, config: dict, make_full: Callable, folder: Path):
        object.__setattr__(self, "_codec", codec)
        object.__setattr__(self, "_config", config)
        object.__setattr__(self, "_make_full", make_full)
        object.__setattr__(self, "_full", None)
        object.__setattr__(self, "_chars", 0)
        object.__setattr__(self, "_folder", folder)

    # --- the full tokenizer ---

    def full_tokenizer(self):
        """The ``PreTrainedTokenizerFast`` this object stands for, built on first call."""
        if self._full is None:
            object.__setattr__(self, "_full", self._make_full())
        return self._full

    def __getattr__(self, name):
        if name in FastPathTokenizer._OWN or (name.startswith("__") and name.endswith("__")):
            raise AttributeError(name)
        return getattr(self.full_tokenizer(), name)

    def __setattr__(self, name, value):
        setattr(self.full_tokenizer(), name, value)

    def __reduce__(self):
        if self._full is not None:
            return (_identity, (self._full,))
        return (fast_tokenizer, (self._folder, self._config))

    def __repr__(self):
        state = "built" if self._full is not None else "not built"
        return f"FastPathTokenizer({str(self._folder)!r}, full tokenizer {state})"

    def __len__(self):
        return len(self._full) if self._full is not None else self._codec.V

    # --- encoding ---

    def _fast_encode(self, text, add_special_tokens) -> Optional[list]:
        """The ids of ``text`` by the Python path, or None where the full tokenizer answers."""
        if self._full is not None or type(add_special_tokens) is not bool:
            return None
        texts = [text] if isinstance(text, str) else text
        n = sum(len(t) for t in texts)
        if n > LONG_TEXT or self._chars + n > BUDGET:
            return None
        object.__setattr__(self, "_chars", self._chars + n)
        return [self._codec.encode(t, add_special_tokens) for t in texts]

    def __call__(self, text=None, *args, **kwargs):
        add = kwargs.get("add_special_tokens", True)
        tensors = kwargs.get("return_tensors")
        batched = isinstance(text, (list, tuple)) and all(isinstance(t, str) for t in text)
        ok = not args and set(kwargs) <= {"add_special_tokens", "return_tensors"} and \
            (isinstance(text, str) or (batched and text)) and \
            (tensors is None or (tensors == "pt" and not batched))
        ids = self._fast_encode(text, add) if ok else None
        if ids is None:
            return self.full_tokenizer()(text, *args, **kwargs)
        mask = [[1] * len(x) for x in ids]
        if not batched and tensors is None:
            return Encoded(input_ids=ids[0], attention_mask=mask[0])
        if tensors == "pt":
            import torch

            return Encoded(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
        return Encoded(input_ids=ids, attention_mask=mask)

    def encode(self, text, *args, **kwargs):
        ids = None
        if isinstance(text, str) and not args and set(kwargs) <= {"add_special_tokens"}:
            ids = self._fast_encode(text, kwargs.get("add_special_tokens", True))
        return self.full_tokenizer().encode(text, *args, **kwargs) if ids is None else ids[0]

    # --- decoding ---

    def decode(self, token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=None,
               **kwargs):
        if self._full is None and not kwargs and type(skip_special_tokens) is bool and \
                clean_up_tokenization_spaces in (None, False):  # None: the default, False
            rows = token_ids.tolist() if hasattr(token_ids, "tolist") and \
                not isinstance(token_ids, (list, tuple)) else token_ids
            if isinstance(rows, (list, tuple)) and rows and isinstance(rows[0], (list, tuple)):
                ids = [_id_list(r) for r in rows]
                if all(r is not None for r in ids):
                    return [self._codec.decode(r, skip_special_tokens) for r in ids]
            else:
                ids = _id_list(rows)
                if ids is not None:
                    return self._codec.decode(ids, skip_special_tokens)
        return self.full_tokenizer().decode(token_ids, skip_special_tokens=skip_special_tokens,
                                            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
                                            **kwargs)

    def batch_decode(self, sequences, skip_special_tokens=False, clean_up_tokenization_spaces=None,
                     **kwargs):
        rows = sequences.tolist() if hasattr(sequences, "tolist") and \
            not isinstance(sequences, (list, tuple)) else sequences
        if self._full is None and isinstance(rows, (list, tuple)) and \
                all(isinstance(r, (list, tuple)) or hasattr(r, "tolist") for r in rows):
            if not rows:
                return []
            out = self.decode([r.tolist() if hasattr(r, "tolist") else r for r in rows],
                              skip_special_tokens, clean_up_tokenization_spaces, **kwargs)
            if isinstance(out, list):
                return out
        return self.full_tokenizer().batch_decode(
            sequences, skip_special_tokens=skip_special_tokens,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces, **kwargs)

    # --- the vocabulary ---

    def convert_tokens_to_ids(self, tokens):
        if self._full is None:
            if isinstance(tokens, str):
                return self._token_id(tokens)
            if isinstance(tokens, (list, tuple)) and all(isinstance(t, str) for t in tokens):
                return [self._token_id(t) for t in tokens]
        return self.full_tokenizer().convert_tokens_to_ids(tokens)

    def _token_id(self, token: str) -> Optional[int]:
        i = self._codec.token_to_id(token)
        if i is None:
            unk = self._config.get("unk_token")
            return None if unk is None else self._codec.token_to_id(unk)
        return i

    def convert_ids_to_tokens(self, ids, skip_special_tokens=False):
        if self._full is None and skip_special_tokens is False:
            one = type(ids) is int
            lst = _id_list(ids) if one or isinstance(ids, (list, tuple)) else None
            if lst is not None:
                V = self._codec.V
                toks = [self._codec.token(i) if i < V else None for i in lst]
                return toks[0] if one else toks
        return self.full_tokenizer().convert_ids_to_tokens(ids, skip_special_tokens=skip_special_tokens)

    @property
    def chat_template(self):
        return self.full_tokenizer().chat_template if self._full is not None else None


def _special_property(name: str, with_id: bool):
    def get(self):
        if self._full is not None:
            return getattr(self._full, name + ("_id" if with_id else ""))
        token = self._config.get(name)
        return self._token_id(token) if with_id and token is not None else token
    get.__doc__ = f"The {name}{' id' if with_id else ''} (from tokenizer_config.json)."
    return property(get)


for _n in _SPECIAL_NAMES:
    setattr(FastPathTokenizer, _n, _special_property(_n, False))
    setattr(FastPathTokenizer, _n + "_id", _special_property(_n, True))


def _identity(x):
    return x


def _full_tokenizer(folder: Path, special: dict):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), **special)


def fast_tokenizer(folder: Path, special: dict) -> Optional[FastPathTokenizer]:
    """The fast-path tokenizer of ``folder``'s tokenizer.json with the special tokens ``special``
    (``{"bos_token": "<bos>", ...}``, as given to ``PreTrainedTokenizerFast``); None when the
    compact form does not support its pipeline."""
    folder = Path(folder)
    compact = load_compact(folder / "tokenizer.json")
    if compact is None:
        return None
    return FastPathTokenizer(_Codec(compact), dict(special), lambda: _full_tokenizer(folder, special),
                             folder)
