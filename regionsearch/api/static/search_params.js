"use strict";
// The query string of a text search from the page's fields. A blank field is left out, so the
// server applies its own default for this index (GET /api/stats says which).
function searchParams({ q, k, minScore = "", onePerImage = false, openSet = "", repetition = "" }) {
  const params = new URLSearchParams({ q: String(q).trim(), k: String(k) });
  const optional = { min_score: minScore, open_set: openSet, repetition };
  for (const [name, value] of Object.entries(optional)) {
    if (String(value).trim() !== "") params.set(name, String(value).trim());
  }
  if (onePerImage) params.set("one_per_image", "true");
  return params;
}

// The placeholder of a switch's field: the weight a blank field gets on this index.
function defaultLabel(weight) {
  return weight > 0 ? `default ${weight}` : "default off";
}

if (typeof module !== "undefined") module.exports = { searchParams, defaultLabel };
