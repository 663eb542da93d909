// A feature's page: label and scores, examples with highlighted tokens, histogram, logit effects, neighbours.

import { get } from "../api.js";
import { addToEqualizer, saeInfo, state } from "../state.js";
import { errorBox, featureLink, fmt, h, histogram, navigate, pct, showToken, toast, tokens } from "../ui.js";

function exampleRow(ex, scale) {
  return h("div", { class: "example" },
    h("span", { class: "example-act", title: "max activation in this excerpt" }, fmt(ex.max_activation)),
    tokens(ex.tokens, ex.activations, scale, { peak: ex.peak }));
}

function effectList(title, items, kind) {
  const max = Math.max(1e-12, ...items.map((t) => Math.abs(t.value)));
  return h("div", { class: "effects" },
    h("h4", {}, title),
    items.length ? h("ul", { class: "effect-list" }, items.map((t) =>
      h("li", {},
        h("code", { class: "effect-token" }, showToken(t.token)),
        h("span", { class: `effect-bar ${kind}`, style: { width: `${(Math.abs(t.value) / max) * 100}%` } }),
        h("span", { class: "effect-value" }, (t.value > 0 ? "+" : "") + fmt(t.value))))) : h("p", { class: "muted" }, "none"));
}

function scoreChips(label) {
  if (!label) return [];
  const chips = [];
  for (const [key, name] of [["detection", "detection"], ["fuzzing", "fuzzing"], ["embedding_score", "embedding"]]) {
    if (label[key] === null || label[key] === undefined) continue;
    const held = key === "embedding_score" && label.source.startsWith("heuristic");
    const title = held ? "how well the label's embedding tells held-out examples (not used to make it) from random text (0.5 = chance, 1 = perfect)"
      : `${name} score of the label (0.5 = chance, 1 = perfect)`;
    chips.push(h("span", { class: "chip score", title, "data-score": key }, `${name}${held ? " (held out)" : ""} ${label[key].toFixed(2)}`));
  }
  return chips;
}

