// Read-only dashboard of the node: the worklist (fetched every few seconds) and the models
// page (every 30 s while shown), updated in place (no page reloads, no framework, nothing
// from outside the node). The view is the address's fragment: #worklist or #models.
//
// The token: opened as /dashboard/#token=..., the page keeps it in sessionStorage (this tab
// only) and removes it from the address bar; otherwise it asks once. A 401 asks again.
"use strict";

const REFRESH_MS = 5000;
const MODELS_REFRESH_MS = 30000;
const TOKEN_KEY = "cxr-node-api-token";
const VIEWS = ["worklist", "models"];
const SVG_NS = "http://www.w3.org/2000/svg";
const rows = new Map(); // study UID -> {row, detail}
const expanded = new Set();
let timer = null;
let modelsTimer = null;
let started = false;
let view = "worklist";
let modelsRequest = 0; // the latest models request: an older answer arriving late is dropped

function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

function takeTokenFromFragment() {
  const params = new URLSearchParams(location.hash.slice(1));
  const value = params.get("token");
  if (value) {
    sessionStorage.setItem(TOKEN_KEY, value);
    const keep = params.get("view") === "models" || params.has("models") ? "#models" : "";
    history.replaceState(null, "", location.pathname + location.search + keep);
  }
}

function viewFromFragment() {
  const name = location.hash.slice(1);
  return VIEWS.includes(name) ? name : "worklist";
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

// -- models -----------------------------------------------------------------------------

function fixed(value, digits = 3) {
  return value == null || !Number.isFinite(value) ? "—" : value.toFixed(digits);
}

// "0.826 (0.748–0.903)"; the interval wraps as a whole, if at all.
function withCi(value, ci) {
  const [lo, hi] = ci || [];
  if (value == null && lo == null && hi == null) return "—";
  const box = el("span", { class: "with-ci" }, `${fixed(value)} `);
  box.append(el("span", { class: "ci" }, `(${fixed(lo)}–${fixed(hi)})`));
  return box;
}

function stateBadge(state) {
  return el("span", { class: `badge state state-${state}` }, state || "—");
}

function levelBadge(level) {
  return el("span", { class: `badge level level-${level}` }, level || "—");
}

function column(name, value, attrs = {}) {
  return el("td", { "data-column": name, ...attrs }, value ?? "—");
}

const ROLE_ORDER = { screen: 0, confirm: 1, segment: 2 };
const STATE_ORDER = { active: 0, shadow: 1, installed: 2 };

function renderVersions(models) {
  const sorted = [...models].sort(
    (a, b) =>
      String(a.finding).localeCompare(String(b.finding)) ||
      (ROLE_ORDER[a.role] ?? 9) - (ROLE_ORDER[b.role] ?? 9) ||
      (STATE_ORDER[a.state] ?? 9) - (STATE_ORDER[b.state] ?? 9),
  );
  const body = document.getElementById("versions-body");
  body.replaceChildren(
    ...sorted.map((m) => {
      const name = column("name", m.name || "—", m.sha256 ? { title: `sha256 ${m.sha256}` } : {});
      if (m.error) name.append(el("div", { class: "warning" }, m.error));
      return el(
        "tr",
        { class: `version state-${m.state}` },
        column("finding", m.finding),
        column("role", m.role),
        name,
        column("version", m.version),
        el("td", { "data-column": "state" }, stateBadge(m.state)),
        column("source", m.source),
        column("parent", m.parent || "—"),
      );
    }),
  );
  document.getElementById("versions").hidden = sorted.length === 0;
  document.getElementById("versions-empty").hidden = sorted.length > 0;
}

function findingNames(models) {
  const byCode = new Map();
  const byModel = new Map();
  for (const m of models) {
    if (m.finding_code) byCode.set(m.finding_code, m.finding);
    if (m.name) byModel.set(`${m.name}@${m.version}`, m.finding);
  }
  return (entry) =>
    byCode.get(entry.finding_code) ?? byModel.get(`${entry.model}@${entry.version}`) ?? "";
}

function renderPerformance(entries, findingOf) {
  const body = document.getElementById("performance-body");
  body.replaceChildren(
    ...entries.map((p) => {
      const finding = findingOf(p);
      const card = p.card || null;
      const verdict = el("td", { "data-column": "card_verdict" });
      if (p.below_card) {
        verdict.append(
          el("span", { class: "badge below-card", title: p.warning || "below the card" }, "below card"),
        );
      }
      return el(
        "tr",
        { class: "performance" },
        el("td", { "data-column": "model" }, p.model, el("wbr"), `@${p.version}`),
        column("finding", finding ? `${finding} (${p.finding_code})` : p.finding_code),
        column("role", p.role),
        column("n_labelled", p.n_labelled ?? "—", {
          title: `${p.n_positive ?? "?"} positive, ${p.n_negative ?? "?"} negative`,
        }),
        column("prevalence", p.prevalence == null ? "—" : percent(p.prevalence)),
        column("auroc", withCi(p.auroc, p.auroc_ci)),
        column("sensitivity", withCi(p.sensitivity, p.sensitivity_ci), {
          title: p.threshold == null ? "" : `at threshold ${p.threshold}`,
        }),
        column("specificity", withCi(p.specificity, p.specificity_ci)),
        column("ece", fixed(p.ece)),
        column("card_auroc", card ? fixed(card.auroc) : "—", card ? { title: `card: ${card.source}` } : {}),
        verdict,
      );
    }),
  );
  document.getElementById("performance").hidden = entries.length === 0;
  document.getElementById("performance-empty").hidden = entries.length > 0;
}

function svg(tag, attrs = {}, text = null) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
  if (text != null) node.textContent = String(text);
  return node;
}

