// The jobs table: filter chips with live counts, search, keyset pages, live rows.

import { api } from "./api.js";
import {
  FINAL,
  STATUSES,
  age,
  badge,
  clear,
  duration,
  el,
  message,
  progressBar,
  setBar,
  stamp,
} from "./util.js";

const PAGE = 50;

export function mount(root, { live, navigate }) {
  const state = {
    status: sessionStorage.getItem("comfyq.filter") || "",
    q: "",
    cursors: [null], // the cursor of each page shown so far; the last is the current page's
    next: null,
    rows: new Map(), // id -> {data, tr}
    again: false, // a change arrived while a page read was in flight
    trailTimer: null,
    alive: true,
    refetchTimer: null,
    countsTimer: null,
    lastRefetch: 0,
    lastCounts: 0,
    loading: null,
  };

  const chips = el("div", { class: "chips", role: "toolbar", "aria-label": "filter by status" });
  const search = el("input", {
    type: "search",
    placeholder: "Search id or request_id",
    "aria-label": "search by id or request_id",
    class: "search",
  });
  const note = el("div", { class: "note-slot" });
  const tbody = el("tbody");
  const table = el(
    "table",
    { class: "jobs" },
    el(
      "thead",
      {},
      el(
        "tr",
        {},
        ["ID", "Status", "Stage", "Modifier / workflow", "Backend", "Progress", "Age", "Duration", "Tries"].map(
          (h) => el("th", { text: h }),
        ),
      ),
    ),
    tbody,
  );
  const newer = el("button", { type: "button", class: "secondary", text: "← Newer" });
  const older = el("button", { type: "button", class: "secondary", text: "Older →" });
  const pageInfo = el("span", { class: "muted" });
  root.append(
    el("section", { class: "jobs-view" },
      el("div", { class: "toolbar" }, chips, search),
      note,
      el("div", { class: "table-wrap" }, table),
      el("div", { class: "pager" }, newer, pageInfo, older),
    ),
  );

  const chipFor = new Map();
  for (const s of ["", ...STATUSES]) {
    const count = el("span", { class: "count", text: "" });
    const b = el(
      "button",
      { type: "button", class: `chip ${s ? `s-${s}` : ""}`, dataset: { status: s }, "aria-pressed": String(s === state.status) },
      s || "all",
      " ",
      count,
    );
    b.addEventListener("click", () => {
      state.status = s;
      sessionStorage.setItem("comfyq.filter", s);
      for (const [k, c] of chipFor) c.btn.setAttribute("aria-pressed", String(k === s));
      state.cursors = [null];
      load();
    });
    chipFor.set(s, { btn: b, count });
    chips.append(b);
  }

  let searchTimer = null;
  search.addEventListener("input", () => {
    clearTimeout(searchTimer);
    searchTimer = setTimeout(() => {
      state.q = search.value.trim();
      state.cursors = [null];
      load();
    }, 200);
  });
  older.addEventListener("click", () => {
    if (state.next) {
      state.cursors.push(state.next);
      load();
    }
  });
  newer.addEventListener("click", () => {
    if (state.cursors.length > 1) {
      state.cursors.pop();
      load();
    }
  });

  function firstPage() {
    return state.cursors.length === 1 && !state.q;
  }

  function cells(d) {
    const link = el("a", { href: `#/job/${encodeURIComponent(d.id)}`, class: "mono", text: d.id, title: d.id });
    const bar = progressBar(d.progress);
    bar.hidden = d.status !== "generating";
    return {
      id: el("td", { class: "c-id", "data-label": "ID" }, link),
      status: el("td", { class: "c-status", "data-label": "Status" }, badge(d.status)),
      stage: el("td", { class: "c-stage", "data-label": "Stage", text: d.stage || "" }),
      kind: el("td", { class: "c-kind", "data-label": "Kind", text: d.kind || "" }),
      backend: el("td", { class: "c-backend", "data-label": "Backend", text: d.backend || "" }),
      progress: el("td", { class: "c-progress", "data-label": "Progress" }, bar),
      age: el("td", { class: "c-age", "data-label": "Age", text: age(d.created_at) }),
      dur: el("td", { class: "c-dur", "data-label": "Duration", text: duration(d.created_at, d.finished_at) }),
      tries: el("td", { class: "c-tries", "data-label": "Tries", text: d.max_attempts ? `${d.attempts}/${d.max_attempts}` : "" }),
    };
  }

  function makeRow(d) {
    const c = cells(d);
    const tr = el("tr", { dataset: { id: d.id, status: d.status } }, Object.values(c));
    tr.addEventListener("click", (e) => {
      if (e.target.closest("a")) return;
      navigate(`#/job/${encodeURIComponent(d.id)}`);
    });
    return { data: d, tr, c };
  }

  function paint(row) {
    const d = row.data;
    row.tr.dataset.status = d.status;
    row.c.status.replaceChildren(badge(d.status));
    row.c.stage.textContent = d.stage || "";
    if (d.kind !== undefined) row.c.kind.textContent = d.kind || "";
    row.c.backend.textContent = d.backend || "";
    row.c.tries.textContent = d.max_attempts ? `${d.attempts}/${d.max_attempts}` : "";
    const bar = row.c.progress.firstChild;
    bar.hidden = d.status !== "generating";
    setBar(bar, d.status === "generating" ? d.progress : null);
    row.c.dur.textContent = duration(d.created_at, d.finished_at);
  }

  async function load() {
    const params = new URLSearchParams({ limit: String(PAGE) });
    if (state.status) params.set("status", state.status);
    if (state.q) params.set("q", state.q);
    const cursor = state.cursors[state.cursors.length - 1];
    if (cursor) params.set("cursor", cursor);
    const ticket = {};
    state.loading = ticket;
    state.lastRefetch = Date.now();
    let page;
    try {
      page = await api(`/ui/api/jobs?${params}`);
    } catch (e) {
      if (!state.alive || state.loading !== ticket) return;
      state.loading = null;
      note.replaceChildren(message("error", e.message));
      return;
    }
    if (!state.alive || state.loading !== ticket) return;
    state.loading = null;
    note.replaceChildren();
    state.next = page.next_cursor;
    state.rows.clear();
    clear(tbody);
    for (const d of page.jobs) {
      const row = makeRow(d);
      state.rows.set(d.id, row);
      tbody.append(row.tr);
    }
    if (!page.jobs.length) {
      tbody.append(
        el("tr", { class: "empty" },
          el("td", { colspan: "9", text: state.q ? `No job id starts with “${state.q}”.` : "No jobs here yet. Submit one, or POST /generate." }),
        ),
      );
    }
    older.disabled = !state.next;
    newer.disabled = state.cursors.length === 1;
    pageInfo.textContent = `page ${state.cursors.length}`;
    loadCounts();
    if (state.again) {
      state.again = false;
      later("refetch", 1000); // what changed during the read is read again
    }
  }

  async function loadCounts() {
    state.lastCounts = Date.now();
    try {
      const c = await api("/ui/api/counts");
      if (!state.alive) return;
      chipFor.get("").count.textContent = String(c.total);
      for (const s of STATUSES) chipFor.get(s).count.textContent = String(c.counts[s] ?? 0);
    } catch {
      /* the table shows the error */
    }
  }

  function later(kind, wait) {
    const key = `${kind}Timer`;
    if (state[key]) return;
    const last = kind === "refetch" ? state.lastRefetch : state.lastCounts;
    const delay = Math.max(50, wait - (Date.now() - last));
    state[key] = setTimeout(() => {
      state[key] = null;
      if (!state.alive) return;
      if (kind === "refetch") load();
      else loadCounts();
    }, delay);
  }

  function matches(status) {
    return !state.status || state.status === status;
  }

  function onEvent(ev) {
    const isFinal = ev.event === "final_result";
    if (state.loading && ev.event !== "progress") state.again = true;
    // The server may answer counts up to 2 s old while jobs change: one more read once things
    // have been quiet for longer than that shows the settled figures.
    clearTimeout(state.trailTimer);
    state.trailTimer = setTimeout(() => state.alive && loadCounts(), 2600);
    if (ev.event === "progress") {
      const row = state.rows.get(ev.request_id);
      if (row && ev.progress) {
        row.data.progress = ev.progress;
        if (row.data.status === "generating") setBar(row.c.progress.firstChild, ev.progress);
      }
      return;
    }
    if (ev.event !== "state" && !isFinal) return;
    const status = isFinal ? ev.result.status : ev.status;
    let row = state.rows.get(ev.request_id);
    if (row) {
      const d = row.data;
      d.status = status;
      if (ev.stage) d.stage = ev.stage;
      if (typeof ev.attempt === "number") d.attempts = ev.attempt;
      if (isFinal) {
        d.finished_at = ev.result.finished_at;
        d.attempts = ev.result.attempts;
        d.progress = null;
      }
      paint(row);
      stamp(ev.request_id, status, ev.timestamp);
    } else if (firstPage() && matches(status) && !isFinal && status === "queued") {
      // A new job: shown at once; its modifier and backend arrive with the next page read.
      const d = {
        id: ev.request_id,
        status,
        stage: ev.stage || "preprocess",
        kind: "",
        attempts: ev.attempt || 0,
        max_attempts: 0,
        created_at: ev.timestamp,
      };
      row = makeRow(d);
      const empty = tbody.querySelector("tr.empty");
      if (empty) empty.remove();
      state.rows.set(d.id, row);
      tbody.prepend(row.tr);
      while (state.rows.size > PAGE) {
        const last = tbody.lastElementChild;
        state.rows.delete(last.dataset.id);
        last.remove();
      }
      stamp(ev.request_id, status, ev.timestamp);
      later("refetch", 1000);
    }
    later("counts", 1500);
  }

  const ticker = setInterval(() => {
    const now = Date.now();
    for (const row of state.rows.values()) {
      row.c.age.textContent = age(row.data.created_at, now);
      if (!FINAL.has(row.data.status)) row.c.dur.textContent = duration(row.data.created_at, null, now);
    }
  }, 1000);

  load();

  return {
    onEvent,
    catchUp: load,
    unmount() {
      state.alive = false;
      clearInterval(ticker);
      clearTimeout(state.refetchTimer);
      clearTimeout(state.countsTimer);
      clearTimeout(state.trailTimer);
      clearTimeout(searchTimer);
    },
  };
}
