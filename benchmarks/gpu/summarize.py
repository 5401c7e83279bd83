"""Collect the GPU run's step results (benchmarks/gpu/run.sh) into summary.json and summary.md,
with each issue-17 target marked met / missed / not measured.

    python benchmarks/gpu/summarize.py --work /tmp/cltrace-gpu.XXXX --out benchmarks/gpu/out
"""
from __future__ import annotations

import argparse
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

GRAPH_TARGET_S = 2.0  # 64-token 1B-shape graph with 8,192 feature nodes
BW_TARGET = 0.60  # decode and contraction: fraction of the measured copy bandwidth


def read_json(p: Path):
    try:
        return json.loads(p.read_text())
    except Exception as exc:  # missing or truncated: say so in the summary
        return {"missing": f"{p.name}: {type(exc).__name__}: {exc}"}


def junit(p: Path) -> dict:
    if not p.exists():
        return {"missing": p.name}
    root = ET.parse(p).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    tot = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    tot["failed"] = [f"{c.get('classname')}::{c.get('name')}" for c in root.iter("testcase")
                     if c.find("failure") is not None or c.find("error") is not None][:40]
    tot["passed"] = tot["tests"] - tot["failures"] - tot["errors"] - tot["skipped"]
    return tot


def sanitizer(p: Path, step: dict) -> dict:
    if not p.exists():
        return {"ran": False, "step": step}
    text = p.read_text(errors="replace")
    lines = [ln.strip() for ln in text.splitlines() if "SUMMARY" in ln]
    n = sum(int(m.group(1)) for ln in lines for m in [re.search(r"(\d+) (error|hazard)", ln)] if m)
    body = [ln for ln in text.splitlines() if ln.startswith("=========")]
    errs = [ln for ln in body if "Invalid" in ln or "Race" in ln or "hazard" in ln.lower()
            or "Error" in ln][:20]
    # frames in cltrace's own kernels (a report inside torch or cuBLAS names none)
    ours = sorted({m.group(0) for ln in body for m in [re.search(r"cltrace::[\w:()<>, ]*?\w+_kernel", ln)] if m})
    return {"ran": True, "summary_lines": lines, "n_reported": n, "first_reports": errs,
            "cltrace_kernels_named": ours,
            "clean": bool(lines) and n == 0 and step.get("rc") == 0, "step": step}


def verdict(ok) -> str:
    return {True: "MET", False: "MISSED", None: "not measured"}[ok]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--dry-run", default="0")
    a = ap.parse_args()
    work, out = Path(a.work), Path(a.out)
    steps = {}
    if (work / "steps.jsonl").exists():
        for ln in (work / "steps.jsonl").read_text().splitlines():
            if ln.strip():
                r = json.loads(ln)
                steps[r["step"]] = r
    s: dict = {"dry_run": a.dry_run == "1", "steps": steps,
               "build_info": read_json(work / "build_info.json"),
               "env": (work / "env.log").read_text(errors="replace")[:4000] if (work / "env.log").exists() else "",
               "tests": junit(work / "junit-tests.xml"),
               "memcheck": sanitizer(work / "memcheck.txt", steps.get("memcheck", {})),
               "racecheck": sanitizer(work / "racecheck.txt", steps.get("racecheck", {})),
               "e2e": read_json(work / "e2e.json"), "timing": read_json(work / "timing.json")}
    t = s["tests"]
    # all skipped (no usable GPU) is not a pass
    tests_ok = None if "missing" in t or not t["passed"] else (t["failures"] + t["errors"] == 0)
    san = [s["memcheck"], s["racecheck"]]
    san_ok = None if not all(x["ran"] for x in san) else all(x["clean"] for x in san)
    graphs = [g for g in s["timing"].get("graphs", []) if not g.get("warmup")] \
        if isinstance(s["timing"], dict) else []
    g64 = [g for g in graphs if g.get("shape") == "1b" and g.get("n_pos") == 64
           and g.get("nodes") == 8192 and "seconds" in g]
    graph_ok = None if not g64 else all(g["seconds"] < GRAPH_TARGET_S for g in g64)
    kern = [k for k in s["timing"].get("kernels", []) if "frac_bw" in k] \
        if isinstance(s["timing"], dict) else []
    bw = [k for k in kern if k["kernel"].startswith(("sparse_decode_p", "sparse_decode_c",
                                                      "attribution_contract"))
          and not k["kernel"].endswith("_after_copy")]  # the old way, for comparison only
    bw_ok = None if not bw else all(k["frac_bw"] >= BW_TARGET for k in bw)
    e2e = s["e2e"].get("results", []) if isinstance(s["e2e"], dict) else []
    fp32 = [r.get("fp32", {}).get("ok") for r in e2e if "fp32" in r]
    e2e_ok = None if not e2e else (all(fp32) and len(fp32) == len(e2e))
    bf = [r.get("bf16", {}).get("ok") for r in e2e if "bf16" in r]
    s["targets"] = {
        "cuda_tests_pass": tests_ok, "sanitizer_clean": san_ok,
        "graph_1b_64tok_8192_under_2s": graph_ok, "decode_contract_60pct_bw": bw_ok,
        "e2e_fp32_equal_cpu": e2e_ok, "e2e_bf16_within_tol": (all(bf) if bf else None)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(s, indent=1, default=str))
    (out / "summary.md").write_text(markdown(s, graphs, kern, e2e))


