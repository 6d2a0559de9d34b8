"""The streamed feed (data.stream=true: Grain, worker processes) keeps the in-memory path's promises: exact
resume after kill -9, the same accuracy, two processes as one, sweeps, evaluate/predict, Ctrl-C without
leftovers, damaged images skipped the same way every time."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from vision_train import checkpoint as ckpt_lib
from vision_train.records import read_rows

from .conftest import FAST_COMPILE, REPO
from .helpers import FAST, TINY
from .imagefiles import write_image_folder

# Three classes of small images (PNG and JPEG, RGB and grayscale, several sizes): 120 training images at
# batch 8 are 15 steps an epoch. The folder preset's augmentation (flips, random-resized crops) stays on.
PER_CLASS = {"train": 40, "val": 8, "test": 8}
STEPS_PER_EPOCH = 3 * PER_CLASS["train"] // 8
STREAMED = [*TINY["cnn"], *FAST, "data=image_folder", "data.image_size=16", "data.stream=true", "data.workers=2",
            "trainer.batch_size=8"]
TIMING = ("images_per_sec", "perf/")  # wall-clock values (and figures from them): the only ones two runs may differ in


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "pets"
    write_image_folder(root, per_class=PER_CLASS, modes=("RGB", "L"), size=(20, 16))
    return root


# ------------------------------------------------------------------------------------------ helpers
# A run that kills itself with -9 at a chosen moment (KILL_AT): "step:N" as step N's batch is taken from
# the pipeline (mid-epoch: earlier steps done, workers reading ahead), "saved:N" as soon as the checkpoint
# of step N is on disk. From inside, so the moment is exact whatever the machine's speed.
KILL_WRAPPER = """
import os, runpy, signal, sys
what, at = os.environ["KILL_AT"].split(":")
at = int(at)
if what == "step":
    from vision_train.train.feeds import StreamFeed
    train_args = StreamFeed.train_args
    def killing(self, step):
        if step == at:
            os.kill(os.getpid(), signal.SIGKILL)
        return train_args(self, step)
    StreamFeed.train_args = killing
else:
    from vision_train.checkpoint import Checkpointer
    save = Checkpointer.save
    def killing(self, step, *args, **kwargs):
        save(self, step, *args, **kwargs)
        if step == at:
            self.wait()
            os.kill(os.getpid(), signal.SIGKILL)
    Checkpointer.save = killing
