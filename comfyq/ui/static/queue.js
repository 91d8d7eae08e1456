// Queue and backends: depth and in-flight per stage, workers, each backend's health, and the last
// hour in small charts (from /ui/api/stats, which aggregates the job table at a bounded cost).

import { api } from "./api.js";
import { el, message } from "./util.js";

const SVG = "http://www.w3.org/2000/svg";

function svg(tag, attrs) {
  const n = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, String(v));
  return n;
}

// A small chart: bars for counts, or lines for several series. Values may be null (no data).
function chart(title, series, { bars = false, unit = "" } = {}) {
  const w = 360;
  const h = 90;
  const n = Math.max(1, series[0].values.length);
  const max = Math.max(1, ...series.flatMap((s) => s.values.filter((v) => v !== null)));
  const root = svg("svg", { viewBox: `0 0 ${w} ${h + 14}`, class: "chart", role: "img", "aria-label": title });
  root.append(svg("line", { x1: 0, y1: h, x2: w, y2: h, class: "axis" }));
  const step = w / n;
  for (const s of series) {
    if (bars) {
      s.values.forEach((v, i) => {
        if (!v) return;
        const bh = (h * v) / max;
        root.append(svg("rect", { x: i * step + 0.5, y: h - bh, width: Math.max(1, step - 1), height: bh, class: s.cls }));
      });
    } else {
      let d = "";
      s.values.forEach((v, i) => {
        if (v === null) return;
        const x = i * step + step / 2;
        const y = h - (h * v) / max;
        d += `${d ? "L" : "M"}${x.toFixed(1)},${y.toFixed(1)}`;
      });
      if (d) root.append(svg("path", { d, class: `line ${s.cls}` }));
      s.values.forEach((v, i) => {
        if (v !== null) root.append(svg("circle", { cx: i * step + step / 2, cy: h - (h * v) / max, r: 2.5, class: `dot ${s.cls}` }));
      });
    }
  }
  const label = svg("text", { x: 2, y: h + 12, class: "chart-label" });
  label.textContent = `max ${Math.round(max)}${unit} · last 60 min`;
  root.append(label);
  return el("figure", { class: "chart-box" },
    el("figcaption", {}, title, " ", ...series.map((s) => el("span", { class: `key ${s.cls}`, text: s.name }))),
    root,
  );
}

export function mount(root) {
  const st = { alive: true };
  const note = el("div", { class: "note-slot" });
  const stages = el("section", { class: "card" });
  const backends = el("section", { class: "card" });
  const charts = el("section", { class: "card charts" });
  root.append(el("section", { class: "queue-view" }, note, stages, backends, charts));

  function renderHealth(hl) {
    const q = hl.queues || {};
    const names = [
      ["preprocess", "preprocess_queue_size", "preprocess_in_flight"],
      ["generate", "generation_queue_size", "generation_in_flight"],
      ["postprocess", "postprocess_queue_size", "postprocess_in_flight"],
    ];
    stages.replaceChildren(
      ...[el("h3", {}, "Stages ", el("span", { class: `badge ${hl.status === "healthy" ? "s-completed" : "s-failed"}`, text: hl.status })),
      hl.reason ? message("error", hl.reason) : null,
      el("table", { class: "small" },
        el("thead", {}, el("tr", {}, ["stage", "waiting", "in flight", "workers", "alive", "busy", "crashes"].map((t) => el("th", { text: t })))),
        el("tbody", {}, names.map(([s, wk, fk]) => {
          const h = (hl.stages || {})[s] || {};
          return el("tr", {}, [s, q[wk] ?? "", q[fk] ?? "", h.workers ?? "", h.alive ?? "", h.busy ?? "", h.crashes ?? ""].map((v) => el("td", { text: String(v) })));
        })),
      ),
      el("p", { class: "muted", text: `unfinished ${q.unfinished ?? "?"} of at most ${q.max_queue_size ?? "?"}` })].filter(Boolean),
    );
    backends.replaceChildren(
      el("h3", { text: `ComfyUI backends (${hl.backends_healthy})` }),
      el("table", { class: "small" },
        el("thead", {}, el("tr", {}, ["backend", "health", "in flight", "ComfyUI queue", "version", "last error"].map((t) => el("th", { text: t })))),
        el("tbody", {}, (hl.backends || []).map((b) =>
          el("tr", {},
            el("td", { class: "mono", text: b.url }),
            el("td", {}, el("span", { class: `badge ${b.healthy ? "s-completed" : "s-failed"}`, text: b.healthy ? "healthy" : "down" })),
            el("td", { text: `${b.in_flight ?? 0}/${b.slots ?? "?"}` }),
            el("td", { text: b.queue_remaining ?? "" }),
            el("td", { text: b.comfyui_version || "" }),
            el("td", { class: "error-text", text: b.last_error || "" }),
          ),
        )),
      ),
    );
  }

  function renderStats(s) {
    const mins = s.minutes;
    charts.replaceChildren(
      el("h3", { text: "Last hour" }),
      el("p", { class: "muted", text: `${s.completed} completed · ${s.failed} failed · ${s.cancelled} cancelled · p50 ${s.p50_ms ?? "–"} ms · p95 ${s.p95_ms ?? "–"} ms${s.sampled ? " (sampled)" : ""}` }),
      el("div", { class: "chart-row" },
        chart("Completed per minute", [{ name: "completed", cls: "c-ok", values: mins.map((m) => m.completed) }], { bars: true }),
        chart("Failures per minute", [{ name: "failed", cls: "c-bad", values: mins.map((m) => m.failed) }, { name: "cancelled", cls: "c-warn", values: mins.map((m) => m.cancelled) }], { bars: true }),
        chart("Duration", [{ name: "p50", cls: "c-ok", values: mins.map((m) => m.p50_ms) }, { name: "p95", cls: "c-warn", values: mins.map((m) => m.p95_ms) }], { unit: " ms" }),
      ),
    );
  }

  // /health answers 503 with a body when something is unhealthy: show it rather than an error.
  const plain = async () => {
    try {
      const r = await fetch("/health", { cache: "no-store" });
      if (st.alive) renderHealth(await r.json());
      return true;
    } catch {
      return false;
    }
  };

  async function tick() {
    if (!st.alive) return;
    const ok = await plain();
    if (document.body.dataset.role === "client") {
      // Not asked at all (it would be a 403): the charts cover every client's jobs.
      charts.replaceChildren(el("h3", { text: "Last hour" }), message("info", "The charts need an admin API key."));
      return;
    }
    try {
      const s = await api("/ui/api/stats");
      if (st.alive) renderStats(s);
      if (st.alive) note.replaceChildren(...(ok ? [] : [message("error", "The comfyq server cannot be reached. Retrying…")]));
    } catch (e) {
      if (!st.alive) return;
      if (e.status === 403) charts.replaceChildren(el("h3", { text: "Last hour" }), message("info", "The charts need an admin API key."));
      else note.replaceChildren(message("error", e.message));
    }
  }

  tick();
  const timer = setInterval(tick, 5000);
  return {
    catchUp: tick,
    unmount() {
      st.alive = false;
      clearInterval(timer);
    },
  };
}
