// The clip_med page: plain JavaScript, no build step, no external assets.
// Every text that comes from the archive or the model is inserted with textContent (never as markup).
// Images are fetched and shown through blob: URLs, so a missing or changed shard shows the
// service's message instead of a broken image. Requests go to the same origin; when the service
// has a token, the browser holds its session cookie (see clip_med/inference/auth.py).
"use strict";

const PAGE_SIZE = 24;
const CAPTION_CHARS = 110;
const FILTERS = ["modality", "anatomy", "split", "source"];

const state = {query: null, offset: 0, total: 0, blobs: [], preview: null, health: null, busy: 0};
const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (name === "text") node.textContent = value;
    else if (name === "className") node.className = value;
    else node.setAttribute(name, value);
  }
  for (const child of children) {
    if (child !== null && child !== undefined) node.append(child);  // strings become text nodes
  }
  return node;
}

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(path, options = {}) {
  const headers = Object.assign({"X-Clip-Med": "page", "Accept": "application/json"}, options.headers || {});
  let response;
  try {
    response = await fetch(path, Object.assign({}, options, {headers, credentials: "same-origin"}));
  } catch (error) {
    throw new ApiError(0, "the service cannot be reached (" + error.message + ")");
  }
  if (!response.ok) throw new ApiError(response.status, await problem(response));
  return options.blob ? response.blob() : response.json();
}

async function problem(response) {
  let detail = "";
  try {
    const body = await response.json();
    detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
  } catch (error) {
    detail = response.statusText || "no message";
  }
  if (response.status === 401) detail += " (reload the page to enter the access token)";
  return detail + " [HTTP " + response.status + "]";
}

function setStatus(message, kind) {
  const box = $("status");
  box.textContent = message;
  box.className = "status" + (kind ? " " + kind : "");
  box.setAttribute("role", kind === "error" ? "alert" : "status");
}

function busy(on) {
  state.busy += on ? 1 : -1;
  $("results").setAttribute("aria-busy", state.busy > 0 ? "true" : "false");
  document.body.classList.toggle("loading", state.busy > 0);
}

function filters() {
  const chosen = {};
  for (const name of FILTERS) {
    const value = $("filter-" + name).value;
    if (value) chosen[name] = value;
  }
  return chosen;
}

function shorten(text, limit) {
  text = String(text || "").replace(/\s+/g, " ").trim();
  return text.length > limit ? text.slice(0, limit - 1) + "…" : text;
}

function forgetBlobs() {
  for (const url of state.blobs) URL.revokeObjectURL(url);
  state.blobs = [];
}

// Fetch an image of the archive into an <img>; on failure show the service's message in `status`.
async function loadImage(img, path, status) {
  img.removeAttribute("src");
  img.classList.add("pending");
  try {
    const blob = await api(path, {blob: true, headers: {"Accept": "image/*"}});
    const url = URL.createObjectURL(blob);
    state.blobs.push(url);
    img.src = url;
    img.classList.remove("pending");
    if (status) status.textContent = "";
  } catch (error) {
    img.classList.add("missing");
    img.classList.remove("pending");
    img.alt = "image not available";
    if (status) {
      status.textContent = "Image not available: " + error.message;
      status.classList.add("error");
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Start-up: the service, its index and the filter values

async function start() {
  $("search-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("query").value.trim();
    if (!text) { setStatus("Type what you are looking for first.", "error"); $("query").focus(); return; }
    run({kind: "text", text}, 0);
  });
  $("file").addEventListener("change", () => { if ($("file").files.length) upload($("file").files[0]); });
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    if (event.dataTransfer.files.length) upload(event.dataTransfer.files[0]);
  });
  for (const name of FILTERS) {
    $("filter-" + name).addEventListener("change", () => { if (state.query) run(state.query, 0); });
  }
  $("pager-prev").addEventListener("click", () => run(state.query, Math.max(0, state.offset - PAGE_SIZE)));
  $("pager-next").addEventListener("click", () => run(state.query, state.offset + PAGE_SIZE));
  $("detail-close").addEventListener("click", () => $("detail").close());
  $("more-like-this").addEventListener("click", () => {
    const id = Number($("detail").dataset.item);
    $("detail").close();
    run({kind: "similar", id}, 0);
  });

  try {
    const health = await api("/health");
    state.health = health;
    const index = health.index ? health.index.size + " images in the index" : "no index loaded: search is off";
    const heads = Object.keys(health.heads || {});
    $("service").textContent = "model " + health.model + " (step " + health.step + ") · " + index +
      (heads.length ? " · probe heads: " + heads.join(", ") : "");
    if (!health.index) {
      $("search-button").disabled = true;
      setStatus("No search index is loaded (start the service with index=<embedding folder>); uploads are " +
                "still classified.", "");
      return;
    }
    const facets = await api("/facets");
    for (const [name, values] of Object.entries(facets.filters)) {
      const select = $("filter-" + name);
      if (!select) continue;
      for (const [value, count] of Object.entries(values)) {
        const option = el("option", {text: value + " (" + count + ")"});
        option.value = value;
        select.append(option);
      }
    }
    for (const name of FILTERS) if (!(name in facets.filters)) $("filter-" + name).disabled = true;
  } catch (error) {
    setStatus("The service did not answer: " + error.message, "error");
  }
}

