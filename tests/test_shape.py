"""The run's shape, proven by what was built on it: the parameters' moving average (EMA), gradient
accumulation and step-cadence evaluation, each exact on resume and compiled once."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vision_train import checkpoint as ckpt_lib
from vision_train.errors import ConfigError
from vision_train.records import read_rows
from vision_train.train import steps
from vision_train.train.loop import itstime, train

from .helpers import FAST, compose

# 412 training images, batch 32: 12 steps per epoch. No dropout, no augmentation unless a test adds it.
TINY = [*FAST, "model=cnn", "model.features=[8,16]", "model.dense_dim=32", "data=synthetic", "data.num_examples=640",
        "data.image_shape=[8,8,3]", "data.val_size=100", "trainer.batch_size=32", "trainer.log_every_steps=5",
        "trainer.epochs=2", "optimizer.lr=3e-3"]
TIMING = ("images_per_sec", "perf/")  # (key prefixes)


def rows(run_dir):
    return [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in read_rows(run_dir / "metrics.jsonl")]


def params_of(run_dir, key="params"):
    restored = ckpt_lib.load_for_inference(run_dir)
    return [np.asarray(x) for x in jax.tree.leaves(restored[key])]


def test_itstime_runs_each_cadence_and_the_last_step():
    assert [s for s in range(1, 25) if itstime(s, (5, 12), 24)] == [5, 10, 12, 15, 20, 24]
    assert [s for s in range(1, 25) if itstime(s, (0, 0), 24)] == [24]
    assert [s for s in range(1, 25) if itstime(s, (), 24, last=False)] == []


def test_ema_is_evaluated_beside_the_weights_kept_in_checkpoints_and_exact_on_resume(tmp_path):
    ema = [*TINY, "trainer.ema_decay=0.9", "trainer.best_metric=val_ema/acc", "trainer.checkpoint_every_steps=7",
           "trainer.keep_checkpoints=10"]
    before = steps.TRACES["train_step"]
    summary = train(compose(ema), tmp_path / "full")
    assert steps.TRACES["train_step"] - before == 1, "the train step (with the average) was traced more than once"
    full = rows(tmp_path / "full")
    val = [r for r in full if "val/acc" in r]
    assert [r["step"] for r in val] == [12, 24]
    assert all({"val_ema/loss", "val_ema/acc"} <= set(r) for r in val)
    assert {"test_ema/loss", "test_ema/acc", "val_ema/acc", "test/acc"} <= set(summary)
    # The average is not the weights (decay 0.9 over 24 steps) but evaluates close to them.
    assert summary["test_ema/loss"] != summary["test/loss"]
    assert abs(summary["test_ema/acc"] - summary["test/acc"]) < 0.3
    # the best checkpoint is chosen by the average's accuracy
    ckpt = ckpt_lib.Checkpointer(tmp_path / "full" / "checkpoints", best_metric="val_ema/acc", read_only=True)
    best = ckpt.best()
    ckpt.close()
    assert best in (12, 24)
    expected_best = max(val, key=lambda r: r["val_ema/acc"])["step"]
    assert best == expected_best

    # A copy resumed from its step 7 (mid-epoch, between two log steps): the same records, weights, average.
    run = tmp_path / "run"
    shutil.copytree(tmp_path / "full", run)
    summary2 = train(compose([*ema, f"trainer.resume={run / 'checkpoints' / '7'}"]), run)
    assert rows(run) == full
    for key in ("params", "ema"):
        a, b = params_of(tmp_path / "full", key), params_of(run, key)
        assert len(a) == len(b) > 0
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, y) for x, y in zip(params_of(run), params_of(run, "ema")))
    state = ckpt_lib.Checkpointer(run / "checkpoints", best_metric=None, read_only=True)
    meta = state.manager.item_metadata(24)["state"]
    state.close()
    assert meta["state"]["ema"], "the average is not in the checkpoint"
    assert summary2["test_ema/acc"] == summary["test_ema/acc"]


def test_ema_metrics_need_the_average(tmp_path):
    with pytest.raises(ConfigError, match=r"trainer.best_metric='?val_ema/acc'?: needs .* trainer.ema_decay"):
        compose([*TINY, "trainer.best_metric=val_ema/acc"])
    with pytest.raises(ConfigError, match=r"trainer.ema_decay=1.0: must be in \[0, 1\)"):
        compose([*TINY, "trainer.ema_decay=1.0"])


def test_gradient_accumulation_equals_the_whole_batch_and_needs_less_memory(tmp_path):
    """10 steps of 4 micro-batches give the parameters of 10 steps of the whole batch (no dropout); the
    compiled step's temporary memory shrinks with the micro-batch."""
    summaries = {}
    for k in (1, 4):
        summaries[k] = train(compose([*TINY, "trainer.epochs=1", f"trainer.grad_accum_steps={k}",
                                      "trainer.checkpoint_every_steps=10", "trainer.keep_checkpoints=5"]),
                             tmp_path / f"k{k}")
    one = params_of(tmp_path / "k1" / "checkpoints" / "10")
    four = params_of(tmp_path / "k4" / "checkpoints" / "10")
    assert len(one) == len(four)
    for a, b in zip(one, four):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)
    r1 = [r["train/loss"] for r in rows(tmp_path / "k1") if "train/loss" in r]
    r4 = [r["train/loss"] for r in rows(tmp_path / "k4") if "train/loss" in r]
    np.testing.assert_allclose(r1, r4, rtol=1e-4)

    # Memory: a wider model on bigger images, where activations dominate.
    from flax import nnx

    from vision_train import models
    from vision_train.train import state as state_lib

    model = models.create("cnn", (32, 32, 3), 10, rngs=nnx.Rngs(params=0, dropout=1), features=(32, 64), dense_dim=64)
    o = compose(["optimizer=adam"]).optimizer
    tx = state_lib.make_optimizer(o, lr_shape=state_lib.lr_schedule("constant", 1.0, 10, 0, 0.0))
    graphdef, state = state_lib.create(model, tx, seed=0)
    x, y = jnp.zeros((256, 32, 32, 3), jnp.float32), jnp.zeros((256,), jnp.int32)
    temp = {}
    for k in (1, 8):
        update = jax.jit(steps.make_update(graphdef, tx, accum_steps=k))
        analysis = update.lower(state, steps.new_train_sums(), x, y).compile().memory_analysis()
        temp[k] = analysis.temp_size_in_bytes
    assert temp[8] < temp[1] / 3, temp


