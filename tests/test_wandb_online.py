"""Online W&B against a real W&B-compatible server on 127.0.0.1 (openwandb; see tests/wandb_server.py).

Runs are read back through the server's API: config, history, summary, media. The server has no run
rewind, so a resume takes the project's fallback: a plain resume of the same run id that logs the rows
up to the checkpoint again (identical values). The server is killed mid-run to show that it never
slows or hangs a run, and a closed port stands for an unreachable one.
"""

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from vision_train.records import read_rows

from .conftest import FAST_COMPILE, REPO
from .wandb_server import free_port, start_server, wandb_server  # noqa: F401  (the fixture)

# digits: 1,257 training images, batch 64: 19 steps/epoch. Media on (tables: one blocking call each when
# W&B's artifact check is made), 4 sample images.
JOB = ["model=cnn", "model.features=[8,16]", "model.dense_dim=32", "data=digits", "trainer.batch_size=64",
       "trainer.log_every_steps=5", "hardware=cpu", "trainer.progress_bar=false", "logger.num_samples=4"]
TIMING = ("images_per_sec", "perf/")  # wall-clock values (prefixes): the only scalars two identical runs may differ in


def run_env(server_env: dict) -> dict:
    """The test process's environment plus the server's two variables, for that run only; W&B's console
    output as a user sees it (not silenced)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    return {**env, "PYTHONPATH": REPO, "XLA_FLAGS": FAST_COMPILE, **server_env}


def start(run_dir: Path, env: dict, extra=(), mode="online") -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vision_train", *JOB, f"logger.mode={mode}", *extra,
                             f"hydra.run.dir={run_dir}"],
                            cwd=run_dir.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, what: str, timeout: float = 300) -> str:
    out = proc.communicate(timeout=timeout)[0]
    assert proc.returncode == 0, f"{what}: {out[-3000:]}"
    assert "Traceback" not in out, f"{what}: {out[-3000:]}"
    return out


def wandb_ids(run_dir: Path) -> set[str]:
    """The W&B run ids of the run directory's W&B runs (``run-<time>-<id>``, ``offline-run-<time>-<id>``)."""
    return {d.name.rsplit("-", 1)[1] for d in (run_dir / "wandb").glob("*run-*") if d.is_dir() and not d.is_symlink()}


def local_scalars(run_dir: Path, skip=()) -> dict[tuple[int, str], list]:
    """(step, key) -> its values in metrics.jsonl, in order (a step's train row and val row both carry
    ``epoch``)."""
    out: dict[tuple[int, str], list] = {}
    for row in read_rows(run_dir / "metrics.jsonl"):
        for k, v in row.items():
            if k != "step" and not k.startswith(tuple(skip)) and v is not None:
                out.setdefault((row["step"], k), []).append(v)
    return out


def assert_key_nowhere(key: str, run_dir: Path) -> None:
    for f in run_dir.rglob("*"):
        if f.is_file() and not f.is_symlink():
            assert key.encode() not in f.read_bytes(), f"the API key is written in {f}"


