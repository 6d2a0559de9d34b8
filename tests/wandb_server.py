"""A W&B-compatible server on 127.0.0.1 for the online tests, and reading runs back through its API.

The server is openwandb 0.5.25 (PyPI; it speaks W&B's GraphQL and file-stream protocol). Its licence is
non-commercial: it is a test tool in its own virtual environment, never a dependency of the package.
Where it comes from, first found first:

1. ``$OPENWANDB_BIN``: its executable (``.ci/run`` installs it and sets this);
2. ``.ci/openwandb-venv/bin/openwandb`` in the repository;
3. that virtual environment, created now (``pip install openwandb==0.5.25``; one xdist worker at a time);
4. none: the online tests are skipped, saying why.

What it lacks (so the project's fallbacks are what is tested): run rewind (``resume_from``), the public
API (``wandb.Api``), the group and job type; it stores artifacts empty and accepts any API key.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VERSION = "0.5.25"
VENV = REPO / ".ci" / "openwandb-venv"
ENV_VAR = "OPENWANDB_BIN"
ADMIN = {"username": "admin", "password": "admin123"}  # the server's built-in account


def _executable() -> tuple[str | None, str]:
    """(path of ``openwandb``, or None; why not)."""
    given = os.environ.get(ENV_VAR)
    if given:
        return (given, "") if os.access(given, os.X_OK) else (None, f"${ENV_VAR}={given} is not an executable")
    exe, done = VENV / "bin" / "openwandb", VENV / ".installed"
    if done.exists():
        return str(exe), ""
    import fcntl
    import shutil

    VENV.parent.mkdir(exist_ok=True)
    with open(VENV.parent / "openwandb-venv.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one xdist worker installs; the others wait for it, then use it
        if not done.exists():
            shutil.rmtree(VENV, ignore_errors=True)  # (a half-made one)
            for cmd in ([sys.executable, "-m", "venv", str(VENV)],
                        [str(VENV / "bin" / "python"), "-m", "pip", "install", "-q", f"openwandb=={VERSION}"]):
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
                if out.returncode != 0:
                    tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or [""]
                    return None, f"could not install openwandb=={VERSION} into {VENV}: {tail[0]}"
            done.write_text(f"openwandb=={VERSION}\n")
    return str(exe), ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(url: str, body: dict | None = None, cookie: str | None = None, timeout: float = 10):
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json",
                                          **({"Cookie": f"openwandb_token={cookie}"} if cookie else {})},
                                 method="GET" if body is None else "POST")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.read()


class Server:
    """One openwandb process: ``url``, ``key`` (an API key it issued), ``env`` (what a run needs: the two
    variables, only in that run's environment), ``kill()``, and the read-back helpers."""

    def __init__(self, exe: str, data_dir: Path):
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(self.data_dir / "server.log", "w")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "OPENWANDB_"))}
        env.update(HOME=str(self.data_dir), OPENWANDB_DATA_DIR=str(self.data_dir / "data"))
        self.proc = subprocess.Popen([exe, "serve", "--host", "127.0.0.1", "--port", str(self.port), "--data-dir",
                                      str(self.data_dir / "data"), "--log-level", "warning"],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.time() + 60
        while True:
            try:
                token = json.loads(_request(f"{self.url}/api/v2/auth/login", ADMIN))["token"]
                break
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    self.kill()
                    raise RuntimeError(f"openwandb did not start: {(self.data_dir / 'server.log').read_text()[-2000:]}")
                time.sleep(0.2)
        made = json.loads(_request(f"{self.url}/api/v2/settings/api-keys", {"name": "tests"}, token))
        self.key = made["api_key"]["key"]
        self.env = {"WANDB_BASE_URL": self.url, "WANDB_API_KEY": self.key}

    def kill(self) -> None:
        """As a crash or a lost network would: SIGKILL, no goodbye."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.log.close()

    # ------------------------------------------------------------------------------- read-back
    def get(self, path: str):
        return json.loads(_request(self.url + path))

    def run(self, run_id: str) -> dict:
        """The run: ``state``, ``config`` (W&B's ``{"value": ...}`` wrappers removed), ``summary``..."""
        run = self.get(f"/api/v2/runs/{run_id}")["run"]
        run["config"] = {k: v.get("value") if isinstance(v, dict) else v for k, v in run["config"].items()}
        return run

    def history(self, run_id: str) -> list[dict]:
        """The run's history rows, as logged: the server stores one (key, W&B's _step, value, time) per
        scalar; a row is what shares its _step and time (a resume without rewind starts _step again)."""
        by_key = self.get(f"/api/v2/runs/{run_id}/metrics")["metrics_by_key"]
        rows: dict[tuple, dict] = defaultdict(dict)
        for key, points in by_key.items():
            for p in points:
                rows[(p["step"], p["wall_time"])][key] = p["value"]
        return [rows[k] for k in sorted(rows, key=lambda k: (k[1], k[0]))]

    def scalars(self, run_id: str) -> dict[tuple[int, str], list[float]]:
        """(our step, key) -> every value the server holds for it (more than one after a resume without
        rewind re-logged it)."""
        out: dict[tuple[int, str], list[float]] = defaultdict(list)
        for row in self.history(run_id):
            step = row.pop("step", None)
            assert step is not None, f"a history row without our step: {row}"
            for key, value in row.items():
                out[(int(step), key)].append(value)
        return dict(out)

    def files(self, run_id: str) -> list[str]:
        return [f["name"] for f in self.get(f"/api/v1/runs/{run_id}/files")["files"]]

    def file(self, run_id: str, name: str, project: str = "vision_train", entity: str = "default") -> bytes:
        return _request(f"{self.url}/files/{entity}/{project}/{run_id}/{name}")


def start_server(data_dir: Path) -> Server:
    """A server of one's own (a test that kills it); skips the test when there is no openwandb."""
    exe, why = _executable()
    if exe is None:
        pytest.skip(f"no W&B-compatible test server: {why} (.ci/run installs one; or set ${ENV_VAR})")
    return Server(exe, data_dir)


@pytest.fixture(scope="session")
def wandb_server(tmp_path_factory):
    """One server per test session (per xdist worker)."""
    server = start_server(tmp_path_factory.mktemp("openwandb"))
    yield server
    server.kill()
