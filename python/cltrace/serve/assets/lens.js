// cltrace lens page: the JSON of `cltrace lens --json` (format cltrace.lens/1) as a token ×
// layer grid of the top latent per cell; a click lists the cell's top latents and opens the
// feature card of the viewer (panels.js's fillFeature) for the one chosen.
// Written for cltrace; plain JavaScript, no third-party code, no request off this machine.
"use strict";
(function () {
  const S = window.cltrace, { el, $, fmt } = S;
  const L = { data: null, path: null, set: 0, cell: null, lat: null, sae: { available: false } };
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
    d.tokens.forEach((t) => head.append(el("th", { class: "lens-tok" + (t.bos ? " lens-bos" : ""), title: `position ${t.pos}`, text: S.tokenText(t.token) })));
    table.append(el("thead", {}, head));
    const body = el("tbody", {});
    for (const layer of [...set.layers].reverse()) {
      const tr = el("tr", {}, el("th", { text: `L${layer}` }));
      for (const t of d.tokens) {
        const c = cells.get(`${layer}:${t.pos}`);
        if (!c) { tr.append(el("td", { class: "lens-cell empty" + (t.bos ? " lens-bos" : ""), text: t.bos ? "bos" : "" })); continue; }
        const top = c.latents[0], mx = layerMax.get(layer) || 1;
        const td = el("td", { class: "lens-cell", tabindex: 0, "data-layer": layer, "data-pos": t.pos,
          title: top ? `${top.label || "#" + top.index} (${fmt(top.act, 2)})` : "no active latent",
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
  }

  function openCell(c) {
    L.cell = c;
    document.querySelectorAll(".lens-cell.selected").forEach((x) => x.classList.remove("selected"));
    const td = document.querySelector(`.lens-cell[data-layer="${c.layer}"][data-pos="${c.pos}"]`);
    if (td) td.classList.add("selected");
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

  function openFeature(c, lat) {
    const set = L.data.sets[c.set];
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
