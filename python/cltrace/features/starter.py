"""Feature pages of the default starter transcoders, built on their first use.

``cltrace attribute`` with no ``--transcoders`` labels its graph with these: on the first run
the pages are built over ``STARTER_PAGE_TOKENS`` tokens of the set's own training corpus (mostly
English the model wrote; :func:`cltrace.training.starter.starter_corpus`), a few minutes on 2
CPU cores, and cached beside the set; later runs read them. A cache written in an older
pages format (labels made differently, no example counts) is rebuilt once.
"""
from __future__ import annotations

import shutil
from typing import Callable

from ..models import cache_root
from .build import build_pages
from .store import FORMAT, LABELS_FILE, FeaturePages

STARTER_PAGE_TOKENS = 16_384  # rows of 128 tokens: enough for labels of the frequent features


def starter_pages(loaded, transcoders, *, progress: Callable[..., None] = print,
                  tokens: int = STARTER_PAGE_TOKENS) -> FeaturePages:
    """The cached pages of a starter set (``transcoders.info['set_id']`` =
    ``cltrace-starter/<tag>``), built over ``tokens`` corpus tokens on first use."""
    from ..training.corpus import token_rows
    from ..training.starter import starter_corpus

    set_id = transcoders.info.get("set_id", "")
    if not set_id.startswith("cltrace-starter/"):
        raise ValueError(f"{set_id or 'this set'} is not a starter set: build its pages with "
                         "`cltrace features --transcoders ... --out DIR` and pass --features DIR")
    tag = set_id.split("/", 1)[1]
    folder = cache_root() / "starter" / (tag + "-pages")
    if (folder / LABELS_FILE).is_file() and not FeaturePages(folder).current:
        progress(f"the cached feature pages in {folder} are in an older format "
                 f"(not {FORMAT}); rebuilding them")
        shutil.rmtree(folder)
    if not (folder / LABELS_FILE).is_file():
        progress(f"building the feature pages of the starter set over {tokens} tokens (first run "
                 f"only; cached in {folder}; Ctrl-C and rerun resumes) ...")
        corpus = starter_corpus(loaded, tag, progress=progress)
        rows = token_rows(loaded.tokenizer, corpus.train, 128, max_tokens=tokens)
        build_pages(loaded.model, loaded.tokenizer, transcoders, rows, sorted(transcoders.layers),
                    folder, meta={"transcoders": set_id}, say=progress)
    return FeaturePages(folder)
