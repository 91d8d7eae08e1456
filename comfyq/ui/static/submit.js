// Submit a job: a modifier with its parameters as a form (from the API's schema), or a workflow
// JSON; input images by drop or file picker (sent as base64 data URIs, or URLs). Errors from the
// API are shown beside the field they name.

import { api } from "./api.js";
import { el, message } from "./util.js";

function resolve(schema, root) {
  if (schema && schema.$ref && root && root.$defs) {
    const name = schema.$ref.split("/").pop();
    return root.$defs[name] || schema;
  }
  if (schema && Array.isArray(schema.anyOf)) {
    const real = schema.anyOf.filter((s) => s.type !== "null");
    // One real alternative (x | null): that one. Several (an integer or a '#rrggbb' string):
    // a text field whose value is read as JSON when it parses.
    if (real.length === 1) return { ...schema, ...resolve(real[0], root), anyOf: undefined };
    return { ...schema, anyOf: undefined, type: undefined, mixed: true };
  }
  return schema || {};
}

function fieldFor(name, raw, root, required) {
  const schema = resolve(raw, root);
  if (schema.default === null) delete schema.default;
  const id = `f-${name}`;
  const path = `$.input.modifications.${name}`;
  let input;
  const type = Array.isArray(schema.type) ? schema.type.find((t) => t !== "null") : schema.type;
  if (Array.isArray(schema.enum)) {
    input = el("select", { id, name }, el("option", { value: "", text: "(default)" }), schema.enum.map((v) => el("option", { value: JSON.stringify(v), text: String(v) })));
    if (schema.default !== undefined) input.value = JSON.stringify(schema.default);
    input.dataset.kind = "enum";
  } else if (type === "boolean") {
    input = el("select", { id, name }, el("option", { value: "", text: "(default)" }), el("option", { value: "true", text: "yes" }), el("option", { value: "false", text: "no" }));
    if (schema.default !== undefined) input.value = String(schema.default);
    input.dataset.kind = "boolean";
  } else if (type === "integer" || type === "number") {
    input = el("input", {
      id,
      name,
      type: "number",
      step: type === "integer" ? "1" : "any",
      min: schema.minimum ?? schema.exclusiveMinimum,
      max: schema.maximum ?? schema.exclusiveMaximum,
      placeholder: schema.default !== undefined ? String(schema.default) : "",
    });
    input.dataset.kind = type;
  } else if (type === "string") {
    input = el("input", { id, name, type: "text", placeholder: schema.default !== undefined ? String(schema.default) : "" });
    input.dataset.kind = "string";
  } else {
    // No type known (an untyped modifier): JSON when it parses (numbers, true/false), else text.
    input = el("input", { id, name, type: "text", placeholder: schema.default !== undefined ? JSON.stringify(schema.default) : "value" });
    input.dataset.kind = "any";
  }
  const help = schema.description || schema.title || "";
  return el("div", { class: "field", dataset: { path } },
    el("label", { for: id }, name, required ? el("span", { class: "req", text: " *" }) : null),
    input,
    help ? el("small", { class: "muted", text: help }) : null,
    el("div", { class: "field-error error-text", role: "alert" }),
  );
}

function valueOf(input) {
  const v = input.value.trim();
  if (v === "") return undefined;
  switch (input.dataset.kind) {
    case "integer":
    case "number":
      return Number(v);
    case "boolean":
      return v === "true";
    case "enum":
      return JSON.parse(v);
    case "string":
      return v;
    default:
      try {
        return JSON.parse(v);
      } catch {
        return v;
      }
  }
}

function readFile(file, as) {
  return new Promise((ok, fail) => {
    const r = new FileReader();
    r.onload = () => ok(r.result);
    r.onerror = () => fail(r.error);
    if (as === "text") r.readAsText(file);
    else r.readAsDataURL(file);
  });
}

