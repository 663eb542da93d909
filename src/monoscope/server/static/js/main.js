// The single-page app: hash routes, the header (SAE choice, API key), and the pages.

import { apiKey, get, setApiKey } from "./api.js";
import { clear, errorBox, h, installTooltips } from "./ui.js";
import { equalizer, onEqualizer, setInfo, setSae, state } from "./state.js";
import { renderFeature } from "./pages/feature.js";
import { renderSearch } from "./pages/search.js";
import { renderScanner } from "./pages/scanner.js";
import { renderChat } from "./pages/chat.js";
import { renderMap } from "./pages/map.js";

const ROUTES = [
  { name: "search", title: "Search", render: renderSearch },
  { name: "scan", title: "Scanner", render: renderScanner },
  { name: "chat", title: "Equalizer chat", render: renderChat },
  { name: "map", title: "Map", render: renderMap },
  { name: "feature", title: "Feature", render: renderFeature, hidden: true },
];

let cleanup = null;

export function parseHash() {
  const raw = location.hash.replace(/^#\/?/, "");
  const [path, query] = raw.split("?");
  const parts = path.split("/").filter(Boolean);
  return { name: parts[0] || "search", args: parts.slice(1), params: new URLSearchParams(query || "") };
}

async function route() {
  const { name, args, params } = parseHash();
  const page = ROUTES.find((r) => r.name === name) || ROUTES[0];
  if (params.get("sae") && state.info && state.info.saes.some((s) => s.id === params.get("sae")) && params.get("sae") !== state.sae) {
    setSae(params.get("sae"));
    renderSaePicker();
  }
  for (const link of document.querySelectorAll("nav.tabs a")) link.classList.toggle("active", link.dataset.route === page.name);
  const main = clear(document.getElementById("main"));
  if (typeof cleanup === "function") cleanup();
  cleanup = null;
  document.title = `${page.title} · monoscope`;
  main.dataset.page = page.name;
  try {
    cleanup = await page.render(main, { args, params });
  } catch (err) {
    main.append(errorBox(err));
  }
}

function renderSaePicker() {
  const box = clear(document.getElementById("sae-picker"));
  if (!state.info) return;
  const saes = state.info.saes;
  if (saes.length <= 1) {
    const s = saes[0];
    if (s) box.append(h("span", { class: "chip", title: s.path }, `SAE ${s.id} · ${s.hook_point} · ${s.d_sae.toLocaleString()} features`));
    return;
  }
  const select = h("select", { "aria-label": "SAE", onchange: (e) => { setSae(e.target.value); route(); } },
    saes.map((s) => h("option", { value: s.id, selected: s.id === state.sae }, `${s.id} · ${s.hook_point} · ${s.d_sae.toLocaleString()}`)));
  box.append(select);
}

function renderEqBadge() {
  const badge = document.getElementById("eq-count");
  const n = equalizer.items.filter((it) => it.enabled).length;
  badge.textContent = n ? String(n) : "";
  badge.hidden = !n;
}

function keyDialog() {
  const dialog = document.getElementById("key-dialog");
  const input = dialog.querySelector("input");
  input.value = apiKey();
  dialog.showModal();
  input.focus();
}

async function start() {
  installTooltips();
  const nav = document.querySelector("nav.tabs");
  for (const r of ROUTES.filter((r) => !r.hidden)) {
    nav.append(h("a", { href: `#/${r.name}`, "data-route": r.name }, r.title, r.name === "chat" ? h("span", { id: "eq-count", class: "badge", hidden: true }) : null));
  }
  document.getElementById("key-button").addEventListener("click", keyDialog);
  const dialog = document.getElementById("key-dialog");
  dialog.querySelector("form").addEventListener("submit", (e) => {
    e.preventDefault();
    setApiKey(dialog.querySelector("input").value.trim());
    dialog.close();
    boot();
  });
  dialog.querySelector("[data-cancel]").addEventListener("click", () => dialog.close());
  window.addEventListener("monoscope:unauthorised", () => {
    if (!dialog.open) keyDialog();
  });
  window.addEventListener("hashchange", route);
  onEqualizer(renderEqBadge);
  renderEqBadge();
  await boot();
}

async function boot() {
  const main = document.getElementById("main");
  try {
    const info = await get("/api/info");
    setInfo(info);
    document.getElementById("model-name").textContent = info.model;
    document.getElementById("model-name").title = info.model_source;
    document.getElementById("key-button").hidden = !info.auth;
    renderSaePicker();
    await route();
  } catch (err) {
    clear(main).append(errorBox(err));
    if (err.status === 401) keyDialog();
  }
}

start();
