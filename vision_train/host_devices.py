"""What the hardware settings ask of XLA through the environment, before JAX starts.

``XLA_FLAGS`` (simulated CPU devices) is read when JAX's backend starts and ``JAX_PLATFORMS`` when ``jax`` is
imported: the command lines call ``configure_host_devices`` before they import anything that imports JAX.
This module imports nothing that does (``vision_train.parallel``, the mesh, is what comes after).

It also reads, from the environment alone, whether this process is one of several of one run
(``hardware.distributed``; docs/launchers.md): a SLURM job step of more than one task (``srun -n 2``, or
submitit's tasks under ``hydra/launcher=slurm``), Open MPI (``mpirun -n 2``), a TPU pod, or
``JAX_COORDINATOR_ADDRESS``/``JAX_NUM_PROCESSES``/``JAX_PROCESS_ID`` set by hand. The command line decides
from it, before JAX starts, which process writes the run's records (process 0) and which GPUs each process
takes (``local_device_ids``).
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass
from typing import Callable, Mapping

from .errors import ConfigError

DISTRIBUTED = ("auto", "true", "false")


def configure_host_devices(platform: str, num_devices: int) -> None:
    """Before JAX initialises: ask XLA for ``num_devices`` simulated CPU devices when running on CPU (in a run
    of several processes, each process gets ``num_devices``)."""
    if platform == "cpu":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        if num_devices > 1:
            flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
            flags.append(f"--xla_force_host_platform_device_count={num_devices}")
            os.environ["XLA_FLAGS"] = " ".join(flags)


def distributed_setting(value) -> str:
    """``hardware.distributed`` -> "auto", "true" or "false" (booleans, as YAML and the command line give
    ``true``/``false``, are accepted)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value).strip().lower()
    if text not in DISTRIBUTED:
        raise ConfigError("hardware.distributed", value,
                          "choose auto (join a run of several processes where SLURM, Open MPI, a TPU pod or "
                          "JAX_COORDINATOR_ADDRESS says there is one), true (insist on one) or false (never)")
    return text


# ------------------------------------------------------------------------------------------ processes
@dataclass(frozen=True)
class Processes:
    """What the environment says about the processes of this run."""

    source: str                  # "SLURM", "Open MPI", "TPU pod", "JAX_COORDINATOR_ADDRESS"
    count: int | None            # None: not said (JAX works it out)
    index: int | None            # this process's rank
    local_index: int | None      # its rank on this host
    local_count: int | None      # the processes on this host
    where: str = ""              # e.g. "SLURM job 12 step 0"

    @property
    def several(self) -> bool:
        return self.count is None or self.count > 1


def _int(env: Mapping[str, str], name: str) -> int | None:
    try:
        return int(env[name])
    except (KeyError, ValueError):
        return None


def slurm_tasks_on_node(tasks_per_node: str, node_id: int) -> int | None:
    """SLURM's compressed ``SLURM_STEP_TASKS_PER_NODE`` ("2", "2(x3)", "2(x2),1") -> the count on node ``node_id``."""
    counts = []
    for part in tasks_per_node.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            return None
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts[node_id] if 0 <= node_id < len(counts) else None


