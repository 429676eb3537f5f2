"""The web page draws each result's spotlight itself (``static/spotlight.js``) from the RLE a
search returns; it must equal the server's ``render.spotlight`` pixel for pixel: masks of
several shapes (touching the border, holes, empty, full), drawn on the photo at its own size
and downscaled (the mask is then resized as Pillow's NEAREST does). Runs the script in Node;
skips cleanly without ``node``."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from regionsearch.masks import rle as rle_mod
from regionsearch.search.render import spotlight

NODE = shutil.which("node")
SCRIPT = Path(__file__).resolve().parents[1] / "regionsearch" / "api" / "static" / "spotlight.js"
pytestmark = pytest.mark.skipif(NODE is None, reason="node is not installed")

RUNNER = """
const { spotlightPixels } = require(process.argv[1]);
const cases = JSON.parse(require("fs").readFileSync(0, "utf8"));
const out = cases.map((c) => {
  const pixels = Uint8Array.from(c.pixels);
  spotlightPixels(pixels, c.w, c.h, c.rle, 3);
  return Array.from(pixels);
});
process.stdout.write(JSON.stringify(out));
"""


def _masks(rng: np.random.Generator, h: int, w: int) -> list[np.ndarray]:
    blob = np.zeros((h, w), bool)
    blob[h // 4 : 3 * h // 4, w // 5 : w - 2] = True
    blob[h // 2 - 2 : h // 2 + 2, w // 3 : w // 3 + 3] = False  # a hole
    corner = np.zeros((h, w), bool)
    corner[: h // 2, : w // 2] = True  # touches two borders
    return [blob, corner, rng.random((h, w)) < 0.5, np.zeros((h, w), bool), np.ones((h, w), bool)]


def test_browser_spotlight_equals_server_spotlight() -> None:
    rng = np.random.default_rng(3)
    h0, w0 = 61, 83
    cases, expected = [], []
    for mask in _masks(rng, h0, w0):
        rle = rle_mod.encode(mask)
        counts = rle["counts"].decode() if isinstance(rle["counts"], bytes) else rle["counts"]
        for h, w in ((h0, w0), (37, 50), (240, 400), (380, 545)):  # edge 2 (2.5 rounds to even), 3
            image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            cases.append(
                {
                    "w": w,
                    "h": h,
                    "pixels": image.ravel().tolist(),
                    "rle": {"size": [h0, w0], "counts": counts},
                }
            )
            expected.append(spotlight(image, rle))
    done = subprocess.run(
        [NODE, "-e", RUNNER, str(SCRIPT)],
        input=json.dumps(cases),
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    for case, want, got in zip(cases, expected, json.loads(done.stdout), strict=True):
        got = np.asarray(got, dtype=np.uint8).reshape(case["h"], case["w"], 3)
        assert np.array_equal(got, want), (case["h"], case["w"], int((got != want).sum()))
