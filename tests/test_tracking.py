"""What reaches W&B, read back from the offline run's own records, and the local mirror beside it."""

import json
import subprocess
import sys
import time

import pytest

from vision_train.errors import ConfigError
from vision_train.train.loop import train

from .conftest import run_cli
from .helpers import Stopped, compose, stop_at


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


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory):
    """The offline run RUN (2 epochs), in this process: (its directory, its summary)."""
    run_dir = tmp_path_factory.mktemp("offline")
    with pytest.MonkeyPatch.context() as mp:  # (as conftest's _no_home_writes does for each test)
        mp.setenv("HOME", str(run_dir / "home"))
        for var in ("WANDB_API_KEY", "WANDB_SERVICE"):
            mp.delenv(var, raising=False)
        return run_dir, train(compose(RUN), run_dir / "run")


@pytest.mark.xdist_group("offline_run")  # (one worker: the module fixture runs once)
def test_offline_run_holds_curves_media_summary_and_equals_the_local_mirror(offline_run):
    run_dir, summary = offline_run
    tmp_path = run_dir / "run"
    recs = records(tmp_path)
    history = {}  # our x-axis "step" -> everything logged for it (W&B's own _step counts log calls)
    for h in by_type(recs, "history"):
        own = {k for k in h["item"] if k != "step" and not k.startswith("_")} & set(history.get(h["item"]["step"], {}))
        assert not own, (h["item"]["step"], own)  # each (step, key) once in W&B too (epoch was twice at epoch ends)
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
    # The memory per device, known once the step has compiled: in the summary and added to the config.
    added = {}
    for c in by_type(recs, "config"):
        added.update(c.get("update", {}))
    for key in ("memory/param_bytes_per_device", "memory/opt_state_bytes_per_device"):
        assert summary[key] > 0 and final[key] == summary[key] and added[key] == summary[key], key
    assert by_type(recs, "exit")[0]["exit_code"] == 0
    # The local mirror: PNGs beside metrics.jsonl.
    for png in ("curves", "val_confusion", "val_predictions", "val_reliability", "test_confusion", "test_mistakes"):
        assert (tmp_path / "media" / f"{png}.png").stat().st_size > 1000, png


@pytest.mark.xdist_group("offline_run")  # (one worker: the module fixture runs once)
def test_two_runs_in_one_process_are_two_wandb_runs(tmp_path, offline_run):
    # offline_run ran earlier in this process (module-scoped: the same worker); this is the second run
    train(compose([*RUN, "trainer.epochs=1"]), tmp_path / "b")
    ids = [by_type(records(d), "run")[0]["run_id"] for d in (offline_run[0] / "run", tmp_path / "b")]
    assert ids[0] != ids[1]


def test_unreachable_server_falls_back_to_offline_within_the_bound_and_keeps_the_key_out(tmp_path, monkeypatch):
    key = "k3y" * 13 + "x"  # 40 characters, like a real API key
    monkeypatch.setenv("WANDB_API_KEY", key)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    t0 = time.time()
    train(compose([*RUN, "trainer.epochs=1", "logger.mode=online", "logger.init_timeout_s=3"]), tmp_path)
    assert time.time() - t0 < 90
    assert list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    for f in tmp_path.rglob("*"):
        if f.is_file():
            assert key.encode() not in f.read_bytes(), f"API key written to {f}"


