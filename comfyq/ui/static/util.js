// Small DOM and formatting helpers (text always goes in as text, never as HTML).

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "style") node.style.cssText = v; // CSSOM: allowed by the page's CSP, unlike a style attribute
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on") && typeof v === "function") node.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(node.dataset, v);
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

export function clear(node) {
  while (node.firstChild) node.removeChild(node.firstChild);
  return node;
}

export const FINAL = new Set(["completed", "failed", "cancelled"]);
export const STATUSES = [
  "queued",
  "processing",
  "generating",
  "postprocessing",
  "completed",
  "failed",
  "cancelled",
];

export function badge(status) {
  return el("span", { class: `badge s-${status}`, text: status });
}

export function ms(iso) {
  const t = Date.parse(iso);
  return Number.isNaN(t) ? null : t;
}

export function human(seconds) {
  if (seconds === null || seconds === undefined || Number.isNaN(seconds)) return "";
  const s = Math.max(0, seconds);
  if (s < 1) return `${Math.round(s * 1000)} ms`;
  if (s < 60) return `${s.toFixed(s < 10 ? 1 : 0)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} m ${Math.floor(s % 60)} s`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} m`;
  return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
}

export function age(iso, now = Date.now()) {
  const t = ms(iso);
  return t === null ? "" : human((now - t) / 1000);
}

export function duration(created, finished, now = Date.now()) {
  const a = ms(created);
  if (a === null) return "";
  const b = finished ? ms(finished) : now;
  return human((b - a) / 1000);
}

export function bytes(n) {
  if (!n && n !== 0) return "";
  const units = ["B", "KiB", "MiB", "GiB"];
  let v = n;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i += 1;
  }
  return `${v.toFixed(i ? 1 : 0)} ${units[i]}`;
}

export function time(iso) {
  const t = ms(iso);
  return t === null ? "" : new Date(t).toLocaleTimeString(undefined, { hour12: false });
}

export function progressBar(progress) {
  const pct = progress && progress.max ? Math.min(100, (100 * progress.value) / progress.max) : 0;
  const bar = el("div", {
    class: "bar",
    role: "progressbar",
    "aria-valuemin": "0",
    "aria-valuemax": "100",
    "aria-valuenow": String(Math.round(pct)),
  });
  bar.append(el("span", { style: `width:${pct.toFixed(1)}%` }));
  return bar;
}

export function setBar(bar, progress) {
  const pct = progress && progress.max ? Math.min(100, (100 * progress.value) / progress.max) : 0;
  bar.setAttribute("aria-valuenow", String(Math.round(pct)));
  bar.firstChild.style.width = `${pct.toFixed(1)}%`;
}

export function message(kind, text) {
  return el("div", { class: `notice ${kind}`, role: kind === "error" ? "alert" : "status", text });
}

// Latency stamps for the benchmark: when a state change committed (its timestamp) and when the DOM
// showed it. Kept bounded.
export function stamp(id, status, at) {
  const list = (window.__comfyqStamps ||= []);
  if (list.length > 20000) list.splice(0, 10000);
  list.push({ id, status, at, dom: Date.now() });
}