// ---------------------------------------------------------------------------------------------
// Searches: text, upload (its neighbours), "more like this"

function queryForm(query, offset) {
  const form = new FormData();
  if (query.kind === "text") form.append("text", query.text);
  else form.append("file", query.file, query.file.name);
  form.append("k", String(PAGE_SIZE));
  form.append("offset", String(offset));
  for (const [name, value] of Object.entries(filters())) form.append(name, value);
  return form;
}

async function run(query, offset) {
  state.query = query;
  if (query.kind !== "upload") $("classification").hidden = true;
  const what = {text: "Searching…", upload: "Finding neighbours…", similar: "Finding similar images…"}[query.kind];
  setStatus(what, "loading");
  busy(true);
  try {
    let answer;
    if (query.kind === "similar") {
      const params = new URLSearchParams(Object.assign({k: PAGE_SIZE, offset}, filters()));
      answer = await api("/items/" + encodeURIComponent(query.id) + "/similar?" + params);
    } else {
      answer = await api("/search", {method: "POST", body: queryForm(query, offset)});
    }
    show(answer, query);
  } catch (error) {
    showError(error);
  } finally {
    busy(false);
  }
}

async function upload(file) {
  const query = {kind: "upload", file};
  state.query = query;
  $("classification").hidden = true;
  $("classifiers").replaceChildren();
  setStatus("Classifying " + file.name + "…", "loading");
  busy(true);
  try {
    const form = new FormData();
    form.append("file", file, file.name);
    form.append("k", String(PAGE_SIZE));
    for (const [name, value] of Object.entries(filters())) form.append(name, value);
    const answer = await api("/analyze", {method: "POST", body: form});
    showClassification(answer, file);
    if (answer.neighbours) show(answer.neighbours, query);
    else { clearResults(); setStatus("Classified; no index is loaded, so there are no neighbours to show.", ""); }
  } catch (error) {
    showError(error, "The upload could not be used: ");
  } finally {
    busy(false);
  }
}

function showError(error, prefix) {
  clearResults();
  $("summary").textContent = "";
  setStatus((prefix || "Something went wrong: ") + error.message, "error");
}

function clearResults() {
  forgetBlobs();
  $("results").replaceChildren();
  $("pager-prev").disabled = true;
  $("pager-next").disabled = true;
  $("pager-info").textContent = "";
}

function showClassification(answer, file) {
  const box = $("classifiers");
  box.replaceChildren();
  $("classification-title").textContent = "The upload: " + file.name + " (" + answer.format + ")";
  const preview = $("upload-preview");
  if (state.preview) URL.revokeObjectURL(state.preview);
  state.preview = null;
  if (/^image\/(png|jpeg|webp|bmp)$/.test(file.type)) {
    state.preview = URL.createObjectURL(file);
    preview.src = state.preview;
    preview.hidden = false;
  } else {
    preview.hidden = true;
  }
  for (const result of answer.classifications) {
    const method = result.method === "linear_probe" ? "linear probe" : "zero-shot";
    const list = el("ul", {className: "bars"});
    for (const {label, probability} of result.probabilities) {
      const bar = el("span", {className: "bar-fill"});
      bar.style.width = (100 * probability).toFixed(1) + "%";
      list.append(el("li", {className: "bar"},
        el("span", {className: "bar-label", text: label}),
        el("span", {className: "bar-track", role: "img",
                    "aria-label": label + " " + (100 * probability).toFixed(1) + " percent"}, bar),
        el("span", {className: "bar-value", text: (100 * probability).toFixed(1) + "%"})));
    }
    box.append(el("div", {className: "classifier"},
      el("h3", {text: result.name + " — " + result.task + ", " + method + ": " + result.prediction}), list));
  }
  $("classification").hidden = false;
}

