"""Test set-up: 8 simulated CPU devices (must be set before JAX initialises) and isolated W&B state."""

import os
import shutil
import socket
import subprocess
import sys
import tempfile

# XLA's CPU backend at -O0 compiles tiny test models ~3x faster (4.8 s -> 1.4 s for a ViT init); tests
# assert behaviour, not speed, and the suite is dominated by compilation. Subprocess CLI runs get it too.
FAST_COMPILE = "--xla_backend_optimization_level=0"
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
