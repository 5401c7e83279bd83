"""The contrast of a traced folder: ``contrast.json`` (the ranked features), the common circuit
of each set (``common-{set}.json``, graphs the viewer opens) and the difference graph of each
minimal pair (``pair-{id}.json``, :mod:`.pairs`), from the graphs and manifest of the batch.
The folder is read through an object with ``get(name) -> bytes | None``,
``records()`` and ``put(name, bytes)`` (:class:`cltrace.batch.store.Store`)."""
from __future__ import annotations

import json
import time

from .analyze import ContrastSettings, contrast
from .collect import collect
from .common import CommonCircuit
from .pairs import pair_file, pair_graph
from .sets import set_prefix

SETS_FILE = "contrast-sets.json"  # the sets, written before tracing: the report is rebuilt from it
REPORT = "contrast.json"


def sets_json(names: list[str], sets: list[list]) -> bytes:
    """``contrast-sets.json``: each set's name, its graphs' slugs and its prompts (PromptSpecs,
    as batch JSONL objects: what ``cltrace steer --contrast`` measures again)."""
    from ..batch.prompts import spec_to_row

    return (json.dumps({"format": "cltrace.contrast-sets/1", "sets": [
        {"name": n, "slugs": [s.slug for s in ss], "prompts": [spec_to_row(s) for s in ss]}
        for n, ss in zip(names, sets)]}, indent=1) + "\n").encode()


def load_sets(store) -> tuple[list[str], list[list]]:
    """(the two set names, each set's PromptSpecs) of a contrast folder's ``contrast-sets.json``;
    a UsageError when the folder has none (or one written before the prompts were stored)."""
    from ..batch.prompts import spec_from_row
    from ..errors import UsageError

    raw = store.get(SETS_FILE)
    if raw is None:
        raise UsageError(f"{store.location}: no {SETS_FILE} (not a cltrace contrast folder)")
    spec = json.loads(raw)
    if any("prompts" not in s for s in spec["sets"]):
        raise UsageError(f"{store.location}/{SETS_FILE}: no prompts stored (written by an older "
                         f"cltrace): rerun cltrace contrast on the same sets and --out")
    where = f"{store.location}/{SETS_FILE}"
    return ([s["name"] for s in spec["sets"]],
            [[spec_from_row(r, f"{where} set {s['name']!r}") for r in s["prompts"]] for s in spec["sets"]])


def build_report(store, settings: ContrastSettings = ContrastSettings()) -> dict:
    """Read the sets (``contrast-sets.json``), the manifest and the graphs of ``store``; write
    ``contrast.json``, ``common-{set}.json`` and ``pair-{id}.json``; return the report (its
    ``seconds``: the time taken)."""
    t0 = time.perf_counter()
    spec = json.loads(store.get(SETS_FILE))
    names = [s["name"] for s in spec["sets"]]
    records: dict = {}
    for r in store.records():
        records[r["slug"]] = r  # the last record of each slug
    ok = {s for s, r in records.items() if r.get("status") == "ok"}
    prompts = [(slug, i) for i, s in enumerate(spec["sets"]) for slug in s["slugs"] if slug in ok]

    merged = [CommonCircuit(), CommonCircuit()]  # filled while the table is read: one pass over the graphs
    member = dict(prompts)

    def graph(slug: str):
        raw = store.get(f"{slug}.json")
        g = json.loads(raw) if raw else None
        if g is not None:
            merged[member[slug]].add(g)
        return g

    table = collect(prompts, records, graph)
    report = contrast(table, (names[0], names[1]), settings)
    report["failed"] = [{"slug": slug, "set": names[i], "error": records.get(slug, {}).get("error", "not traced")}
                        for i, s in enumerate(spec["sets"]) for slug in s["slugs"] if slug not in ok]
    report["common"] = []
    for i in range(2):
        name = f"common-{set_prefix(names[i])}"
        g = merged[i].graph(name, settings.min_share)
        if g is not None:
            store.put(f"{name}.json", json.dumps(g).encode())
            report["common"].append({"set": names[i], "graph": f"{name}.json", "nodes": len(g["nodes"]),
                                     "links": len(g["links"]), "min_share": settings.min_share})
    report["pairs"] = write_pairs(store, spec, ok)
    report["seconds"] = round(time.perf_counter() - t0, 3)
    store.put(REPORT, (json.dumps(report, separators=(",", ":"), allow_nan=False) + "\n").encode())
    return report


def pairs_of(spec: dict) -> list[tuple]:
    """[(pair id, slug in set A, slug in set B)] of ``contrast-sets.json`` (its prompts'
    ``pair``, checked before tracing: one prompt in each set), in set A's order."""
    found: dict = {}
    for i, s in enumerate(spec["sets"][:2]):
        for row in s.get("prompts", []):
            if row.get("pair") is not None:
                found.setdefault(str(row["pair"]), [None, None])[i] = row["slug"]
    return [(pid, a, b) for pid, (a, b) in found.items() if a is not None and b is not None]


def write_pairs(store, spec: dict, ok: set) -> list[dict]:
    """Write ``pair-{id}.json`` for every pair of ``spec`` whose two prompts were traced
    (``ok``); the list of ``contrast.json``'s ``"pairs"``: id, slugs, graph (null with an
    ``error`` when it could not be built), counts of nodes and links by carrier."""
    names = tuple(s["name"] for s in spec["sets"])
    out, taken = [], set()
    for pid, sa, sb in pairs_of(spec):
        entry = {"id": pid, "slugs": [sa, sb], "graph": None}
        name = pair_file(pid, taken)
        missing = [s for s in (sa, sb) if s not in ok]
        raw = [None if missing else store.get(f"{s}.json") for s in (sa, sb)]
        if missing or None in raw:
            entry["error"] = "not traced: " + ", ".join(missing or [s for s, r in zip((sa, sb), raw) if r is None])
        else:
            try:
                g = pair_graph(*(json.loads(r) for r in raw), pair=pid, name=name, sets=names, slugs=(sa, sb))
            except ValueError as e:
                entry["error"] = str(e)
            else:
                store.put(f"{name}.json", json.dumps(g).encode())
                info = g["metadata"]["info"]["pair_diff"]
                entry.update(graph=f"{name}.json", nodes=info["nodes"], links=info["links"])
        out.append(entry)
    return out
