"""A run's fate, decided once before anything is written: new, resume, branch, finished, or refused; and the
objective a sweep ranks by, which is never a test metric unless the user names one."""

import json
import os

import pytest
import yaml

from tests.conftest import run_cli
from tests.helpers import DIGITS, DIGITS_STEPS_PER_EPOCH, FAST, compose
from vision_train import config as config_lib
from vision_train import fate as fate_lib
from vision_train import sweep

def _config(**trainer) -> dict:
    cfg = config_lib.to_dict(compose([*FAST, *DIGITS, "trainer.epochs=2"]))
    cfg["trainer"].update(trainer)
    return cfg


def _run(path, config: dict, steps=(), summary=None):
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    for s in steps:
        (path / "checkpoints" / str(s)).mkdir(parents=True)
    (path / "checkpoints" / "7.orbax-checkpoint-tmp-3").mkdir(parents=True)  # a save cut short: not a step
    if summary is not None:
        (path / "summary.json").write_text(json.dumps(summary))
    return path


@pytest.mark.fast
def test_the_fate_of_a_run_directory(tmp_path):
    cfg = _config()
    assert fate_lib.decide(cfg, "auto", tmp_path / "empty").kind == "new"
    stopped = _run(tmp_path / "stopped", cfg, steps=(5, 10))
    fate = fate_lib.decide(cfg, "auto", stopped)
    assert (fate.kind, fate.source, fate.step) == ("resume", stopped / "checkpoints", None)
    done = _run(tmp_path / "done", cfg, steps=(38,), summary={"test/acc": 0.5})
    fate = fate_lib.decide(cfg, "auto", done)
    assert fate.kind == "finished" and fate.summary == {"test/acc": 0.5}
    # an earlier step of this run: resumed from there (the later steps are set aside when it starts)
    fate = fate_lib.decide(cfg, str(done / "checkpoints" / "38"), done)
    assert (fate.kind, fate.step) == ("resume", 38)
    # another run's checkpoint into an empty directory: a branch, whatever its config
    fate = fate_lib.decide(_config(epochs=3, ema_decay=0.9), str(done), tmp_path / "branch")
    assert (fate.kind, fate.source, fate.step) == ("branch", done / "checkpoints", None)
    # the branch's own command again, once the branch has checkpoints of its own: it resumes itself
    branch = _run(tmp_path / "branch", _config(epochs=3, ema_decay=0.9), steps=(40,))
    fate = fate_lib.decide(_config(epochs=3, ema_decay=0.9), str(done), branch)
    assert (fate.kind, fate.source) == ("resume", branch / "checkpoints")
    fate = fate_lib.decide(_config(epochs=3), "never", done)
    assert fate.kind == "new" and fate.start_over


@pytest.mark.parametrize("key, value", [("trainer.epochs", 3), ("trainer.seed", 1), ("trainer.ema_decay", 0.99),
                                        ("trainer.grad_accum_steps", 2), ("optimizer.schedule", "cosine"),
                                        ("optimizer.lr", 0.01), ("model.dense_dim", 64), ("data.val_size", 10),
                                        ("trainer.batch_size", 32)])
@pytest.mark.fast
def test_a_run_that_computed_something_else_is_refused_naming_the_keys_and_the_ways_forward(tmp_path, key, value):
    cfg = _config()
    changed = json.loads(json.dumps(cfg))
    group, name = key.split(".")
    changed[group][name] = value
    for state, kw in (("a finished run", {"summary": {"test/acc": 0.5}}), ("a run stopped at step 10", {})):
        run = _run(tmp_path / state.replace(" ", "_"), cfg, steps=(5, 10), **kw)
        with pytest.raises(fate_lib.Refused) as e:
            fate_lib.decide(changed, "auto", run)
        line = str(e.value)
        assert "\n" not in line and e.value.keys == [key]
        assert f"{run} holds {state}" in line and f"{key}: {cfg[group][name]!r} -> {value!r}" in line
        assert "hydra.run.dir=<new dir>" in line and f"trainer.resume={run} hydra.run.dir=<new dir>" in line
        with pytest.raises(fate_lib.Refused, match=r"hydra.sweep.dir=<new dir>"):
            fate_lib.decide(changed, "auto", run, sweep=True)


