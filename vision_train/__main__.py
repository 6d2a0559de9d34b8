"""``python -m vision_train [overrides]``: Hydra composes conf/, then ``train(cfg, run_dir)`` runs.

``-m`` runs a sweep (a grid, or Optuna with ``hparams_search=<preset>``): every job is this function
with its own overrides and run directory. A job records itself in ``<run dir>/job.json``; in a sweep, a
job that fails is recorded with its error and returns None (Optuna marks the trial failed) so the
sweep goes on, and a job already finished in the same sweep directory is skipped (``vision_train.sweep``).
"""

from __future__ import annotations

if __name__ == "__main__":  # first thing: Ctrl-C or SIGTERM from here on stops the run (vision_train.interrupts)
    from . import interrupts

    interrupts.hold()  # while this module's imports run; run() acts on it

import logging  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.errors import HydraException  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402
from omegaconf.errors import OmegaConfBaseException  # noqa: E402

import vision_train  # noqa: E402

from . import interrupts, logfile, sweep  # noqa: E402
from .config import UnknownKey, register_configs, schema_at, to_dict, to_run_config  # noqa: E402
from .errors import (ConfigError, DiskFull, Preempted, UserError, disk_full_error,  # noqa: E402
                     install_background_error_handling, writing)
from .fate import Refused, decide  # noqa: E402
from .host_devices import configure_host_devices, is_main_process, on_lost_process, wants_distributed  # noqa: E402
from .records import set_aside_run  # noqa: E402

log = logging.getLogger("vision_train")
register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    """One job: validate, decide its fate (new, resume, branch, finished or refused) before anything is written,
    record it, train. In a sweep a failed or refused job returns None (Optuna: a failed trial) and the sweep
    goes on; a single run exits non-zero with one line."""
    _quiet_loggers()
    job = Job(HydraConfig.get(), cfg)
    try:
        return job.run()
    except KeyboardInterrupt as e:  # during start-up, or a second Ctrl-C in the loop: stop now (the sweep too)
        _interrupted(e, job.record)
    except UserError as e:
        return job.failed(e)
    except Exception as e:  # a bug, out of memory, ...: recorded; in a sweep the next job still runs
        if interrupts.interrupt_behind(e) is not None:  # (a Ctrl-C turned into ImportError by an extension)
            _interrupted(interrupts.interrupt_behind(e), job.record)
        job.record("failed", error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500])
        if not job.multirun:
            raise
        log.exception("job failed")
        return None


