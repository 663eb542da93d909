// Equalizer chat: one slider per chosen feature, a global strength, presets (saved, exported, imported);
// each prompt is answered twice with the same settings and seed, without and with steering, side by side: both
// requests are sent at once, and the server decodes them together as two rows of one batch.

import { get, post, stream } from "../api.js";
import {
  MODES, addToEqualizer, defaultValue, deletePreset, equalizer, exportPreset, onEqualizer, presets, replaceEqualizer,
  saveEqualizer, savePreset, state, steeringItems,
} from "../state.js";
import { clear, debounce, errorBox, featureLink, fmt, h, toast } from "../ui.js";

const SETTINGS_STORAGE = "monoscope.chatSettings";

function loadSettings() {
  const defaults = { max_tokens: 60, temperature: 0, seed: 0, compare: true, auto: true };
  try {
    return { ...defaults, ...(JSON.parse(localStorage.getItem(SETTINGS_STORAGE)) || {}) };
  } catch (_) {
    return defaults;
  }
}

const RANGES = {
  clamp: { min: -20, max: 20, step: 0.5, unit: "× max" },
  add: { min: -20, max: 20, step: 0.5, unit: "× max" },
  multiply: { min: -2, max: 10, step: 0.1, unit: "×" },
  ablate: null,
};

