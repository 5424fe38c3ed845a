// The HTTP API: JSON requests with the API key, uploads with progress, and a job's event stream
// (Server-Sent Events over fetch, so the key travels as a header; polling when streaming fails).

const KEY_STORAGE = "slimformer.apiKey";

export const apiKey = {
  get: () => localStorage.getItem(KEY_STORAGE) || "",
  set: (key) => (key ? localStorage.setItem(KEY_STORAGE, key) : localStorage.removeItem(KEY_STORAGE)),
};

export function authHeaders(extra = {}) {
  const key = apiKey.get();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

export class ApiError extends Error {
  constructor(status, code, message, param) {
    super(param ? `${message} (${param})` : message);
    this.status = status;
    this.code = code;
  }
}

function errorFrom(status, body, statusText) {
  const error = body && body.error;
  if (error && error.code) return new ApiError(status, error.code, error.message || error.code, error.param);
  return new ApiError(status, `http_${status}`, statusText || `HTTP ${status}`);
}

async function apiError(response) {
  let body = null;
  try { body = await response.json(); } catch { /* not JSON */ }
  return errorFrom(response.status, body, response.statusText);
}

export async function api(path, { method = "GET", body, headers = {}, etag } = {}) {
  const init = { method, headers: authHeaders(headers) };
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  if (etag) init.headers["If-None-Match"] = etag;
  const response = await fetch(path, init);
  if (response.status === 304) return { notModified: true, etag };
  if (!response.ok) throw await apiError(response);
  const data = response.status === 204 ? null : await response.json();
  return { body: data, etag: response.headers.get("ETag") };
}

// Every page of a list (models and datasets are few; jobs are paged by the view).
export async function listAll(path, max = 500) {
  const items = [];
  let after = null;
  while (items.length < max) {
    const query = new URLSearchParams({ limit: "100" });
    if (after) query.set("after", after);
    const { body } = await api(`${path}?${query}`);
    items.push(...body.data);
    if (!body.has_more || !body.data.length) break;
    after = body.data[body.data.length - 1].id;
  }
  return items;
}

// multipart upload through XMLHttpRequest: fetch has no upload progress.
export function upload(path, form, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", path);
    for (const [name, value] of Object.entries(authHeaders())) xhr.setRequestHeader(name, value);
    xhr.upload.addEventListener("progress", (event) => {
      if (event.lengthComputable) onProgress(event.loaded / event.total, event.loaded, event.total);
    });
    xhr.addEventListener("load", () => {
      let body = null;
      try { body = JSON.parse(xhr.responseText); } catch { /* not JSON */ }
      if (xhr.status >= 200 && xhr.status < 300) resolve(body);
      else reject(errorFrom(xhr.status, body, xhr.statusText));
    });
    xhr.addEventListener("error", () => reject(new ApiError(0, "network", "upload failed: network error")));
    xhr.addEventListener("abort", () => reject(new ApiError(0, "aborted", "upload cancelled")));
    xhr.send(form);
  });
}

// A file download that carries the API key: a plain link cannot, so fetch it and hand over a blob.
export async function downloadWithKey(href, filename) {
  const response = await fetch(href, { headers: authHeaders() });
  if (!response.ok) throw await apiError(response);
  const url = URL.createObjectURL(await response.blob());
  const a = document.createElement("a");
  a.href = url;
  a.download = filename;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60000);
}

function sseDecoder(onMessage) {
  let data = [], type = "", idBuffer = null;
  const decoder = {
    lastEventId: null,
    feed(line) {
      if (line === "") {
        decoder.lastEventId = idBuffer;
        if (data.length) onMessage({ id: idBuffer, event: type || "message", data: data.join("\n") });
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

function parseEvent(message) {
  let event;
  try { event = JSON.parse(message.data); } catch { event = { message: message.data }; }
  if (!event || typeof event !== "object" || !("type" in event)) {
    event = { type: message.event, message: "", data: event };
  }
  if (!("seq" in event) && message.id !== null) event.seq = Number(message.id);
  return event;
}

// Follow a job's events until `signal` aborts or `isDone()` after the stream ends. `onMode` hears
// "live" (streaming) or "polling" (the fallback: the event list, every 2 s).
export async function followEvents(jobId, { signal, onEvent, onMode, isDone }) {
  const base = `/v1/jobs/${encodeURIComponent(jobId)}/events`;
  let lastSeq = null, failures = 0;
  const deliver = (event) => {
    if (Number.isInteger(event.seq)) {
      if (lastSeq !== null && event.seq <= lastSeq) return;
      lastSeq = event.seq;
    }
    onEvent(event);
  };
  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
  while (!signal.aborted) {
    if (failures < 3) {
      const sse = sseDecoder((message) => deliver(parseEvent(message)));
      try {
        const headers = authHeaders({ Accept: "text/event-stream" });
        if (lastSeq !== null) headers["Last-Event-ID"] = String(lastSeq);
        const response = await fetch(base, { headers, signal });
        if (!response.ok) throw await apiError(response);
        if (!(response.headers.get("Content-Type") || "").startsWith("text/event-stream")) {
          throw new Error("no event stream");
        }
        onMode("live");
        failures = 0;
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
        if (isDone()) return;  // the stream ended after the terminal status
      } catch (error) {
        if (signal.aborted) return;
        if (error instanceof ApiError && error.status < 500 && error.status !== 429) throw error;
        failures += 1;
      }
      await sleep(1000);
      continue;
    }
    // Polling: the same events as a list.
    onMode("polling");
    try {
      const query = new URLSearchParams({ limit: "100" });
      if (lastSeq !== null) query.set("after", String(lastSeq));
      const { body } = await api(`${base}?${query}`);
      body.data.forEach(deliver);
      if (body.has_more) continue;
      if (isDone()) return;
    } catch (error) {
      if (signal.aborted) return;
      if (error instanceof ApiError && error.status < 500 && error.status !== 429) throw error;
    }
    await sleep(2000);
    if (failures++ > 30) failures = 0;  // now and then, try streaming again
  }
}
