"""The compact binary form of a Gemma-style tokenizer.json, read in milliseconds.

``tokenizers.Tokenizer.from_file`` spends over a second building the 514,906 BPE merges of the
Gemma 3 tokenizer on every start. This module converts the tokenizer.json once into one file
beside it, ``tokenizer.cltrace.bin``, that :mod:`.tokenizer` memory-maps:

* ``offsets`` int64 [V+1], ``blob`` uint8: the UTF-8 text of token id i is
  ``blob[offsets[i]:offsets[i+1]]`` (the model vocabulary, every id 0..V-1 present);
* ``byteval`` int16 [V]: the byte a token stands for in the ByteFallback decoder (after the
  Replace decoder turned '▁' into ' '), -1 for every other token;
* ``merge_keys`` int64 [M], sorted: ``left_id * V + right_id`` of each merge; ``merge_rank`` and
  ``merge_new`` int32 [M]: its position in the merges list and the id of the merged token;
* ``single_ids`` int32: ids of the single-character tokens, whose characters are the header's
  ``singles`` string (the BPE's initial symbols);
* the header (JSON): the added tokens ``[id, content, special]``, the 256 ``<0xXX>`` byte-fallback
  ids, the ``<bos>`` id of the post-processor, and the size and mtime of the tokenizer.json it was
  made from (a different file means a rebuild).

Only one pipeline is supported, the one Gemma 3 ships (checked field by field in ``_supported``):
normalizer Replace ' ' -> '▁'; no pre-tokenizer or a Split on ' ' (a no-op after that
normalizer); BPE with byte_fallback, ignore_merges false, no dropout, prefix or suffix; added
tokens that are not normalized and have no lstrip/rstrip/single_word; a TemplateProcessing that
puts one special token before the sequence; decoder Replace '▁' -> ' ', ByteFallback, Fuse; no
truncation or padding. For anything else ``load`` answers None (and records that, so the
tokenizer.json is not re-parsed on every start), and the caller uses the library tokenizer.
"""
from __future__ import annotations

import json
import mmap
import os
import tempfile
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np

FILE = "tokenizer.cltrace.bin"
MAGIC = b"CLTTOK01"
_ALIGN = 64
_ARRAYS = ("offsets", "blob", "byteval", "merge_keys", "merge_rank", "merge_new", "single_ids")


class Compact(NamedTuple):
    """The tokenizer data :mod:`.tokenizer` encodes and decodes with (arrays memory-mapped)."""

    vocab_size: int
    offsets: np.ndarray
    blob: np.ndarray
    byteval: np.ndarray
    merge_keys: np.ndarray
    merge_rank: np.ndarray
    merge_new: np.ndarray
    singles: dict  # single character -> token id
    byte_ids: list  # byte value -> id of its <0xXX> token
    added: list  # [id, content, special] of every added token
    bos_id: int  # what add_special_tokens puts in front


def load(tokenizer_json: Path) -> Optional[Compact]:
    """The compact form of ``tokenizer_json``, built and written beside it on first use (tmp
    file + rename, so readers never see half a file); None when the tokenizer.json's pipeline
    is not the supported one, or when there is no file yet and its folder is not writable (the
    build, a few seconds, would then be paid on every start)."""
    path = tokenizer_json.parent / FILE
    stat = _source_stat(tokenizer_json)
    header = _read_header(path)
    if header is not None and header.get("source") == stat:
        return _map(path, header) if header["supported"] else None
    if not os.access(path.parent, os.W_OK):
        return None
    data = _build_file(tokenizer_json, stat)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-tokenizer-", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide it from the cache's other users
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError:
        pass
    header = _parse_header(data)
    return _compact(header, _arrays(data, header)) if header["supported"] else None


def _source_stat(tokenizer_json: Path) -> dict:
    st = tokenizer_json.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _read_header(path: Path) -> Optional[dict]:
    try:
        with open(path, "rb") as f:
            head = f.read(16)
            if head[:8] != MAGIC:
                return None
            return _parse_header(head + f.read(int.from_bytes(head[8:16], "little")))
    except (OSError, ValueError):
        return None


