"""``python -m vision_train.evaluate`` and ``python -m vision_train.predict`` end to end, in subprocesses, on a
checkpoint trained here (in-process, once for the module)."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from .conftest import FAST_COMPILE, REPO
from .helpers import FAST, compose

TRAIN = ["model=cnn", "model.features=[8,16]", "model.dense_dim=32", "data=digits", "trainer.epochs=3",
         "trainer.batch_size=64", "optimizer.lr=1e-2", "trainer.checkpoint_every_epochs=0", *FAST,
         "logger.mode=offline"]  # offline W&B: the checkpoint holds the training run's W&B id


def run_module(module, args, cwd, timeout=300):
    """``python -m <module> args`` in a fresh process, as a user runs it."""
    env = {**os.environ, "PYTHONPATH": REPO, "HYDRA_FULL_ERROR": "0", "XLA_FLAGS": FAST_COMPILE}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from vision_train.train.loop import train

    run_dir = tmp_path_factory.mktemp("train")
    summary = train(compose(TRAIN), run_dir)
    return run_dir, summary


def wandb_run_record(run_dir):
    (log,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(log)],
                         capture_output=True, text=True, timeout=120)
    recs = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    (run,) = [r["run"] for r in recs if r["type"] == "run"]
    return run


@pytest.mark.xdist_group("trained")  # (one worker: the module fixture runs once)
def test_evaluate_on_two_devices_reproduces_the_training_runs_test_accuracy(trained, tmp_path):
    train_dir, summary = trained
    ev = tmp_path / "eval"
    r = run_module("vision_train.evaluate", [f"checkpoint={train_dir}", "hardware=cpu", "hardware.num_devices=2",
                                             "logger.mode=offline", f"hydra.run.dir={ev}"], cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    assert f"test/acc {summary['test/acc']:.4f}  test/loss {summary['test/loss']:.4f}" in out, out[-3000:]
    assert "360 examples on 2 x cpu" in out
    assert "confusion matrix (rows: true class, columns: predicted class)" in out
    assert "sample predictions" in out

    report = json.loads((ev / "eval.json").read_text())
    assert report["test/acc"] == summary["test/acc"]  # every example counted once, as in training
    assert report["test/loss"] == pytest.approx(summary["test/loss"], rel=1e-5)
    assert report["num_devices"] == 2 and report["num_examples"] == 360
    cm = np.array(report["confusion_matrix"])
    assert cm.sum() == 360 and np.trace(cm) / 360 == pytest.approx(summary["test/acc"])
    for png in ("test_confusion", "test_predictions", "test_reliability"):
        assert (ev / "media" / f"{png}.png").stat().st_size > 1000, png
    assert "test/acc" in (ev / "evaluate.log").read_text()

    # An eval run in the training run's W&B project, linked to it; its files under the eval run dir.
    from vision_train.checkpoint import load_for_inference

    train_id = load_for_inference(train_dir)["meta"]["sinks"]["wandb"]["run_id"]
    assert train_id and report["train_wandb_run_id"] == train_id
    run = wandb_run_record(ev)
    assert run["job_type"] == "eval" and run["project"] == "vision_train"
    config = run["config"]["update"]
    assert config["train_wandb_run_id"] == train_id and config["train_run_dir"] == str(train_dir)
    assert config["checkpoint_step"] == summary["step"]


def _truncated_copy(train_dir, dest):
    """Every array data file of its checkpoint cut to 100 bytes (evaluation reads the parameters only, so a
    damaged file holding only optimizer state would not be noticed: all are damaged)."""
    shutil.copytree(train_dir / "checkpoints", dest / "checkpoints")
    data = [p for p in (dest / "checkpoints").glob("*/state/ocdbt.process_*/d/*") if p.stat().st_size > 100]
    assert data
    for p in data:
        p.write_bytes(p.read_bytes()[:100])
    return dest


BAD = [
    # (how to make the checkpoint argument, extra args, text the one-line error must contain)
    ("missing", [], "checkpoint= is missing: give the training run's directory"),
    ("empty", [], "no complete checkpoint in"),
    ("truncated", [], "is damaged"),  # (earlier steps named: tests/test_failures.py)
    ("run", ["data=toy"], "data='toy': its images are 1x1x2 with 2 classes"),
]


@pytest.mark.xdist_group("trained")  # (one worker: the module fixture runs once)
@pytest.mark.parametrize("what,extra,expected", BAD, ids=[b[0] + " ".join(b[1]) for b in BAD])
def test_evaluate_bad_input_is_one_line_and_nonzero(trained, tmp_path, what, extra, expected):
    train_dir, _ = trained
    ckpt = {"missing": None, "empty": tmp_path / "empty", "run": train_dir,
            "truncated": tmp_path / "damaged"}[what]
    if what == "empty":
        ckpt.mkdir()
    if what == "truncated":
        ckpt = _truncated_copy(train_dir, ckpt)
    args = ([f"checkpoint={ckpt}"] if ckpt else []) + extra
    r = run_module("vision_train.evaluate", [*args, "hardware=cpu", "logger.mode=disabled",
                                             f"hydra.run.dir={tmp_path / 'eval'}"], cwd=tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert expected in out, out[-2000:]
    assert "Traceback" not in out
    errors = [line for line in out.splitlines() if "error:" in line]
    assert len(errors) == 1, out[-2000:]
    if what == "truncated":  # its only checkpoint
        assert "there is no earlier checkpoint in" in errors[0] and "train again" in errors[0]
    elif ckpt is not None and what != "run":
        assert "checkpoint=" in errors[0] and "give the training run's directory" in errors[0]
    assert not (tmp_path / "eval" / "eval.json").exists()


def _model_predictions(train_dir, images):
    """The trained model's class probabilities for uint8 images, normalised as in training (in-process)."""
    import jax
    import jax.numpy as jnp

    from vision_train.data import pipeline
    from vision_train.train.build import read_checkpoint, restore_model

    restored = restore_model(read_checkpoint(train_dir))
    model, facts = restored.model, restored.checkpoint.data
    x = pipeline.normalize(jnp.asarray(images), facts["scale"], facts["mean"], facts["std"], jnp.float32)
    return np.asarray(jax.nn.softmax(model(x, train=False).astype(jnp.float32)))


