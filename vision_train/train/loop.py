"""``train(cfg, run_dir)``: assemble the run, step it, let the hooks do all periodic work, test, finish.

One flat loop over steps; the epoch is derived from the step. Every periodic action (log, evaluate, the
epoch line, checkpoint, signals; a profiler trace of ``trainer.profile_steps``) is a ``Hook`` whose cadence is
converted to steps once and tested with one ``itstime``. What must survive a restart lives in ``run.loop`` (``assembly.LoopState``), saved, as a
copy, in every checkpoint.

Importable without Hydra: tests and benchmarks call it with a ``Config`` built in Python.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import jax
import numpy as np

from .. import config as config_lib
from .. import fate as fate_lib
from .. import parallel, perf
from ..errors import Preempted, TrainingError, UserError  # noqa: F401 (Preempted: raised here)
from . import evaluation
from .assembly import Run, assemble, check_run_dir

log = logging.getLogger("vision_train")


def itstime(step: int, every, total: int, last: bool = True) -> bool:
    """Periodic work at ``step`` (1-based: the step just taken): every ``e`` steps for each ``e`` > 0 in
    ``every`` (an int or several), and at the run's last step unless ``last`` is False."""
    every = (every,) if isinstance(every, int) else every
    return any(e > 0 and step % e == 0 for e in every) or (last and step == total)


@dataclass
class Hook:
    name: str
    every: tuple[int, ...]                      # step periods (0: not by period)
    run: Callable[[int], None]
    last: bool = True                           # also at the run's last step
    also: Callable[[], bool] = lambda: False    # e.g. a signal arrived
    at: tuple[int, ...] = ()                    # these steps, once each (e.g. a profile's first and last)

    def due(self, step: int, total: int) -> bool:
        return step in self.at or itstime(step, self.every, total, self.last) or self.also()


def train(cfg: config_lib.Config, run_dir: str | Path, started_at: float | None = None,
          fate: fate_lib.Fate | None = None) -> dict:
    """Train, evaluate, test. Returns the summary (also written to ``<run_dir>/summary.json``).

    ``started_at``: when this job started (the CLI passes the process's import time for its first job),
    so ``time/startup_s`` in the summary is start-up to the first finished step (imports, data, compile).
    ``fate``: the run's fate as the caller decided it (``vision_train.fate.decide``); decided here when not given.
    A finished run returns its summary and changes nothing; a run directory holding another computation is
    refused (``fate.Refused``) before anything is built."""
    run_dir = Path(run_dir)
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
    hooks = Hooks(run)
    exit_code = 1
    try:
        for step in range(run.start_step, run.total_steps):
            if step % run.steps_per_epoch == 0 or step == run.start_step:
                hooks.epoch_start(step)
            run.state, run.acc = run.train_step(run.state, run.acc, *run.feed.train_args(step))
            hooks.after_step(step + 1)
        summary = hooks.end()
        exit_code = 0
        return summary
    finally:
        hooks.close(exit_code)


def parallel_setup(cfg) -> None:
    if cfg.hardware.distributed:
        parallel.initialize_distributed()
    parallel.enable_compilation_cache(cfg.hardware.compilation_cache)


