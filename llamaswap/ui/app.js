// llamaswap UI: plain JavaScript, no build step. Everything arrives over
// /api/events (Server-Sent Events); buttons call the management API.
"use strict";

const MAX_LOG_LINES = 5000;   // per source, in the browser
const MAX_REQUESTS = 500;

const state = {
  models: [],                 // latest modelStatus snapshot
  snapshotAt: 0,              // performance.now() when it arrived (TTL countdown, queue wait)
  logs: { proxy: [], upstream: [] },   // [{seq, text}]
  seq: 0,
  requests: [],               // newest last
  busy: new Set(),            // model ids with a load/unload call in flight
};

const $ = (id) => document.getElementById(id);

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (key === "class") node.className = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child !== null && child !== undefined) {
      node.append(child instanceof Node ? child : String(child));
    }
  }
  return node;
}

// --- pages -------------------------------------------------------------------

function showPage() {
  const page = (location.hash || "#models").slice(1);
  const known = ["models", "logs", "requests"].includes(page) ? page : "models";
  for (const section of document.querySelectorAll(".page")) {
    section.hidden = section.id !== "page-" + known;
  }
  for (const link of document.querySelectorAll("nav a")) {
    link.classList.toggle("active", link.dataset.page === known);
  }
  if (known === "logs") renderLogs();
}

// --- models ------------------------------------------------------------------

function modelPath(id) {
  return id.split("/").map(encodeURIComponent).join("/");
}

function toast(message) {
  const box = $("toast");
  box.textContent = message;
  box.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { box.hidden = true; }, 6000);
}

async function manage(action, id) {
  const url = id === null ? "/api/models/unload" : `/api/models/${action}/${modelPath(id)}`;
  const key = id === null ? "*" : id;
  state.busy.add(key);
  renderModels();
  try {
    const response = await fetch(url, { method: "POST" });
    if (!response.ok) {
      let message = `${action} ${id || "all"}: HTTP ${response.status}`;
      try {
        const body = await response.json();
        if (body && body.error && body.error.message) message += ` — ${body.error.message}`;
      } catch (_) { /* not JSON */ }
      toast(message);
    }
  } catch (error) {
    toast(`${action} ${id || "all"}: ${error}`);
  } finally {
    state.busy.delete(key);
    renderModels();
  }
}

function ttlText(model) {
  if (!model.ttl) return "—";
  if (model.ttl_remaining === null || model.ttl_remaining === undefined) {
    return model.state === "ready" && model.in_flight > 0 ? `${model.ttl}s (busy)` : `${model.ttl}s`;
  }
  const elapsed = (performance.now() - state.snapshotAt) / 1000;
  const left = Math.max(0, Math.round(model.ttl_remaining - elapsed));
  return `${left}s left`;
}

function queueText(model) {
  if (!model.queued) return "—";
  let text = `${model.queued} queued`;
  if (model.oldest_wait !== null && model.oldest_wait !== undefined) {
    const elapsed = (performance.now() - state.snapshotAt) / 1000;
    text += `, oldest ${Math.floor(model.oldest_wait + elapsed)} s`;
  }
  return text;
}

// Memory admission: what a model holds now, else what is known of it (measured, declared).
function sizeText(bytes) {
  return bytes >= 2 ** 30 ? `${(bytes / 2 ** 30).toFixed(1)} GiB` : `${Math.round(bytes / 2 ** 20)} MiB`;
}

function figureText(figures) {
  const total = Object.values(figures).reduce((sum, b) => sum + b, 0);
  const devices = Object.keys(figures).filter((d) => d !== "*");
  return sizeText(total) + (devices.length ? ` on ${devices.join(", ")}` : "");
}

function memoryText(model) {
  const memory = model.memory;
  if (!memory) return "—";
  const parts = [];
  if (memory.holds) parts.push(`holds ${figureText(memory.holds)}`);
  if (memory.measured) parts.push(`measured ${figureText(memory.measured)}`);
  if (memory.declared) parts.push(`declared ${figureText(memory.declared)}`);
  return parts.length ? parts.join(" · ") : "unknown until loaded";
}

// A config reload's outcome: a failed one stays on screen until a reload succeeds.
function showConfigState(outcome) {
  const banner = $("config-banner");
  banner.hidden = outcome.ok;
  if (!outcome.ok) {
    banner.textContent =
      `Config reload (${outcome.source}) failed; the running config is kept: ${outcome.error}`;
  }
}

// Why a model is stopping (the snapshot's "reason"), in words.
const STOP_REASONS = {
  evict: "making room",
  ttl: "idle (TTL)",
  unload: "unloaded",
  exit: "server exited",
  shutdown: "shutting down",
  failed: "start timed out",
  reload: "config changed",
};

