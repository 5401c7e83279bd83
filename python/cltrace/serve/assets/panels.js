// cltrace viewer panels: node and feature cards, links lists, pins and supernodes (saved into
// the graph's qParams), and experiments (interventions computed by the server's model).
"use strict";
(function () {
  const S = window.cltrace, { el, $, fmt } = S;
  const LIST_CAP = 60;
  let targets = [];  // node ids the next experiment intervenes on

  // --- node card and its links ---------------------------------------------------------------
  // One entry of a links list: the node at the other end, and the weight. A link with a split
  // by heads (graphs traced with --qk) has its weight as a button that opens the Edge card.
  function nodeRow(k, other) {
    const l = S.links[k], n = S.nodes[other];
    const cls = l.w >= 0 ? "w pos" : "w neg", text = ` ${l.w >= 0 ? "+" : ""}${fmt(l.w, 4)}`;
    const w = l.h && S.openEdge
      ? el("button", { type: "button", class: `${cls} linkish edge-btn`, title: "show this edge's split by attention heads", text, on: { click: () => S.openEdge(k) } })
      : el("span", { class: cls, text });
    return el("li", {}, el("button", { type: "button", class: "linkish", text: `${n.label} (${n.node_id})`, on: { click: () => S.select(other) } }), w);
  }

  function linksCard(i) {
    const body = $("links-body"); body.replaceChildren();
    for (const [title, list, end] of [["incoming", S.inL[i], "s"], ["outgoing", S.outL[i], "t"]]) {
      const ul = el("ul", { class: `linklist ${title}` });
      list.slice(0, LIST_CAP).forEach((k) => ul.append(nodeRow(k, S.links[k][end])));
      body.append(el("h3", { text: `${title} (${list.length}${list.length > LIST_CAP ? `, strongest ${LIST_CAP} listed` : ""})` }), ul);
    }
    $("links-card").hidden = false;
  }

  function nodeCard(i) {
    const card = $("node-card"); card.replaceChildren();
    if (i < 0) { card.append(el("p", { class: "muted", text: "Click a node." })); $("links-card").hidden = true; $("feature-card").hidden = true; return; }
    const n = S.nodes[i];
    const dl = el("dl", {});
    const add = (k, v) => dl.append(el("dt", { text: k }), el("dd", { text: v }));
    add("label", n.label); add("id", n.node_id); add("kind", n.kind);
    add("layer", n.kind === "embedding" ? "embedding" : n.kind === "logit" ? "logit" : String(n.layerNum));
    add("position", `${n.pos} (${S.tokenText((S.graph.metadata.prompt_tokens || [])[n.pos] ?? "?")})`);
    if (n.featIdx !== null) add("feature", String(n.featIdx));
    if (typeof n.activation === "number") add("activation", fmt(n.activation, 4));
    if (typeof n.influence === "number") add("influence", fmt(n.influence, 4));
    if (n.kind === "logit") add("probability", fmt(n.token_prob, 4));
    card.append(el("h3", { id: "card-title", text: n.label }), dl,
      el("button", { type: "button", id: "pin-btn", text: S.pinned.has(n.node_id) ? "unpin" : "pin",
        on: { click: (ev) => { S.togglePin(n.node_id); ev.target.textContent = S.pinned.has(n.node_id) ? "unpin" : "pin"; } } }));
    linksCard(i);
    if (n.kind === "feature") featureCard(n); else $("feature-card").hidden = true;
  }

  // --- feature card: label, examples shaded by activation, logits, frequency, histogram ------
  const pageCache = new Map();  // url -> promise of the page (a node card and a QK contributor card share one fetch)
  async function featurePage(n) {
    if (S.inline) return (S.inline.pages || {})[String(n.feature)] || null;
    const scan = String(S.graph.metadata.scan || "");
    if (!scan.startsWith("./")) return null;
    // "./data/x": as circuit-tracer's viewer reads it, relative to the server root, whose
    // /data/ is the served folder; any other "./x": relative to the graph's own folder
    const dir = S.path.includes("/") ? S.path.slice(0, S.path.lastIndexOf("/") + 1) : "";
    const rel = scan.slice(2).replace(/\/$/, "");
    const url = rel.startsWith("data/") ? `/${rel}/${n.feature}.json` : `/data/${dir}${rel}/${n.feature}.json`;
    if (!pageCache.has(url)) pageCache.set(url, fetch(url).then((r) => (r.ok ? r.json() : null)).catch(() => null));
    return pageCache.get(url);
  }

  function example(ex, actMax) {
    const div = el("div", { class: "example" });
    (ex.tokens || []).forEach((t, j) => {
      const a = Number((ex.tokens_acts_list || [])[j] || 0), f = actMax > 0 ? Math.max(0, Math.min(1, a / actMax)) : 0;
      const sp = el("span", { class: "tok" + (j === ex.train_token_ind ? " train" : ""), title: `act ${fmt(a)}`, text: String(t).replace(/\n/g, "⏎") });
      if (f > 0) sp.style.background = `rgba(242, 140, 40, ${(0.1 + 0.9 * f).toFixed(3)})`;
      div.append(sp);
    });
    return div;
  }

  function histogram(h) {
    let heights = null;
    if (Array.isArray(h)) heights = h.map(Number);
    else if (h && typeof h === "object") heights = (h.bar_heights || h.counts || h.heights || []).map(Number);
    if (!heights || !heights.length) return null;
    const W = 240, H = 50, bw = W / heights.length, mx = Math.max(...heights, 1e-12);
    const svg = el("svg", { width: W, height: H, class: "hist", role: "img", "aria-label": "activation histogram" });
    heights.forEach((v, j) => svg.append(el("rect", { x: j * bw, y: H - H * v / mx, width: Math.max(1, bw - 1), height: H * v / mx })));
    return svg;
  }

  async function featureCard(n) {
    $("feature-card").hidden = false;
    await fillFeature($("feature-body"), n, () => S.selected === n.idx);
  }

  // The feature card of node n into `body`, unless current() says it is no longer wanted once
  // its page has come (another node was selected meanwhile).
  async function fillFeature(body, n, current) {
    body.replaceChildren(el("p", { class: "muted", text: "loading…" }));
    const page = await featurePage(n);
    if (!current()) return;
    body.replaceChildren();
    const label = n.clerp || (page && (page.label || page.explanation)) || "(no label)";
    body.append(el("h3", { class: "feature-label", text: label }), el("p", { class: "muted", text: `layer ${n.layerNum}, feature ${n.featIdx}` }));
    // how many top examples the label rests on (cltrace pages' label_examples; other pages: none)
    const nEx = page ? page.label_examples : undefined;
    if (Number.isInteger(nEx)) body.append(el("p", { class: "muted label-basis", text: `label from ${nEx} example${nEx === 1 ? "" : "s"}` }));
    if (!page) { body.append(el("p", { class: "nopage", text: "No feature page available for this feature (build feature pages to see its examples)." })); return; }
    const dl = el("dl", {});
    const add = (k, v) => dl.append(el("dt", { text: k }), el("dd", { text: v }));
    if (page.activation_frequency !== undefined) add("frequency", `${fmt(100 * page.activation_frequency, 3)} %`);
    if (page.act_max !== undefined) add("activation range", `${fmt(page.act_min)} … ${fmt(page.act_max)}`);
    if (typeof page.top_logit_score === "number") add("top logit", `${fmt(page.top_logit_score, 1)} SD above the vocabulary mean`);
    body.append(dl);
    const hist = histogram(page.histogram); if (hist) body.append(el("h4", { text: "histogram" }), hist);
    for (const [name, list] of [["top logits", page.top_logits], ["bottom logits", page.bottom_logits]]) {
      if (!list || !list.length) continue;
      const ul = el("ul", { class: `tokens ${name.replace(" ", "-")}` });
      list.slice(0, 10).forEach((t) => ul.append(el("li", { text: S.tokenText(t) })));
      body.append(el("h4", { text: name }), ul);
    }
    const actMax = Number(page.act_max) || Math.max(0, ...(page.examples_quantiles || []).flatMap((q) => (q.examples || []).flatMap((e) => e.tokens_acts_list || [])));
    (page.examples_quantiles || []).forEach((q, qi) => {
      const sec2 = el("div", { class: qi === 0 ? "quantile top" : "quantile" }, el("h4", { text: qi === 0 ? `top examples (${q.quantile_name || ""})` : q.quantile_name || `quantile ${qi}` }));
      (q.examples || []).slice(0, qi === 0 ? 8 : 3).forEach((ex) => sec2.append(example(ex, actMax)));
      body.append(sec2);
    });
  }

  // --- pins and supernodes -------------------------------------------------------------------
  function pinsPanel() {
    const ul = $("pin-list"); ul.replaceChildren();
    for (const id of S.pinned) {
      const n = S.nodes[S.byId.get(id)];
      ul.append(el("li", {}, el("label", {}, el("input", { type: "checkbox", class: "pin-check", value: id }), ` ${n.label} `),
        el("button", { type: "button", class: "linkish", text: id, on: { click: () => S.select(n.idx) } })));
    }
    if (!S.pinned.size) ul.append(el("li", { class: "muted", text: "no pinned node (pin from a node card or shift-click)" }));
    const sl = $("supernode-list"); sl.replaceChildren();
    const opt = $("target-supernode"); opt.replaceChildren(el("option", { value: "", text: "supernode…" }));
    S.supernodes.forEach((sn, j) => {
      sl.append(el("li", { class: "supernode" }, el("strong", { text: sn[0] }), ` ${sn.slice(1).join(", ")} `,
        el("button", { type: "button", title: "remove supernode", text: "×", on: { click: () => { S.supernodes.splice(j, 1); pinsPanel(); } } })));
      opt.append(el("option", { value: String(j), text: sn[0] }));
    });
    const member = new Set(S.supernodes.flatMap((s) => s.slice(1)));
    for (const n of S.nodes) if (n.elem) n.elem.classList.toggle("member", member.has(n.node_id));
    S.drawGroups();
  }

  function group() {
    const ids = [...document.querySelectorAll(".pin-check:checked")].map((c) => c.value);
    const name = $("supernode-name").value.trim();
    if (!ids.length || !name) return S.showError("Check pinned nodes and give the supernode a name.");
    S.showError(""); S.supernodes.push([name, ...ids]); $("supernode-name").value = ""; pinsPanel();
  }

  async function save() {
    const status = $("save-status");
    if (S.inline) { status.textContent = "read-only (notebook)"; return; }
    status.textContent = "saving…";
    try {
      const r = await fetch("/api/save", { method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ graph: S.path, qParams: { pinnedIds: [...S.pinned], supernodes: S.supernodes } }) });
      const out = await r.json();
      if (!r.ok) throw new Error(out.error || `HTTP ${r.status}`);
      status.textContent = `saved (${out.pinnedIds} pinned, ${out.supernodes} supernodes)`;
    } catch (e) { status.textContent = ""; S.showError(`save failed: ${e.message || e}`); }
  }

  // --- experiments ---------------------------------------------------------------------------
  function setTargets(ids) {
    targets = ids.filter((id) => S.byId.has(id));
    const ul = $("target-list"); ul.replaceChildren();
    targets.forEach((id) => ul.append(el("li", { text: `${S.nodes[S.byId.get(id)].label} (${id})` })));
    if (!targets.length) ul.append(el("li", { class: "muted", text: "no target: choose the selected node, checked pins or a supernode" }));
  }

  function expError(msg) { const e = $("exp-error"); e.textContent = msg; e.hidden = !msg; }

  function request() {
    const op = $("exp-op").value, value = Number($("exp-value").value);
    const items = [];
    for (const id of targets) {
      const n = S.nodes[S.byId.get(id)];
      if (n.kind !== "feature") throw new Error(`${id} is ${n.kind === "error" ? "an error node" : `a ${n.kind}`}: only features can be intervened on`);
      items.push({ layer: n.layerNum, feature: n.featIdx, pos: n.pos, op: op === "ablate" ? "set" : op, value: op === "ablate" ? 0 : value });
    }
    const mode = $("exp-mode").value;
    return { graph: S.path, interventions: items, mode, freeze_features: mode === "frozen" && $("exp-freeze").checked,
      max_new_tokens: Math.round(Number($("exp-tokens").value)) };
  }

  function result(out) {
    const div = $("exp-result"); div.replaceChildren();
    div.append(el("p", { class: "muted", text: `${out.mode} mode${out.freeze_features ? ", other features held" : ""}: ${out.interventions.join(", ")}` }));
    const t = el("table", { id: "exp-top" }, el("tr", {}, el("th", { text: "token" }), el("th", { text: "p before" }), el("th", { text: "p after" }), el("th", { text: "Δp" })));
    for (const r of out.top) t.append(el("tr", { "data-token": r.token, "data-before": r.before, "data-after": r.after },
      el("td", { text: S.tokenText(r.text) }), el("td", { text: fmt(r.before, 4) }), el("td", { text: fmt(r.after, 4) }),
      el("td", { class: r.after >= r.before ? "w pos" : "w neg", text: fmt(r.after - r.before, 4) })));
    div.append(el("h4", { text: "next-token probabilities" }), t);
    if (out.continuation) div.append(el("h4", { text: "continuation" }),
      el("p", { class: "cont" }, el("b", { text: "before: " }), el("span", { id: "cont-before", text: out.continuation.before })),
      el("p", { class: "cont" }, el("b", { text: "after: " }), el("span", { id: "cont-after", text: out.continuation.after })));
    const lt = el("table", { id: "exp-logits" }, el("tr", {}, el("th", { text: "logit" }), el("th", { text: "Δ measured" }), el("th", { text: "Δ from edges" })));
    for (const r of out.logits) {
      const pred = r.predicted === undefined ? "(frozen + hold features only)" : fmt(r.predicted, 4) + (r.pruned.length ? ` (link pruned from JSON: ${r.pruned.join(", ")})` : "");
      lt.append(el("tr", { "data-node": r.node_id, "data-measured": r.measured, "data-predicted": r.predicted ?? "" },
        el("td", { text: S.tokenText(r.text) }), el("td", { text: fmt(r.measured, 4) }), el("td", { text: pred })));
    }
    div.append(el("h4", { text: "target logits (centred): measured vs predicted by the graph's edges" }), lt);
  }

  async function run() {
    expError(""); $("exp-result").replaceChildren(el("p", { class: "muted", text: "running…" }));
    document.body.dataset.experiment = "running";
    try {
      const req = request();
      const r = await fetch("/api/intervene", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(req) });
      const out = await r.json();
      if (!r.ok) throw new Error(out.error || `HTTP ${r.status}`);
      result(out);
      $("experiments").scrollIntoView({ block: "start" });
      document.body.dataset.experiment = "done";
    } catch (e) { $("exp-result").replaceChildren(); expError(String(e.message || e)); document.body.dataset.experiment = "error"; }
  }

  function wire() {
    if (!$("group-btn")) return;  // lens.html: only the feature card is used
    $("group-btn").addEventListener("click", group);
    $("save-btn").addEventListener("click", save);
    $("target-selected").addEventListener("click", () => setTargets(S.selected >= 0 ? [S.nodes[S.selected].node_id] : []));
    $("target-checked").addEventListener("click", () => setTargets([...document.querySelectorAll(".pin-check:checked")].map((c) => c.value)));
    $("target-supernode").addEventListener("change", (ev) => { const sn = S.supernodes[Number(ev.target.value)]; if (sn) setTargets(sn.slice(1)); ev.target.value = ""; });
    $("exp-run").addEventListener("click", run);
    $("exp-mode").addEventListener("change", () => { $("exp-freeze").disabled = $("exp-mode").value !== "frozen"; });
  }

  S.fillFeature = fillFeature;
  S.hooks.onSelect = nodeCard;
  S.hooks.onPins = pinsPanel;
  S.hooks.onGraph = () => {
    pageCache.clear();
    nodeCard(-1); pinsPanel(); setTargets([]);
    $("experiments").hidden = !(S.model && S.model.available) || !!S.inline;
    $("save-btn").disabled = !!S.inline;
  };
  document.addEventListener("DOMContentLoaded", wire);
})();

