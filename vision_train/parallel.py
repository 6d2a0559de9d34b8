"""Devices and the data-parallel mesh (DESIGN.md, decision 1: jit + NamedSharding, not pmap), and several
processes as one run (``jax.distributed``; docs/launchers.md).

Imports JAX: what must happen before JAX starts (``XLA_FLAGS``, ``JAX_PLATFORMS``, whether this process is one of
several) is ``vision_train.host_devices``.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import selectors
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
from jax._src import distributed as _dist
from jax.experimental.compilation_cache import compilation_cache as cc
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from .errors import ConfigError

# Its home before; callers that run before JAX starts import it from host_devices, which does not import JAX.
from .host_devices import configure_host_devices  # noqa: F401
from .host_devices import (detect_processes, distributed_setting, local_device_ids, lost_process_handlers,
                           visible_gpus)

log = logging.getLogger("vision_train")

# JAX's coordination service counts a process lost when it has sent no heartbeat for this long, and then ends every
# other process (its own lines, "Terminating process because the JAX distributed service detected fatal errors").
# That is the fallback for a host that vanishes without closing its connections; a process that dies (kill -9, a
# crash) closes them, and the lifeline below says so within a second.
HEARTBEAT_TIMEOUT_S = 90
# The lifeline's own silence limit (below the heartbeat's, so its one line comes first): a process that has sent
# nothing for this long, its connection open, is lost.
SILENCE_S = 60
PING_S = 5
_KV = "vision_train"


def initialize_distributed(setting="auto", platform: str = "auto") -> bool:
    """Join the run's other processes (``jax.distributed.initialize``), before anything starts JAX's backend.

    ``setting`` is ``hardware.distributed``: auto joins where SLURM (a job step of more than one task), Open MPI,
    a TPU pod or JAX_COORDINATOR_ADDRESS (with JAX_NUM_PROCESSES and JAX_PROCESS_ID) says there are several
    processes; true insists (an error where nothing says where the others are); false never joins. On GPUs each
    process takes its share of the GPUs it sees (``host_devices.local_device_ids``: one process per GPU, or
    one per node). Returns whether this process is one of several."""
    setting = distributed_setting(setting)
    if jax.distributed.is_initialized():
        return True
    if setting == "false":
        return False
    found = detect_processes()
    if setting == "auto" and not ((found is not None and found.several) or _tpu_pod()):
        return False
    kwargs: dict = {}
    if found is not None and found.source == "JAX_COORDINATOR_ADDRESS":
        if found.count is None or found.index is None:
            raise ConfigError("hardware.distributed", setting, "JAX_COORDINATOR_ADDRESS is set: set JAX_NUM_PROCESSES "
                              "(how many processes) and JAX_PROCESS_ID (this one's, from 0) too")
        kwargs = dict(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"], num_processes=found.count,
                      process_id=found.index)
    if platform in ("auto", "gpu") and not os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
        ids = local_device_ids(found, visible_gpus())
        if ids is not None:
            kwargs["local_device_ids"] = ids
    if platform == "cpu" or os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes talk over gloo
    real_service = _dist._jax.get_distributed_runtime_service
    _dist._jax.get_distributed_runtime_service = _ServiceProcess  # (called on process 0 only)
    try:
        jax.distributed.initialize(heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S, **kwargs)
    except ValueError as e:
        if found is None:
            raise ConfigError("hardware.distributed", setting,
                              "no SLURM job step, Open MPI job or TPU pod found here, and JAX_COORDINATOR_ADDRESS is "
                              "unset: start the processes with srun or mpirun, or set JAX_COORDINATOR_ADDRESS, "
                              "JAX_NUM_PROCESSES and JAX_PROCESS_ID; or use hardware.distributed=auto") from None
        raise
    finally:
        _dist._jax.get_distributed_runtime_service = real_service
    atexit.register(_leave_distributed)  # (registered before the lifeline's: runs after it, after Orbax's)
    _Run.start(found)
    return True


# At exit, how long process 0 keeps JAX's coordination service for the other processes to leave (their clients
# shut down and their processes end), once its own client has shut down.
LEAVE_WAIT_S = 60


def _leave_distributed() -> None:
    """At exit, every process: shut JAX's client down here (``jax.distributed.shutdown``: the shutdown barrier,
    every process taking part) instead of at the interpreter's very end. On process 0 that ends with the service's
    own shutdown (``_ServiceProcess.shutdown``), which waits until the other processes have left (their lifeline
    connections closed: their processes ended) before the service goes: a service that went as soon as process 0
    had passed the barrier aborted a process still leaving ("Failed to send RPC to coordination service",
    exit 134: its client's error polling, not yet stopped, lost the service)."""
    try:
        jax.distributed.shutdown()
    except Exception as e:  # noqa: BLE001 (a process lost at the end: said by the lifeline; nothing else to do)
        log.debug("jax.distributed.shutdown: %s", e)


# JAX's coordination service, which process 0 would host itself, runs in a small process of its own beside it
# (jaxlib only), which outlives process 0 by this long: when process 0 dies the others' JAX clients would end their
# processes at once on losing the service ("Terminating process because the JAX distributed service detected fatal
# errors", naming no process); with the service still there, the lifeline says which process was lost first.
# A process 0 that leaves normally says "bye" first: its service then ends with it (a requeued SLURM job, whose
# coordinator port is its job id's, binds it again at once).
SERVICE_GRACE_S = 10
_SERVICE = r"""
import os, signal, sys, time
for s in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGALRM", "SIGPIPE"):
    signal.signal(getattr(signal, s), signal.SIG_IGN)  # (Ctrl-C, SLURM's signals to the step: for the training processes)
import jaxlib._jax as _jax
address, n, heartbeat, shutdown, grace = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
service = _jax.get_distributed_runtime_service(address, n, heartbeat_timeout=heartbeat, shutdown_timeout=shutdown)
print("ready", flush=True)
bye = False
for line in sys.stdin.buffer:  # until process 0 has ended (its end of the pipe closed)
    bye = bye or line.strip() == b"bye"
if not bye:  # process 0 was lost: the others are saying so
    time.sleep(grace)
os._exit(0)
"""


class _ServiceProcess:
    """Stands in for ``jaxlib._jax.get_distributed_runtime_service`` in ``jax.distributed.initialize``: the
    service in its own process (``_SERVICE``), bound to the same address."""

    def __init__(self, address, num_nodes, heartbeat_timeout=None, shutdown_timeout=None, **_):
        args = [address, str(num_nodes), str(heartbeat_timeout or HEARTBEAT_TIMEOUT_S), str(shutdown_timeout or 300),
                str(SERVICE_GRACE_S)]
        # (its output through pipes of this process, not this process's own stdout/stderr: whoever reads those is
        # not kept waiting by a process that outlives this one)
        self.proc = subprocess.Popen([sys.executable, "-c", _SERVICE, *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        if self.proc.stdout.readline().strip() != b"ready":
            err = self.proc.stderr.read().decode(errors="replace").strip().splitlines()
            raise RuntimeError(f"JAX's coordination service did not start on {address} (exit status "
                               f"{self.proc.wait()}): {err[-1] if err else 'no message'}")
        threading.Thread(target=self._relay, name="vision_train-service-log", daemon=True).start()
        atexit.register(self.bye)

    def bye(self) -> None:
        """Process 0 leaves normally: the service ends as soon as process 0 has (its own JAX client shuts down
        last, at the interpreter's end, waiting at JAX's shutdown barrier for every other process)."""
        try:
            self.proc.stdin.write(b"bye\n")
            self.proc.stdin.flush()
        except (OSError, ValueError):
            pass

    def _relay(self) -> None:
        for line in self.proc.stderr:  # the service's own log lines (errors about lost processes)
            sys.stderr.write(line.decode(errors="replace"))

    def shutdown(self) -> None:
        """``jax.distributed.shutdown()`` on process 0, after its client has shut down (every process has passed the
        shutdown barrier): the service stays until the other processes have left (at most LEAVE_WAIT_S), then
        ends."""
        run = _Run.current
        if run is not None and run.lifeline is not None:
            run.lifeline.wait_closed(LEAVE_WAIT_S)
        self.bye()
        try:
            self.proc.stdin.close()
        except OSError:
            pass


def _tpu_pod() -> bool:
    """A Cloud TPU VM of a pod (several hosts), as JAX's own detection sees it (its metadata server)."""
    try:
        from jax._src import clusters

        for env in clusters.ClusterEnv._cluster_types:
            if "Tpu" in env.__name__ and env.is_env_present():
                return env.get_process_count() > 1
    except Exception:  # noqa: BLE001 (JAX's private API moved: no pod found)
        return False
    return False


class _Run:
    """This process's place in a run of several: who the others are (host, pid, the launcher's name for them),
    the start-up line, and the lifeline that ends it when another process is lost."""

    current: "_Run | None" = None

    def __init__(self, found, client, index: int, count: int):
        self.found, self.client, self.index, self.count = found, client, index, count
        self.coordinator = _dist.global_state.coordinator_address
        self.peers: dict[int, dict] = {}
        self.said_start = False
        self.lifeline: _Lifeline | None = None
        self.proposed, self.stop_at, self.stop_signum = False, None, 0  # (agreed_stop)

    @classmethod
    def start(cls, found) -> None:
        state = _dist.global_state
        run = cls(found, state.client, state.process_id, state.num_processes)
        cls.current = run
        if run.index != 0:  # process 0 logs; the others say warnings and errors only
            log.setLevel(max(log.getEffectiveLevel(), logging.WARNING))
        if run.client is None or run.count < 2:
            return
        me = {"host": socket.gethostname(), "pid": os.getpid(), "task": _launcher_name(found, run.index)}
        run.client.key_value_set(f"{_KV}/proc/{run.index}", json.dumps(me))
        for i in range(run.count):
            try:
                run.peers[i] = json.loads(run.client.blocking_key_value_get(f"{_KV}/proc/{i}", 300_000))
            except Exception:  # noqa: BLE001 (a process that never said: named by its index only)
                run.peers[i] = {}
        run.lifeline = _Lifeline(run)
        run.lifeline.start()

    def name(self, i: int) -> str:
        p = self.peers.get(i) or {}
        where = ", ".join(x for x in (p.get("host"), f"pid {p['pid']}" if "pid" in p else None, p.get("task")) if x)
        return f"process {i} of {self.count}" + (f" ({where})" if where else "")

    def start_line(self, mesh) -> str:
        hosts = sorted({p.get("host", "?") for p in self.peers.values()}) or [socket.gethostname()]
        local = jax.local_devices()
        per = f"{len(local)} {local[0].platform} device{'s' if len(local) > 1 else ''} per process"
        shape = " x ".join(f"{name}={size}" for name, size in mesh.shape.items())
        via = f" ({self.found.where})" if self.found is not None and self.found.where else ""
        host_list = ", ".join(hosts[:4]) + (f", ... ({len(hosts)} in all)" if len(hosts) > 4 else "")
        return (f"distributed: {self.count} processes on {len(hosts)} host{'s' if len(hosts) > 1 else ''} "
                f"({host_list}), {per}, mesh {shape} ({mesh.size} devices), coordinator {self.coordinator}{via}")

    def lost(self, i: int, how: str) -> None:
        """Another process is lost: one line, the handlers (the run's final record), and this process ends."""
        line = (f"error: {self.name(i)} was lost ({how}); every process of the run stops (this is process "
                f"{self.index}). Run the same command again to resume from the last checkpoint")
        try:
            log.error("%s", line)
            for handler in lost_process_handlers():
                try:
                    handler(line, i, self.index)
                except Exception as e:  # noqa: BLE001
                    print(f"error: while recording the lost process: {e}", file=sys.stderr)
        finally:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except Exception:  # noqa: BLE001
                    pass
            logging.shutdown()
            os._exit(LOST_EXIT)


LOST_EXIT = 1  # the exit status of a process ended because another was lost


def agreed_stop(received: int, step: int, margin: int) -> int:
    """The signal to stop on after step ``step`` (0: go on). One process: the one it received. Several: SLURM
    signals every task at once, but each process's loop may be a few steps ahead of another's (it waits for the
    devices only when a hook is due), so each stopping after its current step would stop them after different
    steps, and the checkpoint save, which every process takes part in, would wait for ever. The first process to
    receive a signal proposes ``step + margin`` (margin: more than the steps between two of the loop's waits, so
    no process is past it yet) in JAX's key-value store; the first proposal stands, every process reads it after
    each step and stops after that step."""
    run = _Run.current
    if run is None or run.count < 2 or run.client is None:
        return received
    if run.stop_at is None:
        if received and not run.proposed:
            run.proposed = True
            try:
                run.client.key_value_set(f"{_KV}/stop_at", f"{step + margin} {received}")  # (fails if one stands)
            except Exception:  # noqa: BLE001
                pass
        try:
            value = run.client.key_value_try_get(f"{_KV}/stop_at")
        except Exception:  # noqa: BLE001 (none yet)
            value = None
        if value:
            at, signum = (int(v) for v in value.split())
            run.stop_at, run.stop_signum = at, signum
            if step > at:  # (cannot happen while margin holds)
                log.warning("the processes agreed to stop after step %d; this one is past it (step %d)", at, step)
    if run.stop_at is not None and step >= run.stop_at:
        return run.stop_signum
    return 0


def _launcher_name(found, index: int) -> str | None:
    if found is None:
        return None
    return {"SLURM": f"SLURM task {index}", "Open MPI": f"MPI rank {index}", "TPU pod": f"TPU worker {index}"}.get(found.source)


class _Lifeline:
    """A TCP connection from every process to process 0. A process that dies (kill -9, a crash, the OOM killer)
    closes its connection; its peer sees the end at once. Process 0 tells every other process which one was lost;
    a process that loses process 0's connection knows process 0 was lost. A process leaving normally says "bye"
    first. Each side pings every PING_S seconds; SILENCE_S without a word from an open connection also counts as
    lost (a host that hung); JAX's heartbeats are the last resort."""

    def __init__(self, run: _Run):
        self.run = run
        self.sel = selectors.DefaultSelector()
        self.conns: dict[socket.socket, dict] = {}
        self.lock = threading.Lock()
        self.leaving = False      # at exit: no more pings
        self.said_bye = False     # from here on a closed connection is no loss
        self.quiet = threading.Event()

    def start(self) -> None:
        run = self.run
        key = f"{_KV}/lifeline"
        if run.index == 0:
            server = socket.create_server(("", 0), family=socket.AF_INET6, dualstack_ipv6=True) \
                if socket.has_dualstack_ipv6() else socket.create_server(("", 0))
            port = server.getsockname()[1]
            run.client.key_value_set(key, str(port))
            server.settimeout(300)
            for _ in range(run.count - 1):
                conn, _ = server.accept()
                conn.settimeout(300)
                peer = int(_read_line(conn))
                conn.settimeout(None)
                self._add(conn, peer)
            server.close()
        else:
            port = int(run.client.blocking_key_value_get(key, 300_000))
            host = run.coordinator.rsplit(":", 1)[0].strip("[]")
            conn = socket.create_connection((host, port), timeout=300)
            conn.sendall(f"{run.index}\n".encode())
            conn.settimeout(None)
            self._add(conn, 0)
        atexit.register(self.leave)
        threading.Thread(target=self._watch, name="vision_train-lifeline", daemon=True).start()
        threading.Thread(target=self._ping, name="vision_train-lifeline-ping", daemon=True).start()

    def _add(self, conn: socket.socket, peer: int) -> None:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        self.conns[conn] = {"peer": peer, "buf": b"", "heard": time.monotonic(), "bye": False, "open": True}
        self.sel.register(conn, selectors.EVENT_READ)

    def _send_all(self, message: str) -> None:
        with self.lock:
            for conn, c in list(self.conns.items()):
                if not c["bye"]:
                    try:
                        conn.sendall(message.encode())
                    except OSError:
                        pass  # (its end is seen by the watcher)

    def _ping(self) -> None:
        while not self.leaving:
            self._send_all("ping\n")
            time.sleep(PING_S)

    def _watch(self) -> None:
        run = self.run
        while True:
            events = self.sel.select(timeout=1.0)
            now = time.monotonic()
            for key, _ in events:
                conn = key.fileobj
                c = self.conns[conn]
                try:
                    data = conn.recv(4096)
                except OSError:
                    data = b""
                if not data:  # the other end closed: gone, unless it said bye
                    self.sel.unregister(conn)
                    c["open"] = False
                    if not c["bye"] and not self.said_bye:
                        self._lost(c["peer"], "killed or crashed: its connection closed")
                    continue
                c["heard"] = now
                c["buf"] += data
                while b"\n" in c["buf"]:
                    line, c["buf"] = c["buf"].split(b"\n", 1)
                    words = line.decode(errors="replace").split()
                    if words[:1] == ["bye"]:
                        c["bye"] = True
                    elif words[:1] == ["lost"] and run.index != 0 and not self.said_bye:
                        run.lost(int(words[1]), " ".join(words[2:]))
            for conn, c in list(self.conns.items()):
                if c["open"] and not c["bye"] and not self.leaving and now - c["heard"] > SILENCE_S:
                    self._lost(c["peer"], f"nothing heard from it for {SILENCE_S} s")
            if self.leaving:
                self.quiet.set()

    def _lost(self, peer: int, how: str) -> None:
        if self.run.index == 0:  # tell the others which one, then stop
            self._send_all(f"lost {peer} {how}\n")
        self.run.lost(peer, how)

    def leave(self) -> None:
        """At exit (atexit, before JAX's client is shut down): a loss already under way is said first (a
        collective that failed because a process died ends this one with an error a moment before its closed
        connection is read), then "bye", so the others do not count this process lost."""
        if self.leaving:
            return
        self.leaving = True
        self.quiet.clear()
        self.quiet.wait(3.0)  # the watcher's next turn, after what has arrived until now
        self._send_all("bye\n")
        self.said_bye = True

    def wait_closed(self, timeout: float) -> bool:
        """Until every other process's connection has closed (its process ended), at most ``timeout`` seconds."""
        end = time.monotonic() + timeout
        while any(c["open"] for c in self.conns.values()):
            if time.monotonic() > end:
                return False
            time.sleep(0.05)
        return True


def _read_line(conn: socket.socket) -> str:
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(1)  # (a byte at a time: what follows the line, its pings, stays for the watcher)
        if not chunk:
            raise ConnectionError("the lifeline closed before the process said its index")
        data += chunk
    return data.decode().strip()


def select_devices(platform: str, num_devices: int):
    """The devices to train on: all of the platform's (global, across processes), or the first ``num_devices``.
    In a run of several processes ``num_devices`` is per process: on CPU each simulates that many; elsewhere it
    must be every device a process sees."""
    try:
        devices = jax.devices() if platform == "auto" else jax.devices(platform)
    except RuntimeError as e:
        raise ConfigError("hardware.platform", platform,
                          f"no {platform} devices here ({str(e).splitlines()[0]}); use hardware=auto or hardware=cpu") from None
    if jax.process_count() > 1:
        local = [d for d in devices if d.process_index == jax.process_index()]
        if num_devices and num_devices != len(local):
            raise ConfigError("hardware.num_devices", num_devices,
                              f"a run of several processes uses every device of every process; this one has "
                              f"{len(local)} ({len(devices)} over {jax.process_count()} processes): set "
                              f"hardware.num_devices=0 or {len(local)}"
                              + (" (on CPU, hardware.num_devices=N simulates N per process when JAX starts)"
                                 if platform == "cpu" else ""))
        return devices
    if num_devices:
        if num_devices > len(devices):
            hint = (" (simulated CPU devices: hardware=cpu hardware.num_devices=N sets them up)" if platform != "cpu"
                    else " (simulated CPU devices are fixed when JAX starts, so the jobs of a sweep in one process "
                         "share the first job's count: put the largest first, or use hydra/launcher=joblib)")
            raise ConfigError("hardware.num_devices", num_devices,
                              f"only {len(devices)} {devices[0].platform} device(s) found; use at most {len(devices)}{hint}")
        devices = devices[:num_devices]
    return devices


# ------------------------------------------------------------------------------------ the mesh, FSDP
# The mesh is 2-D, data x fsdp (DESIGN.md, decision 1). The batch is split over both axes; parameters, their
# moving average and the optimizer state are sharded over fsdp (each device holds 1/fsdp of every large array and
# gathers a layer's weights when it needs them) and replicated over data. hardware.fsdp=1 is plain data parallelism.
AXES = ("data", "fsdp")
BATCH = AXES  # the batch dimension's partition: every device its own rows
# Arrays with fewer elements than this stay replicated under FSDP (biases, norms' scales, class tokens: sharding
# them saves little and costs a gather each). big_vision's rule: 4 MiB; this one is smaller (16 KiB of float32),
# so the small models of a CPU machine are sharded too. hardware.sharding_rules overrides it for any array.
FSDP_MIN_SIZE = 2**12
REPLICATE = ("replicate", "replicated", "none", "null", "")


def make_mesh(devices, fsdp: int = 1):
    """The mesh over ``devices``: (data, fsdp) of shape (len(devices) // fsdp, fsdp). ``fsdp`` must divide the
    device count (a ConfigError naming the counts that do)."""
    n = len(devices)
    if fsdp < 1 or n % fsdp:
        fits = [k for k in range(1, n + 1) if n % k == 0]
        raise ConfigError("hardware.fsdp", fsdp, f"must divide the {n} devices (the mesh is data x fsdp); use one of "
                          f"{', '.join(map(str, fits))}")
    mesh = jax.make_mesh((n // fsdp, fsdp), AXES, axis_types=(AxisType.Auto,) * 2, devices=devices)
    run = _Run.current
    if run is not None and run.index == 0 and run.count > 1 and not run.said_start:
        run.said_start = True
        log.info("%s", run.start_line(mesh))
    return mesh


def put_replicated(x, sharding):
    """A host array -> a global array replicated on every device of the mesh. Every process holds the
    same host data (the data sets are loaded on each host), so each fills its own devices: this works
    across hosts, where ``jax.device_put`` onto non-addressable devices would not."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def replicated(mesh):
    return NamedSharding(mesh, P())


def batch_sharded(mesh, dim: int = 0):
    """Split dimension ``dim`` (the batch's) over every device of the mesh (both axes)."""
    return NamedSharding(mesh, P(*([None] * dim), BATCH))


def dotted_path(keypath) -> str:
    """A pytree leaf's dotted path (``blocks.3.attn.qkv.kernel``; a Variable's own ``value`` left out)."""
    names = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in keypath]
    if names and names[-1] == "value":
        names.pop()
    return ".".join(names)


def fsdp_spec(shape, size: int, min_size: int = FSDP_MIN_SIZE) -> P:
    """big_vision's FSDP rule: the largest dimension that ``size`` (the fsdp axis) divides is split over fsdp (the
    later one of equal dimensions); arrays of fewer than ``min_size`` elements, or with no such dimension, are
    replicated."""
    shape = tuple(shape)
    if size <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    for i in sorted(range(len(shape)), key=lambda i: (shape[i], i), reverse=True):
        if shape[i] % size == 0:
            return P(*[("fsdp" if j == i else None) for j in range(len(shape))])
    return P()


def _rule_spec(pattern: str, spec, path: str, shape, mesh) -> P:
    """One ``hardware.sharding_rules`` value for one array: "fsdp" (its largest dimension the fsdp axis divides,
    whatever its size), "replicate" (or null), or one entry per dimension (an axis name, a list of them, or
    null)."""
    key = f"hardware.sharding_rules[{pattern!r}]"
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in REPLICATE):
        return P()
    if isinstance(spec, str) and spec.strip() == "fsdp":
        return fsdp_spec(shape, mesh.shape["fsdp"], min_size=0)
    if isinstance(spec, str):
        raise ConfigError(key, spec, "give fsdp, replicate, or one entry per dimension, e.g. [null, fsdp]")
    spec = list(spec)
    if len(spec) != len(shape):
        raise ConfigError(key, spec, f"has {len(spec)} entries; {path} has {len(shape)} dimensions {list(shape)}")
    entries = []
    for dim, entry in zip(shape, spec):
        axes = () if entry is None or (isinstance(entry, str) and entry.lower() in REPLICATE) else \
            (entry,) if isinstance(entry, str) else tuple(entry)
        unknown = [a for a in axes if a not in AXES]
        if unknown:
            raise ConfigError(key, spec, f"names no mesh axis ({unknown[0]!r}); the axes are data and fsdp")
        size = int(np.prod([mesh.shape[a] for a in axes], dtype=np.int64))
        if dim % size:
            raise ConfigError(key, spec, f"splits {path}'s dimension of {dim} over {size} devices, which do not "
                              f"divide it")
        entries.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*entries)


def param_specs(shapes: dict[str, tuple], mesh, rules=None) -> dict[str, P]:
    """Each parameter's PartitionSpec, by dotted path: the first ``rules`` pattern (``hardware.sharding_rules``, a
    dict or a list of (regex, spec) pairs) matching the whole path decides; else ``fsdp_spec``. A pattern that
    matches no parameter is a ConfigError listing some paths (a typo would otherwise pass in silence)."""
    rules = list((rules or {}).items()) if isinstance(rules, dict) else [tuple(r) for r in (rules or ())]
    compiled = [(re.compile(pattern), pattern, spec) for pattern, spec in rules]
    for regex, pattern, _ in compiled:
        if not any(regex.fullmatch(p) for p in shapes):
            paths = list(shapes)
            examples = ", ".join(paths[:3] + paths[-3:] if len(paths) > 6 else paths)
            raise ConfigError("hardware.sharding_rules", pattern, f"matches no parameter (the pattern must match a "
                              f"whole path); this model's {len(paths)} parameter paths include {examples}")
    size = mesh.shape["fsdp"]
    specs = {}
    for path, shape in shapes.items():
        rule = next(((pattern, spec) for regex, pattern, spec in compiled if regex.fullmatch(path)), None)
        specs[path] = fsdp_spec(shape, size) if rule is None else _rule_spec(*rule, path, shape, mesh)
    return specs


def state_shardings(tree, params, mesh, rules=None):
    """A NamedSharding for every array of ``tree`` (a train state, or its shapes): an array that mirrors a parameter
    (the parameter itself, its moving average, the optimizer's moments: its path ends with the parameter's and
    its shape is the parameter's) is placed as that parameter (``param_specs``); every other array (the step,
    keys, counters, hyper-parameters) is replicated."""
    shapes = {dotted_path(kp): _shape(x) for kp, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    specs = param_specs(shapes, mesh, rules)
    rep = replicated(mesh)

    def place(kp, x):
        parts = dotted_path(kp).split(".")
        for i in range(len(parts)):
            path = ".".join(parts[i:])
            if path in specs and shapes[path] == _shape(x):
                return NamedSharding(mesh, specs[path])
        return rep

    return jax.tree_util.tree_map_with_path(place, tree)


def _shape(x) -> tuple:
    return tuple(getattr(x, "shape", np.shape(x)))  # (arrays, their shapes, Orbax's array metadata)


def bytes_per_device(tree) -> int:
    """The bytes of ``tree``'s arrays on the fullest device: from each array's addressable shards (arrays), or from
    its shape and sharding (``jax.ShapeDtypeStruct``s with one: what a sharding would hold, nothing allocated)."""
    per: dict = {}
    for x in jax.tree.leaves(tree):
        if isinstance(x, jax.Array):
            for shard in x.addressable_shards:
                per[shard.device] = per.get(shard.device, 0) + shard.data.nbytes
        elif getattr(x, "sharding", None) is not None:
            nbytes = int(np.prod(x.sharding.shard_shape(x.shape), dtype=np.int64)) * np.dtype(x.dtype).itemsize
            for device in x.sharding.addressable_devices:
                per[device] = per.get(device, 0) + nbytes
    return max(per.values(), default=0)


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
    if path is not None:
        # Small models compile in well under JAX's default 1 s threshold, and those are a sweep's typical jobs:
        # cache everything. (Also where JAX_COMPILATION_CACHE_DIR already turned the cache on with JAX's
        # thresholds: that early-out once left every sub-second program, i.e. nearly all of them, uncached.)
        for key, value in (("jax_persistent_cache_min_compile_time_secs", 0.0),
                           ("jax_persistent_cache_min_entry_size_bytes", 0)):
            if getattr(jax.config, key) != value:
                jax.config.update(key, value)
    if (path is not None) == jax.config.jax_enable_compilation_cache and path == jax.config.jax_compilation_cache_dir:
        return path  # as it is (a sweep's later jobs in this process)
    if path is None:
        jax.config.update("jax_enable_compilation_cache", False)
    else:
        jax.config.update("jax_enable_compilation_cache", True)
        jax.config.update("jax_compilation_cache_dir", path)
    cc.reset_cache()  # the cache object is created once per process; make it follow the new setting
    return path
