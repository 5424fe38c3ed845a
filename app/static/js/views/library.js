// Models and datasets: browse, upload (with a progress bar), look at one, delete.

import { ApiError, api, listAll, upload } from "../api.js";
import { bytes, el, facts, fill, isNumber, link, progressBar, shortTime, statusBadge, table, text } from "../dom.js";
import { navigate, refreshNames, showError } from "../main.js";
import { headline, recipeText } from "./jobs.js";

const KINDS = {
  models: { one: "model", accept: ".zip,.tar.gz,.tgz", hint: "a .zip or .tar.gz of a Hugging Face model folder (config.json, *.safetensors, tokenizer files)",
            columns: ["Name", "Status", "Task", "Architecture", "Parameters", "Size", "Source", "Created (UTC)"],
            cells: (m) => [text(m.task), text(m.architecture), isNumber(m.parameters) ? m.parameters.toLocaleString("en") : "–"] },
  datasets: { one: "dataset", accept: ".txt,.jsonl", hint: ".txt (one sample per line or paragraph) or .jsonl ({\"text\": …})",
              columns: ["Name", "Status", "Format", "Records", "Size", "Source", "Created (UTC)"],
              cells: (d) => [text(d.format), isNumber(d.num_records) ? d.num_records.toLocaleString("en") : "–"] },
};

const sourceText = (item) => (item.source && item.source.type) || "upload";

function uploadForm(kind, onDone) {
  const spec = KINDS[kind];
  const file = el("input", { type: "file", name: "file", accept: spec.accept, required: true, id: `${spec.one}-file` });
  const name = el("input", { name: "name", placeholder: "name (default: the file's)", id: `${spec.one}-name` });
  const bar = el("div", { class: "upload-progress", hidden: true });
  const button = el("button", { type: "submit", class: "primary" }, `Upload ${spec.one}`);
  return el("form", { class: "upload", id: `${spec.one}-upload`, onsubmit: async (event) => {
    event.preventDefault();
    if (!file.files.length) return;
    const chosen = file.files[0];
    const form = new FormData();
    form.append("name", name.value.trim() || chosen.name.replace(/\.(zip|tar\.gz|tgz|txt|jsonl)$/i, ""));
    form.append("file", chosen);
    button.disabled = true;
    bar.hidden = false;
    const show = (fraction, loaded, total) => fill(bar, progressBar(fraction, "upload progress"),
      el("span", { class: "small muted" }, `${Math.round(fraction * 100)}% · ${bytes(loaded)} of ${bytes(total)}`));
    show(0, 0, chosen.size);
    try {
      const created = await upload(`/v1/${kind}`, form, show);
      fill(bar, el("span", {}, `Uploaded: ${created.id}, ${text(created.status)}`));
      await refreshNames(true);
      onDone(created);
    } catch (error) {
      showError(error);
      bar.hidden = true;
    } finally {
      button.disabled = false;
    }
  } }, el("span", { class: "muted small" }, spec.hint), el("div", { class: "row" }, file, name, button), bar);
}

export async function libraryView(view, kind) {
  const spec = KINDS[kind];
  const body = el("div", {});
  view.root.append(el("section", {}, el("h2", {}, kind[0].toUpperCase() + kind.slice(1)),
    uploadForm(kind, (created) => navigate(`/${kind}/${created.id}`)), body));
  view.every(5000, async () => {
    const items = await listAll(`/v1/${kind}`);
    fill(body, table(spec.columns, items.map((item) => el("tr", {},
      el("td", {}, link(`/${kind}/${item.id}`, item.name)), el("td", {}, statusBadge(item.status)),
      spec.cells(item).map((c) => el("td", {}, c)), el("td", {}, bytes(item.size_bytes)),
      el("td", {}, sourceText(item)), el("td", { class: "muted" }, shortTime(item.created_at)))),
      `No ${kind} yet.`));
  });
}

// A model's validation in the worker: a bar with the server's label and ETA while it runs.
function validation(item) {
  const p = item.progress;
  if (!p) return null;
  if (item.status !== "validating") return text(p.label);
  const eta = isNumber(p.eta_s) ? ` · ETA ${Math.round(p.eta_s)}s` : "";
  return el("div", { class: "validation-progress" }, progressBar(p.fraction, "validation progress"),
    el("span", { class: "small muted" }, `${Math.round(p.fraction * 100)}% · ${text(p.label)}${eta}`));
}

export async function itemView(view, kind, id) {
  const spec = KINDS[kind];
  let item;
  try {
    item = (await api(`/v1/${kind}/${encodeURIComponent(id)}`)).body;
  } catch (error) {
    if (error instanceof ApiError && error.status === 404) {
      view.root.append(el("section", {}, el("h2", {}, `No ${spec.one} ${id}`), link(`/${kind}`, `All ${kind}`)));
      return;
    }
    throw error;
  }
  const section = el("section", {});
  view.root.append(section);
  const render = (jobs) => fill(section, 
    el("h2", {}, item.name, statusBadge(item.status), el("span", { class: "actions" },
      kind === "models" && item.status === "ready" ? el("a", { class: "button primary", href: `/new?model=${item.id}`, "data-nav": "" }, "New job with this model") : null,
      sourceText(item) === "builtin" ? null : el("button", { class: "danger", onclick: remove }, "Delete"))),
    facts([["ID", el("span", { class: "mono" }, item.id)], ["Status", text(item.status)],
           ...spec.columns.slice(2, -3).map((c, i) => [c, spec.cells(item)[i]]),
           ["Size", bytes(item.size_bytes)], ["sha256", item.sha256 ? el("span", { class: "mono small" }, item.sha256) : null],
           ["Source", sourceText(item)], ["Created", shortTime(item.created_at)],
           ["Validation", validation(item)],
           ["Error", item.error ? `${text(item.error.code)}: ${text(item.error.message, "")}` : null]]),
    kind === "models" ? [el("h3", {}, "Jobs on this model"), table(["Job", "Status", "Recipe", "Headline", "Created (UTC)"],
      jobs.map((j) => el("tr", {}, el("td", { class: "mono" }, link(`/jobs/${j.id}`, j.id)), el("td", {}, statusBadge(j.status)),
        el("td", {}, recipeText(j)), el("td", {}, headline(j)), el("td", { class: "muted" }, shortTime(j.created_at)))),
      "No jobs yet.")] : null);
  async function remove() {
    if (!confirm(`Delete ${spec.one} ${item.name}?`)) return;
    try { await api(`/v1/${kind}/${encodeURIComponent(id)}`, { method: "DELETE" }); await refreshNames(true); navigate(`/${kind}`); }
    catch (error) { showError(error); }
  }
  view.every(4000, async () => {
    if (item.status === "validating") item = (await api(`/v1/${kind}/${encodeURIComponent(id)}`)).body;
    const jobs = kind === "models" ? (await api(`/v1/jobs?model_id=${encodeURIComponent(id)}&limit=50`)).body.data : [];
    render(jobs);
  });
}