sys.argv = ["vision_train", *sys.argv[1:]]
runpy.run_module("vision_train", run_name="__main__", alter_sys=True)
"""


def popen(args, cwd, wrapper=None, env=None):
    """``python -m vision_train args`` in a session of its own (its process group: it and its workers)."""
    env = {**os.environ, "PYTHONPATH": REPO, "HYDRA_FULL_ERROR": "0", "XLA_FLAGS": FAST_COMPILE, **(env or {})}
    head = [sys.executable, "-c", wrapper] if wrapper else [sys.executable, "-m", "vision_train"]
    return subprocess.Popen([*head, *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def group(pgid: int) -> list[str]:
    """The processes left in process group ``pgid``: their command lines."""
    left = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()  # (state, ppid, pgrp, ...): after the command's name
            if int(fields[2]) == pgid and fields[0] != "Z":
                left.append((d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except (OSError, ValueError):
            continue  # (it ended while we looked)
    return left


def no_process_left(pgid: int, within_s: float = 10.0) -> None:
    """Nothing of the run (workers, Grain's or multiprocessing's helpers) outlives it for long."""
    t0 = time.time()
    while (left := group(pgid)) and time.time() - t0 < within_s:
        time.sleep(0.2)
    assert not left, left


def wait_for_step(run_dir: Path, step: int, proc, timeout=300) -> int:
    t0 = time.time()
    while time.time() - t0 < timeout:
        steps = [r["step"] for r in read_rows(run_dir / "metrics.jsonl")]
        if steps and max(steps) >= step:
            return max(steps)
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.01)
    raise TimeoutError


def records(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in read_rows(run_dir / "metrics.jsonl")]


def params(run_dir: Path) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(ckpt_lib.load_for_inference(run_dir)["params"])]


def finish(proc, what: str) -> str:
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, f"{what}: {out[-3000:]}"
    assert "Traceback" not in out, f"{what}: {out[-3000:]}"
    return out


# ------------------------------------------------------------------------------------------ resume
KILLED = [*STREAMED, "trainer.epochs=2", "trainer.log_every_steps=3", "trainer.checkpoint_every_steps=10",
          "trainer.keep_checkpoints=10"]


@pytest.mark.slow  # (four runs of the CLI: 40 s on 2 idle cores, 270 s on busy ones)
def test_streamed_run_killed_9_twice_and_rerun_ends_as_the_uninterrupted_run(folder, tmp_path):
    """Killed right after its step-10 checkpoint, re-run, killed mid-epoch (step 23, workers reading
    ahead; the step-20 checkpoint saved or still being written), re-run: the records row for row and the
    parameters bit for bit equal an uninterrupted run's; no worker outlives a killed run."""
    args = [*KILLED, f"data.root={folder}"]
    full, run = tmp_path / "full", tmp_path / "run"
    finish(popen([*args, f"hydra.run.dir={full}"], tmp_path), "uninterrupted")
    expected = records(full)
    assert [r["step"] for r in expected if "val/loss" in r] == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]

    for kill_at, resumed_at in (("saved:10", None), ("step:23", 10)):
        p = popen([*args, f"hydra.run.dir={run}"], tmp_path, wrapper=KILL_WRAPPER, env={"KILL_AT": kill_at})
        out = p.communicate(timeout=600)[0]
        assert p.returncode == -signal.SIGKILL, out[-3000:]
        assert not (run / "summary.json").exists()
        if resumed_at is not None:
            assert f"at step {resumed_at}" in out and "resumed from" in out, out[-3000:]
        no_process_left(p.pid)
    out = finish(popen([*args, f"hydra.run.dir={run}"], tmp_path), "the last re-run")
    # (the step-20 checkpoint, or the epoch's at 15 where the asynchronous save of 20 was cut short)
    assert "resumed from" in out and ("at step 20" in out or "at step 15" in out), out[-3000:]

    assert records(run) == expected
    for a, b in zip(params(full), params(run), strict=True):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------------------ accuracy
@pytest.mark.slow  # (two 12-epoch runs: 35 s on 2 cores)
def test_digits_as_a_png_folder_reach_97_percent_streamed_as_cached(tmp_path, caplog):
    from vision_train.train.loop import train

    from .helpers import compose
    from .imagefiles import write_digits_folder

    write_digits_folder(tmp_path / "digits")
    job = [*FAST, "model=cnn", "data=image_folder", f"data.root={tmp_path / 'digits'}", "data.image_size=8",
           "data.channels=1", "data.val_size=180", "data.augment.flip=false", "data.augment.random_resized_crop=false",
           "trainer.batch_size=32", "trainer.epochs=12", "optimizer.lr=3e-3", "trainer.checkpoint=false"]
    cached = train(compose([*job, "data.stream=false"]), tmp_path / "cached")
    with caplog.at_level("INFO", logger="vision_train"):
        streamed = train(compose([*job, "data.stream=true", "data.workers=2"]), tmp_path / "streamed")
    assert "streaming digits from its files: 2 worker processes" in caplog.text
    assert cached["test/acc"] >= 0.97 and streamed["test/acc"] >= 0.97, (cached["test/acc"], streamed["test/acc"])


# ------------------------------------------------------------------------------------------ signals
def stopped_by_ctrl_c(p) -> int:
    """Ctrl-C as a terminal sends it (to the process group); the step of the checkpoint the run saved."""
    os.killpg(p.pid, signal.SIGINT)
    out = p.communicate(timeout=120)[0]
    assert p.returncode == 130, out[-3000:]
    assert "Traceback" not in out and "Exception ignored" not in out, out[-3000:]
    said = [line for line in out.splitlines() if "SIGINT" in line or "Ctrl-C" in line]
    assert len(said) == 1 and "stopped by SIGINT: checkpoint saved at step" in said[0], out[-3000:]
    no_process_left(p.pid, within_s=5)
    return int(said[0].split("checkpoint saved at step ")[1].split()[0])


