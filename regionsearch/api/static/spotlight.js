"use strict";
// The spotlight of regionsearch.search.render.spotlight, drawn in the browser from the RLE a
// search already returns: the page loads each photo once (a cached thumbnail) instead of one
// server-rendered overlay per result. Same rule, pixel for pixel (tests/test_web_spotlight.py):
// outside the region the photo is dimmed to DIM, the region's inner edge is drawn in EDGE.

const DIM_NUM = 90; // round(0.35 * 256): pixel * 90 >> 8
const EDGE = [255, 214, 0];

// COCO compressed RLE counts (pycocotools' rleFrString) -> run lengths.
function rleRuns(s) {
  const runs = [];
  let p = 0;
  while (p < s.length) {
    let x = 0;
    let k = 0;
    let more = 1;
    while (more) {
      const c = s.charCodeAt(p) - 48;
      x |= (c & 0x1f) << (5 * k);
      more = c & 0x20;
      p++;
      k++;
      if (!more && c & 0x10) x |= -1 << (5 * k);
    }
    if (runs.length > 2) x += runs[runs.length - 2];
    runs.push(x);
  }
  return runs;
}

// The mask of an RLE ({size: [h, w], counts}) as row-major 0/1 bytes of w x h.
function rleMask(rle) {
  const [h, w] = rle.size;
  const mask = new Uint8Array(h * w);
  let i = 0;
  let value = 0;
  for (const run of rleRuns(rle.counts)) {
    if (value) {
      for (let j = i; j < i + run; j++) mask[(j % h) * w + Math.floor(j / h)] = 1; // column-major
    }
    i += run;
    value = 1 - value;
  }
  return mask;
}

// Nearest-neighbour resize as Pillow's Image.NEAREST does it (source = floor((x + .5) * scale)).
function fitMask(mask, w0, h0, w, h) {
  if (w === w0 && h === h0) return mask;
  const out = new Uint8Array(w * h);
  const sx = w0 / w;
  const sy = h0 / h;
  for (let y = 0; y < h; y++) {
    const row = Math.floor((y + 0.5) * sy) * w0;
    for (let x = 0; x < w; x++) out[y * w + x] = mask[row + Math.floor((x + 0.5) * sx)];
  }
  return out;
}

// Binary erosion by a (2r+1)^2 square, separably; outside the picture counts as inside.
function erode(mask, w, h, r) {
  const out = mask.slice();
  for (const [n, step, lines, along] of [[h, w, w, 1], [w, 1, h, w]]) {
    const src = out.slice();
    for (let s = 1; s <= Math.min(r, n - 1); s++) {
      for (let line = 0; line < lines; line++) {
        const base = line * along;
        for (let i = s; i < n; i++) out[base + i * step] &= src[base + (i - s) * step];
        for (let i = 0; i < n - s; i++) out[base + i * step] &= src[base + (i + s) * step];
      }
    }
  }
  return out;
}

// Python's round(): halves to even.
function roundHalfEven(x) {
  const r = Math.round(x);
  return Math.abs(x % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

// Spotlight the region in `pixels` (w x h, `channels` bytes a pixel, RGB first), in place.
function spotlightPixels(pixels, w, h, rle, channels) {
  const mask = fitMask(rleMask(rle), rle.size[1], rle.size[0], w, h);
  const inner = erode(mask, w, h, Math.max(2, roundHalfEven(Math.max(w, h) / 160)));
  for (let i = 0; i < w * h; i++) {
    const p = i * channels;
    if (!mask[i]) {
      for (let c = 0; c < 3; c++) pixels[p + c] = (pixels[p + c] * DIM_NUM) >> 8;
    } else if (!inner[i]) {
      for (let c = 0; c < 3; c++) pixels[p + c] = EDGE[c];
    }
  }
}

// Draw the photo at `url` into `canvas` with the region of `rle` spotlit.
async function drawSpotlight(canvas, url, rle) {
  const img = new Image();
  img.src = url;
  await img.decode();
  const w = img.naturalWidth;
  const h = img.naturalHeight;
  canvas.width = w;
  canvas.height = h;
  const ctx = canvas.getContext("2d");
  ctx.drawImage(img, 0, 0);
  const frame = ctx.getImageData(0, 0, w, h);
  spotlightPixels(frame.data, w, h, rle, 4);
  ctx.putImageData(frame, 0, 0);
  canvas.dataset.drawn = "1";
}

if (typeof module !== "undefined") module.exports = { rleMask, fitMask, erode, spotlightPixels };