@pytest.mark.xdist_group("trained")  # (one worker: the module fixture runs once)
def test_predict_on_image_files(trained, tmp_path):
    from PIL import Image

    from vision_train.data import sources

    train_dir, summary = trained
    test = sources.load(compose(TRAIN).data).test
    n = 40
    images, labels = test.images[:n], test.labels[:n]
    folder = tmp_path / "images"
    folder.mkdir()
    for i, img in enumerate(images):  # 8x8 grayscale PNGs: the model's own size and channel count
        Image.fromarray(img[..., 0], "L").save(folder / f"{i:02d}_label{labels[i]}.png")
    # RGB and twice the size: converted to grayscale and resized back to 8x8 (said once for both).
    for i in (0, 1):
        rgb = np.repeat(np.kron(images[i][..., 0], np.ones((2, 2), np.uint8))[..., None], 3, axis=-1)
        Image.fromarray(rgb, "RGB").save(folder / f"rgb{i}.png")
    (folder / "notes.png").write_text("not an image")

    out_json = tmp_path / "preds" / "p.json"
    r = run_module("vision_train.predict", [f"checkpoint={train_dir}", f"inputs={folder}", "top_k=3",
                                            f"json={out_json}", "hardware=cpu", f"hydra.run.dir={tmp_path / 'pred'}"],
                   cwd=tmp_path)
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]  # one input refused: non-zero, the rest done
    assert "Traceback" not in r.stdout + r.stderr
    assert r.stdout.splitlines()[0].split() == ["file", "top-1", "top-2", "top-3"]
    assert f"predictions: {out_json}" in r.stdout
    assert "notes.png" in r.stderr and "cannot read it as an image" in r.stderr
    assert r.stderr.count("note: resizing images to 8x8") == 1 and "rgb0.png, 16x16" in r.stderr
    assert r.stderr.count("note: converting RGB images to grayscale") == 1

    result = json.loads(out_json.read_text())
    assert [e["file"] for e in result["errors"]] == [str(folder / "notes.png")]
    by_name = {os.path.basename(p["file"]): p for p in result["predictions"]}
    assert len(by_name) == n + 2 and all(len(p["top_k"]) == 3 for p in by_name.values())
    assert by_name["rgb0.png"]["resized"] and by_name["rgb0.png"]["converted"]
    assert by_name["rgb0.png"]["original_size"] == [16, 16]

    # Top-1 and probabilities for the real digits are exactly the model's (normalised as in training) ...
    known = _model_predictions(train_dir, images)
    got = [by_name[f"{i:02d}_label{labels[i]}.png"] for i in range(n)]
    top1 = np.array([p["top_k"][0]["index"] for p in got])
    np.testing.assert_array_equal(top1, known.argmax(-1))
    for p, k in zip(got, known):
        assert p["top_k"][0]["prob"] == pytest.approx(float(k.max()), rel=1e-4)
    # ... and mostly right: this 3-epoch model gets ~0.87 of the test set (0.85 of these 40).
    assert (top1 == labels).mean() >= 0.75
    # The printed table says the same as the JSON.
    line = next(x for x in r.stdout.splitlines() if x.startswith(str(folder / "00_label")))
    assert f"{got[0]['top_k'][0]['class']} {got[0]['top_k'][0]['prob']:.3f}" in line


@pytest.mark.slow  # (about 40 s: a training run and two commands)
def test_a_built_in_set_at_another_size_trains_evaluates_and_predicts_at_that_size(tmp_path):
    """data.image_size on a built-in set (CIFAR-10 at 224 for a pretrained ViT): the 8x8 digits stay 8x8 in memory
    and are resampled to 16x16 inside the steps; the model, the checkpoint's data facts, evaluation (which
    reproduces the run's test accuracy) and prediction of image files all work at 16x16."""
    from PIL import Image

    from vision_train.train.loop import train

    run_dir = tmp_path / "run"
    summary = train(compose([*TRAIN, "trainer.epochs=2", "data.image_size=16", "model.features=[8,16,16]",
                             "logger.mode=disabled"]), run_dir)
    assert summary["test/acc"] > 0.3  # (10 classes: it learns)
    from vision_train.checkpoint import load_for_inference

    assert load_for_inference(run_dir)["meta"]["data"]["shape"] == [16, 16, 1]
    ev = tmp_path / "eval"
    r = run_module("vision_train.evaluate", [f"checkpoint={run_dir}", "hardware=cpu", "logger.mode=disabled",
                                             f"hydra.run.dir={ev}"], cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert json.loads((ev / "eval.json").read_text())["test/acc"] == summary["test/acc"]
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(tmp_path / "one.png")
    r = run_module("vision_train.predict", [f"checkpoint={run_dir}", f"inputs={tmp_path / 'one.png'}", "hardware=cpu",
                                            f"json={tmp_path / 'p.json'}"], cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert json.loads((tmp_path / "p.json").read_text())["predictions"][0]["top_k"]
