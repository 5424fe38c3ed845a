"use strict";
// The dashboard: plain DOM, no build step, no outside requests. Every value from the API goes in
// through textContent, never innerHTML. The job list is polled every 2 s; the selected job also
// follows its event stream (fetch, not EventSource, so the API key can travel as a header).

const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const KEY_STORAGE = "slimformer.apiKey";
const state = { selected: null, stream: null, models: new Map(), modelsAt: 0, job: null, etag: null };

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "class") node.className = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (value !== undefined && value !== null) node.setAttribute(name, value);
  }
  for (const child of children.flat(Infinity)) {
    if (child !== null && child !== undefined) {
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
  }
  return node;
}

function authHeaders(extra = {}) {
  const key = localStorage.getItem(KEY_STORAGE);
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

class ApiError extends Error {
  constructor(status, code, message) { super(`${code}: ${message}`); this.status = status; }
}

async function apiError(response) {
  try {
    const { error } = await response.json();
    return new ApiError(response.status, error.code, error.message);
  } catch {
    return new ApiError(response.status, `http_${response.status}`, response.statusText);
  }
}

async function api(path, { method = "GET", headers = {} } = {}) {
  const response = await fetch(path, { method, headers: authHeaders(headers) });
  if (response.status === 304) return null;
  if (!response.ok) throw await apiError(response);
  return { body: await response.json(), etag: response.headers.get("ETag") };
}

function showError(error) {
  const banner = document.getElementById("banner");
  if (!error) { banner.style.display = "none"; return; }
  banner.textContent = error.status === 401
    ? "unauthorized: enter a valid API key above" : String(error.message || error);
  banner.style.display = "block";
}

// --- formatting -------------------------------------------------------------------------------

const shortTime = (t) => (t ? t.replace("T", " ").slice(0, 19) : "–");

function duration(seconds) {
  seconds = Math.max(0, Math.round(seconds));
  const h = Math.floor(seconds / 3600), m = Math.floor((seconds % 3600) / 60), s = seconds % 60;
  if (h) return `${h}h${String(m).padStart(2, "0")}m`;
  return m ? `${m}m${String(s).padStart(2, "0")}s` : `${s}s`;
}

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return i === 0 ? `${n} B` : `${n.toFixed(1)} ${units[i]}`;
}

const isNumber = (v) => typeof v === "number" && Number.isFinite(v);

function metricValue(name, v) {
  if (!isNumber(v)) return v === undefined || v === null ? "–" : String(v);
  if (name.endsWith("_bytes")) return bytes(v);
  if (name === "sparsity") return `${(v * 100).toFixed(1)}%`;
  return Number.isInteger(v) ? v.toLocaleString("en") : v.toPrecision(4);
}

function stageLabel(progress) {
  if (!progress || !progress.stage) return "";
  const { stage, stage_index: index, num_stages: total } = progress;
  return Number.isInteger(index) && total > 1 ? `${stage} [${index + 1}/${total}]` : stage;
}

function progressBar(fraction) {
  const pct = Math.round(Math.min(Math.max(fraction || 0, 0), 1) * 100);
  return el("div", { class: "bar", role: "progressbar", "aria-valuenow": pct,
                     "aria-valuemin": 0, "aria-valuemax": 100 },
            el("span", { style: `width:${pct}%` }));
}

const statusCell = (status) => el("span", { class: `status ${status}` }, status);

// --- the job list -----------------------------------------------------------------------------

async function refreshModels() {
  if (Date.now() - state.modelsAt < 30000) return;
  const result = await api("/v1/models?limit=100");
  state.models = new Map(result.body.data.map((m) => [m.id, m.name]));
  state.modelsAt = Date.now();
}

