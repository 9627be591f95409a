// The search page: builds a query from the form, POSTs it to the service, renders the hits. No build step.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { file: null, imageKey: null, previewUrl: null, busy: false };

function addTerm(kind, text = "", weight = 1) {
  const node = $("term-template").content.firstElementChild.cloneNode(true);
  const input = node.querySelector(".term-text");
  const slider = node.querySelector(".term-weight");
  const shown = node.querySelector(".term-weight-value");
  const n = document.querySelectorAll(`.term-list[data-kind="${kind}"] .term`).length + 1;
  input.value = text;
  input.placeholder = kind === "minus" ? "e.g. blue" : "e.g. green";
  input.id = `${kind}-${n}`;
  input.setAttribute("aria-label", `${kind} text ${n}`);
  node.querySelector("label.sr-only").htmlFor = input.id;
  slider.value = weight;
  slider.setAttribute("aria-label", `weight of ${kind} text ${n}`);
  shown.textContent = Number(weight).toFixed(2);
  slider.addEventListener("input", () => { shown.textContent = Number(slider.value).toFixed(2); });
  node.querySelector(".remove-term").addEventListener("click", () => {
    node.remove();
    document.querySelector(`.add-term[data-kind="${kind}"]`).focus();
  });
  document.querySelector(`.term-list[data-kind="${kind}"]`).appendChild(node);
  return input;
}

function terms(kind) {
  return [...document.querySelectorAll(`.term-list[data-kind="${kind}"] .term`)]
    .map((node) => ({ text: node.querySelector(".term-text").value.trim(),
                      weight: Number(node.querySelector(".term-weight").value) }))
    .filter((t) => t.text);
}

function setImage({ file = null, key = null, url = null, name = "" }) {
  if (state.previewUrl) URL.revokeObjectURL(state.previewUrl);
  state.file = file;
  state.imageKey = key;
  state.previewUrl = file ? URL.createObjectURL(file) : null;
  const preview = $("preview");
  preview.hidden = !(file || key);
  $("preview-img").src = state.previewUrl || url || "";
  $("preview-name").textContent = name;
  if (!file) $("file").value = "";
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function setBusy(busy, text = "") {
  state.busy = busy;
  $("spinner").hidden = !busy;
  $("status-text").textContent = text;
  $("submit").disabled = busy;
  $("results").setAttribute("aria-busy", busy ? "true" : "false");
}

// An error answer is {"error": "..."}; anything else (a proxy's HTML page, a dropped connection) gets a
// readable line too.
async function errorOf(response) {
  try {
    const body = await response.json();
    if (body && body.error) return body.error;
  } catch (e) { /* not JSON */ }
  return `the service answered ${response.status} ${response.statusText}`;
}

async function call(path, options = {}) {
  const response = await fetch(path, { credentials: "same-origin", ...options });
  if (response.status === 401) $("token-box").hidden = false;
  if (!response.ok) throw new Error(await errorOf(response));
  return response.json();
}

async function loadInfo() {
  try {
    const info = await call("info");
    const index = info.index.nprobe ? `${info.index.factory}, nprobe ${info.index.nprobe}` : info.index.factory;
    $("info").textContent = `${info.num_vectors.toLocaleString()} images · ${index}` +
      (info.text_index ? " · captions indexed" : "") + ` · model ${info.model}`;
    $("k").max = info.limits.max_k;
    const captions = document.querySelector('#modality option[value="text"]');
    captions.disabled = !info.text_index;
    if (!info.text_index) captions.textContent = "captions (not indexed)";
  } catch (e) {
    $("info").textContent = `index information unavailable: ${e.message}`;
  }
}

function render(hits, modality) {
  const list = $("results");
  list.replaceChildren();
  for (const hit of hits) {
    const node = $("hit-template").content.firstElementChild.cloneNode(true);
    node.dataset.key = hit.key;
    node.dataset.rank = hit.rank;
    for (const [name, value] of Object.entries(hit.attributes || {})) {
      node.setAttribute(`data-attr-${name.toLowerCase().replace(/[^a-z0-9_-]/g, "_")}`, String(value));
    }
    const img = node.querySelector(".thumb");
    const link = node.querySelector(".full");
    if (hit.image_url) {
      img.addEventListener("load", () => img.classList.toggle("upscaled", img.naturalWidth < img.clientWidth));
      img.src = hit.image_url;
      img.alt = hit.caption || hit.key;
      link.href = hit.image_url;
      link.setAttribute("aria-label", `full image of ${hit.key}`);
    } else {
      link.replaceWith(Object.assign(document.createElement("div"), { className: "thumb none", textContent: "no image" }));
    }
    node.querySelector(".caption").textContent = hit.caption || hit.key;
    node.querySelector(".score").textContent = `#${hit.rank} · score ${hit.score.toFixed(3)}` +
      (modality === "text" ? " · caption match" : "");
    node.querySelector(".attributes").textContent = Object.entries(hit.attributes || {})
      .filter(([, v]) => typeof v !== "object" && String(v) !== hit.key).map(([k, v]) => `${k}: ${v}`).join(" · ");
    const more = node.querySelector(".more-like");
    more.setAttribute("aria-label", `search for images like ${hit.key}`);
    more.addEventListener("click", () => {
      setImage({ key: hit.key, url: hit.image_url, name: `indexed image ${hit.key}` });
      $("text").value = "";
      search();
    });
    list.appendChild(node);
  }
}

async function search(event) {
  if (event) event.preventDefault();
  if (state.busy) return;
  const query = {
    text: $("text").value.trim() || null,
    minus: terms("minus"),
    plus: terms("plus"),
    k: Number($("k").value) || 12,
    modality: $("modality").value,
  };
  if (state.imageKey) query.image_key = state.imageKey;
  let body;
  let headers = {};
  if (state.file) {
    body = new FormData();
    body.append("query", JSON.stringify(query));
    body.append("image", state.file, state.file.name);
  } else {
    body = JSON.stringify(query);
    headers = { "Content-Type": "application/json" };
  }
  showError("");
  setBusy(true, "searching…");
  try {
    const result = await call("search", { method: "POST", body, headers });
    render(result.results, result.modality);
    const left = result.excluded_as_query_image.length ? " (the query image itself left out)" : "";
    setBusy(false, `${result.results.length} results in ${result.took_ms} ms${left}`);
  } catch (e) {
    setBusy(false, "");
    showError(`Search failed: ${e.message}`);
  }
}

function init() {
  addTerm("minus");
  addTerm("plus");
  for (const button of document.querySelectorAll(".add-term")) {
    button.addEventListener("click", () => addTerm(button.dataset.kind).focus());
  }
  $("query").addEventListener("submit", search);
  $("choose").addEventListener("click", () => $("file").click());
  $("file").addEventListener("change", () => {
    const file = $("file").files[0];
    if (file) setImage({ file, name: file.name });
  });
  const previewImg = $("preview-img");
  previewImg.addEventListener("load", () => previewImg.classList.toggle("upscaled", previewImg.naturalWidth < 64));
  $("clear-image").addEventListener("click", () => { setImage({}); $("choose").focus(); });
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    const file = e.dataTransfer.files[0];
    if (!file) return;
    if (!file.type.startsWith("image/")) {
      showError(`${file.name} is not an image`);
      return;
    }
    setImage({ file, name: file.name });
  });
  $("save-token").addEventListener("click", () => {
    document.cookie = `contrastive_token=${encodeURIComponent($("token").value)}; path=/; SameSite=Strict`;
    $("token-box").hidden = true;
    showError("");
    loadInfo();
  });
  loadInfo();
}

document.addEventListener("DOMContentLoaded", init);
