"""What reaches W&B, read back from the offline run's own records, and the local mirror beside it."""

import json
import subprocess
import sys
import time

import pytest

from vision_train.train.loop import train

from .helpers import compose

RUN = ["model=cnn", "model.features=[8,16]", "model.dense_dim=32", "data=digits", "trainer.epochs=2",
       "trainer.batch_size=64", "trainer.log_every_steps=5", "trainer.progress_bar=false", "hardware=cpu",
       "logger.mode=offline", "logger.num_samples=8"]


def records(run_dir):
    """The records of the run's .wandb transaction log, via W&B's own reader."""
    (log,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(log)],
                         capture_output=True, text=True, timeout=120)
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def by_type(recs, kind):
    return [r[kind] for r in recs if r["type"] == kind]


def test_offline_run_holds_curves_media_summary_and_equals_the_local_mirror(tmp_path):
    summary = train(compose(RUN), tmp_path)
    recs = records(tmp_path)
    history = {}  # our x-axis "step" -> everything logged for it (W&B's own _step counts log calls)
    for h in by_type(recs, "history"):
        history.setdefault(h["item"]["step"], {}).update(h["item"])
    local = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]

    # Every scalar in metrics.jsonl reached W&B at the same step with the same value.
    for row in local:
        item = history[row["step"]]
        for key, value in row.items():
            assert item[key] == pytest.approx(value, rel=1e-12), (row["step"], key)
    keys = set().union(*history.values())
    for key in ("train/loss", "train/acc", "train/grad_norm", "lr", "epoch", "images_per_sec", "val/loss", "val/acc",
                "test/loss", "test/acc", "val/ece", "val/class_acc/3"):
        assert key in keys, key
    # Media at each eval and for the test set: tables, the confusion-matrix panel, images.
    for split in ("val", "test"):
        assert history[max(history)][f"{split}/predictions_table._type"] == "table-file"
        assert history[max(history)][f"{split}/predictions_table.nrows"] == 8
        assert f"{split}/confusion_matrix_table._type" in keys
        for image in ("predictions", "confusion_heatmap", "reliability"):
            assert history[max(history)][f"{split}/{image}._type"] == "image-file", image
    # Summary and config.
    final = {}
    for s in by_type(recs, "summary"):
        final.update(s.get("update", {}))
    assert final["test/acc"] == pytest.approx(summary["test/acc"])
    assert final["best/val/acc"] == pytest.approx(summary["best/val/acc"]) and "best/step" in final
    assert final["images_seen"] == summary["step"] * 64 and final["wall_time_s"] > 0
    (run,) = by_type(recs, "run")
    config = run["config"]["update"]
    assert config["model"]["arch"] == "cnn" and config["trainer"]["batch_size"] == 64
    assert config["meta"]["parameters"] == summary["parameters"] and "jax" in config["meta"]["versions"]
    assert by_type(recs, "exit")[0]["exit_code"] == 0
    # The local mirror: PNGs beside metrics.jsonl.
    for png in ("curves", "val_confusion", "val_predictions", "val_reliability", "test_confusion", "test_mistakes"):
        assert (tmp_path / "media" / f"{png}.png").stat().st_size > 1000, png


def test_two_runs_in_one_process_are_two_wandb_runs(tmp_path):
    train(compose([*RUN, "trainer.epochs=1"]), tmp_path / "a")
    train(compose([*RUN, "trainer.epochs=1"]), tmp_path / "b")
    ids = [by_type(records(tmp_path / d), "run")[0]["run_id"] for d in ("a", "b")]
    assert ids[0] != ids[1]


def test_unreachable_server_falls_back_to_offline_within_the_bound_and_keeps_the_key_out(tmp_path, monkeypatch):
    key = "k3y" * 13 + "x"  # 40 characters, like a real API key
    monkeypatch.setenv("WANDB_API_KEY", key)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    t0 = time.time()
    train(compose([*RUN, "trainer.epochs=1", "logger.mode=online", "logger.init_timeout_s=5"]), tmp_path)
    assert time.time() - t0 < 90
    assert list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    for f in tmp_path.rglob("*"):
        if f.is_file():
            assert key.encode() not in f.read_bytes(), f"API key written to {f}"


def test_decision_boundary_for_2d_data(tmp_path):
    train(compose(["experiment=seed003_mlp_toy", "trainer.epochs=2", "logger.mode=disabled", "hardware=cpu"]), tmp_path)
    assert (tmp_path / "media" / "test_boundary.png").stat().st_size > 1000


def test_a_failed_run_finishes_its_wandb_run_as_failed(tmp_path):
    from vision_train.errors import TrainingError

    with pytest.raises(TrainingError):
        train(compose([*RUN, "optimizer=sgd", "optimizer.lr=1e30", "trainer.log_every_steps=1"]), tmp_path)
    exits = by_type(records(tmp_path), "exit")
    assert exits and exits[0]["exit_code"] != 0


def test_best_and_latest_checkpoints_become_model_artifacts(tmp_path):
    train(compose([*RUN, "trainer.epochs=3", "logger.log_checkpoints=true", "logger.media=false"]), tmp_path)
    arts = by_type(records(tmp_path), "artifact")
    models = [a for a in arts if a.get("type") == "model"]
    aliases = {alias for a in models for alias in a.get("aliases", [])}
    assert {"best", "latest"} <= aliases, arts
