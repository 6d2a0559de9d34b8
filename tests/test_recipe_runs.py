"""The recipes in real runs: RandAugment, colour jitter, random erasing, mixup + CutMix, repeated augmentation,
BCE, LayerScale and drop-path, all on at once, stay exact on resume (stopped twice, killed -9 twice) and give
the same records on 8 devices as on 1; the batch preview shows what the step trains on."""

import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from vision_train import preview
from vision_train.records import read_rows
from vision_train.train import steps
from vision_train.train.loop import train

from .conftest import FAST_COMPILE, REPO
from .helpers import FAST, TINY, Stopped, compose, stop_at
from .test_records import wait_for_step

# Every recipe of the issue at once on the tiny ViT and scikit-learn's digits (8x8x1): 1,257 training images,
# repeated x2 (an epoch of 1,024 positions: 16 steps at batch 64), gradient accumulation and EMA on too.
EVERYTHING = [*TINY["vit"], "model.layer_scale=0.1", "data=digits", "trainer.batch_size=64",
              "data.augment.flip=true", "data.augment.random_resized_crop=true", "data.augment.policy=randaugment",
              "data.augment.num_ops=2", "data.augment.magnitude=9", "data.augment.magnitude_std=0.5",
              "data.augment.color_jitter=0.3", "data.augment.random_erasing=0.25", "data.augment.mixup_alpha=0.8",
              "data.augment.cutmix_alpha=1.0", "data.augment.mix_prob=0.9", "data.repeated_aug=2",
              "trainer.loss=bce", "optimizer.label_smoothing=0.1", "trainer.grad_accum_steps=2",
              "trainer.ema_decay=0.9", "trainer.log_every_steps=3", "trainer.checkpoint_every_steps=5",
              "trainer.keep_checkpoints=20", "trainer.epochs=2"]
TIMING = ("images_per_sec", "perf/")


def records(run_dir):
    return [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in read_rows(run_dir / "metrics.jsonl")]


def close(a: list[dict], b: list[dict], rtol: float):
    assert [sorted(r) for r in a] == [sorted(r) for r in b]
    for ra, rb in zip(a, b):
        for k, v in ra.items():
            if isinstance(v, float):
                assert rb[k] == pytest.approx(v, rel=rtol, abs=1e-6), (ra["step"], k, v, rb[k])
            else:
                assert rb[k] == v, (ra["step"], k)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run = tmp_path_factory.mktemp("everything") / "full"
    before = steps.TRACES["train_step"]
    summary = train(compose([*FAST, *EVERYTHING]), run)
    return run, summary, steps.TRACES["train_step"] - before


@pytest.mark.xdist_group("everything")  # (one worker: the module fixture runs once)
def test_everything_on_trains_once_compiled_and_its_records_say_so(uninterrupted):
    run, summary, traces = uninterrupted
    assert traces == 1, "the train step with every recipe on was traced more than once"
    rows = records(run)
    assert max(r["step"] for r in rows) == 32  # 2 epochs of 16 steps: the repeated order's length
    train_rows = [r for r in rows if "train/loss" in r]
    assert all(np.isfinite(r["train/loss"]) for r in train_rows)
    # BCE over 10 classes on soft targets: about log(2) per class at the start, not softmax CE's log(10)
    assert 0.2 < train_rows[0]["train/loss"] < 0.8
    assert {"test/acc", "test_ema/acc"} <= set(summary)


@pytest.mark.xdist_group("everything")  # (one worker: the module fixture runs once)
def test_everything_on_stopped_twice_resumes_to_the_uninterrupted_records(uninterrupted, tmp_path):
    full, _, _ = uninterrupted
    run = tmp_path / "run"
    for stop in (7, 18):  # between checkpoints (5, 10, 15, 20): each resume replays steps
        with pytest.raises(Stopped):
            train(compose([*FAST, *EVERYTHING]), run, hooks=[stop_at(stop)])
    train(compose([*FAST, *EVERYTHING]), run)
    assert records(run) == records(full)


