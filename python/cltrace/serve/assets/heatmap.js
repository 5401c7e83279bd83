// cltrace viewer, heatmaps over an image's grid of soft tokens, shared by the graph viewer's
// image panel (images.js) and the lens page (lens.js): a cell's colour, the colour scale, and
// the /image/ URL of an image file beside a JSON. Exported as window.cltrace.heatmap.
// Written for cltrace; plain JavaScript + SVG, no third-party code, no request off this machine.
"use strict";
(function () {
  const S = window.cltrace, { el, fmt } = S;

  // Semi-transparent colour of v against max: blue for positive, red for negative (as the
  // links), opacity 0.75 x |v| / max; transparent for null (no value).
  function fill(v, max) {
    if (v === null || !(max > 0)) return "rgba(0, 0, 0, 0)";
    const a = Math.min(1, Math.abs(v) / max) * 0.75;
    return v >= 0 ? `rgba(33, 102, 172, ${a.toFixed(3)})` : `rgba(197, 48, 48, ${a.toFixed(3)})`;
  }

  // The colour scale from 0 (or -max when signed) to max, labelled.
  function scaleBar(max, signed, caption) {
    const W = 160, H = 10, N = 40, lo = signed ? -max : 0;
    const svg = el("svg", { class: "img-scale", width: W + 8, height: H + 14, role: "img", "aria-label": `${caption} colour scale` });
    svg.append(el("rect", { x: 0, y: 0, width: W, height: H, fill: "#fff", stroke: "#ccc" }));
    for (let j = 0; j < N; j++) svg.append(el("rect", { x: j * W / N, y: 0, width: W / N + 0.5, height: H, fill: fill(lo + (max - lo) * (j + 0.5) / N, max) }));
    svg.append(el("text", { x: 0, y: H + 12, class: "lab", text: fmt(lo, 3) }),
      el("text", { x: W, y: H + 12, class: "lab", "text-anchor": "end", text: fmt(max, 3) }));
    if (signed) svg.append(el("text", { x: W / 2, y: H + 12, class: "lab", "text-anchor": "middle", text: "0" }));
    return svg;
  }

  // /image/<the folder of the JSON at `path`>/<file>: the server's image route (it converts
  // formats a browser cannot show, e.g. PPM, to PNG). `file` is a bare name beside the JSON.
  function imageUrl(path, file) {
    const dir = path && path.includes("/") ? path.slice(0, path.lastIndexOf("/") + 1) : "";
    return "/image/" + (dir + file).split("/").map(encodeURIComponent).join("/");
  }

  S.heatmap = { fill, scaleBar, imageUrl };
})();
