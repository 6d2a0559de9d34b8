"""``python -m vision_train`` end to end in a subprocess, as a user runs it."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import FAST_COMPILE, REPO, run_cli
from .helpers import DIGITS

QUICK = [*DIGITS, "trainer.epochs=2", "logger.mode=offline", "hardware=cpu"]


def test_normal_run_writes_the_run_directory(tmp_path):
    run_dir = tmp_path / "run"
    r = run_cli([*QUICK, f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout + r.stderr
    assert "epoch 2/2  train/loss" in out and "img/s" in out and "test  test/loss" in out
    assert "wandb sync" in out  # offline W&B run, with the command to upload it
    for name in ("config.yaml", "metrics.jsonl", "train.log", "summary.json", ".hydra/overrides.yaml"):
        assert (run_dir / name).exists(), name
    assert "arch: cnn" in (run_dir / "config.yaml").read_text()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    keys = set().union(*rows)
    assert {"train/loss", "train/acc", "val/loss", "val/acc", "test/loss", "test/acc", "lr", "epoch"} <= keys
    assert "epoch 2/2" in (run_dir / "train.log").read_text()
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert not (tmp_path / "home").exists() or not any((tmp_path / "home").rglob("*wandb*"))


def test_help_lists_the_config_groups(tmp_path):
    r = run_cli(["--help"], cwd=tmp_path)
    assert r.returncode == 0
    for group in ("model:", "data:", "optimizer:", "hardware:", "trainer:", "logger:", "experiment:"):
        assert group in r.stdout
    assert "vit, vit_b, vit_s" in r.stdout and "seed004_vit_cifar10" in r.stdout


def test_cfg_job_prints_the_composed_config(tmp_path):
    r = run_cli(["--cfg", "job", "model=mixer", "trainer.epochs=7"], cwd=tmp_path)
    assert r.returncode == 0
    assert "arch: mixer" in r.stdout and "epochs: 7" in r.stdout and "tokens_mlp_dim: 96" in r.stdout


BAD = [
    # (overrides, text the one-line error must contain)
    (["model=resnet"], "Could not find 'model/resnet'"),
    (["model.patch_sizee=4"], "Key 'patch_sizee' not in 'ViTConfig'"),
    (["trainer.batch_size=0"], "trainer.batch_size=0: must be > 0"),
    (["optimizer.lr=-1e-3"], "optimizer.lr=-0.001: must be > 0"),
    (["data=synthetic", "model.patch_size=5"],
     "model.patch_size=5: does not divide the 32x32 synthetic images; use one of [1, 2, 4, 8, 16, 32]"),
    (["data=digits", "model=cnn", "model.num_classes=5"], "model.num_classes=5: digits has 10 classes"),
    (["data=digits", "model=cnn", "hardware=cpu", "hardware.num_devices=8", "trainer.batch_size=100"],
     "trainer.batch_size=100: the global batch must divide evenly across the 8 devices; use trainer.batch_size=104 or 96"),
    (["data=cifar10", "data.download=false", "data.root=nowhere"], "cifar-10-python.tar.gz"),
    (["trainer.best_metric=bogus"], "trainer.best_metric='bogus': choose one of auto, train/loss, train/acc, val/loss, "
                                    "val/acc, val_ema/loss, val_ema/acc (the metrics of the epoch line) or null"),
    (["data=toy", "trainer.best_metric=val/acc"], "trainer.best_metric='val/acc': toy has no "
                                                  "validation split; use trainer.best_metric=train/loss, train/acc or null"),
    (["trainer.best_metric=val/loss", "trainer.best_mode=max"],
     "trainer.best_mode='max': trainer.best_metric=val/loss is better when smaller; set trainer.best_mode=min"),
]


@pytest.mark.parametrize("overrides,expected", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_input_one_clear_line_nonzero_exit_nothing_compiled(tmp_path, overrides, expected):
    r = run_cli([*overrides, "logger.mode=disabled", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert r.returncode != 0
    out = r.stdout + r.stderr
    assert expected in out, out[-2000:]
    assert "Traceback" not in out
    assert "epoch 1/" not in out  # refused before training started


@pytest.mark.parametrize("override,key,keys", [
    # Hydra's own message for the first suggests the second, which used to be accepted and ignored.
    ("trainer.epochz=3", "trainer.epochz", "The keys of trainer: epochs, batch_size, seed,"),
    ("+trainer.epochz=3", "trainer.epochz", "The keys of trainer: epochs, batch_size, seed,"),
    ("+model.patch_size=4", "model.patch_size", "the keys of model (model.arch=cnn): arch, num_classes, init_from, "
                                                "reset_head, features, dense_dim"),
    ("+data.augment.flipp=true", "data.augment.flipp", "The keys of data.augment: flip, random_resized_crop,"),
    ("+epochs=3", "epochs", "the keys of the config: model, data, optimizer, hardware, trainer, logger"),
])
def test_unknown_keys_are_refused_in_one_line_naming_the_groups_keys(tmp_path, override, key, keys):
    run_dir = tmp_path / "run"
    r = run_cli([*QUICK, "logger.mode=disabled", override, f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert r.returncode == 2
    lines = [line for line in (r.stdout + r.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert f"error: {key}: no such key (Key '{key.rpartition('.')[2]}' not in " in lines[0] and keys in lines[0]
    assert "+" not in lines[0].split("no such key")[1]  # no suggestion to add it with +
    assert not (run_dir / "config.yaml").exists() and not (run_dir / "metrics.jsonl").exists()  # nothing ran


@pytest.mark.slow  # (40 s of CLI runs)
def test_rerunning_a_finished_run_changes_nothing_and_resume_never_sets_it_aside(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [*QUICK, "trainer.epochs=1", "trainer.progress_bar=false", f"hydra.run.dir={run_dir}"]
    r = run_cli(cmd, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]

    def snapshot():  # every file the run wrote (Hydra's own .hydra/ and train.log aside): content and mtime
        return {str(p.relative_to(run_dir)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(run_dir.rglob("*"))
                if p.is_file() and p.parts[len(run_dir.parts)] not in (".hydra", "train.log")}

    before = snapshot()
    assert {"metrics.jsonl", "summary.json", "job.json", "config.yaml"} <= set(before)
    assert any(k.startswith("checkpoints/") for k in before) and any(k.startswith("wandb/") for k in before)
    job = json.loads((run_dir / "job.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())

    r = run_cli(cmd, cwd=tmp_path)  # the same command again
    assert r.returncode == 0, r.stderr[-3000:]
    out = [line for line in (r.stdout + r.stderr).splitlines() if line.strip()]
    assert len(out) == 1, out
    assert f"{run_dir} finished at {job['ended']}; its summary: best/val/acc {summary['best/val/acc']:.4f}, " \
           f"test/acc {summary['test/acc']:.4f}" in out[0]
    assert "trainer.resume=never" in out[0]
    assert snapshot() == before  # metrics, summary, job.json timings, checkpoints, W&B files: untouched

    r = run_cli([*cmd, "trainer.resume=never"], cwd=tmp_path)  # starts over; the finished run is set aside
    assert r.returncode == 0, r.stderr[-3000:]
    (earlier,) = (run_dir / "earlier").iterdir()
    assert f"moved to {earlier}" in r.stdout + r.stderr
    assert json.loads((earlier / "job.json").read_text()) == job  # the earlier record, as it was
    assert (earlier / "summary.json").read_bytes() == before["summary.json"][0]
    assert (earlier / "metrics.jsonl").read_bytes() == before["metrics.jsonl"][0]
    record = json.loads((run_dir / "job.json").read_text())
    assert record["status"] == "finished" and record["attempts"] == 1 and record["started"] >= job["ended"]


def test_nan_loss_stops_with_the_step_and_keeps_the_metrics(tmp_path):
    run_dir = tmp_path / "run"
    r = run_cli([*QUICK, "optimizer=sgd", "optimizer.lr=1e30", "trainer.log_every_steps=1",
                 f"hydra.run.dir={run_dir}", "logger.mode=disabled"], cwd=tmp_path)
    assert r.returncode != 0
    assert "loss became NaN/inf at step 2 (epoch 1)" in r.stdout + r.stderr
    assert (run_dir / "metrics.jsonl").read_text().count("train/loss") >= 1


@pytest.mark.slow  # (55 s; test_training's sharded-equals-single-device test stays in the default tier)
def test_two_processes_train_as_one_data_parallel_run(tmp_path):
    """Multi-host through jax.distributed: two CPU processes (one device each) over gloo on 127.0.0.1,
    sharing one run directory (as hosts share a file system), give the same metrics as one process with
    two devices; only process 0 writes metrics, checkpoints are written together."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    common = [*QUICK, "logger.mode=disabled", "trainer.progress_bar=false", "hardware.num_devices=0"]
    procs = []
    for pid in (0, 1):
        env = {**os.environ, "PYTHONPATH": REPO, "XLA_FLAGS": FAST_COMPILE, "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
               "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(pid)}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "vision_train", *common, "hardware.distributed=true", f"hydra.run.dir={tmp_path / 'multi'}"],
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    assert "2 x cpu" in outs[0]
    single = run_cli([*common, "hardware.num_devices=2", f"hydra.run.dir={tmp_path / 'single'}"], cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-2000:]
    rows = lambda d: [json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    multi, one = rows("multi"), rows("single")
    assert len(multi) == len(one)  # one writer

    def by_step(rs):  # media rows come from a background thread: compare per step, not by line order
        merged = {}
        for r in rs:
            merged.setdefault(r["step"], {}).update(r)
        return merged

    multi, one = by_step(multi), by_step(one)
    assert sorted(multi) == sorted(one)
    for step, a in multi.items():
        for key in ("train/loss", "val/acc", "test/acc"):
            if key in a:
                assert a[key] == pytest.approx(one[step][key], rel=1e-4, abs=1e-4), (step, key)
    assert sorted(int(p.name) for p in (tmp_path / "multi" / "checkpoints").iterdir()) == [19, 38]


# ------------------------------------------------------------------------------------------ Ctrl-C
GC_WRAPPER = """
import gc, os, runpy, signal, sys
fired = []
def callback(phase, info):  # like JAX's own gc callback, which runs often during start-up
    if phase == "start" and "vision_train.train.loop" in sys.modules and not fired:
        fired.append(True)
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C lands inside the callback: Python drops the KeyboardInterrupt
        for _ in range(100000):
            pass
gc.callbacks.append(callback)
sys.argv = ["vision_train", *sys.argv[1:]]
runpy.run_module("vision_train", run_name="__main__", alter_sys=True)
"""


def _popen(args, cwd, wrapper=None):
    env = {**os.environ, "PYTHONPATH": REPO, "HYDRA_FULL_ERROR": "0", "XLA_FLAGS": FAST_COMPILE}
    head = [sys.executable, "-c", wrapper] if wrapper else [sys.executable, "-m", "vision_train"]
    return subprocess.Popen([*head, *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _own_handlers(pid: int) -> bool:
    """The process catches SIGTERM: the run's own handlers are in place (Python alone leaves SIGTERM be)."""
    with open(f"/proc/{pid}/status") as f:
        mask = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))
    return bool(mask >> (signal.SIGTERM - 1) & 1)


def _text(path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _max_step(run_dir) -> int:
    steps = [json.loads(line).get("step", 0) for line in _text(run_dir / "metrics.jsonl").splitlines()
             if line.strip().endswith("}")]
    return max(steps, default=0)


MOMENTS = {  # when to press Ctrl-C: a condition on the running process and its run directory
    "imports": lambda p, d: _own_handlers(p.pid),  # its first lines ran; Hydra, OmegaConf being imported
    "start-up": lambda p, d: (d / "job.json").exists(),  # recorded; JAX, data, model init to come
    "jaxlib": lambda p, d: "jaxlib" in _text(Path(f"/proc/{p.pid}/maps")),  # XLA's C++ extensions loading
    "compilation": lambda p, d: " parameters | " in _text(d / "train.log"),  # the train step compiles next
    "training": lambda p, d: _max_step(d) >= 5,
}


@pytest.mark.parametrize("moment", MOMENTS)
def test_ctrl_c_at_any_moment_stops_the_run_with_exit_130_and_one_line(tmp_path, moment):
    run_dir = tmp_path / "run"
    # No compilation cache: the train step really compiles after the model line.
    p = _popen([*QUICK, "trainer.epochs=3", "trainer.log_every_steps=1", "trainer.progress_bar=false",
                "hardware.compilation_cache=null", f"hydra.run.dir={run_dir}"], tmp_path)
    t0 = time.time()
    while not MOMENTS[moment](p, run_dir):
        assert p.poll() is None, p.stdout.read()[-3000:]
        assert time.time() - t0 < 240
        time.sleep(0.002)
    p.send_signal(signal.SIGINT)
    sent = time.time()
    out = p.communicate(timeout=120)[0]
    assert p.returncode == 130, out[-3000:]
    assert time.time() - sent < 30, out[-3000:]  # promptly (W&B closes its offline run)
    assert "Traceback" not in out and "Exception ignored" not in out, out[-3000:]
    said = [line for line in out.splitlines() if "interrupted by Ctrl-C" in line or "stopped by SIGINT" in line]
    assert len(said) == 1, out[-3000:]
    assert "test  test/loss" not in out  # it did not train on to the end
    record = json.loads(_text(run_dir / "job.json") or "null")
    if record is not None:
        assert record["status"] == "interrupted" and record["error"] in said[0]
    if moment == "training":
        assert "stopped by SIGINT: checkpoint saved at step" in said[0]


def test_ctrl_c_dropped_inside_a_gc_callback_still_stops_the_run(tmp_path):
    """A KeyboardInterrupt raised inside a garbage-collection callback (JAX registers one) is dropped by
    Python with "Exception ignored": Ctrl-C during start-up was once swallowed and the run trained to the end."""
    run_dir = tmp_path / "run"
    p = _popen([*QUICK, "logger.mode=disabled", "trainer.progress_bar=false", f"hydra.run.dir={run_dir}"], tmp_path,
               wrapper=GC_WRAPPER)
    out = p.communicate(timeout=300)[0]
    assert p.returncode == 130, out[-3000:]
    assert "Traceback" not in out and "Exception ignored" not in out, out[-3000:]
    assert [line for line in out.splitlines() if line.strip()][-1].endswith("interrupted by Ctrl-C (SIGINT)")
    assert not (run_dir / "summary.json").exists()
    assert json.loads((run_dir / "job.json").read_text())["status"] == "interrupted"


EXTENSION_WRAPPER = """
import importlib.abc, os, runpy, signal, sys
class Interrupting(importlib.abc.MetaPathFinder):  # as jaxlib's extension does when Ctrl-C lands in its init
    def find_spec(self, name, path=None, target=None):
        if name == "jaxlib._jax":
            try:
                raise KeyboardInterrupt
            except KeyboardInterrupt as e:
                raise ImportError("Encountered an error while initializing the extension.") from e
sys.meta_path.insert(0, Interrupting())
sys.argv = ["vision_train", *sys.argv[1:]]
runpy.run_module("vision_train", run_name="__main__", alter_sys=True)
"""


def test_ctrl_c_turned_into_an_import_error_by_an_extension_still_exits_130(tmp_path):
    """A Ctrl-C landing while jaxlib's extension initialises reaches Python as ImportError("Encountered an
    error while initializing the extension") caused by the KeyboardInterrupt: it printed a 40-line
    traceback and exited 1."""
    run_dir = tmp_path / "run"
    p = _popen([*QUICK, "logger.mode=disabled", f"hydra.run.dir={run_dir}"], tmp_path, wrapper=EXTENSION_WRAPPER)
    out = p.communicate(timeout=300)[0]
    assert p.returncode == 130, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert [line for line in out.splitlines() if line.strip()][-1].endswith("interrupted by Ctrl-C (SIGINT)")
    assert json.loads((run_dir / "job.json").read_text())["status"] == "interrupted"


def test_sigterm_during_start_up_exits_143_with_one_line_and_the_record_says_interrupted(tmp_path):
    """It used to kill the process outright (job.json left "running"); mid-training it saves first (test_checkpoint)."""
    run_dir = tmp_path / "run"
    p = _popen([*QUICK, "logger.mode=disabled", f"hydra.run.dir={run_dir}"], tmp_path)
    t0 = time.time()
    while not (run_dir / "job.json").exists():
        assert p.poll() is None and time.time() - t0 < 240, p.stdout.read()[-3000:]
        time.sleep(0.002)
    p.send_signal(signal.SIGTERM)
    out = p.communicate(timeout=120)[0]
    assert p.returncode == 143, out[-3000:]
    assert [line for line in out.splitlines() if "SIGTERM" in line][0].endswith("interrupted by SIGTERM")
    assert "Traceback" not in out
    assert json.loads((run_dir / "job.json").read_text())["status"] == "interrupted"
