// moonsearch search page: plain JavaScript, no build step, no network beyond this server.
"use strict";
const PAGE = 24;
const $ = (id) => document.getElementById(id);
const state = { q: "", photo: null, categories: [], like: null, likeTitle: "", offset: 0, mode: null };

function apiKey() { return localStorage.getItem("moonsearch-api-key") || ""; }

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (apiKey()) headers["X-API-Key"] = apiKey();
  let resp;
  try {
    resp = await fetch(path, Object.assign({}, options, { headers }));
  } catch (e) {
    throw new Error("the server cannot be reached (" + e.message + ")");
  }
  let body = null;
  try { body = await resp.json(); } catch (e) { body = null; }
  if (resp.status === 401) $("keybar").hidden = false;
  if (!resp.ok) throw new Error((body && body.error) || ("HTTP " + resp.status));
  return body;
}

function setImage(img, url) {
  if (!apiKey()) { img.src = url; return; }
  fetch(url, { headers: { "X-API-Key": apiKey() } })
    .then((r) => (r.ok ? r.blob() : Promise.reject(r.status)))
    .then((b) => { img.src = URL.createObjectURL(b); })
    .catch(() => { img.alt = "photo unavailable"; });
}

function syncUrl() {
  const p = new URLSearchParams();
  if (state.q) p.set("q", state.q);
  state.categories.forEach((c) => p.append("category", c));
  if (state.like) p.set("like", state.like);
  if (state.mode) p.set("mode", state.mode);
  const url = p.toString() ? "/?" + p.toString() : "/";
  history.replaceState(null, "", url);
}

function setStatus(text, isError = false) {
  const s = $("status");
  s.textContent = text;
  s.className = isError ? "error" : "";
}

function describe() {
  if (state.like) return "products like \u201c" + (state.likeTitle || state.like) + "\u201d";
  const parts = [];
  if (state.photo) parts.push("your photo");
  if (state.q) parts.push("\u201c" + state.q + "\u201d");
  return parts.join(" + ");
}

async function runSearch(append = false) {
  if (!state.q && !state.photo && !state.like) {
    setStatus("Type a query or drop a photo to search.");
    $("grid").innerHTML = ""; $("facets").hidden = true; $("more").hidden = true;
    syncUrl(); renderFilters();
    return;
  }
  if (!append) state.offset = 0;
  syncUrl(); renderFilters();
  setStatus("Searching " + describe() + "\u2026");
  const filter = state.categories.length ? { category: state.categories } : undefined;
  let res;
  try {
    if (state.like) {
      res = await api("/recommend", { method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ item_ids: [state.like], limit: PAGE, offset: state.offset, filter }) });
    } else if (state.photo) {
      const form = new FormData();
      form.append("file", state.photo);
      if (state.q) form.append("q", state.q);
      form.append("limit", PAGE); form.append("offset", state.offset); form.append("facets", "true");
      state.categories.forEach((c) => form.append("category", c));
      res = await api("/search/image", { method: "POST", body: form });
    } else {
      res = await api("/search", { method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify(Object.assign({ q: state.q, limit: PAGE, offset: state.offset, filter, facets: true },
                                           state.mode ? { mode: state.mode } : {})) });
    }
  } catch (e) {
    setStatus("Search failed: " + e.message, true);
    if (!append) { $("grid").innerHTML = ""; $("more").hidden = true; }
    return;
  }
  renderHits(res.hits, append);
  if (res.facets) renderFacets(res.facets.category);
  else if (!append) $("facets").hidden = true;
  const shown = state.offset + res.hits.length;
  if (shown === 0) {
    setStatus("No products match " + describe() + (state.categories.length ? " in the chosen categories" : "") + ".");
  } else {
    const u = res.understood || {};
    const read = Object.entries(u).filter(([k]) => k !== "boost" && k !== "codes").map(([k, v]) => k + ": " + v);
    setStatus(shown + " results for " + describe() + " (" + res.processing_time_ms + " ms)" +
              (read.length ? " \u00b7 understood " + read.join(", ") : ""));
  }
  $("more").hidden = res.hits.length < PAGE;
}

function renderHits(hits, append) {
  const grid = $("grid");
  if (!append) grid.innerHTML = "";
  for (const h of hits) {
    const card = document.createElement("article");
    card.className = "card";
    card.dataset.itemId = h.item_id;
    const photo = document.createElement("div");
    photo.className = "photo";
    if (h.image_urls && h.image_urls.length) {
      const img = document.createElement("img");
      img.alt = h.title; img.loading = "lazy";
      setImage(img, h.image_urls[0]);
      photo.appendChild(img);
    }
    const body = document.createElement("div");
    body.className = "body";
    const title = document.createElement("div");
    title.className = "title"; title.textContent = h.title;
    const cat = document.createElement("div");
    cat.className = "cat"; cat.textContent = h.category;
    const attrs = document.createElement("div");
    attrs.className = "attrs";
    for (const [k, v] of Object.entries(h.attributes || {})) {
      const a = document.createElement("span");
      a.className = "attr"; a.textContent = k + ": " + v;
      attrs.appendChild(a);
    }
    const price = (h.extra && h.extra.price) ?? (h.attributes && h.attributes.price);
    let pr = null;
    if (price !== undefined && price !== null) {
      pr = document.createElement("div");
      pr.className = "price";
      pr.textContent = typeof price === "number" ? price.toFixed(2) : String(price);
    }
    const foot = document.createElement("div");
    foot.className = "foot";
    const score = document.createElement("span");
    score.className = "score"; score.textContent = "score " + h.score.toFixed(3);
    const like = document.createElement("button");
    like.type = "button"; like.className = "button like"; like.textContent = "More like this";
    like.addEventListener("click", () => {
      state.like = h.item_id; state.likeTitle = h.title; state.q = ""; state.photo = null;
      $("q").value = ""; showPhoto(null); runSearch();
      window.scrollTo(0, 0);
    });
    foot.append(score, like);
    body.append(title, cat, attrs);
    if (pr) body.append(pr);
    body.append(foot);
    card.append(photo, body);
    grid.appendChild(card);
  }
}

