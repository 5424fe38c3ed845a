// New job: a model, recipe stages from presets (each method's fields with the contract's
// defaults, ../shared/API.md), calibration and evaluation choices, or the raw JSON itself.

import { api } from "../api.js";
import { el, fill, present } from "../dom.js";
import { names, navigate, refreshNames, showError } from "../main.js";

const weightOnly = [["bits", "int", 4, "2–8"], ["group_size", "int", 128, "-1 = per channel"], ["symmetric", "bool", true]];
const sparsity = [["sparsity", "float", 0.5, "fraction of weights set to zero"], ["pattern", ["unstructured", "2:4"], "unstructured"]];
export const METHODS = {
  dynamic_int8: { about: "INT8 weights, activations quantized at run time (CPU)", fields: [["per_channel", "bool", true]] },
  smoothquant: { about: "migrates activation outliers into weights; must precede w8a8", calibration: true, fields: [["alpha", "float", 0.5]] },
  w8a8: { about: "INT8 weights per channel and INT8 activations", fields: [["activations", ["dynamic", "static"], "dynamic"]] },
  rtn: { about: "round-to-nearest, weight-only: no data needed", fields: weightOnly },
  gptq: { about: "weight-only, error-compensating (calibration data)", calibration: true,
          fields: [...weightOnly, ["act_order", "bool", true], ["damping", "float", 0.01], ["block_size", "int", 128]] },
  awq: { about: "weight-only, activation-aware scales (calibration data)", calibration: true, fields: [...weightOnly, ["grid", "int", 20]] },
  fp8: { about: "FP8 weights, where the device supports it", fields: [["activations", ["none", "dynamic"], "none"]] },
  magnitude: { about: "prune the smallest weights", fields: sparsity },
  wanda: { about: "prune by |weight| × input norm (calibration data)", calibration: true, fields: sparsity },
  sparsegpt: { about: "prune with error compensation (calibration data)", calibration: true,
               fields: [...sparsity, ["damping", "float", 0.01], ["block_size", "int", 128]] },
  structured: { about: "remove attention heads and FFN channels: shapes really shrink", calibration: true,
                fields: [["attention_heads", "float", 0.0, "fraction removed"], ["ffn_channels", "float", 0.0, "fraction removed"],
                         ["criterion", ["activation", "magnitude"], "activation"]] },
  distill: { about: "train a smaller student from the model before this stage", noIgnore: true,
             fields: [["student.num_layers", "int", null, "layers kept from the teacher"], ["dataset_id", "dataset", null],
                      ["steps", "int", 200], ["batch_size", "int", 8], ["seq_len", "int", 256],
                      ["learning_rate", "float", 1e-4], ["temperature", "float", 2.0]] },
};

export const PRESETS = [
  ["INT8 dynamic (CPU)", [{ method: "dynamic_int8" }]],
  ["SmoothQuant + W8A8", [{ method: "smoothquant" }, { method: "w8a8" }]],
  ["4-bit GPTQ", [{ method: "gptq" }]],
  ["4-bit AWQ", [{ method: "awq" }]],
  ["4-bit RTN (no data)", [{ method: "rtn" }]],
  ["FP8", [{ method: "fp8" }]],
  ["50% sparse (Wanda)", [{ method: "wanda" }]],
  ["2:4 sparse (SparseGPT)", [{ method: "sparsegpt", pattern: "2:4" }]],
  ["25% FFN pruned + distill", [{ method: "structured", ffn_channels: 0.25 }, { method: "distill", steps: 100 }]],
];

const METRICS = ["perplexity", "embedding_cosine", "accuracy", "latency", "size"];

function getPath(obj, path) { return path.split(".").reduce((o, k) => (o && typeof o === "object" ? o[k] : undefined), obj); }
function setPath(obj, path, value) {
  const keys = path.split(".");
  const last = keys.pop();
  const target = keys.reduce((o, k) => (o[k] ??= {}), obj);
  target[last] = value;
}

function datasetOptions(selected, blank) {
  return [el("option", { value: "" }, blank),
    ...[...names.datasets.values()].filter((d) => d.status === "ready" || d.id === selected)
      .map((d) => el("option", { value: d.id, selected: d.id === selected }, `${d.name} (${d.id})`))];
}

function numberInput(name, value, step) {
  return el("input", { type: "number", name, step, value: present(value) ? String(value) : "", size: 8 });
}

