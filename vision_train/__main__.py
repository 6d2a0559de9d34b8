"""``python -m vision_train [overrides]``: Hydra composes conf/, then ``train(cfg, run_dir)`` runs.

``-m`` runs a sweep (a grid, or Optuna with ``hparams_search=<preset>``): every job is this function
with its own overrides and run directory. A job records itself in ``<run dir>/job.json``; in a sweep, a
job that fails is recorded with its error and returns None (Optuna marks the trial failed) so the
sweep goes on, and a job already finished in the same sweep directory is skipped (``vision_train.sweep``).
"""

from __future__ import annotations

import logging
import os
import sys
import time

import hydra
from omegaconf import DictConfig

from .config import register_configs, to_run_config
from .errors import UserError

log = logging.getLogger("vision_train")
register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from . import sweep
    from .config import objective_name, to_dict

    logging.getLogger("jax._src.xla_bridge").setLevel(logging.ERROR)  # "no TPU found" noise on CPU/GPU
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax logs every save step at INFO
    logging.getLogger("jax").setLevel(logging.WARNING)  # e.g. "Resetting cache" of the compilation cache
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    run_dir = hc.runtime.output_dir
    overrides = list(hc.overrides.task)
    import vision_train

    process = vision_train.PROCESS  # start-up: from import for a process's first job, else from the job's start
    started = process["started"] if process["jobs"] == 0 else time.time()
    process["jobs"] += 1
    recorded = False

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
            if run_cfg.trainer.resume != "never":
                done = sweep.finished_result(run_dir, to_dict(run_cfg))
                if done is not None:
                    value = _objective(done, objective)
                    log.info("skipped: this job finished in an earlier run of the sweep (%s %.4f; %s)",
                             objective, value, os.path.join(run_dir, "summary.json"))
                    return value
        if not run_cfg.hardware.distributed:  # (the processes of a multi-host run share the directory)
            sweep.check_not_running(run_dir)
        sweep.start_record(run_dir, overrides, objective, clock_start=started)
        recorded = True
        from .parallel import configure_host_devices

        configure_host_devices(run_cfg.hardware.platform, run_cfg.hardware.num_devices)
        from .train.loop import train

        summary = train(run_cfg, run_dir, started_at=started)
        value = _objective(summary, objective)
        sweep.end_record(run_dir, "finished", value=value)
        return value
    except KeyboardInterrupt:  # a second Ctrl-C: stop now (the sweep too)
        record("interrupted", error="interrupted (Ctrl-C)")
        log.error("interrupted")
        sys.exit(130)
    except sweep.JobConflict as e:  # the earlier job's files stay as they are; the table says "conflict"
        log.error("error: %s", e)
        if e.mark and sweep.read_record(run_dir):
            sweep.write_record(run_dir, conflict=str(e))
        if multirun:
            return None
        sys.exit(2)
    except UserError as e:
        from .train.loop import Preempted

        if isinstance(e, Preempted):  # checkpoint saved; a re-run (or submitit's requeue) resumes
            record("interrupted", error=str(e))
            log.error("error: %s", e)
            if e.requeue is not None:
                e.requeue(e.signum, None)  # submitit: requeue this job and exit
            if multirun and "submitit" in str(hc.launcher.get("_target_", "")):
                return None  # one SLURM job preempted: the others go on, the table says "interrupted"
            sys.exit(143)  # SIGTERM/Ctrl-C to this process: the sweep stops too
        record("failed", error=str(e))
        log.error("error: %s", e)
        if multirun:
            return None  # one bad job must not end the sweep (Optuna: a failed trial); the error is recorded
        sys.exit(2)
    except Exception as e:  # a bug, out of memory, ...: recorded; in a sweep the next job still runs
        record("failed", error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500])
        if not multirun:
            raise
        log.exception("job failed")
        return None


def _sweep_job_settings(cfg: DictConfig, hc, overrides: list[str]) -> None:
    """A sweep's job: its W&B run is grouped by the sweep and tagged with the job's overrides; under the
    joblib launcher, JAX does not preallocate GPU memory, so parallel jobs can share a device."""
    if cfg.logger.group is None:
        cfg.logger.group = str(hc.sweep.dir)
    if not cfg.logger.tags:
        cfg.logger.tags = [o[:64] for o in overrides if not o.startswith(("logger.", "trainer.progress_bar"))]
    if "joblib" in str(hc.launcher.get("_target_", "")):
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def _objective(summary: dict, objective: str) -> float:
    if summary.get(objective) is None:
        raise UserError(f"trainer.objective={objective}: the run's summary has no such value "
                        f"(it has {', '.join(k for k in summary if '/' in k and not k.startswith('time/'))})")
    return float(summary[objective])


if __name__ == "__main__":
    main()
