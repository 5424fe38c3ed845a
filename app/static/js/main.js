// The dashboard's shell: a router over the History API (every job, model and dataset has its
// URL; back and forward work), the header, the error banner and the shared model/dataset names.

import { apiKey, listAll } from "./api.js";
import { el, fill } from "./dom.js";
import { jobsView, compareView } from "./views/jobs.js";
import { jobView } from "./views/job.js";
import { submitView } from "./views/submit.js";
import { libraryView, itemView } from "./views/library.js";
import { workersView, workerSummary } from "./views/workers.js";

const ROUTES = [
  [/^\/(?:jobs)?$/, () => jobsView],
  [/^\/jobs\/([^/]+)$/, (id) => (view) => jobView(view, id)],
  [/^\/new$/, () => submitView],
  [/^\/compare$/, () => compareView],
  [/^\/(models|datasets)$/, (kind) => (view) => libraryView(view, kind)],
  [/^\/(models|datasets)\/([^/]+)$/, (kind, id) => (view) => itemView(view, kind, id)],
  [/^\/workers$/, () => workersView],
];

// What every view shares: the names of models and datasets (refreshed at most every 10 s).
export const names = { models: new Map(), datasets: new Map(), at: 0 };
export async function refreshNames(force = false) {
  if (!force && Date.now() - names.at < 10000) return names;
  const [models, datasets] = await Promise.all([listAll("/v1/models"), listAll("/v1/datasets")]);
  names.models = new Map(models.map((m) => [m.id, m]));
  names.datasets = new Map(datasets.map((d) => [d.id, d]));
  names.at = Date.now();
  return names;
}
export const modelName = (id) => (names.models.get(id) || {}).name || id;

export function showError(error) {
  const banner = document.getElementById("banner");
  if (!error) { banner.hidden = true; return; }
  banner.textContent = error.status === 401
    ? "Unauthorized: enter a valid API key at the top right." : String(error.message || error);
  banner.hidden = false;
}

let current = null;  // the shown view's context: { root, signal, every }

export function navigate(path, { replace = false } = {}) {
  if (path === location.pathname + location.search) return;
  if (replace) history.replaceState(null, "", path); else history.pushState(null, "", path);
  route();
}

function route() {
  if (current) current.stop();
  showError(null);
  const root = document.getElementById("view");
  const controller = new AbortController();
  const timers = [];
  current = {
    root, signal: controller.signal, query: new URLSearchParams(location.search),
    every(ms, fn) {  // run now and every `ms` while this view is shown; errors go to the banner
      const run = () => Promise.resolve().then(fn).then(() => showError(null), showError);
      run();
      timers.push(setInterval(run, ms));
    },
    stop() { controller.abort(); timers.forEach(clearInterval); },
  };
  for (const a of document.querySelectorAll("header nav a")) {
    const section = a.getAttribute("href");
    a.classList.toggle("active", section === "/" ? /^\/(jobs.*)?$/.test(location.pathname)
      : location.pathname.startsWith(section));
  }
  fill(root);
  const path = location.pathname.replace(/\/+$/, "") || "/";
  for (const [pattern, make] of ROUTES) {
    const match = pattern.exec(path);
    if (match) {
      const view = make(...match.slice(1).map(decodeURIComponent));
      Promise.resolve().then(() => view(current)).catch(showError);
      return;
    }
  }
  root.append(el("section", {}, el("h2", {}, "Not found"),
                 el("p", {}, "No page here. ", el("a", { href: "/", "data-nav": "" }, "Back to the jobs"))));
}

document.addEventListener("click", (event) => {
  const a = event.target.closest("a[data-nav]");
  if (!a || event.ctrlKey || event.metaKey || event.shiftKey || event.button !== 0) return;
  event.preventDefault();
  navigate(a.getAttribute("href"));
});
window.addEventListener("popstate", route);

const keyInput = document.getElementById("api-key");
keyInput.value = apiKey.get();
document.getElementById("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  apiKey.set(keyInput.value.trim());
  names.at = 0;
  route();
});

setInterval(() => workerSummary().catch(() => {}), 10000);
workerSummary().catch(() => {});
refreshNames().catch(showError).finally(route);
