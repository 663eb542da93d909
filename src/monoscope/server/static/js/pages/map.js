// The feature map: every feature as a point (decoder directions laid out in 2-D), drawn on a canvas.
// Wheel zooms around the pointer, drag pans, hover shows the label, click opens the feature.

import { get } from "../api.js";
import { state } from "../state.js";
import { clear, errorBox, h, navigate, pct } from "../ui.js";

// viridis-like colour ramp, 0..1
const RAMP = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];

function colour(t) {
  const x = Math.max(0, Math.min(1, t)) * (RAMP.length - 1);
  const i = Math.min(RAMP.length - 2, Math.floor(x));
  const f = x - i;
  const c = RAMP[i].map((v, k) => Math.round(v + (RAMP[i + 1][k] - v) * f));
  return `rgb(${c[0]},${c[1]},${c[2]})`;
}

export async function renderMap(main, { params } = {}) {
  const wrap = h("div", { class: "map-wrap card" });
  const canvas = h("canvas", { id: "map-canvas", "aria-label": "feature map", tabindex: 0 });
  const tip = h("div", { class: "map-tip", hidden: true });
  const highlight = h("input", { type: "search", id: "map-filter", placeholder: "highlight labels containing…", "aria-label": "highlight" });
  const countLabel = h("span", { class: "muted small" });
  main.append(
    h("div", { class: "page-head" }, h("h1", {}, "Feature map"),
      h("p", { class: "muted" }, "Features whose decoder directions are alike sit close together. Scroll to zoom, drag to pan, click a point to open its feature.")),
    h("div", { class: "row between map-tools" },
      h("div", { class: "row" }, highlight, countLabel),
      h("div", { class: "row" },
        h("span", { class: "legend" }, h("span", { class: "muted small" }, "rare"), h("span", { class: "legend-ramp" }), h("span", { class: "muted small" }, "frequent")),
        h("button", { class: "ghost small", id: "map-reset", onclick: () => { view = { ...home }; draw(); } }, "reset view"))),
    wrap);
  wrap.append(canvas, tip);

  let data;
  try {
    data = await get("/api/map", { sae: state.sae });
  } catch (err) {
    wrap.replaceWith(errorBox(err));
    return;
  }
  if (!data.ids.length) {
    clear(wrap).append(h("p", { class: "muted" }, "This feature database has no map (it was analysed with --map none)."));
    return;
  }
  const n = data.ids.length;
  const logd = data.density.map((d) => Math.log10(Math.max(d, 1e-7)));
  const lo = Math.min(...logd);
  const hi = Math.max(...logd);
  const shade = logd.map((v) => (hi > lo ? (v - lo) / (hi - lo) : 0.5));
  const lower = data.labels.map((l) => (l || "").toLowerCase());
  let marked = null;
  countLabel.textContent = `${n.toLocaleString()} features · ${data.method || "map"}`;
  // `#/map?mark=3,17,40&why=...`: colour a set of features, e.g. a feature's family from another SAE's page
  const markIds = new Set(((params && params.get("mark")) || "").split(",").map(Number).filter((v) => Number.isInteger(v) && v >= 0));
  if (markIds.size) {
    marked = new Set();
    data.ids.forEach((fid, i) => { if (markIds.has(fid)) marked.add(i); });
    countLabel.textContent = `${marked.size.toLocaleString()} marked${params.get("why") ? ` (${params.get("why")})` : ""} of ${n.toLocaleString()}`;
    countLabel.id = "map-marked";
  }

  const home = { cx: 0.5, cy: 0.5, scale: 1 };
  let view = { ...home };
  let width = 0;
  let height = 0;
  let hover = -1;
  const dpr = window.devicePixelRatio || 1;

  function resize() {
    const r = wrap.getBoundingClientRect();
    width = Math.max(300, Math.floor(r.width - 2));
    height = Math.max(360, Math.floor(Math.min(window.innerHeight - 230, width * 0.62)));
    canvas.width = Math.floor(width * dpr);
    canvas.height = Math.floor(height * dpr);
    canvas.style.width = `${width}px`;
    canvas.style.height = `${height}px`;
    draw();
  }

  // data [0,1]^2 -> screen pixels (y up)
  function toScreen(i) {
    const s = Math.min(width, height) * 0.92 * view.scale;
    return [width / 2 + (data.x[i] - view.cx) * s, height / 2 - (data.y[i] - view.cy) * s];
  }

  function draw() {
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.fillStyle = "#fbfbfd";
    ctx.fillRect(0, 0, width, height);
    const base = n < 500 ? 5 : n < 5000 ? 3.4 : n < 30000 ? 2.3 : 1.6;
    const radius = Math.min(10, base * view.scale ** 0.35);
    for (let pass = 0; pass < 2; pass++) {
      for (let i = 0; i < n; i++) {
        const isMarked = marked !== null && marked.has(i);
        if ((pass === 1) !== isMarked) continue;
        const [x, y] = toScreen(i);
        if (x < -10 || y < -10 || x > width + 10 || y > height + 10) continue;
        ctx.globalAlpha = marked !== null && !isMarked ? 0.18 : 0.9;
        ctx.fillStyle = colour(shade[i]);
        ctx.beginPath();
        ctx.arc(x, y, isMarked ? radius + 1.5 : radius, 0, Math.PI * 2);
        ctx.fill();
        if (isMarked) {
          ctx.strokeStyle = "#f97316";
          ctx.lineWidth = 1.5;
          ctx.stroke();
        }
      }
    }
    ctx.globalAlpha = 1;
    if (hover >= 0) {
      const [x, y] = toScreen(hover);
      ctx.strokeStyle = "#111827";
      ctx.lineWidth = 2;
      ctx.beginPath();
      ctx.arc(x, y, radius + 4, 0, Math.PI * 2);
      ctx.stroke();
    }
  }

  function nearest(mx, my) {
    let best = -1;
    let bestD = 10 * 10;
    for (let i = 0; i < n; i++) {
      const [x, y] = toScreen(i);
      const d = (x - mx) ** 2 + (y - my) ** 2;
      if (d < bestD) { bestD = d; best = i; }
    }
    return best;
  }

  let drag = null;
  canvas.addEventListener("mousedown", (e) => { drag = { x: e.offsetX, y: e.offsetY, cx: view.cx, cy: view.cy, moved: false }; });
  window.addEventListener("mouseup", onUp);
  function onUp(e) {
    if (drag && !drag.moved && e.target === canvas) {
      const i = nearest(e.offsetX, e.offsetY);
      if (i >= 0) navigate(`#/feature/${data.ids[i]}?sae=${encodeURIComponent(data.sae)}`);
    }
    drag = null;
  }
  canvas.addEventListener("mousemove", (e) => {
    if (drag) {
      const s = Math.min(width, height) * 0.92 * view.scale;
      const dx = e.offsetX - drag.x;
      const dy = e.offsetY - drag.y;
      if (Math.abs(dx) + Math.abs(dy) > 3) drag.moved = true;
      view.cx = drag.cx - dx / s;
      view.cy = drag.cy + dy / s;
      draw();
      return;
    }
    const i = nearest(e.offsetX, e.offsetY);
    if (i !== hover) {
      hover = i;
      draw();
    }
    if (i >= 0) {
      tip.hidden = false;
      clear(tip).append(h("strong", {}, `#${data.ids[i]}`), " ", data.labels[i] || h("span", { class: "muted" }, "(no label)"), h("div", { class: "muted small" }, `density ${pct(data.density[i])}`));
      const [x, y] = toScreen(i);
      tip.style.left = `${Math.min(width - 260, x + 12)}px`;
      tip.style.top = `${Math.max(0, y - 12)}px`;
      canvas.style.cursor = "pointer";
    } else {
      tip.hidden = true;
      canvas.style.cursor = "grab";
    }
  });
  canvas.addEventListener("mouseleave", () => { hover = -1; tip.hidden = true; draw(); });
  canvas.addEventListener("wheel", (e) => {
    e.preventDefault();
    const s = Math.min(width, height) * 0.92 * view.scale;
    const px = view.cx + (e.offsetX - width / 2) / s;
    const py = view.cy - (e.offsetY - height / 2) / s;
    const factor = Math.exp(-e.deltaY * 0.0015);
    view.scale = Math.max(0.5, Math.min(400, view.scale * factor));
    const s2 = Math.min(width, height) * 0.92 * view.scale;
    view.cx = px - (e.offsetX - width / 2) / s2;
    view.cy = py + (e.offsetY - height / 2) / s2;
    draw();
  }, { passive: false });
  highlight.addEventListener("input", () => {
    const q = highlight.value.trim().toLowerCase();
    if (!q) {
      marked = null;
      countLabel.textContent = `${n.toLocaleString()} features · ${data.method || "map"}`;
    } else {
      marked = new Set();
      lower.forEach((l, i) => { if (l.includes(q)) marked.add(i); });
      countLabel.textContent = `${marked.size.toLocaleString()} of ${n.toLocaleString()} match`;
    }
    draw();
  });
  const observer = new ResizeObserver(() => resize());
  observer.observe(wrap);
  resize();
  canvas.dataset.ready = "1";
  return () => { observer.disconnect(); window.removeEventListener("mouseup", onUp); };
}