class Job:
    """A job of the command line: its run directory, overrides, records; ``run`` is its life."""

    def __init__(self, hc, cfg: DictConfig):
        self.hc, self.cfg = hc, cfg
        self.multirun = hc.mode == RunMode.MULTIRUN
        self.run_dir = hc.runtime.output_dir
        self.overrides = list(hc.overrides.task)
        process = vision_train.PROCESS  # start-up: from import for a process's first job, else from the job's start
        self.started = process["started"] if process["jobs"] == 0 else time.time()
        process["jobs"] += 1
        self.accepted = False
        self.objective = str(cfg.trainer.objective)
        self.several = False  # one of several processes of one run (hardware.distributed)
        self.writes = True    # this process writes the run's records (process 0 of several)

    def run(self) -> float | None:
        if self.multirun:
            _sweep_job_settings(self.cfg, self.hc, self.overrides)
        run_cfg = to_run_config(self.cfg)  # validated and frozen before JAX starts or anything compiles
        self.objective = run_cfg.trainer.objective  # (auto where only the data can tell: resolved by the run)
        if self.multirun:
            sweep.check_direction("best/val/acc" if self.objective == "auto" else self.objective, self.hc.sweeper)
            self._needs_objective(self.objective, run_cfg)
        self.several = wants_distributed(run_cfg.hardware.distributed)
        self.writes = is_main_process(run_cfg.hardware.distributed)
        if not self.several:  # (the processes of a run of several share the directory)
            sweep.check_not_running(self.run_dir, sweep=self.multirun)
        fate = decide(to_dict(run_cfg), run_cfg.trainer.resume, self.run_dir, sweep=self.multirun)
        if fate.kind == "finished":  # nothing is touched, W&B not started
            return self._finished(fate.summary)
        self._accept(fate)
        if self.several:  # another process lost: the run's final record says which (vision_train.parallel)
            on_lost_process(self._lost)
        configure_host_devices(run_cfg.hardware.platform, run_cfg.hardware.num_devices)
        # JAX starts here. The command line imports nothing that imports JAX before configure_host_devices has set
        # XLA_FLAGS / JAX_PLATFORMS for hardware.* (read when JAX is imported and starts); these are the only
        # imports it defers. The signals are held meanwhile: a Ctrl-C inside a C++ extension's start (jaxlib,
        # TensorStore, torch) would abort the process.
        with interrupts.held():
            import jax  # noqa: F401
            import orbax.checkpoint  # noqa: F401

            from .train.loop import train
        summary = train(run_cfg, self.run_dir, started_at=self.started, fate=fate)
        self.objective = summary.get("objective", self.objective)
        self._needs_objective(self.objective, run_cfg)
        value = _objective(summary, self.objective)
        if self.writes:
            sweep.end_record(self.run_dir, "finished", value=value, objective=self.objective)
        return value

    def _accept(self, fate) -> None:
        """The attempt goes ahead: from here on it writes into the run directory. Hydra's files (.hydra/) and the
        log held so far are written, the earlier run's files set aside where it starts over, the job recorded. The
        other processes of a run of several write none of these (process 0 does)."""
        if not self.writes:
            self.accepted = True
            return
        logfile.accept()
        _save_hydra_files(self.run_dir, self.cfg, self.hc)
        if self.multirun:
            sweep.clear_refused(self.run_dir)
        if fate.start_over and not self.several:
            moved = set_aside_run(self.run_dir, include_job_record=True)
            if moved:
                log.info("trainer.resume=never: the earlier run's files were moved to %s", moved)
        sweep.start_record(self.run_dir, self.overrides, self.objective, clock_start=self.started)
        self.accepted = True

    def _finished(self, summary: dict) -> float | None:
        objective = summary.get("objective") or self.objective
        if not self.multirun:
            log.info("%s", sweep.finished_line(self.run_dir, summary, objective))
            return None
        value = _objective(summary, objective)
        log.info("skipped: this job finished in an earlier run of the sweep (%s %s; %s)", objective,
                 "-" if value is None else f"{value:.4f}", os.path.join(self.run_dir, "summary.json"))
        return value

    def _needs_objective(self, objective: str, run_cfg) -> None:
        if objective == "none" and "optuna" in str(self.hc.sweeper.get("_target_", "")):
            raise ConfigError("trainer.objective", "none" if run_cfg.trainer.objective == "none" else "auto",
                              f"an Optuna search optimises an objective, and {run_cfg.data.name} has no validation "
                              f"split; hold one out with data.val_size=N, or name one (e.g. trainer.objective="
                              f"test/acc to optimise on the test split)")

    def record(self, status: str, **kw) -> None:
        """The end of an attempt in job.json. Only an accepted attempt writes into its run directory; a sweep's
        job refused before it started is recorded where the directory holds no earlier job (the table shows it)."""
        if not self.writes:
            return
        if self.accepted:
            sweep.end_record(self.run_dir, status, **kw)
        elif self.multirun and sweep.read_record(self.run_dir) is None:
            sweep.record_unstarted(self.run_dir, self.overrides, self.objective, status, **kw)

    def _lost(self, line: str, lost: int, me: int) -> None:
        """Another process of the run was lost: process 0 records it (process 1 where 0 was the one lost)."""
        if self.accepted and (me == 0 or (lost == 0 and me == 1)):
            sweep.end_record(self.run_dir, "failed", error=line)

    def failed(self, e: UserError) -> float | None:
        if isinstance(e, Preempted):  # checkpoint saved; a re-run (or submitit's requeue) resumes
            self.record("interrupted", error=str(e))
            log.error("error: %s", e)
            submitit = self.multirun and "submitit" in str(self.hc.launcher.get("_target_", ""))
            if e.requeue is not None and not (submitit and e.signum == signal.SIGTERM):
                e.requeue(e.signum, None)  # submitit (SIGUSR2, before the time limit): task 0 requeues the job, exits
            if submitit and e.signum == signal.SIGTERM:
                # SLURM itself takes the job away (scontrol requeue, preemption, scancel, the time limit) and
                # requeues it or not: no `scontrol requeue` here (it fails on a job being requeued), and no result
                # for the launcher (SystemExit, as submitit's own requeue), which waits for the requeued attempt
                sys.exit(-1)
            if submitit:
                return None  # one SLURM job preempted: the others go on, the table says "interrupted"
            interrupts.stop(e.signum)  # Ctrl-C: 130, SIGTERM: 143; the sweep stops too
        message = str(e)
        if isinstance(e, Refused) and self.multirun and self.writes:
            sweep.mark_refused(self.run_dir, message)  # (beside the directory: nothing inside it changes)
        elif not isinstance(e, (Refused, sweep.JobConflict)):
            try:
                self.record("failed", error=message)
            except DiskFull as also:
                if not isinstance(e, DiskFull) or also.path != e.path:
                    message += f"; {also.path} could not be updated either"
        log.error("error: %s", message)
        if not self.accepted:
            _remove_if_empty(self.run_dir)
        if self.multirun:
            return None  # one bad job must not end the sweep (Optuna: a failed trial); the error is recorded
        sys.exit(2)


def _quiet_loggers() -> None:
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.ERROR)  # "no TPU found" noise on CPU/GPU
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax logs every save step at INFO
    logging.getLogger("jax").setLevel(logging.WARNING)  # e.g. "Resetting cache" of the compilation cache
    install_background_error_handling()  # background threads' tracebacks: to the log file, not the console
    interrupts.guard_unraisable()  # (again on top: a Ctrl-C dropped in a gc callback is delivered again)


