"""benchmarks/compare.py: every row runs in its own process and gives a number; PyTorch's models are the same
architectures as vision_train's (parameter for parameter); a row that fails is reported and the others go on."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from .conftest import REPO

SCRIPT = os.path.join(REPO, "benchmarks", "compare.py")


def _compare():
    spec = importlib.util.spec_from_file_location("compare", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(args, tmp_path, timeout=900):
    return subprocess.run([sys.executable, SCRIPT, *args], check=False, cwd=tmp_path, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow  # (every row of compare.py in its own process: about a minute on 2 cores)
def test_smoke_every_row_gives_a_number_and_the_ratios(tmp_path):
    out = tmp_path / "compare.json"
    proc = _run(["--smoke", "--models", "vit", "--json", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {r["row"]: r for r in result["rows"]}
    assert set(rows) == {"recipe", "step", "loop", "torch"}
    for name, r in rows.items():
        assert "error" not in r, (name, r.get("error"))
        assert r["images_per_s"] > 0 and r["step_ms"] > 0 and r["timed_steps"] >= 1, (name, r)
        assert r["images_per_s"] == pytest.approx(16 / (r["step_ms"] / 1e3), rel=1e-6), name
    # One process per row: the PyTorch row never imported JAX, the JAX rows ran vision_train's model.
    assert rows["torch"]["framework"].startswith("torch") and "eager" in rows["torch"]["setup"]
    assert all(rows[k]["framework"].startswith("jax") for k in ("recipe", "step", "loop"))
    # The same architecture on both sides: timm's ViT has exactly vision_train's parameters.
    assert len({r["params"] for r in rows.values()}) == 1, {k: r["params"] for k, r in rows.items()}
    (ratios,) = result["ratios"]
    assert ratios["step_over_torch"] == pytest.approx(rows["step"]["images_per_s"] / rows["torch"]["images_per_s"])
    assert ratios["loop_over_step"] == pytest.approx(rows["loop"]["images_per_s"] / rows["step"]["images_per_s"])
    assert ratios["step_over_recipe"] == pytest.approx(rows["step"]["images_per_s"] / rows["recipe"]["images_per_s"])
    assert rows["loop"]["epochs"] == 2 and rows["loop"]["timed_steps"] == 2 * rows["loop"]["steps_per_epoch"] - 1
    assert "| vit | 16 | vision_train loop |" in proc.stdout and "| step / PyTorch best |" in proc.stdout


@pytest.mark.parametrize("name", ["vit", "vit_s4", "vit_b4", "mixer", "cnn"])
def test_pytorch_models_have_vision_trains_parameters(name):
    """The full-size models the benchmark compares (ViT-B/4: 85M parameters) count the same in both."""
    import jax
    import torch
    from flax import nnx

    from vision_train import models

    compare = _compare()
    cfg = compare.model_config(name, smoke=False)
    abstract = nnx.eval_shape(lambda: models.create(cfg, compare.SHAPE, compare.NUM_CLASSES, rngs=nnx.Rngs(0)))
    ours = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        theirs = sum(p.numel() for p in compare.torch_model(name, smoke=False).parameters())
    assert theirs == ours
    if name == "vit_b4":
        assert 85e6 < ours < 86e6


def test_a_failed_row_is_reported_and_the_others_still_run(tmp_path):
    out = tmp_path / "compare.json"
    proc = _run(["--smoke", "--models", "cnn", "--rows", "step,torch", "--row-timeout", "0.05", "--json", str(out)],
                tmp_path, timeout=120)
    assert proc.returncode == 1
    rows = json.loads(out.read_text())["rows"]
    assert [r["row"] for r in rows] == ["step", "torch"]
    assert all("--row-timeout" in r["error"] for r in rows)
    assert proc.stdout.count("FAILED") >= 2 and "Traceback" not in proc.stdout + proc.stderr
