"""Failures are one line: a full disk (a real one: a small tmpfs mounted as the run directory) and a damaged
checkpoint each end in one line naming what to do, with a non-zero exit; no traceback from a background
thread or event loop reaches the console; the run's records stay usable (job.json final, no temporary
files, earlier checkpoints restorable)."""

import asyncio
import errno
import gc
import io
import json
import re
import logging
import os
import shutil
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest

from vision_train import checkpoint as ckpt_lib
from vision_train import errors, sweep
from vision_train.tracking import LocalSink
from vision_train.train.loop import train

from .conftest import FAST_COMPILE, REPO
from .helpers import DIGITS, FAST, Stopped, compose, stop_at

# digits: 1257 training images, batch 64: 19 steps/epoch; a checkpoint after every epoch (steps 19, 38, 57).
JOB = [*DIGITS, "trainer.checkpoint_every_epochs=1", *FAST]


def run_module(module, args, cwd, timeout=300):
    env = {**os.environ, "PYTHONPATH": REPO, "HYDRA_FULL_ERROR": "0", "XLA_FLAGS": FAST_COMPILE}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.fixture
def tmpfs(tmp_path):
    """``mount(size_kb) -> Path``: a small tmpfs of its own (a disk that really fills up). Needs root."""
    mounted = []

    def mount(size_kb: int) -> Path:
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(where)],
                           capture_output=True, text=True, check=False)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.strip()}")
        mounted.append(where)
        return where

    try:
        yield mount
    finally:
        for where in mounted:
            if subprocess.run(["umount", str(where)], capture_output=True, check=False).returncode != 0:
                subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)


def fill(disk: Path, leave_kb: int = 0) -> Path:
    """Fill ``disk`` with a file, leaving about ``leave_kb`` free."""
    st = os.statvfs(disk)
    free = st.f_bavail * st.f_frsize
    filler = disk / "filler"
    with open(filler, "wb") as f:
        try:
            f.write(b"\0" * max(0, free - leave_kb * 1024))
            f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC
    return filler


def leftovers(run_dir: Path) -> list[str]:
    """Temporary files and directories (Orbax's and ours) left in a run directory."""
    return [str(p.relative_to(run_dir)) for p in run_dir.rglob("*")
            if ".orbax-checkpoint-tmp" in p.name or p.name.endswith(".tmp")]


