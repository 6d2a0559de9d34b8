"""``python -m vision_train`` end to end in a subprocess, as a user runs it."""

import json
import os

import pytest

from .conftest import run_cli

QUICK = ["model=cnn", "model.features=[8,16]", "model.dense_dim=32", "data=digits", "trainer.epochs=2",
         "trainer.batch_size=64", "logger.mode=offline", "hardware=cpu"]


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
]


@pytest.mark.parametrize("overrides,expected", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_input_one_clear_line_nonzero_exit_nothing_compiled(tmp_path, overrides, expected):
    r = run_cli([*overrides, "logger.mode=disabled", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert r.returncode != 0
    out = r.stdout + r.stderr
    assert expected in out, out[-2000:]
    assert "Traceback" not in out
    assert "epoch 1/" not in out  # refused before training started


def test_nan_loss_stops_with_the_step_and_keeps_the_metrics(tmp_path):
    run_dir = tmp_path / "run"
    r = run_cli([*QUICK, "optimizer=sgd", "optimizer.lr=1e30", "trainer.log_every_steps=1",
                 f"hydra.run.dir={run_dir}", "logger.mode=disabled"], cwd=tmp_path)
    assert r.returncode != 0
    assert "loss became NaN/inf at step 2 (epoch 1)" in r.stdout + r.stderr
    assert (run_dir / "metrics.jsonl").read_text().count("train/loss") >= 1


def test_two_processes_train_as_one_data_parallel_run(tmp_path):
    """Multi-host through jax.distributed: two CPU processes (one device each) over gloo on 127.0.0.1,
    sharing one run directory (as hosts share a file system), give the same metrics as one process with
    two devices; only process 0 writes metrics, checkpoints are written together."""
    import socket
    import subprocess
    import sys

    from .conftest import FAST_COMPILE, REPO

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
