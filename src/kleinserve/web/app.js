/* kleinserve playground.
 *
 * Plain browser JavaScript: no build step, no framework, no CDN. The form is generated from the
 * endpoint's input JSON schema (GET /api/schema, the pydantic model FluxKleinInput), so a field added
 * to the schema shows up here with its description, default and limits.
 *
 * Requests go through the same queue API the fal clients use:
 *   POST {queue}/{endpoint id}             submit (Authorization: Key <key>)
 *   GET  /api/requests/{id}/progress       the queue's status events plus step progress and live
 *                                          previews (SSE read with fetch: EventSource cannot send
 *                                          the Authorization header); falls back to polling status_url
 *   GET  {response_url}                    the result
 *   PUT  {cancel_url}                      cancel
 *   GET  /api/requests                     this key's recent requests (history)
 * The key lives in sessionStorage of this tab only; it is never part of the page.
 */
"use strict";

(() => {
  const KEY_STORAGE = "kleinserve.apiKey";
  const LAST_SEED_STORAGE = "kleinserve.lastSeed";
  const $ = (sel, root = document) => root.querySelector(sel);

  // Fields placed in the main section, in this order; any other non-CNS field follows them.
  const MAIN_ORDER = [
    "prompt", "image_urls", "loras", "negative_prompt", "image_size", "num_inference_steps", "guidance_scale", "seed",
    "num_images", "output_format", "acceleration", "enable_safety_checker",
  ];
  // Not shown: the playground always stores its images (sync_mode returns data URIs instead).
  const HIDDEN = new Set(["sync_mode"]);
  const isCns = (name) => name === "enable_cns" || name.startsWith("cns_");

  const state = {
    meta: null,          // /api/schema
    schema: null,        // input JSON schema
    props: {},           // name -> resolved property schema
    fields: {},          // name -> {get(), set(v), reset(), el}
    current: null,       // the request being watched: {id, urls, input, abort, startedAt, ...}
    lastSeed: null,
    lastSubmitted: null, // {input, result, requestId}
    snippetLang: "curl",
    historyTimer: null,
  };

  // ------------------------------------------------------------------------------ small helpers
  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else if (k === "html") node.innerHTML = v;
      else if (k.startsWith("on") && typeof v === "function") node.addEventListener(k.slice(2), v);
      else if (k === "dataset") Object.assign(node.dataset, v);
      else node.setAttribute(k, v === true ? "" : v);
    }
    for (const c of children.flat()) {
      if (c === null || c === undefined || c === false) continue;
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }

  // Friendlier labels for a few fields; every other label comes from the schema's title.
  const LABELS = {
    num_inference_steps: "Steps", guidance_scale: "Guidance scale", num_images: "Number of images",
    enable_safety_checker: "Safety checker", output_format: "Output format", image_size: "Image size",
    negative_prompt: "Negative prompt", enable_cns: "Enable Colored Noise Sampling",
  };
  const titleOf = (name, prop) => {
    if (LABELS[name]) return LABELS[name];
    if (prop && prop.title && prop.title.toLowerCase().replace(/ /g, "_") !== name) return prop.title;
    const words = name.replace(/^cns_/, "").split("_");
    const t = words.join(" ");
    return t.charAt(0).toUpperCase() + t.slice(1);
  };

  const fmtSeconds = (s) => (s == null || isNaN(s)) ? "–" : (s < 10 ? `${Number(s).toFixed(2)} s` : `${Number(s).toFixed(1)} s`);
  const fmtBytes = (n) => n == null ? "" : n < 1024 ? `${n} B` : n < 1048576 ? `${(n / 1024).toFixed(0)} KB` : `${(n / 1048576).toFixed(1)} MB`;
  const fmtTime = (t) => {
    if (!t) return "";
    const d = new Date(typeof t === "number" ? t * 1000 : t);
    if (isNaN(d)) return String(t);
    const now = new Date();
    const sameDay = d.toDateString() === now.toDateString();
    return sameDay ? d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" })
      : d.toLocaleString([], { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" });
  };

  function getKey() { return ($("#api-key").value || "").trim(); }
  function authHeaders(extra = {}) {
    const h = { ...extra };
    const key = getKey();
    if (key) h["Authorization"] = `Key ${key}`;
    return h;
  }

  function resolveRef(schema) {
    let s = schema;
    let guard = 0;
    while (s && s.$ref && guard++ < 10) {
      const name = s.$ref.split("/").pop();
      const defs = state.schema.$defs || state.schema.definitions || {};
      s = { ...defs[name], ...Object.fromEntries(Object.entries(s).filter(([k]) => k !== "$ref")) };
    }
    return s || {};
  }

  // anyOf [X, null] -> X (+nullable); anyOf [enum, object] stays (image_size)
  function normalizeProp(prop) {
    prop = resolveRef(prop);
    if (prop.anyOf) {
      const members = prop.anyOf.map(resolveRef);
      const nonNull = members.filter((m) => m.type !== "null");
      if (nonNull.length === 1) {
        const { anyOf, ...rest } = prop;
        return { ...nonNull[0], ...rest, nullable: members.length !== nonNull.length };
      }
      return { ...prop, anyOf: members };
    }
    return prop;
  }

  // ------------------------------------------------------------------------------ errors
  function showTopError(title, body) {
    const box = $("#top-error");
    $(".alert-title", box).textContent = title;
    $(".alert-body", box).textContent = body || "";
    box.hidden = false;
    box.scrollIntoView({ block: "nearest" });
  }
  function clearTopError() { $("#top-error").hidden = true; }

  function setFieldError(name, msg, sub) {
    const f = state.fields[name];
    if (!f) return false;
    // Mark the exact input when the error is about a part of the field (image_size.width).
    const part = sub ? document.getElementById(`f-${name}-${sub}`) : null;
    if (part) { part.classList.add("invalid-input"); f.el.classList.add("has-error"); }
    else f.el.classList.add("invalid");
    let slot = $(".field-error", f.el);
    if (!slot) { slot = el("span", { class: "field-error", role: "alert" }); f.el.append(slot); }
    slot.textContent = slot.textContent ? `${slot.textContent}; ${msg}` : msg;
    if (isCns(name)) $("#advanced").open = true;
    return true;
  }
  function clearFieldError(f) {
    f.el.classList.remove("invalid", "has-error");
    for (const x of f.el.querySelectorAll(".invalid-input")) x.classList.remove("invalid-input");
    const slot = $(".field-error", f.el);
    if (slot) slot.remove();
  }
  function clearFieldErrors() {
    for (const f of Object.values(state.fields)) clearFieldError(f);
  }

  // FastAPI / pydantic 422: {"detail": [{"loc": ["body", "image_size", "ImageSize", "width"], "msg"}]}
  // A union field (image_size: preset | {width, height}) reports one error per branch: keep only
  // the errors of the branch the user actually chose.
  function showValidationErrors(detail, input) {
    let shown = 0;
    const unplaced = [];
    const items = Array.isArray(detail) ? detail : [{ msg: typeof detail === "string" ? detail : JSON.stringify(detail) }];
    const isBranchTag = (p) => typeof p === "string" && (/^[A-Z]/.test(p) || p.includes("[") || p.includes("-"));
    for (const item of items) {
      const loc = (item.loc || []).filter((p) => p !== "body");
      const name = loc.find((p) => typeof p === "string" && state.fields[p]);
      const rest = name ? loc.slice(loc.indexOf(name) + 1) : [];
      if (name && input && rest.length && isBranchTag(rest[0])) {
        const value = input[name];
        const objectBranch = /^[A-Z]/.test(rest[0]);
        if (value && typeof value === "object" ? !objectBranch : objectBranch) continue;
      }
      const sub = rest.filter((p) => !isBranchTag(p)).map(String);
      let msg = item.msg || "invalid value";
      if (name && sub.length) msg = `${sub.join(".")}: ${msg}`;
      if (name && setFieldError(name, msg, sub.length === 1 ? sub[0] : null)) shown++;
      else unplaced.push(`${loc.join(".") || "input"}: ${msg}`);
    }
    const first = document.querySelector(".field.invalid, .field.has-error");
    if (first) first.scrollIntoView({ block: "center", behavior: "smooth" });
    if (unplaced.length || !shown) showTopError("Invalid input.", unplaced.join("\n") || "Check the highlighted fields.");
    else showTopError("Invalid input.", `${shown} field${shown > 1 ? "s need" : " needs"} attention (see below).`);
  }

  // Response JSON, keeping an exact `seed` (up to 2^63-1; JS numbers are exact only to 2^53).
  async function readResult(resp) {
    let text = "";
    try { text = await resp.text(); } catch (_) { return null; }
    let body = null;
    try { body = JSON.parse(text); } catch (_) { return null; }
    const m = /"seed"\s*:\s*(\d+)/.exec(text);
    if (body && typeof body === "object" && m && !Number.isSafeInteger(body.seed)) body.seed = m[1];
    return body;
  }

  async function errorFromResponse(resp) {
    let body = null;
    try { body = await resp.json(); } catch (_) { /* not JSON */ }
    return { status: resp.status, body };
  }

  function describeError(status, body) {
    if (!body) return `HTTP ${status}`;
    if (typeof body.detail === "string") return body.detail;
    if (body.error && typeof body.error === "object") return body.error.message || JSON.stringify(body.error);
    if (typeof body.error === "string") return body.error;
    if (body.detail) return JSON.stringify(body.detail);
    return `HTTP ${status}: ${JSON.stringify(body)}`;
  }

  function handleHttpError(status, body, context, input) {
    if (status === 401 || status === 403) {
      $("#key-form").classList.add("needs-key");
      showTopError(status === 401 ? "Not authorized." : "Forbidden.",
        (getKey() ? "The server rejected this API key. " : "Paste an API key at the top right. ") + describeError(status, body));
      return;
    }
    if (status === 422 && body && body.detail) { showValidationErrors(body.detail, input); return; }
    showTopError(`${context} failed (HTTP ${status}).`, describeError(status, body));
  }

  // ------------------------------------------------------------------------------ form builder
  function fieldShell(name, prop, control, { inlineLabel = false } = {}) {
    const id = `f-${name}`;
    const dflt = defaultText(name, prop) ? el("span", { class: "default", title: "default", text: defaultText(name, prop) }) : null;
    // Switches carry their label inline: their default goes on the same row.
    if (inlineLabel) control = el("div", { class: "row inline-row" }, control, dflt);
    const head = (inlineLabel && !isCns(name)) ? null : el("div", { class: "field-head" },
      inlineLabel ? null : el("label", { for: id, text: titleOf(name, prop) }),
      isCns(name) ? el("code", { class: "muted", text: name }) : null,
      inlineLabel ? null : dflt,
    );
    const wrap = el("div", { class: `field field-${name}`, "data-field": name }, head, control);
    if (prop.description) wrap.append(el("span", { class: "help", id: `${id}-help`, text: prop.description }));
    return wrap;
  }

  function defaultText(name, prop) {
    if (!("default" in prop)) return prop.nullable ? "default: random" : "";
    const d = prop.default;
    if (d === null) return name === "seed" ? "default: random" : "default: none";
    if (d === "") return "default: empty";
    if (typeof d === "object") return `default: ${JSON.stringify(d)}`;
    return `default: ${d}`;
  }

  function buildTextarea(name, prop) {
    const ta = el("textarea", {
      id: `f-${name}`, name, rows: name === "prompt" ? 3 : 2, class: name === "prompt" ? "big" : "",
      placeholder: name === "prompt" ? "a photo of a red fox in the snow, golden hour" : (name === "negative_prompt" ? "blurry, low quality, watermark" : ""),
      "aria-describedby": `f-${name}-help`,
    });
    const dflt = prop.default ?? "";
    ta.value = dflt;
    return {
      el: fieldShell(name, prop, ta), input: ta,
      get: () => ta.value,
      set: (v) => { ta.value = v ?? ""; },
      reset: () => { ta.value = dflt; },
      isDefault: () => ta.value === dflt && name !== "prompt",
    };
  }

  function buildText(name, prop) {
    const inp = el("input", { id: `f-${name}`, name, type: "text" });
    const dflt = prop.default ?? "";
    inp.value = dflt;
    return {
      el: fieldShell(name, prop, inp), input: inp,
      get: () => inp.value, set: (v) => { inp.value = v ?? ""; }, reset: () => { inp.value = dflt; },
      isDefault: () => inp.value === dflt,
    };
  }

  function buildBool(name, prop) {
    const cb = el("input", { id: `f-${name}`, name, type: "checkbox", role: "switch" });
    const dflt = !!prop.default;
    cb.checked = dflt;
    const stateText = el("span", { class: "muted small" });
    const sync = () => { stateText.textContent = cb.checked ? "on" : "off"; };
    cb.addEventListener("change", sync); sync();
    const sw = el("label", { class: "switch", for: `f-${name}` }, cb, el("span", { class: "track" }),
      el("span", { class: "label", text: titleOf(name, prop) }), stateText);
    return {
      el: fieldShell(name, prop, sw, { inlineLabel: true }), input: cb,
      get: () => cb.checked, set: (v) => { cb.checked = !!v; sync(); }, reset: () => { cb.checked = dflt; sync(); },
      isDefault: () => cb.checked === dflt,
    };
  }

  function buildEnum(name, prop) {
    const values = prop.enum;
    const dflt = prop.default ?? values[0];
    let control, get, set;
    if (values.length <= 4) {
      control = el("div", { class: "segmented", role: "radiogroup", id: `f-${name}` },
        values.map((v) => el("label", {}, el("input", { type: "radio", name, value: v, checked: v === dflt }), el("span", { text: v }))));
      get = () => { const c = control.querySelector("input:checked"); return c ? c.value : dflt; };
      set = (v) => { for (const r of control.querySelectorAll("input")) r.checked = r.value === String(v); };
    } else {
      control = el("select", { id: `f-${name}`, name }, values.map((v) => el("option", { value: v, text: v, selected: v === dflt })));
      get = () => control.value; set = (v) => { control.value = v; };
    }
    return {
      el: fieldShell(name, prop, control), input: control, get, set,
      reset: () => set(dflt), isDefault: () => get() === dflt,
    };
  }

  function numberBounds(prop) {
    const min = prop.minimum ?? (prop.exclusiveMinimum !== undefined ? prop.exclusiveMinimum : undefined);
    const max = prop.maximum ?? (prop.exclusiveMaximum !== undefined ? prop.exclusiveMaximum : undefined);
    return { min, max };
  }

  function buildNumber(name, prop) {
    const isInt = prop.type === "integer";
    const { min, max } = numberBounds(prop);
    const dflt = prop.default;
    const range = max !== undefined && min !== undefined ? max - min : Infinity;
    const step = isInt ? 1 : (range <= 2.5 ? 0.01 : 0.05);
    // Small integer ranges (num_images) read best as a segmented control.
    if (isInt && range <= 4 && range >= 1) {
      const values = []; for (let v = min; v <= max; v++) values.push(v);
      const f = buildEnum(name, { ...prop, enum: values.map(String), default: String(dflt) });
      const get = f.get;
      return { ...f, get: () => Number(get()), set: (v) => f.set(String(v)), isDefault: () => Number(get()) === dflt };
    }
    const num = el("input", {
      id: `f-${name}`, name, type: "number", class: "num", step: isInt ? 1 : "any",
      min, max, inputmode: isInt ? "numeric" : "decimal", "aria-describedby": `f-${name}-help`,
    });
    num.value = dflt ?? "";
    let control = num;
    if (Number.isFinite(range)) {
      const slider = el("input", { type: "range", min, max, step, tabindex: -1, "aria-label": `${titleOf(name, prop)} slider` });
      slider.value = dflt ?? min;
      slider.addEventListener("input", () => { num.value = isInt ? slider.value : String(Number(slider.value)); });
      num.addEventListener("input", () => { if (num.value !== "") slider.value = num.value; });
      control = el("div", { class: "row" }, slider, num);
      num._slider = slider;
    }
    const parse = () => {
      if (num.value.trim() === "") return null;
      const v = Number(num.value);
      return Number.isNaN(v) ? num.value : v;
    };
    const set = (v) => { num.value = v ?? ""; if (num._slider && v != null) num._slider.value = v; };
    return {
      el: fieldShell(name, prop, control), input: num,
      get: parse, set, reset: () => set(dflt), isDefault: () => parse() === dflt,
    };
  }

  function buildSeed(name, prop) {
    const num = el("input", {
      id: `f-${name}`, name, type: "number", min: prop.minimum ?? 0, step: 1, placeholder: "random",
      inputmode: "numeric", "aria-describedby": `f-${name}-help`,
    });
    const random = el("button", { type: "button", class: "ghost small", id: "seed-random", title: "Leave empty: the server draws a seed", text: "random" });
    const reuse = el("button", { type: "button", class: "ghost small", id: "seed-reuse", title: "Use the seed of the last result", text: "↺ reuse last" });
    random.addEventListener("click", () => { num.value = ""; });
    reuse.addEventListener("click", () => {
      if (state.lastSeed == null) { showTopError("No previous seed yet.", "Generate once first; its seed can then be reused."); return; }
      num.value = String(state.lastSeed);
    });
    const control = el("div", { class: "row seed-row" }, num, random, reuse);
    const syncReuse = () => { reuse.disabled = state.lastSeed == null; reuse.title = state.lastSeed == null ? "No result yet" : `Use ${state.lastSeed}`; };
    syncReuse();
    return {
      el: fieldShell(name, prop, control), input: num, syncReuse,
      get: () => {
        const s = num.value.trim();
        if (s === "") return null;
        // Seeds go up to 2^63-1: keep them exact (JSON numbers in JS lose precision past 2^53).
        return /^\d+$/.test(s) ? (s.length > 15 ? { __bigint: s } : Number(s)) : s;
      },
      set: (v) => { num.value = v == null ? "" : String(v); },
      reset: () => { num.value = ""; },
      isDefault: () => num.value.trim() === "",
    };
  }

  function buildImageSize(name, prop) {
    const presetSchema = prop.anyOf.find((m) => m.enum);
    const objSchema = prop.anyOf.find((m) => m.type === "object" || m.properties);
    const presets = (state.meta && state.meta.image_size_presets) || {};
    const names = presetSchema ? presetSchema.enum : Object.keys(presets);
    const dflt = prop.default;
    const wProp = resolveRef((objSchema && objSchema.properties && objSchema.properties.width) || {});
    const hProp = resolveRef((objSchema && objSchema.properties && objSchema.properties.height) || {});

    const pretty = (p) => p.replace(/_(\d+)_(\d+)$/, " $1:$2").replace(/_hd$/, " HD").replace(/_/g, " ");
    const opts = names.map((p) => {
      const [w, h] = presets[p] || [0, 0];
      const scale = 26 / Math.max(w || 1, h || 1);
      const shape = el("span", { class: "shape", style: `width:${Math.round((w || 26) * scale)}px;height:${Math.round((h || 26) * scale)}px` });
      return el("label", { class: "size-opt", title: `${p}: ${w}×${h}` },
        el("input", { type: "radio", name: "image_size_choice", value: p, checked: p === dflt }),
        el("span", { class: "size-card" }, shape, el("span", { text: pretty(p) }), el("span", { class: "dims", text: w ? `${w}×${h}` : "" })));
    });
    const customOpt = el("label", { class: "size-opt", title: "custom width × height" },
      el("input", { type: "radio", name: "image_size_choice", value: "custom", id: "size-custom" }),
      el("span", { class: "size-card" }, el("span", { class: "shape", style: "width:22px;height:16px;border-style:dashed" }), el("span", { text: "custom" }), el("span", { class: "dims", text: "W×H" })));
    // Edit endpoints: no size means the first input image's size.
    const autoOpt = prop.anyOf.some((m) => m.type === "null") ? el("label", { class: "size-opt", title: "the first input image's size" },
      el("input", { type: "radio", name: "image_size_choice", value: "auto", checked: dflt === null }),
      el("span", { class: "size-card" }, el("span", { class: "shape", style: "width:18px;height:18px;border-style:dotted" }), el("span", { text: "auto" }), el("span", { class: "dims", text: "1st image" }))) : null;
    const grid = el("div", { class: "sizes", role: "radiogroup", id: `f-${name}`, "aria-label": "image size" }, autoOpt, opts, customOpt);

    const w = el("input", { type: "number", id: "f-image_size-width", name: "width", min: wProp.minimum, max: wProp.maximum, step: 16, value: wProp.default ?? 512 });
    const h = el("input", { type: "number", id: "f-image_size-height", name: "height", min: hProp.minimum, max: hProp.maximum, step: 16, value: hProp.default ?? 512 });
    const custom = el("div", { class: "custom-size grid-2" },
      el("div", {}, el("label", { for: "f-image_size-width", text: `width (${wProp.minimum ?? ""}–${wProp.maximum ?? ""})` }), w),
      el("div", {}, el("label", { for: "f-image_size-height", text: `height (${hProp.minimum ?? ""}–${hProp.maximum ?? ""})` }), h));
    const syncCustom = () => {
      const isCustom = customOpt.querySelector("input").checked;
      custom.hidden = !isCustom;
    };
    grid.addEventListener("change", (ev) => {
      const v = ev.target.value;
      if (v !== "custom" && presets[v]) { w.value = presets[v][0]; h.value = presets[v][1]; }
      syncCustom();
    });
    syncCustom();
    const choice = () => { const c = grid.querySelector("input:checked"); return !c || c.value === "auto" ? dflt : c.value; };
    const num = (x) => (x.value.trim() === "" ? null : Number(x.value));
    const set = (v) => {
      if (v === null || v === undefined) {
        for (const r of grid.querySelectorAll("input")) r.checked = r.value === "auto";
      } else if (typeof v === "string") {
        for (const r of grid.querySelectorAll("input")) r.checked = r.value === v;
      } else if (v && typeof v === "object") {
        customOpt.querySelector("input").checked = true;
        w.value = v.width; h.value = v.height;
      }
      syncCustom();
    };
    const control = el("div", {}, grid, custom);
    return {
      el: fieldShell(name, prop, control), input: grid,
      get: () => (choice() === "custom" ? { width: num(w), height: num(h) } : choice()),
      set, reset: () => set(dflt), isDefault: () => choice() === dflt,
    };
  }

  // Input images (image_urls): upload (to this server's storage), URL or data: URI, drag and drop;
  // one thumbnail per image. The value is the list of URLs.
  function buildImages(name, prop) {
    const max = prop.maxItems || 4;
    let urls = [];
    const list = el("div", { class: "thumbs", id: `f-${name}` });
    const urlInput = el("input", { type: "url", id: `f-${name}-url`, placeholder: "https://… or data:…", spellcheck: "false" });
    const fileInput = el("input", { type: "file", id: `f-${name}-file`, accept: "image/*", multiple: true });
    const note = el("span", { class: "help", text: "" });
    const render = () => {
      list.textContent = "";
      urls.forEach((u, k) => {
        list.append(el("figure", { class: "thumb", "data-index": k },
          el("img", { src: u, alt: `input image ${k + 1}` }),
          el("button", { type: "button", class: "ghost small", title: "remove", text: "✕", onclick: () => { urls.splice(k, 1); render(); fire(); } })));
      });
      urlInput.disabled = fileInput.disabled = urls.length >= max;
      note.textContent = `${urls.length}/${max} image(s)`;
    };
    const fire = () => list.dispatchEvent(new Event("change", { bubbles: true }));
    const add = (u) => { if (u && urls.length < max) { urls.push(u); render(); fire(); } };
    async function upload(file) {
      note.textContent = `uploading ${file.name}…`;
      const resp = await fetch("/files/upload", {
        method: "POST", body: file,
        headers: authHeaders({ "content-type": file.type || "application/octet-stream", "x-fal-file-name": file.name }),
      });
      if (!resp.ok) {
        const body = await readResult(resp);
        showTopError(`Uploading ${file.name} failed.`, describeError(resp.status, body));
        render();
        return;
      }
      add((await resp.json()).access_url);
    }
    const addFiles = async (files) => { for (const f of files) if (urls.length < max) await upload(f); };
    fileInput.addEventListener("change", async () => { await addFiles([...fileInput.files]); fileInput.value = ""; });
    const addUrl = () => { const v = urlInput.value.trim(); if (v) { add(v); urlInput.value = ""; } };
    urlInput.addEventListener("keydown", (ev) => { if (ev.key === "Enter") { ev.preventDefault(); addUrl(); } });
    const drop = el("div", { class: "dropzone", id: `f-${name}-drop` },
      el("span", { text: "drop images here, or " }), fileInput,
      el("div", { class: "row" }, urlInput, el("button", { type: "button", class: "small", id: `f-${name}-add`, text: "add URL", onclick: addUrl })), note);
    drop.addEventListener("dragover", (ev) => { ev.preventDefault(); drop.classList.add("over"); });
    drop.addEventListener("dragleave", () => drop.classList.remove("over"));
    drop.addEventListener("drop", (ev) => { ev.preventDefault(); drop.classList.remove("over"); addFiles([...ev.dataTransfer.files]); });
    render();
    return {
      el: fieldShell(name, prop, el("div", {}, list, drop)), input: urlInput,
      get: () => urls.slice(), set: (v) => { urls = Array.isArray(v) ? v.slice(0, max) : []; render(); },
      reset: () => { urls = []; render(); }, isDefault: () => urls.length === 0,
    };
  }

  // LoRA adapters (loras): rows of {path, scale}, at most maxItems.
  function buildLoras(name, prop) {
    const max = prop.maxItems || 3;
    const rows = el("div", { class: "lora-rows", id: `f-${name}` });
    const addBtn = el("button", { type: "button", class: "small", id: `f-${name}-add`, text: "add LoRA" });
    const addRow = (path = "", scale = 1) => {
      if (rows.children.length >= max) return;
      const row = el("div", { class: "row lora-row" },
        el("input", { type: "text", class: "lora-path", placeholder: "https://…/x.safetensors, org/repo, or a file in the LoRA folder", value: path, spellcheck: "false" }),
        el("input", { type: "number", class: "lora-scale", step: 0.05, min: -4, max: 4, value: scale, title: "scale" }),
        el("button", { type: "button", class: "ghost small", title: "remove", text: "✕", onclick: () => { row.remove(); sync(); } }));
      rows.append(row); sync();
    };
    const sync = () => { addBtn.disabled = rows.children.length >= max; };
    addBtn.addEventListener("click", () => addRow());
    const get = () => [...rows.children].map((r) => ({ path: r.querySelector(".lora-path").value.trim(), scale: Number(r.querySelector(".lora-scale").value || 1) })).filter((l) => l.path);
    const set = (v) => { rows.textContent = ""; for (const l of (Array.isArray(v) ? v : [])) addRow(l.path || "", l.scale ?? 1); sync(); };
    sync();
    return {
      el: fieldShell(name, prop, el("div", {}, rows, addBtn)), input: addBtn,
      get, set, reset: () => set([]), isDefault: () => get().length === 0,
    };
  }

  function buildField(name, raw) {
    const prop = normalizeProp(raw);
    state.props[name] = prop;
    if (name === "seed") return buildSeed(name, prop);
    if (prop.ui === "images") return buildImages(name, prop);
    if (prop.ui === "loras") return buildLoras(name, prop);
    if (prop.anyOf) {
      if (prop.anyOf.some((m) => m.enum) && prop.anyOf.some((m) => m.type === "object" || m.properties)) return buildImageSize(name, prop);
      return buildText(name, prop);
    }
    if (prop.enum) return buildEnum(name, prop);
    if (prop.type === "boolean") return buildBool(name, prop);
    if (prop.type === "integer" || prop.type === "number") return buildNumber(name, prop);
    if (prop.type === "string" && (prop.ui === "textarea")) return buildTextarea(name, prop);
    return buildText(name, prop);
  }

  function buildForm() {
    const props = state.schema.properties || {};
    const names = Object.keys(props).filter((n) => !HIDDEN.has(n));
    const main = names.filter((n) => !isCns(n)).sort((a, b) => {
      const ia = MAIN_ORDER.indexOf(a), ib = MAIN_ORDER.indexOf(b);
      return (ia < 0 ? 999 : ia) - (ib < 0 ? 999 : ib);
    });
    const cns = names.filter(isCns).sort((a, b) => (a === "enable_cns" ? -1 : b === "enable_cns" ? 1 : 0));
    const mainBox = $("#fields-main"); mainBox.textContent = "";
    const cnsBox = $("#fields-cns"); cnsBox.textContent = "";
    for (const n of main) { const f = buildField(n, props[n]); state.fields[n] = f; mainBox.append(f.el); }
    for (const n of cns) { const f = buildField(n, props[n]); state.fields[n] = f; cnsBox.append(f.el); }
    if (!cns.length) $("#advanced").hidden = true;
    // Required marker
    for (const r of state.schema.required || []) {
      const lab = state.fields[r] && state.fields[r].el.querySelector(".field-head label");
      if (lab) lab.append(el("span", { class: "muted", text: " *", title: "required" }));
    }
    const en = state.fields.enable_cns;
    if (en) {
      const sync = () => $("#advanced").classList.toggle("cns-off", !en.get());
      en.input.addEventListener("change", sync); sync();
    }
    // Clear a field's error as soon as it is edited.
    for (const [n, f] of Object.entries(state.fields)) {
      f.el.addEventListener("input", () => clearFieldError(f));
      f.el.addEventListener("change", () => clearFieldError(f));
    }
  }

  // The submitted input: the prompt plus every field that differs from its default (exactly what
  // the snippets show). Values are sent as typed so the server validates them (errors per field).
  function collectInput() {
    const input = {};
    for (const [name, f] of Object.entries(state.fields)) {
      if (name !== "prompt" && f.isDefault()) continue;
      const v = f.get();
      if (v === null || v === undefined) continue;
      input[name] = v;
    }
    return input;
  }

  // JSON with exact big seeds ({__bigint: "123..."} -> 123...)
  function toJson(obj, indent) {
    const s = JSON.stringify(obj, null, indent);
    return s.replace(/\{\s*"__bigint":\s*"(\d+)"\s*\}/g, "$1");
  }
  function toPythonLiteral(obj, indent = 4, level = 1) {
    const pad = " ".repeat(indent * level), padEnd = " ".repeat(indent * (level - 1));
    if (obj === null) return "None";
    if (obj === true) return "True";
    if (obj === false) return "False";
    if (typeof obj === "number") return String(obj);
    if (typeof obj === "string") return JSON.stringify(obj);
    if (obj.__bigint) return obj.__bigint;
    if (Array.isArray(obj)) return `[${obj.map((x) => toPythonLiteral(x, indent, level + 1)).join(", ")}]`;
    const entries = Object.entries(obj);
    if (!entries.length) return "{}";
    return `{\n${entries.map(([k, v]) => `${pad}${JSON.stringify(k)}: ${toPythonLiteral(v, indent, level + 1)},`).join("\n")}\n${padEnd}}`;
  }

  // ------------------------------------------------------------------------------ snippets
  function snippet(lang, input) {
    const origin = window.location.origin;
    const id = state.meta.endpoint_id;
    const queue = `${origin}${state.meta.queue_path || "/queue"}`;
    const run = `${origin}${state.meta.run_path || ""}`;
    const https = window.location.protocol === "https:";
    const host = window.location.host;
    const body = toJson(input, 2);
    if (lang === "curl") {
      return [
        `# Synchronous run: waits and prints the output JSON (images[].url, seed, timings).`,
        `curl -sS -w '\\n' -X POST "${run}/${id}" \\`,
        `  -H "Authorization: Key $FAL_KEY" \\`,
        `  -H "Content-Type: application/json" \\`,
        `  -d '${body.replace(/'/g, "'\\''")}'`,
        ``,
        `# Or through the queue: submit, wait until COMPLETED, then fetch the output.`,
        `handle=$(curl -sS -X POST "${queue}/${id}" \\`,
        `  -H "Authorization: Key $FAL_KEY" \\`,
        `  -H "Content-Type: application/json" \\`,
        `  -d '${body.replace(/'/g, "'\\''")}')`,
        `field() { printf '%s' "$handle" | python3 -c "import json, sys; print(json.load(sys.stdin)['$1'])"; }`,
        `until curl -sS "$(field status_url)" -H "Authorization: Key $FAL_KEY" | grep -q '"COMPLETED"'; do sleep 1; done`,
        `curl -sS -w '\\n' "$(field response_url)" -H "Authorization: Key $FAL_KEY"`,
      ].join("\n");
    }
    if (lang === "python") {
      if (https) {
        return [
          `# pip install fal-client   (the official client, pointed at this server)`,
          `import os`,
          `os.environ.setdefault("FAL_RUN_HOST", "${host}${state.meta.run_path || ""}")`,
          `os.environ.setdefault("FAL_QUEUE_RUN_HOST", "${host}${state.meta.queue_path || "/queue"}")`,
          `import fal_client  # reads FAL_KEY and the hosts above at import`,
          ``,
          `result = fal_client.subscribe(`,
          `    "${id}",`,
          `    arguments=${toPythonLiteral(input, 4, 2)},`,
          `    with_logs=True,`,
          `)`,
          `for image in result["images"]:`,
          `    print(image["url"], image["width"], image["height"])`,
          `print("seed:", result["seed"])`,
        ].join("\n");
      }
      return [
        `# This server speaks plain http, which fal-client (https only) cannot use: httpx does the same`,
        `# queue calls. Behind TLS, fal_client.subscribe("${id}", arguments=...) works as is.`,
        `import os, time, httpx`,
        ``,
        `headers = {"Authorization": f"Key {os.environ['FAL_KEY']}"}`,
        `arguments = ${toPythonLiteral(input, 4, 1)}`,
        `handle = httpx.post("${queue}/${id}", json=arguments, headers=headers).raise_for_status().json()`,
        `while httpx.get(handle["status_url"], headers=headers).json()["status"] != "COMPLETED":`,
        `    time.sleep(0.5)`,
        `result = httpx.get(handle["response_url"], headers=headers).raise_for_status().json()`,
        `for image in result["images"]:`,
        `    print(image["url"], image["width"], image["height"])`,
        `print("seed:", result["seed"])`,
      ].join("\n");
    }
    // JavaScript: the official @fal-ai/client, its URLs rewritten to this server.
    return [
      `// npm install @fal-ai/client   (the official client, pointed at this server)`,
      `import { fal } from "@fal-ai/client";`,
      ``,
      `const SERVER = "${origin}";`,
      `fal.config({`,
      `  credentials: process.env.FAL_KEY,`,
      `  requestMiddleware: async (req) => ({`,
      `    ...req,`,
      `    url: req.url`,
      `      .replace("https://queue.fal.run", SERVER + "${state.meta.queue_path || "/queue"}")`,
      `      .replace("https://fal.run", ${state.meta.run_path ? `SERVER + "${state.meta.run_path}"` : "SERVER"}),`,
      `  }),`,
      `});`,
      ``,
      `const result = await fal.subscribe("${id}", {`,
      `  input: ${toJson(input, 2).replace(/\n/g, "\n  ")},`,
      `  logs: true,`,
      `  onQueueUpdate: (u) => console.log(u.status, u.queue_position ?? ""),`,
      `});`,
      `console.log(result.data.images.map((i) => i.url), result.data.seed);`,
    ].join("\n");
  }

  // The API tab: snippets for the form's current input, from the start (no run needed).
  function renderSnippet() {
    if (!state.meta) return;
    $("#snippet").textContent = snippet(state.snippetLang, collectInput());
    for (const t of document.querySelectorAll(".tab")) t.classList.toggle("active", t.dataset.lang === state.snippetLang);
  }

  function showView(name) {
    for (const t of document.querySelectorAll(".view-tab")) {
      const on = t.dataset.view === name;
      t.classList.toggle("active", on);
      t.setAttribute("aria-selected", on ? "true" : "false");
    }
    $("#view-api").hidden = name !== "api";
    $("#view-logs").hidden = name !== "logs";
  }

  // The Logs tab: the request's log lines as the fal clients get them (status with logs=1).
  function setLogs(lines, note) {
    const text = (lines || []).map((l) => {
      const t = l.timestamp ? String(l.timestamp).replace(/^.*T/, "").replace(/(\.\d{3})\d*/, "$1").replace(/Z|\+00:00$/, "") : "";
      return `${t ? t + "  " : ""}${(l.level || "INFO").padEnd(5)}  ${l.message || ""}`;
    });
    if (note) text.push(note);
    $("#logs").textContent = text.join("\n") || "No log lines yet.";
    $("#logs-count").textContent = lines && lines.length ? `(${lines.length})` : "";
    const box = $("#logs"); box.scrollTop = box.scrollHeight;
  }

  async function fetchLogs(cur) {
    try {
      const url = cur.handle.status_url;
      const resp = await fetch(`${url}${url.includes("?") ? "&" : "?"}logs=1`, { headers: authHeaders(), cache: "no-store" });
      if (!resp.ok && resp.status !== 202) return;
      const body = await resp.json();
      if (Array.isArray(body.logs)) setLogs(body.logs);
    } catch (_) { /* the logs are a convenience */ }
  }

  async function copyText(text, button) {
    try {
      await navigator.clipboard.writeText(text);
    } catch (_) {
      const ta = el("textarea", { style: "position:fixed;opacity:0" }); ta.value = text; document.body.append(ta);
      ta.select(); try { document.execCommand("copy"); } catch (_) { /* ignore */ } ta.remove();
    }
    const old = button.textContent; button.textContent = "copied ✓";
    setTimeout(() => { button.textContent = old; }, 1200);
  }

  // ------------------------------------------------------------------------------ run status UI
  function setStatus(kind, text, pillText) {
    const pill = $("#status-pill");
    pill.className = `pill ${kind}`;
    pill.textContent = pillText || kind;
    $("#status-text").textContent = text;
    $("#run-status").className = `run-status ${kind}`;
  }
  function setProgress(step, total, { indeterminate = false, label = "" } = {}) {
    const bar = $("#progress");
    bar.hidden = false;
    bar.classList.toggle("indeterminate", indeterminate);
    const pct = total ? Math.max(0, Math.min(100, (100 * step) / total)) : 0;
    $("#progress-bar").style.width = `${pct}%`;
    bar.setAttribute("aria-valuenow", String(Math.round(pct)));
    $("#progress-label").textContent = label || (total ? `step ${step} / ${total}` : "");
  }
  function hideProgress() { $("#progress").hidden = true; }

  function setPreview(src, caption) {
    if (!src) return;
    $("#preview").src = src;
    $("#preview-caption").textContent = caption || "live preview";
    $("#preview-wrap").hidden = false;
    $("#empty-state").hidden = true;
  }

  function setBusy(busy) {
    $("#generate").disabled = busy;
    $("#generate").textContent = busy ? "Generating…" : "Generate";
    $("#cancel").hidden = !busy;
    $("#cancel").disabled = false;
  }

  // Status events: fal's status objects, plus (from kleinserve) step progress and previews. Several
  // spellings are accepted so the page keeps working if the server adds fields.
  function progressOf(ev) {
    const p = ev.progress || ev;
    let step = p.step ?? p.current_step, total = p.total ?? p.total_steps ?? p.num_steps;
    if ((step == null || total == null) && Array.isArray(ev.logs)) {
      for (let i = ev.logs.length - 1; i >= 0; i--) {
        const m = /step\s+(\d+)\s*\/\s*(\d+)/i.exec(ev.logs[i].message || "");
        if (m) { step = Number(m[1]); total = Number(m[2]); break; }
      }
    }
    return step != null && total ? { step: Number(step), total: Number(total) } : null;
  }
  function previewOf(ev) {
    const p = ev.preview || (ev.progress && ev.progress.preview);
    if (!p) return null;
    if (typeof p === "string") return p;
    return p.url || p.data_uri || (p.data ? `data:${p.content_type || "image/jpeg"};base64,${p.data}` : null);
  }

  function onStatusEvent(ev) {
    const cur = state.current;
    if (!cur || (ev.request_id && ev.request_id !== cur.id)) return;
    if (Array.isArray(ev.logs)) setLogs(ev.logs);
    if (ev.status === "IN_QUEUE") {
      const pos = ev.queue_position ?? 0;
      setStatus("queued", pos === 0 ? "In queue: next to run." : `In queue: position ${pos + 1} (${pos} ahead).`, "in queue");
      setProgress(0, 0, { indeterminate: true, label: pos === 0 ? "waiting for the worker" : `queue position ${pos + 1}` });
    } else if (ev.status === "IN_PROGRESS") {
      if (!cur.runningSince) cur.runningSince = performance.now();
      const pr = progressOf(ev);
      if (pr) {
        cur.progress = pr;
        setProgress(pr.step, pr.total);
        setStatus("running", `Denoising: step ${pr.step} of ${pr.total}.`, "running");
      } else if (!cur.progress) {
        setProgress(0, 0, { indeterminate: true, label: "starting" });
        setStatus("running", "Running: encoding the prompt…", "running");
      }
      const pv = previewOf(ev);
      if (pv) setPreview(pv, cur.progress ? `live preview · step ${cur.progress.step}/${cur.progress.total}` : "live preview");
    } else if (ev.status === "COMPLETED") {
      cur.completedEvent = ev;
    }
  }

  // SSE over fetch (the Authorization header cannot be sent with EventSource).
  async function readSse(url, onEvent, signal) {
    const resp = await fetch(url, { headers: authHeaders({ Accept: "text/event-stream" }), signal, cache: "no-store" });
    if (!resp.ok || !resp.body) {
      const e = await errorFromResponse(resp);
      throw Object.assign(new Error(describeError(e.status, e.body)), { status: e.status, body: e.body });
    }
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    let last = null;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
      let idx;
      while ((idx = buf.indexOf("\n\n")) >= 0) {
        const block = buf.slice(0, idx); buf = buf.slice(idx + 2);
        const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).replace(/^ /, "")).join("\n");
        if (!data) continue;
        try { last = JSON.parse(data); } catch (_) { continue; }
        onEvent(last);
        if (last.status === "COMPLETED") { try { reader.cancel(); } catch (_) { /* ignore */ } return last; }
      }
    }
    return last;
  }

  async function pollStatus(url, onEvent, signal) {
    for (;;) {
      const resp = await fetch(`${url}${url.includes("?") ? "&" : "?"}logs=1`, { headers: authHeaders(), signal, cache: "no-store" });
      let body = null; try { body = await resp.json(); } catch (_) { /* ignore */ }
      if (!resp.ok && resp.status !== 202) throw Object.assign(new Error(describeError(resp.status, body)), { status: resp.status, body });
      onEvent(body);
      if (body.status === "COMPLETED") return body;
      await new Promise((r) => setTimeout(r, 400));
    }
  }

  async function submit(ev) {
    if (ev) ev.preventDefault();
    if (state.current) return;
    clearTopError(); clearFieldErrors();
    $("#key-form").classList.remove("needs-key");
    if (state.meta.auth_required && !getKey()) {
      $("#key-form").classList.add("needs-key");
      showTopError("An API key is needed.", "Paste your key in the box at the top right (it stays in this browser tab).");
      $("#api-key").focus();
      return;
    }
    const input = collectInput();
    const body = toJson(input);
    setBusy(true);
    $("#result").hidden = true; $("#preview-wrap").hidden = true; $("#empty-state").hidden = true;
    setStatus("queued", "Submitting…", "submitting");
    setProgress(0, 0, { indeterminate: true, label: "submitting" });
    const controller = new AbortController();
    const t0 = performance.now();
    let resp;
    try {
      resp = await fetch(`${state.meta.queue_path || "/queue"}/${state.meta.endpoint_id}`, {
        method: "POST", headers: authHeaders({ "Content-Type": "application/json" }), body, signal: controller.signal,
      });
    } catch (err) {
      finish(); setStatus("failed", "Could not reach the server.", "error"); hideProgress();
      showTopError("Network error.", String(err)); return;
    }
    if (!resp.ok) {
      const e = await errorFromResponse(resp);
      finish(); hideProgress();
      setStatus("failed", e.status === 422 ? "The input is invalid: see the highlighted fields." : `Submit failed (HTTP ${e.status}).`, e.status === 422 ? "invalid" : "error");
      handleHttpError(e.status, e.body, "Submit", input);
      if (!$("#result").hidden) { /* keep */ } else $("#empty-state").hidden = false;
      return;
    }
    const handle = await resp.json();
    state.current = { id: handle.request_id, handle, input, abort: controller, t0 };
    setLogs([], `request ${handle.request_id} submitted; its log lines follow when it runs.`);
    state.lastSubmitted = { input, requestId: handle.request_id };
    $("#request-id").textContent = handle.request_id;
    onStatusEvent({ status: handle.status || "IN_QUEUE", queue_position: handle.queue_position ?? 0, request_id: handle.request_id });
    refreshHistory();
    await watch(state.current);
  }

  async function watch(cur) {
    const statusUrl = cur.handle.status_url;
    let final = null;
    try {
      try {
        final = await readSse(`/api/requests/${encodeURIComponent(cur.id)}/progress`, onStatusEvent, cur.abort.signal);
      } catch (err) {
        if (err.name === "AbortError") throw err;
        if (err.status === 401 || err.status === 403) throw err;
        final = null; // fall back to polling below
      }
      if (!final || final.status !== "COMPLETED") final = await pollStatus(statusUrl, onStatusEvent, cur.abort.signal);
      await fetchLogs(cur);
      await showOutcome(cur, final);
    } catch (err) {
      if (err.name === "AbortError") return;
      setStatus("failed", "Lost track of the request.", "error");
      if (err.status) handleHttpError(err.status, err.body, "Status"); else showTopError("Status failed.", String(err));
    } finally {
      if (state.current === cur) finish();
      refreshHistory();
    }
  }

  function finish() {
    state.current = null;
    setBusy(false);
  }

  async function showOutcome(cur, statusEv) {
    const resp = await fetch(cur.handle.response_url, { headers: authHeaders(), cache: "no-store" });
    const body = await readResult(resp);
    const wall = (performance.now() - cur.t0) / 1000;
    if (!resp.ok || (statusEv && statusEv.error)) {
      hideProgress();
      const errType = (statusEv && statusEv.error_type) || (body && body.error_type) || "";
      const msg = (statusEv && statusEv.error) || describeError(resp.status, body);
      if (errType === "cancelled") {
        setStatus("cancelled", "Cancelled.", "cancelled");
        $("#preview-caption").textContent = "cancelled";
      } else {
        setStatus("failed", `Failed${errType ? ` (${errType})` : ""}: ${msg}`, "failed");
        if (resp.status === 422 && body && body.detail) showValidationErrors(body.detail, cur.input);
        else showTopError(`Generation failed${errType ? ` (${errType})` : ""}.`, msg);
      }
      if ($("#preview-wrap").hidden) $("#empty-state").hidden = false;
      return;
    }
    showResult(body, { wall, metrics: statusEv && statusEv.metrics, requestId: cur.id, input: cur.input });
  }

  function showResult(result, { wall, metrics, requestId, input } = {}) {
    hideProgress();
    $("#preview-wrap").hidden = true;
    $("#empty-state").hidden = true;
    state.lastSeed = result.seed;
    try { sessionStorage.setItem(LAST_SEED_STORAGE, String(result.seed)); } catch (_) { /* ignore */ }
    if (state.fields.seed && state.fields.seed.syncReuse) state.fields.seed.syncReuse();
    const n = (result.images || []).length;
    setStatus("done", `Done: ${n} image${n === 1 ? "" : "s"}${wall ? ` in ${fmtSeconds(wall)}` : ""}.`, "completed");

    const t = result.timings || {};
    const chips = [];
    const chip = (label, value, cls = "") => chips.push(el("span", { class: `chip ${cls}` }, `${label} `, el("b", { text: value })));
    chip("seed", String(result.seed));
    if (n) chip("size", `${result.images[0].width}×${result.images[0].height}`);
    for (const k of ["encode", "denoise", "decode", "safety", "total"]) if (t[k] != null) chip(k, fmtSeconds(t[k]));
    if (metrics && metrics.queue_time != null) chip("queue", fmtSeconds(metrics.queue_time));
    if (wall) chip("wall", fmtSeconds(wall));
    const flagged = (result.has_nsfw_concepts || []).filter(Boolean).length;
    if (flagged) chip("NSFW", `${flagged} flagged`, "warn");
    $("#result-meta").replaceChildren(...chips);

    const gallery = $("#gallery");
    gallery.classList.toggle("single", n === 1);
    gallery.replaceChildren(...(result.images || []).map((img, i) => {
      const seed = typeof result.seed === "number" ? result.seed + i
        : (/^\d+$/.test(String(result.seed)) ? String(BigInt(result.seed) + BigInt(i)) : result.seed);
      const nsfw = (result.has_nsfw_concepts || [])[i];
      return el("figure", { class: "card", style: "margin:0" },
        el("a", { class: "img-link", href: img.url, target: "_blank", rel: "noopener" },
          el("img", { src: img.url, alt: `generated image ${i + 1}`, width: img.width, height: img.height, loading: "lazy" })),
        el("figcaption", { class: "card-body" },
          el("span", { text: `${img.width}×${img.height}` }), el("span", { class: "sep", text: "·" }),
          el("span", { text: `seed ${seed}` }), el("span", { class: "sep", text: "·" }),
          el("span", { class: "muted", text: `${(img.content_type || "").replace("image/", "")} ${fmtBytes(img.file_size)}` }),
          nsfw ? el("span", { class: "nsfw", text: "NSFW (blacked out)" }) : null,
          el("a", { class: "dl", href: img.url, download: img.file_name || `image-${i + 1}`, text: "download ↓" })));
    }));
    if (input) state.lastSubmitted = { input, requestId, result };
    $("#result").hidden = false;
  }

  async function cancelCurrent() {
    const cur = state.current;
    if (!cur) return;
    $("#cancel").disabled = true;
    setStatus("running", "Cancelling…", "cancelling");
    await cancelRequest(cur.handle.cancel_url);
  }

  async function cancelRequest(cancelUrl) {
    try {
      const resp = await fetch(cancelUrl, { method: "PUT", headers: authHeaders() });
      if (!resp.ok && resp.status !== 202) {
        const e = await errorFromResponse(resp);
        if (resp.status !== 400) handleHttpError(e.status, e.body, "Cancel");
        else showTopError("Nothing to cancel.", describeError(e.status, e.body));
      }
    } catch (err) {
      showTopError("Cancel failed.", String(err));
    }
    refreshHistory();
  }

  // ------------------------------------------------------------------------------ history
  function statusKind(r) {
    if (r.status === "IN_QUEUE") return ["queued", "in queue"];
    if (r.status === "IN_PROGRESS") return ["running", r.cancel_requested ? "cancelling" : "running"];
    if (r.error_type === "cancelled") return ["cancelled", "cancelled"];
    if (r.error || r.error_type) return ["failed", r.error_type || "failed"];
    return ["done", "completed"];
  }

  async function refreshHistory() {
    const box = $("#history");
    if (state.meta && state.meta.auth_required && !getKey()) {
      box.replaceChildren(el("p", { class: "muted", text: "Paste your API key to see your requests." }));
      return;
    }
    let resp;
    try {
      resp = await fetch(`/api/requests?limit=20`, { headers: authHeaders(), cache: "no-store" });
    } catch (_) { return; }
    if (!resp.ok) {
      const e = await errorFromResponse(resp);
      box.replaceChildren(el("p", { class: "muted", text: e.status === 401 || e.status === 403 ? "The server did not accept this key: no history." : `History unavailable (${describeError(e.status, e.body)}).` }));
      return;
    }
    const data = await resp.json();
    const rows = data.requests || data.items || [];
    if (!rows.length) { box.replaceChildren(el("p", { class: "muted", text: "No requests yet with this key." })); return; }
    const table = el("table", {},
      el("thead", {}, el("tr", {}, ["", "status", "prompt", "size", "seed", "submitted", "time", ""].map((h) => el("th", { text: h })))),
      el("tbody", {}, rows.map((r) => {
        const [kind, label] = statusKind(r);
        const thumb = r.thumbnail_url || (r.images && r.images[0] && r.images[0].url);
        const active = r.status !== "COMPLETED";
        const actions = el("td", { class: "actions-cell" });
        if (active) actions.append(el("button", { type: "button", class: "danger small", text: "cancel", "data-cancel": r.request_id, onclick: () => cancelRequest(r.cancel_url || `${state.meta.queue_path || "/queue"}/${state.meta.endpoint_id.split("/").slice(0, 2).join("/")}/requests/${r.request_id}/cancel`) }));
        else if (!r.error_type && !r.error) actions.append(el("button", { type: "button", class: "ghost small", text: "show", onclick: () => showHistoryResult(r) }));
        if (r.input) actions.append(el("button", { type: "button", class: "ghost small", text: "reuse", title: "Load this input into the form", onclick: () => loadInput(r.input) }));
        return el("tr", { class: state.current && state.current.id === r.request_id ? "current" : "", "data-request-id": r.request_id },
          el("td", {}, thumb ? el("img", { class: "thumb", src: thumb, alt: "" }) : el("div", { class: "thumb-empty" })),
          el("td", {}, el("span", { class: `pill ${kind}`, text: label })),
          el("td", { class: "prompt-cell", title: r.prompt || "" }, r.prompt || (r.input && r.input.prompt) || "", r.error && r.error_type !== "cancelled" ? el("div", { class: "err", text: r.error }) : null),
          el("td", { class: "mono small", text: r.width ? `${r.width}×${r.height}` : "" }),
          el("td", { class: "mono small", text: r.seed ?? (r.input && r.input.seed) ?? "" }),
          el("td", { class: "small muted", text: fmtTime(r.created_at) }),
          el("td", { class: "small mono", text: r.inference_time != null ? fmtSeconds(r.inference_time) : "" }),
          actions);
      })));
    box.replaceChildren(table);
    const pending = rows.some((r) => r.status !== "COMPLETED");
    clearTimeout(state.historyTimer);
    if (pending) state.historyTimer = setTimeout(refreshHistory, 2000);
  }

  async function showHistoryResult(r) {
    const url = r.response_url || `${state.meta.queue_path || "/queue"}/${state.meta.endpoint_id.split("/").slice(0, 2).join("/")}/requests/${r.request_id}`;
    const resp = await fetch(url, { headers: authHeaders(), cache: "no-store" });
    const body = await readResult(resp);
    if (!resp.ok) { handleHttpError(resp.status, body, "Loading the result"); return; }
    clearTopError();
    $("#request-id").textContent = r.request_id;
    showResult(body, { requestId: r.request_id, input: r.input || { prompt: body.prompt }, metrics: r.metrics });
    setStatus("done", `Result of an earlier request (${fmtTime(r.created_at)}).`, "completed");
    window.scrollTo({ top: 0, behavior: "smooth" });
  }

  function loadInput(input) {
    for (const [name, f] of Object.entries(state.fields)) {
      if (name in input) f.set(input[name]); else f.reset();
    }
    renderSnippet();
    if (Object.keys(input).some(isCns)) $("#advanced").open = true;
    window.scrollTo({ top: 0, behavior: "smooth" });
  }

  // ------------------------------------------------------------------------------ endpoints
  function setMeta(meta) {
    state.meta = meta;
    state.schema = meta.input_schema;
    $("#endpoint-id").textContent = meta.endpoint_id;
    document.title = `kleinserve playground · ${meta.endpoint_id}`;
  }

  // Another endpoint: its form (the values of the fields both have are kept) and its snippets.
  async function switchEndpoint(id) {
    const keep = {};
    for (const [n, f] of Object.entries(state.fields)) if (!f.isDefault() || n === "prompt") keep[n] = f.get();
    let resp;
    try { resp = await fetch(`/api/schema?endpoint=${encodeURIComponent(id)}`, { cache: "no-store" }); } catch (err) {
      showTopError("Cannot reach the server.", String(err)); return;
    }
    if (!resp.ok) { showTopError(`Cannot load ${id}.`, `HTTP ${resp.status}`); return; }
    setMeta(await resp.json());
    state.fields = {}; state.props = {};
    buildForm();
    for (const [n, v] of Object.entries(keep)) if (state.fields[n]) state.fields[n].set(v);
    clearFieldErrors(); clearTopError();
    renderSnippet();
  }

  // ------------------------------------------------------------------------------ startup
  async function init() {
    const keyInput = $("#api-key");
    try { keyInput.value = sessionStorage.getItem(KEY_STORAGE) || ""; } catch (_) { /* storage disabled */ }
    try { const s = sessionStorage.getItem(LAST_SEED_STORAGE); if (s) state.lastSeed = /^\d+$/.test(s) && s.length <= 15 ? Number(s) : s; } catch (_) { /* ignore */ }
    let keyTimer = null;
    keyInput.addEventListener("input", () => {
      try { sessionStorage.setItem(KEY_STORAGE, keyInput.value.trim()); } catch (_) { /* ignore */ }
      $("#key-form").classList.remove("needs-key");
      clearTimeout(keyTimer); keyTimer = setTimeout(refreshHistory, 400);
    });
    $("#key-toggle").addEventListener("click", () => {
      const show = keyInput.type === "password";
      keyInput.type = show ? "text" : "password";
      $("#key-toggle").textContent = show ? "hide" : "show";
    });
    $(".alert-close").addEventListener("click", clearTopError);
    $("#key-form").addEventListener("submit", (ev) => { ev.preventDefault(); refreshHistory(); });
    $("#foot-origin").textContent = window.location.origin;

    let resp;
    try { resp = await fetch("/api/schema", { cache: "no-store" }); } catch (err) {
      showTopError("Cannot reach the server.", String(err)); return;
    }
    if (!resp.ok) { showTopError("Cannot load the input schema.", `HTTP ${resp.status}`); return; }
    setMeta(await resp.json());
    const picker = $("#endpoint-picker");
    const option = (e) => el("option", { value: e.endpoint_id, text: e.title, title: e.endpoint_id });
    const families = state.meta.families || {};
    const unserved = Object.values(state.meta.unserved || {});
    if (Object.keys(families).length > 1) {
      // Several klein families served: one group each, saying whether its model is loaded.
      const STATES = { resident: "loaded", loading: "loading…", not_loaded: "loads on first use", failed: "failed to load" };
      for (const [name, f] of Object.entries(families)) {
        const label = `${f.title || name}${f.state ? ` · ${STATES[f.state] || f.state}` : ""}`;
        const group = el("optgroup", { label });
        for (const e of (state.meta.endpoints || []).filter((x) => x.family === name)) group.append(option(e));
        picker.append(group);
      }
      const served = $("#served-families");
      served.textContent = "Served: " + Object.entries(families).map(([name, f]) =>
        `${f.title || name} (${STATES[f.state] || f.state || `${f.workers} worker(s)`})`).join(", ");
      served.title = unserved.join("\n");
      served.hidden = false;
    } else {
      for (const e of state.meta.endpoints || []) picker.append(option(e));
    }
    if (unserved.length) picker.title = "Not served here:\n" + unserved.join("\n");
    picker.value = state.meta.endpoint_id;
    picker.hidden = (state.meta.endpoints || []).length < 2;
    picker.addEventListener("change", () => switchEndpoint(picker.value));
    const model = state.meta.model;
    if (model) {
      const badge = $("#model-badge");
      badge.hidden = false;
      if (model.is_tiny) {
        badge.classList.add("warn");
        badge.textContent = "tiny random model: noise-like images (development)";
        badge.title = "No real weights were loaded: this is the tiny test model.";
      } else {
        badge.textContent = `${model.source || model.spec || "model"} · ${model.device || ""}${model.dtype ? ` · ${model.dtype}` : ""}`;
      }
    }
    if (!state.meta.auth_required) {
      $("#key-help").textContent = "this server needs no key";
      keyInput.placeholder = "not needed here";
    }
    buildForm();
    let snippetTimer = null;
    const followForm = () => { clearTimeout(snippetTimer); snippetTimer = setTimeout(renderSnippet, 120); };
    $("#gen-form").addEventListener("input", followForm);
    $("#gen-form").addEventListener("change", followForm);
    $("#gen-form").addEventListener("click", followForm);  // preset cards, seed buttons, reset
    for (const t of document.querySelectorAll(".view-tab")) t.addEventListener("click", () => showView(t.dataset.view));
    setLogs([], "Logs of your next request appear here.");
    renderSnippet();

    $("#gen-form").addEventListener("submit", submit);
    $("#gen-form").addEventListener("keydown", (ev) => {
      if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) { ev.preventDefault(); submit(); }
    });
    $("#cancel").addEventListener("click", cancelCurrent);
    $("#reset-form").addEventListener("click", () => { for (const f of Object.values(state.fields)) f.reset(); clearFieldErrors(); clearTopError(); });
    $("#cns-reset").addEventListener("click", () => { for (const [n, f] of Object.entries(state.fields)) if (isCns(n) && n !== "enable_cns") f.reset(); });
    $("#history-refresh").addEventListener("click", refreshHistory);
    for (const t of document.querySelectorAll(".tab")) t.addEventListener("click", () => { state.snippetLang = t.dataset.lang; renderSnippet(); });
    $("#copy-snippet").addEventListener("click", (ev) => copyText($("#snippet").textContent, ev.currentTarget));
    refreshHistory();
    document.body.dataset.ready = "1";
  }

  document.addEventListener("DOMContentLoaded", init);
})();
