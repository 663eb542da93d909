// Search: by words or meaning of the labels, or by an example text; with no query, browse all features.

import { get, post } from "../api.js";
import { addToEqualizer, saeInfo, state } from "../state.js";
import { clear, errorBox, featureLink, fmt, h, navigate, pct, sparkline, toast } from "../ui.js";

const MODES = [
  { id: "hybrid", name: "Words + meaning" },
  { id: "words", name: "Words" },
  { id: "meaning", name: "Meaning" },
  { id: "example", name: "Example text" },
];

function resultTable(rows, sae, extra = null) {
  return h("table", { class: "table results" },
    h("thead", {}, h("tr", {},
      h("th", {}, "feature"), h("th", { class: "num" }, "density"), h("th", { class: "num" }, "max act."),
      extra ? h("th", { class: "num" }, extra.title) : null, h("th", {}, "histogram"), h("th", {}, ""))),
    h("tbody", {}, rows.map((r) => h("tr", { class: "result", "data-feature": r.id },
      h("td", { class: "label-cell" }, featureLink(r.id, r.label, sae)),
      h("td", { class: "num" }, pct(r.density)),
      h("td", { class: "num" }, fmt(r.max_activation)),
      extra ? h("td", { class: "num" }, extra.value(r)) : null,
      h("td", {}, sparkline(r.sparkline)),
      h("td", { class: "actions" }, h("button", { class: "small ghost", title: "add to the equalizer", onclick: (e) => {
        e.stopPropagation();
        toast(addToEqualizer(r.id, r.label, sae) ? `feature #${r.id} added to the equalizer` : `feature #${r.id} is already in the equalizer`, "ok");
      } }, "+ steer"))))));
}

export async function renderSearch(main, { params }) {
  const info = saeInfo();
  let mode = params.get("mode") || "hybrid";
  if (mode === "meaning" && info && !info.meaning_search) mode = "hybrid";
  const q = params.get("q") || "";
  const sae = state.sae;

  const input = h("input", { type: "search", id: "search-input", placeholder: "words, e.g. “bridge” or “code”", value: mode === "example" ? "" : q, "aria-label": "search" });
  const area = h("textarea", { id: "example-input", rows: 4, placeholder: "Paste a text: features that fire on it more than on ordinary text come first." }, mode === "example" ? q : "");
  const results = h("div", { id: "results" });
  const modeButtons = h("div", { class: "segmented", role: "tablist" }, MODES.map((m) => {
    const disabled = m.id === "meaning" && info && !info.meaning_search;
    return h("button", {
      type: "button", class: m.id === mode ? "active" : "", "data-mode": m.id, disabled,
      title: disabled ? "this feature database has no label embeddings" : "",
      onclick: () => { mode = m.id; sync(); },
    }, m.name);
  }));

  function sync() {
    for (const b of modeButtons.children) b.classList.toggle("active", b.dataset.mode === mode);
    input.hidden = mode === "example";
    area.hidden = mode !== "example";
    (mode === "example" ? area : input).focus();
  }

  const form = h("form", { class: "search-form card", onsubmit: (e) => {
    e.preventDefault();
    const text = mode === "example" ? area.value : input.value;
    navigate(`#/search?mode=${mode}&q=${encodeURIComponent(text.trim())}`);
  } },
  h("div", { class: "search-row" }, input, area, h("button", { type: "submit", class: "primary", id: "search-button" }, "Search")),
  modeButtons);

  main.append(
    h("div", { class: "page-head" }, h("h1", {}, "Search features"),
      h("p", { class: "muted" }, info ? `${info.d_sae.toLocaleString()} features of SAE ${info.id} at ${info.hook_point}` + (info.has_database ? "" : " (no feature database: run monoscope analyze)") : "")),
    form, results);
  sync();

  if (!q) {
    await browse(results, sae, 0, params.get("order") || "density");
    return;
  }
  results.append(h("p", { class: "muted loading" }, "searching…"));
  try {
    if (mode === "example") {
      const r = await post("/api/search/examples", { texts: [q], sae, limit: 30 });
      clear(results).append(
        h("p", { class: "muted" }, `${r.hits.length} features fire on the text more than on the analysed corpus (score: how far above their usual level, in standard deviations).`),
        r.hits.length ? resultTable(r.hits, r.sae, { title: "score", value: (x) => fmt(x.score) }) : h("p", {}, "No feature fires on this text."));
    } else {
      const r = await get("/api/search", { q, mode, sae, limit: 50 });
      clear(results).append(
        h("p", { class: "muted" }, `${r.hits.length} result${r.hits.length === 1 ? "" : "s"} for “${r.query}” by ${r.mode === "hybrid" ? "words and meaning" : r.mode}.`),
        r.hits.length ? resultTable(r.hits, r.sae) : h("p", {}, "No label matches. Try other words, or search by an example text."));
    }
  } catch (err) {
    clear(results).append(errorBox(err));
  }
}

async function browse(results, sae, offset, order) {
  clear(results).append(h("p", { class: "muted loading" }, "loading…"));
  try {
    const r = await get("/api/features", { sae, offset, limit: 50, order });
    const orderSelect = h("select", { "aria-label": "order", onchange: (e) => browse(results, sae, 0, e.target.value) },
      [["density", "most frequent first"], ["max_activation", "strongest first"], ["id", "by id"]].map(([v, name]) => h("option", { value: v, selected: v === order }, name)));
    clear(results).append(
      h("div", { class: "row between" }, h("h3", {}, "Browse all features"), orderSelect),
      resultTable(r.features, r.sae),
      h("div", { class: "row between pager" },
        h("button", { class: "ghost", disabled: offset <= 0, onclick: () => browse(results, sae, Math.max(0, offset - 50), order) }, "← previous"),
        h("span", { class: "muted" }, `${offset + 1}–${Math.min(r.total, offset + r.features.length)} of ${r.total.toLocaleString()}`),
        h("button", { class: "ghost", disabled: offset + 50 >= r.total, onclick: () => browse(results, sae, offset + 50, order) }, "next →")));
  } catch (err) {
    clear(results).append(errorBox(err));
  }
}