export function mount(root, { navigate }) {
  const st = { alive: true, mods: [], images: [] };
  const note = el("div", { class: "note-slot" });
  const modeMod = el("input", { type: "radio", name: "mode", value: "modifier", id: "mode-mod", checked: true });
  const modeWf = el("input", { type: "radio", name: "mode", value: "workflow", id: "mode-wf" });
  const select = el("select", { id: "modifier", name: "modifier" });
  const modDesc = el("p", { class: "muted" });
  const params = el("div", { class: "params" });
  const modBox = el("div", { class: "field", dataset: { path: "$.input.modifier" } },
    el("label", { for: "modifier", text: "Modifier" }), select, modDesc, el("div", { class: "field-error error-text", role: "alert" }));
  const wfText = el("textarea", { id: "workflow", rows: "12", spellcheck: "false", placeholder: "Paste an API-format workflow JSON, or drop a .json file here" });
  const wfBox = el("div", { class: "field", hidden: true, dataset: { path: "$.input.workflow_json" } },
    el("label", { for: "workflow", text: "Workflow JSON (API format)" }), wfText, el("div", { class: "field-error error-text", role: "alert" }));
  const fileInput = el("input", { type: "file", id: "images", multiple: true, accept: "image/*,video/*,audio/*" });
  const drop = el("div", { class: "drop", tabindex: "0" }, "Drop input images here or ", el("label", { for: "images", class: "linkish", text: "choose files" }), fileInput);
  const imageList = el("ul", { class: "images" });
  const urlInput = el("input", { type: "url", placeholder: "https://… (an image by URL)", id: "image-url" });
  const urlAdd = el("button", { type: "button", class: "secondary", text: "Add URL" });
  const imagesBox = el("div", { class: "field", dataset: { path: "$.input.images" } },
    el("label", { text: "Input images" }), drop, el("div", { class: "row" }, urlInput, urlAdd), imageList,
    el("small", { class: "muted", text: "Refer to an image by its name in the workflow (LoadImage) or in a modifier's input_image." }),
    el("div", { class: "field-error error-text", role: "alert" }));
  const rid = el("input", { id: "request_id", type: "text", placeholder: "(the server makes one)" });
  const prio = el("input", { id: "priority", type: "number", step: "1", value: "0" });
  const submit = el("button", { type: "submit", text: "Submit" });
  const form = el("form", { class: "card submit-form", novalidate: true },
    el("h2", { text: "Submit a job" }),
    el("div", { class: "row modes" }, el("label", {}, modeMod, " Modifier"), el("label", {}, modeWf, " Workflow JSON")),
    modBox,
    params,
    wfBox,
    imagesBox,
    el("div", { class: "row" },
      el("div", { class: "field", dataset: { path: "$.input.request_id" } }, el("label", { for: "request_id", text: "request_id" }), rid, el("div", { class: "field-error error-text" })),
      el("div", { class: "field", dataset: { path: "$.input.priority" } }, el("label", { for: "priority", text: "priority" }), prio, el("div", { class: "field-error error-text" })),
    ),
    note,
    el("div", { class: "row" }, submit),
  );
  root.append(el("section", { class: "submit-view" }, form));

  function mode() {
    return modeWf.checked ? "workflow" : "modifier";
  }
  function showMode() {
    const wf = mode() === "workflow";
    wfBox.hidden = !wf;
    modBox.hidden = wf;
    params.hidden = wf;
  }
  modeMod.addEventListener("change", showMode);
  modeWf.addEventListener("change", showMode);

  function renderParams() {
    const m = st.mods.find((x) => x.name === select.value);
    params.replaceChildren();
    modDesc.textContent = m ? m.description || "" : "";
    if (!m) return;
    const props = (m.schema && m.schema.properties) || {};
    const required = new Set((m.schema && m.schema.required) || []);
    for (const [name, s] of Object.entries(props)) params.append(fieldFor(name, s, m.schema, required.has(name)));
    if (!Object.keys(props).length) params.append(el("p", { class: "muted", text: "This modifier takes no parameters." }));
  }
  select.addEventListener("change", renderParams);

  function renderImages() {
    imageList.replaceChildren(
      ...st.images.map((img, i) => {
        const name = el("input", { type: "text", value: img.name, "aria-label": "image name" });
        name.addEventListener("input", () => (img.name = name.value));
        const rm = el("button", { type: "button", class: "secondary", text: "remove" });
        rm.addEventListener("click", () => {
          st.images.splice(i, 1);
          renderImages();
        });
        return el("li", { dataset: { path: `$.input.images[${i}]` } },
          img.thumb ? el("img", { src: img.thumb, alt: "" }) : null, name,
          el("span", { class: "muted", text: img.size ? ` ${Math.round(img.size / 1024)} KiB` : " URL" }), rm,
          el("div", { class: "field-error error-text" }));
      }),
    );
  }

  async function addFiles(files) {
    for (const f of files) {
      if (f.name.endsWith(".json") || f.type === "application/json") {
        wfText.value = await readFile(f, "text");
        modeWf.checked = true;
        showMode();
        continue;
      }
      const data = await readFile(f, "data");
      st.images.push({ name: f.name.replace(/[^A-Za-z0-9._-]/g, "_") || "image.png", image: data, thumb: f.type.startsWith("image/") ? data : null, size: f.size });
    }
    renderImages();
  }
  fileInput.addEventListener("change", () => addFiles([...fileInput.files]));
  for (const zone of [drop, wfText]) {
    zone.addEventListener("dragover", (e) => {
      e.preventDefault();
      zone.classList.add("over");
    });
    zone.addEventListener("dragleave", () => zone.classList.remove("over"));
    zone.addEventListener("drop", (e) => {
      e.preventDefault();
      zone.classList.remove("over");
      addFiles([...e.dataTransfer.files]);
    });
  }
  urlAdd.addEventListener("click", () => {
    const u = urlInput.value.trim();
    if (!u) return;
    const name = (u.split("/").pop() || "image").split("?")[0].replace(/[^A-Za-z0-9._-]/g, "_") || "image";
    st.images.push({ name, image: u });
    urlInput.value = "";
    renderImages();
  });

  function clearErrors() {
    for (const e of form.querySelectorAll(".field-error")) e.textContent = "";
    for (const f of form.querySelectorAll(".invalid")) f.classList.remove("invalid");
    note.replaceChildren();
  }

  function showErrors(err) {
    const left = [];
    for (const f of err.fields || []) {
      let target = null;
      let best = -1;
      for (const node of form.querySelectorAll("[data-path]")) {
        const p = node.dataset.path;
        if ((f.path === p || f.path.startsWith(`${p}.`) || f.path.startsWith(`${p}[`)) && p.length > best && !node.closest("[hidden]")) {
          target = node;
          best = p.length;
        }
      }
      const slot = target && target.querySelector(":scope > .field-error");
      if (slot) {
        slot.textContent = f.message;
        target.classList.add("invalid");
      } else left.push(`${f.path}: ${f.message}`);
    }
    note.replaceChildren(message("error", left.length ? `${err.message}\n${left.join("\n")}` : err.message));
  }

  function build() {
    const input = {};
    if (mode() === "workflow") {
      try {
        input.workflow_json = JSON.parse(wfText.value || "{}");
      } catch (e) {
        throw Object.assign(new Error("The workflow is not valid JSON."), { fields: [{ path: "$.input.workflow_json", message: `not valid JSON: ${e.message}` }] });
      }
    } else {
      input.modifier = select.value;
      const mods = {};
      for (const node of params.querySelectorAll("input, select")) {
        const v = valueOf(node);
        if (v !== undefined) mods[node.name] = v;
      }
      if (Object.keys(mods).length) input.modifications = mods;
    }
    if (st.images.length) input.images = st.images.map((i) => ({ name: i.name, image: i.image }));
    if (rid.value.trim()) input.request_id = rid.value.trim();
    const p = Number(prio.value || "0");
    if (p) input.priority = p;
    return { input };
  }

  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    clearErrors();
    submit.disabled = true;
    try {
      const body = build();
      const res = await api("/generate", { method: "POST", body });
      navigate(`#/job/${encodeURIComponent(res.id)}`);
    } catch (err) {
      if (st.alive) showErrors(err);
    } finally {
      submit.disabled = false;
    }
  });

  (async () => {
    try {
      const { modifiers } = await api("/ui/api/modifiers");
      if (!st.alive) return;
      st.mods = modifiers;
      select.replaceChildren(...modifiers.map((m) => el("option", { value: m.name, text: m.name })));
      const pick = modifiers.find((m) => m.name === "ImageEffects") || modifiers[0];
      if (pick) select.value = pick.name;
      renderParams();
    } catch (err) {
      if (st.alive) note.replaceChildren(message("error", `Modifiers could not be loaded: ${err.message}`));
    }
  })();

  return {
    unmount() {
      st.alive = false;
    },
  };
}