@pytest.mark.slow  # (three runs of the CLI: 25 s on 2 idle cores, 100 s on busy ones)
def test_ctrl_c_and_kill_9_leave_no_worker_behind(folder, tmp_path):
    """Ctrl-C reaches the whole process group, workers included, while they start (importing for seconds)
    or mid-training: one line, the checkpoint saved, exit 130 as in-memory, no traceback from any process,
    nothing left running. kill -9 of the training process alone: its workers follow it within seconds."""
    args = [*STREAMED, f"data.root={folder}", "trainer.epochs=50", "trainer.log_every_steps=1"]
    run = tmp_path / "run"
    p = popen([*args, f"hydra.run.dir={run}"], tmp_path)
    t0 = time.time()
    while not any("spawn_main" in c for c in group(p.pid)):  # a worker process has started
        assert p.poll() is None and time.time() - t0 < 300, p.stdout.read()[-3000:]
        time.sleep(0.01)
    time.sleep(0.5)
    saved = stopped_by_ctrl_c(p)

    p = popen([*args, f"hydra.run.dir={run}"], tmp_path)  # resumes there, trains on
    wait_for_step(run, saved + 3, p)
    saved = stopped_by_ctrl_c(p)
    assert saved in ckpt_lib.Checkpointer(run / "checkpoints", best_metric=None, read_only=True).steps()

    p = popen([*args, f"hydra.run.dir={run}"], tmp_path)  # resumes there, then is killed
    wait_for_step(run, saved + 3, p)
    assert len(group(p.pid)) >= 3, group(p.pid)  # the run and its two workers (at least)
    p.send_signal(signal.SIGKILL)
    p.wait()
    no_process_left(p.pid, within_s=5)


# ------------------------------------------------------------------------------------------ two processes
# Each process writes, per training step, a digest of every row of the batch it read (ROWS_OUT): the rows
# a process contributes to the global batch (jax.make_array_from_process_local_data).
ROWS_WRAPPER = """
import hashlib, json, os, runpy, sys
from vision_train.train.feeds import StreamFeed
glob = StreamFeed._global
def recording(self, local, sharding):
    if local.ndim == 4:  # a training batch's images (evaluation chunks are 5-D)
        with open(os.environ["ROWS_OUT"], "a") as f:
            f.write(json.dumps([hashlib.sha1(row.tobytes()).hexdigest()[:12] for row in local]) + "\\n")
    return glob(self, local, sharding)
StreamFeed._global = recording
sys.argv = ["vision_train", *sys.argv[1:]]
runpy.run_module("vision_train", run_name="__main__", alter_sys=True)
"""


@pytest.mark.slow  # (three CLI processes and their workers: 30 s on 2 cores)
def test_two_processes_stream_as_one_run_with_two_devices(folder, tmp_path):
    """jax.distributed over 127.0.0.1: each process's workers read only its half of every batch, and the
    halves, in process order, are the batch one process with two devices reads; the records equal that
    run's, value for value."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [*STREAMED, f"data.root={folder}", "data.workers=1", "trainer.epochs=2", "trainer.log_every_steps=5",
            "hardware.num_devices=0"]
    procs = []
    for pid in (0, 1):
        env = {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(pid),
               "ROWS_OUT": str(tmp_path / f"rows{pid}.jsonl")}
        procs.append(popen([*args, "hardware.distributed=true", f"hydra.run.dir={tmp_path / 'multi'}"], tmp_path,
                           wrapper=ROWS_WRAPPER, env=env))
    outs = [finish(p, f"process {i}") for i, p in enumerate(procs)]
    assert "2 x cpu" in outs[0]
    finish(popen([*args, "hardware.num_devices=2", f"hydra.run.dir={tmp_path / 'single'}"], tmp_path,
                 wrapper=ROWS_WRAPPER, env={"ROWS_OUT": str(tmp_path / "rows.jsonl")}), "one process")

    rows = lambda name: [json.loads(line) for line in (tmp_path / name).read_text().splitlines()]
    first, second, whole = rows("rows0.jsonl"), rows("rows1.jsonl"), rows("rows.jsonl")
    assert len(whole) == 2 * STEPS_PER_EPOCH and all(len(r) == 8 for r in whole)
    assert len(first) == len(second) == len(whole) and all(len(r) == 4 for r in first + second)
    assert [a + b for a, b in zip(first, second)] == whole

    assert records(tmp_path / "multi") == records(tmp_path / "single")  # one writer; the same sums


# ------------------------------------------------------------------------------------------ sweeps, evaluate, predict
@pytest.mark.slow  # (two jobs at once, each with two workers: 20 s on 2 cores)
def test_joblib_sweep_over_a_streamed_folder(folder, tmp_path):
    """Grain's workers start under Hydra's entry point inside the joblib launcher's processes."""
    sweep_dir = tmp_path / "sweep"
    p = popen(["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "trainer.seed=0,1", *STREAMED,
               f"data.root={folder}", "trainer.epochs=1", f"hydra.sweep.dir={sweep_dir}"], tmp_path)
    out = finish(p, "the sweep")
    assert "Error" not in out, out[-3000:]
    done = [json.loads(path.read_text()) for path in sweep_dir.glob("*/job.json")]
    assert len(done) == 2 and all(job["status"] == "finished" for job in done), done
    assert len({job["pid"] for job in done}) == 2
    assert all(json.loads((path.parent / "summary.json").read_text())["step"] == STEPS_PER_EPOCH
               for path in sweep_dir.glob("*/job.json"))
    no_process_left(p.pid)


