// Calls to the comfyq API: the key from sessionStorage as a bearer token, errors as ApiError.

const KEY = "comfyq.apiKey";

export const events = new EventTarget();

export function getKey() {
  return sessionStorage.getItem(KEY) || "";
}

export function setKey(key) {
  if (key) sessionStorage.setItem(KEY, key);
  else sessionStorage.removeItem(KEY);
}

export function authHeaders() {
  const key = getKey();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

export class ApiError extends Error {
  constructor(status, info, message) {
    super(message);
    this.status = status;
    this.type = (info && info.type) || (status === 0 ? "unreachable" : `http_${status}`);
    this.fields = (info && info.fields) || [];
    this.details = (info && info.details) || {};
  }
}

function explain(status, info) {
  if (status === 413) {
    return "That request is too large for this server (its upload limit is max_body_bytes). Use smaller or fewer files, or URLs.";
  }
  if (info && info.message) return info.message;
  return `The server answered ${status}.`;
}

// fetch + JSON with one error shape. ``raw`` returns the Response (for files).
export async function api(path, { method = "GET", body, raw = false, signal } = {}) {
  const headers = { ...authHeaders() };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let r;
  try {
    r = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      signal,
      cache: "no-store",
    });
  } catch (e) {
    if (e && e.name === "AbortError") throw e;
    events.dispatchEvent(new CustomEvent("down"));
    throw new ApiError(0, null, "The comfyq server cannot be reached. It may be restarting; this page retries by itself.");
  }
  events.dispatchEvent(new CustomEvent("up"));
  if (r.ok) return raw ? r : r.json();
  let info = null;
  try {
    info = (await r.json()).error || null;
  } catch {
    info = null;
  }
  const err = new ApiError(r.status, info, explain(r.status, info));
  if (r.status === 401) events.dispatchEvent(new CustomEvent("unauthorized", { detail: err }));
  throw err;
}

// A file of the API (an output) as an object URL, fetched with the key (an <img src> cannot send it).
export async function blobUrl(url) {
  if (/^https?:\/\//i.test(url) && !url.startsWith(location.origin)) return url; // e.g. presigned S3
  const r = await api(url, { raw: true });
  return URL.createObjectURL(await r.blob());
}

export function b64url(text) {
  const bytes = new TextEncoder().encode(text);
  let bin = "";
  for (const b of bytes) bin += String.fromCharCode(b);
  return btoa(bin).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}
