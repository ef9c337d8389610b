// idembed console: plain DOM calls to the same server's /v1 API. No framework, no build step, no CDN.
// Every value from the server is written with textContent or text nodes, never parsed as HTML: names and metadata
// are user input.
"use strict";

const PAGE = 20;
const KEY_STORE = "idembed-api-key";
let offset = 0;

const $ = (id) => document.getElementById(id);

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const child of children) node.append(child instanceof Node ? child : String(child));
  return node;
}

function status(message, isError = false) {
  const box = $("status");
  box.textContent = message;
  box.className = isError ? "status error" : "status";
}

function apiKey() {
  return sessionStorage.getItem(KEY_STORE) || "";
}

class ApiError extends Error {}

// One request to the API; a non-2xx answer raises with the server's own error message.
async function api(path, { method = "GET", body } = {}) {
  const headers = {};
  if (apiKey()) headers["X-API-Key"] = apiKey();
  if (body !== undefined && !(body instanceof FormData)) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(body);
  }
  const response = await fetch(path, { method, headers, body });
  if (response.status === 204) return null;
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!response.ok) {
    const err = data && data.error;
    const message = err && typeof err === "object" ? `${err.code}: ${err.message}` : err || text;
    throw new ApiError(`${response.status} ${message}`);
  }
  return data;
}

// Runs an action, showing its error (or a success line) in the status bar.
async function guarded(action, done) {
  try {
    const result = await action();
    if (done) status(done(result));
    return result;
  } catch (err) {
    status(err.message, true);
    return undefined;
  }
}

function fmt(x, digits = 4) {
  return typeof x === "number" ? x.toFixed(digits) : String(x);
}

// --- identities ---------------------------------------------------------------------------------------

function identityRow(item) {
  const remove = el("button", { type: "button", class: "danger", "data-name": item.name }, "Delete");
  remove.addEventListener("click", () => deleteIdentity(item.name));
  return el(
    "tr",
    { "data-name": item.name },
    el("td", { class: "name" }, item.name),
    el("td", {}, item.image_count),
    el("td", {}, item.model_id),
    el("td", {}, new Date(item.created_at).toLocaleString()),
    el("td", {}, el("code", {}, JSON.stringify(item.metadata))),
    el("td", {}, remove),
  );
}

function showIdentities(items, total) {
  $("identity-rows").replaceChildren(...items.map(identityRow));
  if (!items.length) $("identity-rows").append(el("tr", {}, el("td", { colspan: 6, class: "muted" }, "none")));
  $("identity-total").textContent = total === undefined ? "" : `(${total} enrolled)`;
}

async function loadIdentities() {
  const page = await guarded(() => api(`/v1/identities?offset=${offset}&limit=${PAGE}`));
  if (!page) return;
  const filter = $("search-name").value.trim().toLowerCase();
  const items = filter ? page.items.filter((i) => i.name.toLowerCase().includes(filter)) : page.items;
  showIdentities(items, page.total);
  const last = Math.min(page.offset + page.items.length, page.total);
  $("page-info").textContent = page.total ? `${page.offset + 1}-${last} of ${page.total}` : "";
  $("prev-page").disabled = page.offset === 0;
  $("next-page").disabled = last >= page.total;
}

async function searchIdentity(event) {
  event.preventDefault();
  const name = $("search-name").value.trim();
  if (!name) return loadIdentities();
  try {
    const item = await api(`/v1/identities/${encodeURIComponent(name)}`);
    showIdentities([item]);
    status(`found ${name}`);
  } catch (err) {
    if (!String(err.message).startsWith("404")) return status(err.message, true);
    await loadIdentities(); // no exact match: filter the current page by the text instead
  }
}

async function deleteIdentity(name) {
  if (!window.confirm(`Delete ${name}? Its template is erased from the store.`)) return;
  const ok = await guarded(
    () => api(`/v1/identities/${encodeURIComponent(name)}`, { method: "DELETE" }),
    () => `deleted ${name}`,
  );
  if (ok !== undefined) await refreshAll();
}

async function enroll(event) {
  event.preventDefault();
  const form = new FormData();
  form.append("name", $("enroll-name").value.trim());
  for (const file of $("enroll-images").files) form.append("images", file, file.name);
  const metadata = $("enroll-metadata").value.trim();
  if (metadata) form.append("metadata", metadata);
  if ($("enroll-replace").checked) form.append("replace", "true");
  const made = await guarded(
    () => api("/v1/identities", { method: "POST", body: form }),
    (r) => `enrolled ${r.name} from ${r.image_count} image(s)${r.replaced ? " (replaced)" : ""}`,
  );
  if (!made) return;
  $("enroll-result").textContent = `${made.name}: ${made.image_count} image(s), model ${made.model_id}`;
  offset = 0;
  $("search-name").value = "";
  await refreshAll();
}

// --- verify and identify --------------------------------------------------------------------------------

function optionalThreshold(form, input) {
  const value = $(input).value.trim();
  if (value) form.append("threshold", value);
}