def test_grad_accum_must_split_the_batch_evenly(tmp_path):
    with pytest.raises(ConfigError, match=r"trainer.grad_accum_steps=3: must divide trainer.batch_size=32"):
        compose([*TINY, "trainer.grad_accum_steps=3"])
    with pytest.raises(ConfigError, match=r"trainer.grad_accum_steps=8: .*4 examples .* 8 devices; use "
                                          r"trainer.grad_accum_steps="):
        train(compose([*TINY, "trainer.grad_accum_steps=8", "hardware.num_devices=8"]), tmp_path / "r")


def test_step_cadence_evaluation_logs_at_its_steps_and_resumes_exactly(tmp_path):
    cadence = [*TINY, "trainer.eval_every_steps=5", "trainer.eval_every_epochs=0", "trainer.checkpoint_every_steps=8",
               "trainer.keep_checkpoints=10"]
    summary = train(compose(cadence), tmp_path / "full")
    full = rows(tmp_path / "full")
    val = [r for r in full if "val/acc" in r]
    assert [r["step"] for r in val] == [5, 10, 15, 20, 24]
    assert [r["epoch"] for r in val] == [5 / 12, 10 / 12, 15 / 12, 20 / 12, 2.0]
    assert summary["best/step"] in (5, 10, 15, 20, 24)
    # the epoch line (log) still closes each epoch, and the last step is evaluated once
    assert len([r for r in full if r["step"] == 24 and "val/acc" in r]) == 1

    run = tmp_path / "run"
    shutil.copytree(tmp_path / "full", run)
    train(compose([*cadence, f"trainer.resume={run / 'checkpoints' / '8'}"]), run)
    assert rows(run) == full
    assert json.loads((run / "summary.json").read_text())["best/val/acc"] == summary["best/val/acc"]
