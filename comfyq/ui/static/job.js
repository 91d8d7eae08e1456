// One job: status, actions, live progress and preview, timeline, outputs, error, webhooks,
// timings and the submitted workflow.

import { api, blobUrl } from "./api.js";
import { FINAL, badge, bytes, clear, duration, el, message, progressBar, setBar, stamp, time } from "./util.js";

export function mount(root, { arg: id, navigate, previews }) {
  const st = { alive: true, detail: null, urls: [], preview: null, loading: false, again: false };
  const head = el("div", { class: "job-head" });
  const actions = el("div", { class: "actions" });
  const note = el("div", { class: "note-slot" });
  const live = el("section", { class: "card live" });
  const bar = progressBar(null);
  const nodeLabel = el("div", { class: "muted node-label", text: "" });
  const previewImg = el("img", { class: "preview", alt: "live preview", hidden: true });
  live.append(el("h3", { text: "Progress" }), nodeLabel, bar, previewImg);
  const timeline = el("ol", { class: "timeline" });
  const outputs = el("div", { class: "gallery" });
  const errorBox = el("section", { class: "card error-card", hidden: true });
  const hooks = el("section", { class: "card", hidden: true });
  const timings = el("section", { class: "card" });
  const workflow = el("section", { class: "card" });
  root.append(
    el("section", { class: "job-view" },
      el("p", {}, el("a", { href: "#/", text: "← all jobs" })),
      head,
      actions,
      note,
      el("div", { class: "job-grid" },
        el("div", {}, live, errorBox, el("section", { class: "card" }, el("h3", { text: "Outputs" }), outputs)),
        el("div", {}, el("section", { class: "card" }, el("h3", { text: "Timeline" }), timeline), timings, hooks),
      ),
      workflow,
    ),
  );

  function flash(kind, text) {
    note.replaceChildren(message(kind, text));
  }

  function button(label, cls, fn) {
    const b = el("button", { type: "button", class: cls, text: label });
    b.addEventListener("click", async () => {
      b.disabled = true;
      try {
        await fn(b);
      } catch (e) {
        flash("error", e.message);
      } finally {
        b.disabled = false;
      }
    });
    return b;
  }

  function renderActions(d) {
    const status = d.job.status;
    const list = [];
    if (!FINAL.has(status)) {
      list.push(
        button("Cancel", "danger", async () => {
          await api(`/cancel/${encodeURIComponent(id)}`, { method: "POST" });
          flash("ok", "Cancel requested.");
          await load();
        }),
      );
    }
    if (status === "failed" || status === "cancelled") {
      list.push(
        button("Retry", "", async () => {
          await api(`/jobs/${encodeURIComponent(id)}/retry`, { method: "POST" });
          flash("ok", "Retrying from the start.");
          await load();
        }),
      );
    }
    list.push(
      button("Run again", "secondary", async () => {
        const input = structuredClone(d.input || {});
        delete input.request_id;
        const res = await api("/generate", { method: "POST", body: { input } });
        navigate(`#/job/${encodeURIComponent(res.id)}`);
      }),
    );
    if (FINAL.has(status)) {
      list.push(
        button("Delete", "danger ghost", async (b) => {
          if (b.dataset.armed !== "1") {
            b.dataset.armed = "1";
            b.textContent = "Really delete?";
            return;
          }
          await api(`/jobs/${encodeURIComponent(id)}/delete`, { method: "POST" });
          navigate("#/");
        }),
      );
    }
    actions.replaceChildren(...list);
  }

  function renderHead(d) {
    const j = d.job;
    head.replaceChildren(
      el("h2", { class: "mono job-id", text: j.id }),
      el("div", { class: "facts" },
        badge(j.status),
        el("span", { text: `${j.kind || "workflow"}` }),
        el("span", { class: "muted", text: `stage ${j.stage}` }),
        el("span", { class: "muted", text: `tries ${j.attempts}/${j.max_attempts}` }),
        j.backend ? el("span", { class: "muted", text: j.backend }) : null,
        el("span", { class: "muted", text: `created ${time(j.created_at)}` }),
        el("span", { class: "muted", text: `duration ${duration(j.created_at, j.finished_at)}` }),
      ),
      el("p", { class: "job-message", text: j.message }),
    );
    head.dataset.status = j.status;
  }

  function renderTimeline(events) {
    clear(timeline);
    for (const e of events) addEvent(e.status, e.at, e.message, e.attempt);
  }

  function addEvent(status, at, msg, attempt) {
    timeline.append(
      el("li", {},
        el("time", { text: time(at), datetime: at }),
        badge(status),
        el("span", {}, msg || "", attempt ? el("span", { class: "muted", text: ` (try ${attempt})` }) : null),
      ),
    );
  }

  async function renderOutputs(list) {
    for (const u of st.urls) URL.revokeObjectURL(u);
    st.urls = [];
    clear(outputs);
    if (!list.length) {
      outputs.append(el("p", { class: "muted", text: "No outputs yet." }));
      return;
    }
    for (const o of list) {
      const fig = el("figure", { class: "output" });
      const cap = el("figcaption", {},
        el("span", { class: "mono", text: o.filename }),
        el("span", { class: "muted", text: ` ${o.mimetype || ""} · ${bytes(o.size)}` }),
      );
      outputs.append(fig);
      const mime = o.mimetype || "";
      const kind = mime.startsWith("image/") ? "img" : mime.startsWith("video/") ? "video" : mime.startsWith("audio/") ? "audio" : null;
      if (o.error || o.upload_error) cap.append(el("div", { class: "error-text", text: o.error || o.upload_error }));
      try {
        const url = await blobUrl(o.url);
        if (!st.alive) return;
        if (url.startsWith("blob:")) st.urls.push(url);
        if (kind === "img") fig.append(el("img", { src: url, alt: o.filename, class: "output-img" }));
        else if (kind) fig.append(el(kind, { src: url, controls: true }));
        fig.append(el("a", { href: url, download: o.filename, class: "download", text: "Download" }));
      } catch (e) {
        fig.append(message("error", `Cannot load ${o.filename}: ${e.message}`));
      }
      fig.append(cap);
    }
  }

  function renderError(err, result) {
    const e = err || (result && result.error);
    if (!e) {
      errorBox.hidden = true;
      return;
    }
    errorBox.hidden = false;
    const details = e.details || {};
    const rows = [
      ["type", e.type],
      ["message", e.message],
      ["node", e.node_id],
      ["node type", e.node_type],
      ["exception", details.exception_type],
      ["exception message", details.exception_message],
    ].filter(([, v]) => v !== undefined && v !== null && v !== "");
    const parts = [
      el("h3", { text: "Error" }),
      el("dl", { class: "kv" }, rows.map(([k, v]) => [el("dt", { text: k }), el("dd", { text: String(v) })])),
    ];
    const tb = details.traceback;
    if (tb) parts.push(el("h4", { text: "Traceback" }), el("pre", { text: Array.isArray(tb) ? tb.join("") : String(tb) }));
    if (details.node_errors) parts.push(el("h4", { text: "ComfyUI node_errors" }), el("pre", { text: JSON.stringify(details.node_errors, null, 2) }));
    const rest = { ...details };
    for (const k of ["exception_type", "exception_message", "traceback", "node_errors"]) delete rest[k];
    if (Object.keys(rest).length) parts.push(el("h4", { text: "Details" }), el("pre", { text: JSON.stringify(rest, null, 2) }));
    errorBox.replaceChildren(...parts);
  }

  function renderHooks(list) {
    hooks.hidden = !list.length;
    if (!list.length) return;
    hooks.replaceChildren(
      el("h3", { text: "Webhook deliveries" }),
      ...list.map((w) =>
        el("div", { class: "hook" },
          el("p", {}, badge(w.state === "delivered" ? "completed" : w.state === "failed" ? "failed" : "queued"), ` ${w.event} → ${w.url || ""} `, el("span", { class: "muted mono", text: w.id })),
          el("table", { class: "small" },
            el("thead", {}, el("tr", {}, ["#", "at", "outcome", "status", "ms", "error"].map((h) => el("th", { text: h })))),
            el("tbody", {}, (w.attempt_log || []).map((a) =>
              el("tr", {}, [a.attempt, time(a.at), a.outcome, a.status_code ?? "", a.duration_ms ?? "", a.error || ""].map((v) => el("td", { text: String(v) }))),
            )),
          ),
        ),
      ),
    );
  }

  function renderTimings(t) {
    const rows = [
      ["queued", t.queued_ms],
      ["preprocess", t.preprocess_ms],
      ["waiting for ComfyUI", t.generate_wait_ms],
      ["generation", t.generation_ms],
      ["waiting for postprocess", t.postprocess_wait_ms],
      ["postprocess", t.postprocess_ms],
      ["total", t.total_ms],
    ];
    const max = Math.max(1, ...rows.map(([, v]) => v || 0));
    timings.replaceChildren(
      el("h3", { text: "Timings" }),
      el("table", { class: "small timings" },
        el("tbody", {}, rows.map(([k, v]) =>
          el("tr", {},
            el("th", { text: k }),
            el("td", { text: v === null || v === undefined ? "…" : `${v} ms` }),
            el("td", { class: "tbar" }, el("span", { style: `width:${(100 * (v || 0)) / max}%` })),
          ),
        )),
      ),
    );
  }

  function renderWorkflow(d) {
    workflow.replaceChildren(
      el("h3", { text: "Request" }),
      el("details", {}, el("summary", { text: "Workflow JSON" }), el("pre", { class: "json", text: JSON.stringify(d.workflow || {}, null, 2) })),
      el("details", {}, el("summary", { text: "Input (secrets removed)" }), el("pre", { class: "json", text: JSON.stringify(d.input || {}, null, 2) })),
    );
  }

  function setProgress(p, status) {
    const running = status === "generating";
    live.hidden = FINAL.has(status) && !st.preview;
    setBar(bar, p);
    bar.hidden = !running && !p;
    if (p && p.max) {
      nodeLabel.textContent = `node ${p.node ?? "?"}${p.node_type ? ` (${p.node_type})` : ""}: ${p.value}/${p.max}`;
    } else {
      nodeLabel.textContent = FINAL.has(status) ? "finished" : running ? "running…" : `waiting (${status})`;
    }
  }

  async function load() {
    if (st.loading) {
      st.again = true; // a change arrived during this read: read once more after it
      return;
    }
    st.loading = true;
    let d;
    try {
      d = await api(`/ui/api/jobs/${encodeURIComponent(id)}`);
    } catch (e) {
      st.loading = false;
      if (!st.alive) return;
      if (e.status === 404) {
        head.replaceChildren(el("h2", { class: "mono", text: id }));
        flash("error", `No job “${id}” here. It may have been deleted, or it belongs to another API key.`);
        for (const s of [live, timings, workflow]) s.hidden = true;
        actions.replaceChildren();
        return;
      }
      flash("error", e.message);
      return;
    }
    st.loading = false;
    if (!st.alive) return;
    st.detail = d;
    renderHead(d);
    renderActions(d);
    renderTimeline(d.events);
    renderError(d.error, d.result);
    renderHooks(d.result.webhooks || []);
    renderTimings(d.result.timings || {});
    renderWorkflow(d);
    setProgress(d.job.progress, d.job.status);
    await renderOutputs(d.result.output || []);
    if (st.again && st.alive) {
      st.again = false;
      await load();
    }
  }

  function onEvent(ev) {
    if (ev.request_id !== id) return;
    if (st.loading || !st.detail) {
      // The read in flight may predate this change: read once more when it is done.
      if (st.loading) st.again = true;
      return;
    }
    const j = st.detail.job;
    if (ev.event === "progress") {
      j.progress = ev.progress;
      setProgress(ev.progress, j.status);
      return;
    }
    if (ev.event === "final_result") {
      j.status = ev.result.status;
      stamp(id, j.status, ev.timestamp);
      load();
      return;
    }
    if (ev.event === "state") {
      j.status = ev.status;
      j.stage = ev.stage || j.stage;
      j.message = ev.message;
      if (typeof ev.attempt === "number") j.attempts = ev.attempt;
      addEvent(ev.status, ev.timestamp, ev.message, ev.attempt);
      renderHead(st.detail);
      renderActions(st.detail);
      setProgress(ev.status === "generating" ? j.progress : null, ev.status);
      stamp(id, ev.status, ev.timestamp);
    }
  }

  function onPreview(p) {
    if (p.job_id !== id) return;
    if (st.preview) URL.revokeObjectURL(st.preview);
    st.preview = URL.createObjectURL(p.blob);
    previewImg.src = st.preview;
    previewImg.hidden = false;
    live.hidden = false;
  }

  load();
  const seen = previews && previews.get(id);
  if (seen) onPreview(seen);

  return {
    onEvent,
    onPreview,
    catchUp: load,
    unmount() {
      st.alive = false;
      for (const u of st.urls) URL.revokeObjectURL(u);
      if (st.preview) URL.revokeObjectURL(st.preview);
    },
  };
}
