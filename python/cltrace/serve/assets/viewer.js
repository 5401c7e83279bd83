// cltrace viewer: the attribution graph on a grid (x: token position, y: layer; tokens at the
// bottom, logits on top), pruning by cumulative influence, hover, selection, search; for a
// minimal pair's difference graph (`cltrace contrast`, pair-{id}.json: nodes and links carry
// `pair` = {in: "a"|"b"|"both", a, b, diff}), a diff mode colouring by carrier or difference.
// Written for cltrace; plain JavaScript + SVG, no third-party code, no request off this machine.
"use strict";

const SVGNS = "http://www.w3.org/2000/svg";
const LINK_CAP = 300;        // density cap: at most this many links drawn for a selection
const PINNED_LINK_CAP = 3000; // ... and among the nodes of the pinned subgraph
const ROW_H = 34, MARGIN_L = 56, MARGIN_T = 84, MARGIN_B = 64;

const S = window.cltrace = {
  graph: null, path: null, nodes: [], byId: new Map(), links: [], inL: [], outL: [], cell: null, edge: null,
  nLayers: 0, nPos: 0, selected: -1, pinned: new Set(), supernodes: [], threshold: 1,
  pinnedOnly: false, inline: null, model: { available: false }, hooks: {},
  diff: null,  // a pair difference graph: {info (metadata.info.pair_diff), mode: "kind" | "carrier" | "diff", scale}
};

function el(tag, attrs, ...kids) {
  const svg = ["svg", "g", "circle", "rect", "path", "text", "line", "polygon", "title"].includes(tag);
  const e = svg ? document.createElementNS(SVGNS, tag) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "text") e.textContent = v; else if (k === "on") Object.entries(v).forEach(([t, f]) => e.addEventListener(t, f));
    else e.setAttribute(k, v === true ? "" : v);
  }
  for (const k of kids) if (k !== null && k !== undefined) e.append(k);
  return e;
}
const $ = (id) => document.getElementById(id);
const fmt = (x, d = 3) => (x === null || x === undefined) ? "–" : Number(x).toFixed(d);

function showError(msg) { const e = $("error"); e.textContent = msg; e.hidden = !msg; }
function setStatus(msg) { $("status").textContent = msg; }

// --- graph model ------------------------------------------------------------------------
function kindOf(n) {
  const t = n.feature_type || "";
  if (t === "embedding") return "embedding";
  if (t === "logit") return "logit";
  if (t.includes("error")) return "error";
  if (t === "bias") return "const";  // a QK constant, `{L}_const_{pos}` (qk_only_nodes only)
  return "feature";
}

// Feature index from the node id "{layer}_{feature}_{pos}" (the `feature` field may be the
// Cantor pairing of layer and index under schema_version 1).
function featureIndex(nodeId) { const p = String(nodeId).split("_"); return p.length === 3 ? Number(p[1]) : null; }

function tokenText(t) { return String(t).replace(/\n/g, "⏎").replace(/ /g, "␣"); }