def _save_hydra_files(run_dir: str, cfg: DictConfig, hc) -> None:
    """What Hydra writes into ``<run dir>/.hydra/`` (config.yaml, hydra.yaml, overrides.yaml), written for an
    accepted attempt only (conf/config.yaml sets ``hydra.output_subdir: null``)."""
    out = Path(run_dir) / ".hydra"
    out.mkdir(parents=True, exist_ok=True)
    for name, node in (("config.yaml", cfg), ("hydra.yaml", OmegaConf.create({"hydra": hc})),
                       ("overrides.yaml", hc.overrides.task)):
        with writing(out / name, "Hydra's record of the job"):
            OmegaConf.save(node, out / name, resolve=False)


def _remove_if_empty(run_dir: str) -> None:
    """A refused attempt's run directory, created by Hydra for it and left empty, is removed, with the empty
    folders above it up to the working directory (``outputs/<date>/``)."""
    path, cwd = Path(run_dir).absolute(), Path.cwd().absolute()
    while path != cwd and cwd in path.parents:
        try:
            path.rmdir()  # (only an empty one)
        except OSError:
            return
        path = path.parent


def _interrupted(e: KeyboardInterrupt, record) -> None:
    signum = interrupts.signum_of(e)
    message = f"interrupted by {interrupts.describe(signum)}"
    try:
        record("interrupted", error=message)
    finally:
        log.error("%s", message)
        interrupts.stop(signum)


def _sweep_job_settings(cfg: DictConfig, hc, overrides: list[str]) -> None:
    """A sweep's job: its W&B run is grouped by the sweep and tagged with the job's overrides; under the
    joblib launcher, JAX does not preallocate GPU memory, so parallel jobs can share a device."""
    if cfg.logger.group is None:
        cfg.logger.group = sweep.group_name(hc.sweep.dir)
    if not cfg.logger.tags:
        cfg.logger.tags = [o[:64] for o in overrides if not o.startswith(("logger.", "trainer.progress_bar"))]
    if "joblib" in str(hc.launcher.get("_target_", "")):
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def _objective(summary: dict, objective: str) -> float | None:
    if objective == "none":
        return None
    if summary.get(objective) is None:
        raise UserError(f"trainer.objective={objective}: the run's summary has no such value "
                        f"(it has {', '.join(k for k in summary if '/' in k and not k.startswith('time/'))})")
    return float(summary[objective])


def _hydra_error_line(e: BaseException) -> str | None:
    """Hydra's and OmegaConf's errors (composition, overrides) in one line; None for anything else. An
    unknown key given on the command line is said as one added with ``+`` is (``config.UnknownKey``)."""
    if not isinstance(e, (HydraException, OmegaConfBaseException)):
        return None
    cause = e.__cause__
    full_key = getattr(cause, "full_key", None)
    if isinstance(cause, OmegaConfBaseException) and full_key and " not in " in str(cause) and \
            str(cause).startswith("Key "):
        schema = getattr(cause, "object_type", None)
        if not (isinstance(schema, type) and hasattr(schema, "__dataclass_fields__")):
            schema = schema_at(full_key.rpartition(".")[0])
        if schema is not None:
            return str(UnknownKey(full_key, schema))

    def flat(text: str) -> str:
        lines, items = [], []
        for line in text.splitlines():
            if line.startswith("Config search path"):
                break
            item = line.strip()
            if not item or item.startswith(("full_key:", "reference_type=", "object_type=")):
                continue
            if line.startswith("\t"):
                items.append(item)
                continue
            if items:
                lines[-1] += " " + ", ".join(items)
                items = []
            lines.append(item)
        if items and lines:
            lines[-1] += " " + ", ".join(items)
        return "; ".join(lines)

    text = flat(str(e))
    if isinstance(cause, OmegaConfBaseException):
        text += f"; {flat(str(cause))}"
    return text


def run() -> None:
    """The command line: ``main`` with Ctrl-C and Hydra's errors each said in one line. Hydra's errors
    (an unknown key, a missing preset, a value of the wrong type) reach this function, not Hydra's own
    printer, through ``HYDRA_FULL_ERROR=1``; set that variable yourself to see their tracebacks."""
    full_error = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        interrupts.install()  # (a signal held during the imports is raised here)
        main()
    except KeyboardInterrupt as e:  # before or after a job (inside one, main says it and records it)
        signum = interrupts.signum_of(e)
        interrupts.stop(signum, f"interrupted by {interrupts.describe(signum)}")
    except Exception as e:  # noqa: BLE001
        if interrupts.interrupt_behind(e) is not None:  # (a Ctrl-C turned into ImportError by an extension)
            signum = interrupts.signum_of(interrupts.interrupt_behind(e))
            interrupts.stop(signum, f"interrupted by {interrupts.describe(signum)}")
        full = disk_full_error(e)  # (e.g. Hydra's own writes, .hydra/*.yaml, on a full disk)
        line = str(full) if full else None if full_error else _hydra_error_line(e)
        if line is None:
            raise  # a bug: its traceback
        print(f"error: {line}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    run()
