// Read-only worklist of the node: fetches the API every few seconds and updates the DOM in
// place (no page reloads, no framework, nothing from outside the node).
//
// The token: opened as /dashboard/#token=..., the page keeps it in sessionStorage (this tab
// only) and removes it from the address bar; otherwise it asks once. A 401 asks again.
"use strict";

const REFRESH_MS = 5000;
const TOKEN_KEY = "cxr-node-api-token";
const rows = new Map(); // study UID -> {row, detail}
const expanded = new Set();
let timer = null;

function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

function takeTokenFromFragment() {
  const params = new URLSearchParams(location.hash.slice(1));
  const value = params.get("token");
  if (value) {
    sessionStorage.setItem(TOKEN_KEY, value);
    history.replaceState(null, "", location.pathname + location.search);
  }
}

class Unauthorized extends Error {}

async function api(path, as = "json") {
  const response = await fetch(path, { headers: { Authorization: `Bearer ${token()}` } });
  if (response.status === 401) throw new Unauthorized();
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
  return as === "blob" ? response.blob() : response.json();
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child ?? "")));
  }
  return node;
}

function percent(value) {
  return value == null ? "" : `${(100 * value).toFixed(1)} %`;
}

function when(iso) {
  return iso ? new Date(iso).toLocaleString() : "";
}

function badge(priority) {
  const level = priority || "NONE";
  return el("span", { class: `badge ${level}` }, priority || "—");
}

// -- worklist ---------------------------------------------------------------------------

function cells(study) {
  const finding = study.top_finding
    ? `${study.top_finding} ${percent(study.top_probability)}`
    : "";
  return [
    badge(study.priority),
    study.accession_number || "—",
    when(study.first_received_at),
    study.status,
    finding,
    study.instances,
  ];
}

function newRow(study) {
  const row = el("tr", { class: "study", "data-uid": study.study_instance_uid });
  for (let i = 0; i < 6; i++) row.append(el("td"));
  const button = el("button", { type: "button", "aria-expanded": "false" }, "Details");
  button.addEventListener("click", () => toggle(study.study_instance_uid, button));
  row.append(el("td", {}, button));
  const detail = el("tr", { class: "detail", hidden: "" });
  detail.append(el("td", { colspan: "7" }));
  return { row, detail };
}

function fill(entry, study) {
  const values = cells(study);
  const tds = entry.row.children;
  values.forEach((value, i) => {
    const td = tds[i];
    const text = value instanceof Node ? value.outerHTML : String(value);
    if (td.dataset.shown === text) return; // unchanged: leave the DOM alone
    td.dataset.shown = text;
    td.replaceChildren(value instanceof Node ? value : document.createTextNode(text));
  });
  entry.row.dataset.priority = study.priority || "";
}