def test_an_offline_run_says_only_its_own_line_and_an_empty_wandb_mode_is_unset(tmp_path):
    """matplotlib's font-cache notes and W&B's own offline hints were printed (and went to train.log) beside
    the run's own line about its offline W&B run; WANDB_MODE= (empty) died in a 40-line W&B settings traceback."""
    fonts = tmp_path / "mpl"  # a fresh matplotlib cache: the font cache is built during this run
    r = run_cli(["data=toy", "model=mlp", "trainer.epochs=1", "trainer.progress_bar=false", "hardware=cpu",
                 "logger.mode=offline", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, timeout=300,
                env={"WANDB_MODE": "", "WANDB_SILENT": "false", "MPLCONFIGDIR": str(fonts)})
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "Traceback" not in out, out[-3000:]
    assert list(fonts.glob("fontlist-*.json")), "matplotlib built no font cache here: the test checks nothing"
    assert "W&B run saved offline; upload it with: wandb sync" in out, out  # the run's own line
    for said in (out, (tmp_path / "run" / "train.log").read_text()):
        assert "fontManager" not in said and "building the font cache" not in said, said
        assert not [line for line in said.splitlines() if line.startswith("wandb:")], said  # W&B's own hints
        assert "W&B syncing is set to" not in said and "wandb leet" not in said, said


@pytest.mark.parametrize("value", ["bogus", "OFFLINE"])
def test_a_wandb_mode_w_and_b_would_refuse_is_one_line_naming_it(tmp_path, monkeypatch, value):
    monkeypatch.setenv("WANDB_MODE", value)
    with pytest.raises(ConfigError) as e:
        train(compose([*RUN, "trainer.epochs=1", "logger.media=false"]), tmp_path)
    assert e.value.key == "WANDB_MODE" and "online, offline" in str(e.value) and "\n" not in str(e.value)


def test_decision_boundary_for_2d_data(tmp_path):
    train(compose(["experiment=seed003_mlp_toy", "trainer.epochs=2", "logger.mode=disabled", "hardware=cpu"]), tmp_path)
    assert (tmp_path / "media" / "test_boundary.png").stat().st_size > 1000


def test_a_failed_run_finishes_its_wandb_run_as_failed(tmp_path):
    from vision_train.errors import TrainingError

    with pytest.raises(TrainingError, match=r"loss became NaN/inf at step 2 \(epoch 1\)"):
        train(compose([*RUN, "optimizer=sgd", "optimizer.lr=1e30", "trainer.log_every_steps=1"]), tmp_path)
    assert (tmp_path / "metrics.jsonl").read_text().count("train/loss") >= 1  # the log up to the NaN is kept
    exits = by_type(records(tmp_path), "exit")
    assert exits and exits[0]["exit_code"] != 0


def test_best_and_latest_checkpoints_become_model_artifacts(tmp_path):
    train(compose([*RUN, "trainer.epochs=3", "logger.log_checkpoints=true", "logger.media=false"]), tmp_path)
    arts = by_type(records(tmp_path), "artifact")
    models = [a for a in arts if a.get("type") == "model"]
    aliases = {alias for a in models for alias in a.get("aliases", [])}
    assert {"best", "latest"} <= aliases, arts


def checkpoint_meta(run_dir, step=None):
    """A checkpoint's JSON metadata (the latest one's by default) and the file that holds it."""
    from vision_train.checkpoint import Checkpointer

    ckpt = Checkpointer(run_dir / "checkpoints", best_metric=None, read_only=True)
    step = ckpt.latest() if step is None else step
    (path,) = (run_dir / "checkpoints" / str(step) / "meta").glob("metadata*")
    return step, ckpt.read_meta(step), path


def test_a_checkpoint_with_the_old_wandb_keys_resumes_the_same_wandb_run(tmp_path):
    """Checkpoints written before the sinks had their own metadata key held W&B's run id and history
    counter as ``wandb_run_id``/``wandb_step``: resuming one continues that W&B run, and the checkpoints
    written from then on hold the sinks' form."""
    with pytest.raises(Stopped):  # (after its step-19 checkpoint: a run to resume)
        train(compose([*RUN, "trainer.epochs=2", "logger.media=false"]), tmp_path, hooks=[stop_at(19)])
    (first,) = by_type(records(tmp_path), "run")
    assert first["job_type"] == "train"
    step, meta, path = checkpoint_meta(tmp_path)
    wandb_state = meta.pop("sinks")["wandb"]
    assert wandb_state["run_id"] == first["run_id"] and "wandb_run_id" not in meta
    meta.update(wandb_run_id=wandb_state["run_id"], wandb_step=wandb_state["step"])  # the old form
    path.write_text(json.dumps(meta))

    train(compose([*RUN, "trainer.epochs=2", "logger.media=false"]), tmp_path)
    recs = records(tmp_path)  # the resumed run's file (the first attempt's: wandb/superseded/)
    assert by_type(recs, "run")[0]["run_id"] == first["run_id"]
    (earlier,) = (tmp_path / "wandb" / "superseded").iterdir()
    assert earlier.name.endswith(first["run_id"])
    steps = [h["item"]["step"] for h in by_type(recs, "history") if "train/loss" in h["item"]]
    local = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [r["step"] for r in local if "train/loss" in r] and steps[-1] == 38  # the whole run, each step once
    _, meta, _ = checkpoint_meta(tmp_path)
    assert meta["sinks"]["wandb"]["run_id"] == first["run_id"] and "wandb_run_id" not in meta


def test_eval_runs_carry_their_job_type_without_touching_the_environment(tmp_path, monkeypatch):
    import os

    from vision_train.tracking import Tracker

    monkeypatch.delenv("WANDB_JOB_TYPE", raising=False)
    lc = compose(["logger.mode=offline"]).logger
    tracker = Tracker(tmp_path, {"job": "eval"}, lc, name="eval run", job_type="eval")
    assert "WANDB_JOB_TYPE" not in os.environ
    tracker.log({"test/acc": 0.5}, 7)
    tracker.summary({"test/acc": 0.5})
    tracker.finish(0)
    (run,) = by_type(records(tmp_path), "run")
    assert run["job_type"] == "eval" and run["display_name"] == "eval run"
    assert json.loads((tmp_path / "summary.json").read_text()) == {"test/acc": 0.5}


@pytest.mark.fast
def test_curves_are_redrawn_mid_run_at_most_once_a_minute_and_always_at_the_end(tmp_path, monkeypatch):
    from vision_train import tracking

    drawn = []  # (rows each drawing saw)
    monkeypatch.setattr(tracking.media, "plot_curves", lambda rows, path: drawn.append(len(rows)))
    clock = [1000.0]
    monkeypatch.setattr(tracking.time, "monotonic", lambda: clock[0])
    tracker = tracking.Tracker(tmp_path, {}, compose(["logger.mode=disabled", "logger.media=false"]).logger)
    for step, minutes in [(10, 0.5), (20, 1.1), (30, 1.5), (40, 2.2)]:  # an evaluation at each
        clock[0] = 1000.0 + 60 * minutes
        tracker.log({"train/loss": 1.0 / step, "val/loss": 2.0 / step}, step)
        tracker.log_curves()
        if "curves" in tracker._queued:
            tracker._queued["curves"].result()  # (drawn before the next rows arrive)
    tracker.log({"test/loss": 0.1}, 40)
    tracker.log_curves(final=True)
    tracker.finish(0)
    assert drawn == [2, 4, 5]  # after 1.1 and 2.2 minutes (not 0.5 or 1.5), then at the end with every row


class CopySink:
    """A third sink, as a user would add one: its own file of rows, cut back on resume through the state
    it stores in each checkpoint."""

    run_id = None
    built: list = []  # (every instance, in order: what each was told on construction and got)

    def __init__(self, run_dir, config, logger_cfg, *, name, job_type, resume):
        self.path, self.resume, self.evals, self.checkpoints = run_dir / "copy.jsonl", resume, [], []
        rows = self.path.read_text().splitlines(keepends=True) if self.path.exists() else []
        self.rows = resume.state["rows"] if resume is not None and resume.state else 0
        self.path.write_text("".join(rows[:self.rows]))
        self.file = open(self.path, "a")  # noqa: SIM115
        self.summary_values = self.exit_code = None
        CopySink.built.append(self)

    def log(self, metrics, step):
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.rows += 1

    def log_eval(self, split, step, report, **arrays):
        self.evals.append((split, step, sorted(report["files"]), len(arrays["labels"])))

    def log_checkpoints(self, ckpt_dir, aliases):
        self.checkpoints.append(aliases)

    def summary(self, values):
        self.summary_values = dict(values)

    def finish(self, exit_code=0):
        self.file.close()
        self.exit_code = exit_code

    def resume_state(self):
        return {"rows": self.rows}


def test_a_third_sink_is_one_class_and_one_line_and_gets_what_the_local_record_gets(tmp_path, monkeypatch):
    from vision_train import tracking

    monkeypatch.setattr(CopySink, "built", [])
    monkeypatch.setitem(tracking.SINKS, "copy", (CopySink, lambda lc: True))  # the one line
    job = [*RUN, "logger.mode=disabled", "logger.num_samples=2"]
    with pytest.raises(Stopped):  # (after its step-19 checkpoint: a run to resume)
        train(compose([*job, "trainer.epochs=2"]), tmp_path, hooks=[stop_at(19)])
    first = CopySink.built[0]
    assert first.resume is None and first.exit_code == 1
    step, meta, _ = checkpoint_meta(tmp_path)
    assert meta["sinks"] == {"copy": {"rows": meta["loop"]["rows"]}}  # its state, stored by the tracker

    summary = train(compose([*job, "trainer.epochs=2"]), tmp_path)  # resumes from step 19
    second = CopySink.built[1]
    assert second.resume.step == step and second.resume.state == {"rows": meta["loop"]["rows"]}
    # Row for row what metrics.jsonl holds.
    local = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r) for r in (tmp_path / "copy.jsonl").read_text().splitlines()] == [json.loads(r) for r in local]
    assert sum("test/acc" in r for r in local) == 1
    assert second.summary_values == json.loads((tmp_path / "summary.json").read_text()) == summary
    assert second.exit_code == 0
    assert {(split, at) for split, at, _, _ in second.evals} == {("val", 38), ("test", 38)}
    assert all("confusion_heatmap" in files and n > 0 for _, _, files, n in second.evals)
    assert second.checkpoints == [{"best": summary["best/step"], "latest": 38}]