class Hooks:
    """The periodic work of a run, in the order it runs after a step: the end of a profile, log, evaluate, the
    epoch line, checkpoint, signals, the start of a profile. Each reads and writes the run (``run.loop`` for what
    a restart needs)."""

    def __init__(self, run: Run):
        self.run, t = run, run.cfg.trainer
        spe = run.steps_per_epoch
        self.stop = StopOnSignal()
        self.has_val = "val" in run.feed.splits
        self.evals: dict[str, dict] = {}  # this step's evaluations (the epoch line and the best checkpoint read them)
        stopping = lambda: bool(self.stop.signum)  # noqa: E731
        self.profiler = Profiler(run, t.profile_steps) if t.profile_steps else None
        self.list = [
            # (first: the trace ends with step b itself, not with the hooks after it)
            Hook("profile_stop", (), lambda step: self.profile_stop(), last=False,
                 at=self.profiler.stop_at if self.profiler else ()),
            Hook("log", (t.log_every_steps, spe), self.log),
            Hook("eval", (t.eval_every_epochs * spe, t.eval_every_steps), self.validate),
            Hook("epoch", (spe,), self.epoch_line),
            Hook("checkpoint", (t.checkpoint_every_steps, t.checkpoint_every_epochs * spe), self.checkpoint,
                 also=stopping),
            Hook("signals", (), self.stop_now, last=False, also=stopping),
            # (last: the trace starts with step a, not with the hooks before it)
            Hook("profile_start", (), lambda step: self.profile_start(), last=False,
                 at=self.profiler.start_at if self.profiler else ()),
        ]
        self.list = [h for h in self.list if not (h.name == "eval" and not self.has_val)
                     and not (h.name == "checkpoint" and run.checkpointer is None)
                     and not (h.name.startswith("profile_") and not h.at)]
        # At a step with both a log and an evaluation (every epoch's end), the train metrics and the evaluation's
        # are one row: each (step, key) once (``epoch`` is in both), and W&B plots val/* against ``epoch`` only
        # from rows that hold it.
        self.eval_hook = next((h for h in self.list if h.name == "eval"), None)
        self.train_row: dict = {}  # the log's row, waiting for this step's evaluation
        self.bar = None
        self.t_epoch = self.t_log = time.time()
        self.timed_images = 0
        self.epoch_eval_s = 0.0
        self.paused_s = 0.0  # evaluation, checkpoints, the profiler's writes since the last log: not training time

    # ------------------------------------------------------------------ per step
    def epoch_start(self, step: int) -> None:
        """Before step ``step`` (0-based) when it opens an epoch, or is the first of this process."""
        run = self.run
        epoch, index = divmod(step, run.steps_per_epoch)
        if index == 0:  # a fresh epoch (resumed mid-epoch: the sums so far come from the checkpoint)
            run.loop.epoch_sums = {"loss": 0.0, "correct": 0.0, "count": 0.0}
        run.feed.train_args(step)  # the epoch's order (the permutation: compiled once) before its clock starts
        self.t_epoch = self.t_log = time.time()
        self.timed_images, self.epoch_eval_s, self.paused_s = 0, 0.0, 0.0
        if self.bar is not None:
            self.bar.close()
        self.bar = _progress(run.steps_per_epoch, f"epoch {epoch + 1}/{run.cfg.trainer.epochs}",
                             enabled=run.cfg.trainer.progress_bar and run.is_main, initial=index)
        if step == run.start_step and self.profiler is not None and self.profiler.begin == step:
            self.profiler.start()  # (the profile starts with this process's first step: nothing to wait for)

    def after_step(self, step: int) -> None:
        run = self.run
        self.bar.update(1)
        self.timed_images += run.cfg.trainer.batch_size
        if step == run.start_step + 1:  # leave compilation out of images/s (one extra sync, once per run)
            jax.block_until_ready(run.acc)
            self.t_log, self.timed_images, self.paused_s = time.time(), 0, 0.0
            run.timing["startup_s"] = self.t_log - run.started_at
            log.info("first step done %.1fs after start (imports, data, compilation)", run.timing["startup_s"])
        self.evals = {}
        for hook in self.list:
            if hook.due(step, run.total_steps):
                hook.run(step)

    # ------------------------------------------------------------------ hooks
    def log(self, step: int) -> None:
        """Fetch the running sums (the only per-interval device fetch), stop on NaN, log train metrics."""
        run = self.run
        host = jax.device_get(run.acc)
        run.acc = run.new_acc()
        now = time.time()
        if int(host["nan_step"]) >= 0:
            bad = int(host["nan_step"])
            raise TrainingError(
                f"loss became NaN/inf at step {bad} (epoch {(bad - 1) // run.steps_per_epoch + 1}); lower "
                f"optimizer.lr (now {run.cfg.optimizer.lr:g}) or set optimizer.grad_clip_norm. Metrics up to step "
                f"{step - int(host['steps'])} are in {run.run_dir / 'metrics.jsonl'}")
        for k in run.loop.epoch_sums:
            run.loop.epoch_sums[k] += float(host[k])
        metrics = {"train/loss": float(host["loss"] / host["count"]), "train/acc": float(host["correct"] / host["count"]),
                   "train/grad_norm": float(host["grad_norm"] / host["steps"]), "lr": run.lr_at(step - 1),
                   "epoch": step / run.steps_per_epoch}
        if self.timed_images:  # training alone: the evaluations and checkpoints in the interval are left out
            metrics["images_per_sec"] = self.timed_images / max(now - self.t_log - self.paused_s, 1e-9)
            metrics.update(perf.throughput(metrics["images_per_sec"], len(run.devices), run.flops_per_example,
                                           run.peak_tflops))
        self.t_log, self.timed_images, self.paused_s = now, 0, 0.0
        if self.eval_hook is not None and self.eval_hook.due(step, run.total_steps):
            self.train_row = metrics  # (logged with the evaluation, next)
        else:
            run.tracker.log(metrics, step)
        self.bar.set_postfix(loss=f"{metrics['train/loss']:.4f}", acc=f"{metrics['train/acc']:.4f}",
                             img_s=f"{metrics.get('images_per_sec', 0):,.0f}", refresh=False)

    def profile_start(self) -> None:
        jax.block_until_ready(self.run.acc)  # (the steps before it are not in the trace; a sync, once)
        t0 = time.time()
        self.profiler.start()
        self.paused_s += time.time() - t0  # (starting the profiler)

    def profile_stop(self) -> None:
        jax.block_until_ready((self.run.state, self.run.acc))  # step b done: its time is training time
        t0 = time.time()
        self.profiler.stop()
        self.paused_s += time.time() - t0  # (writing the trace)

    def validate(self, step: int) -> None:
        """The validation split, with the parameters and (trainer.ema_decay) their moving average."""
        run = self.run
        values = self.evaluate("val", step)
        if values["val/acc"] > run.loop.best_val:
            run.loop.best_val, run.loop.best_step = values["val/acc"], step
        # best/val/acc over time too: a W&B Sweep's early termination (Hyperband) reads its metric from the
        # history, and the summary gets the final value.
        row, self.train_row = {**self.train_row, **values, "best/val/acc": run.loop.best_val,
                               "epoch": step / run.steps_per_epoch}, {}
        run.tracker.log(row, step)
        run.tracker.log_curves()
        run.loop.last_val = {k: values[k] for k in ("val/loss", "val/acc", "val_ema/loss", "val_ema/acc") if k in values}
        self.evals["val"] = run.loop.last_val

    def epoch_line(self, step: int) -> None:
        run, sums = self.run, self.run.loop.epoch_sums
        epoch_time = time.time() - self.t_epoch - self.epoch_eval_s
        run.timing["train_s"] += epoch_time
        line = {"train/loss": sums["loss"] / sums["count"], "train/acc": sums["correct"] / sums["count"],
                **self.evals.get("val", {})}
        self.evals["epoch"] = line
        if self.bar is not None:
            self.bar.close()
        images_per_sec = sums["count"] / max(epoch_time, 1e-9)
        mfu = perf.throughput(images_per_sec, len(run.devices), run.flops_per_example, run.peak_tflops).get("perf/mfu")
        log.info("epoch %d/%d  %s  %s img/s%s  %.1fs", run.epoch_of(step) + 1, run.cfg.trainer.epochs,
                 "  ".join(f"{k} {v:.4f}" for k, v in line.items()), f"{images_per_sec:,.0f}",
                 "" if mfu is None else f"  MFU {mfu:.1%}", epoch_time)

    def checkpoint(self, step: int) -> None:
        run = self.run
        run.loop.rows = run.tracker.rows
        run.loop.acc = {k: float(v) for k, v in jax.device_get(run.acc).items()}
        metrics = {**self.evals.get("val", {}), **self.evals.get("epoch", {})}
        t0 = time.time()
        run.checkpointer.save(step, {"state": run.state}, run.checkpoint_meta(step),
                              metrics if run.cfg.trainer.best_metric in metrics else None)
        run.timing["checkpoint_s"] += time.time() - t0
        self.paused_s += time.time() - t0  # (after the fetch above: the steps before it are done)

    def stop_now(self, step: int) -> None:
        if step != self.run.total_steps:  # (at the last step the run ends anyway: test and summary first)
            self.stop.exit(self.run.checkpointer, step, self.run.run_dir)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, split: str, step: int) -> dict:
        """One evaluation of ``split`` (and of the moving average, when kept): scalars now, figures on the
        media thread from the same counts."""
        run = self.run
        jax.block_until_ready(run.acc)  # the steps before it finish first: their time is training time
        t0 = time.time()
        out = evaluation.evaluate(run.eval_step, run.state.params, run.state.other, run.feed, split, run.ds.class_names)
        values = dict(out.scalars)
        if run.state.ema is not None:
            ema = evaluation.evaluate(run.eval_step, run.state.ema, run.state.other, run.feed, split,
                                      run.ds.class_names, prefix=f"{split}_ema")
            values.update({k: v for k, v in ema.scalars.items() if k.endswith(("/loss", "/acc"))})
        t1 = time.time()
        run.timing["eval_s"] += t1 - t0
        if run.cfg.logger.media:
            self.media(split, step, out)
        run.timing["media_s"] += time.time() - t1
        self.epoch_eval_s += time.time() - t0
        self.paused_s += time.time() - t0
        return values

    def media(self, split: str, step: int, out: evaluation.EvalResult) -> None:
        run = self.run
        data = run.feed.splits[split]
        # The same rows every time, so a table's rows change over training, not its images.
        sample_idx = np.arange(min(run.cfg.logger.num_samples, len(data.labels)))
        sample = {"index": sample_idx, "probs": np.asarray(run.predict(run.state.params, run.state.other,
                                                                       data.images[sample_idx]))}
        boundary = _boundary_grid(data, run) if run.ds.shape == (1, 1, 2) else None  # 2-D points
        run.tracker.log_eval(split, step, labels=data.labels, preds=out.preds, confidence=out.confidence,
                             class_names=run.ds.class_names, images=data.images, sample=sample, boundary=boundary,
                             confusion=out.confusion, cal=out.calibration)

    # ------------------------------------------------------------------ the end
    def end(self) -> dict:
        run, step = self.run, self.run.total_steps
        if run.checkpointer is not None:
            run.checkpointer.wait()
            run.tracker.log_checkpoints(run.checkpointer.directory,
                                        {"best": run.checkpointer.best(), "latest": run.checkpointer.latest()})
        test = self.evaluate("test", step)
        run.tracker.log(test, step)
        run.tracker.log_curves()
        test = {k: test[k] for k in ("test/loss", "test/acc", "test/ece", "test_ema/loss", "test_ema/acc") if k in test}
        log.info("test  %s", "  ".join(f"{k} {v:.4f}" for k, v in test.items()))
        summary = {"objective": run.cfg.trainer.objective, "parameters": run.n_params, "num_devices": len(run.devices), **test,
                   **run.loop.last_val}  # (the final evaluation's val/loss, val/acc)
        if run.loop.best_step >= 0:
            summary.update({"best/val/acc": run.loop.best_val, "best/step": run.loop.best_step})
        summary.update({"step": step, "images_seen": step * run.cfg.trainer.batch_size,
                        "wall_time_s": time.time() - run.t_start, **{f"time/{k}": v for k, v in run.timing.items()}})
        run.tracker.summary(summary)
        return summary

    def close(self, exit_code: int) -> None:
        self.stop.restore()
        if self.profiler is not None:
            self.profiler.abandon()
        if self.bar is not None:
            self.bar.close()
        self.run.feed.close()  # (a streamed feed's worker processes)
        try:
            if self.run.checkpointer is not None:
                self.run.checkpointer.close()  # waits for a save in flight (its failure, e.g. a full disk, is raised here)
        finally:
            self.run.tracker.finish(exit_code)