// Reference vs now as side-by-side bars per bin, scaled to the largest share.
function driftChart(entry) {
  const plot = entry.plot || { bins: [], reference: [], live: [] };
  const bins = plot.bins || [];
  const width = 360;
  const top = 14;
  const plotHeight = 100;
  const left = 34; // room for the first rotated bin label
  const height = top + plotHeight + 62;
  const shares = [...(plot.reference || []), ...(plot.live || [])].filter((v) => v != null);
  const max = Math.max(0.01, ...shares);
  const groupWidth = (width - left - 6) / Math.max(1, bins.length);
  const barWidth = Math.min(groupWidth * 0.4, 28);
  const chart = svg("svg", {
    viewBox: `0 0 ${width} ${height}`,
    class: "drift-chart",
    role: "img",
    "aria-label": `${entry.signal}: reference and now, share per bin`,
  });
  chart.append(
    svg("line", { x1: left, x2: width - 6, y1: top + plotHeight, y2: top + plotHeight, class: "axis" }),
    svg("text", { x: left, y: top - 4, class: "scale" }, `max ${percent(max)}`),
  );
  bins.forEach((bin, i) => {
    const x = left + i * groupWidth;
    const group = svg("g", { class: "bin" });
    const reference = plot.reference?.[i];
    const live = plot.live?.[i];
    group.append(svg("title", {}, `${bin}: reference ${percent(reference)}, now ${percent(live)}`));
    const cx = x + groupWidth / 2;
    [
      ["bar-reference", reference, cx - barWidth - 1],
      ["bar-live", live, cx + 1],
    ].forEach(([kind, share, bx]) => {
      const h = share == null ? 0 : (share / max) * plotHeight;
      group.append(
        svg("rect", {
          class: `bar ${kind}`,
          x: bx.toFixed(1),
          y: (top + plotHeight - h).toFixed(1),
          width: barWidth.toFixed(1),
          height: h.toFixed(1),
        }),
      );
    });
    const ly = top + plotHeight + 10;
    group.append(
      svg("text", { x: cx.toFixed(1), y: ly, class: "bin-label", transform: `rotate(-40 ${cx.toFixed(1)} ${ly})` }, bin),
    );
    chart.append(group);
  });
  return chart;
}

