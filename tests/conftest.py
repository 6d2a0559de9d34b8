"""Test set-up: 8 simulated CPU devices (must be set before JAX initialises) and isolated W&B state."""

import os
import shutil
import socket
import subprocess
import sys
import tempfile

# The suite is dominated by XLA compilation on the CPU, and tests assert behaviour, not speed. XLA's CPU backend
# at -O0 compiles tiny test models ~3x faster (4.8 s -> 1.4 s for a ViT init); its older fusion code generator
# (LLVM IR, not the MLIR fusion emitters) about 2x faster again (6.5 -> 3.5 s for the everything-on run's
# programs, 1.6 -> 0.75 s for the tiny CNN's), and its steps run no slower. Subprocess CLI runs get both. Should
# a jaxlib drop the flag, every process stops at start with "Unknown flag in XLA_FLAGS": take it out here.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
os.environ["XLA_FLAGS"] = " ".join(
    [f for f in os.environ.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
    + ["--xla_force_host_platform_device_count=8", FAST_COMPILE]
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("WANDB_SILENT", "true")
# One persistent compilation cache for the whole test run (every xdist worker, every CLI subprocess), as
# a user's machine has one (hardware.compilation_cache=auto reads this variable): tests that compile
# the same programs compile them once. Fresh for each run, so no run depends on an earlier one.
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # (xdist workers inherit the controller's)
    _OWN_CACHE = tempfile.mkdtemp(prefix="vision_train-tests-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(_OWN_CACHE, "jax")

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Scheduling only (what runs is unchanged): the tests that take 10 s or more on 2 cores (measured 2026-12-03 in the
# default tier), collected first, longest first. With -n, xdist hands tests out in collection order (groups of shared
# fixtures first); a long test handed out last keeps one worker busy while the other has nothing left. A test named
# here that no longer exists, or a new long test not named, costs only that balance.
LONG_FIRST = [
    "test_records.py::test_metrics_after_kills_sigterm_torn_line_and_reruns_equal_an_uninterrupted_run",
    "test_wandb_online.py::test_server_down_mid_run_costs_the_loop_nothing_and_the_end_is_bounded",
    "test_fsdp.py::test_fsdp4_equals_data_parallelism_with_ema_and_accumulation_and_compiles_once",
    "test_recipe_runs.py::test_everything_on_streamed_resumes_to_the_uninterrupted_records",
    "test_fate.py::test_a_finished_run_rerun_with_another_config_is_refused_and_no_file_changes_then_branches",
    "test_sweeps.py::test_grid_2x2_runs_four_jobs_in_one_wandb_group_and_writes_the_summary_table",
    "test_wandb_online.py::test_online_run_reads_back_through_the_server",
    "test_perf.py::test_a_run_logs_per_device_throughput_tflops_and_mfu_against_hardware_peak_tflops_and_traces_",
    "test_fsdp.py::test_an_fsdp4_checkpoint_resumes_on_one_device_to_the_same_records",
    "test_slurm.py::test_srun_two_processes_of_4_devices_train_as_one_process_of_8",
    "test_cli.py::test_normal_run_writes_the_run_directory",
    "test_tracking.py::test_an_offline_run_says_only_its_own_line_and_an_empty_wandb_mode_is_unset",
    "test_pretrained.py::test_a_run_starts_from_a_written_checkpoint_and_records_its_hash",
    "test_accuracy.py::test_cnn_on_digits_reaches_097",
    "test_evaluate.py::test_evaluate_on_two_devices_reproduces_the_training_runs_test_accuracy",
    "test_tracking.py::test_two_runs_in_one_process_are_two_wandb_runs",
    "test_tracking.py::test_unreachable_server_falls_back_to_offline_within_the_bound_and_keeps_the_key_out",
    "test_streaming.py::test_a_streamed_run_resumed_with_another_worker_count_ends_as_the_uninterrupted_run",
]


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = item.nodeid.removeprefix("tests/")
        return next((i for i, long in enumerate(LONG_FIRST) if name.startswith(long)), len(LONG_FIRST))

    items.sort(key=rank)  # (stable: every other test keeps its place)


def pytest_sessionfinish(session):
    if _OWN_CACHE and not hasattr(session.config, "workerinput"):  # the process that made it removes it
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


@pytest.fixture(autouse=True)
def _no_home_writes(tmp_path, monkeypatch):
    """Nothing a test runs may write to $HOME (W&B's defaults would)."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    # An in-process W&B run leaves WANDB_SERVICE set; a later subprocess would attach to that service.
    for var in ("WANDB_API_KEY", "WANDB_SERVICE"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def no_network(monkeypatch):
    """A loader that tried to download would hang or fail obscurely offline; make it fail at once."""

    def refuse(*args, **kwargs):
        raise AssertionError("a data test tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def run_cli(args, cwd, timeout=600, env=None):
    """Run ``python -m vision_train`` in a subprocess (fresh JAX, like a user)."""
    full_env = {**os.environ, "PYTHONPATH": REPO, "HYDRA_FULL_ERROR": "0", **(env or {})}
    full_env["XLA_FLAGS"] = FAST_COMPILE  # the CLI sets its own device count from hardware.*
    return subprocess.run([sys.executable, "-m", "vision_train", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------------------------------ SLURM
SLURM_SCRIPT = os.path.join(REPO, ".ci", "slurm.sh")


@pytest.fixture(scope="session")
def slurm():
    """The one-node SLURM cluster of .ci/slurm.sh (slurmctld and slurmd on this host; .ci/run starts it before
    pytest). Started here where it is not running and this process may (root); the tests that need it skip,
    with one line, only where it cannot start. Returns the node's name."""
    import shutil as _shutil

    ok = _shutil.which("sinfo") is not None and subprocess.run(
        ["bash", SLURM_SCRIPT, "--check"], capture_output=True, timeout=60).returncode == 0
    why = "no sinfo (Debian's slurm-wlm is not installed)"
    if not ok and os.geteuid() == 0:
        r = subprocess.run(["bash", SLURM_SCRIPT], capture_output=True, text=True, timeout=900)
        ok = r.returncode == 0
        why = ((r.stderr or r.stdout).strip().splitlines() or [f"exit status {r.returncode}"])[-1]
    elif not ok:
        why = "the cluster is not running and only root can start it (.ci/slurm.sh)"
    if not ok:
        pytest.skip(f"no SLURM cluster here: {why}")
    return subprocess.run(["sinfo", "-h", "-o", "%N"], capture_output=True, text=True, timeout=30).stdout.split()[0]
