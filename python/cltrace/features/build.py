"""Build the feature pages of a dictionary set (transcoders, CLT, SAEs, crosscoder) over a
corpus: scan, windows, logits, write.

``build_pages`` runs pass 1 (:mod:`.scan`, checkpointed atomically to ``DIR/.work/state.pt``
so an interrupted run resumes where it stopped; with ``ray``, sharded over Ray actors by
:mod:`.cluster`, the rest staying in this process), pass 2 over the kept contexts only
(:mod:`.windows`), the top/bottom logits of the features that fired (:mod:`.logits`), and
writes every layout (:mod:`.store`). Identical inputs give identical files.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from .logits import feature_logits, token_strings, unembedding
from .pages import feature_page, page_token_ids
from .scan import layer_encoders, scan
from .settings import FeatureSettings
from .state import FeatureState
from .store import PageWriter
from .windows import cut_windows

WORK = ".work"
VERSION = 1
_MEMMAP_ELEMENTS = 1 << 26  # windows larger than this live in a file-backed memmap


class BuildResult(NamedTuple):
    out: Path
    n_tokens: int
    n_pages: int  # features that fired (one page each)
    n_features: int  # features scanned
    seconds: dict  # per step


def fingerprint(rows: Tensor, settings: dict) -> str:
    """What a run depends on: the token rows and every setting (model, set, layers, ...)."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    h.update(rows.numpy().tobytes())
    return h.hexdigest()


def check_out(out: Path, fp: str) -> bool:
    """True if ``out`` holds an unfinished run with these inputs (resume); raise if it holds
    anything else; False if it is absent or empty."""
    if not out.exists():
        return False
    if not out.is_dir():
        raise FileExistsError(f"--out {out} exists and is not a folder")
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return False
    manifest = out / WORK / "manifest.json"
    # an interrupted run: its work folder, perhaps with pages half written
    if WORK in entries and set(entries) <= {WORK, "features", "labels.json.gz"} and manifest.is_file():
        if json.loads(manifest.read_text()).get("fingerprint") == fp:
            return True
        raise FileExistsError(f"--out {out} holds an unfinished run with other inputs; "
                              "remove it or choose another folder")
    raise FileExistsError(f"--out {out} exists and is not empty ({', '.join(entries[:3])}"
                          f"{', ...' if len(entries) > 3 else ''}); choose a new folder")