function renderDrift(entries) {
  const box = document.getElementById("drift-plots");
  box.replaceChildren(
    ...entries.map((d) => {
      const title = `${d.model}@${d.version} · ${d.signal}`;
      const reference = d.reference === "site_baseline" ? "site baseline" : d.reference;
      const facts = [
        `PSI ${fixed(d.psi)}`,
        `p ${d.p_value == null ? "—" : d.p_value.toPrecision(2)}`,
        `n ${d.n ?? "—"}`,
        `reference: ${reference || "—"}, n ${d.reference_n ?? "—"}`,
      ];
      const figure = el("figure", { class: `drift level-${d.level}`, "data-signal": d.signal });
      const caption = el(
        "figcaption",
        {},
        el("span", { class: "drift-title" }, title),
        " ",
        levelBadge(d.level),
      );
      if (d.role === "shadow") caption.append(" ", el("span", { class: "muted" }, "(shadow)"));
      figure.append(
        caption,
        driftChart(d),
        el(
          "p",
          { class: "legend" },
          el("span", { class: "swatch bar-reference" }),
          "reference ",
          el("span", { class: "swatch bar-live" }),
          "now",
        ),
        el("p", { class: "muted drift-facts" }, facts.join(" · ")),
      );
      return figure;
    }),
  );
  document.getElementById("drift-empty").hidden = entries.length > 0;
}

function renderModels(report) {
  const models = report.models || [];
  renderVersions(models);
  renderPerformance(report.performance || [], findingNames(models));
  renderDrift(report.drift || []);
  document.getElementById("models-updated").textContent =
    `updated ${new Date().toLocaleTimeString()}`;
}

async function refreshModels() {
  const request = ++modelsRequest;
  try {
    const report = await api("/api/models");
    if (request !== modelsRequest || view !== "models") return;
    renderModels(report);
    document.getElementById("models-error").hidden = true;
  } catch (error) {
    if (request === modelsRequest) handle(error, "models-error");
  }
}

// -- views ------------------------------------------------------------------------------

function showView(name) {
  view = name;
  document.getElementById("worklist-view").hidden = name !== "worklist";
  document.getElementById("models").hidden = name !== "models";
  for (const other of VIEWS) {
    const link = document.getElementById(`nav-${other}`);
    if (other === name) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  clearInterval(modelsTimer);
  modelsTimer = null;
  if (!started) return;
  refresh();
  if (name === "models") {
    refreshModels();
    modelsTimer = setInterval(refreshModels, MODELS_REFRESH_MS);
  }
}

// -- loop -------------------------------------------------------------------------------

function handle(error, boxId = "error") {
  if (error instanceof Unauthorized) {
    sessionStorage.removeItem(TOKEN_KEY);
    askForToken();
    return;
  }
  const box = document.getElementById(boxId);
  box.textContent = error.message;
  box.hidden = false;
}

async function refresh() {
  try {
    const worklistShown = view === "worklist";
    const [status, worklist] = await Promise.all([
      api("/api/status"),
      worklistShown ? api("/api/worklist") : null,
    ]);
    if (worklist) renderWorklist(worklist);
    renderHealth(status);
    document.getElementById("error").hidden = true;
  } catch (error) {
    handle(error);
  }
}

function start() {
  document.getElementById("login").hidden = true;
  started = true;
  clearInterval(timer);
  timer = setInterval(refresh, REFRESH_MS);
  showView(viewFromFragment());
}

function askForToken() {
  started = false;
  clearInterval(timer);
  clearInterval(modelsTimer);
  modelsTimer = null;
  document.getElementById("login").hidden = false;
  document.getElementById("token-input").focus();
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, document.getElementById("token-input").value.trim());
    start();
  });
  window.addEventListener("hashchange", () => showView(viewFromFragment()));
  takeTokenFromFragment();
  if (token()) start();
  else {
    showView(viewFromFragment());
    askForToken();
  }
});