def detect_processes(env: Mapping[str, str] | None = None) -> Processes | None:
    """The processes of this run as the environment says them, or None where it says nothing (one process).
    Read as JAX's own cluster detection reads them, so both agree."""
    env = os.environ if env is None else env
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return Processes("JAX_COORDINATOR_ADDRESS", _int(env, "JAX_NUM_PROCESSES"), _int(env, "JAX_PROCESS_ID"),
                         None, None, f"coordinator {env['JAX_COORDINATOR_ADDRESS']}")
    # SLURM: a job step (srun) sets SLURM_STEP_NODELIST; a batch script, one process, does not.
    if all(k in env for k in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")):
        local_count = None
        if "SLURM_STEP_TASKS_PER_NODE" in env:
            local_count = slurm_tasks_on_node(env["SLURM_STEP_TASKS_PER_NODE"], _int(env, "SLURM_NODEID") or 0)
        step = env.get("SLURM_STEP_ID", env.get("SLURM_STEPID", "?"))
        return Processes("SLURM", _int(env, "SLURM_NTASKS"), _int(env, "SLURM_PROCID"), _int(env, "SLURM_LOCALID"),
                         local_count, f"SLURM job {env['SLURM_JOB_ID']} step {step}")
    if "OMPI_MCA_orte_hnp_uri" in env:  # (Open MPI 4, as JAX detects it; Open MPI 5: set JAX_COORDINATOR_ADDRESS ...)
        return Processes("Open MPI", _int(env, "OMPI_COMM_WORLD_SIZE"), _int(env, "OMPI_COMM_WORLD_RANK"),
                         _int(env, "OMPI_COMM_WORLD_LOCAL_RANK"), _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE"), "Open MPI")
    hosts = env.get("TPU_WORKER_HOSTNAMES") or env.get("TPU_PROCESS_ADDRESSES")
    if hosts:  # (Cloud TPU VMs without these say it through their metadata server: vision_train.parallel asks it)
        return Processes("TPU pod", len([h for h in hosts.split(",") if h]), _int(env, "TPU_WORKER_ID"), 0, 1, "TPU pod")
    return None


def wants_distributed(setting, env: Mapping[str, str] | None = None) -> bool:
    """Whether ``hardware.distributed=setting`` makes this process one of several (true: always; false:
    never; auto: where the environment says there are several)."""
    setting = distributed_setting(setting)
    if setting != "auto":
        return setting == "true"
    found = detect_processes(env)
    return found is not None and found.several


def is_main_process(setting, env: Mapping[str, str] | None = None) -> bool:
    """Process 0 of a run of several (the one that logs and writes the records), or a process on its own."""
    if not wants_distributed(setting, env):
        return True
    found = detect_processes(env)
    return found is None or found.index in (None, 0)


# ------------------------------------------------------------------------------------------ GPUs
def visible_gpus(env: Mapping[str, str] | None = None) -> int | None:
    """How many NVIDIA GPUs this process sees: ``CUDA_VISIBLE_DEVICES`` if set, else the driver's count
    (None where neither says)."""
    env = os.environ if env is None else env
    if "CUDA_VISIBLE_DEVICES" in env:
        ids = [d for d in env["CUDA_VISIBLE_DEVICES"].split(",") if d.strip() not in ("", "-1")]
        return len(ids)
    found = glob.glob("/proc/driver/nvidia/gpus/*") or [p for p in glob.glob("/dev/nvidia*") if re.fullmatch(r"/dev/nvidia\d+", p)]
    return len(found) or None


def local_device_ids(processes: Processes | None, gpus: int | None) -> list[int] | None:
    """The GPUs (ordinals among those visible) this process takes, for ``jax.distributed.initialize``:

    - one process per node (one task on this host): every GPU it sees;
    - one process per GPU, each task given its own GPU (``--gpus-per-task=1``, ``--gpu-bind``; CUDA_VISIBLE_DEVICES
      holds one): that one;
    - one process per GPU, every task seeing the node's GPUs (``--gpus-per-node=K`` with K tasks a node): GPU
      SLURM_LOCALID (Open MPI: OMPI_COMM_WORLD_LOCAL_RANK);
    - K tasks sharing G visible GPUs, G a multiple of K: G / K consecutive GPUs each.

    None: leave it to JAX (no GPUs, or nothing said about this host's processes). JAX's own default under SLURM
    and Open MPI, one GPU numbered by the local rank, is wrong for the first two cases."""
    if not gpus or processes is None or processes.local_index is None:
        return None
    local, per_host = processes.local_index, processes.local_count
    if per_host == 1 or gpus == 1:
        return list(range(gpus))
    if per_host is None:
        return [local] if local < gpus else None
    if gpus % per_host:
        raise ConfigError("hardware.distributed", "auto",
                          f"{per_host} processes on this host share {gpus} visible GPUs unevenly; run one process per "
                          f"GPU (--ntasks-per-node={gpus}) or one per node (--ntasks-per-node=1)")
    share = gpus // per_host
    return list(range(local * share, (local + 1) * share))


# ------------------------------------------------------------------------------------------ a lost process
_lost_handlers: list[Callable[[str], None]] = []


def on_lost_process(handler: Callable[[str], None]) -> None:
    """``handler(line)`` runs in a surviving process when another process of the run is lost (killed, crashed,
    unreachable), before the process exits: e.g. to write the run's final record. ``line`` names the lost
    process. (vision_train.parallel calls these; registered here, where no JAX import is needed.)"""
    _lost_handlers.append(handler)


def lost_process_handlers() -> list[Callable[[str], None]]:
    return list(_lost_handlers)