class Profiler:
    """``trainer.profile_steps=[a, b]``: a JAX profiler trace of steps a to b (1-based, inclusive) in
    ``<run dir>/profile`` (TensorBoard's layout: ``plugins/profile/<time>/<host>.xplane.pb``, and a Perfetto
    ``.trace.json.gz`` beside it), uploaded by the tracker (W&B: an artifact of type "profile"). A run resumed
    inside the range traces the rest of it; one resumed past it does not trace again."""

    def __init__(self, run: Run, steps):
        self.run = run
        self.first, self.last = (int(s) for s in steps)
        self.dir = run.run_dir / "profile"
        # The 0-based step before whose dispatch the trace starts (None: resumed past the range).
        self.begin = max(self.first - 1, run.start_step) if run.start_step < self.last else None
        # Hook steps (after_step's, 1-based: the step just taken): start after step a - 1 (when this process took
        # it; else before its first step, in epoch_start), stop after step b.
        self.start_at = (self.begin,) if self.begin is not None and self.begin > run.start_step else ()
        self.stop_at = (self.last,) if self.begin is not None else ()
        self.active = False

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            jax.profiler.start_trace(str(self.dir), create_perfetto_trace=True)
        except RuntimeError as e:  # (e.g. a trace already running in this process): the run goes on untraced
            log.warning("trainer.profile_steps: no trace of steps %d-%d (%s)", self.first, self.last, e)
            return
        self.active = True
        self.t0 = time.time()

    def stop(self) -> None:
        if not self.active:
            return
        jax.block_until_ready((self.run.state, self.run.acc))  # step b's work, not only its dispatch, in the trace
        jax.profiler.stop_trace()
        self.active = False
        run = self.run
        traces = sorted(self.dir.glob("plugins/profile/*/perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime)
        shown = traces[-1] if traces else self.dir
        log.info("profile of steps %d-%d (%.1fs traced): %s; open it in https://ui.perfetto.dev (Open trace file), "
                 "or with TensorBoard's profile plugin (the .xplane.pb beside it): tensorboard --logdir %s",
                 self.first, self.last, time.time() - self.t0, shown, self.dir)
        run.tracker.log_profile(self.dir, (self.first, self.last))

    def abandon(self) -> None:
        """The run ended inside the range (an error, a signal): the trace so far is written, not uploaded."""
        if self.active:
            self.active = False
            jax.profiler.stop_trace()


class StopOnSignal:
    """SIGTERM (preemption) and SIGINT (Ctrl-C) ask the loop to stop after the current step. Under
    submitit (SLURM jobs of hydra/launcher=slurm), SIGUSR2 (sent before the time limit, and on
    preemption) does too, and submitit's own handler for it, which requeues the job, is handed on."""

    def __init__(self):
        self.signum = 0
        self._old = {}
        self.requeue = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.getsignal(signal.SIGUSR2)
            self.requeue = previous if callable(previous) else None  # submitit's checkpoint_and_try_requeue
            for sig in (signal.SIGTERM, signal.SIGINT) + ((signal.SIGUSR2,) if self.requeue else ()):
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.signum:
            if signum == signal.SIGINT:  # a second Ctrl-C: stop now
                raise KeyboardInterrupt
            return  # SLURM sends SIGUSR2 and SIGTERM on preemption: the save already asked for goes on
        self.signum = signum
        log.warning("received signal %d: finishing this step, then saving a checkpoint", signum)

    def restore(self):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)

    def exit(self, checkpointer, step: int, run_dir: Path):
        if checkpointer is not None:
            checkpointer.wait()
        name = signal.Signals(self.signum).name
        where = f"checkpoint saved at step {step} in {run_dir / 'checkpoints'}" if checkpointer else "no checkpoints (trainer.checkpoint=false)"
        requeue = self.requeue if self.signum in (signal.SIGTERM, signal.SIGUSR2) else None
        raise Preempted(f"stopped by {name}: {where}; " +
                        ("submitit requeues the job, which resumes there" if requeue else
                         "run the same command (same run directory) to resume"), self.signum, requeue)


def _boundary_grid(split, run: Run) -> dict:
    """The model's class over a grid covering 2-D data (drawn later, on the media thread)."""
    pts = split.images.reshape(-1, 2)
    lo, hi = pts.min(0) - 1.0, pts.max(0) + 1.0
    xx, yy = np.meshgrid(np.linspace(lo[0], hi[0], 200), np.linspace(lo[1], hi[1], 200))
    grid = np.stack([xx.ravel(), yy.ravel()], -1).astype(np.float32).reshape(-1, 1, 1, 2)
    pred = np.asarray(run.predict(run.state.params, run.state.other, grid)).argmax(-1)
    return {"points": pts, "grid": (xx, yy), "grid_pred": pred}


def _progress(total: int, desc: str, enabled: bool, initial: int = 0):
    from tqdm.auto import tqdm  # (only where a bar is drawn)

    return tqdm(total=total, initial=initial, desc=desc, leave=False, disable=not enabled, dynamic_ncols=True,
                mininterval=0.5, unit="step")