// One stage's editor: a method select and that method's fields.
function stageEditor(stage, onRemove, onChange) {
  const box = el("fieldset", { class: "stage" });
  let extras = {};  // a copied stage's fields that the form does not show: kept as they are
  const render = (values) => {
    const method = values.method;
    const spec = METHODS[method];
    const shown = new Set(["method", "version", "ignore", ...spec.fields.map(([name]) => name.split(".")[0])]);
    extras = Object.fromEntries(Object.entries(values).filter(([k, v]) => !shown.has(k) && v !== null));
    const select = el("select", { name: "method", "aria-label": "method", onchange: (e) => { render({ method: e.target.value }); onChange(); } },
      Object.keys(METHODS).map((m) => el("option", { value: m, selected: m === method }, m)));
    const fields = spec.fields.map(([name, type, fallback, hint]) => {
      const value = getPath(values, name) ?? fallback;
      let input;
      if (type === "bool") input = el("input", { type: "checkbox", name, checked: Boolean(value) });
      else if (Array.isArray(type)) input = el("select", { name }, type.map((o) => el("option", { value: o, selected: o === value }, o)));
      else if (type === "dataset") input = el("select", { name }, datasetOptions(value, "the calibration set (default)"));
      else input = numberInput(name, value, type === "int" ? "1" : "any");
      input.dataset.kind = Array.isArray(type) ? "choice" : type;
      return el("label", { title: hint || "" }, el("span", {}, name), input);
    });
    const ignore = spec.noIgnore ? null : el("label", { title: "module-name patterns left alone, comma separated" },
      el("span", {}, "ignore"), el("input", { name: "ignore", placeholder: "e.g. lm_head", value: (values.ignore || []).join(", "), size: 14 }));
    fill(box, el("legend", {}, select, " ", el("span", { class: "muted small" }, spec.about),
                           el("button", { type: "button", class: "link", onclick: onRemove, "aria-label": "remove stage" }, "✕")),
                        el("div", { class: "fields" }, fields, ignore));
  };
  render(stage);
  box.read = () => {
    const method = box.querySelector("select[name=method]").value;
    const out = { method, ...structuredClone(extras) };
    for (const input of box.querySelectorAll(".fields [name]")) {
      const kind = input.dataset.kind;
      if (input.name === "ignore") {
        const list = input.value.split(",").map((s) => s.trim()).filter(Boolean);
        if (list.length) out.ignore = list;
      } else if (kind === "bool") setPath(out, input.name, input.checked);
      else if (kind === "int" || kind === "float") { if (input.value !== "") setPath(out, input.name, Number(input.value)); }
      else if (input.value !== "") setPath(out, input.name, input.value);
    }
    return out;
  };
  return box;
}