function describe(query) {
  if (query.kind === "text") return "“" + shorten(query.text, 80) + "”";
  if (query.kind === "upload") return "images like " + query.file.name;
  return "images like item " + query.id;
}

function show(answer, query) {
  clearResults();
  state.offset = answer.offset;
  state.total = answer.total;
  const grid = $("results");
  const chosen = Object.entries(answer.filters || {}).map(([name, value]) => name + " = " + value);
  const where = chosen.length ? " among " + answer.total + " images with " + chosen.join(", ") : "";
  if (!answer.results.length) {
    $("summary").textContent = "";
    setStatus("No results for " + describe(query) + where + ". Try other words or fewer filters.", "empty");
    return;
  }
  const first = answer.offset + 1;
  const last = answer.offset + answer.results.length;
  $("summary").textContent = "Results " + first + "–" + last + " for " + describe(query) + where + ".";
  setStatus("", "");
  for (const hit of answer.results) grid.append(card(hit));
  $("pager-info").textContent = "page " + (Math.floor(answer.offset / PAGE_SIZE) + 1);
  $("pager-prev").disabled = answer.offset === 0;
  $("pager-next").disabled = last >= answer.total || answer.results.length < PAGE_SIZE;
}

function card(hit) {
  const caption = hit.caption || hit.text || "";
  const img = el("img", {alt: "thumbnail of item " + hit.position, className: "thumb", width: "160", height: "160"});
  const imageStatus = el("span", {className: "image-status"});
  const labels = [hit.modality, hit.anatomy].filter((value) => value && value !== "unknown").join(" · ");
  const button = el("button", {type: "button", className: "card", "data-position": String(hit.position)},
    img, imageStatus,
    el("span", {className: "score", text: "#" + hit.rank + " · score " + Number(hit.score).toFixed(3)}),
    el("span", {className: "caption", text: shorten(caption, CAPTION_CHARS), title: caption}),
    el("span", {className: "labels", text: labels || "no labels"}),
    el("span", {className: "where", text: [hit.split, hit.source].filter(Boolean).join(" · ")}),
    el("span", {className: "ident", text: "id " + hit.id}));
  button.addEventListener("click", () => openItem(hit.position));
  loadImage(img, "/items/" + hit.position + "/thumbnail", imageStatus);
  return el("li", {}, button);
}

// ---------------------------------------------------------------------------------------------
// The detail view

async function openItem(position) {
  const dialog = $("detail");
  dialog.dataset.item = String(position);
  $("detail-title").textContent = "Item " + position;
  $("detail-labels").textContent = "";
  $("detail-meta").tBodies[0].replaceChildren();
  $("detail-image-status").textContent = "loading…";
  $("detail-image-status").classList.remove("error");
  if (!dialog.open) dialog.showModal();
  $("detail-close").focus();
  loadImage($("detail-image"), "/items/" + position + "/image", $("detail-image-status"));
  try {
    const item = await api("/items/" + position);
    $("detail-title").textContent = "Item " + position + ": " + item.id;
    $("detail-image").alt = "image of item " + item.id;
    const labels = item.labels && typeof item.labels === "object" ? item.labels : {};
    $("detail-labels").textContent = Object.entries(labels).map(([task, value]) => task + ": " + value).join(" · ") ||
      "no labels";
    const body = $("detail-meta").tBodies[0];
    for (const [name, value] of Object.entries(item)) {
      if (["thumbnail", "image", "similar"].includes(name)) continue;
      const shown = value !== null && typeof value === "object" ? JSON.stringify(value, null, 1) : String(value);
      body.append(el("tr", {}, el("th", {scope: "row", text: name}), el("td", {}, el("pre", {text: shown}))));
    }
  } catch (error) {
    $("detail-labels").textContent = "This item could not be read: " + error.message;
  }
}

document.addEventListener("DOMContentLoaded", start);
