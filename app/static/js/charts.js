// Charts on uPlot (vendored: /static/vendor/uplot-1.6.32, loaded as the global `uPlot`). Each
// function returns a container that draws its chart once it has a width, and redraws on resize.

import { direction, el, isNumber, metricValue } from "./dom.js";

const COLORS = { base: "#98a2b3", accent: "#2f6fed", good: "#12805c", bad: "#c4320a",
                 other: "#7a5af8", muted: "#d0d5dd" };

function chartBox(name, title, makeOptions, data, { height = 220, note } = {}) {
  const holder = el("div", { class: "chart-plot" });
  const box = el("figure", { class: "chart", "data-chart": name },
                 el("figcaption", {}, title), holder, note ? el("p", { class: "muted" }, note) : null);
  let plot = null;
  const draw = () => {
    const width = Math.floor(holder.clientWidth);
    if (!width || !window.uPlot) return;
    if (plot) { plot.setSize({ width, height }); return; }
    plot = new window.uPlot({ width, height, ...makeOptions() }, data, holder);
  };
  new ResizeObserver(draw).observe(holder);
  return box;
}

const indexAxis = (names) => ({
  values: (u, ticks) => ticks.map((t) => (Number.isInteger(t) && names[t] !== undefined ? names[t] : "")),
  splits: () => names.map((_, i) => i),
  gap: 4, size: 40,
});

const bars = (size, align, fill) => window.uPlot.paths.bars({
  size: [size, 60], align, gap: 1,
  disp: fill ? { fill: { unit: 3, values: fill } } : undefined,
});

// Each metric's compressed value as a percentage of its baseline, green where the change is good.
export function baselineVsCompressed(names, baseline, compressed) {
  const x = names.map((_, i) => i);
  const base = names.map((n) => (isNumber(baseline[n]) && baseline[n] !== 0 ? 100 : null));
  const comp = names.map((n) => (isNumber(baseline[n]) && isNumber(compressed[n]) && baseline[n] !== 0
    ? (100 * compressed[n]) / baseline[n] : null));
  const colors = names.map((n, i) => {
    const dir = direction(n);
    if (comp[i] === null || dir === 0 || Math.abs(comp[i] - 100) < 0.05) return COLORS.accent;
    return (comp[i] - 100) * dir > 0 ? COLORS.good : COLORS.bad;
  });
  const raw = (values) => (u, v, _s, i) => (i === null || i === undefined ? "" : metricValue(names[i], values[names[i]]));
  // Horizontal bars: one row per metric, its name on the left, first metric on top.
  return chartBox("baseline-vs-compressed", "Compressed as % of baseline (green: better, red: worse)", () => ({
    scales: { x: { time: false, ori: 1, dir: -1, range: [-0.5, names.length - 0.5] },
              y: { ori: 0, dir: 1, range: (u, lo, hi) => [0, Math.max(110, hi * 1.05)] } },
    axes: [{ ...indexAxis(names), side: 3, size: 170 }, { side: 2, label: "% of baseline", size: 40 }],
    legend: { live: true },
    cursor: { points: { show: false } },
    series: [
      { label: "metric", value: (u, v) => (isNumber(v) ? names[v] : "") },
      { label: "baseline", fill: COLORS.muted, stroke: COLORS.base, width: 0, paths: bars(0.4, -1), points: { show: false }, value: raw(baseline) },
      { label: "compressed", fill: COLORS.accent, stroke: COLORS.accent, width: 0,
        paths: bars(0.4, 1, () => colors), points: { show: false }, value: raw(compressed) },
    ],
  }), [x, base, comp], { height: 70 + 30 * names.length });
}

// Lines over a shared x, each series [{label, points: [[x, y], ...], scale, color}]; series on a
// second scale get a right-hand axis.
export function lineChart(name, title, xLabel, series, { height = 220 } = {}) {
  const tables = series.map((s) => {
    const pts = s.points.filter(([px, py]) => isNumber(px) && isNumber(py)).sort((a, b) => a[0] - b[0]);
    return [pts.map((p) => p[0]), pts.map((p) => p[1])];
  });
  const data = window.uPlot.join(tables);
  const scales = [...new Set(series.map((s) => s.scale || "y"))];
  const palette = [COLORS.accent, COLORS.bad, COLORS.good, COLORS.other];
  return chartBox(name, title, () => ({
    scales: { x: { time: false } },
    axes: [{ label: xLabel }, ...scales.map((scale, i) => ({
      scale, label: series.find((s) => (s.scale || "y") === scale).axisLabel || "",
      side: i === 0 ? 3 : 1, grid: { show: i === 0 }, size: 60 }))],
    series: [{ label: xLabel }, ...series.map((s, i) => ({
      label: s.label, scale: s.scale || "y", stroke: s.color || palette[i % palette.length], width: 2,
      spanGaps: true, points: { show: s.points.length < 40, size: 6 } }))],
  }), data, { height });
}

