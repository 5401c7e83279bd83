"""Feature pages on disk: the layouts viewers read, and cltrace's own lookup.

A pages folder ``DIR`` holds::

    features/{c}.json          one page per feature that fired, ``c = cantor(layer, feature)``
                               ``= (l + f)(l + f + 1)/2 + f`` (the name circuit-tracer's viewer
                               fetches: ``{scan}/{c}.json``)
    features/index.json.gz     hosted layout: ``{"<layer>": {"filename", "offsets"}}``, offsets
                               ``[d_sae + 1]`` byte offsets of feature f's record in
    features/layer_{L}.bin     records of 4-byte little-endian length + zlib-compressed page
                               JSON (an unfired feature has an empty record: equal offsets)
    labels.json.gz             cltrace's compact index: ``{"format", "model", "transcoders",
                               "n_tokens", "layers": {"<layer>": {"d_sae", "labels": [str],
                               "label_examples": [int]}}}`` (label "" = the feature never fired,
                               so it has no page; label_examples: the number of top examples its
                               label is made from, 0 when it never fired; the page's own field)

:class:`FeaturePages` reads it (labels and pages by (layer, feature)); :func:`pages_for_graph`
copies the pages of a graph's features next to the graph for circuit-tracer's local viewer.
"""
from __future__ import annotations

import gzip
import json
import os
import struct
import zlib
from pathlib import Path
from typing import Iterable, Optional

from ..atomic import atomic_path
from ..export.neuronpedia import cantor_pair as cantor, cantor_unpair as uncantor  # noqa: F401

LABELS_FILE = "labels.json.gz"
INDEX_FILE = "index.json.gz"
FORMAT = "cltrace.features/2"  # /2 added label_examples and labels showing a top logit only
# where it stands out; /1 folders are still read (label_examples: None)
READABLE_FORMATS = ("cltrace.features/1", FORMAT)


