"""Sweeps: a Hydra grid (run dirs, W&B group, summary table), failing jobs, re-runs that skip and resume,
Optuna, the joblib launcher, and the command line a W&B Sweeps agent builds."""

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from vision_train import sweep
from vision_train.config import job_dir_name
from vision_train.fate import Refused, decide

from .conftest import FAST_COMPILE, REPO, run_cli
from .helpers import KILLABLE
from .test_checkpoint import wait_for_step
from .test_tracking import by_type, records

CPU = ["hardware=cpu", "trainer.progress_bar=false"]


def jobs(sweep_dir: Path) -> dict[str, Path]:
    """A sweep's jobs: their overrides (space-separated, from job.json) -> their directory."""
    out = {}
    for p in sweep_dir.glob("*/job.json"):
        try:
            out[" ".join(json.loads(p.read_text())["overrides"])] = p.parent
        except (ValueError, KeyError):  # being written
            pass
    return out


def table(sweep_dir: Path) -> list[dict]:
    with open(sweep_dir / "sweep_summary.csv") as f:
        return list(csv.DictReader(f))


def test_grid_2x2_runs_four_jobs_in_one_wandb_group_and_writes_the_summary_table(tmp_path):
    sweep_dir = tmp_path / "sweep"
    r = run_cli(["-m", "model=mlp,cnn", "optimizer.lr=1e-3,3e-3", "data=digits", "trainer.epochs=1",
                 "trainer.batch_size=64", "logger.mode=offline", "logger.media=false", *CPU, "hardware.num_devices=2",
                 f"hydra.sweep.dir={sweep_dir}"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]

    found = jobs(sweep_dir)
    assert len(found) == 4
    seen = set()
    for overrides, run_dir in found.items():
        name = run_dir.name
        record = json.loads((run_dir / "job.json").read_text())
        assert record["status"] == "finished" and record["objective"] == "best/val/acc"
        summary = json.loads((run_dir / "summary.json").read_text())
        assert record["value"] == pytest.approx(summary["best/val/acc"])
        # Its own W&B run, in the sweep's group, named and tagged by its overrides; its directory too.
        (run,) = by_type(records(run_dir), "run")
        assert run["run_group"] == "sweep"  # the sweep's own name (its directory, relative to the working one)
        model = run["config"]["update"]["model"]["arch"]
        (lr,) = [t for t in run["tags"] if t.startswith("optimizer.lr=")]
        assert f"model={model}" in run["tags"] and lr in run["display_name"]
        assert name.startswith(f"model={model},{lr},data=digits,")  # what the jobs differ in leads the name
        seen.add((model, lr))
    assert seen == {(m, f"optimizer.lr={lr}") for m in ("mlp", "cnn") for lr in ("0.001", "0.003")}  # as Hydra writes them

    rows = table(sweep_dir)
    assert len(rows) == 4 and all(row["status"] == "finished" for row in rows)
    (best,) = [row for row in rows if row["best"] == "*"]
    assert float(best["value"]) == max(float(row["value"]) for row in rows)
    md = (sweep_dir / "sweep_summary.md").read_text()
    assert "4 jobs: 4 finished" in md and md.count("| best |") == 1
    assert "model=cnn optimizer.lr=" in md and "Every job: " in md  # the swept keys per row, the rest once
    assert f"Best: model={best['overrides'].split('model=')[1].split()[0]} optimizer.lr=" in md  # named by them
    assert "| best |" in r.stdout and "sweep_summary.md" in r.stdout  # printed at the end too


SHARED = ["data=image_folder", "data.root=/scratch/datasets/imagenette2-320", "data.image_size=160",
          "hardware=gpu", "model=vit_b", "model.init_from=/scratch/weights/vit_b16_augreg_in21k.safetensors",
          "optimizer=adamw", "trainer.batch_size=256", "trainer.epochs=30"]


def _dirname(overrides: list[str]) -> str:
    return ",".join(sorted(overrides))  # Hydra's override_dirname


@pytest.mark.fast
def test_job_directories_lead_with_what_the_sweep_varies():
    names = {lr: job_dir_name(_dirname([*SHARED, f"optimizer.lr={lr}"]), ["optimizer.lr"]) for lr in ("0.001", "0.0003")}
    for lr, name in names.items():
        assert name.startswith(f"optimizer.lr={lr},data.image_size=160,data.root=_scratch_datasets_imagenette2-320,")
        assert len(name) == 150 and name[-13] == "-"  # cut, with a hash: unique however much is cut
        assert not set(name) & set("[]/ ~'\"")  # safe for file systems and TensorStore
    assert names["0.001"] != names["0.0003"]
    again = job_dir_name(_dirname([*SHARED, "optimizer.lr=0.001"]), ["optimizer.lr"])
    assert again == names["0.001"]  # deterministic: a re-run finds the job
    # Without the swept keys (a job outside a sweep's callback): sorted, as Hydra writes them.
    assert job_dir_name(_dirname([*SHARED, "optimizer.lr=0.001"])).startswith("data.image_size=160,")
    # The hash only when needed; several swept keys sorted; a list value stays one override.
    assert job_dir_name("data=digits,model.features=[32,64],model=cnn,optimizer.lr=0.001",
                        "optimizer.lr,model.features") == "model.features=_32,64_,optimizer.lr=0.001,data=digits,model=cnn"
    assert job_dir_name("") == "default"


@pytest.mark.fast
def test_a_job_finds_its_directory_named_in_another_order(tmp_path):
    """A grid grown along a key it did not sweep before moves that key forward in its jobs' names (and sweeps
    from before the swept keys led named them in sorted order): a job takes its earlier directory."""
    short = "data=digits,model=cnn,optimizer.lr=0.001,trainer.epochs=2"
    (tmp_path / "optimizer.lr=0.001,data=digits,model=cnn,trainer.epochs=2").mkdir()
    (tmp_path / "data=digits,model=mlp,optimizer.lr=0.001,trainer.epochs=2").mkdir()  # another job
    grown = job_dir_name(short, ["model", "optimizer.lr"], tmp_path)
    assert grown == "optimizer.lr=0.001,data=digits,model=cnn,trainer.epochs=2"
    assert job_dir_name(short, ["model", "optimizer.lr"]) == "model=cnn,optimizer.lr=0.001,data=digits,trainer.epochs=2"
    assert job_dir_name(short.replace("cnn", "vit"), ["model"], tmp_path) == "model=vit,data=digits,optimizer.lr=0.001,trainer.epochs=2"
    (tmp_path / "model=cnn,optimizer.lr=0.001,data=digits,trainer.epochs=2").mkdir()
    assert job_dir_name(short, ["model", "optimizer.lr"], tmp_path) == "model=cnn,optimizer.lr=0.001,data=digits,trainer.epochs=2"
    # A long name: found by its hash (of the overrides in Hydra's order, whatever order the name has).
    long = _dirname([*SHARED, "optimizer.lr=0.001"])
    earlier = job_dir_name(long)  # (as sweeps named jobs before the swept keys led)
    (tmp_path / earlier).mkdir()
    assert job_dir_name(long, ["optimizer.lr"], tmp_path) == earlier
    assert job_dir_name(long.replace("0.001", "0.003"), ["optimizer.lr"], tmp_path).startswith("optimizer.lr=0.003,")


@pytest.mark.fast
def test_the_swept_keys_come_from_the_sweep_overrides_and_the_search_space():
    task = ["data=digits", "model=cnn,mlp", "optimizer.lr=range(1,3)", "+trainer.ema_decay=choice(0.9,0.99)",
            "model.features=[32,64]", "data.root='a,b'", "trainer.seed=glob(*)"]
    assert sweep.swept_keys(task) == ["model", "optimizer.lr", "trainer.ema_decay", "trainer.seed"]
    optuna = {"optimizer.lr": "tag(log, interval(1e-4, 3e-3))", "model.features": "choice([32,64], [64,128])",
              "trainer.batch_size": 64}  # (a fixed value in the search space does not vary)
    assert sweep.swept_keys(["data=toy", "model.hidden_dim=choice(0,32)"], optuna) == [
        "model.features", "model.hidden_dim", "optimizer.lr"]


@pytest.mark.fast
def test_the_best_job_of_a_sweep_of_one_is_named_by_its_overrides(tmp_path):
    sweep.write_record(tmp_path / "model=cnn,data=digits", status="finished", objective="test/acc", value=0.9,
                       overrides=["model=cnn", "data=digits", "logger.mode=offline"])
    _, md = sweep.write_summary(tmp_path)
    assert "Best: model=cnn data=digits (test/acc 0.9, in model=cnn,data=digits)." in md


@pytest.mark.slow  # (29 s)
def test_a_failing_job_is_recorded_and_the_sweep_goes_on(tmp_path):
    sweep_dir = tmp_path / "sweep"
    r = run_cli(["-m", "model=mixer_small", "data=digits", "model.patch_size=3,4", "trainer.epochs=1",
                 "logger.mode=disabled", *CPU, f"hydra.sweep.dir={sweep_dir}"], cwd=tmp_path)
    assert r.returncode == 1, r.stderr[-3000:]  # the sweep reports that a job failed, after running them all
    rows = {row["overrides"].split()[2]: row for row in table(sweep_dir)}
    assert rows["model.patch_size=3"]["status"] == "failed"
    assert "does not divide the 8x8 digits images" in rows["model.patch_size=3"]["error"]
    assert rows["model.patch_size=4"]["status"] == "finished" and rows["model.patch_size=4"]["best"] == "*"
    assert "1 of 2 jobs did not finish" in r.stdout


def _sweep_cmd(sweep_dir):
    # 700 training images, batch 32: 21 steps/epoch, 63 steps a job; checkpoints every 10 steps.
    return [sys.executable, "-m", "vision_train", "-m", "trainer.seed=0,1", *KILLABLE, "trainer.epochs=3",
            "logger.mode=disabled", "logger.media=false", *CPU, f"hydra.sweep.dir={sweep_dir}"]


@pytest.mark.slow  # (50 s of sweep runs)
def test_rerun_skips_finished_jobs_and_resumes_the_interrupted_one(tmp_path):
    sweep_dir = tmp_path / "sweep"
    env = {**os.environ, "PYTHONPATH": REPO, "XLA_FLAGS": FAST_COMPILE}
    p = subprocess.Popen(_sweep_cmd(sweep_dir), cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    second = None
    t0 = time.time()
    while time.time() - t0 < 300:  # kill -9 the sweep in the middle of its second job
        assert p.poll() is None, p.stdout.read()[-3000:]
        second = next((d for name, d in jobs(sweep_dir).items() if "trainer.seed=1" in name), None)
        metrics = second / "metrics.jsonl" if second else None
        if metrics and metrics.exists():
            steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if line.strip()]
            if steps and max(steps) >= 24:
                break
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    first = next(d for name, d in jobs(sweep_dir).items() if "trainer.seed=0" in name)
    assert json.loads((first / "job.json").read_text())["status"] == "finished"
    assert not (second / "summary.json").exists()
    # Killed without a word: the table (any time, from the directory) calls it interrupted.
    assert sweep.main([str(sweep_dir)]) == 0
    assert {row["status"] for row in table(sweep_dir)} == {"finished", "interrupted"}
    first_summary = (first / "summary.json").read_text()
    first_mtime = (first / "summary.json").stat().st_mtime_ns
    latest = max(int(d.name) for d in (second / "checkpoints").iterdir() if d.name.isdigit())  # complete ones

    r = subprocess.run(_sweep_cmd(sweep_dir), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "skipped: this job finished in an earlier run of the sweep" in r.stdout
    assert (first / "summary.json").stat().st_mtime_ns == first_mtime
    assert (first / "summary.json").read_text() == first_summary
    log = (second / "train.log").read_text()
    assert f"/checkpoints/{latest} at step {latest}" in log  # resumed from the last checkpoint before the kill
    record = json.loads((second / "job.json").read_text())
    assert record["status"] == "finished" and record["attempts"] == 2
    assert json.loads((second / "summary.json").read_text())["step"] == 63
    assert {row["status"] for row in table(sweep_dir)} == {"finished"}


@pytest.mark.fast
def test_rerun_refuses_a_finished_job_whose_config_changed(tmp_path):
    run_dir = tmp_path / "job"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"optimizer": {"lr": 0.001}, "logger": {"mode": "offline"}}))
    (run_dir / "summary.json").write_text(json.dumps({"best/val/acc": 0.5}))
    sweep.write_record(run_dir, status="finished")
    fate = decide({"optimizer": {"lr": 0.001}, "logger": {"mode": "disabled"}}, "auto", run_dir, sweep=True)
    assert (fate.kind, fate.summary) == ("finished", {"best/val/acc": 0.5})  # the logger does not change what it computes
    with pytest.raises(Refused, match=r"optimizer.lr: 0.001 -> 0.003.*hydra.sweep.dir=<new dir>"):
        decide({"optimizer": {"lr": 0.003}, "logger": {"mode": "offline"}}, "auto", run_dir, sweep=True)