@pytest.mark.xdist_group("everything")  # (one worker: the module fixture runs once)
def test_everything_on_8_devices_equal_1(uninterrupted, tmp_path):
    full, _, _ = uninterrupted
    train(compose([*FAST, *EVERYTHING, "hardware.num_devices=8"]), tmp_path / "eight")
    # (the all-reduce order differs between 1 and 8 devices: float32 rounding in the sums, nothing else)
    close(records(full), records(tmp_path / "eight"), rtol=2e-4)


def _start(run_dir):
    env = {**os.environ, "PYTHONPATH": REPO, "XLA_FLAGS": FAST_COMPILE}
    return subprocess.Popen([sys.executable, "-m", "vision_train", *FAST, *EVERYTHING, f"hydra.run.dir={run_dir}"],
                            cwd=run_dir.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow  # (three processes that compile RandAugment; the default tier stops and resumes in-process)
@pytest.mark.xdist_group("everything")  # (one worker: the module fixture runs once)
def test_everything_on_killed_9_twice_resumes_to_the_uninterrupted_records(uninterrupted, tmp_path):
    full, _, _ = uninterrupted
    run = tmp_path / "run"
    for at in (7, 18):
        p = _start(run)
        wait_for_step(run, at, p, timeout=600)
        p.send_signal(signal.SIGKILL)
        p.wait()
    p = _start(run)
    out = p.communicate(timeout=600)[0]
    assert p.returncode == 0 and "resumed from" in out and "Traceback" not in out, out[-3000:]
    assert records(run) == records(full)


# ------------------------------------------------------------------------------------------ the preview
@pytest.mark.fast
def test_preview_captions_name_the_label_or_the_mix():
    names = ["cat", "dog", "fox"]
    assert preview.captions(np.array([2, 0]), None, names) == ["fox", "cat"]
    smooth = 0.1 / 3  # label smoothing's floor is taken off: the weights are the mix's
    targets = np.array([[0.7 * 0.9 + smooth, smooth, 0.3 * 0.9 + smooth], [smooth, 0.9 + smooth, smooth]])
    assert preview.captions(np.array([0, 1]), targets, names) == ["0.70 cat + 0.30 fox", "dog"]


def test_preview_shows_the_batch_the_step_trains_on(tmp_path, capsys):
    """The CLI's picture is step 0's batch of the run: the same images (denormalised) the train step gets."""
    overrides = [*FAST, *TINY["cnn"], "data=digits", "trainer.batch_size=32", "data.augment.policy=trivialaugment",
                 "data.augment.cutmix_alpha=1.0"]
    out = tmp_path / "batch.png"
    assert preview.main([*overrides, f"out={out}", "n=16"]) == 0  # (the command line's main, in this process)
    assert f"wrote {out} (16 images of the batch of 32" in capsys.readouterr().out
    from PIL import Image

    assert Image.open(out).size[0] > 400  # a grid of 8 columns of enlarged 8x8 images

    # The same numbers as the step's: the batch function the train step runs, at step 0 with the run's key.
    from vision_train.rng import stream
    from vision_train.train import build

    cfg = compose(overrides)
    hw = build.hardware(cfg.hardware)
    ds, streamed, _ = build.data(cfg.data)
    feed = build.feed(ds, streamed, cfg.data, batch_size=32, seed=cfg.trainer.seed, mesh=hw.mesh,
                      aug=build.augmentation(cfg.data.augment, ds, 32),
                      normalize=build.normalize(ds.scale, ds.mean, ds.std, "float32"))
    rng = jax.random.key_data(stream(np.int32(cfg.trainer.seed), "step"))
    args = feed.train_args(0)
    images, labels, targets = preview.batch_preview(feed, 0, args, rng=rng, mixing=build.mixing(cfg.data.augment),
                                                    num_classes=10, label_smoothing=0.0, n=32)
    x, y, t = jax.jit(steps.make_batch(feed.train_batch, mixing=build.mixing(cfg.data.augment), num_classes=10))(
        rng, np.int32(0), args)
    np.testing.assert_array_equal(labels, np.asarray(y))
    np.testing.assert_allclose(targets, np.asarray(t))
    np.testing.assert_array_equal(images, preview.denormalize(np.asarray(x), feed.normalize))
    assert targets.shape == (32, 10) and np.allclose(targets.sum(1), 1.0)
    # batch mode: one box for the batch; every image has its own label and its mirror's (one label where they agree)
    mixed = np.sort(targets, axis=1)[:, -2] > 0
    assert mixed.any() and np.all(mixed | (labels == labels[::-1]))


@pytest.mark.fast
def test_the_preview_command_line_without_out_prints_its_usage_and_exits_2(capsys):
    assert preview.main(["model=cnn"]) == 2
    assert "usage: python -m vision_train.preview" in capsys.readouterr().err


def test_a_run_logs_its_first_batch_once(tmp_path):
    run = tmp_path / "run"
    train(compose([*TINY["cnn"], "data=digits", "trainer.batch_size=64", "trainer.epochs=1", "hardware=cpu",
                   "trainer.progress_bar=false", "logger.mode=offline", "logger.num_samples=4",
                   "data.augment.mixup_alpha=0.4"]), run)
    assert (run / "media" / "batch_preview.png").exists()
    (wandb_run,) = (run / "wandb").glob("offline-run-*")
    logged = list((wandb_run / "files" / "media" / "images" / "train").glob("batch_preview_*.png"))
    assert len(logged) == 1


@pytest.mark.fast
@pytest.mark.parametrize("override, key, fix", [
    ("data.augment.policy=autoaugment", "data.augment.policy", "none, randaugment, trivialaugment, 3augment"),
    ("data.augment.random_erasing=1.5", "data.augment.random_erasing", "[0, 1]"),
    ("data.augment.mixup_alpha=-1", "data.augment.mixup_alpha", ">= 0"),
    ("data.augment.mix_mode=row", "data.augment.mix_mode", "batch, pair, elem"),
    ("data.repeated_aug=0", "data.repeated_aug", ""),
    ("trainer.loss=focal", "trainer.loss", "ce, bce"),
])
def test_bad_recipe_keys_are_one_line_naming_the_key(override, key, fix):
    from vision_train.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        compose(["model=cnn", override])
    assert key in str(e.value) and fix in str(e.value) and "\n" not in str(e.value)


def test_odd_batches_and_repeats_that_do_not_divide_are_refused_before_compiling(tmp_path):
    from vision_train.errors import ConfigError

    with pytest.raises(ConfigError, match="trainer.batch_size.*even batch size"):
        train(compose([*FAST, *TINY["cnn"], "data=digits", "trainer.batch_size=63", "data.augment.cutmix_alpha=1"]),
              tmp_path / "odd")
    with pytest.raises(ConfigError, match="data.repeated_aug.*must divide trainer.batch_size=64"):
        train(compose([*FAST, *TINY["cnn"], "data=digits", "trainer.batch_size=64", "data.repeated_aug=3"]),
              tmp_path / "repeats")
    assert not any((tmp_path / d / "checkpoints").exists() for d in ("odd", "repeats"))


def test_everything_on_streamed_resumes_to_the_uninterrupted_records(tmp_path):
    """The streamed feed (Grain, here in this process) runs the same recipes inside the same jitted step: a run
    stopped after step 7 and resumed ends with the uninterrupted run's records."""
    job = [*FAST, *EVERYTHING, "trainer.epochs=1", "data.stream=true", "data.workers=0"]
    train(compose(job), tmp_path / "full")
    with pytest.raises(Stopped):
        train(compose(job), tmp_path / "run", hooks=[stop_at(7)])
    train(compose(job), tmp_path / "run")
    full = records(tmp_path / "full")
    assert max(r["step"] for r in full) == 16 and records(tmp_path / "run") == full
