// Scanner: paste a text, see its tokens highlighted; click a token for its features, a feature to open it.

import { post } from "../api.js";
import { addToEqualizer, state } from "../state.js";
import { clear, errorBox, featureLink, fmt, h, showToken, toast, tokens } from "../ui.js";

const SAMPLE = "The Golden Gate Bridge is a suspension bridge spanning the Golden Gate strait.\n\ndef add(a, b):\n    return a + b";
const TEXT_STORAGE = "monoscope.scanText";

export async function renderScanner(main) {
  const area = h("textarea", { id: "scan-input", rows: 6, placeholder: "Paste any text…", "aria-label": "text to scan" }, localStorage.getItem(TEXT_STORAGE) || SAMPLE);
  const out = h("div", { id: "scan-output" });
  const button = h("button", { class: "primary", id: "scan-button", type: "submit" }, "Scan");
  main.append(
    h("div", { class: "page-head" }, h("h1", {}, "Scanner"), h("p", { class: "muted" }, "Which features fire on each token. Click a token to see its features; click a feature to highlight where it fires, or open it.")),
    h("form", { class: "card scan-form", onsubmit: (e) => { e.preventDefault(); scan(); } }, area, h("div", { class: "row end" }, button)),
    out);

  let seq = 0;

  async function scan() {
    const mine = ++seq; // a newer scan replaces the answer of an older one
    const text = area.value;
    localStorage.setItem(TEXT_STORAGE, text);
    button.disabled = true;
    clear(out).append(h("p", { class: "muted loading" }, "scanning…"));
    try {
      const r = await post("/api/scan", { text, sae: state.sae, top: 20, n_top_features: 30 });
      if (mine === seq) show(r);
    } catch (err) {
      if (mine === seq) clear(out).append(errorBox(err));
    } finally {
      button.disabled = false;
    }
  }

  function show(r) {
    clear(out);
    let selectedToken = -1;
    let selectedFeature = r.top.length ? r.top[0].id : null; // start with the strongest feature of the text
    // Default colour: per token, its most unusual activation (activation / the feature's corpus max), else the raw strongest.
    const hasFractions = r.tokens.some((t) => t.features.some((f) => f.fraction !== null));
    const strength = r.tokens.map((t) => (t.features.length ? Math.max(...t.features.map((f) => (hasFractions ? f.fraction || 0 : f.activation))) : 0));
    const corpusMax = Object.fromEntries(r.top.map((t) => [t.id, t.corpus_max_activation]));
    const textBox = h("div", { class: "scan-text", id: "scan-tokens" });
    const side = h("div", { class: "card scan-side", id: "token-features" }, h("p", { class: "muted" }, "Click a token."));
    const topList = h("ul", { class: "top-features", id: "top-features" });

    function actsFor(feature) {
      if (feature === null) return strength;
      return r.tokens.map((t) => {
        const hit = t.features.find((f) => f.id === feature);
        return hit ? hit.activation : 0;
      });
    }

    const caption = h("span", { class: "muted small", id: "scan-caption" });

    function paint() {
      caption.textContent = selectedFeature === null
        ? (hasFractions ? "colour: each token's strongest activation, as a share of that feature's max" : "colour: the strongest feature on each token")
        : `colour: feature #${selectedFeature} (click it again on the right to show all features)`;
      const acts = actsFor(selectedFeature);
      const scale = selectedFeature === null ? (hasFractions ? 1 : Math.max(1e-9, ...acts)) : corpusMax[selectedFeature] || Math.max(1e-9, ...acts);
      clear(textBox).append(tokens(r.tokens.map((t) => t.token), acts, scale, {
        selected: selectedToken,
        label: selectedFeature === null ? (hasFractions ? "strongest (share of max)" : "strongest feature") : `feature #${selectedFeature}`,
        onClick: (i) => { selectedToken = i; paint(); showToken_(i); },
      }));
      for (const li of topList.children) li.classList.toggle("active", Number(li.dataset.feature) === selectedFeature);
    }

    function showToken_(i) {
      const t = r.tokens[i];
      clear(side).append(
        h("h3", {}, "Token ", h("code", {}, showToken(t.token)), h("span", { class: "muted small" }, ` position ${t.position} · id ${t.token_id}`)),
        t.features.length ? h("ul", { class: "token-features" }, t.features.slice(0, 10).map((f) => h("li", {},
          h("span", { class: "act-bar", style: { width: `${Math.max(4, (f.activation / t.features[0].activation) * 60)}px` } }),
          h("span", { class: "act-value", title: f.fraction !== null ? `${Math.round(f.fraction * 100)}% of its max` : "" }, fmt(f.activation)),
          featureLink(f.id, f.label, r.sae),
          h("button", { class: "small ghost", title: "add to the equalizer", onclick: () => toast(addToEqualizer(f.id, f.label, r.sae) ? `feature #${f.id} added to the equalizer` : `#${f.id} is already in the equalizer`, "ok") }, "+")))) : h("p", { class: "muted" }, "No feature fires on this token."));
    }

    for (const f of r.top) {
      topList.append(h("li", { "data-feature": f.id, onclick: (e) => {
        if (e.target.closest("a")) return;
        selectedFeature = selectedFeature === f.id ? null : f.id;
        paint();
      } },
      h("span", { class: "act-value" }, fmt(f.max_activation)),
      h("span", { class: "feature-link", title: "highlight where it fires" },
        h("a", { class: "fid", href: `#/feature/${f.id}?sae=${encodeURIComponent(r.sae)}`, title: "open the feature" }, `#${f.id}`),
        h("span", { class: "flabel" }, f.label || "(no label)")),
      h("span", { class: "muted small count" }, `${f.n_tokens} tok`)));
    }

    if (r.notes.length) out.append(h("p", { class: "notice" }, r.notes.join("; ")));
    out.append(
      h("div", { class: "scan-grid" },
        h("div", { class: "card" }, h("div", { class: "row between" }, h("h3", {}, `${r.tokens.length} tokens`), caption), textBox),
        h("div", { class: "scan-right" }, side, h("div", { class: "card" }, h("h3", {}, "Strongest features in the text"), h("p", { class: "hint" }, "Click a row to highlight where it fires."), topList))));
    if (r.tokens.length) {
      selectedToken = r.top.length ? Math.max(0, r.top[0].position - 1) : strength.indexOf(Math.max(...strength));
      showToken_(selectedToken);
    }
    paint();
  }

  if (area.value.trim()) scan();
}
