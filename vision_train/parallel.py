"""Devices and the data-parallel mesh (DESIGN.md, decision 1: jit + NamedSharding, not pmap).

Imports JAX: what must happen before JAX starts (``XLA_FLAGS``, ``JAX_PLATFORMS``) is ``vision_train.host_devices``.
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np
from jax.experimental.compilation_cache import compilation_cache as cc
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from .errors import ConfigError

# Its home before; callers that run before JAX starts import it from host_devices, which does not import JAX.
from .host_devices import configure_host_devices  # noqa: F401


def initialize_distributed() -> None:
    """Multi-host: jax.distributed auto-detects TPU pods, SLURM and Open MPI; otherwise set
    JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID."""
    if jax.distributed.is_initialized():  # must run before anything initialises the XLA backend
        return
    kwargs = {}
    if "JAX_COORDINATOR_ADDRESS" in os.environ:
        kwargs = dict(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                      num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                      process_id=int(os.environ["JAX_PROCESS_ID"]))
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes talk over gloo
    jax.distributed.initialize(**kwargs)


def select_devices(platform: str, num_devices: int):
    """The devices to train on: all of the platform's (global, across hosts), or the first ``num_devices``."""
    try:
        devices = jax.devices() if platform == "auto" else jax.devices(platform)
    except RuntimeError as e:
        raise ConfigError("hardware.platform", platform,
                          f"no {platform} devices here ({str(e).splitlines()[0]}); use hardware=auto or hardware=cpu") from None
    if num_devices and jax.process_count() > 1 and num_devices != len(devices):
        raise ConfigError("hardware.num_devices", num_devices,
                          f"a multi-host run uses every device of every host; set hardware.num_devices=0 "
                          f"({len(devices)} devices over {jax.process_count()} processes)")
    if num_devices:
        if num_devices > len(devices):
            hint = (" (simulated CPU devices: hardware=cpu hardware.num_devices=N sets them up)" if platform != "cpu"
                    else " (simulated CPU devices are fixed when JAX starts, so the jobs of a sweep in one process "
                         "share the first job's count: put the largest first, or use hydra/launcher=joblib)")
            raise ConfigError("hardware.num_devices", num_devices,
                              f"only {len(devices)} {devices[0].platform} device(s) found; use at most {len(devices)}{hint}")
        devices = devices[:num_devices]
    return devices


def make_mesh(devices):
    return jax.make_mesh((len(devices),), ("data",), axis_types=(AxisType.Auto,), devices=devices)


def put_replicated(x, sharding):
    """A host array -> a global array replicated on every device of the mesh. Every process holds the
    same host data (the data sets are loaded on each host), so each fills its own devices: this works
    across hosts, where ``jax.device_put`` onto non-addressable devices would not."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def replicated(mesh):
    return NamedSharding(mesh, P())


def batch_sharded(mesh):
    return NamedSharding(mesh, P("data"))


def check_batch_divisible(batch_size: int, num_devices: int) -> None:
    if batch_size % num_devices:
        lower = batch_size // num_devices * num_devices
        upper = lower + num_devices
        fix = f"use trainer.batch_size={upper}" + (f" or {lower}" if lower else "")
        raise ConfigError("trainer.batch_size", batch_size,
                          f"the global batch must divide evenly across the {num_devices} devices; {fix} "
                          f"(or set hardware.num_devices)")


def compilation_cache_dir(setting: str | None) -> str | None:
    """``hardware.compilation_cache`` -> a directory, or None for off."""
    if setting is None or str(setting).lower() in ("", "none", "null", "off", "false"):
        return None
    if setting == "auto":
        setting = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "vision_train", "jax")
    return os.path.abspath(os.path.expanduser(setting))


def enable_compilation_cache(setting: str | None) -> str | None:
    """JAX's persistent compilation cache: every jitted program (steps, init, eval) is written to and read
    from ``setting``'s directory, so the second job of a sweep (in this process or another, on this
    machine or any sharing the directory) skips XLA compilation of programs it has seen. The key covers
    the program, devices, XLA flags and versions; a stale entry cannot be hit. Returns the directory."""
    path = compilation_cache_dir(setting)
    if path is not None:
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            logging.getLogger("vision_train").warning(
                "hardware.compilation_cache=%s: cannot create it (%s); compiling without the cache", path, e)
            path = None
    if (path is not None) == jax.config.jax_enable_compilation_cache and path == jax.config.jax_compilation_cache_dir:
        return path  # as it is (a sweep's later jobs in this process)
    if path is None:
        jax.config.update("jax_enable_compilation_cache", False)
    else:
        jax.config.update("jax_enable_compilation_cache", True)
        jax.config.update("jax_compilation_cache_dir", path)
        # Small models compile in well under JAX's default 1 s threshold, and those are a sweep's
        # typical jobs: cache everything.
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    cc.reset_cache()  # the cache object is created once per process; make it follow the new setting
    return path