@pytest.mark.fast
def test_keys_that_change_only_how_a_run_is_watched_or_laid_out_may_differ(tmp_path):
    cfg = _config()
    run = _run(tmp_path / "run", cfg, steps=(10,), summary={"test/acc": 0.5})
    watched = json.loads(json.dumps(cfg))
    watched["logger"].update(mode="online", project="other", tags=["x"])
    watched["trainer"].update(progress_bar=True, log_every_steps=1, eval_every_steps=3, keep_checkpoints=9,
                              checkpoint_every_steps=4, objective="test/acc", profile_steps=[1, 2])
    watched["hardware"].update(num_devices=1, compilation_cache=None, platform="cpu")
    watched["data"].update(workers=0, prefetch=1)
    assert fate_lib.differences(cfg, watched) == []
    assert fate_lib.decide(watched, "auto", run).kind == "finished"
    # a key an earlier version did not write counts as its default
    older = json.loads(json.dumps(cfg))
    del older["optimizer"]["layer_decay"], older["data"]["augment"]["pad_crop"]
    assert fate_lib.differences(older, cfg) == []
    cfg["optimizer"]["layer_decay"] = 0.7
    assert fate_lib.differences(older, cfg) == ["optimizer.layer_decay"]


@pytest.mark.fast
def test_the_python_api_refuses_before_anything_is_built_and_changes_no_file(tmp_path):
    from vision_train.train.loop import train

    run = _run(tmp_path / "run", _config(epochs=2), steps=(38,), summary={"test/acc": 0.5})
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(fate_lib.Refused, match="trainer.epochs: 2 -> 3"):
        train(compose([*FAST, *DIGITS, "trainer.epochs=3"]), run)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    assert train(compose([*FAST, *DIGITS, "trainer.epochs=2"]), run) == {"test/acc": 0.5}  # finished: its summary


@pytest.mark.fast
def test_a_busy_single_run_directory_names_hydra_run_dir(tmp_path):
    sweep.write_record(tmp_path, status="running", host=os.uname().nodename, pid=os.getppid())
    with pytest.raises(sweep.JobConflict, match="use another hydra.run.dir$"):
        sweep.check_not_running(tmp_path)
    with pytest.raises(sweep.JobConflict, match="use another hydra.sweep.dir$"):
        sweep.check_not_running(tmp_path, sweep=True)


# ------------------------------------------------------------------------------------ the objective
def _folder(root, val: bool):
    from tests.imagefiles import write_image_folder

    counts = {"train": 2, "val": 1, "test": 1} if val else {"train": 2, "test": 1}
    write_image_folder(root, classes=("a", "b"), per_class=counts, size=(8, 8))
    return root


@pytest.mark.fast
def test_auto_objective_is_validation_with_any_validation_split_and_never_a_test_metric(tmp_path):
    resolved = lambda *o: compose([*FAST, *DIGITS, *o]).trainer  # noqa: E731
    assert resolved().objective == "best/val/acc"  # digits: data.val_size holds out a validation split
    t = resolved("data.val_size=0")
    assert (t.objective, t.best_metric) == ("none", None)
    assert resolved("data.val_size=0", "trainer.objective=test/acc").objective == "test/acc"  # named: as asked
    for val in (True, False):  # an image folder's val/ folder is a validation split
        root = _folder(tmp_path / f"pets{val}", val)
        t = compose([*FAST, *DIGITS[:-2], "data=image_folder", f"data.root={root}", "data.image_size=8",
                     "trainer.batch_size=2"]).trainer
        assert (t.objective, t.best_metric) == (("best/val/acc", "val/acc") if val else ("none", None))
    hf = compose([*FAST, *DIGITS[:-2], "data=hf", "data.name=some/set", "data.image_size=8"])
    assert (hf.trainer.objective, hf.trainer.best_metric) == ("auto", "auto")  # its splits are known once opened
    opened = config_lib.with_data(hf, has_val=True)
    assert (opened.trainer.objective, opened.trainer.best_metric, opened.trainer.best_mode) == \
        ("best/val/acc", "val/acc", "max")
    assert hf.trainer.objective == "auto"  # (a copy: the given config is frozen)
    assert config_lib.with_data(hf, has_val=False).trainer.objective == "none"


@pytest.mark.fast
def test_the_objective_line_says_when_there_is_none_and_when_a_test_metric_was_named():
    none = config_lib.objective_line(compose([*FAST, *DIGITS, "data.val_size=0"]))
    assert "no validation split" in none and "data.val_size" in none and "\n" not in none
    named = config_lib.objective_line(compose([*FAST, *DIGITS, "data.val_size=0", "trainer.objective=test/acc"]))
    assert "trainer.objective=test/acc" in named and "test split" in named
    assert config_lib.objective_line(compose([*FAST, *DIGITS])) is None