def markdown(s: dict, graphs: list, kern: list, e2e: list) -> str:
    L = [f"# cltrace GPU run{' (CPU DRY RUN: no GPU figure here)' if s['dry_run'] else ''}", ""]
    tim = s["timing"] if isinstance(s["timing"], dict) else {}
    L.append(f"device: {tim.get('device_name', tim.get('device', '?'))}; torch {tim.get('torch', '?')}; "
             f"build_info: {json.dumps(s['build_info'], default=str)}")
    L += ["", "## Targets (issue 17)", "", "| target | verdict |", "| --- | --- |"]
    for k, v in s["targets"].items():
        L.append(f"| {k} | {verdict(v)} |")
    L += ["", "## Steps", "", "| step | rc | s | budget |", "| --- | --- | --- | --- |"]
    for name, r in s["steps"].items():
        L.append(f"| {name} | {r.get('rc')}{' (timeout)' if r.get('rc') in (124, 137) else ''} "
                 f"| {r.get('seconds')} | {r.get('budget')} |")
    t = s["tests"]
    L += ["", "## Tests", "", json.dumps({k: v for k, v in t.items() if k != "failed"})]
    for f in t.get("failed", []):
        L.append(f"- FAILED {f}")
    for name in ("memcheck", "racecheck"):
        x = s[name]
        L.append(f"- {name}: " + ("not run" if not x["ran"] else
                                   f"{'clean' if x['clean'] else 'NOT CLEAN'}; " + "; ".join(x["summary_lines"])))
        for e in x.get("first_reports", [])[:5]:
            L.append(f"  - `{e}`")
        if x.get("cltrace_kernels_named"):
            L.append(f"  - in cltrace kernels: {', '.join(x['cltrace_kernels_named'])}")
    c = tim.get("ceilings", {})
    if "copy_GBps" in c:
        L += ["", "## Ceilings", "", f"copy {c['copy_GBps']:.0f} GB/s (read + write); matmul fp32 "
              f"{c.get('matmul_fp32_TFLOPs', 0):.1f} TFLOP/s, bf16 {c.get('matmul_bf16_TFLOPs', 0):.1f} TFLOP/s"]
    if kern:
        L += ["", "## Kernels (1B shape, median of CUDA-event timings)", "",
              "| kernel | dtype | us | floor us | floor GB/s | of copy bw | touched, of copy bw | TFLOP/s | of matmul |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for k in kern:
            tb = f"{k['frac_bw_touched']:.0%}" if "frac_bw_touched" in k else ""
            L.append(f"| {k['kernel']} | {k['dtype']} | {k['seconds'] * 1e6:.1f} | {k['floor_s'] * 1e6:.1f} "
                     f"| {k['GBps']:.0f} | {k['frac_bw']:.0%} | {tb} | {k.get('TFLOPs', 0):.1f} "
                     f"| {k.get('frac_matmul', 0):.0%} |")
    if graphs:
        L += ["", "## Whole graphs", "", "| shape | tokens | nodes | dtype | s | active | peak GiB | phases |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for g in graphs:
            ph = ", ".join(f"{k} {v:.2f}" for k, v in (g.get("phases") or {}).items()
                           if isinstance(v, (int, float)))
            sec = f"{g['seconds']:.2f}" if "seconds" in g else g.get("error", g.get("skipped", "?"))
            L.append(f"| {g.get('shape')} | {g.get('n_pos')} | {g.get('nodes')} | {g.get('dtype')} | {sec} "
                     f"| {g.get('n_active', '')} | {g.get('peak_GiB', 0):.1f} | {ph} |")
    if e2e:
        L += ["", "## End to end against the CPU float32 reference", "",
              "| shape | dtype | ok | edge rel | matched / ref features | s |", "| --- | --- | --- | --- | --- | --- |"]
        for r in e2e:
            if "error" in r or "skipped" in r:
                L.append(f"| {r['shape']} | - | ERROR | {r.get('error', r.get('skipped'))} | | |")
                continue
            for dt in ("fp32", "bf16"):
                if dt in r:
                    x = r[dt]
                    L.append(f"| {r['shape']} | {dt} | {x.get('ok')} | {x.get('edge_rel')} "
                             f"| {x.get('n_features_matched')} / {x.get('n_features', ['?', '?'])[1]} "
                             f"| {x.get('seconds', 0):.2f} |")
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    main()
