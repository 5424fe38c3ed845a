// DOM building and formatting. Every value from the API goes in through text nodes, never
// innerHTML; nothing here prints `null` or `undefined`: a missing value is a dash.

// Replace a node's children, skipping null/undefined/false and flattening arrays (the DOM's own
// replaceChildren would print "null" and "[object HTMLElement]").
export function fill(node, ...children) {
  node.replaceChildren();
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") node.className = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name === "value" || name === "checked") node[name] = value;
    else node.setAttribute(name, value === true ? "" : value);
  }
  return fill(node, ...children);
}

export const isNumber = (v) => typeof v === "number" && Number.isFinite(v);
export const present = (v) => v !== null && v !== undefined && v !== "";
export const text = (v, fallback = "–") => (present(v) ? String(v) : fallback);
export const shortTime = (t) => (t ? String(t).replace("T", " ").slice(0, 19) : "–");

export function duration(seconds) {
  if (!isNumber(seconds)) return "–";
  seconds = Math.max(0, Math.round(seconds));
  const h = Math.floor(seconds / 3600), m = Math.floor((seconds % 3600) / 60), s = seconds % 60;
  if (h) return `${h}h${String(m).padStart(2, "0")}m`;
  return m ? `${m}m${String(s).padStart(2, "0")}s` : `${s}s`;
}

export function bytes(n) {
  if (!isNumber(n)) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return i === 0 ? `${n} B` : `${n.toFixed(1)} ${units[i]}`;
}

// Which way is better, per metric: +1 higher is better, -1 lower is better, 0 neither.
const HIGHER = ["embedding_cosine", "accuracy", "tokens_per_s", "cosine", "held_out_accuracy"];
const LOWER = ["perplexity", "latency", "size_bytes", "bits_per_weight", "bits_per_parameter",
               "parameters", "nonzero_parameters", "peak_memory_bytes", "loss", "error",
               "latency_spread"];
export function direction(name) {
  if (HIGHER.some((h) => name === h || name.startsWith(`${h}_`))) return 1;
  if (LOWER.some((l) => name === l || name.startsWith(`${l}_`) || name.endsWith(`_${l}`))) return -1;
  return 0;
}

// Quality metrics, in the order one is picked as a job's headline.
export const QUALITY = ["perplexity", "accuracy", "embedding_cosine"];

export function metricValue(name, v) {
  if (typeof v === "boolean") return v ? "yes" : "no";
  if (!isNumber(v)) return present(v) && typeof v !== "object" ? String(v) : "–";
  if (name.endsWith("_bytes")) return bytes(v);
  if (name === "sparsity") return `${(v * 100).toFixed(1)}%`;
  if (Number.isInteger(v)) return v.toLocaleString("en");
  return Math.abs(v) >= 1000 ? v.toFixed(0) : v.toPrecision(4);
}

// The relative change from `before` to `after`, coloured by whether it is good for the metric.
export function change(name, before, after) {
  if (!isNumber(before) || !isNumber(after) || before === 0) return null;
  const rel = (after - before) / Math.abs(before);
  const dir = direction(name);
  const verdict = Math.abs(rel) < 0.0005 || dir === 0 ? "same" : rel * dir > 0 ? "good" : "bad";
  return el("span", { class: `change ${verdict}`, title: verdict === "same" ? "" :
                      `${verdict === "good" ? "better" : "worse"} (${dir > 0 ? "higher" : "lower"} is better)` },
            verdict === "same" && Math.abs(rel) < 0.0005 ? "0.0%" : `${rel > 0 ? "+" : ""}${(rel * 100).toFixed(1)}%`);
}

export function progressBar(fraction, label = "progress") {
  const pct = Math.round(Math.min(Math.max(isNumber(fraction) ? fraction : 0, 0), 1) * 100);
  return el("div", { class: "bar", role: "progressbar", "aria-label": label, "aria-valuenow": pct,
                     "aria-valuemin": 0, "aria-valuemax": 100 },
            el("span", { style: `width:${pct}%` }));
}

export const statusBadge = (status) => el("span", { class: `status ${status || ""}` }, text(status));

export function facts(pairs) {
  return el("dl", {}, pairs.filter(([, v]) => present(v))
    .map(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
}

export function table(headers, rows, empty = "Nothing here yet.") {
  return el("table", {},
    el("thead", {}, el("tr", {}, headers.map((h) => el("th", {}, h)))),
    el("tbody", {}, rows.length ? rows
      : el("tr", {}, el("td", { colspan: headers.length, class: "muted" }, empty))));
}

export function link(href, ...children) {
  return el("a", { href, "data-nav": "" }, ...children);
}

// Progress as a person reads it: the helpers' label when the worker sends one.
export function progressLabel(p) {
  if (!p) return "";
  const label = p.label || p.stage_label || p.human_stage;
  if (present(label)) return String(label);
  if (!p.stage) return "";
  const parts = [p.stage];
  if (isNumber(p.step) && isNumber(p.total_steps) && p.total_steps > 1) {
    parts.push(`${p.step}/${p.total_steps}`);
  }
  return parts.join(" ");
}

export const overallFraction = (p) => (p && isNumber(p.overall_fraction) ? p.overall_fraction
  : p && isNumber(p.fraction) ? p.fraction : 0);
export const etaSeconds = (p) => (p ? [p.eta_s, p.eta_seconds, p.eta].find(isNumber) : undefined);
