"""The Python API: vision_train.compose (validated as the command line validates), vision_train.train with the
user's hooks (called at their steps, timed as the built-in ones: not training time), the clocks."""

import time

import jax
import pytest

import vision_train
from vision_train.errors import ConfigError
from vision_train.records import read_rows
from vision_train.train.hooks import Chrono, Hook

from .conftest import run_cli
from .helpers import DIGITS, DIGITS_STEPS_PER_EPOCH, FAST


@pytest.mark.fast
def test_compose_is_the_command_lines_config_validated_the_same_way(tmp_path):
    cfg = vision_train.compose([*FAST, *DIGITS, "trainer.epochs=3"])
    assert (cfg.trainer.epochs, cfg.model.arch, cfg.data.name) == (3, "cnn", "digits")
    with pytest.raises(ConfigError) as e:
        vision_train.compose(["data=digits", "model=mlp", "optimizer.warmup_epochs=5", "trainer.epochs=2"])
    r = run_cli(["data=digits", "model=mlp", "optimizer.warmup_epochs=5", "trainer.epochs=2"], cwd=tmp_path)
    assert r.returncode == 2 and f"error: {e.value}" in r.stdout + r.stderr  # the same line


@pytest.mark.fast
def test_a_hook_is_due_at_its_periods_its_steps_the_last_step_and_when_asked():
    flag = []
    h = Hook("h", every=(5, 7), at=(3,), when=lambda: bool(flag))
    assert [s for s in range(1, 17) if h.due(s, 16)] == [3, 5, 7, 10, 14, 15]  # (not the last, 16)
    assert Hook("h", every=5, last=True).due(12, 12) and not Hook("h", every=0).due(5, 10)
    flag.append(1)
    assert h.due(1, 15)


@pytest.mark.fast
def test_the_clocks_leave_the_hooks_time_out_of_training_time():
    chrono = Chrono(started_at=time.time())
    chrono.epoch_start()
    chrono.images += 100
    with chrono.paused("eval_s"):
        time.sleep(0.3)
    rate = chrono.images_per_sec()
    assert rate > 100 / 0.2 and chrono.totals["eval_s"] >= 0.3  # the 0.3 s were not training
    assert chrono.epoch_seconds() < 0.2
    assert chrono.images_per_sec() is None  # nothing trained since


def test_user_hooks_run_at_their_steps_beside_the_built_in_ones_and_are_not_training_time(tmp_path):
    calls = []

    def probe(step, run, results):
        calls.append((step, int(jax.device_get(run.state.step)), results.val is not None))
        run.tracker.log({"probe/norm": float(step)}, step)
        time.sleep(1.0)

    cfg = vision_train.compose([*FAST, *DIGITS, "trainer.epochs=2", "trainer.log_every_steps=5"])
    summary = vision_train.train(cfg, tmp_path / "run", hooks=[vision_train.Hook("probe", every=10, run=probe)])
    total = 2 * DIGITS_STEPS_PER_EPOCH
    assert [c[:2] for c in calls] == [(s, s) for s in range(10, total + 1, 10)]  # after the step, its state
    assert summary["time/hooks_s"] >= 1.0 * len(calls)
    rows = read_rows(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows if "probe/norm" in r] == [s for s, _, _ in calls]
    # The 5 steps (320 images) after each probe: had its second counted, at most 320 images/s.
    after = [r["images_per_sec"] for r in rows if r["step"] - 5 in {s for s, _, _ in calls} and "images_per_sec" in r]
    assert len(after) == len(calls) and min(after) > 2 * 320, after
