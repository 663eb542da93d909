// The API reference at /docs, rendered from /openapi.json without any external asset.

import { clear, h } from "./ui.js";

const METHOD_ORDER = ["get", "post", "put", "patch", "delete"];

function refName(ref) {
  return ref.split("/").pop();
}

function typeOf(schema) {
  if (!schema) return "any";
  if (schema.$ref) return h("a", { href: `#schema-${refName(schema.$ref)}` }, refName(schema.$ref));
  if (schema.anyOf) return joinTypes(schema.anyOf.map(typeOf), " | ");
  if (schema.oneOf) return joinTypes(schema.oneOf.map(typeOf), " | ");
  if (schema.type === "array") return h("span", {}, "list[", typeOf(schema.items), "]");
  if (schema.enum) return schema.enum.map((v) => JSON.stringify(v)).join(" | ");
  if (schema.const !== undefined) return JSON.stringify(schema.const);
  return schema.type || "any";
}

function joinTypes(parts, sep) {
  const out = h("span", {});
  parts.forEach((p, i) => { if (i) out.append(sep); out.append(p); });
  return out;
}

function constraints(s) {
  const out = [];
  for (const [key, label] of [["minimum", "≥"], ["exclusiveMinimum", ">"], ["maximum", "≤"], ["exclusiveMaximum", "<"], ["minLength", "min length"], ["maxLength", "max length"], ["minItems", "min items"], ["maxItems", "max items"], ["pattern", "pattern"]]) {
    if (s[key] !== undefined) out.push(`${label} ${s[key]}`);
  }
  if (s.default !== undefined) out.push(`default ${JSON.stringify(s.default)}`);
  return out.join(", ");
}

function propsTable(schema) {
  const props = schema.properties || {};
  const required = new Set(schema.required || []);
  return h("table", { class: "table compact" },
    h("thead", {}, h("tr", {}, h("th", {}, "field"), h("th", {}, "type"), h("th", {}, "notes"))),
    h("tbody", {}, Object.entries(props).map(([name, p]) => h("tr", {},
      h("td", {}, h("code", {}, name), required.has(name) ? h("span", { class: "chip warn" }, "required") : null),
      h("td", {}, h("code", {}, typeOf(p))),
      h("td", {}, p.description || "", " ", h("span", { class: "muted small" }, constraints(p)))))));
}

async function main() {
  const root = document.getElementById("docs");
  const spec = await (await fetch("/openapi.json")).json();
  clear(root).append(
    h("div", { class: "page-head" }, h("h1", {}, `${spec.info.title} API ${spec.info.version}`), h("p", { class: "muted" }, spec.info.description)),
  );
  const byTag = {};
  for (const [path, ops] of Object.entries(spec.paths)) {
    for (const method of METHOD_ORDER) {
      const op = ops[method];
      if (!op) continue;
      const tag = (op.tags || ["other"])[0];
      (byTag[tag] = byTag[tag] || []).push({ path, method, op });
    }
  }
  for (const tag of (spec.tags || []).map((t) => t.name).concat(Object.keys(byTag)).filter((t, i, all) => all.indexOf(t) === i && byTag[t])) {
    const info = (spec.tags || []).find((t) => t.name === tag);
    root.append(h("h2", { class: "docs-tag" }, tag), info ? h("p", { class: "muted" }, info.description) : null);
    for (const { path, method, op } of byTag[tag]) {
      const params = op.parameters || [];
      const body = op.requestBody && op.requestBody.content["application/json"];
      root.append(h("details", { class: "card endpoint", id: `${method}-${path}` },
        h("summary", {}, h("span", { class: `method ${method}` }, method.toUpperCase()), h("code", {}, path), h("span", { class: "muted" }, op.summary || "")),
        op.description ? h("p", {}, op.description) : null,
        params.length ? [h("h4", {}, "parameters"), h("table", { class: "table compact" }, h("tbody", {}, params.map((p) => h("tr", {},
          h("td", {}, h("code", {}, p.name), " ", h("span", { class: "muted small" }, p.in)),
          h("td", {}, h("code", {}, typeOf(p.schema))),
          h("td", {}, p.description || "", " ", h("span", { class: "muted small" }, constraints(p.schema || {})))))))] : null,
        body ? [h("h4", {}, "request body"), h("p", {}, h("code", {}, typeOf(body.schema)))] : null,
        h("h4", {}, "responses"),
        h("ul", {}, Object.entries(op.responses).map(([code, r]) => h("li", {}, h("strong", {}, code), " ", r.description || "", " ",
          r.content ? Object.entries(r.content).map(([type, c]) => h("span", { class: "muted small" }, ` ${type}: `, h("code", {}, typeOf(c.schema)))) : null)))));
    }
  }
  root.append(h("h2", { class: "docs-tag" }, "schemas"));
  for (const [name, schema] of Object.entries(spec.components.schemas).sort()) {
    root.append(h("section", { class: "card schema", id: `schema-${name}` }, h("h3", {}, name), schema.description ? h("p", { class: "muted" }, schema.description) : null,
      schema.properties ? propsTable(schema) : h("code", {}, typeOf(schema))));
  }
  if (location.hash) document.getElementById(location.hash.slice(1))?.scrollIntoView();
}

main();