export async function renderFeature(main, { args, params }) {
  const id = Number(args[0]);
  const sae = params.get("sae") || state.sae;
  const info = saeInfo(sae);
  if (!Number.isInteger(id) || id < 0) {
    main.append(errorBox(new Error("give a feature id, e.g. #/feature/12")));
    return;
  }
  main.append(h("p", { class: "muted loading" }, `loading feature ${id}…`));
  let d;
  try {
    d = await get(`/api/features/${id}`, { sae });
  } catch (err) {
    main.lastChild.remove();
    main.append(errorBox(err));
    return;
  }
  main.lastChild.remove();
  const f = d.feature;
  const shown = d.labels.find((l) => l.text === f.label && l.source === f.label_source) || null;
  const last = info ? info.d_sae - 1 : id + 1;
  const scale = f.max_activation || 1;

  const steerButton = h("button", { class: "primary", id: "steer-button", onclick: () => {
    const added = addToEqualizer(id, f.label, d.sae);
    toast(added ? `feature #${id} added to the equalizer` : `feature #${id} is already in the equalizer`, added ? "ok" : "info");
  } }, "+ Steer with this feature");

  main.append(
    h("section", { class: "feature-head card" },
      h("div", { class: "feature-title" },
        h("div", {},
          h("div", { class: "eyebrow" }, `SAE ${d.sae} · feature`),
          h("h1", {}, `#${id}`, f.dead ? h("span", { class: "chip warn" }, "dead") : null),
          h("p", { class: "feature-label", id: "feature-label" }, f.label || h("span", { class: "muted" }, "no label yet")),
          h("div", { class: "chips" },
            f.label_source ? h("span", { class: "chip" }, `label: ${f.label_source}`) : null,
            ...scoreChips(shown))),
        h("div", { class: "feature-actions" },
          steerButton,
          h("a", { class: "button ghost", href: "#/chat" }, "Open equalizer →"),
          h("div", { class: "row" },
            h("button", { class: "ghost", disabled: id <= 0, onclick: () => navigate(`#/feature/${id - 1}?sae=${encodeURIComponent(d.sae)}`) }, "← prev"),
            h("button", { class: "ghost", disabled: id >= last, onclick: () => navigate(`#/feature/${id + 1}?sae=${encodeURIComponent(d.sae)}`) }, "next →")))),
      h("div", { class: "stats" },
        stat("density", pct(f.density), f.density > 0 ? `1 in ${Math.round(1 / f.density).toLocaleString()} tokens` : "never fired"),
        stat("max activation", fmt(f.max_activation)),
        stat("mean when active", fmt(f.mean_activation)),
        stat("contexts", f.n_contexts.toLocaleString(), `of the analysed text (${d.tokens_analysed.toLocaleString()} tokens)`))),
  );

  const grid = h("div", { class: "feature-grid" });
  grid.append(
    h("section", { class: "card span2" },
      h("h3", {}, "Top activations"),
      h("p", { class: "hint" }, "Excerpts around the strongest activations; the stronger the orange, the stronger the feature fires. Hover a token for its value."),
      h("div", { class: "examples", id: "top-examples" }, d.top_examples.length ? d.top_examples.map((ex) => exampleRow(ex, scale)) : h("p", { class: "muted" }, "It never fired in the analysed text."))),
    h("section", { class: "card" },
      h("h3", {}, "Activation histogram"),
      h("p", { class: "hint" }, `${f.n_active.toLocaleString()} tokens with a non-zero activation (density ${pct(f.density)}).`),
      histogram(d.histogram.edges, d.histogram.counts)),
    h("section", { class: "card" },
      h("h3", {}, "Logit effects"),
      h("p", { class: "hint" }, "Tokens its decoder direction pushes up and down through the unembedding."),
      h("div", { class: "effects-grid" }, effectList("Promotes", d.logits_up, "up"), effectList("Suppresses", d.logits_down, "down"))),
  );

  const bins = {};
  for (const ex of d.quantile_examples) (bins[ex.bin] = bins[ex.bin] || []).push(ex);
  const binIds = Object.keys(bins).map(Number).sort((a, b) => b - a);
  grid.append(h("section", { class: "card span2" },
    h("h3", {}, "Examples across the activation range"),
    h("p", { class: "hint" }, "Sampled from quantile intervals of its non-zero activations, highest first: what weaker activations look like."),
    binIds.length ? binIds.map((b) => h("div", { class: "quantile" },
      h("div", { class: "quantile-title" }, `interval ${b + 1} of ${binIds.length ? Math.max(...binIds) + 1 : 0}`),
      bins[b].map((ex) => exampleRow(ex, scale)))) : h("p", { class: "muted" }, "no examples")));

  grid.append(h("section", { class: "card" },
    h("h3", {}, "Neighbours"),
    h("p", { class: "hint" }, "Nearest features by the cosine of their decoder directions."),
    d.neighbours.length ? h("ul", { class: "neighbours" }, d.neighbours.map((n) =>
      h("li", {},
        h("span", { class: `cos ${n.cosine < 0 ? "neg" : ""}`, title: "cosine" }, n.cosine.toFixed(2)),
        featureLink(n.id, n.label, d.sae)))) : h("p", { class: "muted" }, "none")));

  grid.append(h("section", { class: "card" },
    h("h3", {}, "Labels"),
    d.labels.length ? h("table", { class: "table compact" },
      h("thead", {}, h("tr", {}, h("th", {}, "label"), h("th", {}, "source"), h("th", {}, "scores"))),
      h("tbody", {}, d.labels.map((l) => h("tr", {},
        h("td", {}, l.text),
        h("td", {}, h("span", { class: "chip" }, l.source)),
        h("td", {}, scoreChips(l).length ? scoreChips(l) : h("span", { class: "muted" }, "–")))))) : h("p", { class: "muted" }, "none")));

  main.append(grid);
  const others = state.info ? state.info.saes.filter((s) => s.id !== d.sae && s.d_in === (info ? info.d_in : s.d_in)) : [];
  if (others.length) grid.append(await familyCard(id, d.sae));
}

// The feature's family: its closest features (decoder cosine) in the other SAEs served with this one.
async function familyCard(id, sae) {
  const card = h("section", { class: "card span2", id: "family" },
    h("h3", {}, "Family in other SAEs"),
    h("p", { class: "hint" }, "Closest features by decoder cosine in the other SAEs of the same hook point: in a wider SAE a feature often splits into several narrower ones."));
  let fam;
  try {
    fam = await get(`/api/features/${id}/family`, { sae });
  } catch (err) {
    card.append(errorBox(err));
    return card;
  }
  if (!fam.across.length) {
    card.append(h("p", { class: "muted" }, "No other served SAE reads the same hook point."));
    return card;
  }
  for (const part of fam.across) {
    const mark = part.matches.map((m) => m.id).join(",");
    card.append(h("div", { class: "family-part" },
      h("div", { class: "row between" },
        h("h4", {}, `${part.sae} · ${part.d_sae.toLocaleString()} features`),
        h("a", { class: "button ghost small", href: `#/map?sae=${encodeURIComponent(part.sae)}&mark=${mark}&why=${encodeURIComponent(`family of #${id} in ${sae}`)}` }, "colour on its map")),
      h("ul", { class: "neighbours" }, part.matches.map((m) => h("li", {},
        h("span", { class: `cos ${m.cosine < 0 ? "neg" : ""}`, title: "decoder cosine" }, m.cosine.toFixed(2)),
        featureLink(m.id, m.label, part.sae))))));
  }
  return card;
}

function stat(name, value, note) {
  return h("div", { class: "stat" }, h("div", { class: "stat-value" }, value), h("div", { class: "stat-name" }, name), note ? h("div", { class: "stat-note" }, note) : null);
}