function nodeLabel(n) {
  if (n.kind === "logit") { const m = /^Output "(.*)" \(p=/.exec(n.clerp || ""); return m ? m[1] : n.clerp || n.node_id; }
  if (n.kind === "embedding") return (S.graph.metadata.prompt_tokens || [])[n.pos] ?? n.node_id;
  if (n.kind === "error") return `error L${n.layerNum} @${n.pos}`;
  if (n.kind === "const") return `constant L${n.layerNum} @${n.pos}`;
  return n.clerp || `L${n.layerNum} #${n.featIdx}`;
}

// The derived fields every node gets (graph nodes, and qk_only_nodes when they are shown).
function prepNode(n) {
  n.kind = kindOf(n); n.pos = Number(n.ctx_idx);
  n.layerNum = n.kind === "embedding" ? -1 : Number(n.layer);
  n.featIdx = n.kind === "feature" ? featureIndex(n.node_id) : null;
  return n;
}

function setGraph(g, path) {
  S.graph = g; S.path = path; S.selected = -1; S.cell = null; S.edge = null;
  const meta = g.metadata || (g.metadata = {});
  const nodes = S.nodes = g.nodes || [];
  S.byId = new Map();
  let maxLogitLayer = -1, maxLayer = -1, maxPos = (meta.prompt_tokens || []).length - 1, maxInf = 0;
  nodes.forEach((n, i) => {
    n.idx = i; prepNode(n);
    if (n.kind === "logit") maxLogitLayer = Math.max(maxLogitLayer, n.layerNum);
    else if (n.kind !== "embedding") maxLayer = Math.max(maxLayer, n.layerNum);
    if (n.kind !== "logit" && n.kind !== "embedding" && typeof n.influence === "number") maxInf = Math.max(maxInf, n.influence);
    maxPos = Math.max(maxPos, n.pos);
    S.byId.set(n.node_id, i);
  });
  S.nLayers = maxLogitLayer > 0 ? maxLogitLayer - 1 : maxLayer + 1;
  S.nPos = maxPos + 1;
  S.softPos = new Map();  // an image's soft-token positions (metadata.info.images) -> [image, first]
  for (const [k, im] of ((meta.info || {}).images || []).entries()) {
    const a = Number((im.positions || [])[0]), b = Number((im.positions || [])[1]);
    if (Number.isInteger(a) && Number.isInteger(b) && b - a < 4096) for (let p = a; p <= b; p++) S.softPos.set(p, [k, a]);
  }
  nodes.forEach((n) => { n.label = nodeLabel(n); n.row = n.kind === "embedding" ? 0 : n.kind === "logit" ? S.nLayers + 1 : n.layerNum + 1; });
  const inL = S.inL = nodes.map(() => []), outL = S.outL = nodes.map(() => []);
  const links = S.links = [];
  for (const l of g.links || []) {
    const s = S.byId.get(l.source), t = S.byId.get(l.target);
    if (s === undefined || t === undefined) continue;
    const k = links.length; links.push({ s, t, w: Number(l.weight), h: l.heads || null, d: l.pair || null });  // h: its split by heads (--qk); d: its pair values
    outL[s].push(k); inL[t].push(k);
  }
  S.sortedLinks = new Set();  // nodes whose link lists are sorted (lazily, on selection)
  const q = g.qParams || {};
  let pins = q.pinnedIds || [], sns = q.supernodes || [];
  if (typeof pins === "string") pins = pins.split(",");  // (Neuronpedia's URL form)
  if (typeof sns === "string") { try { sns = JSON.parse(sns); } catch (e) { sns = []; } }
  S.pinned = new Set((Array.isArray(pins) ? pins : []).filter((id) => S.byId.has(id)));
  S.supernodes = (Array.isArray(sns) ? sns : []).filter((s) => Array.isArray(s) && s.length >= 2).map((s) => s.map(String));
  // Default threshold: everything the (already pruned) JSON holds is shown.
  S.threshold = Math.min(1, Math.ceil(Math.max(Number(meta.node_threshold) || 0, maxInf) * 1000) / 1000) || 1;
  $("threshold").value = S.threshold; $("threshold-value").textContent = fmt(S.threshold);
  setDiff(meta);
  layout();
}

function visible(n) {
  if (S.pinnedOnly) return S.pinned.has(n.node_id);
  if (n.kind === "embedding" || n.kind === "logit") return true;
  return typeof n.influence !== "number" || n.influence <= S.threshold;
}

// --- layout: column widths from the fullest (layer, position) cell --------------------------
function layout() {
  const count = new Map();
  for (const n of S.nodes) {  // a logit takes the room of 3 nodes: its label needs it
    const k = n.pos * 1000 + n.row; count.set(k, (count.get(k) || 0) + (n.kind === "logit" ? 3 : 1));
  }
  const perPos = new Array(S.nPos).fill(1);
  for (const [k, c] of count) { const p = Math.floor(k / 1000); perPos[p] = Math.max(perPos[p], c); }
  // (a soft token's column holding its token node alone is narrow: 256 of them per image)
  S.colX = []; S.colW = perPos.map((c, p) => (S.softPos.has(p) && c <= 1 ? 12 : Math.max(64, Math.min(420, c * 11 + 16))));
  let x = MARGIN_L; for (const w of S.colW) { S.colX.push(x); x += w; }
  S.width = x + 16; S.height = MARGIN_T + (S.nLayers + 1) * ROW_H + MARGIN_B;
  const cells = new Map();
  const order = S.nodes.slice().sort((a, b) => (a.influence ?? 0) - (b.influence ?? 0));
  for (const n of order) { const k = n.pos * 1000 + n.row; if (!cells.has(k)) cells.set(k, []); cells.get(k).push(n); }
  for (const list of cells.values()) {
    list.sort((a, b) => a.layerNum - b.layerNum || (a.kind === "error") - (b.kind === "error") || (a.featIdx ?? 0) - (b.featIdx ?? 0));
    list.forEach((n, i) => {
      const w = S.colW[n.pos], pad = 8;
      n.x = S.colX[n.pos] + pad + (i + 0.5) * (w - 2 * pad) / list.length;
      n.y = S.height - MARGIN_B - n.row * ROW_H;
    });
  }
}

function radius(n) {
  if (n.kind !== "feature") return 4;
  const inf = typeof n.influence === "number" ? n.influence : 1;
  return 2.5 + 4.5 * Math.max(0, 1 - inf);  // smaller cumulative influence = more important
}

// --- drawing -------------------------------------------------------------------------------
function render() {
  const svg = $("graph");
  svg.replaceChildren();
  svg.setAttribute("width", S.width); svg.setAttribute("height", S.height);
  svg.setAttribute("viewBox", `0 0 ${S.width} ${S.height}`);
  const grid = el("g", { id: "grid" });
  for (let r = 0; r <= S.nLayers + 1; r++) {
    const y = S.height - MARGIN_B - r * ROW_H;
    grid.append(el("line", { x1: MARGIN_L, x2: S.width - 16, y1: y, y2: y, class: "gridline" }));
    grid.append(el("text", { x: 6, y: y + 4, class: "rowlabel", text: r === 0 ? "Emb" : r === S.nLayers + 1 ? "Logit" : `L${r - 1}` }));
  }
  const toks = S.graph.metadata.prompt_tokens || [];
  for (let p = 0; p < S.nPos; p++) {
    const soft = S.softPos.get(p);
    if (soft && soft[1] !== p) continue;  // an image's soft tokens: one line and label, at its first
    grid.append(el("line", { x1: S.colX[p], x2: S.colX[p], y1: MARGIN_T - 30, y2: S.height - MARGIN_B + 8, class: "colline" }));
    grid.append(soft ? el("text", { x: S.colX[p] + 2, y: S.height - MARGIN_B + 26, class: "toklabel imagelabel", "text-anchor": "start",
      text: `image ${soft[0] + 1} ▸` })
      : el("text", { x: S.colX[p] + S.colW[p] / 2, y: S.height - MARGIN_B + 26, class: "toklabel", "text-anchor": "middle",
        text: tokenText(toks[p] ?? `#${p}`) }));
  }
  svg.append(grid, el("g", { id: "marks" }), el("g", { id: "groups" }), el("g", { id: "links" }), el("g", { id: "nodes" }));
  const g = svg.lastChild;
  for (const n of S.nodes) {
    const cls = `node ${n.kind}` + (S.pinned.has(n.node_id) ? " pinned" : "");
    let e;
    if (n.kind === "feature") e = el("circle", { cx: n.x, cy: n.y, r: radius(n) });
    else if (n.kind === "error") e = el("polygon", { points: `${n.x},${n.y - 5} ${n.x + 5},${n.y} ${n.x},${n.y + 5} ${n.x - 5},${n.y}` });
    else e = el("rect", { x: n.x - 5, y: n.y - 5, width: 10, height: 10 });
    e.setAttribute("class", cls + (n.pair ? ` in-${n.pair.in}` : "")); e.setAttribute("data-id", n.node_id); n.elem = e;
    e.setAttribute("aria-label", `${n.kind} ${n.label} (${n.node_id})`);
    g.append(e);
    if (n.kind === "logit") {
      const p = n.token_prob ? ` ${fmt(n.token_prob, 2)}` : "";
      g.append(n.labelElem = el("text", { x: n.x, y: n.y - 9, class: "logitlabel", "text-anchor": "start", transform: `rotate(-55 ${n.x} ${n.y - 9})`, text: tokenText(n.label) + p }));
    }
  }
  applyVisibility();
  colourDiff();
  drawLinks();
  drawMarks();
}

function applyVisibility() {
  let shown = 0;
  for (const n of S.nodes) {
    const v = visible(n); n.shown = v; shown += v;
    n.elem.style.display = v ? "" : "none";
    if (n.labelElem) n.labelElem.style.display = v ? "" : "none";
  }
  $("node-count").textContent = `${shown} of ${S.nodes.length} nodes`;
  document.body.dataset.nodesShown = shown;
}

function linkPath(a, b) {
  const my = (a.y + b.y) / 2;
  return `M${a.x},${a.y} C${a.x},${my} ${b.x},${my} ${b.x},${b.y}`;
}

// Marks under the nodes: the flow cell chosen in the Flow panel (a box over that layer and
// position of the grid; its nodes get the class "incell") and the edge chosen in a links list
// (one thick orange curve). S.cell = {row: "E" | layer, pos}, S.edge = link index; both may be null.
function drawMarks() {
  const g = $("marks"); if (!g) return;
  g.replaceChildren();
  for (const n of S.nodes) if (n.elem) n.elem.classList.toggle("incell", !!S.cell && cellHas(S.cell, n));
  if (S.cell) {
    const r = S.cell.row === "E" ? 0 : Number(S.cell.row) + 1, p = S.cell.pos;
    if (p < S.nPos) g.append(el("rect", { class: "cellmark", x: S.colX[p] + 1, width: S.colW[p] - 2,
      y: S.height - MARGIN_B - r * ROW_H - ROW_H / 2, height: ROW_H }));
  }
  if (S.edge !== null && S.edge !== undefined && S.links[S.edge]) {
    const l = S.links[S.edge];
    g.append(el("path", { d: linkPath(S.nodes[l.s], S.nodes[l.t]), class: "edgemark" }));
  }
}

// Is node n in the flow cell c ("E": the token nodes at c.pos; a layer: its features and errors)?
function cellHas(c, n) {
  if (n.pos !== c.pos) return false;
  if (c.row === "E") return n.kind === "embedding";
  return (n.kind === "feature" || n.kind === "error") && n.layerNum === Number(c.row);
}

// Each supernode: a dashed box around its visible members, with its name.
function drawGroups() {
  const g = $("groups"); if (!g) return;
  g.replaceChildren();
  for (const sn of S.supernodes) {
    const ms = sn.slice(1).map((id) => S.nodes[S.byId.get(id)]).filter((n) => n && n.shown);
    if (!ms.length) continue;
    const x0 = Math.min(...ms.map((n) => n.x)) - 10, x1 = Math.max(...ms.map((n) => n.x)) + 10;
    const y0 = Math.min(...ms.map((n) => n.y)) - 10, y1 = Math.max(...ms.map((n) => n.y)) + 10;
    g.append(el("rect", { x: x0, y: y0, width: x1 - x0, height: y1 - y0, rx: 6, class: "group" }),
      el("text", { x: x0 + 2, y: y0 - 3, class: "grouplabel", text: sn[0] }));
  }
}

// Links of the selected node (its strongest LINK_CAP), or all links inside the pinned subgraph.
function drawLinks() {
  drawGroups();
  const g = $("links"); if (!g) return;
  g.replaceChildren();
  let ks = [], total = 0;
  if (S.pinnedOnly) {
    for (const id of S.pinned) { const i = S.byId.get(id); for (const k of S.outL[i]) if (S.pinned.has(S.nodes[S.links[k].t].node_id)) ks.push(k); }
    total = ks.length; ks = ks.slice(0, PINNED_LINK_CAP);
  } else if (S.selected >= 0) {
    const all = S.inL[S.selected].concat(S.outL[S.selected]).filter((k) => S.nodes[S.links[k].s].shown && S.nodes[S.links[k].t].shown);
    total = all.length;
    ks = all.sort((a, b) => Math.abs(S.links[b].w) - Math.abs(S.links[a].w)).slice(0, LINK_CAP);
  }
  const maxW = Math.max(1e-12, ...ks.map((k) => Math.abs(S.links[k].w)));
  const mode = S.diff ? S.diff.mode : "kind";
  const maxD = Math.max(1e-12, ...ks.map((k) => Math.abs((S.links[k].d || {}).diff || 0)));
  for (const k of ks) {
    const l = S.links[k];
    const cls = mode === "carrier" && l.d ? `link in-${l.d.in}` : mode === "diff" && l.d ? "link diff" : l.w >= 0 ? "link pos" : "link neg";
    const p = el("path", { d: linkPath(S.nodes[l.s], S.nodes[l.t]), class: cls,
      "stroke-width": (0.4 + 3.2 * Math.abs(l.w) / maxW).toFixed(2) });
    if (cls === "link diff") p.style.stroke = diverging(l.d.diff / maxD);
    g.append(p);
  }
  document.body.dataset.linksDrawn = ks.length;
  const note = total > ks.length ? `drawing the ${ks.length} strongest of ${total} links` : ks.length ? `${ks.length} links` : "";
  setStatus(note);
}

// --- interaction ---------------------------------------------------------------------------
// Sort a node's incoming and outgoing link lists by |weight|, strongest first (once).
function sortLinks(i) {
  if (S.sortedLinks.has(i)) return;
  const byAbs = (a, b) => Math.abs(S.links[b].w) - Math.abs(S.links[a].w);
  S.inL[i].sort(byAbs); S.outL[i].sort(byAbs); S.sortedLinks.add(i);
}

function select(i) {
  if (i >= 0) sortLinks(i);
  if (S.selected >= 0 && S.nodes[S.selected].elem) S.nodes[S.selected].elem.classList.remove("selected");
  S.selected = i;
  if (i >= 0) S.nodes[i].elem.classList.add("selected");
  document.body.dataset.selected = i >= 0 ? S.nodes[i].node_id : "";
  drawLinks();
  if (S.hooks.onSelect) S.hooks.onSelect(i);
  if (S.diff && i >= 0) pairCard(S.nodes[i]);
}

// --- diff mode: a minimal pair's difference graph --------------------------------------------
// Carrier colours (A only, B only, both: CSS classes in-a / in-b / in-both under body.diff-carrier)
// or a diverging scale of the difference B − A (blue: A larger, red: B larger), scaled per
// compared quantity (activation, out_weight, token_prob) by its largest |difference| in the graph.
function setDiff(meta) {
  const info = meta.info && meta.info.pair_diff;
  const keep = S.diff ? S.diff.mode : "carrier";  // (the mode chosen stays from pair to pair)
  S.diff = info ? { info, mode: keep, scale: {} } : null;
  if (S.diff) for (const n of S.nodes) if (n.pair) {
    const v = n.pair.value; S.diff.scale[v] = Math.max(S.diff.scale[v] || 1e-12, Math.abs(Number(n.pair.diff) || 0));
  }
  $("diff-control").hidden = !S.diff; $("diff-legend").hidden = !S.diff;
  if (S.diff) $("diff-mode").value = S.diff.mode;
}

function setName(which) {
  const sets = (S.diff && S.diff.info.sets) || [];
  return which === "a" ? `A (${sets[0] ?? "first set"})` : `B (${sets[1] ?? "second set"})`;
}
function carrierText(c) { return c === "both" ? "in both prompts" : `in ${setName(c)} only`; }

// t in [-1, 1] -> a colour from blue (-1) through grey (0: still visible on white) to red (+1).
function diverging(t) {
  t = Math.max(-1, Math.min(1, Number(t) || 0));
  const [r0, g0, b0] = [215, 215, 215], [r1, g1, b1] = t < 0 ? [33, 102, 172] : [178, 24, 43], a = Math.abs(t);
  return `rgb(${Math.round(r0 + (r1 - r0) * a)}, ${Math.round(g0 + (g1 - g0) * a)}, ${Math.round(b0 + (b1 - b0) * a)})`;
}

function colourDiff() {
  const mode = S.diff ? S.diff.mode : "kind";
  document.body.classList.toggle("diff-carrier", mode === "carrier");
  document.body.dataset.diffMode = S.diff ? mode : "";
  for (const n of S.nodes) {
    if (!n.elem) continue;
    n.elem.style.fill = mode === "diff" && n.pair ? diverging(Number(n.pair.diff) / S.diff.scale[n.pair.value]) : "";
  }
  diffLegend();
}

function diffLegend() {
  const box = $("diff-legend"); box.replaceChildren();
  if (!S.diff) return;
  const info = S.diff.info, c = info.nodes || {};
  if (S.diff.mode === "carrier") {
    for (const w of ["a", "b", "both"]) box.append(el("span", { class: `lg in-${w}`, text: `${w === "both" ? "both" : setName(w) + " only"} (${c[w] ?? 0})` }));
  } else if (S.diff.mode === "diff") {
    const sc = S.diff.scale;
    box.append(el("span", { text: "A larger" }), el("span", { class: "diverging", title: "B − A, each quantity scaled by its largest |difference|" }),
      el("span", { text: "B larger" }),
      el("span", { class: "muted", text: "B − A of " + Object.keys(sc).sort().map((k) => `${k} (±${fmt(sc[k], 3)})`).join(", ") }));
  } else box.append(el("span", { class: "muted", text: `pair ${info.pair}: ${setName("a")} vs ${setName("b")}` }));
}

// The node card's pair values (appended under the card panels.js draws).
function pairCard(n) {
  const card = $("node-card"); if (!card || !n.pair) return;
  const p = n.pair, dl = el("dl", { class: "pair-values" });
  const add = (k, v) => dl.append(el("dt", { text: k }), el("dd", { text: v }));
  add("carried", carrierText(p.in)); add("compared", String(p.value));
  add(setName("a"), fmt(p.a, 4)); add(setName("b"), fmt(p.b, 4)); add("B − A", fmt(p.diff, 4));
  if (Array.isArray(p.influence)) add("influence A / B", `${fmt(p.influence[0], 4)} / ${fmt(p.influence[1], 4)}`);
  card.append(el("section", { id: "pair-card" }, el("h4", { text: "A vs B (minimal pair)" }), dl));
}

function togglePin(id) {
  if (S.pinned.has(id)) S.pinned.delete(id); else S.pinned.add(id);
  const n = S.nodes[S.byId.get(id)]; n.elem.classList.toggle("pinned", S.pinned.has(id));
  if (S.pinnedOnly) { applyVisibility(); drawLinks(); }
  if (S.hooks.onPins) S.hooks.onPins();
}

// The tooltip: `text` next to the pointer, or hidden when text is empty.
function showTip(ev, text) {
  const t = $("tooltip");
  if (!text) { t.hidden = true; return; }
  t.textContent = text; t.hidden = false;
  const right = window.scrollX + document.documentElement.clientWidth;  // flip left of the pointer near the right edge
  t.style.left = `${ev.pageX + 12 + t.offsetWidth > right ? Math.max(0, ev.pageX - 12 - t.offsetWidth) : ev.pageX + 12}px`;
  t.style.top = `${ev.pageY + 12}px`;
}

function tooltip(ev, n) {
  showTip(ev, n && `${n.label}\n${n.node_id} · ${n.kind}` + (typeof n.influence === "number" ? ` · influence ${fmt(n.influence)}` : "") +
    (typeof n.activation === "number" ? ` · act ${fmt(n.activation)}` : "") +
    (S.diff && n.pair ? `\n${carrierText(n.pair.in)} · ${n.pair.value}: A ${fmt(n.pair.a)} · B ${fmt(n.pair.b)} · B − A ${fmt(n.pair.diff)}` : ""));
}

function nodeOf(ev) { const id = ev.target && ev.target.getAttribute && ev.target.getAttribute("data-id"); return id ? S.nodes[S.byId.get(id)] : null; }

function search(q) {
  q = q.trim().toLowerCase();
  const list = $("search-list"); list.replaceChildren();
  for (const n of S.nodes) n.elem.classList.remove("match");
  $("search-results").hidden = !q;
  if (!q) return [];
  const hits = S.nodes.filter((n) => n.node_id.toLowerCase().includes(q) || String(n.label).toLowerCase().includes(q));
  hits.forEach((n) => n.elem.classList.add("match"));
  for (const n of hits.slice(0, 40)) list.append(el("li", {}, el("button", { type: "button", class: "linkish", text: `${n.label} (${n.node_id})`, on: { click: () => select(n.idx) } })));
  if (hits.length > 40) list.append(el("li", { class: "muted", text: `… ${hits.length - 40} more` }));
  if (!hits.length) list.append(el("li", { class: "muted", text: "no match" }));
  return hits;
}

function wire() {
  const svg = $("graph");
  svg.addEventListener("mousemove", (ev) => tooltip(ev, nodeOf(ev)));
  svg.addEventListener("mouseleave", () => tooltip(null, null));
  svg.addEventListener("click", (ev) => {
    const n = nodeOf(ev);
    if (!n) return;
    if (ev.shiftKey) togglePin(n.node_id); else select(n.idx);
  });
  $("threshold").addEventListener("input", (ev) => {
    S.threshold = Number(ev.target.value); $("threshold-value").textContent = fmt(S.threshold);
    applyVisibility(); drawLinks();
  });
  $("pinned-only").addEventListener("change", (ev) => { S.pinnedOnly = ev.target.checked; applyVisibility(); drawLinks(); });
  $("search").addEventListener("input", (ev) => search(ev.target.value));
  $("diff-mode").addEventListener("change", (ev) => { if (!S.diff) return; S.diff.mode = ev.target.value; colourDiff(); drawLinks(); });
  document.addEventListener("keydown", (ev) => { if (ev.key === "Escape" && S.selected >= 0) select(-1); });
  $("search").addEventListener("keydown", (ev) => { if (ev.key === "Enter") { const h = search(ev.target.value); if (h.length) select(h[0].idx); } });
  $("graph-select").addEventListener("change", (ev) => openGraph(ev.target.value));
  window.addEventListener("hashchange", () => {  // a link or typed #graph=PATH opens that graph
    const m = /graph=([^&]+)/.exec(location.hash), want = m && decodeURIComponent(m[1]);
    if (want && want !== S.path && !S.inline) { $("graph-select").value = want; openGraph(want); }
  });
}

function showGraph(g, path, t0, tParsed) {
  const t1 = performance.now();
  setGraph(g, path);
  const t2 = performance.now();
  const meta = g.metadata;
  $("prompt").textContent = (meta.prompt ? `“${meta.prompt}”` : "") + (meta.slug ? ` · ${meta.slug}` : "") +
    ` · ${S.nodes.length} nodes, ${S.links.length} links`;
  render();
  if (S.hooks.onGraph) S.hooks.onGraph();
  const t3 = performance.now();
  window.cltraceOpenMs = t3 - t0;  // fetch + parse, index, draw (what the browser test measures)
  window.cltraceTimings = { fetchParse: (tParsed || t1) - t0, index: t2 - t1, draw: t3 - t2 };
  document.body.dataset.ready = "1";
}

async function openGraph(path) {
  const t0 = performance.now();
  document.body.dataset.ready = "0"; showError("");
  try {
    const r = await fetch(`/data/${path.split("/").map(encodeURIComponent).join("/")}`);
    if (!r.ok) throw new Error(`cannot read ${path}: HTTP ${r.status}`);
    const g = await r.json();
    showGraph(g, path, t0, performance.now());
    history.replaceState(null, "", `#graph=${encodeURIComponent(path)}`);
  } catch (e) { showError(String(e.message || e)); document.body.dataset.ready = "error"; }
}

async function boot() {
  if (document.body.dataset.page === "lens") return;  // lens.html: lens.js draws the page
  wire();
  const inline = document.getElementById("cltrace-inline");
  if (inline) {  // notebook: graph (and feature pages) inlined, no server
    S.inline = JSON.parse(inline.textContent);
    $("graph-select").append(el("option", { value: "", text: S.inline.name || "graph" }));
    return showGraph(S.inline.graph, null, performance.now());
  }
  try {
    const [gr, mr] = await Promise.all([fetch("/api/graphs"), fetch("/api/model")]);
    const graphs = (await gr.json()).graphs || [];
    S.model = await mr.json();
    for (const g of graphs) $("graph-select").append(el("option", { value: g.path, text: g.slug || g.path }));
    if (!graphs.length) { showError("No graph in this folder: run `cltrace attribute \"...\" --out DIR` first."); return; }
    const m = /graph=([^&]+)/.exec(location.hash);
    const want = m ? decodeURIComponent(m[1]) : graphs[0].path;
    $("graph-select").value = want;
    await openGraph(want);
  } catch (e) { showError(String(e.message || e)); }
}

Object.assign(S, { el, $, fmt, select, togglePin, showError, drawLinks, drawGroups, drawMarks, cellHas, applyVisibility,
  tokenText, featureIndex, prepNode, nodeLabel, tooltip: showTip });
document.addEventListener("DOMContentLoaded", boot);