@pytest.mark.fast
def test_jobs_without_an_objective_are_never_ranked(tmp_path):
    for name, value, objective in (("a", 0.9, "none"), ("b", None, "none")):
        sweep.write_record(tmp_path / name, status="finished", objective=objective, value=value,
                           overrides=[f"x={name}"])
    assert sweep.best_row(sweep.collect(tmp_path)) is None
    _, md = sweep.write_summary(tmp_path)
    assert "Best:" not in md


# ------------------------------------------------------------------------------------ the command line
def test_a_finished_run_rerun_with_another_config_is_refused_and_no_file_changes_then_branches(tmp_path):
    """The finished 2-epoch cosine run re-run with trainer.epochs=3 (it used to resume at its last step, follow
    a new schedule, and overwrite the summary, checkpoints and .hydra/) or another seed: refused in one line,
    every file of the run as it was, .hydra/ and train.log included. Branching from it into a new directory
    with the moving average newly on starts the average at the restored weights and trains on."""
    run_dir = tmp_path / "run"
    cmd = [*FAST[1:], *DIGITS, "optimizer.schedule=cosine", "logger.mode=offline", f"hydra.run.dir={run_dir}"]
    r = run_cli([*cmd, "trainer.epochs=2"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]

    def snapshot():
        return {str(p.relative_to(run_dir)): (p.read_bytes(), p.stat().st_mtime_ns)
                for p in sorted(run_dir.rglob("*")) if p.is_file()}

    before = snapshot()
    assert {".hydra/config.yaml", ".hydra/overrides.yaml", "train.log", "job.json", "summary.json"} <= set(before)
    for change, key in (("trainer.epochs=3", "trainer.epochs: 2 -> 3"), ("trainer.seed=7", "trainer.seed: 42 -> 7")):
        r = run_cli([*cmd, "trainer.epochs=2", change] if "epochs" not in change else [*cmd, change], cwd=tmp_path)
        out = [line for line in (r.stdout + r.stderr).splitlines() if line.strip()]
        assert r.returncode == 2 and len(out) == 1, out
        assert key in out[0] and f"trainer.resume={run_dir} hydra.run.dir=<new dir>" in out[0]
        assert snapshot() == before
    r = run_cli([*cmd, "trainer.epochs=2", "logger.mode=disabled", "trainer.log_every_steps=3"], cwd=tmp_path)
    assert r.returncode == 0 and "finished at" in r.stdout + r.stderr and snapshot() == before  # watched only

    branch = tmp_path / "branch"
    r = run_cli([*cmd[:-1], "trainer.epochs=3", "trainer.ema_decay=0.9", f"trainer.resume={run_dir}",
                 f"hydra.run.dir={branch}"], cwd=tmp_path)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "Traceback" not in r.stdout + r.stderr
    assert "moving average" in r.stdout + r.stderr and snapshot() == before
    summary = json.loads((branch / "summary.json").read_text())
    assert summary["step"] == 3 * DIGITS_STEPS_PER_EPOCH and "test_ema/acc" in summary
    rows = [json.loads(line) for line in (branch / "metrics.jsonl").read_text().splitlines()]
    assert min(r["step"] for r in rows) > 2 * DIGITS_STEPS_PER_EPOCH  # it went on from the parent's last step


def test_a_refused_override_leaves_no_folder_behind(tmp_path):
    r = run_cli(["data=digits", "model=mlp", "optimizer.lr=-1"], cwd=tmp_path)
    assert r.returncode == 2 and "optimizer.lr" in r.stdout + r.stderr
    assert not (tmp_path / "outputs").exists()


@pytest.mark.fast
def test_a_run_of_an_earlier_version_on_a_gray_built_in_set_still_resumes(tmp_path):
    """Earlier versions wrote data.channels: 3 (the default) for digits and trained on its stored 1 channel:
    the checkpoint's own data facts say what was computed."""
    cfg = _config()
    assert cfg["data"]["channels"] == 1
    old = json.loads(json.dumps(cfg))
    old["data"]["channels"] = 3
    run = _run(tmp_path / "run", old, steps=(10,))
    with pytest.raises(fate_lib.Refused, match="data.channels: 3 -> 1"):  # (no data facts to go by)
        fate_lib.decide(cfg, "auto", run)
    (run / "checkpoints" / "10" / "meta").mkdir()
    (run / "checkpoints" / "10" / "meta" / "metadata").write_text(json.dumps({"data": {"shape": [8, 8, 1]}}))
    assert fate_lib.decide(cfg, "auto", run).kind == "resume"
    rgb = json.loads(json.dumps(cfg))
    rgb["data"]["channels"] = 3
    with pytest.raises(fate_lib.Refused, match="data.channels: 1 -> 3"):  # what it trained on differs
        fate_lib.decide(rgb, "auto", _run(tmp_path / "new", cfg, steps=(10,)))
