// Shared state: server info, the chosen SAE, and the equalizer (persisted in localStorage), with presets.

const EQ_STORAGE = "monoscope.equalizer";
const PRESET_STORAGE = "monoscope.presets";
const SAE_STORAGE = "monoscope.sae";

export const MODES = ["clamp", "add", "multiply", "ablate"];

export const state = {
  info: null,
  sae: localStorage.getItem(SAE_STORAGE) || null,
};

export function setInfo(info) {
  state.info = info;
  const ids = info.saes.map((s) => s.id);
  if (!state.sae || !ids.includes(state.sae)) state.sae = ids[0] || null;
}

export function setSae(id) {
  state.sae = id;
  localStorage.setItem(SAE_STORAGE, id);
  window.dispatchEvent(new CustomEvent("monoscope:sae"));
}

export function saeInfo(id = state.sae) {
  return state.info ? state.info.saes.find((s) => s.id === id) : null;
}

// ---------------------------------------------------------------- the equalizer

// item: {sae, feature, label, mode, value, enabled, positions}; positions (all/prompt/generated) only when set,
// e.g. by "steer toward"; value is in multiples of the feature's max activation
// for clamp and add ("8x"), a plain factor for multiply, unused for ablate.
function load() {
  try {
    const saved = JSON.parse(localStorage.getItem(EQ_STORAGE));
    if (saved && Array.isArray(saved.items)) return normalise(saved);
  } catch (_) { /* fall through */ }
  return { strength: 1, items: [] };
}

export function defaultValue(mode) {
  return mode === "multiply" ? 2 : mode === "ablate" ? 0 : 4;
}

export function normalise(preset) {
  if (!preset || typeof preset !== "object" || !Array.isArray(preset.items)) throw new Error("a preset is an object with an `items` list");
  const items = preset.items.map((it, i) => {
    const feature = Number(it.feature);
    if (!Number.isInteger(feature) || feature < 0) throw new Error(`item ${i + 1}: feature must be a whole number >= 0`);
    const mode = MODES.includes(it.mode) ? it.mode : "clamp";
    let value = Number(it.value === undefined ? defaultValue(mode) : it.value);
    if (!Number.isFinite(value)) throw new Error(`item ${i + 1}: value must be a number`);
    const positions = ["all", "prompt", "generated"].includes(it.positions) ? it.positions : null;
    return { sae: it.sae || null, feature, label: it.label || null, mode, value, enabled: it.enabled !== false, positions };
  });
  const strength = Number(preset.strength === undefined ? 1 : preset.strength);
  if (!Number.isFinite(strength)) throw new Error("strength must be a number");
  return { strength, items };
}

export const equalizer = load();
const listeners = new Set();

export function onEqualizer(fn) {
  listeners.add(fn);
  return () => listeners.delete(fn);
}

export function saveEqualizer(reason = "change") {
  localStorage.setItem(EQ_STORAGE, JSON.stringify(equalizer));
  for (const fn of listeners) fn(reason);
}

export function addToEqualizer(feature, label, sae = state.sae, mode = "clamp") {
  const existing = equalizer.items.find((it) => it.feature === feature && (it.sae || state.sae) === sae);
  if (existing) return false;
  equalizer.items.push({ sae, feature, label: label || null, mode, value: defaultValue(mode), enabled: true });
  saveEqualizer("add");
  return true;
}

export function replaceEqualizer(preset) {
  const clean = normalise(preset);
  equalizer.strength = clean.strength;
  equalizer.items.splice(0, equalizer.items.length, ...clean.items);
  saveEqualizer("load");
}

// The `steering` list of a request for the current equalizer.
export function steeringItems() {
  const several = state.info && state.info.saes.length > 1;
  return equalizer.items
    .filter((it) => it.enabled)
    .map((it) => {
      const item = { feature: it.feature, mode: it.mode };
      if (it.mode === "clamp" || it.mode === "add") item.value = `${it.value}x`;
      else if (it.mode === "multiply") item.value = it.value;
      if (several || it.sae) item.sae = it.sae || state.sae;
      if (it.positions) item.positions = it.positions;
      return item;
    });
}

// ---------------------------------------------------------------- presets

export function presets() {
  try {
    return JSON.parse(localStorage.getItem(PRESET_STORAGE)) || {};
  } catch (_) {
    return {};
  }
}

export function savePreset(name) {
  const all = presets();
  all[name] = JSON.parse(JSON.stringify({ strength: equalizer.strength, items: equalizer.items }));
  localStorage.setItem(PRESET_STORAGE, JSON.stringify(all));
}

export function deletePreset(name) {
  const all = presets();
  delete all[name];
  localStorage.setItem(PRESET_STORAGE, JSON.stringify(all));
}

export function exportPreset(name) {
  const body = { format: "monoscope-equalizer/1", name: name || "equalizer", model: state.info ? state.info.model : null, strength: equalizer.strength, items: equalizer.items };
  return JSON.stringify(body, null, 2);
}
