"""Several processes, one run, on a real SLURM cluster: the one-node cluster of .ci/slurm.sh (Debian's slurm-wlm;
slurmctld and slurmd on this host), driven with the real srun, sbatch (through Hydra's submitit launcher) and
scontrol. Nothing stands in for them; without the cluster these tests skip (the ``slurm`` fixture says why).

Two processes of N simulated CPU devices each are one run of 2N devices over gloo. Their records equal one process
with 2N devices within float tolerance, not bit for bit: the cross-process all-reduce (gloo) sums in another order
than one process's. Measured here (digits, 1 epoch of the MLP): train/loss, train/acc, val/acc, val/loss, test/acc
and test/loss came out equal; train/grad_norm, val/ece and test/ece differed in the last bits (relative 1e-7).
The same run of two processes, interrupted and resumed, equals its uninterrupted self exactly."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vision_train.records import read_rows
from vision_train.train.loop import train

from .conftest import FAST_COMPILE, REPO
from .helpers import FAST, KILLABLE, compose

TIMING = ("images_per_sec", "perf/")  # wall-clock values (key prefixes): the only ones that may differ
EXACT_ACROSS_LAYOUTS = ("train/acc", "val/acc", "test/acc")  # counts over the batch: equal whatever the sum order

# The cheap run: 1 epoch of the MLP on digits (19 steps of 64), checkpoints off.
DIGITS_MLP = ["model=mlp", "data=digits", "trainer.batch_size=64", "trainer.epochs=1", "trainer.checkpoint=false",
              "trainer.log_every_steps=5", *FAST]
# A run to interrupt: the wider CNN on synthetic images, 3 epochs of 21 steps, a checkpoint every 10 steps.
KILLED = [*KILLABLE, "trainer.epochs=3", "trainer.keep_checkpoints=20", *FAST]


def env_for_runs(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": REPO, "XLA_FLAGS": FAST_COMPILE, "HYDRA_FULL_ERROR": "0", **extra}


def srun(args, run_dir: Path, tasks: int = 2, name: str = "vt-test", **popen) -> subprocess.Popen:
    """``srun -n <tasks> python -m vision_train <args>``: every task the same command, one run directory."""
    cmd = ["srun", f"--ntasks={tasks}", f"--job-name={name}", "--cpus-per-task=1", sys.executable, "-m",
           "vision_train", *args, f"hydra.run.dir={run_dir}"]
    return subprocess.Popen(cmd, cwd=run_dir.parent, env=env_for_runs(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **popen)


def by_step(run_dir: Path) -> dict[int, dict]:
    """metrics.jsonl merged per step (media rows come from a background thread), wall-clock values left out."""
    merged: dict[int, dict] = {}
    for r in read_rows(run_dir / "metrics.jsonl"):
        merged.setdefault(r["step"], {}).update({k: v for k, v in r.items() if not k.startswith(TIMING)})
    return merged


def assert_same_records(got: dict, want: dict, exact: bool) -> list[str]:
    """Step for step and key for key; values exactly, or within float tolerance (accuracies always exactly).
    Returns the keys that differed at all."""
    assert sorted(got) == sorted(want)
    differing = set()
    for step, row in want.items():
        assert sorted(got[step]) == sorted(row), step
        for key, value in row.items():
            if got[step][key] == value:
                continue
            differing.add(key)
            assert not exact and key not in EXACT_ACROSS_LAYOUTS, (step, key, got[step][key], value)
            assert got[step][key] == pytest.approx(value, rel=1e-5, abs=1e-6), (step, key)
    return sorted(differing)


def in_process(overrides, run_dir: Path) -> dict[int, dict]:
    """One process (this one: 8 simulated devices) trains the same config: the reference."""
    train(compose(overrides), run_dir)
    return by_step(run_dir)


def job_id(name: str, timeout: float = 300) -> str:
    t0 = time.time()
    while time.time() - t0 < timeout:
        ids = subprocess.run(["squeue", "-h", "-n", name, "-o", "%i"], capture_output=True, text=True).stdout.split()
        if ids:
            return ids[0]
        time.sleep(0.2)
    raise TimeoutError(f"no job named {name}")


def wait_for(pattern: str, proc: subprocess.Popen, timeout: float = 400) -> Path:
    t0 = time.time()
    while time.time() - t0 < timeout:
        found = glob.glob(pattern)
        if found:
            return Path(found[0])
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.1)
    raise TimeoutError(pattern)


# ------------------------------------------------------------------------------------------ srun (default tier)
def test_srun_two_processes_of_4_devices_train_as_one_process_of_8(tmp_path, slurm):
    """srun -n 2 with hardware=cpu hardware.num_devices=4 and hardware.distributed left at auto: one run of 8
    devices; process 0 alone writes the records and says the start-up line; they equal one process with 8
    devices (within float tolerance: see the module's docstring)."""
    multi = tmp_path / "multi"
    proc = srun([*DIGITS_MLP, "hardware.num_devices=4"], multi)  # (the reference trains meanwhile)
    want = in_process([*DIGITS_MLP, "hardware.num_devices=8"], tmp_path / "single")
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out[-3000:]
    start = [line for line in out.splitlines() if "distributed: " in line]
    assert len(start) == 1 and "2 processes on 1 host" in start[0] and "4 cpu devices per process" in start[0] \
        and "mesh data=8" in start[0] and "coordinator " in start[0] and "SLURM job" in start[0], start
    assert out.count("epoch 1/1") == 1  # process 0 logs; process 1 says warnings and errors only
    assert "8 x cpu" in out
    record = json.loads((multi / "job.json").read_text())
    assert record["status"] == "finished" and record["attempts"] == 1  # one writer
    assert_same_records(by_step(multi), want, exact=False)


# ------------------------------------------------------------------------------------------ sbatch through Hydra
@pytest.mark.slow  # (about 2.5 minutes on 2 cores: two jobs of two processes, one after the other)
def test_a_sweep_of_two_jobs_each_two_tasks_through_the_slurm_launcher(tmp_path, slurm):
    """hydra/launcher=slurm_cpu hydra.launcher.tasks_per_node=2: each job of the sweep is one sbatch job whose two
    tasks are one run of 8 devices, in one run directory, process 0 writing its records; the sweep ends with its
    table; the records equal one process with 8 devices."""
    sweep_dir = tmp_path / "sweep"
    r = subprocess.run([sys.executable, "-m", "vision_train", "-m", "hydra/launcher=slurm_cpu",
                        "hydra.launcher.tasks_per_node=2", "hydra.launcher.timeout_min=20", *DIGITS_MLP,
                        "hardware.num_devices=4", "trainer.seed=0,1", f"hydra.sweep.dir={sweep_dir}"],
                       cwd=tmp_path, env=env_for_runs(), capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "2 jobs: 2 finished" in r.stdout + r.stderr
    rows = (sweep_dir / "sweep_summary.csv").read_text().splitlines()
    assert len(rows) == 3 and all(",finished," in row for row in rows[1:]), rows
    jobs = {json.loads(p.read_text())["overrides"][-1]: p.parent for p in sweep_dir.glob("*/job.json")}
    assert sorted(jobs) == ["trainer.seed=0", "trainer.seed=1"]
    for d in jobs.values():
        record = json.loads((d / "job.json").read_text())
        assert record["status"] == "finished" and record["attempts"] == 1, record
        log = (d / "train.log").read_text()
        assert log.count("distributed: 2 processes on 1 host") == 1 and log.count("epoch 1/1") == 1, log
    assert len(list((sweep_dir / ".submitit").glob("*/*_1_log.out"))) == 2  # two tasks a job, each job its own
    want = in_process([*DIGITS_MLP, "hardware.num_devices=8", "trainer.seed=0"], tmp_path / "single")
    assert_same_records(by_step(jobs["trainer.seed=0"]), want, exact=False)


# ------------------------------------------------------------------------------------------ interruptions
@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, slurm):
    """The KILLED run, two processes of 2 devices each, uninterrupted, under srun: what an interrupted run of the
    same layout must end with, exactly."""
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    proc = srun([*KILLED, "hardware.num_devices=2"], run_dir, name="vt-reference")
    out = proc.communicate(timeout=900)[0]
    assert proc.returncode == 0, out[-3000:]
    return by_step(run_dir)


@pytest.mark.slow  # (about 2 minutes: a killed run and its resumption; the reference above is shared)
def test_a_task_killed_9_ends_every_task_and_the_same_command_resumes_exactly(tmp_path, uninterrupted):
    """kill -9 of task 0 (the coordinator's process) mid-run: the other task ends within 120 s, non-zero, with
    one line naming the lost process; job.json is final (failed, naming it); srun -n 2 with the same command
    resumes from the last checkpoint to the uninterrupted run's records, exactly."""
    run_dir, name = tmp_path / "run", f"vt-kill-{os.getpid()}"
    proc = srun([*KILLED, "hardware.num_devices=2"], run_dir, name=name)
    wait_for(str(run_dir / "checkpoints" / "10"), proc)
    pids = subprocess.run(["scontrol", "listpids", job_id(name)], capture_output=True, text=True).stdout.splitlines()
    task0 = next(int(line.split()[0]) for line in pids[1:] if line.split()[-1] == "0")  # GLOBALID 0
    killed_at = time.time()
    os.kill(task0, 9)
    out = proc.communicate(timeout=150)[0]
    assert time.time() - killed_at < 120, out[-3000:]
    assert proc.returncode != 0
    lost = [line for line in out.splitlines() if "was lost" in line]
    assert len(lost) == 1 and "process 0 of 2" in lost[0] and "SLURM task 0" in lost[0], out[-3000:]
    assert "Terminating process because the JAX distributed service" not in out  # the line came first
    assert "task 1: Exited with exit code 1" in out
    record = json.loads((run_dir / "job.json").read_text())
    assert record["status"] == "failed" and "process 0 of 2" in record["error"], record

    proc = srun([*KILLED, "hardware.num_devices=2"], run_dir, name=name)
    out = proc.communicate(timeout=900)[0]
    assert proc.returncode == 0, out[-3000:]
    assert "resum" in out.lower()
    assert json.loads((run_dir / "job.json").read_text())["status"] == "finished"
    assert_same_records(by_step(run_dir), uninterrupted, exact=True)


@pytest.mark.slow  # (40-70 s each)
@pytest.mark.parametrize("how", ["scontrol_requeue", "time_limit_sigusr2"])
def test_a_requeued_job_resumes_exactly(tmp_path, uninterrupted, how):
    """A sweep's job of two tasks (hydra/launcher=slurm_cpu) is requeued mid-run, by ``scontrol requeue`` (SLURM
    sends SIGTERM and requeues the job itself), or by the signal SLURM sends before the time limit (SIGUSR2, as
    ``scancel --signal=USR2``: what submitit's own tests send; submitit's handler in task 0 requeues the job): every
    process stops after the same step and saves a checkpoint, SLURM runs the job again, it resumes. The sweep's
    table says finished, and the records are the uninterrupted run's, exactly."""
    sweep_dir, name = tmp_path / "sweep", f"vt-{how[:8]}-{os.getpid()}"
    launcher = subprocess.Popen([sys.executable, "-m", "vision_train", "-m", "hydra/launcher=slurm_cpu",
                                 "hydra.launcher.tasks_per_node=2", "hydra.launcher.timeout_min=20",
                                 f"hydra.launcher.name={name}", *KILLED, "hardware.num_devices=2",
                                 f"hydra.sweep.dir={sweep_dir}"],
                                cwd=tmp_path, env=env_for_runs(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
    ckpt = wait_for(str(sweep_dir / "*" / "checkpoints" / "10"), launcher)
    job = job_id(name)
    if how == "scontrol_requeue":
        subprocess.run(["scontrol", "requeue", job], check=True, timeout=60)
    else:
        subprocess.run(["scancel", "--signal=USR2", job], check=True, timeout=60)
    t0 = time.time()  # a requeued job waits (BeginTime, about 2 minutes here): start it now
    while time.time() - t0 < 120:
        state = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T %r"], capture_output=True, text=True).stdout
        if state.startswith("PENDING"):
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], timeout=60)
            break
        time.sleep(0.5)
    out = launcher.communicate(timeout=900)[0]
    assert launcher.returncode == 0, out[-3000:]
    run_dir = ckpt.parent.parent
    log = (run_dir / "train.log").read_text()
    signame = "SIGTERM" if how == "scontrol_requeue" else "SIGUSR2"
    saved = int(log.split(f"stopped by {signame}: checkpoint saved at step ")[1].split()[0])  # (both processes)
    assert f"resumed from {run_dir / 'checkpoints' / str(saved)} at step {saved}" in log, log[-3000:]
    record = json.loads((run_dir / "job.json").read_text())
    assert record["status"] == "finished" and record["attempts"] == 2, record
    assert "1 finished" in out
    assert_same_records(by_step(run_dir), uninterrupted, exact=True)


# ------------------------------------------------------------------------------------------ without a cluster
SLURM_TASK = {"SLURM_JOB_ID": "12", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_NTASKS": "8", "SLURM_PROCID": "5",
              "SLURM_LOCALID": "1", "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_NODEID": "1", "SLURM_STEP_ID": "0"}


@pytest.mark.fast
def test_hardware_distributed_takes_auto_true_false_and_booleans():
    from vision_train.errors import ConfigError

    assert compose([]).hardware.distributed == "auto"
    for given, want in [("true", "true"), ("True", "true"), ("false", "false"), ("auto", "auto"), ("AUTO", "auto")]:
        assert compose([f"hardware.distributed={given}"]).hardware.distributed == want
    with pytest.raises(ConfigError, match=r"hardware.distributed='maybe': choose auto .* true .* or false"):
        compose(["hardware.distributed=maybe"])


@pytest.mark.fast
def test_which_environments_make_a_run_of_several_processes():
    from vision_train.host_devices import detect_processes, is_main_process, wants_distributed

    found = detect_processes(SLURM_TASK)
    assert (found.source, found.count, found.index, found.local_index, found.local_count) == ("SLURM", 8, 5, 1, 4)
    assert wants_distributed("auto", SLURM_TASK) and not is_main_process("auto", SLURM_TASK)
    assert not wants_distributed("false", SLURM_TASK) and is_main_process("false", SLURM_TASK)
    one_task = {**SLURM_TASK, "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}
    assert not wants_distributed("auto", one_task)
    batch_script = {k: v for k, v in SLURM_TASK.items() if not k.startswith("SLURM_STEP")}  # sbatch's own shell
    assert detect_processes(batch_script) is None and not wants_distributed("auto", batch_script)
    ompi = {"OMPI_MCA_orte_hnp_uri": "1;tcp://10.0.0.1:1", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "0",
            "OMPI_COMM_WORLD_LOCAL_RANK": "0", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    assert wants_distributed("auto", ompi) and is_main_process("auto", ompi)
    assert wants_distributed("auto", {"TPU_WORKER_HOSTNAMES": "h0,h1,h2,h3", "TPU_WORKER_ID": "2"})
    manual = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
    assert wants_distributed("auto", manual) and not is_main_process("auto", manual)
    assert not wants_distributed("auto", {}) and wants_distributed("true", {})


@pytest.mark.fast
def test_each_process_takes_its_share_of_the_gpus_it_sees():
    from vision_train.errors import ConfigError
    from vision_train.host_devices import Processes, local_device_ids, slurm_tasks_on_node, visible_gpus

    def task(local, per_node):
        return Processes("SLURM", 8, 0, local, per_node)

    assert local_device_ids(task(0, 1), 4) == [0, 1, 2, 3]  # one process per node: every GPU
    assert local_device_ids(task(3, 4), 4) == [3]             # one per GPU, each seeing the node's four
    assert local_device_ids(task(3, 4), 1) == [0]             # one per GPU, SLURM binding one to each task
    assert local_device_ids(task(1, 2), 8) == [4, 5, 6, 7]    # two processes sharing eight
    assert local_device_ids(task(1, 2), None) is None and local_device_ids(None, 4) is None
    with pytest.raises(ConfigError, match="3 processes on this host share 4 visible GPUs unevenly"):
        local_device_ids(task(1, 3), 4)
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2,3"}) == 2 and visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == 0
    assert [slurm_tasks_on_node("2(x3),1", i) for i in range(4)] == [2, 2, 2, 1]


@pytest.mark.fast
def test_distributed_true_with_nowhere_to_find_the_others_is_one_line(tmp_path):
    code = ("from vision_train import parallel\n"
            "try:\n    parallel.initialize_distributed('true', 'cpu')\n"
            "except Exception as e:\n    print(type(e).__name__, e)\n")
    env = {k: v for k, v in env_for_runs().items() if not k.startswith(("SLURM_", "OMPI_", "JAX_COORD", "TPU_"))}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.stdout.startswith("ConfigError hardware.distributed='true': no SLURM job step, Open MPI job or TPU pod"), \
        r.stdout + r.stderr[-2000:]


# What each process of the test below runs: joins a run of two (127.0.0.1), takes part in one collective, and leaves;
# process 1 is still leaving (an exit handler that runs after its JAX client has shut down) for 3 s after process 0
# is done. Each writes when it ended, and process 0 its coordination service's pid.
LEAVER = """
import atexit, json, os, sys, time
out = sys.argv[1]
index = int(os.environ["JAX_PROCESS_ID"])
# (registered first: runs last, after what joining registers)
atexit.register(lambda: (time.sleep(3 * index), open(f"{out}/ended{index}", "w").write(repr(time.time()))))
from vision_train import parallel
parallel.initialize_distributed("true", "cpu")
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
mesh = jax.make_mesh((2,), ("data",), devices=jax.devices())
x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), jnp.ones((1,)) * (index + 1))
print("sum", float(jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x)), flush=True)
if index == 0:
    service = jax._src.distributed.global_state.service.proc
    atexit.register(lambda: open(out + "/service", "w").write(str(service.pid)))
"""


def test_the_coordination_service_stays_until_every_other_process_has_left(tmp_path):
    """The end of a run of several processes: process 0's coordination service (beside it) ended when process 0
    ended, though another process could still be leaving; that one then aborted ("Failed to send RPC to
    coordination service", exit 134; seen under load in the srun test). Now every process shuts JAX's client down
    at exit and process 0 keeps the service until the others' processes have ended."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for index in (0, 1):
        env = {**{k: v for k, v in env_for_runs().items() if not k.startswith(("SLURM_", "OMPI_"))},
               "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
               "JAX_PROCESS_ID": str(index), "JAX_PLATFORMS": "cpu"}
        procs.append(subprocess.Popen([sys.executable, "-c", LEAVER, str(tmp_path)], cwd=tmp_path, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    assert all("sum 3.0" in out for out in outs), outs
    ended0, ended1 = (float((tmp_path / f"ended{i}").read_text()) for i in (0, 1))
    service = int((tmp_path / "service").read_text())
    assert ended0 >= ended1  # process 0 waited for process 1 to leave
    t0 = time.time()
    while time.time() - t0 < 10 and os.path.exists(f"/proc/{service}") and \
            "zombie" not in Path(f"/proc/{service}/status").read_text().lower():
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{service}") or "zombie" in Path(f"/proc/{service}/status").read_text().lower()