def run_module(module, args, cwd):
    env = {**os.environ, "PYTHONPATH": REPO, "HYDRA_FULL_ERROR": "0", "XLA_FLAGS": FAST_COMPILE}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600, check=False)


@pytest.mark.slow  # (a training run, then the two commands: 25 s on 2 cores)
def test_evaluate_and_predict_on_a_run_trained_streamed(folder, tmp_path):
    run = tmp_path / "run"
    finish(popen([*STREAMED, f"data.root={folder}", "trainer.epochs=2", f"hydra.run.dir={run}"], tmp_path), "training")
    summary = json.loads((run / "summary.json").read_text())

    r = run_module("vision_train.evaluate", [f"checkpoint={run}", "hardware=cpu", "hardware.num_devices=2",
                                             "logger.mode=disabled", f"hydra.run.dir={tmp_path / 'eval'}"], tmp_path)
    assert r.returncode == 0 and "Traceback" not in r.stdout + r.stderr, (r.stdout + r.stderr)[-3000:]
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert report["test/acc"] == summary["test/acc"]  # the same split, streamed again, every example once
    assert report["test/loss"] == pytest.approx(summary["test/loss"], rel=1e-5)

    out_json = tmp_path / "predictions.json"
    r = run_module("vision_train.predict", [f"checkpoint={run}", f"inputs={folder / 'test' / 'dog'}", "top_k=2",
                                            f"json={out_json}", "hardware=cpu", f"hydra.run.dir={tmp_path / 'pred'}"],
                   tmp_path)
    assert r.returncode == 0 and "Traceback" not in r.stdout + r.stderr, (r.stdout + r.stderr)[-3000:]
    predictions = json.loads(out_json.read_text())["predictions"]
    assert len(predictions) == PER_CLASS["test"]
    assert {p["top_k"][0]["class"] for p in predictions} <= {"cat", "dog", "fox"}
    # The folder's images are easy: a model trained for two epochs names most of them.
    assert sum(p["top_k"][0]["class"] == "dog" for p in predictions) >= PER_CLASS["test"] // 2


# ------------------------------------------------------------------------------------------ bad input
def test_an_image_damaged_after_the_scan_is_skipped_the_same_way_every_time(tmp_path):
    """A file the scan passed that no longer decodes: its place in every batch goes to the next readable
    example, with that example's label (not the damaged file's), the same in every worker process and in a
    pipeline rebuilt at a later step (a resumed run)."""
    from vision_train import parallel
    from vision_train.config import DataConfig
    from vision_train.data import stream
    from vision_train.data.load import load_data
    from vision_train.train.feeds import Normalize, StreamFeed

    root = tmp_path / "pets"
    write_image_folder(root, per_class={"train": 8, "test": 2}, classes=("cat", "dog"), formats=("png",), size=(12, 12))
    ds, streamed = load_data(DataConfig(kind="image_folder", name="", root=str(root), image_size=8, stream="true",
                                        workers=2))
    assert streamed
    records, labels = ds.train.images.records, ds.train.labels
    bad = int(np.flatnonzero(labels[:-1] != labels[1:])[0])  # the last of a class: the next is another class's
    expected_image, expected_label = records.read(bad + 1), labels[bad + 1]
    path = Path(records.paths[bad])
    path.write_bytes(path.read_bytes()[:60])  # truncated after the scan

    def feed(workers):
        return StreamFeed(ds, batch_size=4, normalize=Normalize(ds.scale, ds.mean, ds.std),
                          mesh=parallel.make_mesh(jax.devices()[:1]), workers=workers, eval_splits=())

    def read(f, steps):
        return {s: tuple(np.asarray(a) for a in f.train_args(s)) for s in steps}

    # Two worker processes; then a thread of this process (each worker costs seconds to start on 2 cores).
    first, again = feed(2), feed(0)
    try:
        a = read(first, range(8))  # two epochs of 4 steps
        b = {**read(again, range(5, 8)), **read(again, range(5))}  # from a later step, then from the start
    finally:
        first.close()
        again.close()
    for s in range(8):
        np.testing.assert_array_equal(a[s][0], b[s][0])
        np.testing.assert_array_equal(a[s][1], b[s][1])
        epoch, index = divmod(s, 4)
        idx = stream.epoch_order(0, epoch, 16)[index * 4:(index + 1) * 4]
        for row, i in enumerate(idx):
            image, label = (expected_image, expected_label) if i == bad else (records.read(i), labels[i])
            np.testing.assert_array_equal(a[s][0][row], image)
            assert a[s][1][row] == label


