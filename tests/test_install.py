"""The locked install: requirements/cpu.lock pins every package within pyproject.toml's ranges (the GPU lock the
same pins plus jax's CUDA plugin), and each run's config.yaml records the versions it ran with, as comments."""

import importlib.metadata
import itertools
import os
import tomllib

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from vision_train import config as config_lib
from vision_train.train.loop import train

from .conftest import REPO
from .helpers import FAST, compose


def read_lock(name):
    """{normalised name: version} of requirements/<name>; every line that is not a comment is name==version."""
    pins = {}
    with open(os.path.join(REPO, "requirements", name)) as f:
        for line in f:
            if line.strip() and not line.startswith("#"):
                pkg, sep, version = line.strip().partition("==")
                assert sep and version and not set(version) & set("<>=!*~;, "), f"{name}: not an exact pin: {line!r}"
                assert canonicalize_name(pkg) not in pins, f"{name}: {pkg} twice"
                pins[canonicalize_name(pkg)] = version
    return pins


@pytest.mark.fast
def test_the_cpu_lock_pins_every_dependency_within_pyprojects_ranges_and_the_gpu_lock_the_same_pins():
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    cpu = read_lock("cpu.lock")
    for line in project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        assert name in cpu, f"{req.name} (pyproject.toml) is not in requirements/cpu.lock: python tools/lock.py"
        assert req.specifier.contains(cpu[name], prereleases=True), \
            f"requirements/cpu.lock pins {name}=={cpu[name]}, outside pyproject.toml's {req}: python tools/lock.py"
    assert cpu["torch"].endswith("+cpu") and cpu["torchvision"].startswith("0.28.")  # torch: the CPU build
    gpu = read_lock("gpu.lock")
    assert {k: gpu.get(k) for k in cpu} == cpu  # the same pins, and jax's CUDA 12 plugin at jax's version
    assert gpu["jax-cuda12-plugin"] == gpu["jax-cuda12-pjrt"] == cpu["jax"] == cpu["jaxlib"]


@pytest.mark.fast
def test_config_yaml_starts_with_the_versions_a_run_ran_with_and_parses_to_the_config(tmp_path):
    cfg = compose([*FAST, "model=mlp", "data=digits", "trainer.epochs=1"])
    run = tmp_path / "run"
    summary = train(cfg, run)
    text = (run / "config.yaml").read_text()
    head = list(itertools.takewhile(lambda line: line.startswith("#"), text.splitlines()))
    assert head and all(line.startswith("# version ") for line in head), text[:500]
    versions = dict(line.removeprefix("# version ").split("==") for line in head)
    for pkg in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy"):
        assert versions[pkg] == importlib.metadata.version(pkg), (pkg, versions)
    assert "python" in versions
    assert yaml.safe_load(text) == config_lib.to_dict(cfg)  # comments only: the keys are the config's
    assert train(cfg, run) == summary  # and a re-run compares those keys: finished, nothing to do
