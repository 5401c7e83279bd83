// cltrace viewer panels: node and feature cards, links lists, pins and supernodes (saved into
// the graph's qParams), and experiments (interventions computed by the server's model).
"use strict";
(function () {
  const S = window.cltrace, { el, $, fmt } = S;
  const LIST_CAP = 60;
  let targets = [];  // node ids the next experiment intervenes on

  // --- node card and its links ---------------------------------------------------------------
  function nodeRow(k, other) {
    const l = S.links[k], n = S.nodes[other];
    return el("li", {}, el("button", { type: "button", class: "linkish", text: `${n.label} (${n.node_id})`, on: { click: () => S.select(other) } }),
      el("span", { class: l.w >= 0 ? "w pos" : "w neg", text: ` ${l.w >= 0 ? "+" : ""}${fmt(l.w, 4)}` }));
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
        on: { click: () => { S.togglePin(n.node_id); nodeCard(i); } } }));
    linksCard(i);
    if (n.kind === "feature") featureCard(n); else $("feature-card").hidden = true;
  }

  // --- feature card: label, examples shaded by activation, logits, frequency, histogram ------
  async function featurePage(n) {
    if (S.inline) return (S.inline.pages || {})[String(n.feature)] || null;
    const scan = String(S.graph.metadata.scan || "");
    if (!scan.startsWith("./")) return null;
    // "./data/x": as circuit-tracer's viewer reads it, relative to the server root, whose
    // /data/ is the served folder; any other "./x": relative to the graph's own folder
    const dir = S.path.includes("/") ? S.path.slice(0, S.path.lastIndexOf("/") + 1) : "";
    const rel = scan.slice(2).replace(/\/$/, "");
    const url = rel.startsWith("data/") ? `/${rel}/${n.feature}.json` : `/data/${dir}${rel}/${n.feature}.json`;
    try { const r = await fetch(url); return r.ok ? await r.json() : null; } catch (e) { return null; }
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
    const sec = $("feature-card"), body = $("feature-body");
    sec.hidden = false; body.replaceChildren(el("p", { class: "muted", text: "loading…" }));
    const page = await featurePage(n);
    if (S.selected !== n.idx) return;  // another node was selected meanwhile
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
    $("group-btn").addEventListener("click", group);
    $("save-btn").addEventListener("click", save);
    $("target-selected").addEventListener("click", () => setTargets(S.selected >= 0 ? [S.nodes[S.selected].node_id] : []));
    $("target-checked").addEventListener("click", () => setTargets([...document.querySelectorAll(".pin-check:checked")].map((c) => c.value)));
    $("target-supernode").addEventListener("change", (ev) => { const sn = S.supernodes[Number(ev.target.value)]; if (sn) setTargets(sn.slice(1)); ev.target.value = ""; });
    $("exp-run").addEventListener("click", run);
    $("exp-mode").addEventListener("change", () => { $("exp-freeze").disabled = $("exp-mode").value !== "frozen"; });
  }

  S.hooks.onSelect = nodeCard;
  S.hooks.onPins = pinsPanel;
  S.hooks.onGraph = () => {
    nodeCard(-1); pinsPanel(); setTargets([]);
    $("experiments").hidden = !(S.model && S.model.available) || !!S.inline;
    $("save-btn").disabled = !!S.inline;
  };
  document.addEventListener("DOMContentLoaded", wire);
})();