@pytest.mark.fast
def test_the_best_job_follows_the_objectives_direction(tmp_path):
    for name, loss, status in (("a", 0.5, "finished"), ("b", 0.2, "finished"), ("c", None, "failed")):
        sweep.write_record(tmp_path / name, status=status, objective="test/loss", value=loss,
                           overrides=[f"optimizer.lr={name}", "data=digits"])
    rows, md = sweep.write_summary(tmp_path)
    assert sweep.best_row(rows)["job"] == "b"  # a loss: smaller is better
    assert "3 jobs: 2 finished, 1 failed." in md and "Every job: data=digits" in md


@pytest.mark.slow  # (23 s)
def test_optuna_search_of_three_trials_returns_a_best_value_and_survives_a_failing_trial(tmp_path):
    sweep_dir = tmp_path / "optuna"
    # hidden_dim=0 is refused by the config check: that trial fails (Optuna: state FAIL), the search goes on.
    r = run_cli(["-m", "hparams_search=mlp_toy", "hydra.sweeper.n_trials=3", "trainer.epochs=2",
                 "model.hidden_dim=choice(0,32)", "logger.mode=disabled", *CPU,
                 f"hydra.sweep.dir={sweep_dir}"], cwd=tmp_path)
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    rows = table(sweep_dir)
    assert len(rows) == 3
    done = [row for row in rows if row["status"] == "finished"]
    failed = [row for row in rows if row["status"] == "failed"]
    assert done and failed, rows  # (the sampler's seed is fixed: the same trials every time)
    assert "model.hidden_dim=0: must be > 0" in failed[0]["error"]
    assert results["best_value"] == pytest.approx(min(float(row["value"]) for row in done))  # val/loss: minimised
    assert 0.0 < results["best_value"] < 1.0 and results["best_params"]["model.hidden_dim"] == 32
    (best,) = [row for row in rows if row["best"] == "*"]
    assert float(best["value"]) == pytest.approx(results["best_value"])  # the table agrees with Optuna
    assert r.returncode == 1 and "Traceback" not in r.stdout + r.stderr  # a recorded failure, not a crash