def test_online_run_reads_back_through_the_server(tmp_path, wandb_server):
    run_dir = tmp_path / "run"
    out = finish(start(run_dir, run_env(wandb_server.env), ["trainer.epochs=2"]), "online run")
    (run_id,) = wandb_ids(run_dir)
    assert not list((run_dir / "wandb").glob("offline-run-*")), out[-2000:]  # online, not the fallback
    run = wandb_server.run(run_id)
    assert run["state"] == "finished"

    # Config: the resolved config, key for key, plus meta.
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())

    def stored(values: dict) -> dict:  # W&B keeps no empty dicts: optimizer.lr_mults={} is absent there
        return {k: stored(v) if isinstance(v, dict) else v for k, v in values.items() if v != {}}

    for group, values in resolved.items():
        assert run["config"][group] == stored(values), group
    meta = run["config"]["meta"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert meta["parameters"] == summary["parameters"] and meta["versions"]["wandb"]
    assert "trainer.epochs=2" in meta["overrides"]

    # History: every scalar of metrics.jsonl at the same step with the same value, and nothing else.
    server, local = wandb_server.scalars(run_id), local_scalars(run_dir)
    assert set(server) == set(local), set(server) ^ set(local)
    for k, v in local.items():
        assert server[k] == v, k
    assert any(key.startswith("val/class_acc/") for _, key in local) and (38, "test/acc") in local

    # Summary.
    for k, v in summary.items():
        assert run["summary"][k] == (v if isinstance(v, str) else pytest.approx(v, rel=1e-12)), k

    # Media: figures and the predictions table of each eval, uploaded and readable.
    files = wandb_server.files(run_id)
    for prefix in ("media/images/val/confusion_heatmap_", "media/images/val/reliability_",
                   "media/images/test/predictions_", "media/table/val/predictions_table_",
                   "media/table/test/predictions_table_"):
        assert any(f.startswith(prefix) for f in files), (prefix, files)
    png = next(f for f in files if f.startswith("media/images/test/confusion_heatmap_"))
    assert wandb_server.file(run_id, png).startswith(b"\x89PNG")
    table_file = next(f for f in files if f.startswith("media/table/test/predictions"))
    table = json.loads(wandb_server.file(run_id, table_file))
    assert table["columns"][:5] == ["index", "image", "true", "pred", "confidence"] and len(table["data"]) == 4

    # The API key: nowhere in the run directory, nor in the run's config or summary on the server.
    assert_key_nowhere(wandb_server.key, run_dir)
    assert wandb_server.key not in json.dumps(wandb_server.get(f"/api/v2/runs/{run_id}"))


@pytest.mark.slow  # (three runs: ~60 s on 2 cores)
def test_killed_online_run_resumes_the_same_wandb_run_with_exact_history(tmp_path, wandb_server):
    """kill -9 after a checkpoint, the same command again: the same W&B run, finished, and the server
    holds each (step, key) of an uninterrupted run, with its values (more than once where the resume
    logged it again, always the same value). The server cannot rewind: the resume is a plain one."""
    job = ["trainer.epochs=3", "trainer.checkpoint_every_steps=10"]
    full, run_dir = tmp_path / "full", tmp_path / "run"
    env = run_env(wandb_server.env)
    finish(start(full, env, [*job, "logger.media=false"], mode="disabled"), "uninterrupted")  # (scalars only)
    expected = local_scalars(full, skip=TIMING)

    proc = start(run_dir, env, job)
    t0 = time.time()
    while not any(r["step"] >= 33 for r in read_rows(run_dir / "metrics.jsonl")):  # checkpoints at 10, 19, 20, 30
        assert proc.poll() is None and time.time() - t0 < 240, proc.stdout.read()[-2000:] if proc.poll() else "slow"
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    out = finish(start(run_dir, env, job), "re-run after kill -9")

    (run_id,) = wandb_ids(run_dir)  # both attempts: one W&B run id
    assert len(list((run_dir / "wandb").glob("run-*"))) == 2, out[-2000:]
    assert "resumed without rewind" in out  # the fallback this server forces
    assert wandb_server.run(run_id)["state"] == "finished"
    server = wandb_server.scalars(run_id)
    missing = set(expected) - set(server)
    assert not missing, sorted(missing)[:10]
    for k, values in server.items():
        if k[1].startswith(TIMING):
            continue
        assert k in expected, f"{k} on the server, not in the uninterrupted run"
        assert set(values) == set(expected[k]), (k, values, expected[k])
    assert local_scalars(run_dir, skip=TIMING) == expected  # and the local record too


def test_server_down_mid_run_costs_the_loop_nothing_and_the_end_is_bounded(tmp_path):
    """The server is killed after the third evaluation. Each later evaluation costs the loop what one
    cost with the server up (it used to stall ~19 s: a table's blocking call under the tracker's lock),
    the run ends within logger.finish_timeout_s (it used to wait forever), job.json says finished, and
    one line says what was not uploaded and how to upload it."""
    server = start_server(tmp_path / "server")
    run_dir, finish_timeout = tmp_path / "run", 3
    console = open(tmp_path / "console.txt", "w+")
    try:
        proc = subprocess.Popen([sys.executable, "-m", "vision_train", *JOB, "logger.mode=online", "trainer.epochs=7",
                                 f"logger.finish_timeout_s={finish_timeout}", f"hydra.run.dir={run_dir}"],
                                cwd=tmp_path, env=run_env(server.env), stdout=console, stderr=subprocess.STDOUT)
        seen: list[tuple[float, dict]] = []  # (when the row appeared, row)
        t0 = time.monotonic()
        while proc.poll() is None:
            assert time.monotonic() - t0 < 300, "the run did not end"
            rows = read_rows(run_dir / "metrics.jsonl")
            now = time.monotonic()
            seen += [(now, r) for r in rows[len(seen):]]
            if server.proc.poll() is None and sum("val/acc" in r for _, r in seen) >= 3:
                server.kill()
                killed_at = len(seen)
            time.sleep(0.005)
        exited = time.monotonic()
        console.seek(0)
        out = console.read()
    finally:
        if proc.poll() is None:
            proc.kill()
        server.kill()
    assert proc.returncode == 0 and "Traceback" not in out, out[-3000:]
    assert json.loads((run_dir / "job.json").read_text())["status"] == "finished"

    # An evaluation's cost to the loop: from the epoch's last training row to its val row; and a whole
    # epoch (training, evaluation, checkpoint, logging) from one val row to the next.
    vals = [i for i, (_, r) in enumerate(seen) if "val/acc" in r]
    assert len(vals) == 7 and vals[2] < killed_at < vals[3]
    eval_cost = [seen[i][0] - seen[i - 1][0] for i in vals]
    epoch = [seen[b][0] - seen[a][0] for a, b in zip(vals, vals[1:])]  # epoch[k]: from eval k to eval k+1
    up_eval, down_eval = eval_cost[1:3], eval_cost[3:]  # (the first eval compiles)
    up_epoch, down_epoch = epoch[0:2], epoch[3:]  # (epoch[2]: the server dies during it)
    print(f"server up: evals {[round(t, 3) for t in up_eval]}s, epochs {[round(t, 2) for t in up_epoch]}s; "
          f"down: evals {[round(t, 3) for t in down_eval]}s, epochs {[round(t, 2) for t in down_epoch]}s")
    assert statistics.median(down_eval) < 3 * max(up_eval) + 0.5
    assert statistics.median(down_epoch) < 3 * max(up_epoch) + 1.0

    # The end: the test row, then at most finish_timeout (+ the media still being drawn, + exit).
    test_row = max(i for i, (_, r) in enumerate(seen) if "test/acc" in r)
    assert exited - seen[test_row][0] < finish_timeout + 45  # (bounded: it once waited forever; slack for a loaded machine)
    sync_lines = [line for line in out.splitlines() if "wandb sync" in line]
    assert len(sync_lines) == 1 and f"finish_timeout_s={finish_timeout}" in sync_lines[0], out[-3000:]
    sync_args = sync_lines[0].rsplit("wandb sync ", 1)[1].split()
    assert not w_and_b_processes_of(proc.pid, wait=10), "W&B's service process outlived the run"

    # The command uploads what the server missed: the server back (same data), `wandb sync`, and the run
    # holds every scalar of metrics.jsonl (those it had before it died, twice: with the same values).
    server = start_server(tmp_path / "server")
    try:
        sync = subprocess.run([sys.executable, "-m", "wandb", "sync", *sync_args], env=run_env(server.env),
                              capture_output=True, text=True, timeout=120)
        assert sync.returncode == 0, sync.stdout + sync.stderr
        (run_id,) = wandb_ids(run_dir)
        synced = server.scalars(run_id)
    finally:
        server.kill()
    for k, values in local_scalars(run_dir).items():
        assert set(synced.get(k, [])) == set(values), k


def w_and_b_processes_of(pid: int, wait: float) -> list[int]:
    """W&B's service processes started by process ``pid`` still alive after ``wait`` seconds."""
    deadline = time.time() + wait
    while True:
        alive = []
        for d in Path("/proc").iterdir():
            try:
                cmd = (d / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            owner = cmd[cmd.index(b"--pid") + 1:][:1] if b"--pid" in cmd else []
            if cmd[0].endswith(b"wandb-core") and owner == [b"%d" % pid]:
                alive.append(int(d.name))
        if not alive or time.time() > deadline:
            return alive
        time.sleep(0.2)


@pytest.mark.slow  # (30 s; the outage mid-run test stays in the default tier)
def test_unreachable_server_costs_at_most_the_init_timeout_then_the_run_goes_on_offline(tmp_path):
    key = "local-" + "k3y" * 13 + "x"
    env = {"WANDB_BASE_URL": f"http://127.0.0.1:{free_port()}", "WANDB_API_KEY": key}  # nothing listens there

    # The sink alone: the cost of an unreachable server at start-up, one warning, no abandoned run dir.
    import logging

    from vision_train.tracking.wandb_sink import WandbSink

    from .helpers import compose

    lc = compose(["logger=wandb", "logger.mode=online", "logger.init_timeout_s=3"]).logger
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("vision_train").addHandler(handler)
    old = {k: os.environ.get(k) for k in ("WANDB_BASE_URL", "WANDB_API_KEY", "WANDB_DIR", "WANDB_CACHE_DIR",
                                          "WANDB_DATA_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR", "WANDB_SERVICE")}
    try:
        os.environ.update(env)
        t0 = time.monotonic()
        sink = WandbSink(tmp_path / "sink", {"a": 1}, lc)
        cost = time.monotonic() - t0
        sink.log({"x": 1.0}, 1)
        sink.finish(0)
    finally:
        import wandb

        wandb.teardown()  # (this process's W&B service: later tests' subprocesses must not attach to it)
        logging.getLogger("vision_train").removeHandler(handler)
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    print(f"unreachable server: W&B start-up {cost:.2f}s with logger.init_timeout_s=3")
    assert sink.mode == "offline" and cost < 3 + 4
    warnings = [r.getMessage() for r in records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "wandb sync" in warnings[0], warnings
    assert [d.name.split("-")[0] for d in (tmp_path / "sink" / "wandb").glob("*run-*") if d.is_dir()] == ["offline"]

    # The command line: the run goes on offline, one warning line, no traceback, the key nowhere.
    run_dir = tmp_path / "run"
    job = ["trainer.epochs=1", "logger.init_timeout_s=3", "logger.media=false"]
    out = finish(start(run_dir, run_env(env), job), "unreachable")
    lines = [line for line in out.splitlines() if "no online run" in line]
    assert len(lines) == 1 and "wandb sync" in lines[0], out[-3000:]
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb")) and not list((run_dir / "wandb").glob("run-*"))
    assert json.loads((run_dir / "job.json").read_text())["status"] == "finished"
    assert_key_nowhere(key, run_dir)
