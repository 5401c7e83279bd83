// cltrace viewer, image panel (graphs of image + text prompts, `cltrace attribute --image`;
// docs/interop.md "Images"): each image of `metadata.info.images` (fetched from this server's
// /image/ route), with a heatmap over its grid of soft tokens. Cell (r, c) stands for the
// embedding node of the soft token `<img r,c>`, at position first + r * cols + c. With a node
// selected, a cell shows the weight of the link from its soft token into that node; with none,
// the soft token's influence on the targets (`relevance` row E; graphs without it: the summed
// |weight| of the token's outgoing links). Clicking a cell selects its embedding node.
// Written for cltrace; plain JavaScript + SVG, no third-party code, no request off this machine.
"use strict";
(function () {
  const S = window.cltrace, { el, $, fmt } = S, { fill: cellFill, scaleBar, imageUrl } = S.heatmap;
  const BOX = 300;  // px: each image drawn as a BOX x BOX square, as the model sees it
  let images = [];  // the open graph's images: {file, rows, cols, first, svg, img}
  let embAt = new Map();  // prompt position -> index of its embedding node

  // The embedding node at prompt position p (its index), or -1 when the graph has none.
  function embeddingAt(p) { return embAt.has(p) ? embAt.get(p) : -1; }

  // What the heatmap shows now: {mode, caption, value(p) for a soft-token position p (or null)}.
  function measure() {
    if (S.selected >= 0) {
      const t = S.selected, n = S.nodes[t], into = new Map();  // source -> weight of its link into t
      for (const k of S.inL[t]) into.set(S.links[k].s, S.links[k].w);
      return { mode: "edges", signed: true, caption: `link weight into ${n.label}`,
        value: (p) => { const s = embeddingAt(p); return s < 0 || !into.has(s) ? null : into.get(s); } };
    }
    const rel = S.graph.relevance;
    const row = rel && Array.isArray(rel.rows) ? rel.rows.indexOf("E") : -1;
    if (row >= 0 && Array.isArray(rel.values[row])) {
      return { mode: "influence", signed: false, caption: "influence on the targets",
        value: (p) => { const v = Number(rel.values[row][p]); return Number.isFinite(v) ? v : null; } };
    }
    return { mode: "outgoing", signed: false, caption: "Σ |outgoing link weight|",
      value: (p) => { const s = embeddingAt(p); return s < 0 ? null : S.outL[s].reduce((a, k) => a + Math.abs(S.links[k].w), 0); } };
  }

  // (Re)colour every image's cells; one scale for all images of the graph.
  function paint() {
    if (!images.length) return;
    const m = measure();
    let max = 0;
    for (const im of images) for (let k = 0; k < im.rows * im.cols; k++) { const v = m.value(im.first + k); if (v !== null) max = Math.max(max, Math.abs(v)); }
    for (const im of images) {
      for (const cell of im.svg.querySelectorAll(".icell")) {
        const v = m.value(Number(cell.dataset.pos));
        cell.setAttribute("fill", cellFill(v, max));
        cell.dataset.v = v === null ? "" : String(v);
      }
    }
    const lg = $("image-legend"); lg.replaceChildren();
    const sel = S.selected >= 0;
    lg.append(el("div", { class: "muted", text: sel ? `Cells: weight of each soft token's link into the selected node (${m.caption.replace("link weight into ", "")}); blank: no link in the graph.`
      : m.mode === "influence" ? "Cells: each soft token's influence on the targets (relevance). Select a node to see its links from the image."
        : "Cells: each soft token's summed |weight| of outgoing links. Select a node to see its links from the image." }),
    scaleBar(max, m.signed, m.caption));
    document.body.dataset.imageMode = m.mode;
    document.body.dataset.imageMax = String(max);
  }

  function cellTip(im, r, c) {
    const p = im.first + r * im.cols + c, s = embeddingAt(p), v = measure().value(p);
    return `<img ${r},${c}> · position ${p}` + (s < 0 ? " · not in the graph (pruned)" : ` · ${S.nodes[s].node_id}`) +
      (v === null ? "" : ` · ${fmt(v, 4)}`);
  }

  function clickCell(im, r, c) {
    const p = im.first + r * im.cols + c, s = embeddingAt(p), note = $("image-note");
    if (s < 0) {
      note.textContent = `The soft token <img ${r},${c}> (position ${p}) has no node in this graph: pruning removed it.`;
      note.hidden = false; document.body.dataset.imageMissing = String(p); return;
    }
    note.hidden = true; document.body.dataset.imageMissing = "";
    S.select(s);
    const n = S.nodes[s]; if (n.elem && n.elem.scrollIntoView) n.elem.scrollIntoView({ block: "nearest", inline: "center" });
  }

  function build() {
    const pane = $("image-pane"), list = $("image-list");
    list.replaceChildren(); images = [];
    embAt = new Map(S.nodes.filter((n) => n.kind === "embedding").map((n) => [n.pos, n.idx]));
    const info = (S.graph.metadata.info || {}).images;
    const ok = Array.isArray(info) ? info.filter((e) => e && typeof e.file === "string" && Array.isArray(e.grid) && Array.isArray(e.positions)) : [];
    pane.hidden = !ok.length || !!S.inline;
    document.body.classList.toggle("has-images", !pane.hidden);
    document.body.dataset.images = pane.hidden ? "0" : String(ok.length);
    $("image-note").hidden = true;
    if (pane.hidden) return;
    ok.forEach((e, i) => {
      const rows = Number(e.grid[0]), cols = Number(e.grid[1]), first = Number(e.positions[0]);
      const bad = /[\/\\]/.test(e.file) || e.file.startsWith(".") || !(rows > 0 && cols > 0) || Number(e.positions[1]) !== first + rows * cols - 1;
      const fig = el("figure", { class: "image-fig", "data-image": i });
      const title = el("figcaption", { text: `image ${i + 1}: ${e.file} · ${rows} × ${cols} soft tokens, positions ${first}–${e.positions[1]}` });
      if (bad) { fig.append(title, el("p", { class: "muted", text: "(its entry in metadata.info.images is malformed: not drawn)" })); list.append(fig); return; }
      const img = el("img", { class: "image-pic", src: imageUrl(S.path, e.file), alt: `image ${i + 1} of the prompt`, width: BOX, height: BOX, draggable: "false" });
      img.addEventListener("error", () => { fig.classList.add("broken"); S.showError(`cannot show ${e.file}: the server could not read it`); });
      const svg = el("svg", { class: "image-grid", width: BOX, height: BOX, viewBox: `0 0 ${BOX} ${BOX}`, role: "img", "aria-label": `soft-token heatmap of image ${i + 1}` });
      const im = { file: e.file, rows, cols, first, svg, img };
      for (let r = 0; r < rows; r++) for (let c = 0; c < cols; c++) {
        svg.append(el("rect", { class: "icell", x: c * BOX / cols, y: r * BOX / rows, width: BOX / cols, height: BOX / rows,
          "data-r": r, "data-c": c, "data-pos": first + r * cols + c, "data-image": i }));
      }
      const cellOf = (ev) => (ev.target.classList && ev.target.classList.contains("icell") ? ev.target : null);
      svg.addEventListener("mousemove", (ev) => { const c = cellOf(ev); S.tooltip(ev, c && cellTip(im, Number(c.dataset.r), Number(c.dataset.c))); });
      svg.addEventListener("mouseleave", (ev) => S.tooltip(ev, ""));
      svg.addEventListener("click", (ev) => { const c = cellOf(ev); if (c) clickCell(im, Number(c.dataset.r), Number(c.dataset.c)); });
      fig.append(title, el("div", { class: "image-box" }, img, svg));
      list.append(fig); images.push(im);
    });
    mark();
    paint();
  }

  // Outline the cell of the selected node when it is one of the images' soft tokens.
  function mark() {
    for (const im of images) for (const cell of im.svg.querySelectorAll(".icell")) {
      const p = Number(cell.dataset.pos);
      cell.classList.toggle("on", S.selected >= 0 && S.nodes[S.selected].kind === "embedding" && S.nodes[S.selected].pos === p);
    }
  }

  const onGraph = S.hooks.onGraph, onSelect = S.hooks.onSelect;
  S.hooks.onGraph = () => { if (onGraph) onGraph(); build(); };
  S.hooks.onSelect = (i) => { if (onSelect) onSelect(i); mark(); paint(); };
})();
