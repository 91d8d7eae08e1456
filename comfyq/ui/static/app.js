// The dashboard: key prompt, live connection, and the views chosen by the URL's #fragment.

import { api, events, getKey, setKey } from "./api.js";
import { Live } from "./live.js";
import { clear, message } from "./util.js";
import * as jobsView from "./jobs.js";
import * as jobView from "./job.js";
import * as submitView from "./submit.js";
import * as queueView from "./queue.js";

const live = new Live();
const $ = (id) => document.getElementById(id);
let current = null;
let needsKey = false;
// The latest preview of recent jobs: a job page opened a moment after its frame still shows it.
const previews = new Map();

function route() {
  const hash = location.hash || "#/";
  const job = hash.match(/^#\/job\/([^/?#]+)$/);
  if (job) return { view: jobView, nav: "jobs", arg: decodeURIComponent(job[1]) };
  if (hash.startsWith("#/submit")) return { view: submitView, nav: "submit" };
  if (hash.startsWith("#/queue")) return { view: queueView, nav: "queue" };
  return { view: jobsView, nav: "jobs" };
}

function render() {
  if (current && current.unmount) current.unmount();
  current = null;
  const root = clear($("view"));
  if (needsKey) return;
  const r = route();
  for (const a of document.querySelectorAll("[data-nav]")) {
    a.classList.toggle("active", a.dataset.nav === r.nav);
  }
  try {
    current = r.view.mount(root, { live, arg: r.arg, navigate, previews });
  } catch (e) {
    root.append(message("error", `This view failed to open: ${e.message}`));
  }
}

function navigate(hash) {
  if (location.hash === hash) render();
  else location.hash = hash;
}

function banner(text) {
  const b = $("banner");
  b.textContent = text || "";
  b.hidden = !text;
}

function showKeyPrompt(why, wrong) {
  needsKey = true;
  live.stop();
  if (current && current.unmount) current.unmount();
  current = null;
  clear($("view"));
  $("key-why").textContent = why;
  const err = $("key-error");
  err.hidden = !wrong;
  err.textContent = wrong ? "That key was not accepted by the server. Check it and try again." : "";
  $("key-dialog").hidden = false;
  $("key-input").value = "";
  $("key-input").focus();
}

// Whether the key in hand (if any) is good, without provoking a 401 (a red line in the console).
async function checkKey() {
  try {
    const s = await api("/ui/api/session");
    document.body.dataset.role = s.role || "";
    return !s.keys_required || s.authenticated;
  } catch {
    return true; // unreachable or other trouble: the views say so themselves
  }
}

async function useKey(ev) {
  ev.preventDefault();
  const key = $("key-input").value.trim();
  if (!key) return;
  setKey(key);
  if (!(await checkKey())) {
    setKey("");
    showKeyPrompt("This server needs an API key.", true);
    return;
  }
  $("key-dialog").hidden = true;
  $("key-button").hidden = false;
  needsKey = false;
  live.restart();
  render();
}

function setConn(text, cls) {
  const c = $("conn");
  c.textContent = text;
  c.className = `conn ${cls}`;
}

async function start() {
  $("key-form").addEventListener("submit", useKey);
  $("key-forget").addEventListener("click", () => {
    setKey("");
    showKeyPrompt("Type an API key to continue.", false);
  });
  $("key-button").addEventListener("click", () => showKeyPrompt("Use another API key.", false));
  events.addEventListener("unauthorized", () => {
    if (!needsKey) showKeyPrompt("This server needs an API key.", Boolean(getKey()));
  });
  events.addEventListener("down", () => banner("The comfyq server cannot be reached. Retrying…"));
  events.addEventListener("up", () => banner(""));
  live.addEventListener("up", () => {
    setConn("live", "ok");
    banner("");
  });
  live.addEventListener("down", () => {
    if (!live.stopped) {
      setConn("reconnecting…", "bad");
      if (live.opened) banner("Connection lost. Reconnecting; the page catches up by itself.");
    }
  });
  live.addEventListener("open", (e) => {
    if (e.detail.reconnected && current && current.catchUp) current.catchUp();
  });
  live.addEventListener("event", (e) => current && current.onEvent && current.onEvent(e.detail));
  live.addEventListener("preview", (e) => {
    previews.delete(e.detail.job_id);
    previews.set(e.detail.job_id, e.detail);
    if (previews.size > 20) previews.delete(previews.keys().next().value);
    if (current && current.onPreview) current.onPreview(e.detail);
  });
  window.addEventListener("hashchange", render);
  window.addEventListener("unhandledrejection", (e) => {
    e.preventDefault();
    banner(`Something went wrong: ${(e.reason && e.reason.message) || e.reason}`);
  });

  const ok = await checkKey();
  if (!ok) {
    showKeyPrompt("This server needs an API key.", Boolean(getKey()));
    return;
  }
  $("key-button").hidden = !getKey();
  live.start();
  render();
}

start();
