"""The web page's search query string (``static/search_params.js``): blank fields are left out
so the server's per-index defaults apply (``/api/stats`` names them), filled ones are sent as
typed, a weight of 0 included. Runs the script in Node; skips cleanly without ``node``."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from urllib.parse import parse_qs

import pytest

NODE = shutil.which("node")
SCRIPT = (
    Path(__file__).resolve().parents[1] / "regionsearch" / "api" / "static" / "search_params.js"
)
pytestmark = pytest.mark.skipif(NODE is None, reason="node is not installed")

RUNNER = """
const { searchParams, defaultLabel } = require(process.argv[1]);
const cases = JSON.parse(require("fs").readFileSync(0, "utf8"));
process.stdout.write(JSON.stringify({
  params: cases.fields.map((f) => searchParams(f).toString()),
  labels: cases.weights.map(defaultLabel),
}));
"""


def run_script(fields: list[dict], weights: list[float]) -> dict:
    out = subprocess.run(
        [NODE, "-e", RUNNER, str(SCRIPT)],
        input=json.dumps({"fields": fields, "weights": weights}),
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return json.loads(out.stdout)


def test_blank_fields_are_left_out_and_filled_ones_sent() -> None:
    blank = {"q": "  a red umbrella ", "k": 24, "minScore": "", "openSet": "", "repetition": " "}
    filled = {
        "q": "the dog",
        "k": 24,
        "minScore": "0.2",
        "onePerImage": True,
        "openSet": "0",
        "repetition": "1.5",
    }
    result = run_script([blank, filled], [0.0, 0.5])
    first, second = (parse_qs(p) for p in result["params"])
    assert first == {"q": ["a red umbrella"], "k": ["24"]}
    # "0" is a weight (switch off), not a blank: it must reach the server
    assert second == {
        "q": ["the dog"],
        "k": ["24"],
        "min_score": ["0.2"],
        "open_set": ["0"],
        "repetition": ["1.5"],
        "one_per_image": ["true"],
    }
    assert result["labels"] == ["default off", "default 0.5"]