def build_pages(model, tokenizer, transcoders, rows: Tensor, layers: Sequence[int], out, *,
                settings: Optional[FeatureSettings] = None, json_files: bool = True,
                meta: Optional[dict] = None, bar: bool = True,
                say: Callable[..., None] = lambda *a: None, ray=None,
                workers: Optional[int] = None, threads: int = 0,
                loader: Optional[Callable[[], tuple]] = None) -> BuildResult:
    """Feature pages of ``layers`` of ``transcoders`` over the token ``rows [n_rows, ctx]``
    into the folder ``out`` (new, empty, or an interrupted run with the same inputs).

    ``ray`` (True: a local Ray cluster, or an address): the scan (pass 1) runs on ``workers``
    Ray actors of ``threads`` torch threads (0: the CPUs split), each loading ``loader() ->
    (model, transcoders)`` (picklable; the same model and set as ``model``, ``transcoders``)
    once; windows, logits and files are made here, from the merged state. The files are the
    same bytes as without ``ray`` when the actors run this process's number of torch threads
    (:func:`.cluster.scan_ray`). ``settings``: what each page keeps (its ``tokens`` and ``ctx``
    are those of ``rows``, chosen by the caller); default :class:`FeatureSettings`."""
    import time

    s = settings or FeatureSettings()
    top_k, n_samples, seed, window = s.top_k, s.n_samples, s.seed, s.window
    batch_rows, n_logits = s.batch_rows, s.n_logits
    out = Path(out)
    meta = dict(meta or {})
    inputs = dict(meta, layers=list(layers), site_in=transcoders.site_in,
                  site_out=transcoders.site_out, top_k=top_k, n_samples=n_samples, seed=seed,
                    window=window, ctx=rows.shape[1], version=VERSION)
    fp = fingerprint(rows, inputs)
    resume = check_out(out, fp)
    work = out / WORK
    bos = tokenizer.bos_token_id
    encoders = layer_encoders(transcoders, layers)
    state_path = work / "state.pt"
    if resume and state_path.is_file():
        state = FeatureState.load(state_path)
        if state.meta.get("batch_rows", batch_rows) != batch_rows:  # its batch index counts those
            say(f"resuming with the interrupted run's {state.meta['batch_rows']} rows per batch")
            batch_rows = state.meta["batch_rows"]
        say(f"resuming the scan at batch {state.meta.get('next_batch', 0)} ({state_path})")
    else:
        work.mkdir(parents=True, exist_ok=True)
        (work / "manifest.json").write_text(json.dumps({"fingerprint": fp, "settings": inputs}))
        state = FeatureState.empty({L: transcoders.layers[L].d_sae for L in layers},
                                   rows.shape[1], top_k, n_samples, seed)
        state.meta["batch_rows"] = batch_rows
    times = {}
    t0 = time.perf_counter()
    if not state.meta.get("scan_done"):
        if ray:
            from .cluster import scan_ray

            if loader is None:
                raise ValueError("build_pages(ray=...) needs a loader for the actors")
            scan_ray(loader, rows, layers, state, bos=bos, batch_rows=batch_rows,
                     address=None if ray is True else ray, workers=workers, threads=threads,
                     checkpoint=lambda s: s.save(state_path), bar=bar, say=say)
        else:
            if "shards" in state.meta:
                raise ValueError(f"the interrupted scan in {out} ran with --ray; rerun with --ray "
                                 "to resume it (or remove the folder)")
            scan(model, rows, encoders, state, bos=bos, batch_rows=batch_rows,
                 checkpoint=lambda s: s.save(state_path), bar=bar, site=transcoders.site_in)
        state.meta["scan_done"] = True
        state.save(state_path)
    times["scan"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    n_win = sum(st.d_sae for st in state.layers.values()) * (top_k + n_samples) * (2 * window + 1)
    windows = cut_windows(model, rows, encoders, state, bos=bos, window=window,
                          batch_rows=batch_rows, bar=bar, site=transcoders.site_in,
                          folder=work if n_win > _MEMMAP_ELEMENTS else None)
    times["windows"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    n_pages = _write(model, tokenizer, transcoders, state, windows, rows, out, window,
                     n_logits, json_files, dict(meta, n_tokens=state.n_tokens), say)
    times["pages"] = time.perf_counter() - t0
    del windows
    shutil.rmtree(work)
    return BuildResult(out, state.n_tokens, n_pages, sum(st.d_sae for st in state.layers.values()), times)


def _write(model, tokenizer, transcoders, state, windows, rows, out, window, n_logits,
           json_files, meta, say) -> int:
    ctx, flat = state.ctx, rows.flatten()
    transcoder_id = str(transcoders.info.get("set_id") or "")
    writer = PageWriter(out, json_files=json_files)
    n_pages = 0
    unemb = unembedding(model)  # once for every layer
    for L, st in state.layers.items():
        fired = torch.nonzero(st.count > 0).flatten()
        top, bottom, score = feature_logits(model, transcoders, L, fired, n=n_logits, unemb=unemb)
        ids = top.flatten().tolist() + bottom.flatten().tolist()
        for f in fired.tolist():
            ids += page_token_ids(st, f, flat, ctx, window)
        tokstr = token_strings(tokenizer, ids)
        writer.begin_layer(L, st.d_sae)
        for i, f in enumerate(fired.tolist()):
            page = feature_page(L, f, st, windows[L][f], flat, ctx, window, state.n_tokens,
                                tokstr, top[i], bottom[i], transcoder_id, float(score[i]))
            writer.add(f, page)
        writer.end_layer()
        n_pages += fired.numel()
        say(f"layer {L}: {fired.numel()} of {st.d_sae} features fired")
    writer.close(meta)
    return n_pages