def _parse_header(data: bytes) -> dict:
    """The JSON header at the start of a compact file's bytes (ValueError if not one)."""
    if data[:8] != MAGIC:
        raise ValueError("not a compact tokenizer file")
    n = int.from_bytes(data[8:16], "little")
    return json.loads(data[16:16 + n])


def _arrays(buf, header: dict) -> dict:
    return {name: np.frombuffer(buf, dtype=dt, count=count, offset=off)
            for name, (off, dt, count) in header["arrays"].items()}


def _map(path: Path, header: dict) -> Compact:
    """The file's arrays memory-mapped (read-only, paged in as the tokenizer touches them)."""
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    return _compact(header, _arrays(buf, header))


def _compact(header: dict, arrays: dict) -> Compact:
    singles = dict(zip(header["singles"], arrays["single_ids"].tolist()))
    return Compact(header["vocab_size"], arrays["offsets"], arrays["blob"], arrays["byteval"],
                   arrays["merge_keys"], arrays["merge_rank"], arrays["merge_new"], singles,
                   header["byte_ids"], header["added"], header["bos_id"])


def _build_file(tokenizer_json: Path, stat: dict) -> bytes:
    """The compact file's bytes for a tokenizer.json (a header-only file if unsupported)."""
    built = _build(json.loads(tokenizer_json.read_text(encoding="utf-8")))
    header, arrays = built if built is not None else ({}, {})
    header.update(supported=built is not None, source=stat)
    return _serialize(header, arrays)


