// cltrace lens page: the JSON of `cltrace lens --json` (format cltrace.lens/1) as a token ×
// layer grid of the top latent per cell; a click lists the cell's top latents and opens the
// feature card of the viewer (panels.js's fillFeature) for the one chosen. A lens of an image +
// text prompt (`cltrace lens --image`: the JSON's `images`) shows each image with a heatmap of
// the selected latent's activation over its soft tokens (patches), from the image's `maps`.
// Written for cltrace; plain JavaScript, no third-party code, no request off this machine.
"use strict";
(function () {
  const S = window.cltrace, { el, $, fmt } = S, { fill: cellFill, scaleBar, imageUrl } = S.heatmap;
  const L = { data: null, path: null, set: 0, cell: null, lat: null, sae: { available: false },
    img: null };  // img: the heatmap's latent {set, layer, index}
  const BOX = 300;  // px: each image drawn BOX x BOX, as the model sees it (as images.js does)
  const cantor = (l, f) => ((l + f) * (l + f + 1)) / 2 + f;  // feature page file names (cltrace features)

  function showError(msg) { const e = $("error"); e.textContent = msg; e.hidden = !msg; }

  function cellsOf(set) {  // "layer:pos" -> cell of the set
    const m = new Map();
    for (const c of L.data.cells) if (c.set === set) m.set(`${c.layer}:${c.pos}`, c);
    return m;
  }

  function draw() {
    const d = L.data, set = d.sets[L.set], cells = cellsOf(L.set), grid = $("lens-grid");
    const layerMax = new Map();
    for (const c of cells.values()) if (c.latents.length) layerMax.set(c.layer, Math.max(layerMax.get(c.layer) || 0, c.latents[0].act));
    const table = el("table", { id: "lens-table", class: "lens", role: "grid", "aria-label": `${set.name}: top latent per layer and token` });
    const head = el("tr", {}, el("th", { text: "layer" }));
    const img = imageOf(d);
    d.tokens.forEach((t) => {
      const g = img.get(t.pos);
      if (g === undefined) head.append(el("th", { class: "lens-tok" + (t.bos ? " lens-bos" : ""), title: `position ${t.pos}`, text: S.tokenText(t.token) }));
      else head.append(el("th", { class: "lens-img" + (t.pos === d.images[g].positions[0] ? " first" : ""), title: `${t.token} · image ${g + 1} · position ${t.pos}`,
        text: t.pos === d.images[g].positions[0] ? `image ${g + 1}` : "" }));
    });
    table.append(el("thead", {}, head));
    const body = el("tbody", {});
    for (const layer of [...set.layers].reverse()) {
      const tr = el("tr", {}, el("th", { text: `L${layer}` }));
      for (const t of d.tokens) {
        const c = cells.get(`${layer}:${t.pos}`);
        if (!c) { tr.append(el("td", { class: "lens-cell empty" + (t.bos ? " lens-bos" : ""), text: t.bos ? "bos" : "" })); continue; }
        const top = c.latents[0], mx = layerMax.get(layer) || 1;
        const td = el("td", { class: "lens-cell" + (img.has(t.pos) ? " lens-imgcell" : ""), tabindex: 0, "data-layer": layer, "data-pos": t.pos,
          title: (img.has(t.pos) ? `${t.token} · ` : "") + (top ? `${top.label || "#" + top.index} (${fmt(top.act, 2)})` : "no active latent"),
          text: top ? String(top.index) : "–", on: { click: () => openCell(c), keydown: (ev) => { if (ev.key === "Enter") openCell(c); } } });
        if (top) td.style.background = `rgba(59, 111, 182, ${(0.08 + 0.8 * Math.max(0, top.act) / mx).toFixed(3)})`;
        if (top && top.act / mx > 0.55) td.style.color = "#fff";
        tr.append(td);
      }
      body.append(tr);
    }
    table.append(body);
    grid.replaceChildren(table);
    $("prompt").textContent = `“${d.text || d.tokens.map((t) => t.token).join("")}” · ${set.name} (${set.what}, ${set.d_sae} latents) · top ${d.top_k}`;
    $("cell-card").hidden = true; $("feature-card").hidden = true; $("steer-card").hidden = true; L.cell = null;
    buildImages();
  }

  // --- images (cltrace lens --image) ----------------------------------------------------
  function imageOf(d) {  // soft-token position -> image index
    const m = new Map();
    (d.images || []).forEach((e, g) => { for (let p = e.positions[0]; p <= e.positions[1]; p++) m.set(p, g); });
    return m;
  }

  // The image's entry for (set, layer): {top, maps: Map(latent -> Map(patch -> act))}, or null.
  function imageLayer(e, set, layer) {
    const x = (e.layers || []).find((y) => y.set === set && y.layer === layer);
    if (!x) return null;
    if (!x.byLatent) x.byLatent = new Map(x.maps.map((m) => [m.index, new Map(m.patches.map((k, j) => [k, m.acts[j]]))]));
    return x;
  }

  function labelOf(set, layer, index) {  // a latent's label, from any cell that lists it
    for (const c of L.data.cells) if (c.set === set && c.layer === layer) for (const x of c.latents) if (x.index === index && x.label) return x.label;
    return "";
  }

  function buildImages() {
    const d = L.data, sec = $("lens-images"), list = $("lens-image-list");
    list.replaceChildren();
    const ok = (d.images || []).filter((e) => e && typeof e.file === "string" && !/[\/\\]/.test(e.file) && Array.isArray(e.grid) && Array.isArray(e.positions));
    sec.hidden = !ok.length; document.body.dataset.images = String(ok.length);
    if (!ok.length) { L.img = null; return; }
    const set = d.sets[L.set], layers = [...set.layers].reverse();
    $("image-layer").replaceChildren(...layers.map((l) => el("option", { value: l, text: `L${l}` })));
    d.images.forEach((e, g) => {
      if (!ok.includes(e)) return;
      const [rows, cols] = e.grid.map(Number), first = Number(e.positions[0]);
      const fig = el("figure", { class: "image-fig", "data-image": g });
      const img = el("img", { class: "image-pic", src: imageUrl(L.path, e.file), alt: `image ${g + 1} of the prompt`, width: BOX, height: BOX, draggable: "false" });
      img.addEventListener("error", () => { fig.classList.add("broken"); showError(`cannot show ${e.file}: the server could not read it`); });
      const svg = el("svg", { class: "image-grid", width: BOX, height: BOX, viewBox: `0 0 ${BOX} ${BOX}`, role: "img", "aria-label": `latent heatmap of image ${g + 1}` });
      for (let r = 0; r < rows; r++) for (let c = 0; c < cols; c++) {
        svg.append(el("rect", { class: "icell", x: c * BOX / cols, y: r * BOX / rows, width: BOX / cols, height: BOX / rows,
          "data-r": r, "data-c": c, "data-k": r * cols + c, "data-pos": first + r * cols + c, "data-image": g }));
      }
      const cellOf = (ev) => (ev.target.classList && ev.target.classList.contains("icell") ? ev.target : null);
      svg.addEventListener("mousemove", (ev) => { const c = cellOf(ev); S.tooltip(ev, c && patchTip(c)); });
      svg.addEventListener("mouseleave", (ev) => S.tooltip(ev, ""));
      svg.addEventListener("click", (ev) => {
        const c = cellOf(ev); if (!c || !L.img) return;
        const cell = cellsOf(L.img.set).get(`${L.img.layer}:${c.dataset.pos}`);
        if (cell) openCell(cell);
      });
      fig.append(el("figcaption", { text: `image ${g + 1}: ${e.file} · ${rows} × ${cols} soft tokens, positions ${first}–${e.positions[1]}` }),
        el("div", { class: "image-box" }, img, svg), el("ul", { class: "image-top", "data-image": g }));
      list.append(fig);
    });
    const layer = layers[0], x = imageLayer(ok[0], L.set, layer);
    setImageLatent(L.set, layer, x && x.top.length ? x.top[0] : null);
  }

  function patchTip(rect) {
    const e = L.data.images[Number(rect.dataset.image)], v = rect.dataset.v;
    return `<img ${rect.dataset.r},${rect.dataset.c}> · position ${rect.dataset.pos}` + (L.img && L.img.index !== null ? ` · #${L.img.index} L${L.img.layer}: ${v === "" ? "not recorded" : fmt(Number(v), 3)}` : "") + ` · ${e.file}`;
  }

  // Show latent `index` of (set, layer) on every image (index null: the layer's images have no active latent).
  function setImageLatent(set, layer, index) {
    if (!L.data.images || $("lens-images").hidden) return;
    L.img = { set, layer, index };
    $("image-layer").value = String(layer);
    let max = 0;
    const vals = L.data.images.map((e) => {  // per image: patch -> act (0: does not fire), or null (latent not recorded)
      const x = imageLayer(e, set, layer), m = x && index !== null ? x.byLatent.get(index) : undefined;
      if (m) for (const v of m.values()) max = Math.max(max, v);
      return m === undefined ? null : m;
    });
    L.data.images.forEach((e, g) => {
      const fig = document.querySelector(`#lens-image-list figure[data-image="${g}"]`);
      if (!fig) return;
      for (const rect of fig.querySelectorAll(".icell")) {
        const k = Number(rect.dataset.k), v = vals[g] === null ? null : (vals[g].get(k) || 0);
        rect.setAttribute("fill", cellFill(v, max));
        rect.dataset.v = v === null ? "" : String(v);
      }
      const x = imageLayer(e, set, layer), ul = fig.querySelector("ul.image-top");
      ul.replaceChildren(el("li", { class: "muted", text: `top at L${layer}:` }));
      for (const i of (x ? x.top : [])) {
        const best = Math.max(...x.byLatent.get(i).values()), lab = labelOf(set, layer, i);
        ul.append(el("li", {}, el("button", { type: "button", class: "linkish" + (i === index ? " current" : ""), "data-latent": i,
          title: `${lab ? lab + " · " : ""}largest activation on the image ${fmt(best, 3)}, fires on ${x.byLatent.get(i).size} patches`,
          text: `#${i}`, on: { click: () => pickImageLatent(g, layer, i) } })));
      }
      if (!x || !x.top.length) ul.append(el("li", { class: "muted", text: "no latent fires on this image" }));
    });
    const lab = index === null ? "" : labelOf(set, layer, index);
    $("image-caption").textContent = index === null ? `L${layer}: no latent fires on the images` :
      `latent #${index}${lab ? " " + lab : ""} of ${L.data.sets[set].name}, layer ${layer}` + (vals.every((v) => v === null) ? " (not recorded on the images)" : "");
    const lg = $("lens-image-legend"); lg.replaceChildren(scaleBar(max, false, "activation"));
    document.body.dataset.imageLatent = index === null ? "" : `${set}:${layer}:${index}`;
    document.body.dataset.imageMax = String(max);
  }

  // A top latent of an image: on the heatmap, and its feature card.
  function pickImageLatent(g, layer, index) {
    const e = L.data.images[g];
    setImageLatent(L.set, layer, index);
    openFeature({ set: L.set, layer, pos: Number(e.positions[0]), latents: [] }, { index, label: labelOf(L.set, layer, index) }, false);
  }

  function openCell(c) {
    L.cell = c;
    document.querySelectorAll(".lens-cell.selected").forEach((x) => x.classList.remove("selected"));
    const td = document.querySelector(`.lens-cell[data-layer="${c.layer}"][data-pos="${c.pos}"]`);
    if (td) td.classList.add("selected");
    document.querySelectorAll("#lens-image-list .icell").forEach((r) => r.classList.toggle("on", Number(r.dataset.pos) === c.pos));
    const tok = L.data.tokens[c.pos], body = $("cell-body");
    body.replaceChildren(el("p", { class: "muted", text: `layer ${c.layer}, position ${c.pos} “${S.tokenText(tok.token)}”` }));
    if (!c.latents.length) body.append(el("p", { class: "muted", text: "no latent fires here" }));
    const ul = el("ul", { class: "linklist lens-latents" });
    c.latents.forEach((lat) => ul.append(el("li", {},
      el("button", { type: "button", class: "linkish", text: `#${lat.index}${lat.label ? " " + lat.label : ""}`, on: { click: () => openFeature(c, lat) } }),
      el("span", { class: "w pos", text: fmt(lat.act, 3) }))));
    body.append(ul);
    $("cell-card").hidden = false;
    if (c.latents.length) openFeature(c, c.latents[0]); else $("feature-card").hidden = true;
  }

  function openFeature(c, lat, heat = true) {
    const set = L.data.sets[c.set];
    if (heat) setImageLatent(c.set, c.layer, lat.index);
    // the feature card reads the page at {scan}/{cantor(layer, index)}.json beside the lens JSON
    S.graph = { metadata: { scan: set.pages || "" } }; S.path = L.path;
    const n = { feature: cantor(c.layer, lat.index), clerp: lat.label || "", layerNum: c.layer, featIdx: lat.index };
    $("feature-card").hidden = false;
    showSteer(c, lat);
    S.fillFeature($("feature-body"), n, () => L.cell === c);
  }

  // --- steering a latent (POST /api/steer_sae; needs `cltrace serve --sae SET`) -------------
  function steerError(msg) { const e = $("steer-error"); e.textContent = msg; e.hidden = !msg; }

  function showSteer(c, lat) {
    L.lat = { cell: c, lat };
    const set = L.data.sets[c.set], on = L.sae.available;
    $("steer-card").hidden = false;
    $("steer-target").textContent = `latent #${lat.index} of ${set.name}, layer ${c.layer}; “from this token”: position ${c.pos}`;
    $("steer-hint").hidden = on;
    for (const id of ["steer-op", "steer-value", "steer-pos", "steer-tokens", "steer-run"]) $(id).disabled = !on;
    steerError(""); $("steer-result").replaceChildren();
  }

  function steerResult(out) {
    const div = $("steer-result"); div.replaceChildren();
    div.append(el("p", { class: "muted", text: `${out.intervention} at ${out.site}${out.steer_generated ? ", generated tokens too" : ", prompt only"}` }));
    const t = el("table", { id: "steer-top" }, el("tr", {}, el("th", { text: "token" }), el("th", { text: "p before" }), el("th", { text: "p after" }), el("th", { text: "Δp" })));
    for (const r of out.top) t.append(el("tr", { "data-token": r.token },
      el("td", { text: S.tokenText(r.text) }), el("td", { text: fmt(r.before, 4) }), el("td", { text: fmt(r.after, 4) }),
      el("td", { class: r.after >= r.before ? "w pos" : "w neg", text: fmt(r.after - r.before, 4) })));
    div.append(el("h4", { text: "continuation" }),
      el("p", { class: "cont" }, el("b", { text: "before: " }), el("span", { id: "steer-before", text: out.continuation.before })),
      el("p", { class: "cont" }, el("b", { text: "after: " }), el("span", { id: "steer-after", text: out.continuation.after })),
      el("h4", { text: "next-token probabilities" }), t);
  }

  async function steer() {
    if (!L.lat) return;
    const { cell, lat } = L.lat;
    const req = { lens: L.path, set: L.data.sets[cell.set].name, layer: cell.layer, latent: lat.index,
      op: $("steer-op").value, value: Number($("steer-value").value), positions: $("steer-pos").value,
      pos: cell.pos, max_new_tokens: Math.round(Number($("steer-tokens").value)) };
    steerError(""); $("steer-result").replaceChildren(el("p", { class: "muted", text: "running…" }));
    document.body.dataset.steer = "running";
    try {
      const r = await fetch("/api/steer_sae", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(req) });
      const out = await r.json();
      if (!r.ok) throw new Error(out.error || `HTTP ${r.status}`);
      steerResult(out); document.body.dataset.steer = "done";
    } catch (e) { $("steer-result").replaceChildren(); steerError(String(e.message || e)); document.body.dataset.steer = "error"; }
  }

  async function openLens(path) {
    document.body.dataset.ready = "0"; showError("");
    try {
      const r = await fetch(`/data/${path.split("/").map(encodeURIComponent).join("/")}`);
      if (!r.ok) throw new Error(`cannot read ${path}: HTTP ${r.status}`);
      const d = await r.json();
      if (d.format !== "cltrace.lens/1") throw new Error(`${path} is not a cltrace lens JSON`);
      L.data = d; L.path = path; L.set = 0;
      $("set-select").replaceChildren(...d.sets.map((s, i) => el("option", { value: i, text: `${s.name} (${s.what})` })));
      draw();
      history.replaceState(null, "", `#lens=${encodeURIComponent(path)}`);
      document.body.dataset.ready = "1";
    } catch (e) { showError(String(e.message || e)); document.body.dataset.ready = "error"; }
  }

  async function boot() {
    $("lens-select").addEventListener("change", (ev) => openLens(ev.target.value));
    $("set-select").addEventListener("change", (ev) => { L.set = Number(ev.target.value); draw(); });
    $("image-layer").addEventListener("change", (ev) => {
      const layer = Number(ev.target.value), e = (L.data.images || [])[0], x = e && imageLayer(e, L.set, layer);
      setImageLatent(L.set, layer, x && x.top.length ? x.top[0] : null);
    });
    $("steer-run").addEventListener("click", steer);
    try {
      L.sae = await (await fetch("/api/sae")).json();
      const lenses = (await (await fetch("/api/lenses")).json()).lenses || [];
      for (const x of lenses) $("lens-select").append(el("option", { value: x.path, text: x.path }));
      if (!lenses.length) { showError("No lens in this folder: run `cltrace lens \"...\" --json DIR/lens.json` first."); return; }
      const m = /lens=([^&]+)/.exec(location.hash), want = m ? decodeURIComponent(m[1]) : lenses[0].path;
      $("lens-select").value = want;
      await openLens(want);
    } catch (e) { showError(String(e.message || e)); }
  }
  document.addEventListener("DOMContentLoaded", boot);
})();