// cltrace viewer, attention panels (graphs traced with `cltrace attribute --qk`, docs/interop.md):
// the Flow heatmap of `relevance` (token × layer), an edge's split by attention heads (`heads`
// on links), and a head's attention pattern (`head_patterns`) with its QK traces (`qk_traces`,
// contributors described in `nodes` or `qk_only_nodes`). Graphs without these keys show none of it.
(function () {
  const S = window.cltrace, { el, $, fmt } = S;
  const A = { traces: [], patterns: new Map(), qkOnly: new Map() };  // the open graph's attention data
  let stay = false;  // true while a Heads-tab click selects a node: the Heads tab stays open
  let headCtx = null;  // the open head: {layer, head, trace (index in A.traces), q, k (the edge's cell)}

  // --- small helpers -------------------------------------------------------------------------
  const tokens = () => S.graph.metadata.prompt_tokens || [];
  const tok = (p) => S.tokenText(tokens()[p] ?? `#${p}`);
  const short = (t, n = 9) => (t.length > n ? `${t.slice(0, n - 1)}…` : t);
  const headKey = (L, h) => `${Number(L)}:${Number(h)}`;
  const signed = (x, d = 4) => (x >= 0 ? "+" : "") + fmt(x, d);

  // A node by id: the graph's own, else a qk_only_nodes entry (prepared once), else null.
  function anyNode(id) {
    if (S.byId.has(id)) return S.nodes[S.byId.get(id)];
    const n = A.qkOnly.get(id);
    if (n && n.label === undefined) { S.prepNode(n); n.label = S.nodeLabel(n); }
    return n || null;
  }

  // --- colour scales: white to blue for positive values, white to red for negative ones -------
  const BLUES = [[255, 255, 255], [198, 219, 239], [107, 174, 214], [33, 113, 181], [8, 48, 107]];
  const REDS = [[255, 255, 255], [252, 187, 161], [251, 106, 74], [203, 24, 29], [103, 0, 13]];
  function ramp(stops, t) {
    const x = Math.max(0, Math.min(1, t)) * (stops.length - 1), i = Math.min(stops.length - 2, Math.floor(x)), f = x - i;
    const c = stops[i].map((v, j) => Math.round(v + f * (stops[i + 1][j] - v)));
    return `rgb(${c[0]}, ${c[1]}, ${c[2]})`;
  }
  function color(v, max) { const t = max > 0 ? v / max : 0; return t >= 0 ? ramp(BLUES, t) : ramp(REDS, -t); }

  // A legend strip: the colour ramp from -max (when signed) or 0 to max, with its end values.
  function legend(max, isSigned, caption) {
    const W = 150, H = 10, N = 50, lo = isSigned ? -max : 0;
    const svg = el("svg", { class: "scale", width: W + 80, height: H + 16, role: "img", "aria-label": `${caption} colour scale` });
    for (let j = 0; j < N; j++) svg.append(el("rect", { x: j * W / N, y: 0, width: W / N + 0.5, height: H, fill: color(lo + (max - lo) * (j + 0.5) / N, max) }));
    svg.append(el("text", { x: 0, y: H + 12, class: "lab", text: fmt(lo, 3) }),
      el("text", { x: W, y: H + 12, class: "lab", "text-anchor": "end", text: fmt(max, 3) }),
      el("text", { x: W + 6, y: H - 1, class: "lab", text: caption }));
    if (isSigned) svg.append(el("text", { x: W / 2, y: H + 12, class: "lab", "text-anchor": "middle", text: "0" }));
    return svg;
  }

  // A bar for a signed value against ±max: a track split at zero, blue to the right, red to the left.
  function bar(v, max) {
    const pct = `${(max > 0 ? Math.min(1, Math.abs(v) / max) : 0) * 100}%`;
    return el("span", { class: "bar" },
      el("span", {}, v < 0 ? el("i", { class: "neg", style: `width: ${pct}` }) : null),
      el("span", {}, v >= 0 ? el("i", { class: "pos", style: `width: ${pct}` }) : null));
  }

  // An SVG heatmap. rows: [{key, label}] drawn top to bottom; cols: [{key, label}] left to right,
  // labelled under the cells (slanted); value(r, c) coloured against ±max. Cells are rects of
  // class "hcell" with data-r / data-c; hover shows tip(r, c), a click calls click(r, c). Where
  // cells are too small for every label, every 2nd (3rd, ...) one is written.
  function heatmap({ rows, cols, value, max, cellW, cellH, labW, aria, tip, click }) {
    const labH = 52, W = labW + cols.length * cellW + 4, H = rows.length * cellH + labH;
    const angle = cellW >= 16 ? -50 : -90;  // column labels: slanted, or upright where columns are narrow
    const rowStep = Math.ceil(11 / cellH), colStep = Math.ceil(11 / (cellW * Math.abs(Math.sin(angle * Math.PI / 180))));
    const svg = el("svg", { class: "hm", width: W, height: H, role: "img", "aria-label": aria });
    rows.forEach((r, i) => {
      if (i % rowStep === 0) svg.append(el("text", { x: labW - 4, y: i * cellH + cellH / 2 + 3.5, class: "lab", "text-anchor": "end", text: r.label }));
      cols.forEach((c, j) => {
        const v = value(r.key, c.key);
        svg.append(el("rect", { class: "hcell", x: labW + j * cellW, y: i * cellH, width: cellW, height: cellH,
          fill: Number.isFinite(v) ? color(v, max) : "#eee", "data-r": r.key, "data-c": c.key, "data-v": v }));
      });
    });
    cols.forEach((c, j) => {
      const x = labW + j * cellW + cellW / 2 + 3, y = rows.length * cellH + 6;
      if (j % colStep === 0) svg.append(el("text", { x, y, class: "lab", "text-anchor": "end", transform: `rotate(${angle} ${x} ${y})`, text: c.label }));
    });
    const cellOf = (ev) => (ev.target.classList && ev.target.classList.contains("hcell") ? ev.target : null);
    svg.addEventListener("mousemove", (ev) => { const c = cellOf(ev); S.tooltip(ev, c && tip(c.dataset.r, c.dataset.c)); });
    svg.addEventListener("mouseleave", (ev) => S.tooltip(ev, ""));
    svg.addEventListener("click", (ev) => { const c = cellOf(ev); if (c) click(c.dataset.r, c.dataset.c); });
    svg.cellBox = (r, c) => ({ x: labW + cols.findIndex((x) => String(x.key) === String(c)) * cellW,
      y: rows.findIndex((x) => String(x.key) === String(r)) * cellH, width: cellW, height: cellH });
    return svg;
  }

  // An outline over one heatmap cell (class cls), e.g. a traced (query, key) cell.
  function outline(svg, r, c, cls) {
    const b = svg.cellBox(r, c);
    if (b.x < 0 || b.y < 0) return;
    svg.append(el("rect", { class: cls, x: b.x + 1, y: b.y + 1, width: b.width - 2, height: b.height - 2, "data-r": r, "data-c": c }));
  }

  // --- tabs: Node (the existing cards), Flow, Heads ---------------------------------------------
  function showTab(name) {
    if (document.body.dataset.tab !== name) $("side").scrollTop = 0;  // the tabs share one scrolling column
    for (const b of document.querySelectorAll("#tabs [role=tab]")) b.setAttribute("aria-selected", String(b.dataset.tab === name));
    for (const p of document.querySelectorAll(".tabpanel")) p.hidden = p.dataset.tab !== name;
    document.body.dataset.tab = name;
  }

  // ==== Flow: the relevance heatmap (rows: layers top to bottom, then E; columns: tokens) =====
  function relevance() {
    const r = S.graph.relevance;
    const ok = r && Array.isArray(r.rows) && Array.isArray(r.values) && r.rows.length > 0 &&
      r.values.length === r.rows.length && r.values.every(Array.isArray);
    return ok ? r : null;
  }

  function flowPanel() {
    const body = $("flow-body"); body.replaceChildren();
    const rel = relevance();
    if (!rel) return;
    const rows = rel.rows.map((key, i) => ({ key: String(key), label: key === "E" ? "E" : `L${key}`, i })).reverse();
    const nPos = Math.max(...rel.values.map((v) => v.length));
    const cols = [...Array(nPos).keys()].map((p) => ({ key: p, label: short(tok(p)) }));
    const vals = new Map(rows.map((r) => [r.key, rel.values[r.i].map(Number)]));
    const all = [...vals.values()].flat().filter(Number.isFinite);
    const max = Math.max(1e-12, ...all.map(Math.abs)), isSigned = all.some((v) => v < 0);
    const svg = heatmap({ rows, cols, max, labW: 34, aria: "relevance: layer by token",
      cellW: Math.max(6, Math.min(48, Math.floor(330 / nPos))), cellH: Math.max(8, Math.min(26, Math.floor(340 / rows.length))),
      value: (r, c) => vals.get(r)[c],
      tip: (r, c) => `${r === "E" ? "tokens" : `layer ${r}`} · position ${c} “${tok(Number(c))}”\nrelevance ${fmt(vals.get(r)[c], 4)} · ${cellNodes(r, Number(c)).length} nodes`,
      click: (r, c) => selectCell(r, Number(c)) });
    svg.id = "flow-map";
    body.append(svg, legend(max, isSigned, "influence"));
  }

  function cellNodes(row, pos) { const c = { row, pos }; return S.nodes.filter((n) => S.cellHas(c, n)); }

  // Select the cell's nodes: highlighted in the graph (a box and an outline on each) and listed;
  // clicking the selected cell again clears it.
  function selectCell(row, pos) {
    const same = S.cell && S.cell.row === row && S.cell.pos === pos;
    S.cell = same ? null : { row, pos };
    S.drawMarks();
    for (const r of document.querySelectorAll("#flow-map .hcell.on")) r.classList.remove("on");
    const card = $("cell-card"), body = $("cell-body");
    body.replaceChildren(); card.hidden = !S.cell;
    document.body.dataset.cell = S.cell ? `${row}:${pos}` : "";
    document.body.dataset.cellSelected = S.cell ? cellNodes(row, pos).length : 0;
    if (!S.cell) return;
    const rect = document.querySelector(`#flow-map .hcell[data-r="${row}"][data-c="${pos}"]`);
    if (rect) rect.classList.add("on");
    const nodes = cellNodes(row, pos).sort((a, b) => (a.influence ?? 0) - (b.influence ?? 0));
    body.append(el("h3", { text: `${row === "E" ? "tokens" : `layer ${row}`} · position ${pos} “${tok(pos)}”` }),
      el("p", { class: "muted", text: `relevance ${fmt(relevance().values[relevance().rows.map(String).indexOf(row)][pos], 4)} · ${nodes.length} node${nodes.length === 1 ? "" : "s"} in the graph` }));
    body.append(el("button", { type: "button", id: "cell-clear", text: "clear", on: { click: () => selectCell(row, pos) } }));
    const ul = el("ul", { class: "linklist", id: "cell-list" });
    for (const n of nodes) ul.append(el("li", {}, el("button", { type: "button", class: "linkish", text: `${n.label} (${n.node_id})`, on: { click: () => S.select(n.idx) } }),
      el("span", { class: "muted", text: n.shown ? (typeof n.influence === "number" ? fmt(n.influence, 3) : "") : "pruned by the slider" })));
    body.append(ul);
  }

  // ==== Edge: a link's weight split by the heads its paths cross ===============================
  function openEdge(k) {
    S.edge = k; S.drawMarks();
    const l = S.links[k], src = S.nodes[l.s], tgt = S.nodes[l.t], body = $("edge-body");
    const nodeBtn = (n) => el("button", { type: "button", class: "linkish", text: n.label, title: n.node_id, on: { click: () => S.select(n.idx) } });
    body.replaceChildren(el("h3", {}, nodeBtn(src), " → ", nodeBtn(tgt)),
      el("p", { class: "muted", text: `${src.node_id} → ${tgt.node_id} · weight ${signed(l.w, 6)}` }));
    if (l.h) body.append(headSplit(l, src, tgt));
    else body.append(el("p", { class: "muted", text: "No split by heads (the graph was traced without --qk)." }));
    $("edge-card").hidden = false;
    document.body.dataset.edge = `${src.node_id}>${tgt.node_id}`;
    $("edge-card").scrollIntoView({ block: "nearest" });
  }

  // The parts of `heads` as rows (name or head, bar, value, share of the weight) and their sum.
  function headSplit(l, src, tgt) {
    const h = l.h, hops = Array.isArray(h.one_hop) ? h.one_hop : [];
    const parts = [{ name: "residual (no head)", v: Number(h.residual) || 0, cls: "residual" },
      ...hops.map(([L, hd, w]) => ({ head: [Number(L), Number(hd)], v: Number(w), cls: "one-hop" })),
      { name: "other one-hop heads", v: Number(h.other_one_hop) || 0, cls: "other" },
      { name: "multi-hop (2+ heads)", v: Number(h.multi_hop) || 0, cls: "multi" }];
    const max = Math.max(1e-12, ...parts.map((p) => Math.abs(p.v)));
    const t = el("table", { class: "split" });
    for (const p of parts) {
      const name = p.head ? headButton(p.head[0], p.head[1], { q: tgt.pos, k: src.pos, edge: [src.node_id, tgt.node_id] }) : el("span", { text: p.name });
      t.append(el("tr", { class: `part ${p.cls}`, "data-v": p.v }, el("td", {}, name), el("td", {}, bar(p.v, max)),
        el("td", { class: p.v >= 0 ? "w pos" : "w neg", text: signed(p.v) }),
        el("td", { class: "muted", text: l.w ? `${fmt(100 * p.v / l.w, 1)} %` : "" })));
    }
    const sum = parts.reduce((a, p) => a + p.v, 0), ok = Math.abs(sum - l.w) <= 1e-4 * Math.max(1e-3, Math.abs(l.w));
    document.body.dataset.edgeSum = sum; document.body.dataset.edgeWeight = l.w; document.body.dataset.edgeParts = parts.length;
    return el("div", {}, el("h4", { text: "split by attention heads (share of the weight)" }), t,
      el("p", { class: ok ? "sum" : "sum bad", text: `sum of the parts ${signed(sum, 6)} ${ok ? "=" : "≠"} weight ${signed(l.w, 6)}` }));
  }

  // A button naming a head; opens its Head card. Marked "traced" when qk_traces has that head.
  function headButton(L, h, ctx) {
    const traced = A.traces.some((t) => t.layer === L && t.head === h);
    return el("button", { type: "button", class: "linkish head-btn", "data-layer": L, "data-head": h, title: "attention pattern and QK traces of this head",
      on: { click: () => openHead(L, h, ctx || {}) } }, `L${L} H${h}`, traced ? el("span", { class: "badge", text: "traced" }) : null);
  }

  // ==== Head: its attention pattern and its QK traces ==========================================
  function openHead(L, h, ctx) {
    L = Number(L); h = Number(h);
    const traces = A.traces.map((t, i) => [t, i]).filter(([t]) => t.layer === L && t.head === h);
    let active = ctx.trace;
    if (active === undefined && ctx.edge) { const m = traces.find(([t]) => t.source === ctx.edge[0] && t.target === ctx.edge[1]); active = m && m[1]; }
    if (active === undefined && traces.length) active = traces[0][1];
    headCtx = { layer: L, head: h, trace: active, q: ctx.q, k: ctx.k };
    showTab("heads");
    $("contrib-card").hidden = true; $("head-card").after($("contrib-card"));
    const body = $("head-body"); body.replaceChildren(el("h3", { text: `layer ${L} · head ${h}` }));
    body.append(patternMap(L, h, traces));
    if (!traces.length) body.append(el("p", { class: "muted", text: "No QK trace of this head in the graph." }));
    if (traces.length) body.append(el("p", { class: "muted", text: "Contributors: blue, nodes of the graph (a click selects them); purple, not in the graph (qk_only_nodes). A click shows a contributor's card." }));
    for (const [t, i] of traces) body.append(traceBlock(t, i));
    $("head-card").hidden = false;
    document.body.dataset.head = headKey(L, h); document.body.dataset.headTraces = traces.length;
    const act = body.querySelector(".trace.active");  // (opened from the list or the pattern: show that trace)
    if (act && ctx.trace !== undefined) act.scrollIntoView({ block: "nearest" }); else $("side").scrollTop = 0;
  }

  // The head's pattern (rows: the stored query positions, columns: key positions), each traced
  // cell outlined when its query row is stored (the active trace's thicker), the opening edge's
  // cell dashed; a click on a traced cell opens it. head_patterns lists its rows in `queries`:
  // every position for short prompts, else the traced queries and the last one (a line marks
  // where rows are skipped).
  function patternMap(L, h, traces) {
    const hp = A.patterns.get(headKey(L, h));
    if (!hp) return el("p", { class: "muted", text: "No attention pattern stored for this head." });
    const { queries, pattern: pat } = hp;
    const n = queries.length, m = Math.max(...pat.map((r) => r.length)), nPos = tokens().length || m;
    const row = new Map(queries.map((q, i) => [String(q), i]));
    const rows = queries.map((q) => ({ key: q, label: `${q} ${short(tok(q), 8)}` }));
    const cols = [...Array(m).keys()].map((k) => ({ key: k, label: short(tok(k), 8) }));
    const max = Math.max(1e-12, ...pat.flat().map(Number).filter(Number.isFinite));
    const cellW = Math.max(6, Math.min(30, Math.floor(290 / Math.max(n, m))));
    const cellH = n < nPos ? Math.max(12, cellW) : cellW;  // some rows only: each one labelled
    const svg = heatmap({ rows, cols, max, cellW, cellH, labW: 78, aria: `attention pattern of layer ${L} head ${h}`,
      value: (q, k) => Number(pat[row.get(String(q))][k]),
      tip: (q, k) => `query ${q} “${tok(Number(q))}” → key ${k} “${tok(Number(k))}”\nprobability ${fmt(pat[row.get(String(q))][k], 5)}`,
      click: (q, k) => { const m2 = traces.find(([t]) => t.query_pos === Number(q) && t.key_pos === Number(k)); if (m2) activateTrace(m2[1]); } });
    svg.classList.add("pattern");
    svg.dataset.rows = n; svg.dataset.cols = m;
    queries.forEach((q, i) => {  // skipped query positions: a line between the rows around them
      if (i > 0 && q !== queries[i - 1] + 1) svg.append(el("line", { class: "rowgap", x1: 78, x2: 78 + m * cellW, y1: i * cellH, y2: i * cellH }));
    });
    if (headCtx.q !== undefined && headCtx.k !== undefined) outline(svg, headCtx.q, headCtx.k, "edgecell");
    for (const [t, i] of traces) outline(svg, t.query_pos, t.key_pos, i === headCtx.trace ? "tracecell active" : "tracecell");
    const wrap = el("div", { class: "pattern-wrap" }, el("h4", { text: "attention pattern (rows: query, columns: key)" }));
    if (n < nPos) wrap.append(el("p", { class: "muted pattern-rows", text: `${n} of ${nPos} query rows stored (the traced queries and the last position)` }));
    const missing = traces.filter(([t]) => !row.has(String(t.query_pos))).length;
    if (missing) wrap.append(el("p", { class: "muted", text: `not stored: the query row of ${missing} of the head's ${traces.length} trace${traces.length === 1 ? "" : "s"}` }));
    wrap.append(svg, legend(max, false, "probability"));
    return wrap;
  }

  // Open trace i in its head's card (keeping the edge's cell mark when the head stays the same).
  function activateTrace(i) {
    const t = A.traces[i], same = headCtx && headCtx.layer === t.layer && headCtx.head === t.head;
    openHead(t.layer, t.head, { trace: i, q: same ? headCtx.q : undefined, k: same ? headCtx.k : undefined });
  }

  // One trace: its cell, score and probability, the edge it carries, then its contributors.
  function traceBlock(t, i) {
    const div = el("div", { class: i === headCtx.trace ? "trace active" : "trace", "data-trace": i });
    div.append(el("h4", {}, el("button", { type: "button", class: "linkish trace-title", on: { click: () => activateTrace(i) },
      text: `query ${t.query_pos} “${tok(t.query_pos)}” → key ${t.key_pos} “${tok(t.key_pos)}”` })));
    const dl = el("dl", {});
    const add = (k, v) => dl.append(el("dt", { text: k }), el("dd", {}, v));
    add("score", `${fmt(t.score, 4)} (pre-softmax)`); add("probability", fmt(t.prob, 4));
    if (t.source != null && t.target != null) add("edge", el("span", {}, sideButton(t.source, div), " → ", sideButton(t.target, div)));
    else add("edge", "— (traced by hand)");
    div.append(dl);
    const pairs = Array.isArray(t.pair_wise_contributors) ? t.pair_wise_contributors : [];
    const qm = Array.isArray(t.top_q_marginal_contributors) ? t.top_q_marginal_contributors : [];
    const km = Array.isArray(t.top_k_marginal_contributors) ? t.top_k_marginal_contributors : [];
    div.append(pairTable(pairs, t, div),
      margTable("query side (each source against the whole key)", "qmarg", qm, t.q_constant, t.q_rest, t.score, div),
      margTable("key side (each source against the whole query)", "kmarg", km, t.k_constant, t.k_rest, t.score, div));
    return div;
  }

  // Pair-wise contributors: query-side node, key-side node, their share of the score.
  function pairTable(pairs, t, div) {
    const max = Math.max(1e-12, ...pairs.map((p) => Math.abs(Number(p[2]))));
    const tbl = el("table", { class: "pairs" }, el("tr", {}, el("th", { text: "query side" }), el("th", { text: "key side" }), el("th", { text: "attr" })));
    for (const [qid, kid, a] of pairs) tbl.append(el("tr", { class: "pair", "data-attr": a },
      el("td", {}, sideButton(qid, div)), el("td", {}, sideButton(kid, div)), el("td", { class: "num" }, bar(Number(a), max), ` ${signed(Number(a), 3)}`)));
    const sum = pairs.reduce((s, p) => s + Number(p[2]), 0) + (Number(t.pairs_rest) || 0);
    return el("div", {}, el("h5", { text: `pair-wise contributors (${pairs.length})` }), tbl,
      el("p", { class: "muted", text: `other pairs ${signed(Number(t.pairs_rest) || 0, 3)} · Σ = ${fmt(sum, 4)} (score ${fmt(t.score, 4)})` }));
  }

  // Marginal contributors of one side, then that side's constant and the rest.
  function margTable(title, cls, list, constant, rest, score, div) {
    const max = Math.max(1e-12, ...list.map((p) => Math.abs(Number(p[1]))));
    const tbl = el("table", { class: `marg ${cls}` });
    for (const [id, a] of list) tbl.append(el("tr", { class: "marg-row", "data-attr": a },
      el("td", {}, sideButton(id, div)), el("td", { class: "num" }, bar(Number(a), max), ` ${signed(Number(a), 3)}`)));
    const sum = list.reduce((s, p) => s + Number(p[1]), 0) + (Number(constant) || 0) + (Number(rest) || 0);
    return el("div", {}, el("h5", { text: title }), tbl,
      el("p", { class: "muted", text: `constant ${signed(Number(constant) || 0, 3)} · rest ${signed(Number(rest) || 0, 3)} · Σ = ${fmt(sum, 4)} (score ${fmt(score, 4)})` }));
  }

  // A contributor's id as a button: a graph node is selected in the graph; any node (a qk-only
  // one too) gets its card under the trace.
  function sideButton(id, div) {
    const n = anyNode(id), inGraph = S.byId.has(id);
    return el("button", { type: "button", class: `linkish side ${inGraph ? "in-graph" : "qk-only"}`, "data-node": id, title: id,
      text: n ? sideLabel(n) : id, on: { click: () => contributor(id, div) } });
  }

  const sideLabel = (n) => (n.kind === "embedding" ? `token “${tok(n.pos)}”` : n.label);

  function contributor(id, div) {
    const n = anyNode(id), inGraph = S.byId.has(id);
    if (inGraph) { stay = true; try { S.select(n.idx); } finally { stay = false; } }
    const card = $("contrib-card"), body = $("contrib-body");
    div.after(card); card.hidden = false;
    document.body.dataset.contributor = id; document.body.dataset.contributorInGraph = inGraph ? "1" : "0";
    body.replaceChildren(el("h3", { text: n ? sideLabel(n) : id }));
    if (!n) { body.append(el("p", { class: "muted", text: `${id}: not described in the graph` })); return; }
    const dl = el("dl", {});
    const add = (k, v) => dl.append(el("dt", { text: k }), el("dd", { text: v }));
    add("id", id); add("kind", n.kind === "const" ? "constant (b_dec, positions without nodes)" : n.kind);
    if (n.clerp && n.clerp !== n.label) add("label", n.clerp);
    add("in the graph", inGraph ? "yes (selected)" : "no (qk_only_nodes)");
    if (n.kind !== "embedding") add("layer", String(n.layerNum));
    add("position", `${n.pos} (${tok(n.pos)})`);
    if (n.featIdx !== null && n.featIdx !== undefined) add("feature", String(n.featIdx));
    if (typeof n.activation === "number") add("activation", fmt(n.activation, 4));
    add("influence", typeof n.influence === "number" ? fmt(n.influence, 4) : "– (not visited)");
    body.append(dl);
    if (n.kind === "feature") {
      const fb = el("div", { class: "contrib-feature" });
      body.append(fb);
      S.fillFeature(fb, n, () => document.body.dataset.contributor === id);
    }
    card.scrollIntoView({ block: "nearest" });
  }

  // ==== the list of every QK trace, and the heads with a stored pattern =========================
  function tracesPanel() {
    const body = $("traces-body"); body.replaceChildren();
    if (A.traces.length) {
      const tbl = el("table", { id: "trace-list" }, el("tr", {}, el("th", { text: "head" }), el("th", { text: "query ← key" }),
        el("th", { text: "score" }), el("th", { text: "prob" }), el("th", { text: "edge" })));
      A.traces.forEach((t, i) => {
        const edge = t.source != null && t.target != null ? `${labelOf(t.source)} → ${labelOf(t.target)}` : "(by hand)";
        tbl.append(el("tr", { class: "trace-row", "data-trace": i },
          el("td", {}, el("button", { type: "button", class: "linkish open-trace", text: `L${t.layer} H${t.head}`, on: { click: () => activateTrace(i) } })),
          el("td", { text: `${t.query_pos} ${short(tok(t.query_pos))} ← ${t.key_pos} ${short(tok(t.key_pos))}` }),
          el("td", { class: "num", text: fmt(t.score, 3) }), el("td", { class: "num", text: fmt(t.prob, 3) }), el("td", { class: "muted", text: edge })));
      });
      body.append(tbl);
    } else body.append(el("p", { class: "muted", text: "No QK trace in this graph." }));
    if (A.patterns.size) {
      const ul = el("ul", { class: "heads", id: "pattern-heads" });
      for (const key of A.patterns.keys()) { const [L, h] = key.split(":").map(Number); ul.append(el("li", {}, headButton(L, h))); }
      body.append(el("h4", { text: "heads with a stored pattern" }), ul);
    }
  }
  const labelOf = (id) => { const n = anyNode(id); return n ? short(n.label, 22) : id; };

  // Node card addition: the QK traces of the edges into this node.
  function nodeTraces(i) {
    if (i < 0) return;
    const id = S.nodes[i].node_id, mine = A.traces.map((t, j) => [t, j]).filter(([t]) => t.target === id);
    if (!mine.length) return;
    const ul = el("ul", { class: "heads node-traces" });
    for (const [t, j] of mine) ul.append(el("li", {}, el("button", { type: "button", class: "linkish", on: { click: () => activateTrace(j) },
      text: `L${t.layer} H${t.head}: query ${t.query_pos} ← key ${t.key_pos} (from ${labelOf(t.source)})` })));
    $("node-card").append(el("h4", { text: "QK traces into this node" }), ul);
  }

  // --- the graph's attention data, and the hooks into the viewer ------------------------------
  function load(g) {
    A.traces = (Array.isArray(g.qk_traces) ? g.qk_traces : []).filter((t) => t && typeof t === "object")
      .map((t) => ({ ...t, layer: Number(t.layer), head: Number(t.head), query_pos: Number(t.query_pos), key_pos: Number(t.key_pos) }));
    A.patterns = new Map();
    for (const p of Array.isArray(g.head_patterns) ? g.head_patterns : []) {
      if (!p || !Array.isArray(p.pattern) || !p.pattern.length || !p.pattern.every(Array.isArray)) continue;
      // `queries`: the query position of each row (graphs before it: every row, 0 .. n-1)
      const queries = Array.isArray(p.queries) ? p.queries.map(Number) : p.pattern.map((_, i) => i);
      if (queries.length !== p.pattern.length || !queries.every(Number.isInteger)) continue;  // (malformed: not drawn)
      A.patterns.set(headKey(p.layer, p.head), { queries, pattern: p.pattern });
    }
    A.qkOnly = new Map(Object.entries(g.qk_only_nodes && typeof g.qk_only_nodes === "object" ? g.qk_only_nodes : {})
      .map(([id, n]) => [id, { ...n, node_id: n.node_id ?? id }]));
  }

  const onGraph = S.hooks.onGraph, onSelect = S.hooks.onSelect;
  S.hooks.onGraph = () => {
    onGraph();
    load(S.graph); headCtx = null;
    const flow = !!relevance(), heads = A.traces.length > 0 || A.patterns.size > 0;
    $("tab-flow").hidden = !flow; $("tab-heads").hidden = !heads; $("tabs").hidden = !flow && !heads;
    for (const id of ["edge-card", "cell-card", "head-card", "contrib-card"]) $(id).hidden = true;
    Object.assign(document.body.dataset, { cell: "", cellSelected: 0, edge: "", head: "", contributor: "" });
    flowPanel(); tracesPanel(); showTab("node");
  };
  S.hooks.onSelect = (i) => {
    onSelect(i);
    if (S.edge !== null) {  // the Edge card stays while one of its two ends is selected
      const l = S.links[S.edge];
      if (i < 0 || (l.s !== i && l.t !== i)) { S.edge = null; S.drawMarks(); $("edge-card").hidden = true; document.body.dataset.edge = ""; }
    }
    nodeTraces(i);
    if (i >= 0 && !stay && !$("tabs").hidden) showTab("node");
  };
  S.openEdge = openEdge;
  S.openHead = openHead;
  document.addEventListener("DOMContentLoaded", () => {
    for (const b of document.querySelectorAll("#tabs [role=tab]")) b.addEventListener("click", () => showTab(b.dataset.tab));
  });
})();
