// cltrace contrast page: the JSON of `cltrace contrast` (format cltrace.contrast/1) as plots
// (effect size against -log10 p; the top features' means in each set) and the ranked table;
// a feature opens the viewer's feature card (panels.js's fillFeature). When the folder also has
// ablation.json (`cltrace steer --contrast DIR`, format cltrace.ablation/1): the features
// ablated, a table per set (each prompt's metric before and after; the mean change, its
// bootstrap interval, the paired test) and a plot of every prompt's metric before -> after.
// Minimal pairs (contrast.json "pairs"): a table linking each pair's difference graph.
// Written for cltrace; plain JavaScript + SVG, no third-party code, no request off this machine.
"use strict";
(function () {
  const S = window.cltrace, { el, $, fmt } = S;
  const C = { data: null, path: null, selected: null };
  const COLORS = ["#3b6fb6", "#d1762a"];  // set A, set B
  const num = (x) => (x === "inf" ? Infinity : x === "-inf" ? -Infinity : Number(x));
  const fmtG = (x) => (typeof x === "string" ? (x.startsWith("-") ? "−∞" : "∞") : fmt(x, 2));
  const fmtP = (x) => (x < 1e-3 ? Number(x).toExponential(1) : fmt(x, 3));
  function showError(msg) { const e = $("error"); e.textContent = msg; e.hidden = !msg; }

  function volcano(d) {  // x: Hedges' g (clipped to ±G), y: -log10 p
    const by = d.settings.by, W = 420, H = 260, M = 36, rows = d.features;
    const gs = rows.map((r) => num(r[by].g)), G = Math.max(1, ...gs.filter(Number.isFinite).map(Math.abs).map((v) => Math.min(v, 20)));
    const ys = rows.map((r) => -Math.log10(Math.max(r[by].p, 1e-12))), Y = Math.max(1, ...ys);
    const X = (g) => M + ((Math.max(-G, Math.min(G, g)) + G) / (2 * G)) * (W - 2 * M), Yp = (y) => H - M - (y / Y) * (H - 2 * M);
    const svg = el("svg", { id: "volcano", width: W, height: H, role: "img", "aria-label": `effect size against -log10 p (${by})` });
    svg.append(el("line", { x1: M, y1: H - M, x2: W - M, y2: H - M, stroke: "#888" }), el("line", { x1: X(0), y1: M / 2, x2: X(0), y2: H - M, stroke: "#ccc" }),
      el("text", { x: W / 2, y: H - 6, "text-anchor": "middle", "font-size": 11, text: `Hedges' g of ${by} (${d.sets[0].name} − ${d.sets[1].name})` }),
      el("text", { x: 10, y: M / 2 + 4, "font-size": 11, text: "−log10 p" }));
    rows.forEach((r, i) => {
      const c = el("circle", { class: "dot", cx: X(gs[i]).toFixed(1), cy: Yp(ys[i]).toFixed(1), r: r.significant ? 4 : 2.5,
        fill: r.significant ? COLORS[gs[i] > 0 ? 0 : 1] : "#aaa", "fill-opacity": 0.8, on: { click: () => openFeature(r) } });
      c.append(el("title", { text: `L${r.layer} #${r.feature} ${r.label}\ng ${fmtG(r[by].g)}, p ${fmtP(r[by].p)}, q ${fmtP(r[by].q)}` }));
      svg.append(c);
    });
    return el("figure", {}, svg, el("figcaption", { class: "muted", text: "each dot a feature; coloured: q ≤ α" }));
  }

  function bars(d, k = 12) {  // the top k features: mean of `by` in each set
    const by = d.settings.by, rows = d.features.slice(0, k), W = 420, rowH = 18, M = 120, H = rows.length * rowH + 30;
    const vmax = Math.max(1e-12, ...rows.flatMap((r) => r[by].mean.map(Math.abs)));
    const svg = el("svg", { id: "top-bars", width: W, height: H, role: "img", "aria-label": `mean ${by} per set, top features` });
    rows.forEach((r, i) => {
      const y = 4 + i * rowH;
      svg.append(el("text", { x: M - 6, y: y + 12, "text-anchor": "end", "font-size": 11, text: `L${r.layer} #${r.feature}` }));
      r[by].mean.forEach((v, s) => svg.append(el("rect", { class: "set-bar", x: M, y: y + s * 8, height: 7,
        width: Math.max(0.5, (Math.abs(v) / vmax) * (W - M - 10)).toFixed(1), fill: COLORS[s] },
        el("title", { text: `${d.sets[s].name}: ${fmt(v, 4)}` }))));
    });
    d.sets.forEach((s, i) => svg.append(el("rect", { x: M + i * 140, y: H - 14, width: 10, height: 10, fill: COLORS[i] }),
      el("text", { x: M + 14 + i * 140, y: H - 5, "font-size": 11, text: s.name })));
    return el("figure", {}, svg, el("figcaption", { class: "muted", text: `mean ${by} per set, top ${rows.length}` }));
  }

  function table(d) {
    const [a, b] = d.sets.map((s) => s.name), t = el("table", { id: "contrast-table", class: "contrast" });
    const head = ["#", "feature", "label", `act ${a}`, `act ${b}`, `infl ${a}`, `infl ${b}`, `kept ${a}`, `kept ${b}`, "g", "p", "q"];
    t.append(el("thead", {}, el("tr", {}, ...head.map((h) => el("th", { text: h })))));
    const by = d.settings.by, body = el("tbody", {});
    d.features.forEach((r, i) => {
      const link = el("a", { href: "#", text: `L${r.layer} #${r.feature}`, on: { click: (ev) => { ev.preventDefault(); openFeature(r); } } });
      body.append(el("tr", { class: r.significant ? "sig" : "" }, el("td", { text: i + 1 }), el("td", {}, link), el("td", { text: r.label || "" }),
        ...r.activation.mean.map((v) => el("td", { text: fmt(v, 3) })), ...r.influence.mean.map((v) => el("td", { text: fmt(v, 4) })),
        ...r.kept_share.map((v) => el("td", { text: `${Math.round(100 * v)}%` })),
        el("td", { text: fmtG(r[by].g) }), el("td", { text: fmtP(r[by].p) }), el("td", { text: fmtP(r[by].q), style: r.significant ? "font-weight: bold" : null })));
    });
    t.append(body);
    return t;
  }

  function ablationTable(ab, s, i) {  // one set: its prompts, then the summary in the foot
    const sm = s.summary, t = el("table", { class: "contrast ablation-table", id: `ablation-table-${i}` });
    t.append(el("caption", { text: `set ${s.name}: ${sm.n} prompts`, style: `text-align: left; color: ${COLORS[i]}; font-weight: bold` }),
      el("thead", {}, el("tr", {}, ...["prompt", "before", "after", "change"].map((h) => el("th", { text: h })))));
    const body = el("tbody", {});
    s.prompts.forEach((r) => body.append(el("tr", {}, el("td", { text: r.slug }), el("td", { text: fmt(r.before, 4) }),
      el("td", { text: fmt(r.after, 4) }), el("td", { text: fmt(r.change, 4) }))));
    const how = sm.p_exact ? `exact, 2^${sm.n} sign flips` : `${sm.n_resamples} random sign flips`;
    const foot = el("tfoot", {},
      el("tr", { class: "ablation-summary" }, el("th", { text: "mean" }), el("td", { text: fmt(sm.mean_before, 4) }),
        el("td", { text: fmt(sm.mean_after, 4) }), el("td", { text: fmt(sm.mean_change, 4), style: "font-weight: bold" })),
      el("tr", {}, el("th", { text: `${Math.round(100 * sm.level)}% interval` }),
        el("td", { colspan: 3, text: `[${fmt(sm.ci_low, 4)}, ${fmt(sm.ci_high, 4)}] (percentile bootstrap, ${sm.n_resamples} resamples)` })),
      el("tr", {}, el("th", { text: "p" }), el("td", { colspan: 3, text: `${fmtP(sm.p_value)} (paired sign-flip test, ${how}, two-sided)` })));
    t.append(body, foot);
    return el("div", { style: "max-height: 420px; overflow: auto" }, t);
  }

  function slopes(ab) {  // each prompt's metric before -> after, one panel per set, one y scale
    const W = 260, H = 260, M = 40, vals = ab.sets.flatMap((s) => s.prompts.flatMap((r) => [r.before, r.after])).filter(Number.isFinite);
    let lo = Math.min(...vals), hi = Math.max(...vals);
    if (!(hi > lo)) { lo -= 1; hi += 1; }
    const Y = (v) => H - M - ((v - lo) / (hi - lo)) * (H - 2 * M), xb = M + 20, xa = W - 30;
    const svg = el("svg", { id: "ablation-plot", width: W * ab.sets.length, height: H, role: "img",
      "aria-label": `each prompt's ${ab.metric} before and after the ablation` });
    ab.sets.forEach((s, i) => {
      const g = el("g", { transform: `translate(${i * W},0)` });
      g.append(el("line", { x1: xb, y1: M / 2, x2: xb, y2: H - M, stroke: "#ccc" }), el("line", { x1: xa, y1: M / 2, x2: xa, y2: H - M, stroke: "#ccc" }),
        el("text", { x: xb, y: H - M + 16, "text-anchor": "middle", "font-size": 11, text: "before" }),
        el("text", { x: xa, y: H - M + 16, "text-anchor": "middle", "font-size": 11, text: "after" }),
        el("text", { x: (xb + xa) / 2, y: H - 6, "text-anchor": "middle", "font-size": 12, fill: COLORS[i], text: `set ${s.name}` }));
      if (i === 0) [lo, hi].forEach((v) => g.append(el("text", { x: xb - 6, y: Y(v) + 4, "text-anchor": "end", "font-size": 10, text: fmt(v, 2) })));
      if (lo < 0 && hi > 0) g.append(el("line", { x1: xb, y1: Y(0), x2: xa, y2: Y(0), stroke: "#eee", "stroke-dasharray": "3 3" }));
      s.prompts.forEach((r) => {
        const line = el("line", { class: "prompt-line", x1: xb, y1: Y(r.before).toFixed(1), x2: xa, y2: Y(r.after).toFixed(1),
          stroke: COLORS[i], "stroke-opacity": 0.7, "stroke-width": 1.5 });
        line.append(el("title", { text: `${r.slug}: ${fmt(r.before, 4)} → ${fmt(r.after, 4)} (${fmt(r.change, 4)})` }));
        g.append(line, el("circle", { cx: xb, cy: Y(r.before).toFixed(1), r: 2.5, fill: COLORS[i] }),
          el("circle", { cx: xa, cy: Y(r.after).toFixed(1), r: 2.5, fill: COLORS[i] }));
      });
      const sm = s.summary;  // the means, thick
      g.append(el("line", { class: "mean-line", x1: xb, y1: Y(sm.mean_before).toFixed(1), x2: xa, y2: Y(sm.mean_after).toFixed(1), stroke: "#222", "stroke-width": 3 },
        el("title", { text: `mean: ${fmt(sm.mean_before, 4)} → ${fmt(sm.mean_after, 4)}` })));
      svg.append(g);
    });
    return el("figure", {}, svg, el("figcaption", { class: "muted", text: `${ab.metric} of each prompt before → after (a line each; black: the mean)` }));
  }

  function drawAblation(ab) {
    const box = $("ablation");
    if (!ab) { box.hidden = true; box.replaceChildren(); return; }
    const feats = ab.features.map((f) => `L${f.layer} #${f.feature}` + (f.label ? ` (${f.label})` : ""));
    box.replaceChildren(el("h2", { text: "Ablation on both sets" }),
      el("p", { id: "ablation-summary", text: `${ab.interventions.join(", ")} — the top ${ab.features.length} feature(s) by ${ab.by}: ${feats.join(", ")}; ` +
        `metric ${ab.metric} (${ab.mode} mode)` + (ab.note ? `; note: ${ab.note}` : "") }),
      slopes(ab), el("div", { style: "display: flex; flex-wrap: wrap; gap: 24px" }, ...ab.sets.map((s, i) => ablationTable(ab, s, i))),
      el("p", { class: "muted", text: "change: after − before per prompt; interval: percentile bootstrap of the mean change over prompts; " +
        "p: two-sided paired sign-flip permutation test of no change. Written by cltrace steer --contrast DIR." }));
    box.hidden = false;
  }

  async function loadAblation(dir) {  // ablation.json beside the report, if there is one
    const r = await fetch(`/data/${(dir + "ablation.json").split("/").map(encodeURIComponent).join("/")}`);
    if (!r.ok) return null;
    const ab = await r.json();
    return ab.format === "cltrace.ablation/1" ? ab : null;
  }

  function openFeature(r) {
    C.selected = r;
    S.graph = { metadata: { scan: "./features" } }; S.path = C.path;  // pages beside the report
    $("feature-card").hidden = false;
    S.fillFeature($("feature-body"), { feature: r.id, clerp: r.label || "", layerNum: r.layer, featIdx: r.feature }, () => C.selected === r);
  }

  function pairTable(d, dir) {  // the minimal pairs: prompts, nodes by carrier, a link to the difference graph
    const t = el("table", { class: "contrast", id: "pair-table" });
    t.append(el("thead", {}, el("tr", {}, ...["pair", d.sets[0].name, d.sets[1].name, `nodes ${d.sets[0].name} only`,
      `${d.sets[1].name} only`, "both", "difference graph"].map((h) => el("th", { text: h })))));
    t.append(el("tbody", {}, ...d.pairs.map((p) => el("tr", {}, el("td", { text: p.id }), el("td", { text: p.slugs[0] }), el("td", { text: p.slugs[1] }),
      ...(p.graph ? [el("td", { text: p.nodes.a }), el("td", { text: p.nodes.b }), el("td", { text: p.nodes.both }),
        el("td", {}, el("a", { href: `/#graph=${encodeURIComponent(dir + p.graph)}`, text: p.graph }))]
        : [el("td", { colspan: 4, text: p.error || "not built" })])))));
    return t;
  }

  function draw() {
    const d = C.data, by = d.settings.by, dir = C.path.includes("/") ? C.path.slice(0, C.path.lastIndexOf("/") + 1) : "";
    $("summary").textContent = `${d.sets[0].name} (${d.sets[0].prompts.length} prompts) vs ${d.sets[1].name} (${d.sets[1].prompts.length}): ` +
      `${d.n_tested} of ${d.n_features} features tested (kept in ≥ ${d.settings.min_count} graphs), ${d.n_significant} with q ≤ ${d.settings.alpha} by ${by}; ` +
      `${d.settings.exact ? "exact permutation test" : `${d.settings.n_perm} permutations`}` + (d.failed.length ? `; ${d.failed.length} prompts failed` : "");
    $("plots").replaceChildren(volcano(d), bars(d));
    $("contrast-tables").replaceChildren(table(d));
    $("common-links").replaceChildren(...(d.common || []).map((c) => el("a", { href: `/#graph=${encodeURIComponent(dir + c.graph)}`, text: `common circuit: ${c.set}`, style: "margin-right: 8px" })));
    $("pairs").hidden = !(d.pairs && d.pairs.length);
    $("pairs").replaceChildren(...(d.pairs && d.pairs.length ? [el("h2", { text: `Minimal pairs (${d.pairs.length})` }),
      el("p", { class: "muted", text: "Each pair's difference graph: the union of its two pruned graphs on aligned positions; open it and pick the viewer's colour by prompt or by difference." }),
      pairTable(d, dir)] : []));
  }

  async function open(path) {
    document.body.dataset.ready = "0"; showError("");
    try {
      const r = await fetch(`/data/${path.split("/").map(encodeURIComponent).join("/")}`);
      if (!r.ok) throw new Error(`cannot read ${path}: HTTP ${r.status}`);
      const d = await r.json();
      if (d.format !== "cltrace.contrast/1") throw new Error(`${path} is not a cltrace contrast JSON`);
      C.data = d; C.path = path; draw();
      drawAblation(await loadAblation(path.includes("/") ? path.slice(0, path.lastIndexOf("/") + 1) : ""));
      history.replaceState(null, "", `#report=${encodeURIComponent(path)}`);
      document.body.dataset.ready = "1";
    } catch (e) { showError(String(e.message || e)); document.body.dataset.ready = "error"; }
  }

  async function boot() {
    $("report-select").addEventListener("change", (ev) => open(ev.target.value));
    try {
      const reports = (await (await fetch("/api/contrasts")).json()).contrasts || [];
      for (const x of reports) $("report-select").append(el("option", { value: x.path, text: x.path }));
      if (!reports.length) { showError("No contrast report in this folder: run `cltrace contrast A B --out DIR` first."); return; }
      const m = /report=([^&]+)/.exec(location.hash), want = m ? decodeURIComponent(m[1]) : reports[0].path;
      $("report-select").value = want;
      await open(want);
    } catch (e) { showError(String(e.message || e)); }
  }
  document.addEventListener("DOMContentLoaded", boot);
})();
