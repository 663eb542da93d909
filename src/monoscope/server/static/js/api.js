// HTTP helpers: JSON requests with the optional API key, and OpenAI-style server-sent event streams.

const KEY_STORAGE = "monoscope.apiKey";

export class ApiError extends Error {
  constructor(status, message, code) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export function apiKey() {
  return localStorage.getItem(KEY_STORAGE) || "";
}

export function setApiKey(key) {
  if (key) localStorage.setItem(KEY_STORAGE, key);
  else localStorage.removeItem(KEY_STORAGE);
}

function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  const key = apiKey();
  if (key) h["Authorization"] = `Bearer ${key}`;
  return h;
}

async function failure(resp) {
  let message = `${resp.status} ${resp.statusText}`;
  let code = null;
  try {
    const body = await resp.json();
    if (body && body.error) {
      message = body.error.message || message;
      code = body.error.code || null;
    }
  } catch (_) { /* not JSON */ }
  if (resp.status === 401) window.dispatchEvent(new CustomEvent("monoscope:unauthorised"));
  return new ApiError(resp.status, message, code);
}

export async function get(path, params = {}) {
  const query = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) {
    if (v !== undefined && v !== null && v !== "") query.set(k, v);
  }
  const url = query.toString() ? `${path}?${query}` : path;
  const resp = await fetch(url, { headers: headers(false) });
  if (!resp.ok) throw await failure(resp);
  return resp.json();
}

export async function post(path, body, signal) {
  const resp = await fetch(path, { method: "POST", headers: headers(true), body: JSON.stringify(body), signal });
  if (!resp.ok) throw await failure(resp);
  return resp.json();
}

// POST an OpenAI streaming request; calls onDelta(text) for each content delta; resolves to the final
// {finish_reason, usage} once `data: [DONE]` arrives.
export async function stream(path, body, onDelta, signal) {
  const resp = await fetch(path, { method: "POST", headers: headers(true), body: JSON.stringify({ ...body, stream: true, stream_options: { include_usage: true } }), signal });
  if (!resp.ok) throw await failure(resp);
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let finish = null;
  let usage = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return { finish_reason: finish, usage };
        const chunk = JSON.parse(data);
        if (chunk.error) throw new ApiError(500, chunk.error.message, chunk.error.code);
        if (chunk.usage) usage = chunk.usage;
        for (const choice of chunk.choices || []) {
          const text = choice.delta ? choice.delta.content : choice.text;
          if (text) onDelta(text);
          if (choice.finish_reason) finish = choice.finish_reason;
        }
      }
    }
  }
  return { finish_reason: finish, usage };
}
