"""Run records stay exact: metrics.jsonl after any sequence of kill -9, SIGTERM and re-runs equals an
uninterrupted run's, row for row; re-runs and restarts never overwrite what a run wrote."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from vision_train import checkpoint as ckpt_lib
from vision_train.records import read_rows
from vision_train.train.loop import train

from .conftest import FAST_COMPILE, REPO
from .helpers import DIGITS, DIGITS_STEPS_PER_EPOCH, FAST, KILLABLE, compose
from .test_tracking import by_type
from .test_tracking import records as wandb_records

# 700 training images, batch 32: 21 steps/epoch, 42 steps; checkpoints every 10 steps and every epoch. Media
# on: the media thread runs beside the loop (it used to log per-class accuracy and ECE itself).
JOB = [*KILLABLE, "data.augment.flip=true", "trainer.epochs=2", "trainer.keep_checkpoints=20", "hardware=cpu",
       "logger.mode=disabled", "logger.num_samples=4", "trainer.progress_bar=false"]
TIMING = ("images_per_sec", "perf/")  # wall-clock values (key prefixes): the only ones that may differ between two runs


def start(run_dir, extra=()):
    env = {**os.environ, "PYTHONPATH": REPO, "XLA_FLAGS": FAST_COMPILE}
    return subprocess.Popen([sys.executable, "-m", "vision_train", *JOB, *extra, f"hydra.run.dir={run_dir}"],
                            cwd=run_dir.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_step(run_dir, step, proc, timeout=240):
    t0 = time.time()
    while time.time() - t0 < timeout:
        steps = [r["step"] for r in read_rows(run_dir / "metrics.jsonl")]
        if steps and max(steps) >= step:
            return max(steps)
        assert proc.poll() is None, proc.stdout.read()[-2000:]
        time.sleep(0.01)
    raise TimeoutError


def finish(proc, what=""):
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, f"{what}: {out[-3000:]}"
    assert "Traceback" not in out, out[-3000:]
    return out


def records(run_dir):
    return [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in read_rows(run_dir / "metrics.jsonl")]


def test_metrics_after_kills_sigterm_torn_line_and_reruns_equal_an_uninterrupted_run(tmp_path):
    full, run = tmp_path / "full", tmp_path / "run"
    finish(start(full), "uninterrupted")
    expected = records(full)
    # Scalars never depend on media: every evaluation row holds ECE and every class's accuracy.
    evals = [r for r in expected if "val/loss" in r]
    assert [r["step"] for r in evals] == [21, 42]
    for r in evals + [r for r in expected if "test/loss" in r]:
        split = "val" if "val/loss" in r else "test"
        assert f"{split}/ece" in r and sum(k.startswith(f"{split}/class_acc/") for k in r) == 10, r

    p = start(run)
    wait_for_step(run, 13, p)  # past the step-10 checkpoint
    p.send_signal(signal.SIGKILL)
    p.wait()
    p = start(run)
    at = wait_for_step(run, 24, p)  # past the epoch-1 evaluation and checkpoint
    p.send_signal(signal.SIGTERM)
    out = p.communicate(timeout=120)[0]
    assert p.returncode == 143 and "checkpoint saved at step" in out, (at, out[-2000:])
    p = start(run)
    wait_for_step(run, 34, p)
    p.send_signal(signal.SIGKILL)
    p.wait()
    with open(run / "metrics.jsonl", "a") as f:  # a write torn by the crash
        f.write('{"step": 35, "train/lo')
    out = finish(start(run), "resume after the torn line")
    assert "resumed from" in out
    assert records(run) == expected  # each (step, key) once, the uninterrupted run's values, its order

    # Re-running the finished run's command changes nothing and says so.
    before = {p: p.read_bytes() for p in (run / "metrics.jsonl", run / "summary.json")}
    out = finish(start(run), "re-run of a finished run")
    assert "finished" in out
    assert {p: p.read_bytes() for p in before} == before


def test_two_identical_runs_write_identical_records(tmp_path):
    # log every 7 steps and at each epoch's end (19 steps), evaluate at each epoch's end and every 10 steps: both at
    # steps 19, 38, 57, 70 and 76, an evaluation alone at 10, 20, ..., 60, a log alone at 7, 14, ...
    job = [*FAST, *DIGITS, "trainer.epochs=4", "trainer.log_every_steps=7", "trainer.eval_every_steps=10",
           "logger.media=true", "logger.num_samples=4"]
    train(compose(job), tmp_path / "a")
    train(compose(job), tmp_path / "b")
    a, b = records(tmp_path / "a"), records(tmp_path / "b")
    assert a == b and [list(r) for r in a] == [list(r) for r in b]
    val_steps = [r["step"] for r in a if "val/ece" in r]
    assert val_steps == [10, 19, 20, 30, 38, 40, 50, 57, 60, 70, 76]
    # each (step, key) once across all rows (`epoch` was in both the train and the val row at each epoch's end)
    seen = set()
    for r in read_rows(tmp_path / "a" / "metrics.jsonl"):
        pairs = {(r["step"], k) for k in r if k != "step"}
        assert not pairs & seen, sorted(pairs & seen)
        seen |= pairs
    # every evaluation row carries the epoch (W&B's epoch x-axis plots a metric only from rows that hold both)
    assert all(r["epoch"] == r["step"] / DIGITS_STEPS_PER_EPOCH for r in a if "val/acc" in r)


TINY = [*FAST, *DIGITS, "trainer.keep_checkpoints=10", "trainer.log_every_steps=5"]


def test_resume_from_an_earlier_step_replaces_only_what_came_after(tmp_path):
    run = tmp_path / "run"
    train(compose([*TINY, "trainer.epochs=3"]), run)
    expected = records(run)
    ckpts = run / "checkpoints"
    steps = sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
    assert len(steps) == 3
    first = steps[0]
    summary = train(compose([*TINY, "trainer.epochs=3", f"trainer.resume={ckpts / str(first)}"]), run)
    assert summary["step"] == steps[-1]
    assert records(run) == expected  # same config: the same continuation, each row once
    (aside,) = (run / "earlier").iterdir()  # the later checkpoints and the old records, set aside
    assert sorted(int(p.name) for p in (aside / "checkpoints").iterdir()) == steps[1:]
    assert (aside / "summary.json").exists() and records(aside) == expected
    assert sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) == steps


def test_resume_never_sets_the_earlier_run_aside_and_overwrites_nothing(tmp_path):
    run = tmp_path / "run"
    train(compose([*TINY, "trainer.epochs=1", "logger.media=true", "logger.num_samples=4"]), run)
    names = ("metrics.jsonl", "summary.json", "config.yaml", "media/val_confusion.png")
    before = {n: (run / n).read_bytes() for n in names}
    summary = train(compose([*TINY, "trainer.epochs=2", "trainer.resume=never"]), run)
    assert summary["step"] == 2 * DIGITS_STEPS_PER_EPOCH
    (aside,) = (run / "earlier").iterdir()
    assert {n: (aside / n).read_bytes() for n in names} == before  # every earlier file, untouched
    assert ckpt_lib.Checkpointer(aside / "checkpoints", best_metric=None, read_only=True).steps() == [DIGITS_STEPS_PER_EPOCH]
    assert records(run)[-1]["step"] == 2 * DIGITS_STEPS_PER_EPOCH and records(run)[0]["step"] == 5  # a fresh record


@pytest.mark.slow  # (19 s)
def test_another_runs_checkpoint_starts_a_new_wandb_run_that_names_its_parent(tmp_path):
    offline = [o for o in TINY if not o.startswith("logger.mode")] + ["logger.mode=offline", "logger.media=false"]
    train(compose([*offline, "trainer.epochs=1"]), tmp_path / "a")
    parent_id = by_type(wandb_records(tmp_path / "a"), "run")[0]["run_id"]
    train(compose([*offline, "trainer.epochs=2", f"trainer.resume={tmp_path / 'a'}"]), tmp_path / "b")
    run = by_type(wandb_records(tmp_path / "b"), "run")[0]
    assert run["run_id"] != parent_id
    config = json.dumps(run["config"])
    assert parent_id in config and str(tmp_path / "a" / "checkpoints") in config


def test_each_checkpoint_records_the_loop_state_of_its_own_step(tmp_path):
    """The save is asynchronous; the loop's sums it records are those of its step, not a later one's."""
    run = tmp_path / "run"
    train(compose([*TINY, "trainer.epochs=2", "trainer.checkpoint_every_steps=3", "trainer.keep_checkpoints=20"]), run)
    reader = ckpt_lib.Checkpointer(run / "checkpoints", best_metric=None, read_only=True)
    per_epoch = DIGITS_STEPS_PER_EPOCH
    logged = records(run)
    fetches = {s for s in range(1, 2 * per_epoch + 1) if s % 5 == 0 or s % per_epoch == 0}  # the loop's log steps
    assert len(reader.steps()) > 8
    for step in reader.steps():
        loop = reader.read_meta(step)["loop"]
        epoch_start = (step - 1) // per_epoch * per_epoch
        # the epoch's sums cover its steps up to the last fetch at or before this step
        fetched = max([s for s in fetches if epoch_start < s <= step], default=epoch_start) - epoch_start
        assert loop["epoch_sums"]["count"] == pytest.approx(fetched * 64), step
        # the rows logged before it was saved (the test set's row, at the last step, comes after the save)
        assert loop["rows"] == sum(1 for r in logged if r["step"] <= step and "test/loss" not in r), step
    reader.close()


@pytest.mark.slow
def test_records_exact_after_kill_9_at_many_points(tmp_path):
    """One run directory killed (-9) at eight points spread over the run, evaluations and checkpoints
    included, re-run after each: its records equal the uninterrupted run's."""
    full, run = tmp_path / "full", tmp_path / "run"
    finish(start(full), "uninterrupted")
    for point in (4, 10, 17, 21, 22, 30, 38, 42):
        p = start(run)
        try:
            wait_for_step(run, point, p)
        except AssertionError:  # it finished before the point was seen
            break
        p.send_signal(signal.SIGKILL)
        p.wait()
    finish(start(run), "final re-run")
    assert records(run) == records(full)