def test_a_feed_prepares_each_epoch_once_and_gives_each_step_its_batch_once(tmp_path):
    """The loop's epoch start (``feed.start_epoch``) reads the streamed epoch's first batch before the epoch's
    clock starts; the step then takes that batch: each step's rows are put on the devices once, and the
    batches are those of a feed asked without it. A checkpoint records the streamed pipeline's position and
    nothing of a device-resident feed (its order is a function of the step)."""
    from vision_train import parallel
    from vision_train.config import DataConfig
    from vision_train.data.load import load_data
    from vision_train.data.sources import Dataset, Split
    from vision_train.train.feeds import DeviceFeed, Normalize, StreamFeed

    root = tmp_path / "pets"
    write_image_folder(root, per_class={"train": 4, "test": 1}, classes=("cat", "dog"), formats=("png",), size=(8, 8))
    ds, _ = load_data(DataConfig(kind="image_folder", name="", root=str(root), image_size=8, stream="true"))
    mesh = parallel.make_mesh(jax.devices()[:1])
    common = dict(batch_size=4, normalize=Normalize(ds.scale, ds.mean, ds.std), mesh=mesh, eval_splits=())
    prepared, plain = StreamFeed(ds, workers=0, **common), StreamFeed(ds, workers=0, **common)
    put = []
    glob = prepared._global
    prepared._global = lambda local, sharding: put.append(len(local)) or glob(local, sharding)
    try:
        got = {}
        for step in range(1, 6):  # resumed at step 1: epochs of 2 steps start at 1 (this process's first), 2, 4
            if step % 2 == 0 or step == 1:
                prepared.start_epoch(step)
                assert prepared.state() == {"next_step": step}
            got[step] = [np.asarray(a) for a in prepared.train_args(step)]
        assert put == [4, 4] * 5  # images and labels, once per step
        for step in range(1, 6):
            for a, b in zip(got[step], plain.train_args(step)):
                np.testing.assert_array_equal(a, np.asarray(b))
        assert prepared.state() == {"next_step": 6}
    finally:
        prepared.close()
        plain.close()
    in_memory = Dataset(ds.name, Split(np.zeros((8, 8, 8, 3), np.uint8), np.zeros(8, np.int32)), None, ds.test,
                        ds.class_names, ds.mean, ds.std)
    assert DeviceFeed(in_memory, **common).state() == {}


