// The job list (status filter, headline metric, live progress, pick jobs to compare) and the
// side-by-side comparison of two or more jobs.

import { api } from "../api.js";
import { compareChart } from "../charts.js";
import { QUALITY, bytes, change, el, etaSeconds, duration, fill, isNumber, link, metricValue,
         overallFraction, progressBar, progressLabel, shortTime, statusBadge, table, text } from "../dom.js";
import { modelName, navigate, refreshNames } from "../main.js";

export const recipeText = (job) =>
  ((job.recipe && job.recipe.stages) || []).map((s) => s.method).join(" → ") || "–";

// The one number a job is judged by: its quality metric against the baseline, and its size.
export function headline(job) {
  const m = job.metrics || {}, before = m.baseline || {}, after = m.compressed || {};
  const quality = QUALITY.find((q) => isNumber(after[q]));
  const parts = [];
  if (quality) {
    parts.push(el("span", { class: "headline" }, `${quality.replace("embedding_", "")} ${metricValue(quality, after[quality])} `,
                  change(quality, before[quality], after[quality])));
  }
  if (isNumber(after.size_bytes)) {
    parts.push(el("span", { class: "headline muted" }, ` · ${bytes(after.size_bytes)} `,
                  change("size_bytes", before.size_bytes, after.size_bytes)));
  }
  if (m.reused_from) parts.push(el("span", { class: "muted small", title: `same inputs as ${m.reused_from}` }, " · reused"));
  return parts.length ? parts : el("span", { class: "muted" }, "–");
}

export function liveProgress(job) {
  const p = job.progress || {};
  const eta = etaSeconds(p);
  return [progressBar(overallFraction(p)),
          el("span", { class: "muted small" }, [progressLabel(p), `${Math.round(overallFraction(p) * 100)}%`,
                                               isNumber(eta) ? `ETA ${duration(eta)}` : ""].filter(Boolean).join(" · "))];
}

export async function jobsView(view) {
  const picked = new Set();
  const filter = el("select", { "aria-label": "Filter by status", onchange: () => refresh() },
    ["", "queued", "running", "cancelling", "succeeded", "failed", "cancelled"]
      .map((s) => el("option", { value: s }, s || "all statuses")));
  const compareButton = el("button", { disabled: true, onclick: () =>
    navigate(`/compare?jobs=${[...picked].join(",")}`) }, "Compare selected");
  const body = el("div", {});
  const more = el("button", { hidden: true, onclick: () => refresh(true) }, "Load more");
  const updated = el("span", { class: "muted small" });
  view.root.append(el("section", {},
    el("h2", {}, "Jobs", filter, compareButton, el("a", { href: "/new", "data-nav": "", class: "button primary" }, "New job"), updated),
    body, more));
  let jobs = [], hasMore = false;

  const row = (job) => {
    const live = job.status === "running" || job.status === "cancelling";
    const box = el("input", { type: "checkbox", "aria-label": `select ${job.id}`, checked: picked.has(job.id),
      onchange: (e) => { if (e.target.checked) picked.add(job.id); else picked.delete(job.id);
                         compareButton.disabled = picked.size < 2; } });
    return el("tr", { "data-job": job.id },
      el("td", {}, box),
      el("td", { class: "mono" }, link(`/jobs/${job.id}`, job.id)),
      el("td", {}, statusBadge(job.status)),
      el("td", {}, link(`/models/${job.model_id}`, modelName(job.model_id))),
      el("td", {}, recipeText(job)),
      el("td", {}, live ? liveProgress(job) : headline(job)),
      el("td", { class: "muted" }, shortTime(job.created_at)));
  };

  async function refresh(append = false) {
    await refreshNames();
    // Refreshing keeps as many jobs as are shown (up to 100); "Load more" adds a page.
    const limit = append ? 25 : Math.min(100, Math.max(25, jobs.length));
    const query = new URLSearchParams({ limit: String(limit) });
    if (filter.value) query.set("status", filter.value);
    if (append && jobs.length) query.set("after", jobs[jobs.length - 1].id);
    const { body: page } = await api(`/v1/jobs?${query}`);
    jobs = append ? jobs.concat(page.data) : page.data;
    hasMore = page.has_more;
    fill(body, table(["", "Job", "Status", "Model", "Recipe", "Headline (vs baseline) / progress", "Created (UTC)"],
      jobs.map(row), filter.value ? `No ${filter.value} jobs.` : "No jobs yet: start one with New job."));
    more.hidden = !hasMore;
    updated.textContent = `updated ${new Date().toLocaleTimeString()}`;
  }
  view.every(3000, () => refresh());
}

export async function compareView(view) {
  const ids = (view.query.get("jobs") || "").split(",").filter(Boolean);
  await refreshNames();
  const jobs = await Promise.all(ids.map(async (id) => (await api(`/v1/jobs/${encodeURIComponent(id)}`)).body));
  const section = el("section", {}, el("h2", {}, `Comparing ${jobs.length} jobs`));
  view.root.append(section);
  if (jobs.length < 2) {
    section.append(el("p", { class: "muted" }, "Pick two or more jobs in the ", link("/", "job list"), " to compare them."));
    return;
  }
  const metricNames = [...new Set(jobs.flatMap((j) => Object.keys((j.metrics || {}).compressed || {})))]
    .filter((n) => jobs.some((j) => isNumber(((j.metrics || {}).compressed || {})[n])));
  const cell = (job, name) => {
    const m = job.metrics || {}, b = (m.baseline || {})[name], a = (m.compressed || {})[name];
    if (!isNumber(a)) return el("td", { class: "muted" }, "–");
    return el("td", {}, metricValue(name, a), " ", change(name, b, a));
  };
  const header = ["", ...jobs.map((j) => link(`/jobs/${j.id}`, j.id))];
  const rows = [
    el("tr", {}, el("th", {}, "Model"), jobs.map((j) => el("td", {}, modelName(j.model_id)))),
    el("tr", {}, el("th", {}, "Recipe"), jobs.map((j) => el("td", {}, recipeText(j)))),
    el("tr", {}, el("th", {}, "Settings"), jobs.map((j) => el("td", { class: "small mono wrap" },
      ((j.recipe && j.recipe.stages) || []).map((s) => Object.entries(s)
        .filter(([k, v]) => !["method", "version", "ignore", "modules"].includes(k) && v !== null && typeof v !== "object")
        .map(([k, v]) => `${k}=${v}`).join(" ")).join(" | ") || "–"))),
    el("tr", {}, el("th", {}, "Status"), jobs.map((j) => el("td", {}, statusBadge(j.status)))),
    ...metricNames.map((name) => el("tr", {}, el("th", {}, name), jobs.map((j) => cell(j, name)))),
  ];
  section.append(el("div", { class: "scroll" }, el("table", { class: "compare" },
    el("thead", {}, el("tr", {}, header.map((h) => el("th", {}, h)))), el("tbody", {}, rows))));
  const chartable = metricNames.filter((n) => jobs.some((j) => isNumber(((j.metrics || {}).baseline || {})[n]))
    && !/_p(10|90|95)$/.test(n) && !["latency_spread", "latency_runs"].includes(n));
  if (chartable.length) section.append(compareChart(chartable, jobs.map((j) => ({ label: j.id, metrics: j.metrics || {} }))));
  else section.append(el("p", { class: "muted" }, text(null, "These jobs have no metrics yet.")));
}
