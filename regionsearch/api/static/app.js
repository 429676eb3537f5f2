"use strict";
// regionsearch web page: search -> result cards -> image viewer with referring expressions.
const $ = (id) => document.getElementById(id);
const state = { imageId: null, hits: [] };

function escapeHtml(s) {
  return String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}

async function getJson(url) {
  const res = await fetch(url);
  const body = await res.json().catch(() => ({}));
  if (!res.ok) throw new Error(typeof body.detail === "string" ? body.detail : `HTTP ${res.status}`);
  return body;
}

async function runSearch(ev) {
  ev.preventDefault();
  const params = searchParams({
    q: $("q").value,
    k: 24,
    minScore: $("min-score").value,
    onePerImage: $("one-per-image").checked,
    openSet: $("open-set").value,
    repetition: $("repetition").value,
  });
  $("status").textContent = "Searching…";
  try {
    const data = await getJson(`/api/search?${params}`);
    renderResults(data);
    $("status").textContent = `${data.count} region(s) in ${data.took_ms.toFixed(0)} ms` +
      (data.templated ? " · short phrase: prompt template applied" : "");
  } catch (err) {
    $("status").textContent = `Error: ${err.message}`;
  }
}

function renderResults(data) {
  const grid = $("results");
  grid.innerHTML = "";
  if (!data.results.length) {
    grid.innerHTML = '<p class="empty">No match. Try other words or a lower minimum score.</p>';
    return;
  }
  for (const hit of data.results) {
    const card = document.createElement("article");
    card.className = "card";
    card.tabIndex = 0;
    card.dataset.imageId = hit.image_id;
    card.dataset.regionId = hit.id;
    const name = hit.image_path.split("/").pop();
    card.innerHTML = `<canvas role="img" aria-label="region ${hit.id}"></canvas>
      <div class="meta"><span class="score">${hit.score.toFixed(3)}</span><span class="path" title="${escapeHtml(hit.image_path)}">${escapeHtml(name)}</span></div>`;
    // the photo once per image (cached by server and browser), the region drawn here
    const photo = `/api/images/${hit.image_id}/thumbnail.jpg?size=${photoSide()}`;
    drawSpotlight(card.querySelector("canvas"), photo, hit.rle).catch(() => {
      card.querySelector("canvas").dataset.drawn = "error";
    });
    card.addEventListener("click", () => openImage(hit.image_id, [hit.id]));
    card.addEventListener("keydown", (e) => { if (e.key === "Enter") openImage(hit.image_id, [hit.id]); });
    grid.appendChild(card);
  }
}

// The photo size a card needs on this screen, in a few steps (few cached sizes server-side).
function photoSide() {
  const px = 240 * (window.devicePixelRatio || 1);
  return px <= 320 ? 320 : px <= 480 ? 480 : 640;
}

function overlayUrl(imageId, highlight) {
  const p = new URLSearchParams();
  for (const id of highlight) p.append("highlight", id);
  return `/api/images/${imageId}/overlay.jpg?${p}`;
}

async function openImage(imageId, highlight) {
  state.imageId = imageId;
  $("refer-results").innerHTML = "";
  $("expr").value = "";
  $("viewer-img").src = overlayUrl(imageId, highlight);
  $("viewer-img").dataset.highlight = highlight.join(",");
  try {
    const meta = await getJson(`/api/images/${imageId}`);
    $("viewer-title").textContent = `${meta.path} · ${meta.regions.length} regions`;
  } catch (err) {
    $("viewer-title").textContent = `Image ${imageId}`;
  }
  if (!$("viewer").open) $("viewer").showModal();
  $("expr").focus();
}

async function runRefer(ev) {
  ev.preventDefault();
  const q = $("expr").value.trim();
  if (!q || state.imageId === null) return;
  const list = $("refer-results");
  list.innerHTML = "<li>Looking…</li>";
  try {
    const data = await getJson(`/api/refer?${new URLSearchParams({ image_id: state.imageId, q, k: "5" })}`);
    list.innerHTML = "";
    if (!data.best) { list.innerHTML = "<li>No regions in this image.</li>"; return; }
    const hits = [data.best, ...data.alternatives];
    hits.forEach((h, i) => {
      const li = document.createElement("li");
      li.className = i === 0 ? "best" : "";
      li.textContent = `region ${h.id} · score ${h.score.toFixed(3)}` + (i === 0 ? " (highlighted)" : "");
      li.title = "highlight this region";
      li.addEventListener("click", () => {
        $("viewer-img").src = overlayUrl(state.imageId, [h.id]);
        $("viewer-img").dataset.highlight = String(h.id);
      });
      list.appendChild(li);
    });
    $("viewer-img").src = overlayUrl(state.imageId, [data.best.id]);
    $("viewer-img").dataset.highlight = String(data.best.id);
  } catch (err) {
    list.innerHTML = `<li>Error: ${escapeHtml(err.message)}</li>`;
  }
}

// "More like this": the highlighted region's own vector as the query (the region itself excluded).
async function moreLikeThis() {
  const regionId = ($("viewer-img").dataset.highlight || "").split(",")[0];
  if (!regionId) return;
  const params = new URLSearchParams({ k: "24" });
  if ($("one-per-image").checked) params.set("one_per_image", "true");
  $("status").textContent = "Searching…";
  try {
    const data = await getJson(`/api/regions/${encodeURIComponent(regionId)}/similar?${params}`);
    $("viewer").close();
    renderResults(data);
    $("status").textContent = `${data.count} region(s) like region ${data.region_id} in ${data.took_ms.toFixed(0)} ms`;
  } catch (err) {
    $("status").textContent = `Error: ${err.message}`;
  }
}

// What the served index is, and the switch weights a blank "ranking" field keeps.
async function showIndex() {
  try {
    const stats = await getJson("/api/stats");
    $("open-set").placeholder = defaultLabel(stats.open_set);
    $("repetition").placeholder = defaultLabel(stats.repetition);
    $("status").textContent = `${stats.regions} regions of ${stats.images.indexed || 0} photos · ${stats.embedder} on ${stats.model}`;
  } catch (err) {
    $("status").textContent = `Index unavailable: ${err.message}`;
  }
}

showIndex();
$("search-form").addEventListener("submit", runSearch);
$("more-like-this").addEventListener("click", moreLikeThis);
$("refer-form").addEventListener("submit", runRefer);
$("close").addEventListener("click", () => $("viewer").close());
