// Interactive API docs from /openapi.json: every operation with its parameters, body
// schema and responses, and a form that sends it (with the token from the dashboard).
"use strict";

function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  for (const k of kids.flat()) if (k != null) e.append(k instanceof Node ? k : String(k));
  return e;
}

const token = document.getElementById("token");
token.value = localStorage.getItem("imn-token") || "";
token.addEventListener("change", () => localStorage.setItem("imn-token", token.value.trim()));

function example(schema, spec, depth) {
  depth = depth || 0;
  if (!schema || depth > 4) return null;
  if (schema.$ref) return example(schema.$ref.split("/").reduce((o, k) => (k === "#" ? spec : o[k]), spec), spec, depth + 1);
  if (schema.oneOf) return example(schema.oneOf[0], spec, depth + 1);
  if (schema.default !== undefined) return schema.default;
  if (schema.enum) return schema.enum[0];
  const t = Array.isArray(schema.type) ? schema.type[0] : schema.type;
  if (t === "object" || schema.properties) {
    const o = {};
    for (const k of schema.required || []) o[k] = example((schema.properties || {})[k], spec, depth + 1);
    return o;
  }
  if (t === "array") return [];
  if (t === "integer" || t === "number") return schema.minimum || 1;
  if (t === "boolean") return true;
  return "";
}

function operation(spec, path, method, op) {
  const inputs = {};
  const params = (op.parameters || []).map((p) => {
    const i = el("input", { placeholder: p.in, size: 30 });
    inputs[p.name] = { p, i };
    return el("div", {}, el("code", {}, p.name), ` (${p.in}${p.required ? ", required" : ""}) `, i, el("span", { class: "muted" }, ` ${p.description || ""}`));
  });
  let body = null;
  if (op.requestBody) {
    const schema = op.requestBody.content["application/json"].schema;
    body = el("textarea", { rows: 6, cols: 80, class: "mono" });
    body.value = JSON.stringify(example(schema, spec), null, 2);
  }
  const out = el("pre", { class: "mono" });
  const send = el("button", {}, "Send");
  send.addEventListener("click", async () => {
    let url = path;
    const q = new URLSearchParams();
    const headers = {};
    for (const { p, i } of Object.values(inputs)) {
      if (!i.value) continue;
      if (p.in === "path") url = url.replace(`{${p.name}}`, encodeURIComponent(i.value));
      else if (p.in === "query") q.set(p.name, i.value);
      else if (p.in === "header") headers[p.name] = i.value;
    }
    if ([...q].length) url += "?" + q;
    if (token.value.trim()) headers.Authorization = "Bearer " + token.value.trim();
    if (body) headers["Content-Type"] = "application/json";
    out.textContent = `${method.toUpperCase()} ${url} …`;
    try {
      const r = await fetch(url, { method: method.toUpperCase(), headers, body: body ? body.value : undefined });
      const ct = r.headers.get("content-type") || "";
      if (ct.includes("event-stream")) { out.textContent = `${r.status}: an event stream; open it with curl -N or the dashboard`; r.body.cancel(); return; }
      const text = await r.text();
      let shown = text;
      try { shown = JSON.stringify(JSON.parse(text), null, 2); } catch (_) { /* not JSON */ }
      out.textContent = `${r.status} ${r.statusText}\n${shown.slice(0, 20000)}`;
    } catch (e) { out.textContent = String(e); }
  });
  const responses = Object.entries(op.responses).map(([code, r]) => {
    const rr = r.$ref ? spec.components.responses[r.$ref.split("/").pop()] : r;
    return el("li", {}, el("code", {}, code), " ", rr.description);
  });
  const details = el("details", { id: op.operationId },
    el("summary", {}, el("code", {}, method.toUpperCase()), " ", el("code", {}, path), " — ", op.summary, op["x-imn-scope"] ? el("span", { class: "muted" }, ` (scope: ${op["x-imn-scope"]})`) : ""),
    params.length ? el("div", {}, el("h3", {}, "Parameters"), params) : null,
    body ? el("div", {}, el("h3", {}, "Body"), body) : null,
    el("h3", {}, "Responses"), el("ul", {}, responses),
    send, out);
  return details;
}

(async () => {
  const main = document.getElementById("docs");
  const spec = await (await fetch("/openapi.json")).json();
  const ops = [];
  for (const [path, methods] of Object.entries(spec.paths)) {
    for (const [method, op] of Object.entries(methods)) ops.push(operation(spec, path, method, op));
  }
  main.replaceChildren(el("h1", {}, `${spec.info.title} ${spec.info.version}`), el("p", {}, spec.info.description), ...ops);
})();
