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
import sys  # noqa: E402
import time  # noqa: E402

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.errors import HydraException  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from omegaconf import DictConfig  # noqa: E402
from omegaconf.errors import OmegaConfBaseException  # noqa: E402

import vision_train  # noqa: E402

from . import interrupts, sweep  # noqa: E402
from .config import UnknownKey, objective_name, register_configs, schema_at, to_dict, to_run_config  # noqa: E402
from .errors import DiskFull, UserError, disk_full_error, install_background_error_handling  # noqa: E402
from .host_devices import configure_host_devices  # noqa: E402
from .records import set_aside_run  # noqa: E402

log = logging.getLogger("vision_train")
register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.ERROR)  # "no TPU found" noise on CPU/GPU
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax logs every save step at INFO
    logging.getLogger("jax").setLevel(logging.WARNING)  # e.g. "Resetting cache" of the compilation cache
    install_background_error_handling()  # background threads' tracebacks: to the log file, not the console
    interrupts.guard_unraisable()  # (again on top: a Ctrl-C dropped in a gc callback is delivered again)
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    run_dir = hc.runtime.output_dir
    overrides = list(hc.overrides.task)
    process = vision_train.PROCESS  # start-up: from import for a process's first job, else from the job's start
    started = process["started"] if process["jobs"] == 0 else time.time()
    process["jobs"] += 1
    recorded = False
    Preempted = ()  # (training's stop on a signal: bound below, where training is imported)

    def record(status: str, **kw) -> None:
        if recorded:
            sweep.end_record(run_dir, status, **kw)
        else:  # it stopped before it started
            sweep.record_unstarted(run_dir, overrides, str(cfg.trainer.objective), status, **kw)

    try:
        if multirun:
            _sweep_job_settings(cfg, hc, overrides)
        run_cfg = to_run_config(cfg)  # validated and frozen before JAX starts or anything compiles
        objective = objective_name(run_cfg)
        if multirun:
            sweep.check_direction(objective, hc.sweeper)
        if run_cfg.trainer.resume == "auto":  # the same command again: a finished run stays as it is
            # (a sweep's job whose directory holds another config's finished job is refused; a single run
            # with another config goes on from its last checkpoint, e.g. trainer.epochs raised)
            done = sweep.finished_result(run_dir, to_dict(run_cfg), conflict=multirun)
            if done is not None and not multirun:  # nothing is touched, W&B not started
                log.info("%s", sweep.finished_line(run_dir, done, objective))
                return None
            if done is not None:
                value = _objective(done, objective)
                log.info("skipped: this job finished in an earlier run of the sweep (%s %.4f; %s)",
                         objective, value, os.path.join(run_dir, "summary.json"))
                return value
        if not run_cfg.hardware.distributed:  # (the processes of a multi-host run share the directory)
            sweep.check_not_running(run_dir)
            if run_cfg.trainer.resume == "never":  # start over: the earlier run's files, its job.json too, set aside
                moved = set_aside_run(run_dir, include_job_record=True)
                if moved:
                    log.info("trainer.resume=never: the earlier run's files were moved to %s", moved)
        sweep.start_record(run_dir, overrides, objective, clock_start=started)
        recorded = True
        configure_host_devices(run_cfg.hardware.platform, run_cfg.hardware.num_devices)
        # JAX starts here. The command line imports nothing that imports JAX before configure_host_devices has set
        # XLA_FLAGS / JAX_PLATFORMS for hardware.* (read when JAX is imported and starts); these are the only
        # imports it defers. The signals are held meanwhile: a Ctrl-C inside a C++ extension's start (jaxlib,
        # TensorStore, torch) would abort the process.
        with interrupts.held():
            import jax  # noqa: F401
            import orbax.checkpoint  # noqa: F401

            from .train.loop import Preempted, train
        summary = train(run_cfg, run_dir, started_at=started)
        value = _objective(summary, objective)
        sweep.end_record(run_dir, "finished", value=value)
        return value
    except KeyboardInterrupt as e:  # during start-up, or a second Ctrl-C in the loop: stop now (the sweep too)
        _interrupted(e, record)
    except sweep.JobConflict as e:  # the earlier job's files stay as they are; the table says "conflict"
        log.error("error: %s", e)
        if e.mark and sweep.read_record(run_dir):
            sweep.write_record(run_dir, conflict=str(e))
        if multirun:
            return None
        sys.exit(2)
    except DiskFull as e:  # one line; job.json records it where space allows
        message = str(e)
        try:
            record("failed", error=message)
        except DiskFull as also:
            if also.path != e.path:
                message += f"; {also.path} could not be updated either"
        log.error("error: %s", message)
        if multirun:
            return None
        sys.exit(2)
    except UserError as e:
        if isinstance(e, Preempted):  # checkpoint saved; a re-run (or submitit's requeue) resumes
            record("interrupted", error=str(e))
            log.error("error: %s", e)
            if e.requeue is not None:
                e.requeue(e.signum, None)  # submitit: requeue this job and exit
            if multirun and "submitit" in str(hc.launcher.get("_target_", "")):
                return None  # one SLURM job preempted: the others go on, the table says "interrupted"
            interrupts.stop(e.signum)  # Ctrl-C: 130, SIGTERM: 143; the sweep stops too
        record("failed", error=str(e))
        log.error("error: %s", e)
        if multirun:
            return None  # one bad job must not end the sweep (Optuna: a failed trial); the error is recorded
        sys.exit(2)
    except Exception as e:  # a bug, out of memory, ...: recorded; in a sweep the next job still runs
        if interrupts.interrupt_behind(e) is not None:  # (a Ctrl-C turned into ImportError by an extension)
            _interrupted(interrupts.interrupt_behind(e), record)
        record("failed", error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500])
        if not multirun:
            raise
        log.exception("job failed")
        return None


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


def _objective(summary: dict, objective: str) -> float:
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
