"""benchmarks/feeds.py --smoke: the feed comparison runs end to end, as a user runs it, and reports every row."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .conftest import FAST_COMPILE, REPO

# A subprocess (fresh JAX on one CPU device, Grain's spawned workers importing the script as a user's run
# does): worker start-up and three compiled steps make it about a minute on 2 shared cores.
pytestmark = pytest.mark.slow


def test_smoke_reports_every_feed_on_both_sources(tmp_path):
    out = tmp_path / "feeds.json"
    env = {**os.environ, "PYTHONPATH": REPO, "XLA_FLAGS": FAST_COMPILE, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "feeds.py"), "--smoke", "--models", "cnn",
                        "--json", str(out)], check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads(out.read_text())

    rows = {(x["data"], x["feed"], x["workers"]): x for x in result["rows"]}
    expected = {(None, "step alone", None)} | {
        (data, feed, w) for data in ("png", "npy") for feed, w in (("device-resident", None), ("streamed", 0),
                                                                   ("streamed", 1))}
    assert set(rows) == expected
    for x in rows.values():
        assert x["model"] == "cnn" and x["batch"] == 32 and x["steps"] == 3 and x["images_per_s"] > 0
    for (data, feed, _), x in rows.items():
        if feed == "streamed":
            device = rows[(data, "device-resident", None)]
            assert x["vs_device_resident"] == pytest.approx(x["images_per_s"] / device["images_per_s"])
            assert 0 < x["cpu_bound_images_per_s"] and x["feed_batches_per_s"] > 0
    # The PNGs decoded through the trainer's Records are the images written; the raw records need no decode.
    assert "the decode equals the images written" in r.stdout
    assert result["decode_alone"]["npy"]["images_per_s"] > result["decode_alone"]["png"]["images_per_s"] > 0
    assert result["meta"]["images"] == 320 and result["meta"]["smoke"]
    # The markdown table, one line per row.
    assert "| cnn | png | streamed | 1 |" in r.stdout and "| cnn | npy | device-resident |" in r.stdout