def _serialize(header: dict, arrays: dict) -> bytes:
    """The file's bytes: magic, header length, JSON header, then the arrays at aligned offsets
    (the header holds each array's offset from the file's start, dtype and length)."""
    layout, off = {}, 0
    for name in _ARRAYS if arrays else ():
        a = arrays[name]
        layout[name] = [off, a.dtype.str, int(a.size)]
        off += -(-a.nbytes // _ALIGN) * _ALIGN
    header = dict(header, arrays=layout)
    # the header's length shifts the arrays: fix the length first, then the offsets
    text = json.dumps(header, ensure_ascii=False).encode()
    start = -(-(16 + len(text) + 32) // _ALIGN) * _ALIGN
    header["arrays"] = {k: [o + start, dt, c] for k, (o, dt, c) in layout.items()}
    text = json.dumps(header, ensure_ascii=False).encode()
    assert 16 + len(text) <= start
    out = bytearray(MAGIC + len(text).to_bytes(8, "little") + text)
    out += b" " * (start - len(out))
    for name in layout:
        a = np.ascontiguousarray(arrays[name])
        out += a.tobytes()
        out += b"\0" * (-len(out) % _ALIGN)
    return bytes(out)


def _supported(d: dict) -> Optional[str]:
    """None when the tokenizer.json's pipeline is the one this module reproduces, else why not."""
    m = d.get("model") or {}
    checks = {
        "truncation": d.get("truncation") is None and d.get("padding") is None,
        "normalizer": d.get("normalizer") == {"type": "Replace", "pattern": {"String": " "},
                                              "content": "\u2581"},
        "pre_tokenizer": d.get("pre_tokenizer") in (None, {
            "type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious",
            "invert": False}),
        "model": m.get("type") == "BPE" and m.get("dropout") is None and m.get("byte_fallback") is True
        and not m.get("ignore_merges") and not m.get("continuing_subword_prefix")
        and not m.get("end_of_word_suffix"),
        "decoder": d.get("decoder") == {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"}]},
        "added_tokens": all(not (a.get("single_word") or a.get("lstrip") or a.get("rstrip")
                                 or a.get("normalized")) for a in d.get("added_tokens", ())),
    }
    bad = [k for k, ok in checks.items() if not ok]
    return ", ".join(bad) if bad else None


def _bos(d: dict) -> Optional[int]:
    """The one special-token id a TemplateProcessing puts before a single sequence, else None."""
    p = d.get("post_processor") or {}
    if p.get("type") != "TemplateProcessing":
        return None
    single = p.get("single") or []
    if len(single) != 2 or "SpecialToken" not in single[0] or "Sequence" not in single[1] \
            or single[1]["Sequence"].get("id") != "A":
        return None
    ids = (p.get("special_tokens") or {}).get(single[0]["SpecialToken"]["id"], {}).get("ids")
    return ids[0] if isinstance(ids, list) and len(ids) == 1 else None


def byte_value(token: str) -> int:
    """The byte the ByteFallback decoder reads in ``token`` (a token of 6 UTF-8 bytes, '<0x', two
    more bytes that Rust's ``u8::from_str_radix(_, 16)`` accepts, '>'), else -1."""
    b = token.encode()
    if len(b) != 6 or not b.startswith(b"<0x") or not b.endswith(b">"):
        return -1
    digits = b[3:5]
    hexd = b"0123456789abcdefABCDEF"
    if all(c in hexd for c in digits) or (digits[:1] == b"+" and digits[1] in hexd):
        return int(digits.decode(), 16)
    return -1


def _build(d: dict) -> Optional[tuple[dict, dict]]:
    """(header, arrays) of a supported tokenizer.json (parsed), else None."""
    if _supported(d) is not None or _bos(d) is None:
        return None
    vocab: dict = d["model"]["vocab"]
    V = len(vocab)
    tokens = [None] * V
    for t, i in vocab.items():
        if not 0 <= i < V or tokens[i] is not None:
            return None  # ids not exactly 0..V-1
        tokens[i] = t
    added = [[a["id"], a["content"], bool(a["special"])] for a in d.get("added_tokens", ())]
    if any(vocab.get(c) != i for i, c, _ in added):
        return None  # an added token outside the model vocabulary: not reproduced here
    byte_ids = [vocab.get(f"<0x{b:02X}>") for b in range(256)]
    if None in byte_ids:
        return None
    if _has_bad_byte_slice(tokens):
        return None
    enc = [t.encode() for t in tokens]
    offsets = np.zeros(V + 1, np.int64)
    np.cumsum([len(e) for e in enc], out=offsets[1:])
    blob = np.frombuffer(b"".join(enc), np.uint8)
    byteval = np.array([byte_value(t.replace("\u2581", " ")) for t in tokens], np.int16)
    pairs = [p.split(" ", 1) if isinstance(p, str) else p for p in d["model"]["merges"]]
    left = np.array([vocab[a] for a, _ in pairs], np.int64)
    right = np.array([vocab[b] for _, b in pairs], np.int64)
    new = np.array([vocab[a + b] for a, b in pairs], np.int32)
    keys = left * V + right
    rank = np.arange(len(pairs), dtype=np.int32)
    # a pair listed twice keeps its last rank, as the library's HashMap collect does
    _, last = np.unique(keys[::-1], return_index=True)
    keep = np.sort(len(keys) - 1 - last)
    keys, rank, new = keys[keep], rank[keep], new[keep]
    order = np.argsort(keys, kind="stable")
    singles = [(t, i) for i, t in enumerate(tokens) if len(t) == 1]
    header = {"vocab_size": V, "byte_ids": byte_ids, "added": added, "bos_id": _bos(d),
              "singles": "".join(t for t, _ in singles)}
    arrays = {"offsets": offsets, "blob": blob, "byteval": byteval,
              "merge_keys": keys[order], "merge_rank": rank[order], "merge_new": new[order],
              "single_ids": np.array([i for _, i in singles], np.int32)}
    return header, arrays


def _has_bad_byte_slice(tokens: list) -> bool:
    """True if some decoded token has 6 UTF-8 bytes, '<0x' and '>', but bytes 3..5 do not fall on
    character boundaries (the library would slice inside a character there)."""
    for t in tokens:
        t = t.replace("\u2581", " ")
        b = t.encode()
        if len(b) == 6 and b.startswith(b"<0x") and b.endswith(b">"):
            try:
                b[3:5].decode()
            except UnicodeDecodeError:
                return True
    return False