@pytest.mark.slow  # (33 s)
def test_joblib_launcher_runs_jobs_in_parallel_processes_without_gpu_preallocation(tmp_path):
    sweep_dir = tmp_path / "sweep"
    r = run_cli(["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "model=mlp", "trainer.seed=0,1",
                 "data=toy", "trainer.epochs=2", "logger.mode=disabled", *CPU, f"hydra.sweep.dir={sweep_dir}"],
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads((d / "job.json").read_text()) for d in jobs(sweep_dir).values()]
    assert len(recs) == 2 and all(rec["status"] == "finished" for rec in recs)
    assert len({rec["pid"] for rec in recs}) == 2  # two worker processes
    assert all(rec["env"]["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false" for rec in recs)


def _agent_command(spec: dict, values: dict) -> list[str]:
    """The command line ``wandb agent`` runs for one sampled point (as wandb_agent.Agent._command_run builds it)."""
    from wandb.sdk.launch.sweeps import utils as sweep_utils  # (W&B: only these tests need it; slow to import)

    command = {"args": {k: {"value": v} for k, v in values.items()}, "program": spec["program"]}
    sweep_vars = sweep_utils.create_sweep_command_args(command)
    sweep_vars.update(interpreter=[sys.executable], program=[spec["program"]], env=["/usr/bin/env"])
    out = []
    for c in map(str, sweep_utils.create_sweep_command(spec["command"])):
        out += (sweep_vars.get(c[2:-1]) or []) if c.startswith("${") and c.endswith("}") else [c]
    return out


def _sample(spec: dict) -> dict:
    """A point of the sweep's space: the first of each value list, the lower end of each range."""
    out = {}
    for key, p in spec["parameters"].items():
        out[key] = p["values"][0] if "values" in p else p.get("value", p.get("min"))
    return out


@pytest.mark.parametrize("spec_path", sorted((Path(REPO) / "sweeps").glob("wandb_*.yaml")), ids=lambda p: p.stem)
def test_wandb_sweep_agent_command_line_is_accepted(tmp_path, spec_path):
    spec = yaml.safe_load(spec_path.read_text())
    values = _sample(spec)
    cmd = _agent_command(spec, values)
    assert cmd[:4] == ["/usr/bin/env", sys.executable, "-m", "vision_train"]
    assert [f"{k}={v}" for k, v in values.items()] == cmd[-len(values):]  # Hydra override syntax, no hyphens
    env = {**os.environ, "PYTHONPATH": REPO, "XLA_FLAGS": FAST_COMPILE, "WANDB_SWEEP_ID": "sw33p", "WANDB_RUN_ID": "run42"}
    # Composed with every sampled value in place, the run directory named by the sweep and run ids.
    r = subprocess.run([*cmd, "--cfg", "all", "--resolve"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    composed = yaml.safe_load(r.stdout)
    for key, value in values.items():
        node = composed
        for part in key.split("."):
            node = node[part]
        assert node == pytest.approx(value), key
    assert composed["hydra"]["run"]["dir"] == "outputs/wandb_sweeps/sw33p/run42"
    objective = composed["trainer"]["objective"]
    if objective == "auto":  # as the runs resolve it (vision_train.config.objective_name)
        objective = "best/val/acc" if composed["data"]["val_size"] > 0 else "test/acc"
    assert objective == spec["metric"]["name"]  # the runs report the metric the sweep optimises


@pytest.mark.slow  # (26 s; the agent's command line is checked in the default tier)
def test_wandb_sweep_agent_command_runs_a_job_in_its_own_directory(tmp_path):
    spec = yaml.safe_load((Path(REPO) / "sweeps" / "wandb_mlp_toy.yaml").read_text())
    cmd = _agent_command(spec, _sample(spec))
    env = {**os.environ, "PYTHONPATH": REPO, "XLA_FLAGS": FAST_COMPILE, "WANDB_SWEEP_ID": "sw33p",
           "WANDB_RUN_ID": "run42"}
    r = subprocess.run([*cmd, "trainer.epochs=2", "hardware=cpu"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = tmp_path / "outputs" / "wandb_sweeps" / "sw33p" / "run42"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert spec["metric"]["name"] in summary  # what the sweep optimises is in the run's summary
    (run,) = by_type(records(run_dir), "run")
    assert run["run_id"] == "run42"  # the agent's run id: W&B files the run under the sweep


@pytest.mark.slow  # (26 s)
def test_submitit_launcher_runs_the_jobs_and_the_slurm_preset_composes(tmp_path):
    # submitit's local executor: the same pickling, job processes and result collection as on SLURM.
    sweep_dir = tmp_path / "sweep"
    r = run_cli(["-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5", "model=mlp", "trainer.seed=0,1",
                 "data=toy", "trainer.epochs=2", "logger.mode=disabled", *CPU, f"hydra.sweep.dir={sweep_dir}"],
                cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert [row["status"] for row in table(sweep_dir)] == ["finished", "finished"]
    assert (sweep_dir / ".submitit").is_dir()

    r = run_cli(["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "--cfg", "hydra"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    launcher = yaml.safe_load(r.stdout)["hydra"]["launcher"]
    assert launcher["_target_"].endswith("SlurmLauncher") and launcher["partition"] == "gpu"
    assert launcher["gpus_per_node"] == 1 and launcher["max_num_timeout"] >= 1


def test_optuna_direction_that_contradicts_the_objective_is_refused_before_any_trial(tmp_path):
    sweep_dir = tmp_path / "optuna"
    r = run_cli(["-m", "hparams_search=mlp_toy", "trainer.objective=test/acc", "logger.mode=disabled", *CPU,
                 f"hydra.sweep.dir={sweep_dir}"], cwd=tmp_path)
    assert r.returncode == 2
    assert ("hydra.sweeper.direction='minimize': trainer.objective=test/acc is better when larger; "
            "set hydra.sweeper.direction=maximize") in r.stdout
    assert not list(sweep_dir.glob("*/job.json"))  # no trial ran


@pytest.mark.fast
def test_a_config_conflict_is_shown_as_such_and_keeps_the_earlier_result(tmp_path):
    run_dir = tmp_path / "job"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"optimizer": {"lr": 0.001}}))
    (run_dir / "summary.json").write_text(json.dumps({"best/val/acc": 0.9}))
    sweep.write_record(run_dir, status="finished", objective="best/val/acc", value=0.9, overrides=["optimizer.lr=x"])
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    with pytest.raises(Refused) as e:
        decide({"optimizer": {"lr": 0.003}}, "auto", run_dir, sweep=True)
    sweep.mark_refused(run_dir, str(e.value))  # what the command line does with it: beside the directory
    (row,) = sweep.collect(tmp_path)
    assert row["status"] == "conflict" and row["value"] is None and "computed something else" in row["error"]
    assert sweep.best_row([row]) is None
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before  # nothing inside it changed
    sweep.clear_refused(run_dir)  # a later attempt accepted
    assert sweep.collect(tmp_path)[0]["status"] == "finished"


def test_a_job_directory_in_use_by_a_live_process_is_refused(tmp_path):
    job = tmp_path / "job"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        sweep.write_record(job, status="running", host=socket.gethostname(), pid=sleeper.pid)
        with pytest.raises(sweep.JobConflict, match=f"being trained by process {sleeper.pid}"):
            sweep.check_not_running(job)
        assert sweep.collect(tmp_path)[0]["status"] == "running"
    finally:
        sleeper.kill()
        sleeper.wait()
    sweep.check_not_running(job)  # the process is gone: the job may run (and resume)
    assert sweep.collect(tmp_path)[0]["status"] == "interrupted"


USR2_WRAPPER = """
import os, runpy, signal, sys
def requeue(signum, frame):  # stands in for submitit's checkpoint_and_try_requeue
    open(os.environ["REQUEUED"], "w").write(str(signum))
    sys.exit(7)
signal.signal(signal.SIGUSR2, requeue)
sys.argv = ["vision_train", *sys.argv[1:]]
runpy.run_module("vision_train", run_name="__main__")
"""


def test_slurm_sigusr2_saves_a_checkpoint_then_hands_over_to_submitits_requeue(tmp_path):
    run_dir, marker = tmp_path / "run", tmp_path / "requeued"
    env = {**os.environ, "PYTHONPATH": REPO, "XLA_FLAGS": FAST_COMPILE, "REQUEUED": str(marker)}
    args = [a for a in _sweep_cmd(tmp_path)[4:] if not a.startswith(("trainer.seed=", "hydra.sweep.dir"))]
    p = subprocess.Popen([sys.executable, "-c", USR2_WRAPPER, *args, f"hydra.run.dir={run_dir}"], cwd=tmp_path,
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_step(run_dir, 12, p)
    p.send_signal(signal.SIGUSR2)
    out = p.communicate(timeout=120)[0]
    assert p.returncode == 7, out[-3000:]  # submitit's handler ran (it requeues and exits)
    assert marker.read_text() == str(int(signal.SIGUSR2))
    saved = int(out.split("checkpoint saved at step ")[1].split()[0])
    assert (run_dir / "checkpoints" / str(saved)).is_dir() and saved >= 12
    record = json.loads((run_dir / "job.json").read_text())
    assert record["status"] == "interrupted" and "submitit requeues the job" in record["error"]


@pytest.mark.fast
def test_the_wandb_group_is_the_sweeps_name_never_an_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert sweep.group_name("multirun/2026-11-22/10-00-00") == "multirun/2026-11-22/10-00-00"
    assert sweep.group_name(tmp_path / "multirun" / "lr-grid") == "multirun/lr-grid"  # under the working directory
    assert sweep.group_name("/scratch/me/sweeps/lr-grid") == "sweeps/lr-grid"  # elsewhere: its last two parts
    assert sweep.group_name(tmp_path) == f"{tmp_path.parent.name}/{tmp_path.name}"
    assert sweep.group_name("/lr-grid") == "lr-grid"
    assert len(sweep.group_name("/x/" + "a" * 300)) == 128


@pytest.mark.slow  # (18 s)
def test_a_sweep_whose_job_was_refused_exits_nonzero_naming_it(tmp_path):
    """One job's directory is being trained by another live process: that job is refused, the other runs;
    the sweep used to exit 0."""
    sweep_dir = tmp_path / "sweep"
    common = ["model=mlp", "data=toy", "trainer.epochs=1", "hardware=cpu"]
    # Its directory, as Hydra names a job (overrides sorted, those in override_dirname.exclude_keys left out,
    # the swept one first).
    refused = sweep_dir / job_dir_name(",".join(sorted([*common, "trainer.seed=0"])), ["trainer.seed"])
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        sweep.write_record(refused, status="running", host=socket.gethostname(), pid=sleeper.pid,
                           overrides=[*common, "trainer.seed=0", "logger.mode=disabled", "trainer.progress_bar=false"])
        r = run_cli(["-m", *common, "trainer.seed=0,1", "logger.mode=disabled", "trainer.progress_bar=false",
                     f"hydra.sweep.dir={sweep_dir}"], cwd=tmp_path)
        assert json.loads((refused / "job.json").read_text())["pid"] == sleeper.pid  # left as it was
    finally:
        sleeper.kill()
        sleeper.wait()
    out = r.stdout + r.stderr
    assert r.returncode == 1, out[-3000:]
    assert f"being trained by process {sleeper.pid}" in out
    assert "1 of 2 jobs did not finish: trainer.seed=0" in out
    assert "running: refused, another live process is training in its directory" in out
    assert sorted(row["status"] for row in table(sweep_dir)) == ["finished", "running"]


def test_an_added_unknown_key_stops_the_sweep_before_any_job(tmp_path):
    sweep_dir = tmp_path / "sweep"
    r = run_cli(["-m", "model=mlp", "data=toy", "trainer.seed=0,1", "+trainer.epochz=3", "logger.mode=disabled", *CPU,
                 f"hydra.sweep.dir={sweep_dir}"], cwd=tmp_path)
    assert r.returncode == 2
    assert "error: trainer.epochz: no such key (Key 'epochz' not in 'TrainerConfig'); did you mean trainer.epochs?" \
        in r.stdout + r.stderr
    assert not list(sweep_dir.glob("*/job.json"))  # no job ran
