"""``train(cfg, run_dir, hooks=[...])``: decide the run's fate, assemble it, step it, let the hooks do all periodic
work, test, finish.

One flat loop over steps; the epoch is derived from the step. Every periodic action (log, evaluate, the epoch
line, record, checkpoint, signals, a profiler trace of ``trainer.profile_steps``, the user's own) is a ``Hook``
(``train.hooks``) whose cadence is converted to steps once. What must survive a restart lives in ``run.loop``
(``assembly.LoopState``), saved, as a copy, in every checkpoint.

Importable without Hydra: tests, notebooks and benchmarks call it with a ``Config`` built in Python
(``vision_train.compose``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import jax

from .. import config as config_lib
from .. import fate as fate_lib
from .. import parallel
from ..preview import log_run_preview
from ..errors import Preempted  # noqa: F401 (raised by the signals hook; the command line catches it)
from . import hooks as hooks_lib
from . import steps as steps_lib
from .assembly import Run, assemble, check_run_dir, report_memory
from .hooks import Hook, itstime  # noqa: F401 (the public names)

log = logging.getLogger("vision_train")

# Summary keys of an evaluation of the test split (METRICS: every metric a summary keeps).
SUMMARY_METRICS = tuple(k for k, m in config_lib.METRICS.items() if m.summary)


def train(cfg: config_lib.Config, run_dir: str | Path, started_at: float | None = None,
          fate: fate_lib.Fate | None = None, hooks: list[Hook] = ()) -> dict:
    """Train, evaluate, test. Returns the summary (also written to ``<run_dir>/summary.json``).

    ``hooks``: the caller's own periodic actions (``Hook(name, every=N, run=fn)``: ``fn(step, run, results)``
    after every N-th step), beside the built-in ones and timed as they are (their time is not training time).
    ``started_at``: when this job started (the CLI passes the process's import time for its first job),
    so ``time/startup_s`` in the summary is start-up to the first finished step (imports, data, compile).
    ``fate``: the run's fate as the caller decided it (``vision_train.fate.decide``); decided here when not given.
    A finished run returns its summary and changes nothing; a run directory holding another computation is
    refused (``fate.Refused``) before anything is built."""
    run_dir = Path(run_dir).absolute()  # (Orbax needs an absolute path; the Python API may give a relative one)
    check_run_dir(cfg, run_dir)
    if fate is None:
        fate = fate_lib.decide(config_lib.to_dict(cfg), cfg.trainer.resume, run_dir)
    if fate.kind == "finished":
        log.info("this run finished; nothing to do. Its summary: %s. To train it again from the start use "
                 "trainer.resume=never (the finished run's files are set aside, not overwritten)",
                 run_dir / "summary.json")
        return fate.summary
    parallel_setup(cfg)
    run = assemble(cfg, run_dir, started_at or time.time(), fate)
    loop = Loop(run, list(hooks))
    exit_code = 1
    try:
        for step in range(run.start_step, run.total_steps):
            if step % run.steps_per_epoch == 0 or step == run.start_step:
                loop.epoch_start(step)
            args = run.feed.train_args(step)
            if step == run.start_step:
                report_memory(run, args)  # (compiles the step, which runs from here on: its memory, as XLA reports it)
                if step == 0:
                    log_run_preview(run, step, args)  # (train/batch_preview: the first batch, as trained on)
            run.state, run.train_sums = run.train_step(run.state, run.train_sums, *args)
            loop.after_step(step + 1)
        summary = loop.end()
        exit_code = 0
        return summary
    finally:
        loop.close(exit_code)


def parallel_setup(cfg) -> None:
    parallel.initialize_distributed(cfg.hardware.distributed, cfg.hardware.platform)  # (auto: where several run)
    parallel.enable_compilation_cache(cfg.hardware.compilation_cache)


class Loop:
    """What the loop keeps beside the run: the clocks, the progress bar, the signals, the profiler and the hooks."""

    def __init__(self, run: Run, user_hooks: list[Hook]):
        self.run = run
        t = run.cfg.trainer
        self.chrono = hooks_lib.Chrono(run.started_at)
        self.progress = hooks_lib.Progress(t.progress_bar and run.is_main)
        self.stop = hooks_lib.StopOnSignal()
        self.profiler = hooks_lib.Profiler(run, t.profile_steps) if t.profile_steps else None
        self.hooks = hooks_lib.builtin(run, self.chrono, self.progress, self.stop, self.profiler, user_hooks)

    def epoch_start(self, step: int) -> None:
        """Before step ``step`` (0-based) when it opens an epoch, or is the first of this process."""
        run = self.run
        epoch, index = divmod(step, run.steps_per_epoch)
        if index == 0:  # a fresh epoch (resumed mid-epoch: the sums so far come from the checkpoint)
            run.loop.epoch_sums = steps_lib.new_epoch_sums()
        run.feed.start_epoch(step)  # the epoch's order (or the pipeline's first batch) before its clock starts
        self.chrono.epoch_start()
        self.progress.epoch(run.steps_per_epoch, f"epoch {epoch + 1}/{run.cfg.trainer.epochs}", initial=index)
        if step == run.start_step and self.profiler is not None and self.profiler.begin == step:
            self.profiler.start()  # (the profile starts with this process's first step: nothing to wait for)

    def after_step(self, step: int) -> None:
        """After step ``step`` (1-based: the step just taken): the hooks due now, after the device is done."""
        run = self.run
        self.stop.agree(step, run)  # (a signal: the step to stop after, the same in every process of the run)
        self.progress.update()
        self.chrono.images += run.cfg.trainer.batch_size
        if step == run.start_step + 1:  # leave compilation out of images/s (one extra sync, once per run)
            jax.block_until_ready(run.train_sums)
            log.info("first step done %.1fs after start (imports, data, compilation)", self.chrono.first_step_done())
        due = [h for h in self.hooks if h.due(step, run.total_steps)]
        if not due:
            return
        jax.block_until_ready(run.train_sums)  # the steps before the hooks finish first: their time is training time
        results = hooks_lib.Results()
        for hook in due:
            with self.chrono.paused(hook.clock):
                hook.run(step, run, results)

    def end(self) -> dict:
        run, step = self.run, self.run.total_steps
        if run.checkpointer is not None:
            run.checkpointer.wait()
            run.tracker.log_checkpoints(run.checkpointer.directory,
                                        {"best": run.checkpointer.best(), "latest": run.checkpointer.latest()})
        jax.block_until_ready(run.train_sums)
        values = hooks_lib.evaluate_run(run, "test", step, self.chrono)
        run.tracker.log(values, step)
        run.tracker.log_curves(final=True)
        test = {k: values[k] for k in SUMMARY_METRICS if k in values}
        log.info("test  %s", "  ".join(f"{k} {v:.4f}" for k, v in test.items()))
        summary = {"objective": run.cfg.trainer.objective, "parameters": run.n_params, "num_devices": len(run.devices),
                   **test, **run.loop.last_val, **run.memory}  # (the final evaluation's val/loss, val/acc)
        if run.loop.best_step >= 0:
            summary.update({"best/val/acc": run.loop.best_val, "best/step": run.loop.best_step})
        summary.update({"step": step, "images_seen": step * run.cfg.trainer.batch_size,
                        "wall_time_s": time.time() - run.t_start,
                        **{f"time/{k}": v for k, v in self.chrono.totals.items()}})
        run.tracker.summary(summary)
        return summary

    def close(self, exit_code: int) -> None:
        self.stop.restore()
        if self.profiler is not None:
            self.profiler.abandon()
        self.progress.close()
        self.run.feed.close()  # (a streamed feed's worker processes)
        try:
            if self.run.checkpointer is not None:
                self.run.checkpointer.close()  # waits for a save in flight (its failure, e.g. a full disk, is raised here)
        finally:
            self.run.tracker.finish(exit_code)