def test_workers_start_in_a_process_whose_start_method_is_lokys(tmp_path):
    """The joblib launcher's processes run with loky's start method, which a spawned worker inherits and
    cannot find ("cannot find context for 'loky'"): every worker died, every streamed job of a sweep failed.
    Here as there: the pipeline starts, and the process keeps its start method."""
    import multiprocessing

    from joblib.externals.loky.backend import context  # noqa: F401 (registers loky's start method)

    from vision_train import parallel
    from vision_train.config import DataConfig
    from vision_train.data.load import load_data
    from vision_train.train.feeds import Normalize, StreamFeed

    root = tmp_path / "pets"
    write_image_folder(root, per_class={"train": 4, "test": 1}, classes=("cat", "dog"), formats=("png",), size=(8, 8))
    ds, _ = load_data(DataConfig(kind="image_folder", name="", root=str(root), image_size=8, stream="true"))
    before = multiprocessing.get_start_method(allow_none=True)
    multiprocessing.set_start_method("loky", force=True)
    feed = StreamFeed(ds, batch_size=4, normalize=Normalize(ds.scale, ds.mean, ds.std),
                      mesh=parallel.make_mesh(jax.devices()[:1]), workers=1, eval_splits=())
    try:
        batches = [tuple(np.asarray(a) for a in feed.train_args(step)) for step in (0, 1)]  # one epoch
        assert all(images.shape == (4, 8, 8, 3) for images, _ in batches)
        assert sorted(np.concatenate([labels for _, labels in batches]).tolist()) == [0] * 4 + [1] * 4
        assert multiprocessing.get_start_method() == "loky"
    finally:
        feed.close()
        multiprocessing.set_start_method(before, force=True)


def test_a_worker_that_gets_ctrl_c_while_it_starts_lives_on(tmp_path):
    """Ctrl-C reaches the whole process group, workers still importing included (seconds): such a worker
    died with a KeyboardInterrupt traceback and the run with Grain's "worker process was terminated". Here
    a worker is sent SIGINT as soon as it exists; the pipeline still gives its batch."""
    import threading

    from vision_train import parallel
    from vision_train.config import DataConfig
    from vision_train.data.load import load_data
    from vision_train.train.feeds import Normalize, StreamFeed

    root = tmp_path / "pets"
    write_image_folder(root, per_class={"train": 4, "test": 1}, classes=("cat", "dog"), formats=("png",), size=(8, 8))
    ds, _ = load_data(DataConfig(kind="image_folder", name="", root=str(root), image_size=8, stream="true"))
    feed = StreamFeed(ds, batch_size=4, normalize=Normalize(ds.scale, ds.mean, ds.std),
                      mesh=parallel.make_mesh(jax.devices()[:1]), workers=1, eval_splits=())
    sent = []

    def interrupt_the_worker():
        t0 = time.time()
        while not sent and time.time() - t0 < 60:
            for d in Path("/proc").iterdir():
                try:
                    stat = (d / "stat").read_text()
                    child = int(stat[stat.rindex(")") + 2:].split()[1]) == os.getpid()
                    if child and b"spawn_main" in (d / "cmdline").read_bytes():
                        os.kill(int(d.name), signal.SIGINT)
                        sent.append(int(d.name))
                        break
                except (OSError, ValueError):
                    continue
            time.sleep(0.005)

    thread = threading.Thread(target=interrupt_the_worker)
    thread.start()
    try:
        images, _ = (np.asarray(a) for a in feed.train_args(0))
    finally:
        thread.join()
        feed.close()
    assert sent and images.shape == (4, 8, 8, 3)


def test_a_streamed_run_resumed_with_another_worker_count_ends_as_the_uninterrupted_run(folder, tmp_path,
                                                                                        monkeypatch):
    """In-process and quick (the kill -9 version above is slow): a streamed run with two worker processes
    fails after its step-10 checkpoint, and is resumed reading in this process (data.workers=0): each batch is a
    function of its step alone, so the records and the parameters equal the uninterrupted two-worker run's."""
    from vision_train.train.loop import Loop, train

    from .helpers import compose

    job = [*STREAMED, f"data.root={folder}", "trainer.epochs=2", "trainer.checkpoint_every_steps=10",
           "trainer.log_every_steps=4", "trainer.keep_checkpoints=5"]
    full = train(compose(job), tmp_path / "full")
    after_step = Loop.after_step

    def fail_at_13(self, step):
        after_step(self, step)
        if step == 13:
            raise RuntimeError("the machine went away")

    monkeypatch.setattr(Loop, "after_step", fail_at_13)
    with pytest.raises(RuntimeError, match="went away"):
        train(compose(job), tmp_path / "run")
    monkeypatch.setattr(Loop, "after_step", after_step)
    resumed = train(compose([*job, "data.workers=0"]), tmp_path / "run")
    assert records(tmp_path / "run") == records(tmp_path / "full")
    assert resumed["test/acc"] == full["test/acc"]
    for a, b in zip(params(tmp_path / "full"), params(tmp_path / "run")):
        np.testing.assert_array_equal(a, b)