async function verify(event) {
  event.preventDefault();
  const form = new FormData();
  form.append("image_a", $("verify-a").files[0]);
  form.append("image_b", $("verify-b").files[0]);
  optionalThreshold(form, "verify-threshold");
  const r = await guarded(() => api("/v1/verify", { method: "POST", body: form }), () => "verified");
  if (!r) return;
  const decision = r.same ? "same identity" : "different identities";
  $("verify-result").replaceChildren(
    el("p", { class: `decision ${r.same ? "same" : "different"}` }, decision),
    el(
      "dl",
      { class: "kv" },
      el("dt", {}, "similarity"),
      el("dd", { id: "verify-similarity" }, fmt(r.similarity)),
      el("dt", {}, "threshold"),
      el("dd", {}, fmt(r.threshold)),
      el("dt", {}, "model"),
      el("dd", {}, r.model_id),
    ),
  );
}

async function identify(event) {
  event.preventDefault();
  const form = new FormData();
  form.append("images", $("identify-image").files[0]);
  form.append("top_k", $("identify-k").value || "5");
  optionalThreshold(form, "identify-threshold");
  const r = await guarded(() => api("/v1/identify", { method: "POST", body: form }), () => "identified");
  if (!r) return;
  const top = r.results[0];
  const answer = top.unknown
    ? `unknown (best ${fmt(top.similarity)} < threshold ${fmt(r.threshold)})`
    : `${top.identity} (similarity ${fmt(top.similarity)} >= threshold ${fmt(r.threshold)})`;
  const rows = top.matches.map((m, i) =>
    el("tr", {}, el("td", {}, i + 1), el("td", {}, m.identity), el("td", {}, fmt(m.similarity)), el("td", {}, m.source)),
  );
  $("identify-result").replaceChildren(
    el("p", { class: `decision ${top.unknown ? "unknown" : "known"}`, id: "identify-answer" }, answer),
    el(
      "table",
      {},
      el("thead", {}, el("tr", {}, el("th", {}, "#"), el("th", {}, "identity"), el("th", {}, "similarity"), el("th", {}, "source"))),
      el("tbody", { id: "identify-matches" }, ...rows),
    ),
  );
}

// --- model card -------------------------------------------------------------------------------------------

// Any JSON value as nested definition lists (the manifest schema may grow: nothing here names its fields
// except the summary line).
function kv(value) {
  if (value === null || typeof value !== "object") return document.createTextNode(typeof value === "number" ? fmt(value, 6).replace(/\.?0+$/, "") : String(value));
  if (Array.isArray(value) && value.every((v) => v === null || typeof v !== "object")) {
    return document.createTextNode(value.join(", "));
  }
  const list = el("dl", { class: "kv" });
  for (const [k, v] of Object.entries(value)) list.append(el("dt", {}, k), el("dd", {}, kv(v)));
  return list;
}

function calibrationSummary(m) {
  const t = m.thresholds || {};
  const at = t.at_target_far || {};
  const parts = [`Default threshold ${fmt(t.default)}`];
  if (t.target_far !== undefined) {
    parts.push(`calibrated for a false-accept rate of ${t.target_far} on pairs of identities never seen in training`);
  }
  if (at.far !== undefined) parts.push(`measured FAR ${fmt(at.far, 5)}, TAR ${fmt(at.tar)}`);
  if (t.num_genuine_pairs) parts.push(`${t.num_genuine_pairs} genuine / ${t.num_impostor_pairs} impostor pairs`);
  const heldout = m.training && m.training.heldout_classes;
  if (heldout) parts.push(`held-out identities: ${heldout.join(", ")}`);
  return parts.join("; ") + ".";
}

async function loadModel() {
  const info = await guarded(() => api("/v1/model"));
  if (!info) return;
  const m = info.manifest;
  $("model-id").textContent = `model: ${info.model_id}`;
  $("model-card-body").replaceChildren(
    el("p", { id: "model-summary" }, `${m.name} version ${m.version}: ${m.embedding.dim}-d ${m.embedding.metric} embeddings of `
      + `${m.input.height}x${m.input.width}x${m.input.channels} inputs; ${info.gallery.centers} class centers, `
      + `${info.gallery.enrolled} enrolled identities.`),
    el("p", { id: "calibration" }, calibrationSummary(m)),
    el("h3", {}, "Thresholds"),
    kv(m.thresholds),
    el("h3", {}, "Evaluation (identities unseen in training)"),
    kv(m.evaluation),
    el("h3", {}, "Training recipe"),
    kv(m.training),
  );
}

// --- wiring -----------------------------------------------------------------------------------------------

function useKey(event) {
  event.preventDefault();
  sessionStorage.setItem(KEY_STORE, $("api-key").value);
  status(apiKey() ? "key set for this tab" : "key cleared");
  refreshAll();
}

async function refreshAll() {
  await loadModel();
  await loadIdentities();
}

document.addEventListener("DOMContentLoaded", () => {
  $("api-key").value = apiKey();
  $("key-form").addEventListener("submit", useKey);
  $("enroll-form").addEventListener("submit", enroll);
  $("search-form").addEventListener("submit", searchIdentity);
  $("refresh").addEventListener("click", () => {
    $("search-name").value = "";
    offset = 0;
    loadIdentities();
  });
  $("prev-page").addEventListener("click", () => {
    offset = Math.max(0, offset - PAGE);
    loadIdentities();
  });
  $("next-page").addEventListener("click", () => {
    offset += PAGE;
    loadIdentities();
  });
  $("verify-form").addEventListener("submit", verify);
  $("identify-form").addEventListener("submit", identify);
  $("load-model").addEventListener("click", loadModel);
  refreshAll();
});
