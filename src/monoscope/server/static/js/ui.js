// Small DOM helpers and the visual pieces shared by the pages: highlighted tokens, sparklines, histograms.

export function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "style" && typeof value === "object") Object.assign(node.style, value);
    else if (key.startsWith("on") && typeof value === "function") node.addEventListener(key.slice(2), value);
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (value === true) node.setAttribute(key, "");
    else node.setAttribute(key, value);
  }
  append(node, children);
  return node;
}

function append(node, children) {
  for (const child of children) {
    if (child === undefined || child === null || child === false) continue;
    if (Array.isArray(child)) append(node, child);
    else node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

export function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  for (const child of children) if (child) node.append(child);
  return node;
}

export function clear(node) {
  while (node.firstChild) node.removeChild(node.firstChild);
  return node;
}

export function fmt(x, digits = 3) {
  if (x === null || x === undefined || Number.isNaN(x)) return "–";
  if (x === 0) return "0";
  const a = Math.abs(x);
  if (a >= 1000) return x.toLocaleString(undefined, { maximumFractionDigits: 0 });
  if (a >= 1) return x.toFixed(Math.max(0, digits - 1 - Math.floor(Math.log10(a))));
  return x.toPrecision(digits);
}

export function pct(x) {
  if (x === null || x === undefined) return "–";
  if (x === 0) return "0%";
  if (x < 0.0001) return `${(x * 100).toExponential(1)}%`;
  return `${(x * 100).toPrecision(2)}%`;
}

// How a token is shown: whitespace made visible where it would vanish.
export function showToken(text) {
  return text.replace(/\n/g, "↵").replace(/\t/g, "⇥").replace(/\r/g, "␍");
}

// Background colour of an activation (0..1 of the scale): white to orange.
export function heat(fraction) {
  const f = Math.max(0, Math.min(1, fraction));
  if (f <= 0) return "transparent";
  return `rgba(255, 128, 0, ${(0.12 + 0.78 * f).toFixed(3)})`;
}

// Tokens with activation highlighting; hover shows the value (title and the floating tip).
export function tokens(list, acts, scale, { peak = -1, onClick = null, selected = -1, label = "activation" } = {}) {
  const line = h("span", { class: "tokens" });
  list.forEach((tok, i) => {
    const a = acts ? acts[i] || 0 : 0;
    const span = h("span", {
      class: "tok" + (i === peak ? " peak" : "") + (a > 0 ? " on" : "") + (i === selected ? " selected" : "") + (onClick ? " clickable" : ""),
      style: { background: heat(scale > 0 ? a / scale : 0) },
      "data-act": a > 0 ? fmt(a) : "0",
      "data-tip": `${JSON.stringify(tok).slice(1, -1)} · ${label} ${fmt(a)}`,
    }, showToken(tok));
    if (onClick) span.addEventListener("click", () => onClick(i, span));
    line.append(span);
  });
  return line;
}

// A mini histogram: bars from counts (log-compressed so small bins stay visible).
export function sparkline(counts, width = 90, height = 22) {
  const s = svg("svg", { width, height, viewBox: `0 0 ${width} ${height}`, class: "spark", role: "img", "aria-label": "activation histogram" });
  if (!counts || !counts.length) {
    s.append(svg("line", { x1: 0, y1: height - 1, x2: width, y2: height - 1, class: "spark-empty" }));
    return s;
  }
  const max = Math.max(...counts.map((c) => Math.log1p(c)));
  const bw = width / counts.length;
  counts.forEach((c, i) => {
    const bh = max > 0 ? Math.max(1, (Math.log1p(c) / max) * (height - 2)) : 1;
    s.append(svg("rect", { x: (i * bw + 0.5).toFixed(2), y: (height - bh).toFixed(2), width: Math.max(1, bw - 1).toFixed(2), height: bh.toFixed(2), class: "spark-bar" }));
  });
  return s;
}

// A histogram with axes: edges (one more than counts), log-spaced.
export function histogram(edges, counts, { width = 520, height = 170 } = {}) {
  const pad = { l: 44, r: 10, t: 10, b: 40 };
  const s = svg("svg", { viewBox: `0 0 ${width} ${height}`, class: "histogram", role: "img", "aria-label": "activation histogram" });
  if (!counts || !counts.length) {
    s.append(svg("text", { x: width / 2, y: height / 2, "text-anchor": "middle", class: "axis-label" }));
    s.lastChild.textContent = "never fired in the analysed text";
    return s;
  }
  const iw = width - pad.l - pad.r;
  const ih = height - pad.t - pad.b;
  const maxCount = Math.max(...counts);
  const bw = iw / counts.length;
  counts.forEach((c, i) => {
    const bh = maxCount > 0 ? (c / maxCount) * ih : 0;
    const rect = svg("rect", { x: (pad.l + i * bw + 0.5).toFixed(2), y: (pad.t + ih - bh).toFixed(2), width: Math.max(1, bw - 1).toFixed(2), height: Math.max(0, bh).toFixed(2), class: "hist-bar" });
    const title = svg("title");
    title.textContent = `${fmt(edges[i])} – ${fmt(edges[i + 1])}: ${c.toLocaleString()} tokens`;
    rect.append(title);
    s.append(rect);
  });
  s.append(svg("line", { x1: pad.l, y1: pad.t + ih, x2: pad.l + iw, y2: pad.t + ih, class: "axis" }));
  s.append(svg("line", { x1: pad.l, y1: pad.t, x2: pad.l, y2: pad.t + ih, class: "axis" }));
  const ticks = [0, Math.floor(counts.length / 2), counts.length];
  for (const t of ticks) {
    const x = pad.l + t * bw;
    const label = svg("text", { x, y: pad.t + ih + 15, "text-anchor": t === 0 ? "start" : t === counts.length ? "end" : "middle", class: "axis-label" });
    label.textContent = fmt(edges[t], 2);
    s.append(label);
  }
  const yl = svg("text", { x: pad.l - 6, y: pad.t + 8, "text-anchor": "end", class: "axis-label" });
  yl.textContent = maxCount.toLocaleString();
  s.append(yl);
  const y0 = svg("text", { x: pad.l - 6, y: pad.t + ih, "text-anchor": "end", class: "axis-label" });
  y0.textContent = "0";
  s.append(y0);
  const xl = svg("text", { x: pad.l + iw / 2, y: height - 4, "text-anchor": "middle", class: "axis-title" });
  xl.textContent = "activation (log scale)";
  s.append(xl);
  return s;
}

// One floating tooltip for every element with data-tip.
export function installTooltips() {
  const tip = h("div", { class: "tooltip", role: "tooltip" });
  document.body.append(tip);
  document.addEventListener("mouseover", (e) => {
    const target = e.target.closest && e.target.closest("[data-tip]");
    if (!target) {
      tip.classList.remove("show");
      return;
    }
    tip.textContent = target.dataset.tip;
    tip.classList.add("show");
    const r = target.getBoundingClientRect();
    const tr = tip.getBoundingClientRect();
    let left = r.left + r.width / 2 - tr.width / 2;
    left = Math.max(6, Math.min(window.innerWidth - tr.width - 6, left));
    let top = r.top - tr.height - 6;
    if (top < 4) top = r.bottom + 6;
    tip.style.left = `${left + window.scrollX}px`;
    tip.style.top = `${top + window.scrollY}px`;
  });
}

export function toast(message, kind = "info") {
  const box = document.getElementById("toasts");
  const item = h("div", { class: `toast ${kind}` }, message);
  box.append(item);
  setTimeout(() => item.classList.add("gone"), 3500);
  setTimeout(() => item.remove(), 4000);
}

export function errorBox(err) {
  return h("div", { class: "error-box" }, h("strong", {}, "Error: "), err && err.message ? err.message : String(err));
}

export function featureLink(id, label, sae) {
  const q = sae ? `?sae=${encodeURIComponent(sae)}` : "";
  return h("a", { href: `#/feature/${id}${q}`, class: "feature-link" }, h("span", { class: "fid" }, `#${id}`), label ? h("span", { class: "flabel", title: label }, label) : h("span", { class: "flabel muted" }, "(no label)"));
}

export function debounce(fn, ms) {
  let timer = null;
  return (...args) => {
    clearTimeout(timer);
    timer = setTimeout(() => fn(...args), ms);
  };
}

export function navigate(hash) {
  if (location.hash === hash) window.dispatchEvent(new HashChangeEvent("hashchange"));
  else location.hash = hash;
}
