"""Refresh the dependency locks, requirements/cpu.lock and requirements/gpu.lock:

    python tools/lock.py        (4-7 minutes; needs PyPI, and the CPU torch wheel: see CPU_TORCH)

CPU: a fresh temporary virtual environment (this interpreter's Python) gets the project's ranges from
pyproject.toml, `pip install -e ".[dev]"`, and every package it then holds but the project itself is written
at its exact version. GPU: the same pins plus jax's CUDA 12 plugin at the same jax version, `jax[cuda12]`,
resolved against the CPU lock with `pip install --dry-run --report` (resolved, not installed: a GPU set cannot
be installed or tested on a CPU machine). Install from a lock with the command in its header.
"""

from __future__ import annotations

import datetime
import json
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "requirements"
# The CPU build of torch (only torchvision's data sets use it): a local wheel on this project's machines (pip's
# find-links); elsewhere from https://download.pytorch.org/whl/cpu. PyPI's torch 2.13.0 is the CUDA build.
CPU_TORCH = "torch==2.13.0+cpu"
# Narrower than pyproject.toml's ranges (which stay wide for projects that embed the package), for the lock only:
# ml_dtypes 0.7.0 registers its numpy ufunc loops in 0.7 s of CPU at import (numpy's PyUFunc_AddLoop scans the
# loops already added, and 0.7 adds many), against 6 ms for 0.6.0: every process that imports jax (each run, each
# sweep job, each SLURM task) paid it. jax needs ml_dtypes>=0.5.
# pytest 9.2 reads a test's id from a new field, so pytest-xdist 3.8's --dist loadgroup (which renames the old one)
# no longer keeps a group's tests on one worker: every module-scoped run of the tests trained once per worker
# (tests/test_tiers.py checks the groups hold).
LOCK_ONLY = ["ml_dtypes<0.7", "pytest<9.2"]
TORCH_HINT = ("torch's CPU build comes from a local wheel (pip's find-links) or PyTorch's CPU index: "
              "PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu python tools/lock.py")


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()  # (PEP 503: Flax, PyYAML, orbax_checkpoint -> flax, pyyaml, ...)


def pip(venv: Path, *args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(venv / "bin" / "python"), "-m", "pip", *args], check=True, cwd=ROOT, **kw)


def header(what: list[str], install: str, pip_version: str) -> str:
    lines = [*what,
             f"Resolved {datetime.date.today().isoformat()} for CPython {platform.python_version()} on "
             f"{platform.system()} {platform.machine()} ({'-'.join(platform.libc_ver())}), pip {pip_version}.",
             f"Install:  {install}",
             "Refresh:  python tools/lock.py   (change pyproject.toml's ranges, never this file by hand)",
             "torch is its CPU build: a local wheel on this project's machines; elsewhere add",
             "--extra-index-url https://download.pytorch.org/whl/cpu to the install."]
    return "".join(f"# {line}\n" for line in lines)


def write(path: Path, head: str, pins: dict[str, str]) -> None:
    path.write_text(head + "".join(f"{name}=={pins[name]}\n" for name in sorted(pins)))
    print(f"wrote {path.relative_to(ROOT)}: {len(pins)} packages")


def main() -> None:
    OUT.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="vision_train-lock-") as tmp:
        tmp, venv = Path(tmp), Path(tmp) / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip(venv, "install", "-q", "--upgrade", "pip")
        (tmp / "torch.txt").write_text("".join(f"{line}\n" for line in [CPU_TORCH, *LOCK_ONLY]))
        try:
            pip(venv, "install", "-q", "-c", str(tmp / "torch.txt"), "-e", ".[dev]")
        except subprocess.CalledProcessError:
            sys.exit(f"the install from pyproject.toml's ranges failed (above). {TORCH_HINT}")
        # --all: setuptools too (torch needs setuptools>=77 at run time; the venv's own is older)
        frozen = pip(venv, "freeze", "--all", "--exclude-editable", capture_output=True, text=True).stdout
        cpu = {norm(name): version for name, version in (line.split("==") for line in frozen.split() if "==" in line)
               if norm(name) != "pip"}
        pip_version = pip(venv, "--version", capture_output=True, text=True).stdout.split()[1]
        assert cpu.get("torch") == CPU_TORCH.split("==")[1], cpu.get("torch")
        assert cpu.get("torchvision", "").startswith("0.28."), cpu.get("torchvision")

        report, pins = tmp / "gpu.json", tmp / "cpu.txt"
        pins.write_text("".join(f"{name}=={version}\n" for name, version in cpu.items()))
        pip(venv, "install", "-q", "--dry-run", "--ignore-installed", "--report", str(report),
            "-c", str(pins), "-e", ".[dev]", f"jax[cuda12]=={cpu['jax']}")
        gpu = {norm(item["metadata"]["name"]): item["metadata"]["version"]
               for item in json.loads(report.read_text())["install"]}
        gpu.pop("vision-train")  # (the project itself)
        assert all(gpu.get(name) == version for name, version in cpu.items()), "the GPU set changed a CPU pin"
        write(OUT / "cpu.lock", header(
            ["requirements/cpu.lock: every package of the CPU install (pip install -e \".[dev]\"), transitive ones",
             "included, at its exact version."], 'pip install -c requirements/cpu.lock -e ".[dev]"', pip_version), cpu)
        write(OUT / "gpu.lock", header(
            ["requirements/gpu.lock: the CPU lock's pins plus jax's CUDA 12 plugin (jax[cuda12]) and what it pulls",
             "in, for NVIDIA GPUs. Resolved with pip install --dry-run against the CPU lock: NOT installed or tested",
             "(the machine that resolves it has no GPU)."],
            'pip install -c requirements/gpu.lock -e ".[dev]" "jax[cuda12]"', pip_version), gpu)


if __name__ == "__main__":
    main()
