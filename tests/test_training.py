"""The training loop in-process: sharding, determinism, compile-once, NaN handling, full eval coverage."""

import json

import numpy as np
import pytest

from vision_train.errors import ConfigError, TrainingError
from vision_train.train import steps
from vision_train.train.loop import train

from .helpers import FAST, compose

TINY_VIT = ["model=vit", "model.patch_size=2", "model.hidden_size=16", "model.num_layers=1", "model.num_heads=2",
            "model.mlp_dim=32", "model.dropout=0.1", "model.stochastic_depth=0.1"]
SMALL_DATA = ["data=synthetic", "data.num_examples=640", "data.image_shape=[8,8,3]", "data.val_size=100",
              "data.augment.flip=true", "data.augment.random_resized_crop=true"]


def run(tmp_path, name, overrides, model=TINY_VIT):
    cfg = compose([*FAST, *SMALL_DATA, *model, "trainer.batch_size=64", "trainer.epochs=2",
                   "trainer.log_every_steps=2", *overrides])
    summary = train(cfg, tmp_path / name)
    rows = [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")]
    return summary, rows


def curve(rows, key):
    return [(r["step"], r[key]) for r in rows if key in r]


def test_sharded_over_8_devices_equals_single_device(tmp_path):
    _, one = run(tmp_path, "one", ["hardware.num_devices=1"])
    _, eight = run(tmp_path, "eight", ["hardware.num_devices=8"])
    for key in ("train/loss", "train/acc", "val/loss", "val/acc", "test/loss", "test/acc"):
        a, b = curve(one, key), curve(eight, key)
        assert [s for s, _ in a] == [s for s, _ in b] and len(a) > 0
        np.testing.assert_allclose([v for _, v in a], [v for _, v in b], rtol=2e-4, atol=2e-4, err_msg=key)


def test_same_seed_same_losses_bit_for_bit_and_other_seed_differs(tmp_path):
    _, a = run(tmp_path, "a", ["hardware.num_devices=2"])
    _, b = run(tmp_path, "b", ["hardware.num_devices=2"])
    _, c = run(tmp_path, "c", ["hardware.num_devices=2", "trainer.seed=7"])
    drop = lambda rows: [{k: v for k, v in r.items() if k != "images_per_sec"} for r in rows]  # noqa: E731
    assert drop(a) == drop(b)
    assert curve(a, "train/loss") != curve(c, "train/loss")


def test_train_step_compiles_once_per_run(tmp_path):
    before = steps.TRACES["train_step"]
    summary, rows = run(tmp_path, "r", ["trainer.epochs=3"])
    assert steps.TRACES["train_step"] - before == 1, "the train step was retraced during the run"
    assert summary["step"] == 3 * ((int(0.8 * 640) - 100) // 64)  # 412 training examples, last partial batch dropped
    assert curve(rows, "epoch")[-1][1] == 3.0


def test_eval_and_test_count_every_example_once(tmp_path):
    # 100 val and 128 test examples with batch 48: both end in a partial batch.
    summary, rows = run(tmp_path, "r", ["trainer.batch_size=48", "data.num_examples=640", "data.test_fraction=0.2"])
    test = [r for r in rows if "test/acc" in r][0]
    assert round(test["test/acc"] * 128) == pytest.approx(test["test/acc"] * 128, abs=1e-6)
    val = [r for r in rows if "val/acc" in r]
    assert all(round(r["val/acc"] * 100) == pytest.approx(r["val/acc"] * 100, abs=1e-6) for r in val)
    assert summary["images_seen"] == summary["step"] * 48


def test_training_learns(tmp_path):
    summary, rows = run(tmp_path, "r", ["trainer.epochs=4", "optimizer.lr=3e-3"],
                        model=["model=cnn", "model.features=[8,16]", "model.dense_dim=32"])
    losses = [v for _, v in curve(rows, "train/loss")]
    assert losses[-1] < 0.9 * losses[0]
    assert summary["test/acc"] > 0.3  # 10 classes: chance is 0.1


def test_nan_loss_stops_naming_the_step_and_keeps_the_log(tmp_path):
    with pytest.raises(TrainingError, match=r"loss became NaN/inf at step \d+ \(epoch 1\)"):
        run(tmp_path, "r", ["optimizer=sgd", "optimizer.lr=1e30", "optimizer.schedule=constant"])
    assert (tmp_path / "r" / "metrics.jsonl").exists()


def test_batch_not_divisible_by_devices_is_refused_with_the_fix(tmp_path):
    with pytest.raises(ConfigError, match=r"trainer.batch_size=60: .* 8 devices; use trainer.batch_size=64 or 56"):
        run(tmp_path, "r", ["hardware.num_devices=8", "trainer.batch_size=60"])


def test_more_classes_in_data_than_head_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"model.num_classes=5: synthetic has 10 classes"):
        run(tmp_path, "r", ["model.num_classes=5"])
