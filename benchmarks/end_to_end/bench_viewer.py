"""The viewer (``cltrace serve``) on a big graph in headless Chromium: how long it takes to open
(fetch + parse + index + draw, measured in the page as ``window.cltraceOpenMs``, and from
navigation to ready), to select the busiest logit node and to move the pruning slider.

  PYTHONPATH=python python -m benchmarks.end_to_end.bench_viewer --repeat 5

The graph is tests/support/serve.py's synthetic one (~1,200 nodes, ~300k links, as
tests/test_serve.py opens it). The figures were a test's wall-clock limits before (open
< 2 s in the page, < 3 s from navigation; select and slider < 250 ms each): they are measured
here, on a quiet machine, with the load (``uptime``) recorded beside them. Each repeat is a
fresh tab; the median of each figure is printed last.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()

    from playwright.sync_api import sync_playwright

    from cltrace.serve import make_server, serve_in_thread
    from tests.support.serve import browser_missing, cleanup, launch_chromium, synthetic_graph

    why = browser_missing()
    if why:
        raise SystemExit(f"cannot run: {why}")
    root = Path(tempfile.mkdtemp(prefix="cltrace-bench-viewer-"))
    g = synthetic_graph()
    (root / "big.json").write_text(json.dumps(g))
    busiest = max(g["nodes"], key=lambda n: sum(1 for link in g["links"]
                                                if n["node_id"] in (link["source"], link["target"]))
                  if n["feature_type"] == "logit" else 0)
    srv = make_server(root, port=0)
    serve_in_thread(srv)
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    runs = []
    try:
        with sync_playwright() as pw:
            ctx, profile = launch_chromium(pw)
            try:
                for _ in range(args.repeat):
                    pg = ctx.new_page()
                    t0 = time.perf_counter()
                    pg.goto(f"{url}/#graph=big.json")
                    pg.wait_for_function("document.body.dataset.ready === '1'", timeout=60000)
                    wall_ms = 1000 * (time.perf_counter() - t0)
                    assert pg.locator("#graph .node").count() == len(g["nodes"])
                    select_ms = pg.evaluate(f"""() => {{ const t = performance.now();
                        window.cltrace.select(window.cltrace.byId.get({json.dumps(busiest["node_id"])}));
                        return performance.now() - t; }}""")
                    slider_ms = pg.evaluate("""() => { const t = performance.now(), s = document.getElementById('threshold');
                        s.value = 0.4; s.dispatchEvent(new Event('input')); return performance.now() - t; }""")
                    r = {"open_ms_in_page": pg.evaluate("window.cltraceOpenMs"), "open_ms_from_navigation": wall_ms,
                         "select_busiest_ms": select_ms, "slider_ms": slider_ms,
                         "phases": pg.evaluate("window.cltraceTimings")}
                    print(json.dumps(r))
                    runs.append(r)
                    pg.close()
            finally:
                ctx.close()
                cleanup(profile)
    finally:
        srv.shutdown()
        srv.server_close()
    keys = ("open_ms_in_page", "open_ms_from_navigation", "select_busiest_ms", "slider_ms")
    print(json.dumps({"median": {k: round(statistics.median(r[k] for r in runs), 1) for k in keys},
                      "nodes": len(g["nodes"]), "links": len(g["links"]),
                      "graph_mb": round((root / "big.json").stat().st_size / 1e6, 1),
                      "load": os.getloadavg()}))


if __name__ == "__main__":
    main()