def page_json(page: dict) -> bytes:
    return json.dumps(page, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def record(page: dict, text: Optional[bytes] = None) -> bytes:
    """One binary record: 4-byte little-endian length, then the zlib-compressed page JSON."""
    data = zlib.compress(page_json(page) if text is None else text, 1)
    return struct.pack("<I", len(data)) + data


def _write_gz_json(path: Path, obj) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(gzip.compress(json.dumps(obj, ensure_ascii=False).encode("utf-8"), mtime=0))


class PageWriter:
    """Writes pages layer by layer (``begin_layer``, ``add`` in feature order, ``end_layer``),
    then ``close`` writes the two indexes (last, so a folder with them is complete)."""

    def __init__(self, out: Path, json_files: bool = True):
        self.out, self.dir, self.json_files = Path(out), Path(out) / "features", json_files
        self.dir.mkdir(parents=True, exist_ok=True)
        self.index: dict[str, dict] = {}
        self.labels: dict[str, dict] = {}

    def begin_layer(self, layer: int, d_sae: int) -> None:
        self.layer, self.d_sae = layer, d_sae
        self.offsets, self.layer_labels = [0] * (d_sae + 1), [""] * d_sae
        self.layer_counts = [0] * d_sae
        self.filename = f"layer_{layer}.bin"
        self._ctx = atomic_path(self.dir / self.filename)
        self._bin = open(self._ctx.__enter__(), "wb")
        self._pos, self._next = 0, 0

    def add(self, f: int, page: dict) -> None:
        while self._next <= f:  # features skipped so far: empty records
            self.offsets[self._next] = self._pos
            self._next += 1
        text = page_json(page)
        rec = record(page, text)
        self._bin.write(rec)
        self._pos += len(rec)
        self.layer_labels[f] = page["label"]
        self.layer_counts[f] = int(page["label_examples"])
        if self.json_files:
            with open(self.dir / f"{cantor(self.layer, f)}.json", "wb") as fh:
                fh.write(text)

    def end_layer(self) -> None:
        while self._next <= self.d_sae:
            self.offsets[self._next] = self._pos
            self._next += 1
        self._bin.close()
        self._ctx.__exit__(None, None, None)
        self.index[str(self.layer)] = {"filename": self.filename, "offsets": self.offsets}
        self.labels[str(self.layer)] = {"d_sae": self.d_sae, "labels": self.layer_labels,
                                        "label_examples": self.layer_counts}

    def close(self, meta: dict) -> None:
        _write_gz_json(self.dir / INDEX_FILE, self.index)
        _write_gz_json(self.out / LABELS_FILE, {"format": FORMAT, **meta, "layers": self.labels})


class FeaturePages:
    """Read a pages folder written by ``cltrace features``: labels and pages by (layer, feature)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        path = self.folder / LABELS_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{self.folder} is not a feature pages folder (no {LABELS_FILE}; "
                                    "make one with `cltrace features --out DIR`)")
        data = json.loads(gzip.decompress(path.read_bytes()))
        if data.get("format") not in READABLE_FORMATS:
            raise ValueError(f"{path}: unknown format {data.get('format')!r} (expected {FORMAT})")
        self.meta = {k: v for k, v in data.items() if k != "layers"}
        self._labels = {int(L): v["labels"] for L, v in data["layers"].items()}
        self._counts = {int(L): v.get("label_examples") for L, v in data["layers"].items()}
        self._index: Optional[dict] = None

    @property
    def layers(self) -> list[int]:
        return sorted(self._labels)

    def label(self, layer: int, feature: int) -> str:
        """The automatic label ("" when the feature never fired or its layer was not scanned)."""
        labels = self._labels.get(int(layer))
        return labels[feature] if labels is not None and 0 <= feature < len(labels) else ""

    @property
    def current(self) -> bool:
        """Whether the folder was written in this version's format (labels and counts as made
        now); an older folder's labels may show a top logit that does not stand out."""
        return self.meta.get("format") == FORMAT

    def label_examples(self, layer: int, feature: int) -> Optional[int]:
        """How many top examples the label of (layer, feature) is made from (0 when it never
        fired or its layer was not scanned; None in a folder of the older format)."""
        if not self.label(layer, feature):
            return 0
        counts = self._counts.get(int(layer))
        return None if counts is None else int(counts[feature])

    def page(self, layer: int, feature: int) -> Optional[dict]:
        """The page of (layer, feature), or None if it never fired (or was not scanned)."""
        if not self.label(layer, feature):
            return None
        if self._index is None:
            self._index = json.loads(gzip.decompress((self.folder / "features" / INDEX_FILE).read_bytes()))
        entry = self._index[str(int(layer))]
        start, end = entry["offsets"][feature], entry["offsets"][feature + 1]
        with open(self.folder / "features" / entry["filename"], "rb") as fh:
            fh.seek(start)
            rec = fh.read(end - start)
        (n,) = struct.unpack("<I", rec[:4])
        return json.loads(zlib.decompress(rec[4:4 + n]))


def pages_for_graph(pages: FeaturePages, features: Iterable[tuple[int, int]], out_dir,
                    subdir: str = "features") -> dict:
    """Write ``out_dir/subdir/{cantor(l, f)}.json`` for the given (layer, feature) pairs that
    have a page, and return ``{"scan": "./data/<subdir>", "clerps": {(l, f): label}}``.

    The scan: circuit-tracer 0.5.0's viewer fetches ``{scan}/{c}.json`` when the scan starts
    with ``./``, relative to its page at the server root; its local server maps ``/data/`` to
    the graph folder (``serve(data_dir=out_dir)``), and its ``util.getFile`` rewrites any
    ``./features/...`` path to Anthropic's CDN, so ``./data/<subdir>`` is the relative scan that
    reaches ``out_dir/subdir`` offline."""
    folder = Path(out_dir) / subdir
    folder.mkdir(parents=True, exist_ok=True)
    clerps = {}
    for layer, feature in dict.fromkeys((int(l), int(f)) for l, f in features):
        label = pages.label(layer, feature)
        if not label:
            continue
        clerps[(layer, feature)] = label
        with atomic_path(folder / f"{cantor(layer, feature)}.json") as tmp:
            Path(tmp).write_bytes(page_json(pages.page(layer, feature)))
    return {"scan": f"./data/{subdir}", "clerps": clerps}