async function refreshJobs() {
  const status = document.getElementById("status-filter").value;
  const query = new URLSearchParams({ limit: "50" });
  if (status) query.set("status", status);
  const result = await api(`/v1/jobs?${query}`);
  const rows = result.body.data.map((job) => {
    const live = job.status === "running" || job.status === "cancelling";
    const p = job.progress || {};
    return el("tr", { class: `job${job.id === state.selected ? " selected" : ""}`,
                      onclick: () => select(job.id) },
      el("td", { class: "mono" }, job.id),
      el("td", {}, statusCell(job.status)),
      el("td", {}, state.models.get(job.model_id) || job.model_id),
      el("td", {}, live ? [progressBar(p.fraction),
                           el("span", { class: "muted" },
                              `${stageLabel(p)} ${Math.round((p.fraction || 0) * 100)}%`)] : "–"),
      el("td", { class: "muted" }, shortTime(job.created_at)));
  });
  document.getElementById("jobs").replaceChildren(
    ...(rows.length ? rows : [el("tr", {}, el("td", { colspan: 5, class: "muted" }, "No jobs yet."))]));
  document.getElementById("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
}

// --- the selected job -------------------------------------------------------------------------

function select(jobId) {
  if (state.stream) state.stream.abort();
  state.selected = jobId;
  state.job = null;
  state.etag = null;
  state.events = el("div", { id: "events" });
  state.stream = new AbortController();
  followEvents(jobId, state.stream.signal);
  refreshSelected().catch(showError);
  refreshJobs().catch(showError);
}

async function refreshSelected() {
  if (!state.selected) return;
  const jobId = state.selected;
  const result = await api(`/v1/jobs/${encodeURIComponent(jobId)}`,
                           { headers: state.etag ? { "If-None-Match": state.etag } : {} });
  if (jobId !== state.selected) return;
  if (result) {
    state.job = result.body;
    state.etag = result.etag;
    state.artifacts = state.job.artifact_ids && state.job.artifact_ids.length
      ? (await api(`/v1/jobs/${encodeURIComponent(jobId)}/artifacts`)).body.data : [];
    renderDetail();
  }
}

function renderDetail() {
  const job = state.job;
  const p = job.progress || {};
  const live = !TERMINAL.has(job.status);
  const stages = ((job.recipe && job.recipe.stages) || []).map((s) => s.method).join(" → ");
  const facts = [
    ["Status", statusCell(job.status)],
    ["Model", `${state.models.get(job.model_id) || ""} ${job.model_id}`.trim()],
    ["Recipe", stages || "–"],
    ["Attempt", `${job.attempt} of ${job.max_attempts}`],
    ["Created", shortTime(job.created_at)],
    ["Started", shortTime(job.started_at)],
    ["Finished", shortTime(job.finished_at)],
  ];
  if (job.error) facts.push(["Error", `${job.error.code}: ${job.error.message}`]);
  const detail = document.getElementById("detail");
  detail.replaceChildren(
    el("h2", {}, el("span", { class: "mono" }, job.id),
       live && job.status !== "cancelling"
         ? el("button", { class: "danger", onclick: () => cancel(job.id) }, "Cancel") : null),
    el("dl", {}, facts.map(([k, v]) => [el("dt", {}, k), el("dd", {}, v)])),
    live ? progressSection(p) : null,
    job.metrics ? metricsSection(job.metrics) : null,
    state.artifacts && state.artifacts.length ? artifactsSection(state.artifacts) : null,
    el("h3", {}, "Events"), state.events,
  );
}

function progressSection(p) {
  const parts = [stageLabel(p), `${Math.round((p.fraction || 0) * 100)}%`];
  if (isNumber(p.eta_s)) parts.push(`eta ${duration(p.eta_s)}`);
  return el("div", {}, progressBar(p.fraction),
            el("div", { class: "muted" }, parts.filter(Boolean).join(" · ")),
            p.message ? el("div", {}, p.message) : null);
}

function metricsSection(metrics) {
  const before = metrics.baseline || {}, after = metrics.compressed || {};
  const names = [...new Set([...Object.keys(before), ...Object.keys(after)])]
    .filter((n) => isNumber(before[n]) || isNumber(after[n]));
  const rows = names.map((name) => {
    const b = before[name], a = after[name];
    let change = "";
    if (isNumber(b) && isNumber(a) && b !== 0) {
      const rel = (a - b) / Math.abs(b);
      change = el("span", { class: rel > 0 ? "up" : "down" },
                  `${rel > 0 ? "+" : ""}${(rel * 100).toFixed(1)}%`);
    }
    return el("tr", {}, el("td", {}, name), el("td", {}, metricValue(name, b)),
              el("td", {}, metricValue(name, a)), el("td", {}, change));
  });
  return el("div", {}, el("h3", {}, "Metrics"),
    el("table", {}, el("thead", {}, el("tr", {}, ["Metric", "Baseline", "Compressed", "Change"]
      .map((h) => el("th", {}, h)))), el("tbody", {}, rows)),
    metrics.trials && metrics.trials.length
      ? el("p", { class: "muted" }, `${metrics.trials.length} search trials`) : null);
}

function artifactsSection(artifacts) {
  return el("div", {}, el("h3", {}, "Artifacts"), el("table", {}, el("tbody", {},
    artifacts.map((a) => el("tr", {},
      el("td", {}, a.kind), el("td", {}, a.format || ""),
      el("td", {}, el("a", { href: `/v1/artifacts/${encodeURIComponent(a.id)}/content`,
                             download: a.filename || "", onclick: (e) => download(e, a) },
                      a.filename || a.id)),
      el("td", { class: "muted" }, isNumber(a.size_bytes) ? bytes(a.size_bytes) : ""),
      el("td", { class: "mono muted", title: "sha256" }, (a.sha256 || "").slice(0, 12)))))));
}

// A plain link cannot carry the API key; with a key set, fetch the file and hand over a blob.
async function download(event, artifact) {
  if (!localStorage.getItem(KEY_STORAGE)) return;
  event.preventDefault();
  try {
    const response = await fetch(event.currentTarget.href, { headers: authHeaders() });
    if (!response.ok) throw await apiError(response);
    const url = URL.createObjectURL(await response.blob());
    const link = el("a", { href: url, download: artifact.filename || artifact.id });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60000);
  } catch (error) { showError(error); }
}