function renderFacets(counts) {
  const list = $("facet-list");
  list.innerHTML = "";
  const entries = Object.entries(counts || {});
  $("facets").hidden = entries.length === 0;
  const FEW = 8;
  entries.forEach(([name, n], i) => {
    const li = document.createElement("li");
    if (i >= FEW) li.className = "extra";
    const b = document.createElement("button");
    b.type = "button"; b.className = "facet"; b.dataset.category = name;
    const label = document.createElement("span"); label.textContent = name;
    const count = document.createElement("span"); count.className = "n"; count.textContent = n;
    b.append(label, count);
    b.addEventListener("click", () => {
      if (!state.categories.includes(name)) state.categories.push(name);
      runSearch();
    });
    li.appendChild(b);
    list.appendChild(li);
  });
  list.classList.remove("open");
  $("facet-more").hidden = entries.length <= FEW;
  $("facet-more").textContent = "all " + entries.length + " categories";
}

function renderFilters() {
  const box = $("filters");
  box.innerHTML = "";
  const chip = (text, onRemove) => {
    const c = document.createElement("button");
    c.type = "button"; c.className = "chip"; c.textContent = text + " \u00d7";
    c.addEventListener("click", onRemove);
    box.appendChild(c);
  };
  state.categories.forEach((c) => chip(c, () => {
    state.categories = state.categories.filter((x) => x !== c); runSearch();
  }));
  if (state.like) chip("like: " + (state.likeTitle || state.like), () => { state.like = null; runSearch(); });
}

function showPhoto(file) {
  state.photo = file;
  $("photo-chip").hidden = !file;
  $("photo-thumb").hidden = false; $("photo-name").hidden = true;
  if (file) {
    // a photo the browser cannot draw (HEIC outside Safari) still searches: the chip shows its name instead
    $("photo-thumb").onerror = () => {
      $("photo-thumb").hidden = true; $("photo-name").textContent = file.name; $("photo-name").hidden = false;
    };
    $("photo-thumb").src = URL.createObjectURL(file);
  }
}

function usePhoto(file) {
  if (!file) return;
  // browsers leave the type of an iPhone's HEIC photo (and of AVIF on some systems) blank: the server reads them
  if (!file.type.startsWith("image/") && !/\.(heic|heif|avif)$/i.test(file.name)) {
    setStatus("That file is not an image: " + file.name, true); return;
  }
  state.like = null;
  showPhoto(file);
  state.q = $("q").value.trim();
  runSearch();
}

$("search-form").addEventListener("submit", (e) => {
  e.preventDefault();
  state.q = $("q").value.trim(); state.like = null;
  runSearch();
});
$("photo").addEventListener("change", (e) => usePhoto(e.target.files[0]));
$("photo-clear").addEventListener("click", () => { showPhoto(null); $("photo").value = ""; runSearch(); });
$("facet-more").addEventListener("click", () => {
  const open = $("facet-list").classList.toggle("open");
  $("facet-more").textContent = open ? "fewer" : "all " + $("facet-list").children.length + " categories";
});
$("more").addEventListener("click", () => { state.offset += PAGE; runSearch(true); });
$("keysave").addEventListener("click", () => {
  localStorage.setItem("moonsearch-api-key", $("apikey").value.trim());
  $("keybar").hidden = true; runSearch();
});
const drop = $("dropzone");
["dragenter", "dragover"].forEach((t) => document.addEventListener(t, (e) => {
  e.preventDefault(); drop.classList.add("dragover");
}));
["dragleave", "drop"].forEach((t) => document.addEventListener(t, (e) => {
  e.preventDefault(); drop.classList.remove("dragover");
}));
document.addEventListener("drop", (e) => usePhoto(e.dataTransfer && e.dataTransfer.files[0]));

(function init() {
  const p = new URLSearchParams(location.search);
  state.q = (p.get("q") || "").trim();
  state.categories = p.getAll("category");
  state.like = p.get("like");
  state.mode = ["vector", "lexical", "hybrid"].includes(p.get("mode")) ? p.get("mode") : null;
  $("q").value = state.q;
  if (state.q || state.like) runSearch(); else renderFilters();
})();
