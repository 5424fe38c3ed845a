// One job: live progress (its event stream), stage timeline, metrics with charts, distillation
// curves, per-layer charts, search trials, artifacts, and cancel / retry / delete.

import { ApiError, api, apiKey, downloadWithKey, followEvents } from "../api.js";
import { baselineVsCompressed, layerChart, lineChart, trialsChart } from "../charts.js";
import { QUALITY, bytes, change, duration, el, etaSeconds, facts, fill, isNumber, link, metricValue,
         overallFraction, present, progressBar, progressLabel, shortTime, statusBadge, table, text } from "../dom.js";
import { modelName, navigate, refreshNames, showError } from "../main.js";
import { recipeText } from "./jobs.js";

const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const SETTINGS = new Set(["runtime", "measured_on", "latency_warning", "device", "dataset_sha256"]);

export async function jobView(view, jobId) {
  await refreshNames();
  const state = { job: null, etag: null, events: [], artifacts: [], mode: "", curvesAt: 0 };
  const part = (name) => el("div", { class: `part part-${name}` });
  const parts = Object.fromEntries(["head", "progress", "metrics", "curves", "layers", "trials", "artifacts", "spec"]
    .map((n) => [n, part(n)]));
  const log = el("div", { id: "events", class: "log" });
  const mode = el("span", { class: "muted small", id: "stream-mode" });
  view.root.append(el("section", { class: "job" }, Object.values(parts).slice(0, 2),
    el("div", { class: "grid2" }, el("div", {}, parts.metrics, parts.curves, parts.layers, parts.trials),
       el("div", {}, parts.artifacts, el("h3", {}, "Events ", mode), log, parts.spec))));

  async function refresh() {
    const result = await api(`/v1/jobs/${encodeURIComponent(jobId)}`, { etag: state.etag });
    if (result.notModified) return;
    const before = state.job;
    state.job = result.body;
    state.etag = result.etag;
    if ((state.job.artifact_ids || []).length && (!before || before.status !== state.job.status || !state.artifacts.length)) {
      state.artifacts = (await api(`/v1/jobs/${encodeURIComponent(jobId)}/artifacts`)).body.data;
    }
    renderHead();
    renderProgress();
    if (!before || JSON.stringify(before.metrics) !== JSON.stringify(state.job.metrics)) renderResults();
    renderArtifacts();
    if (!before) fill(parts.spec, el("details", {}, el("summary", {}, "Job specification (JSON)"),
      el("pre", { class: "json" }, JSON.stringify(Object.fromEntries(["model_id", "recipe", "calibration", "evaluation",
        "targets", "export", "priority", "metadata"].filter((k) => present(state.job[k])).map((k) => [k, state.job[k]])), null, 2))));
  }

  function renderHead() {
    const job = state.job;
    const live = !TERMINAL.has(job.status);
    const m = job.metrics || {};
    const runtime = job.started_at ? ((job.finished_at ? Date.parse(job.finished_at) : Date.now()) - Date.parse(job.started_at)) / 1000 : null;
    fill(parts.head, 
      el("h2", {}, el("span", { class: "mono" }, job.id), statusBadge(job.status),
        el("span", { class: "actions" },
          live && job.status !== "cancelling" ? el("button", { class: "danger", onclick: cancel }, "Cancel") : null,
          !live ? el("button", { onclick: retry }, "Retry") : null,
          el("a", { class: "button", href: `/new?from=${job.id}`, "data-nav": "" }, "Edit as new job"),
          !live ? el("button", { class: "danger", onclick: remove }, "Delete") : null)),
      facts([
        ["Model", link(`/models/${job.model_id}`, modelName(job.model_id))],
        ["Recipe", recipeText(job)],
        ["Attempt", isNumber(job.attempt) ? `${job.attempt} of ${text(job.max_attempts)}` : null],
        ["Created", shortTime(job.created_at)],
        ["Started", job.started_at ? shortTime(job.started_at) : null],
        ["Finished", job.finished_at ? shortTime(job.finished_at) : null],
        ["Run time", isNumber(runtime) ? duration(runtime) : null],
        ["Reused", m.reused_from ? ["same inputs as ", link(`/jobs/${m.reused_from}`, m.reused_from)] : null],
        ["Error", job.error ? el("span", { class: "error-text" }, `${job.error.code}: ${text(job.error.message, "")}`) : null],
      ]));
  }

  // --- progress: bar, stage timeline, steps within the current stage ---------------------------
  function stageNames(job) {
    const methods = ((job.recipe && job.recipe.stages) || []).map((s) => s.method);
    const known = ["load", "baseline", ...methods, "export", "evaluate"];
    const seen = [];
    for (const e of state.events) {
      const d = e.type === "progress" ? e.data || {} : null;
      if (d && isNumber(d.stage_index) && d.stage) seen[d.stage_index] = d.stage;
    }
    const total = (job.progress && job.progress.num_stages) || known.length;
    return Array.from({ length: Math.max(total, seen.length) }, (_, i) => seen[i] || known[i] || `stage ${i + 1}`);
  }

  function timeline(job) {
    const stages = stageNames(job);
    const times = stages.map(() => ({ first: null, last: null }));
    for (const e of state.events) {
      const d = e.type === "progress" ? e.data || {} : null;
      if (!d || !isNumber(d.stage_index) || !times[d.stage_index]) continue;
      const t = Date.parse(e.created_at);
      times[d.stage_index].first ??= t;
      times[d.stage_index].last = t;
    }
    const p = job.progress || {};
    const currentIndex = job.status === "succeeded" ? stages.length : isNumber(p.stage_index) ? p.stage_index : -1;
    const end = job.finished_at ? Date.parse(job.finished_at) : Date.now();
    return el("ol", { class: "timeline", "aria-label": "stage timeline" }, stages.map((name, i) => {
      const next = times.slice(i + 1).find((t) => t.first !== null);
      const start = times[i].first;
      const stop = i < currentIndex ? (next ? next.first : TERMINAL.has(job.status) ? end : times[i].last)
        : i === currentIndex ? end : null;
      const seconds = start !== null && stop !== null ? (stop - start) / 1000 : null;
      const stateName = i < currentIndex ? "done" : i === currentIndex ? (TERMINAL.has(job.status) ? job.status : "current") : "pending";
      return el("li", { class: stateName, style: `flex-grow:${Math.max(1, Math.min(20, (seconds || 0) / 5))}`,
                        title: `${name}: ${stateName}${isNumber(seconds) ? `, ${duration(seconds)}` : ""}` },
        el("b", {}, name), el("span", {}, isNumber(seconds) ? duration(seconds) : stateName === "pending" ? "…" : ""));
    }));
  }

  function renderProgress() {
    const job = state.job;
    if (!job) return;
    const p = job.progress || {};
    const live = !TERMINAL.has(job.status);
    const eta = etaSeconds(p);
    const within = isNumber(p.step) && isNumber(p.total_steps) && p.total_steps > 1;
    fill(parts.progress, 
      live ? el("div", { class: "progress" },
        progressBar(overallFraction(p), "job progress"),
        el("div", {}, el("b", {}, `${Math.round(overallFraction(p) * 100)}%`), " ",
          [progressLabel(p), isNumber(eta) ? `ETA ${duration(eta)}` : ""].filter(Boolean).join(" · ")),
        within ? el("div", { class: "steps" }, el("span", { class: "muted small" }, `${text(p.stage, "stage")}: step ${p.step} of ${p.total_steps}`),
                    progressBar(p.step / p.total_steps, "stage progress")) : null,
        present(p.message) ? el("div", { class: "muted" }, p.message) : null) : null,
      state.events.length || job.status === "succeeded" ? timeline(job) : null);
  }

  // --- results -----------------------------------------------------------------------------------
  function renderResults() {
    const m = state.job.metrics || {};
    const before = m.baseline || {}, after = m.compressed || {};
    const metricNames = [...new Set([...Object.keys(before), ...Object.keys(after)])]
      .filter((n) => !SETTINGS.has(n) && (isNumber(before[n]) || isNumber(after[n])));
    if (!metricNames.length) { fill(parts.metrics); }
    else {
      // A pipeline's quality after each of its stages (measured between stages), before the end.
      const methods = ((state.job.recipe || {}).stages || []).map((s) => s.method);
      const between = (m.stages || []).map((s, i) => [methods[i], s && s.metrics]).filter(([, v]) => v && typeof v === "object");
      const steps = between.length > 1 ? between : [];
      const rows = metricNames.map((n) => el("tr", {}, el("td", {}, n), el("td", {}, metricValue(n, before[n])),
        steps.map(([, v]) => el("td", { class: "muted" }, isNumber(v[n]) ? metricValue(n, v[n]) : "")),
        el("td", {}, metricValue(n, after[n])), el("td", {}, change(n, before[n], after[n]) || "")));
      const warnings = [before.latency_warning, after.latency_warning].filter(present);
      const charted = metricNames.filter((n) => isNumber(before[n]) && isNumber(after[n]) && before[n] !== 0
        && !/_p(10|90|95)$/.test(n) && !["latency_spread", "latency_runs"].includes(n));
      fill(parts.metrics, el("h3", {}, "Metrics"),
        table(["Metric", "Baseline", ...steps.map(([method]) => `after ${method}`), "Compressed", "Change"], rows),
        warnings.map((w) => el("p", { class: "warning-text" }, w)),
        m.targets && typeof m.targets === "object" ? el("p", { class: "targets" }, "Targets: ",
          Object.entries(m.targets).map(([name, t]) => el("span", { class: `change ${t && t.met === true ? "good" : t && t.met === false ? "bad" : "same"}` },
            `${name} ${t && t.met === true ? "met" : t && t.met === false ? "missed" : "not measured"} `))) : null,
        m.settings ? el("p", { class: "muted small" }, "Measured with ", Object.entries(m.settings)
          .filter(([k, v]) => present(v) && typeof v !== "object" && !k.endsWith("sha256")).map(([k, v]) => `${k} ${v}`).join(", ")) : null,
        charted.length ? baselineVsCompressed(charted, before, after) : null);
    }
    renderLayers(m);
    renderTrials(m);
    renderCurves(true);
  }

  function renderLayers(m) {
    const charts = [];
    (m.stages || []).forEach((stage, i) => {
      if (!stage || typeof stage !== "object") return;
      const method = (((state.job.recipe || {}).stages || [])[i] || {}).method || `stage ${i + 1}`;
      for (const [key, value] of Object.entries(stage)) {
        if (!value || typeof value !== "object" || Array.isArray(value)) continue;
        const entries = Object.entries(value);
        if (!entries.length) continue;
        if (entries.every(([, v]) => isNumber(v)) && /^layer_/.test(key)) {
          charts.push(layerChart(`layers-${i}-${key}`, `${method}: ${key.replace(/^layer_/, "").replace(/_/g, " ")} per layer`,
            entries.map(([n]) => n), entries.map(([, v]) => v), key.replace(/^layer_/, "")));
        } else if (entries.every(([, v]) => v && typeof v === "object")) {
          const fields = Object.keys(entries[0][1]).filter((f) => /error|sparsity/.test(f) && entries.every(([, v]) => isNumber(v[f])));
          for (const f of fields) {
            charts.push(layerChart(`layers-${i}-${key}-${f}`, `${method}: ${f.replace(/_/g, " ")} per layer`,
              entries.map(([n]) => n), entries.map(([, v]) => v[f]), f.replace(/_/g, " ")));
          }
        }
      }
    });
    fill(parts.layers, ...(charts.length ? [el("h3", {}, "Per layer"), ...charts] : []));
  }

  function renderTrials(m) {
    const trials = Array.isArray(m.trials) ? m.trials : [];
    if (!trials.length) { fill(parts.trials); return; }
    const quality = QUALITY.find((q) => trials.some((t) => isNumber((t.metrics || {})[q])))
      || Object.keys(trials[0].metrics || {})[0];
    const sizeKey = trials.some((t) => isNumber(t.size_bytes)) ? "size_bytes" : "bits_per_weight";
    const rows = trials.map((t) => el("tr", { class: t.pareto ? "pareto" : "" },
      el("td", {}, text(t.index)), el("td", {}, text(t.kind)),
      el("td", { class: "small mono wrap" }, ((t.recipe && t.recipe.stages) || []).map((s) => s.method).join(" → ") || "–"),
      el("td", {}, metricValue(quality || "", (t.metrics || {})[quality])),
      el("td", {}, bytes(t.size_bytes)), el("td", {}, metricValue("bits_per_weight", t.bits_per_weight)),
      el("td", {}, duration(t.seconds)), el("td", {}, t.held === true ? "yes" : t.held === false ? "no" : "–"),
      el("td", {}, t.pareto ? "★" : "")));
    fill(parts.trials, el("h3", {}, `Search trials (${trials.length})`),
      m.targets_met !== undefined ? el("p", {}, `Targets met: ${m.targets_met ? "yes" : "no"}`) : null,
      quality ? trialsChart(trials, quality, sizeKey) : null,
      el("div", { class: "scroll" }, table(["#", "Kind", "Recipe", quality || "quality", "Size", "Bits/weight", "Time", "Held", "Pareto"], rows)));
  }

  // Distillation: training loss from the progress events; held-out quality from the stage's
  // history (metrics) or, while it runs, from the events.
  function renderCurves(force = false) {
    // At most one redraw per 1.5 s while events pour in, and always one after the last of them.
    clearTimeout(state.curvesTimer);
    const wait = state.curvesAt + 1500 - Date.now();
    if (!force && wait > 0) { state.curvesTimer = setTimeout(() => renderCurves(true), wait); return; }
    state.curvesAt = Date.now();
    const loss = [], heldFromEvents = [];
    for (const e of state.events) {
      const d = e.type === "progress" && e.data && e.data.details;
      if (!d) continue;
      if (isNumber(d.step) && isNumber(d.loss)) loss.push([d.step, d.loss]);
      if (d.held_out && isNumber(d.held_out.step)) heldFromEvents.push(d.held_out);
    }
    const stageHeld = ((state.job.metrics || {}).stages || []).flatMap((s) => (s && Array.isArray(s.held_out) ? s.held_out : []));
    const held = stageHeld.length ? stageHeld : heldFromEvents;
    // The held-out loss beside the training loss, and one quality measure on its own axis.
    const numeric = held.length ? Object.keys(held[0]).filter((k) => isNumber(held[0][k])) : [];
    const heldKeys = [numeric.includes("loss") ? "loss" : null,
                      ["perplexity", "cosine", "accuracy"].find((k) => numeric.includes(k))].filter(Boolean);
    if (!loss.length && !heldKeys.length) { fill(parts.curves); return; }
    const series = [];
    if (loss.length) series.push({ label: "training loss", points: loss, scale: "loss", axisLabel: "loss" });
    for (const key of heldKeys) {
      const isLoss = /loss/.test(key);
      series.push({ label: `held-out ${key}`, points: held.map((h) => [h.step, h[key]]),
                    scale: isLoss ? "loss" : "held", axisLabel: isLoss ? "loss" : `held-out ${key}` });
    }
    fill(parts.curves, el("h3", {}, "Distillation"),
      lineChart("distillation", "Training loss and held-out quality by step", "step", series));
  }

  function renderArtifacts() {
    const list = state.artifacts || [];
    fill(parts.artifacts, ...(list.length ? [el("h3", {}, "Artifacts"), table(["Kind", "File", "Size", "sha256"],
      list.map((a) => {
        const href = `/v1/artifacts/${encodeURIComponent(a.id)}/content`;
        const name = a.filename || a.id;
        return el("tr", {}, el("td", {}, text(a.kind)),
          el("td", {}, el("a", { href, download: name, class: "download", onclick: (e) => {
            if (!apiKey.get()) return;
            e.preventDefault();
            downloadWithKey(href, name).catch(showError);
          } }, name)),
          el("td", {}, bytes(a.size_bytes)), el("td", { class: "mono muted", title: text(a.sha256, "") }, text(a.sha256, "").slice(0, 12) || "–"));
      }))] : []));
  }

  // --- events ----------------------------------------------------------------------------------
  function onEvent(event) {
    state.events.push(event);
    const data = event.data || {};
    const message = present(event.message) ? event.message : event.type === "status" ? `status: ${text(data.status)}` : "";
    const atBottom = log.scrollTop + log.clientHeight >= log.scrollHeight - 8;
    log.append(el("div", { class: `${event.level || "info"} ev-${event.type}` },
      el("span", { class: "muted" }, shortTime(event.created_at).slice(11)), " ",
      event.type === "status" || event.type === "progress" ? "" : `${event.type}: `, message));
    if (atBottom) log.scrollTop = log.scrollHeight;
    if (!state.job) return;
    if (event.type === "progress") {
      state.job.progress = { ...(state.job.progress || {}), ...data };
      renderProgress();
      if (data.details) renderCurves();
    } else if (event.type === "status") {
      state.etag = null;
      refresh().catch(showError);
    }
  }

  async function cancel() {
    if (!confirm(`Cancel ${jobId}?`)) return;
    await act(() => api(`/v1/jobs/${encodeURIComponent(jobId)}/cancel`, { method: "POST" }));
  }
  async function retry() {
    await act(async () => navigate(`/jobs/${(await api(`/v1/jobs/${encodeURIComponent(jobId)}/retry`, { method: "POST" })).body.id}`));
  }
  async function remove() {
    if (!confirm(`Delete ${jobId} and its artifacts?`)) return;
    await act(async () => { await api(`/v1/jobs/${encodeURIComponent(jobId)}`, { method: "DELETE" }); navigate("/"); });
  }
  async function act(fn) {
    try { await fn(); state.etag = null; if (!view.signal.aborted) await refresh(); } catch (error) { showError(error); }
  }

  try {
    await refresh();
  } catch (error) {
    if (error instanceof ApiError && error.status === 404) {
      fill(view.root, el("section", {}, el("h2", {}, `No job ${jobId}`), el("p", {}, link("/", "Back to the jobs"))));
      return;
    }
    throw error;
  }
  followEvents(jobId, {
    signal: view.signal, onEvent,
    onMode: (m) => { mode.textContent = m === "live" ? "● live" : "polling"; mode.dataset.mode = m; mode.dataset.polled = m === "polling" ? "yes" : mode.dataset.polled || ""; },
    isDone: () => state.job && TERMINAL.has(state.job.status),
  }).then(() => { if (!view.signal.aborted) { mode.textContent = "complete"; mode.dataset.mode = "done"; } }, showError);
  // The job itself (status, metrics) is polled too: cheap with its ETag (304 when unchanged).
  view.every(4000, () => (state.job && TERMINAL.has(state.job.status) ? null : refresh()));
}