def console_lines(r) -> list[str]:
    return [line for line in (r.stdout + r.stderr).splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------ full disk
@pytest.mark.slow  # (40 s; the full disk before the start, while writing records and in an asynchronous save stay in the default tier)
def test_full_disk_during_training_is_one_line_and_the_run_resumes_once_there_is_space(tmp_path, tmpfs):
    disk = tmpfs(2048)
    run = disk / "run"
    with pytest.raises(Stopped):  # a run of 3 epochs stopped after the first (and its checkpoint): one to resume
        train(compose([*JOB, "trainer.epochs=3"]), run, hooks=[stop_at(19)])
    before = ckpt_lib.load_for_inference(run)
    assert before["step"] == 19

    # 48 KiB left: the job record, the logs and the metrics fit; the next checkpoint (~140 KiB) does not.
    filler = fill(disk, leave_kb=48)
    args = [*JOB, "trainer.epochs=3", f"hydra.run.dir={run}"]
    r = run_module("vision_train", args, cwd=tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert "Traceback" not in out, out[-3000:]
    errors_ = [line for line in console_lines(r) if "error:" in line]
    assert len(errors_) == 1, out[-3000:]
    assert "no space left on device: could not write the checkpoint at step 38" in errors_[0], errors_
    assert str(run / "checkpoints" / "38") in errors_[0]
    assert "the earlier checkpoint (step 19) is intact" in errors_[0]
    assert "Logging error" not in out and "Exception ignored" not in out

    record = json.loads((run / "job.json").read_text())
    assert record["status"] == "failed" and "no space left on device" in record["error"], record
    assert leftovers(run) == []
    after = ckpt_lib.load_for_inference(run)  # the earlier checkpoint: still the latest, unchanged
    assert after["step"] == 19
    for a, b in zip(*(jax.tree.leaves(x["params"]) for x in (before, after))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    # What the line says to do: free space, run the same command again.
    filler.unlink()
    r = run_module("vision_train", args, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "resumed from" in r.stdout and "at step 19" in r.stdout
    assert json.loads((run / "job.json").read_text())["status"] == "finished"


def test_a_disk_full_before_the_run_starts_is_one_line_too(tmp_path, tmpfs):
    disk = tmpfs(64)
    fill(disk)
    r = run_module("vision_train", [*JOB, "trainer.epochs=1", f"hydra.run.dir={disk / 'run'}"], cwd=tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode == 2 and "Traceback" not in out, out[-3000:]
    expected = (f"error: no space left on device: could not write Hydra's record of the job to "
                f"{disk / 'run' / '.hydra' / 'config.yaml'}; free space on that disk (or choose another directory) "
                f"and run the same command again (a training run resumes from its last checkpoint)")
    # (.hydra/ is written once the attempt is accepted, inside the job: the line carries the log's time)
    assert [re.sub(r"^\[\d\d:\d\d:\d\d\] ", "", line) for line in console_lines(r)] == [expected], out


def test_a_full_disk_while_writing_the_job_record_or_metrics_leaves_no_temporary_file(tmpfs):
    disk = tmpfs(64)
    sweep.write_record(disk, status="running")
    fill(disk)
    with pytest.raises(errors.DiskFull) as e:
        sweep.write_record(disk, status="failed", error="x" * 5000)
    assert str(e.value).startswith(f"no space left on device: could not write the job record to {disk / 'job.json'}")
    assert json.loads((disk / "job.json").read_text())["status"] == "running"  # the last complete record
    assert sorted(p.name for p in disk.iterdir()) == ["filler", "job.json"]

    sink = LocalSink(disk)
    with pytest.raises(errors.DiskFull, match=f"could not write metrics at step [0-9]+ to {disk / 'metrics.jsonl'}"):
        for step in range(1, 10_000):
            sink.log({"train/loss": 1.0}, step)
    with pytest.raises(errors.DiskFull):  # (the line that did not fit is still in the buffer)
        sink.finish()


def test_a_failed_asynchronous_save_names_its_step_and_keeps_the_earlier_checkpoint(tmpfs):
    disk = tmpfs(1024)
    w = np.arange(60_000, dtype=np.float32)  # 240 KB
    ckpt = ckpt_lib.Checkpointer(disk / "checkpoints", best_metric=None)
    ckpt.save(1, {"w": w}, {"step": 1})
    ckpt.wait()
    fill(disk, leave_kb=100)
    ckpt.save(2, {"w": w + 1}, {"step": 2})  # returns at once; the write fails on a background thread
    with pytest.raises(errors.DiskFull) as e:
        ckpt.wait()
    assert str(e.value).startswith("no space left on device: could not write the checkpoint at step 2 to "
                                   f"{disk / 'checkpoints' / '2'}; the earlier checkpoint (step 1) is intact")
    ckpt.close()  # (reported once)
    assert sorted(p.name for p in (disk / "checkpoints").iterdir()) == ["1"]
    reader = ckpt_lib.Checkpointer(disk / "checkpoints", best_metric=None, read_only=True)
    items, meta = reader.restore(1, {"w": jax.ShapeDtypeStruct(w.shape, w.dtype)})
    reader.close()
    np.testing.assert_array_equal(np.asarray(items["w"]), w)
    assert meta == {"step": 1}


# ---------------------------------------------------------------------------------- damaged checkpoint
@pytest.fixture(scope="module")
def damaged_run(tmp_path_factory):
    """A two-epoch run (checkpoints at steps 19 and 38) whose latest checkpoint's array files are all garbled
    (evaluation reads the parameters only: one garbled file holding only optimizer state would go unread)."""
    run = tmp_path_factory.mktemp("damaged") / "run"
    train(compose([*JOB, "trainer.epochs=2"]), run)
    files = [p for p in (run / "checkpoints" / "38" / "state").rglob("*") if p.is_file() and "/d/" in str(p)
             and p.stat().st_size > 64]
    assert files
    for data in files:
        raw = bytearray(data.read_bytes())
        raw[64:] = bytes((b ^ 0x5A) for b in raw[64:])
        data.write_bytes(bytes(raw))
    return run


@pytest.mark.xdist_group("damaged_run")  # (one worker: the module fixture runs once)
def test_evaluate_a_damaged_checkpoint_names_the_step_and_the_earlier_one(damaged_run, tmp_path):
    r = run_module("vision_train.evaluate", [f"checkpoint={damaged_run}", "hardware=cpu", "logger.mode=disabled",
                                             f"hydra.run.dir={tmp_path / 'eval'}"], cwd=tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert "Traceback" not in out and "Exception ignored" not in out, out[-3000:]
    lines = console_lines(r)
    assert len(lines) == 1, out[-3000:]
    assert "error: the checkpoint at step 38" in lines[0] and "is damaged" in lines[0]
    assert f"checkpoint={damaged_run / 'checkpoints' / '19'}" in lines[0], lines[0]


@pytest.mark.xdist_group("damaged_run")  # (one worker: the module fixture runs once)
def test_resuming_from_a_damaged_checkpoint_names_the_step_and_how_to_resume_from_the_earlier_one(damaged_run,
                                                                                                  tmp_path):
    run = tmp_path / "run"
    shutil.copytree(damaged_run, run)
    (run / "summary.json").unlink()  # (a run stopped after its step-38 checkpoint: the same command resumes it)
    args = [*JOB, "trainer.epochs=2", f"hydra.run.dir={run}"]
    r = run_module("vision_train", args, cwd=tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert "Traceback" not in out and "Exception ignored" not in out, out[-3000:]
    lines = console_lines(r)
    assert len(lines) == 1, out[-3000:]
    advice = f"trainer.resume={run / 'checkpoints' / '19'}"
    assert "error: the checkpoint at step 38" in lines[0] and advice in lines[0], lines[0]
    assert json.loads((run / "job.json").read_text())["status"] == "failed"
    # (that resuming from an earlier step of a run works: tests/test_records.py)


@pytest.mark.xdist_group("damaged_run")  # (one worker: the module fixture runs once)
def test_evaluate_on_a_full_disk_is_one_line_and_leaves_no_partial_report(damaged_run, tmp_path, tmpfs):
    disk = tmpfs(128)
    fill(disk, leave_kb=28)  # Hydra's files and the log fit; the report and the figures do not
    r = run_module("vision_train.evaluate", [f"checkpoint={damaged_run / 'checkpoints' / '19'}", "hardware=cpu",
                                             "logger.mode=disabled", f"hydra.run.dir={disk / 'eval'}"], cwd=tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode == 2 and "Traceback" not in out, out[-3000:]
    errors_ = [line for line in console_lines(r) if "error:" in line]
    assert len(errors_) == 1 and "error: no space left on device: could not write " in errors_[0], out[-3000:]
    assert str(disk / "eval") in errors_[0]
    assert not (disk / "eval" / "eval.json").exists() and leftovers(disk / "eval") == []


# --------------------------------------------------------------------------- errors off the main thread
@pytest.fixture
def cli_logging(tmp_path):
    """Logging as the CLIs have it (Hydra's console and log file), with the background error handling
    installed; restored afterwards. Yields (console StringIO, log file path)."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    console, log_file = io.StringIO(), tmp_path / "train.log"
    fmt = logging.Formatter("[%(asctime)s] %(message)s")
    handlers = [logging.StreamHandler(console), logging.FileHandler(log_file)]
    for h in handlers:
        h.setFormatter(fmt)
    root.handlers = handlers
    root.setLevel(logging.INFO)
    errors.install_background_error_handling()
    try:
        yield console, log_file
    finally:
        errors.uninstall_background_error_handling()
        for h in handlers:
            h.close()
        root.handlers = saved[0]
        root.setLevel(saved[1])


def test_background_threads_event_loops_and_library_logs_keep_tracebacks_off_the_console(cli_logging, capsys):
    console, log_file = cli_logging

    def run_thread(target):
        t = threading.Thread(target=target, name="worker")
        t.start()
        t.join()

    def bug():
        raise RuntimeError("boom in a thread")

    def disk_full():
        raise OSError(errno.ENOSPC, "No space left on device", "/somewhere/file")

    run_thread(bug)
    run_thread(disk_full)

    loop = asyncio.new_event_loop()  # (Orbax runs each background read and write on a loop of its own)

    async def fails():
        raise ValueError("boom in a task")

    task = loop.create_task(fails())
    loop.run_until_complete(asyncio.sleep(0.01))
    del task  # never retrieved
    loop.close()
    gc.collect()

    class Broken:
        def __del__(self):
            raise RuntimeError("boom in __del__")

    Broken()
    gc.collect()

    try:  # what Orbax logs (through absl) for a failed background write
        raise ValueError("RESOURCE_EXHAUSTED: ... No space left on device [os_error_code='28']")
    except ValueError:
        logging.getLogger("absl").exception("_SignalingThread.run() raised an exception")
    run_thread(lambda: _log_exception("making the val media at step 19 failed", RuntimeError("boom in media")))
    for i in range(30):  # Orbax reports one full disk once per array, from many threads: written a few times
        _log_exception(f"writing array {i} failed", ValueError(f"RESOURCE_EXHAUSTED: array {i}: No space left on "
                                                               f"device [os_error_code='28']"), logger="absl")
    warnings.warn_explicit("coroutine 'write_fragment' was never awaited", RuntimeWarning, "sys", 1)

    shown = console.getvalue() + capsys.readouterr().err
    assert "Traceback" not in shown, shown
    lines = shown.splitlines()
    assert len(lines) == 2, shown
    assert "background thread worker failed: RuntimeError: boom in a thread (details in" in lines[0]
    assert lines[1].endswith("making the val media at step 19 failed (RuntimeError: boom in media; details in "
                             f"{log_file})")
    written = log_file.read_text()
    for what in ("boom in a thread", "No space left on device", "boom in a task", "boom in __del__",
                 "RESOURCE_EXHAUSTED", "boom in media", "write_fragment' was never awaited"):
        assert what in written, what
    assert written.count("Traceback") == 5  # one per failure: the full disk's once
    assert 1 <= written.count("writing array") < 10  # (then nothing)

    # The main thread is untouched: its errors raise, and what it logs with a traceback keeps it.
    with pytest.raises(ZeroDivisionError):
        _ = 1 / 0
    _log_exception("a bug on the main thread", KeyError("k"))
    assert "Traceback" in console.getvalue().split("a bug on the main thread")[1]


def _log_exception(message, exc, logger="vision_train"):
    try:
        raise exc
    except Exception:
        logging.getLogger(logger).exception(message)


def test_a_log_file_on_a_full_disk_is_left_behind_quietly(tmpfs, capsys):
    disk = tmpfs(16)
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    console = io.StringIO()
    handlers = [logging.StreamHandler(console), logging.FileHandler(disk / "train.log")]
    root.handlers = handlers
    root.setLevel(logging.INFO)
    errors.install_background_error_handling()
    try:
        fill(disk)
        for i in range(200):
            logging.getLogger("vision_train").info("line %d %s", i, "x" * 100)
        assert "line 199" in console.getvalue()
        assert "Logging error" not in capsys.readouterr().err
    finally:
        errors.uninstall_background_error_handling()
        for h in handlers:
            try:
                h.close()
            except OSError:
                pass
        root.handlers = saved[0]
        root.setLevel(saved[1])