export async function submitView(view) {
  await refreshNames(true);
  let template = null;
  const from = view.query.get("from");
  if (from) template = (await api(`/v1/jobs/${encodeURIComponent(from)}`)).body;
  const wantedModel = view.query.get("model") || (template && template.model_id);

  const models = [...names.models.values()].filter((m) => m.status === "ready");
  const modelSelect = el("select", { name: "model_id", id: "model", required: true },
    models.map((m) => el("option", { value: m.id, selected: m.id === wantedModel },
      `${m.name}${m.task ? ` · ${m.task}` : ""}${m.source && m.source.type === "builtin" ? " · built-in" : ""}`)));
  const stages = el("div", { class: "stages" });
  const addStage = (stage) => {
    const editor = stageEditor(stage, () => { editor.remove(); sync(); }, sync);
    stages.append(editor);
  };
  const setRecipe = (list) => { fill(stages); list.forEach(addStage); sync(); };
  const presets = el("div", { class: "presets" }, PRESETS.map(([label, list]) =>
    el("button", { type: "button", class: "chip", onclick: () => setRecipe(list) }, label)));

  const cal = template && template.calibration || {};
  const ev = template && template.evaluation || {};
  const calBox = el("fieldset", {}, el("legend", {}, "Calibration ", el("span", { class: "muted small" }, "(for the methods that need data)")),
    el("div", { class: "fields" },
      el("label", {}, el("span", {}, "dataset"), el("select", { name: "calibration.dataset_id" }, datasetOptions(cal.dataset_id, "built-in for the model's task"))),
      el("label", {}, el("span", {}, "samples"), numberInput("calibration.num_samples", cal.num_samples ?? 128, "1")),
      el("label", {}, el("span", {}, "seq_len"), numberInput("calibration.seq_len", cal.seq_len ?? 512, "1"))));
  const picked = new Set(ev.metrics || []);
  const evBox = el("fieldset", {}, el("legend", {}, "Evaluation"),
    el("div", { class: "fields" },
      el("label", {}, el("span", {}, "dataset"), el("select", { name: "evaluation.dataset_id" }, datasetOptions(ev.dataset_id, "built-in for the model's task"))),
      el("span", { class: "checks", title: "none ticked: what fits the model's task" }, METRICS.map((m) =>
        el("label", { class: "check" }, el("input", { type: "checkbox", name: "metric", value: m, checked: picked.has(m) }), m))),
      el("label", {}, el("span", {}, "seq_len"), numberInput("evaluation.seq_len", ev.seq_len ?? 512, "1")),
      el("label", { title: "perplexity windows" }, el("span", {}, "max_windows"), numberInput("evaluation.max_windows", ev.max_windows ?? 40, "1")),
      el("label", { title: "texts for cosine / accuracy" }, el("span", {}, "max_samples"), numberInput("evaluation.max_samples", ev.max_samples ?? 256, "1")),
      el("label", {}, el("span", {}, "latency runs"), numberInput("evaluation.latency.runs", (ev.latency || {}).runs ?? 20, "1"))));
  const optBox = el("fieldset", {}, el("legend", {}, "Options"), el("div", { class: "fields" },
    el("label", {}, el("span", {}, "device"), el("select", { name: "resources.device" },
      ["any", "cpu", "gpu"].map((d) => el("option", { value: d, selected: d === ((template && template.resources) || {}).device }, d)))),
    el("label", {}, el("span", {}, "priority"), numberInput("priority", (template && template.priority) ?? 0, "1")),
    el("label", { title: "reuse an earlier identical job's result" }, el("span", {}, "cache"),
       el("input", { type: "checkbox", name: "cache", checked: template ? template.cache !== false : true }))));

  const raw = el("textarea", { id: "raw-json", rows: 18, spellcheck: "false", "aria-label": "job JSON" });
  const rawToggle = el("input", { type: "checkbox", id: "raw-mode", onchange: () => {
    if (rawToggle.checked) raw.value = JSON.stringify(build(), null, 2);
    formPart.hidden = rawToggle.checked; raw.hidden = !rawToggle.checked;
  } });
  raw.hidden = true;
  const preview = el("pre", { class: "json small", id: "json-preview" });
  const formPart = el("div", {}, el("label", { class: "field" }, el("span", {}, "Model"), modelSelect,
      el("a", { href: "/models", "data-nav": "", class: "small" }, "upload a model")),
    el("h3", {}, "Recipe"), presets, stages,
    el("button", { type: "button", onclick: () => { addStage({ method: "rtn" }); sync(); } }, "+ Add stage"),
    calBox, evBox, optBox, el("details", {}, el("summary", {}, "Request preview"), preview));

  function build() {
    const form = view.root.querySelector("form");
    const value = (name) => form.querySelector(`[name="${name}"]`);
    const num = (name) => (value(name).value === "" ? undefined : Number(value(name).value));
    const body = { model_id: modelSelect.value, recipe: { stages: [...stages.children].map((s) => s.read()) } };
    if ([...stages.children].some((s) => (METHODS[s.read().method] || {}).calibration)) {
      body.calibration = { num_samples: num("calibration.num_samples"), seq_len: num("calibration.seq_len") };
      if (value("calibration.dataset_id").value) body.calibration.dataset_id = value("calibration.dataset_id").value;
    }
    const metrics = [...form.querySelectorAll("[name=metric]:checked")].map((i) => i.value);
    body.evaluation = { seq_len: num("evaluation.seq_len"), max_windows: num("evaluation.max_windows"),
                        max_samples: num("evaluation.max_samples"), latency: { runs: num("evaluation.latency.runs") } };
    if (metrics.length) body.evaluation.metrics = metrics;
    if (value("evaluation.dataset_id").value) body.evaluation.dataset_id = value("evaluation.dataset_id").value;
    body.resources = { device: value("resources.device").value };
    body.priority = num("priority") ?? 0;
    body.cache = value("cache").checked;
    return JSON.parse(JSON.stringify(body));  // drops the undefined
  }
  function sync() {
    calBox.hidden = ![...stages.children].some((s) => (METHODS[s.read().method] || {}).calibration);
    try { preview.textContent = JSON.stringify(build(), null, 2); } catch { /* mid-edit */ }
  }

  const idempotencyKey = crypto.randomUUID ? crypto.randomUUID() : String(Math.random()).slice(2);
  const submit = el("button", { type: "submit", class: "primary", id: "submit-job" }, "Submit job");
  const form = el("form", { id: "job-form", oninput: sync, onchange: sync, onsubmit: async (event) => {
    event.preventDefault();
    submit.disabled = true;
    try {
      const body = rawToggle.checked ? JSON.parse(raw.value) : build();
      const { body: job } = await api("/v1/jobs", { method: "POST", body, headers: { "Idempotency-Key": idempotencyKey } });
      navigate(`/jobs/${job.id}`);
    } catch (error) {
      showError(error instanceof SyntaxError ? new Error(`The JSON does not parse: ${error.message}`) : error);
      submit.disabled = false;
    }
  } }, formPart, raw,
    el("div", { class: "submit-row" }, submit, el("label", { class: "check" }, rawToggle, "Edit as raw JSON")));
  view.root.append(el("section", { class: "narrow" }, el("h2", {}, template ? `New job from ${template.id}` : "New job"),
    models.length ? form : el("p", {}, "No model is ready: ", el("a", { href: "/models", "data-nav": "" }, "upload one"), ".")));
  setRecipe(template ? template.recipe.stages.map(({ version, ...s }) => { void version; return s; }) : PRESETS[0][1]);
}