async function cancel(jobId) {
  if (!confirm(`Cancel ${jobId}?`)) return;
  try {
    await api(`/v1/jobs/${encodeURIComponent(jobId)}/cancel`, { method: "POST" });
    await refreshSelected();
  } catch (error) { showError(error); }
}

// --- Server-Sent Events over fetch ------------------------------------------------------------

function sseDecoder(onEvent) {
  let data = [], type = "", idBuffer = null;
  const decoder = {
    lastEventId: null,
    feed(line) {
      if (line === "") {
        decoder.lastEventId = idBuffer;
        if (data.length) onEvent({ id: decoder.lastEventId, event: type || "message", data: data.join("\n") });
        data = []; type = "";
        return;
      }
      if (line.startsWith(":")) return;
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "data") data.push(value);
      else if (field === "event") type = value;
      else if (field === "id" && !value.includes("\0")) idBuffer = value;
    },
    resetPartial() { data = []; type = ""; idBuffer = decoder.lastEventId; },
  };
  return decoder;
}

async function followEvents(jobId, signal) {
  const sse = sseDecoder((message) => onJobEvent(jobId, message));
  while (!signal.aborted) {
    try {
      const headers = authHeaders({ Accept: "text/event-stream" });
      if (sse.lastEventId !== null) headers["Last-Event-ID"] = sse.lastEventId;
      const response = await fetch(`/v1/jobs/${encodeURIComponent(jobId)}/events`,
                                   { headers, signal });
      if (!response.ok) throw await apiError(response);
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let match;
        // a lone "\r" at the end may be the first half of "\r\n": wait for the next chunk
        while ((match = /\r\n|\r(?!$)|\n/.exec(buffer))) {
          sse.feed(buffer.slice(0, match.index));
          buffer = buffer.slice(match.index + match[0].length);
        }
      }
    } catch (error) {
      if (signal.aborted) return;
      if (error instanceof ApiError) { showError(error); return; }
    }
    sse.resetPartial();
    if (state.job && state.job.id === jobId && TERMINAL.has(state.job.status)) return;
    await new Promise((resolve) => setTimeout(resolve, 2000));
  }
}

function onJobEvent(jobId, message) {
  if (jobId !== state.selected) return;
  let event;
  try { event = JSON.parse(message.data); } catch { event = { message: message.data }; }
  if (!event || typeof event !== "object" || !("type" in event)) {
    event = { type: message.event, message: "", data: event };
  }
  const data = event.data || {};
  const text = event.message || (event.type === "status" ? `status: ${data.status}` : "");
  state.events.append(el("div", { class: event.level || "info" },
    `${shortTime(event.created_at).slice(11)} ${event.type === "status" ? "" : `${event.type}: `}${text}`
      .trim()));
  state.events.scrollTop = state.events.scrollHeight;
  if (!state.job) return;
  if (event.type === "progress") {
    state.job.progress = { ...state.job.progress, ...data };
    renderDetail();
  } else if (event.type === "status") {
    state.etag = null;
    refreshSelected().catch(showError);
  }
}

// --- workers ----------------------------------------------------------------------------------

async function refreshWorkers() {
  if (Date.now() - (state.workersAt || 0) < 10000) return;
  state.workersAt = Date.now();
  const result = await api("/v1/workers?limit=100");
  const workers = result.body.data;
  const live = new Map();  // device class -> live workers
  for (const w of workers) if (w.live) live.set(w.device, (live.get(w.device) || 0) + 1);
  document.getElementById("queues").textContent = ["cpu", "gpu"]
    .map((device) => `${device}: ${live.get(device) || 0} live`).join(" · ");
  const rows = workers.map((w) => el("tr", {},
    el("td", { class: "mono" }, w.hostname),
    el("td", {}, w.device_name ? `${w.device} (${w.device_name})` : w.device),
    el("td", {}, statusCell(w.status)),
    el("td", { class: "mono" }, w.queues.join(", ")),
    el("td", {}, isNumber(w.memory_bytes) ? bytes(w.memory_bytes) : "–"),
    el("td", {}, shortTime(w.last_seen_at))));
  document.getElementById("workers").replaceChildren(...(rows.length ? rows
    : [el("tr", {}, el("td", { colspan: 6, class: "muted" },
        "no worker has registered: jobs wait in their queue until one starts"))]));
}

// --- start ------------------------------------------------------------------------------------

async function tick() {
  try {
    await refreshModels();
    await refreshJobs();
    await refreshSelected();
    await refreshWorkers();
    showError(null);
  } catch (error) { showError(error); }
}

document.getElementById("api-key").value = localStorage.getItem(KEY_STORAGE) || "";
document.getElementById("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const key = document.getElementById("api-key").value.trim();
  if (key) localStorage.setItem(KEY_STORAGE, key); else localStorage.removeItem(KEY_STORAGE);
  state.modelsAt = 0;
  if (state.selected) select(state.selected);
  tick();
});
document.getElementById("status-filter").addEventListener("change", tick);
tick();
setInterval(tick, 2000);