function renderWorklist(worklist) {
  const body = document.getElementById("worklist-body");
  const seen = new Set();
  for (const study of worklist.studies) {
    const uid = study.study_instance_uid;
    seen.add(uid);
    let entry = rows.get(uid);
    if (!entry) {
      entry = newRow(study);
      rows.set(uid, entry);
    }
    fill(entry, study);
    body.append(entry.row, entry.detail); // append moves existing rows into the new order
  }
  for (const [uid, entry] of rows) {
    if (seen.has(uid)) continue;
    entry.row.remove();
    entry.detail.remove();
    rows.delete(uid);
    expanded.delete(uid);
  }
  document.getElementById("empty").hidden = worklist.studies.length > 0;
  document.getElementById("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
}

// -- study detail -----------------------------------------------------------------------

async function toggle(uid, button) {
  const entry = rows.get(uid);
  const open = !expanded.has(uid);
  button.setAttribute("aria-expanded", String(open));
  entry.detail.hidden = !open;
  if (!open) {
    expanded.delete(uid);
    return;
  }
  expanded.add(uid);
  const cell = entry.detail.firstChild;
  cell.replaceChildren("loading…");
  try {
    const study = await api(`/api/studies/${encodeURIComponent(uid)}`);
    cell.replaceChildren(await renderStudy(study));
  } catch (error) {
    handle(error);
    cell.replaceChildren(`could not load the study: ${error.message}`);
  }
}

async function renderStudy(study) {
  const box = el("div", { class: "instances" });
  for (const instance of study.instances) {
    const part = el("div", { class: "instance" });
    part.append(
      el("h3", {}, `${instance.modality || ""} ${instance.view_position || ""} image`),
      el("p", { class: "muted" }, `received ${when(instance.received_at)}`),
    );
    for (const result of instance.results) {
      part.append(renderFindings(result));
      if (result.heatmap_url) part.append(await heatmap(result));
    }
    const jobs = instance.jobs.map((job) => `job ${job.id}: ${job.state}`).join(", ");
    const sends = instance.sends.map((s) => `${s.kind} → ${s.destination}: ${s.state}`);
    part.append(el("p", { class: "muted" }, [jobs, ...sends].join(" · ")));
    box.append(part);
  }
  return box;
}

function renderFindings(result) {
  const list = el("ul");
  if (result.reason) list.append(el("li", {}, `${result.status}: ${result.reason}`));
  for (const f of result.findings) {
    if (f.status === "not_assessed") {
      list.append(el("li", { class: "not-assessed" }, `${f.meaning}: not assessed — ${f.reason}`));
      continue;
    }
    const verdict = f.present ? "present" : "absent";
    const looked =
      f.cam_lung_share == null ? "" : `; heatmap ${percent(f.cam_lung_share)} inside the lungs`;
    list.append(
      el("li", {}, `${f.meaning}: ${percent(f.probability)} (${verdict}, ${f.stage}${looked})`),
    );
  }
  for (const m of result.measurements || []) {
    list.append(el("li", { class: "measurement" }, measurement(m)));
  }
  for (const w of result.warnings || []) list.append(el("li", { class: "warning" }, w));
  return list;
}

const MEASUREMENT_NAMES = {
  cardiothoracic_ratio: "Cardiothoracic ratio",
  heart_width: "Heart width",
  thoracic_width: "Thoracic width",
  right_lung_area: "Right lung area",
  left_lung_area: "Left lung area",
};

function measurement(m) {
  const name = MEASUREMENT_NAMES[m.name] || m.meaning;
  const unit = { 1: "", mm: " mm", cm2: " cm²" }[m.unit] ?? ` ${m.unit}`;
  const digits = m.unit === "1" ? 2 : 0;
  return `${name}: ${m.value.toFixed(digits)}${unit}`;
}

async function heatmap(result) {
  const blob = await api(`${result.heatmap_url}?size=400`, "blob");
  const img = el("img", {
    src: URL.createObjectURL(blob),
    alt: "Heatmap of the regions that drove the model's output",
    class: "heatmap",
  });
  img.addEventListener("load", () => URL.revokeObjectURL(img.src), { once: true });
  return img;
}

// -- health -----------------------------------------------------------------------------

function renderHealth(status) {
  const list = document.getElementById("health-list");
  const jobs = status.jobs || {};
  const items = [
    ["State", status.healthy ? "healthy" : "unhealthy", status.healthy ? "ok" : "bad"],
    ["Listener", status.listener?.state ?? "unknown"],
    ["Database", status.database?.reachable ? "reachable" : "unreachable"],
    ["Queued", (jobs.queued ?? 0) + (jobs.received ?? 0)],
    ["Running", jobs.running ?? 0],
    ["Failed", jobs.failed ?? 0],
    ["Dead letters", status.dead_letters ?? 0],
    ["Spool free", status.spool?.free_percent == null ? "?" : `${status.spool.free_percent} %`],
  ];
  list.replaceChildren(
    ...items.map(([term, value, tone]) =>
      el("div", {}, el("dt", {}, term), el("dd", tone ? { class: tone } : {}, value)),
    ),
  );
}

// -- loop -------------------------------------------------------------------------------

function handle(error) {
  if (error instanceof Unauthorized) {
    sessionStorage.removeItem(TOKEN_KEY);
    askForToken();
    return;
  }
  const box = document.getElementById("error");
  box.textContent = error.message;
  box.hidden = false;
}

async function refresh() {
  try {
    const [worklist, status] = await Promise.all([api("/api/worklist"), api("/api/status")]);
    renderWorklist(worklist);
    renderHealth(status);
    document.getElementById("error").hidden = true;
  } catch (error) {
    handle(error);
  }
}

function start() {
  document.getElementById("login").hidden = true;
  refresh();
  clearInterval(timer);
  timer = setInterval(refresh, REFRESH_MS);
}

function askForToken() {
  clearInterval(timer);
  document.getElementById("login").hidden = false;
  document.getElementById("token-input").focus();
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, document.getElementById("token-input").value.trim());
    start();
  });
  takeTokenFromFragment();
  if (token()) start();
  else askForToken();
});
