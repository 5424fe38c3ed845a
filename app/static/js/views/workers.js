// Workers: who is there to run jobs, per device class.

import { api } from "../api.js";
import { bytes, el, fill, isNumber, shortTime, statusBadge, table, text } from "../dom.js";

async function workers() {
  return (await api("/v1/workers?limit=100")).body.data;
}

export async function workerSummary() {
  const live = new Map();
  for (const w of await workers()) if (w.live !== false && w.status !== "lost") live.set(w.device, (live.get(w.device) || 0) + 1);
  document.getElementById("queues").textContent = ["cpu", "gpu"].map((d) => `${d}: ${live.get(d) || 0} live`).join(" · ");
}

export async function workersView(view) {
  const body = el("div", {});
  view.root.append(el("section", {}, el("h2", {}, "Workers"), body));
  view.every(5000, async () => {
    const list = await workers();
    fill(body, table(["Worker", "Device", "Status", "Current job", "Queues", "Memory", "Last seen (UTC)"],
      list.map((w) => el("tr", {},
        el("td", { class: "mono" }, text(w.hostname)),
        el("td", {}, w.device_name || w.gpu_name ? `${text(w.device)} (${w.device_name || w.gpu_name})` : text(w.device)),
        el("td", {}, statusBadge(w.status)),
        el("td", { class: "mono" }, w.current_job_id ? el("a", { href: `/jobs/${w.current_job_id}`, "data-nav": "" }, w.current_job_id) : "–"),
        el("td", { class: "mono" }, (w.queues || []).join(", ") || "–"),
        el("td", {}, isNumber(w.memory_bytes) ? bytes(w.memory_bytes) : "–"),
        el("td", {}, shortTime(w.last_seen_at)))),
      "No worker has registered: jobs wait in their queue until one starts."));
  });
}