function renderModels() {
  const body = $("models-body");
  const rows = [];
  const withMemory = state.models.some((m) => m.memory);
  for (const model of state.models) {
    const busy = state.busy.has(model.id) || state.busy.has("*");
    const running = ["starting", "ready"].includes(model.state);
    const loadButton = el("button", {
      type: "button", class: "load", onclick: () => manage("load", model.id),
    }, "Load");
    const unloadButton = el("button", {
      type: "button", class: "unload secondary", onclick: () => manage("unload", model.id),
    }, "Unload");
    loadButton.disabled = busy || running || model.state === "stopping";
    unloadButton.disabled = busy || !(running || model.state === "failed");
    const title = el("div", {}, el("span", { class: "model-id" }, model.id));
    if (model.name && model.name !== model.id) title.append(" ", el("span", { class: "muted" }, model.name));
    const cell = el("td", {}, title);
    if (model.description) cell.append(el("div", { class: "model-desc" }, model.description));
    if (model.last_error && model.state === "failed") {
      cell.append(el("div", { class: "error-text" }, model.last_error));
    }
    rows.push(el("tr", { dataset: { model: model.id } },
      cell,
      stateCell(model),
      el("td", {}, ...(model.aliases || []).map((a) => el("span", { class: "alias" }, a))),
      el("td", { class: "ttl" }, ttlText(model)),
      el("td", { class: "num" }, model.in_flight || 0),
      el("td", { class: model.queued ? "queue queued" : "queue" }, queueText(model)),
      el("td", { class: "memory", hidden: !withMemory }, memoryText(model)),
      el("td", { class: "actions" }, loadButton, unloadButton),
    ));
  }
  document.querySelectorAll("th.memory").forEach((th) => { th.hidden = !withMemory; });
  body.replaceChildren(...rows);
  $("models-empty").hidden = state.models.length > 0;
  const ready = state.models.filter((m) => m.state === "ready").length;
  const n = state.models.length;
  const queued = state.models.reduce((sum, m) => sum + (m.queued || 0), 0);
  $("models-summary").textContent =
    `${n} model${n === 1 ? "" : "s"}, ${ready} ready` + (queued ? `, ${queued} queued` : "");
  $("unload-all").disabled = state.busy.has("*");
  refreshModelSelect();
}

function stateCell(model) {
  const cell = el("td", {}, el("span", { class: `state state-${model.state}` }, model.state));
  if (model.state === "stopping" && model.reason) {
    cell.append(" ", el("span", { class: "state-reason", title: `reason: ${model.reason}` },
      STOP_REASONS[model.reason] || model.reason));
  }
  return cell;
}

// Between snapshots, count the TTL down and the queue's oldest wait up.
function tickModels() {
  for (const row of document.querySelectorAll("#models-body tr")) {
    const model = state.models.find((m) => m.id === row.dataset.model);
    if (!model) continue;
    row.querySelector(".ttl").textContent = ttlText(model);
    row.querySelector(".queue").textContent = queueText(model);
  }
}

// --- logs --------------------------------------------------------------------

function refreshModelSelect() {
  const select = $("log-model");
  const wanted = ["", ...state.models.map((m) => m.id)];
  const have = Array.from(select.options).map((o) => o.value);
  if (wanted.join("\n") === have.join("\n")) return;
  const current = select.value;
  select.replaceChildren(...wanted.map((id) => el("option", { value: id }, id || "all models")));
  select.value = wanted.includes(current) ? current : "";
}

function addLogLines(source, lines) {
  const buffer = state.logs[source];
  if (!buffer) return;
  for (const text of lines) buffer.push({ seq: ++state.seq, text, source });
  if (buffer.length > MAX_LOG_LINES) buffer.splice(0, buffer.length - MAX_LOG_LINES);
  if (!$("page-logs").hidden) scheduleLogRender();
}

let logRenderPending = false;
function scheduleLogRender() {
  if (logRenderPending) return;
  logRenderPending = true;
  requestAnimationFrame(() => { logRenderPending = false; renderLogs(); });
}

function visibleLogLines() {
  const stream = document.querySelector('input[name="stream"]:checked').value;
  const model = $("log-model").value;
  const needle = $("log-filter").value.toLowerCase();
  let lines;
  if (stream === "proxy") lines = state.logs.proxy;
  else if (stream === "upstream") lines = state.logs.upstream;
  else lines = state.logs.proxy.concat(state.logs.upstream).sort((a, b) => a.seq - b.seq);
  const prefix = model ? `[${model}] ` : null;
  return lines
    .filter((l) => !prefix || l.source !== "upstream" || l.text.startsWith(prefix))
    .filter((l) => !needle || l.text.toLowerCase().includes(needle))
    .map((l) => l.text);
}