// One bar per layer (sparsity or error), names on hover.
export function layerChart(name, title, layerNames, values, label) {
  const x = layerNames.map((_, i) => i);
  return chartBox(name, title, () => ({
    scales: { x: { time: false, range: [-0.5, layerNames.length - 0.5] } },
    axes: [{ label: "layer (in model order)", values: (u, t) => t.map((v) => (Number.isInteger(v) ? v : "")) },
           { label, size: 60 }],
    series: [{ label: "layer", value: (u, v) => (isNumber(v) ? layerNames[v] || "" : "") },
             { label, fill: COLORS.accent, stroke: COLORS.accent, width: 0, paths: bars(0.8, 0), points: { show: false } }],
  }), [x, values], { note: `${layerNames.length} layers; hover a bar for its name` });
}

// Search trials: quality against size; the Pareto front as a line; trials that held the targets
// filled, the rest hollow.
export function trialsChart(trials, quality, sizeKey) {
  const rows = trials.map((t) => ({ t, x: t[sizeKey], y: (t.metrics || {})[quality] }))
    .filter((r) => isNumber(r.x) && isNumber(r.y)).sort((a, b) => a.x - b.x);
  const x = rows.map((r) => r.x);
  const pick = (keep) => rows.map((r) => (keep(r.t) ? r.y : null));
  const held = pick((t) => t.held !== false), missed = pick((t) => t.held === false);
  const front = pick((t) => t.pareto === true);
  const sizeLabel = sizeKey === "size_bytes" ? "size (MiB)" : sizeKey.replace(/_/g, " ");
  const xs = sizeKey === "size_bytes" ? x.map((v) => v / 1048576) : x;
  const dots = (color, fill) => ({ stroke: color, fill, width: 0, paths: () => null,
                                   points: { show: true, size: 9, stroke: color, fill, width: 2 } });
  return chartBox("trials", `Search trials: ${quality} vs ${sizeLabel}`, () => ({
    scales: { x: { time: false } },
    axes: [{ label: sizeLabel }, { label: quality, size: 60 }],
    series: [{ label: sizeLabel },
      { label: "held the targets", ...dots(COLORS.good, COLORS.good) },
      { label: "missed", ...dots(COLORS.bad, "#fff") },
      { label: "Pareto front", stroke: COLORS.accent, width: 2, spanGaps: true, points: { show: false } }],
  }), [xs, held, missed, front], { height: 260,
    note: `${rows.length} trials with a ${quality} and a ${sizeLabel.split(" (")[0]}` });
}

// Several jobs' metrics as % of each job's own baseline: one marker series per job.
export function compareChart(names, jobs) {
  const x = names.map((_, i) => i);
  const palette = [COLORS.accent, COLORS.bad, COLORS.good, COLORS.other, "#f79009", "#0e9384"];
  const series = jobs.map(({ metrics }) => names.map((n) => {
    const b = (metrics.baseline || {})[n], a = (metrics.compressed || {})[n];
    return isNumber(a) && isNumber(b) && b !== 0 ? (100 * a) / b : null;
  }));
  return chartBox("compare", "Each job as % of its own baseline", () => ({
    scales: { x: { time: false, ori: 1, dir: -1, range: [-0.5, names.length - 0.5] }, y: { ori: 0, dir: 1 } },
    axes: [{ ...indexAxis(names), side: 3, size: 170 }, { side: 2, label: "% of baseline", size: 40 }],
    series: [{ label: "metric", value: (u, v) => (isNumber(v) ? names[v] : "") },
      ...jobs.map((j, i) => ({ label: j.label, stroke: palette[i % palette.length], width: 0,
        paths: () => null, points: { show: true, size: 10, fill: palette[i % palette.length] },
        value: (u, v) => (isNumber(v) ? `${v.toFixed(1)}%` : "–") }))],
  }), [x, ...series], { height: 80 + 28 * names.length });
}