export async function renderChat(main) {
  const settings = loadSettings();
  const turns = []; // {user, replies: {unsteered: {text, node}, steered: {...}}}
  let controllers = [];

  // ---------------------------------------------------------------- equalizer panel

  const panel = h("aside", { class: "card equalizer", id: "equalizer" });
  const strengthValue = h("span", { class: "value", id: "strength-value" });
  const strength = h("input", { type: "range", min: -1, max: 3, step: 0.05, value: equalizer.strength, id: "strength", "aria-label": "global strength",
    oninput: () => { equalizer.strength = Number(strength.value); strengthValue.textContent = `${fmt(equalizer.strength)}×`; saveEqualizer("value"); } });
  strengthValue.textContent = `${fmt(equalizer.strength)}×`;
  const items = h("div", { class: "eq-items", id: "eq-items" });
  const addBox = featurePicker();
  const towardBox = towardPicker();
  const presetBar = presetControls();
  panel.append(
    h("div", { class: "row between" }, h("h3", {}, "Equalizer"), h("button", { class: "small ghost", title: "remove every feature", onclick: () => { equalizer.items.splice(0); equalizer.strength = 1; strength.value = 1; strengthValue.textContent = "1×"; saveEqualizer("remove"); } }, "reset")),
    h("div", { class: "strength" }, h("label", { for: "strength" }, "strength"), strength, strengthValue),
    towardBox, addBox, items, presetBar);

  const looked = new Set(); // features whose label was looked up (found or not)
  const key = (it) => `${it.sae || state.sae}:${it.feature}`;

  async function fillLabels() {
    // items imported or saved without labels: look them up once
    const missing = equalizer.items.filter((it) => !it.label && !looked.has(key(it)));
    const bySae = {};
    for (const it of missing) {
      looked.add(key(it));
      (bySae[it.sae || state.sae] = bySae[it.sae || state.sae] || []).push(it);
    }
    let found = false;
    for (const [sae, list] of Object.entries(bySae)) {
      try {
        const r = await get("/api/features", { sae, ids: list.map((it) => it.feature).join(",") });
        const labels = Object.fromEntries(r.features.map((f) => [f.id, f.label]));
        list.forEach((it) => { if (labels[it.feature]) { it.label = labels[it.feature]; found = true; } });
      } catch (_) { /* unknown ids: left unlabelled */ }
    }
    if (found) saveEqualizer("labels");
  }

  function renderItems() {
    if (equalizer.items.some((it) => !it.label && !looked.has(key(it)))) fillLabels();
    clear(items);
    if (!equalizer.items.length) {
      items.append(h("p", { class: "muted empty" }, "No features yet. Add one by searching above, or with “Steer with this feature” on a feature page."));
      return;
    }
    equalizer.items.forEach((it, index) => items.append(itemRow(it, index)));
  }

  function itemRow(it, index) {
    const range = RANGES[it.mode];
    const valueLabel = h("span", { class: "value" });
    const showValue = () => { valueLabel.textContent = it.mode === "ablate" ? "off" : `${fmt(it.value)}${range.unit}`; };
    showValue();
    const slider = range ? h("input", { type: "range", min: range.min, max: range.max, step: range.step, value: it.value, "aria-label": `value of feature ${it.feature}`,
      oninput: () => { it.value = Number(slider.value); showValue(); saveEqualizer("value"); } }) : h("div", { class: "slider-off" }, "feature removed from the activations");
    const mode = h("select", { "aria-label": `mode of feature ${it.feature}`, onchange: () => {
      it.mode = mode.value;
      it.value = defaultValue(it.mode);
      saveEqualizer("mode");
    } }, MODES.map((m) => h("option", { value: m, selected: m === it.mode }, m)));
    const enabled = h("input", { type: "checkbox", checked: it.enabled, title: "on/off", "aria-label": `feature ${it.feature} on`, onchange: () => { it.enabled = enabled.checked; saveEqualizer("value"); row.classList.toggle("off", !it.enabled); } });
    const row = h("div", { class: "eq-item" + (it.enabled ? "" : " off"), "data-feature": it.feature },
      h("div", { class: "row between eq-item-head" },
        h("label", { class: "row" }, enabled, featureLink(it.feature, it.label, it.sae || state.sae)),
        h("button", { class: "icon ghost", title: "remove", "aria-label": `remove feature ${it.feature}`, onclick: () => { equalizer.items.splice(index, 1); saveEqualizer("remove"); } }, "×")),
      h("div", { class: "row eq-controls" }, mode, slider, valueLabel));
    return row;
  }

  function featurePicker() {
    const input = h("input", { type: "search", placeholder: "add a feature: search labels or type an id", id: "eq-search", "aria-label": "add a feature" });
    const list = h("ul", { class: "picker", id: "eq-results", hidden: true });
    const run = debounce(async () => {
      const q = input.value.trim();
      clear(list);
      if (!q) { list.hidden = true; return; }
      const rows = [];
      if (/^\d+$/.test(q)) {
        try {
          const r = await get("/api/features", { ids: q, sae: state.sae });
          rows.push(...r.features.map((f) => ({ id: f.id, label: f.label })));
        } catch (_) { /* not a feature id */ }
      }
      try {
        const r = await get("/api/search", { q, sae: state.sae, limit: 8 });
        rows.push(...r.hits.filter((x) => !rows.some((y) => y.id === x.id)).map((x) => ({ id: x.id, label: x.label })));
      } catch (_) { /* no matches */ }
      clear(list);
      list.hidden = false;
      if (!rows.length) list.append(h("li", { class: "muted" }, "no match"));
      for (const r of rows.slice(0, 8)) {
        list.append(h("li", { class: "pick", "data-feature": r.id, onclick: () => {
          if (!addToEqualizer(r.id, r.label, state.sae)) toast(`#${r.id} is already in the equalizer`);
          input.value = "";
          list.hidden = true;
        } }, h("span", { class: "fid" }, `#${r.id}`), " ", h("span", { class: "flabel" }, r.label || "(no label)")));
      }
    }, 200);
    input.addEventListener("input", run);
    input.addEventListener("keydown", (e) => { if (e.key === "Escape") { input.value = ""; list.hidden = true; } });
    return h("div", { class: "picker-box" }, input, list);
  }

  // "steer toward a concept": the server tries features by generation and returns the group that moves the
  // completions toward it (at the generated positions); it replaces the equalizer's items.
  function towardPicker() {
    const input = h("input", { type: "text", placeholder: "steer toward a concept, e.g. the ocean", id: "eq-toward", "aria-label": "steer toward a concept" });
    const status = h("p", { class: "muted small", id: "eq-toward-status" });
    const button = h("button", { class: "small primary", id: "eq-toward-go", onclick: () => go() }, "find");
    async function go() {
      const concept = input.value.trim();
      if (!concept) { status.textContent = "type a concept first"; return; }
      button.disabled = true;
      status.textContent = `trying features for “${concept}” (about a minute)…`;
      try {
        const r = await post("/api/suggest", { concept, sae: state.sae, method: "features" });
        if (!r.works) {
          status.textContent = (r.notes.join(" ") || `nothing found steers toward “${concept}”.`) + " The CLI's learned vector may work: monoscope steer --toward … --method vector";
          return;
        }
        const fresh = r.features.filter((f) => f.multiple !== null).map((f) => ({ sae: state.sae, feature: f.feature, label: f.label, mode: "add",
          value: Math.round(f.multiple * 100) / 100, positions: r.positions, enabled: true }));
        equalizer.items.splice(0, equalizer.items.length, ...fresh);
        saveEqualizer("load");
        status.textContent = `${fresh.length} feature${fresh.length === 1 ? "" : "s"} (${r.kind}): closeness ${fmt(r.unsteered_similarity)} → ${fmt(r.similarity)}, perplexity ×${fmt(r.perplexity_ratio)}`;
      } catch (err) {
        status.textContent = err.message || String(err);
      } finally {
        button.disabled = false;
      }
    }
    input.addEventListener("keydown", (e) => { if (e.key === "Enter") go(); });
    return h("div", { class: "toward-box" }, h("div", { class: "row" }, input, button), status);
  }

  function presetControls() {
    const select = h("select", { id: "preset-select", "aria-label": "presets" });
    const name = h("input", { type: "text", placeholder: "preset name", id: "preset-name", "aria-label": "preset name" });
    function fill() {
      clear(select).append(h("option", { value: "" }, "saved presets…"), Object.keys(presets()).sort().map((n) => h("option", { value: n }, n)));
    }
    fill();
    const dialog = h("dialog", { class: "preset-dialog", id: "preset-dialog" });
    function openDialog(mode) {
      const text = h("textarea", { rows: 14, id: "preset-json", spellcheck: "false" }, mode === "export" ? exportPreset(select.value || name.value || "equalizer") : "");
      const file = h("input", { type: "file", accept: "application/json,.json", onchange: async () => { if (file.files[0]) text.value = await file.files[0].text(); } });
      clear(dialog).append(h("form", { method: "dialog" },
        h("h3", {}, mode === "export" ? "Share this equalizer" : "Import an equalizer"),
        h("p", { class: "muted" }, mode === "export" ? "Copy the JSON, or download it; anyone can import it here." : "Paste a preset's JSON or choose a file."),
        text,
        mode === "import" ? file : null,
        h("div", { class: "row end" },
          h("button", { type: "button", class: "ghost", onclick: () => dialog.close() }, "Close"),
          mode === "export" ? h("button", { type: "button", class: "ghost", onclick: async () => { try { await navigator.clipboard.writeText(text.value); toast("copied", "ok"); } catch (_) { text.select(); } } }, "Copy") : null,
          mode === "export" ? h("button", { type: "button", class: "primary", onclick: () => {
            const a = h("a", { href: URL.createObjectURL(new Blob([text.value], { type: "application/json" })), download: `${(select.value || name.value || "equalizer").replace(/[^\w.-]+/g, "_")}.json` });
            document.body.append(a); a.click(); a.remove();
          } }, "Download") : h("button", { type: "button", class: "primary", id: "preset-load", onclick: () => {
            try {
              replaceEqualizer(JSON.parse(text.value));
              strength.value = equalizer.strength;
              strengthValue.textContent = `${fmt(equalizer.strength)}×`;
              dialog.close();
              toast("equalizer imported", "ok");
            } catch (err) {
              toast(`cannot import: ${err.message}`, "error");
            }
          } }, "Import"))));
      dialog.showModal();
    }
    return h("div", { class: "presets" },
      h("h4", {}, "Presets"),
      h("div", { class: "row" }, select,
        h("button", { class: "small ghost", onclick: () => {
          const p = presets()[select.value];
          if (!p) return;
          replaceEqualizer(p);
          strength.value = equalizer.strength;
          strengthValue.textContent = `${fmt(equalizer.strength)}×`;
          toast(`preset “${select.value}” loaded`, "ok");
        } }, "load"),
        h("button", { class: "small ghost", onclick: () => { if (select.value) { deletePreset(select.value); fill(); } } }, "delete")),
      h("div", { class: "row" }, name, h("button", { class: "small", id: "preset-save", onclick: () => {
        const n = name.value.trim();
        if (!n) { toast("give the preset a name", "error"); return; }
        savePreset(n);
        fill();
        select.value = n;
        name.value = "";
        toast(`preset “${n}” saved`, "ok");
      } }, "save")),
      h("div", { class: "row" },
        h("button", { class: "small ghost", id: "preset-export", onclick: () => openDialog("export") }, "export JSON"),
        h("button", { class: "small ghost", id: "preset-import", onclick: () => openDialog("import") }, "import JSON")),
      dialog);
  }

  // ---------------------------------------------------------------- chat

  const transcript = h("div", { class: "transcript", id: "transcript" });
  const input = h("textarea", { id: "chat-input", rows: 2, placeholder: "Say something… (Enter sends, Shift+Enter for a new line)", "aria-label": "message" });
  const send = h("button", { class: "primary", id: "send-button", type: "submit" }, "Send");
  const stop = h("button", { class: "ghost", id: "stop-button", type: "button", disabled: true, onclick: () => abortAll() }, "Stop");
  const rerun = h("button", { class: "ghost", id: "rerun-button", type: "button", onclick: () => rerunLast(true) }, "Re-run last");
  const clearButton = h("button", { class: "ghost", type: "button", onclick: () => { abortAll(); turns.splice(0); clear(transcript).append(emptyNote()); } }, "Clear");

  const num = (key, attrs) => h("input", { type: "number", value: settings[key], ...attrs, onchange: (e) => { settings[key] = Number(e.target.value); persist(); } });
  const check = (key, label, id) => h("label", { class: "check" }, h("input", { type: "checkbox", id, checked: settings[key], onchange: (e) => { settings[key] = e.target.checked; persist(); } }), label);
  const settingsBar = h("div", { class: "settings row" },
    h("label", {}, "max tokens", num("max_tokens", { min: 1, max: state.info ? state.info.limits.max_tokens : 1024, id: "max-tokens" })),
    h("label", {}, "temperature", num("temperature", { min: 0, max: 2, step: 0.1, id: "temperature" })),
    h("label", {}, "seed", num("seed", { min: 0, step: 1, id: "seed" })),
    check("compare", "compare with unsteered", "compare"),
    check("auto", "re-run when the equalizer changes", "auto-rerun"));

  function persist() {
    localStorage.setItem(SETTINGS_STORAGE, JSON.stringify(settings));
  }

  function emptyNote() {
    return h("div", { class: "empty-chat muted" }, h("p", {}, "Pick features in the equalizer, then chat: each message is answered twice, with the same seed — without steering on the left, with it on the right."));
  }
  transcript.append(emptyNote());

  const form = h("form", { class: "composer", onsubmit: (e) => { e.preventDefault(); submit(); } },
    input, h("div", { class: "row end" }, clearButton, rerun, stop, send));
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); submit(); }
  });

  main.append(
    h("div", { class: "page-head" }, h("h1", {}, "Equalizer chat"), h("p", { class: "muted" }, `Steer ${state.info ? state.info.model : "the model"} by turning features up, down or off.`)),
    h("div", { class: "chat-layout" },
      h("section", { class: "card chat" }, settingsBar, transcript, form),
      panel));

  function replyBox(kind) {
    const text = h("div", { class: "reply-text" });
    const status = h("span", { class: "reply-status" });
    const node = h("div", { class: `reply ${kind}`, "data-state": "waiting" },
      h("div", { class: "reply-head" }, h("span", { class: "reply-title" }, kind === "steered" ? "Steered" : "Unsteered"), status), text);
    return { node, text, status, value: "" };
  }

  function history(kind, upto) {
    const messages = [];
    for (const t of turns.slice(0, upto)) {
      messages.push({ role: "user", content: t.user });
      const reply = t.replies[kind] || t.replies.steered;
      messages.push({ role: "assistant", content: reply.value });
    }
    return messages;
  }

  async function generate(turnIndex, kind) {
    const turn = turns[turnIndex];
    const box = turn.replies[kind];
    const controller = new AbortController();
    controllers.push(controller);
    box.value = "";
    box.text.textContent = "";
    box.node.dataset.state = "streaming";
    box.status.textContent = "…";
    const steering = kind === "steered" ? steeringItems() : [];
    const body = {
      model: state.info ? state.info.model : undefined,
      messages: [...history(kind, turnIndex), { role: "user", content: turn.user }],
      max_tokens: settings.max_tokens, temperature: settings.temperature, seed: settings.seed,
      steering, steering_strength: kind === "steered" ? equalizer.strength : 1,
    };
    if (kind === "steered") box.status.textContent = steering.length ? `${steering.length} feature${steering.length === 1 ? "" : "s"}, strength ${fmt(equalizer.strength)}` : "no features on";
    try {
      const end = await stream("/v1/chat/completions", body, (delta) => {
        box.value += delta;
        box.text.textContent = box.value;
        transcript.scrollTop = transcript.scrollHeight;
      }, controller.signal);
      box.node.dataset.state = "done";
      const n = end.usage ? end.usage.completion_tokens : null;
      box.status.textContent = `${kind === "steered" && steering.length ? box.status.textContent + " · " : ""}${n !== null ? `${n} tokens` : ""}${end.finish_reason === "length" ? " (max)" : ""}`;
    } catch (err) {
      box.node.dataset.state = err.name === "AbortError" ? "stopped" : "error";
      if (err.name === "AbortError") box.status.textContent = "stopped";
      else box.text.replaceWith(box.text = errorBox(err));
    } finally {
      controllers = controllers.filter((c) => c !== controller);
      stop.disabled = controllers.length === 0;
    }
  }

  function abortAll() {
    for (const c of controllers) c.abort();
    controllers = [];
    stop.disabled = true;
  }

  async function runTurn(index, kinds) {
    stop.disabled = false;
    await Promise.all(kinds.map((k) => generate(index, k)));
  }

  function submit() {
    const text = input.value.trim();
    if (!text) return;
    input.value = "";
    if (!turns.length) clear(transcript);
    const replies = { steered: replyBox("steered") };
    if (settings.compare) replies.unsteered = replyBox("unsteered");
    const turn = { user: text, replies };
    turns.push(turn);
    transcript.append(
      h("div", { class: "turn" },
        h("div", { class: "user-msg" }, text),
        h("div", { class: settings.compare ? "replies two" : "replies" }, replies.unsteered ? replies.unsteered.node : null, replies.steered.node)));
    transcript.scrollTop = transcript.scrollHeight;
    runTurn(turns.length - 1, Object.keys(replies));
  }

  function rerunLast(all) {
    if (!turns.length) return;
    const last = turns.length - 1;
    for (const c of controllers) c.abort();
    controllers = [];
    runTurn(last, all ? Object.keys(turns[last].replies) : ["steered"]);
  }

  const autoRerun = debounce(() => { if (settings.auto) rerunLast(false); }, 350);
  const unsubscribe = onEqualizer((reason) => {
    if (reason !== "value") renderItems();
    if (reason !== "labels") autoRerun();
  });
  renderItems();
  return () => { unsubscribe(); abortAll(); };
}