function renderLogs() {
  const view = $("log-view");
  const stream = document.querySelector('input[name="stream"]:checked').value;
  $("log-model").disabled = stream === "proxy";
  const lines = visibleLogLines();
  view.textContent = lines.length ? lines.join("\n") + "\n" : "";
  $("log-count").textContent = `${lines.length} line${lines.length === 1 ? "" : "s"}`;
  if ($("log-follow").checked) view.scrollTop = view.scrollHeight;
}

// --- requests ----------------------------------------------------------------

function fmtDuration(seconds) {
  if (seconds === null || seconds === undefined) return "—";
  return seconds < 1 ? `${Math.round(seconds * 1000)} ms` : `${seconds.toFixed(2)} s`;
}

function fmtBytes(n) {
  if (n === null || n === undefined) return "—";
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / 1024 / 1024).toFixed(1)} MiB`;
}

function fmtTokens(usage) {
  if (!usage) return "—";
  const input = usage.prompt_tokens ?? usage.input_tokens;
  const output = usage.completion_tokens ?? usage.output_tokens;
  if (input === undefined && output === undefined) return "—";
  return `${input ?? "?"} / ${output ?? "?"}`;
}

function addRequests(list) {
  for (const request of list) {
    request._seen = request.time ? new Date(request.time * 1000) : new Date();
    state.requests.push(request);
  }
  if (state.requests.length > MAX_REQUESTS) {
    state.requests.splice(0, state.requests.length - MAX_REQUESTS);
  }
  renderRequests();
}

function renderRequests() {
  const rows = state.requests.slice().reverse().map((r) => {
    const ok = r.status >= 200 && r.status < 400;
    return el("tr", { dataset: { request: r.id } },
      el("td", { class: "num" }, r.id ?? ""),
      el("td", {}, r._seen.toLocaleTimeString()),
      el("td", {}, r.model || "—"),
      el("td", { class: "path" }, `${r.method || ""} ${r.path || ""}`),
      el("td", { class: `num ${ok ? "status-ok" : "status-bad"}` }, r.status ?? "—"),
      el("td", { class: "num" }, fmtDuration(r.duration)),
      el("td", { class: "num" }, fmtTokens(r.usage)),
      el("td", { class: "num" }, fmtBytes(r.bytes)),
    );
  });
  $("requests-body").replaceChildren(...rows);
  $("requests-empty").hidden = state.requests.length > 0;
  const n = state.requests.length;
  $("requests-summary").textContent = `${n} recent request${n === 1 ? "" : "s"}`;
}

// --- the live feed -----------------------------------------------------------

function connect() {
  const source = new EventSource("/api/events");
  const conn = $("conn");
  source.onopen = () => {
    conn.textContent = "live";
    conn.classList.add("live");
    // The server replays histories on every (re)connection: start afresh.
    state.logs = { proxy: [], upstream: [] };
    state.requests = [];
    renderRequests();
  };
  source.onerror = () => {
    conn.textContent = "reconnecting…";
    conn.classList.remove("live");
  };
  source.onmessage = (message) => {
    let event;
    try { event = JSON.parse(message.data); } catch (_) { return; }
    switch (event.type) {
      case "modelStatus":
        state.models = event.data;
        state.snapshotAt = performance.now();
        renderModels();
        break;
      case "logData":
        addLogLines(event.data.source, event.data.lines);
        break;
      case "request":
        addRequests([event.data]);
        break;
      case "requests":
        addRequests(event.data);
        break;
      case "config":
        showConfigState(event.data);
        break;
      case "dropped":
        addLogLines("proxy", [`[UI] ${event.data.count} events dropped (slow connection)`]);
        break;
      default:
        break;
    }
  };
}

function init() {
  window.addEventListener("hashchange", showPage);
  for (const input of document.querySelectorAll('input[name="stream"]')) {
    input.addEventListener("change", renderLogs);
  }
  $("log-model").addEventListener("change", renderLogs);
  $("log-filter").addEventListener("input", renderLogs);
  $("log-follow").addEventListener("change", renderLogs);
  $("log-clear").addEventListener("click", () => {
    state.logs = { proxy: [], upstream: [] };
    renderLogs();
  });
  $("unload-all").addEventListener("click", () => manage("unload", null));
  showPage();
  renderModels();
  renderRequests();
  setInterval(tickModels, 1000);
  connect();
}

init();
