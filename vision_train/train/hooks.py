"""Hooks: every periodic action of a run, each a ``Hook(name, every, run)`` that the loop calls after the steps
it is due at, built-in ones (log, evaluate, the epoch line, record, checkpoint, signals, a profile) and the
user's (``vision_train.train(cfg, run_dir, hooks=[Hook("probe", every=100, run=fn)])``) alike.

A hook's function is ``fn(step, run, results)``: ``step`` is the step just taken (1-based, as in the records),
``run`` the assembled run (``assembly.Run``: state, tracker, feed, config...), ``results`` what the hooks before
it produced at this step (``Results``: the row of metrics logged once for the step, this step's validation and
epoch line). Everything a hook needs is passed to it: the clocks (``Chrono``), the progress bar, the signals.

Timing (the same for every hook): at a step where any hook is due the loop first waits for the device to finish
the steps so far (their time is training time), then runs the due hooks, whose time is not training time: the
throughput a run logs (images/s, MFU) is training alone.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from .. import config as config_lib
from .. import parallel, perf
from ..errors import Preempted, TrainingError
from . import evaluation, steps

log = logging.getLogger("vision_train")

# The validation metrics an epoch line shows and the summary keeps (its final evaluation), from METRICS.
VAL_LINE = tuple(k for k, m in config_lib.METRICS.items() if m.needs_val and m.epoch_line)
# The train metrics (steps.TRAIN_METRICS) an epoch line shows, from METRICS.
TRAIN_LINE = tuple(k for k, m in config_lib.METRICS.items() if not m.needs_val and m.epoch_line)


def itstime(step: int, every, total: int, last: bool = True) -> bool:
    """Periodic work at ``step`` (1-based: the step just taken): every ``e`` steps for each ``e`` > 0 in
    ``every`` (an int or several), and at the run's last step unless ``last`` is False."""
    every = (every,) if isinstance(every, int) else every
    return any(e > 0 and step % e == 0 for e in every) or (last and step == total)


@dataclass
class Results:
    """What the hooks of one step produced, handed from hook to hook in their order."""
    row: dict = field(default_factory=dict)   # metrics of this step: one row in metrics.jsonl and W&B ("record")
    val: dict | None = None                   # this step's validation scalars (VAL_LINE), when it ran
    epoch: dict | None = None                 # the epoch line, when this step closed an epoch


@dataclass
class Hook:
    """``run(step, run, results)`` after every ``every``-th step (an int, or several periods; 0: none), at the
    steps in ``at``, at the run's last step when ``last``, and whenever ``when()`` says so (e.g. a signal came).
    Its time is not training time either way; ``clock`` names the ``Chrono`` total it is added to (the user's
    hooks: ``time/hooks_s``; the built-in ones add their own work to ``eval_s``, ``checkpoint_s``... themselves)."""
    name: str
    every: int | tuple[int, ...] = 0
    run: Callable[[int, Any, Results], Any] | None = None
    last: bool = False
    at: tuple[int, ...] = ()
    when: Callable[[], bool] | None = None
    clock: str | None = "hooks_s"

    def due(self, step: int, total: int) -> bool:
        return step in self.at or itstime(step, self.every, total, self.last) or bool(self.when and self.when())


class Chrono:
    """The run's clocks (big_vision's ``u.chrono``): start-up, training time per log interval and per epoch (wall
    time less the time hooks took), and the totals the summary reports as ``time/*``."""

    def __init__(self, started_at: float):
        self.started_at = started_at
        self.totals = {"startup_s": 0.0, "train_s": 0.0, "eval_s": 0.0, "media_s": 0.0, "checkpoint_s": 0.0,
                       "hooks_s": 0.0}
        self.t_interval = self.t_epoch = time.time()
        self.images = 0                 # trained since the interval began
        self.paused_interval = 0.0      # hooks' time since the interval began
        self.paused_epoch = 0.0         # hooks' time since the epoch began

    def epoch_start(self) -> None:
        self.t_interval = self.t_epoch = time.time()
        self.images, self.paused_interval, self.paused_epoch = 0, 0.0, 0.0

    def first_step_done(self) -> float:
        """After this process's first step (its device work done): start-up ends, compilation is left out."""
        self.t_interval = time.time()
        self.images, self.paused_interval = 0, 0.0
        self.totals["startup_s"] = self.t_interval - self.started_at
        return self.totals["startup_s"]

    @contextlib.contextmanager
    def paused(self, total: str | None = None):
        """Time that is not training time (a hook); added to ``totals[total]`` when given."""
        t0 = time.time()
        try:
            yield
        finally:
            dt = time.time() - t0
            self.paused_interval += dt
            self.paused_epoch += dt
            if total:
                self.totals[total] += dt

    def images_per_sec(self) -> float | None:
        """Training throughput since the last call (or the epoch's start); a new interval begins."""
        now = time.time()
        rate = self.images / max(now - self.t_interval - self.paused_interval, 1e-9) if self.images else None
        self.t_interval, self.images, self.paused_interval = now, 0, 0.0
        return rate

    def epoch_seconds(self) -> float:
        return time.time() - self.t_epoch - self.paused_epoch


class Progress:
    """The epoch's progress bar (tqdm; off with ``trainer.progress_bar=false`` and on every process but 0)."""

    def __init__(self, enabled: bool):
        self.enabled, self.bar = enabled, None

    def epoch(self, total: int, desc: str, initial: int) -> None:
        self.close()
        from tqdm.auto import tqdm  # (only where a bar is drawn)

        self.bar = tqdm(total=total, initial=initial, desc=desc, leave=False, disable=not self.enabled,
                        dynamic_ncols=True, mininterval=0.5, unit="step")

    def update(self) -> None:
        self.bar.update(1)

    def show(self, metrics: dict) -> None:
        self.bar.set_postfix(loss=f"{metrics['train/loss']:.4f}", acc=f"{metrics['train/acc']:.4f}",
                             img_s=f"{metrics.get('images_per_sec', 0):,.0f}", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# ------------------------------------------------------------------------------------------ built-in hooks
def log_train(chrono: Chrono, progress: Progress) -> Callable:
    """Fetch the running sums (the only per-interval device fetch), stop on NaN, the train metrics into the row."""

    def log_train(step: int, run, results: Results) -> None:
        host = jax.device_get(run.train_sums)
        run.train_sums = run.new_train_sums()
        if int(host["nan_step"]) >= 0:
            bad = int(host["nan_step"])
            raise TrainingError(
                f"loss became NaN/inf at step {bad} (epoch {(bad - 1) // run.steps_per_epoch + 1}); lower "
                f"optimizer.lr (now {run.cfg.optimizer.lr:g}) or set optimizer.grad_clip_norm. Metrics up to step "
                f"{step - int(host['steps'])} are in {run.run_dir / 'metrics.jsonl'}")
        sums = run.loop.epoch_sums
        for k in steps.TRAIN_SUM_KEYS:
            sums[k] = sums.get(k, 0.0) + float(host[k])
        metrics = {**steps.train_metrics(host), "lr": float(host["lr"]), "epoch": step / run.steps_per_epoch}
        rate = chrono.images_per_sec()  # training alone: the hooks' time in the interval is left out
        if rate is not None:
            metrics["images_per_sec"] = rate
            metrics.update(perf.throughput(rate, len(run.devices), run.flops_per_example, run.peak_tflops))
        results.row.update(metrics)
        progress.show(metrics)

    return log_train


def evaluate_run(run, split: str, step: int, chrono: Chrono) -> dict:
    """The run's evaluation of ``split`` (and of the moving average, when kept): scalars now, figures on the media
    thread from the same counts."""
    t0 = time.time()
    out = evaluation.run_split(run.eval_step, run.state.params, run.state.other, run.feed, split, run.ds.class_names)
    values = dict(out.scalars)
    if run.state.ema is not None:
        ema = evaluation.run_split(run.eval_step, run.state.ema, run.state.other, run.feed, split, run.ds.class_names,
                                  prefix=f"{split}_ema")
        values.update({k: v for k, v in ema.scalars.items() if k.endswith(("/loss", "/acc"))})
    t1 = time.time()
    chrono.totals["eval_s"] += t1 - t0
    if run.cfg.logger.media:
        _media(run, split, step, out)
    chrono.totals["media_s"] += time.time() - t1
    return values


def validate(chrono: Chrono) -> Callable:
    """The validation split, with the parameters and (trainer.ema_decay) their moving average; the best so far."""

    def validate(step: int, run, results: Results) -> None:
        values = evaluate_run(run, "val", step, chrono)
        if values["val/acc"] > run.loop.best_val:
            run.loop.best_val, run.loop.best_step = values["val/acc"], step
        # best/val/acc over time too: a W&B Sweep's early termination (Hyperband) reads its metric from the
        # history, and the summary gets the final value. (epoch: W&B plots val/* against it from this row.)
        results.row.update({**values, "best/val/acc": run.loop.best_val, "epoch": step / run.steps_per_epoch})
        results.val = run.loop.last_val = {k: values[k] for k in VAL_LINE if k in values}

    return validate


def epoch_line(chrono: Chrono, progress: Progress) -> Callable:
    def epoch_line(step: int, run, results: Results) -> None:
        sums = run.loop.epoch_sums
        seconds = chrono.epoch_seconds()
        chrono.totals["train_s"] += seconds
        train = steps.train_metrics(sums)
        results.epoch = {**{k: train[k] for k in TRAIN_LINE if k in train}, **(results.val or {})}
        progress.close()
        images_per_sec = sums["count"] / max(seconds, 1e-9)
        mfu = perf.throughput(images_per_sec, len(run.devices), run.flops_per_example, run.peak_tflops).get("perf/mfu")
        log.info("epoch %d/%d  %s  %s img/s%s  %.1fs", run.epoch_of(step) + 1, run.cfg.trainer.epochs,
                 "  ".join(f"{k} {v:.4f}" for k, v in results.epoch.items()), f"{images_per_sec:,.0f}",
                 "" if mfu is None else f"  MFU {mfu:.1%}", seconds)

    return epoch_line


def record(step: int, run, results: Results) -> None:
    """The step's row, once (at an epoch's end the train metrics and the evaluation's are one row: each (step,
    key) once); before the checkpoint, whose loop state counts the rows written."""
    if results.row:
        run.tracker.log(results.row, step)
    if results.val is not None:
        run.tracker.log_curves()


def checkpoint(chrono: Chrono) -> Callable:
    def checkpoint(step: int, run, results: Results) -> None:
        run.loop.rows = run.tracker.rows
        run.loop.train_sums = {k: float(v) for k, v in jax.device_get(run.train_sums).items()}
        metrics = {**(results.val or {}), **(results.epoch or {})}
        t0 = time.time()
        run.checkpointer.save(step, {"state": run.state}, run.checkpoint_meta(step),
                              metrics if run.cfg.trainer.best_metric in metrics else None)
        chrono.totals["checkpoint_s"] += time.time() - t0

    return checkpoint


def builtin(run, chrono: Chrono, progress: Progress, stop: StopOnSignal, profiler: Profiler | None,
            user: list[Hook] = ()) -> list[Hook]:
    """A run's hooks in the order they run after a step: the end of a profile (the trace ends with its last step
    itself), log, evaluate, the epoch line, record, checkpoint, the user's, signals, the start of a profile (the
    trace starts with its first step, not with the hooks before it)."""
    t, spe = run.cfg.trainer, run.steps_per_epoch
    has_val = "val" in run.feed.splits
    eval_every = (t.eval_every_epochs * spe, t.eval_every_steps) if has_val else ()
    stopping = lambda: bool(stop.signum)  # noqa: E731
    own = functools.partial(Hook, clock=None)  # (a built-in hook accounts its own time)
    hooks = []
    if profiler is not None and profiler.stop_at:
        hooks.append(own("profile_stop", at=profiler.stop_at, run=lambda step, run, results: profiler.stop()))
    hooks.append(own("log", (t.log_every_steps, spe), log_train(chrono, progress), last=True))
    if has_val:
        hooks.append(own("eval", eval_every, validate(chrono), last=True))
    hooks.append(own("epoch", spe, epoch_line(chrono, progress), last=True))
    hooks.append(own("record", (t.log_every_steps, spe, *eval_every), record, last=True))
    if run.checkpointer is not None:
        hooks.append(own("checkpoint", (t.checkpoint_every_steps, t.checkpoint_every_epochs * spe),
                         checkpoint(chrono), last=True, when=stopping))
    hooks += list(user)
    hooks.append(own("signals", when=stopping, run=lambda step, run, results: stop.exit(run, step)))
    if profiler is not None and profiler.start_at:
        hooks.append(own("profile_start", at=profiler.start_at, run=lambda step, run, results: profiler.start()))
    return hooks


def _media(run, split: str, step: int, out: evaluation.EvalResult) -> None:
    data = run.feed.splits[split]
    # The same rows every time, so a table's rows change over training, not its images.
    sample_idx = np.arange(min(run.cfg.logger.num_samples, len(data.labels)))
    sample = {"index": sample_idx, "probs": np.asarray(run.predict(run.state.params, run.state.other,
                                                                   data.images[sample_idx]))}
    boundary = _boundary_grid(data, run) if run.ds.shape == (1, 1, 2) else None  # 2-D points
    run.tracker.log_eval(split, step, labels=data.labels, preds=out.preds, confidence=out.confidence,
                         class_names=run.ds.class_names, images=data.images, sample=sample, boundary=boundary,
                         confusion=out.confusion, cal=out.calibration)


def _boundary_grid(split, run) -> dict:
    """The model's class over a grid covering 2-D data (drawn later, on the media thread)."""
    pts = split.images.reshape(-1, 2)
    lo, hi = pts.min(0) - 1.0, pts.max(0) + 1.0
    xx, yy = np.meshgrid(np.linspace(lo[0], hi[0], 200), np.linspace(lo[1], hi[1], 200))
    grid = np.stack([xx.ravel(), yy.ravel()], -1).astype(np.float32).reshape(-1, 1, 1, 2)
    pred = np.asarray(run.predict(run.state.params, run.state.other, grid)).argmax(-1)
    return {"points": pts, "grid": (xx, yy), "grid_pred": pred}


# ------------------------------------------------------------------------------------------ profile, signals
class Profiler:
    """``trainer.profile_steps=[a, b]``: a JAX profiler trace of steps a to b (1-based, inclusive) in
    ``<run dir>/profile`` (TensorBoard's layout: ``plugins/profile/<time>/<host>.xplane.pb``, and a Perfetto
    ``.trace.json.gz`` beside it), uploaded by the tracker (W&B: an artifact of type "profile"). A run resumed
    inside the range traces the rest of it; one resumed past it does not trace again."""

    def __init__(self, run, steps):
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
        jax.block_until_ready((self.run.state, self.run.train_sums))  # step b's work, not its dispatch alone, traced
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
        self.signum = 0    # the signal the run stops on: in a run of several processes, after the same step in each
        self.received = 0  # the signal this process received
        self._old = {}
        self.requeue = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.getsignal(signal.SIGUSR2)
            self.requeue = previous if callable(previous) else None  # submitit's checkpoint_and_try_requeue
            for sig in (signal.SIGTERM, signal.SIGINT) + ((signal.SIGUSR2,) if self.requeue else ()):
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.received:
            if signum == signal.SIGINT:  # a second Ctrl-C: stop now
                raise KeyboardInterrupt
            return  # SLURM sends SIGUSR2 and SIGTERM on preemption: the save already asked for goes on
        self.received = signum
        log.warning("received signal %d: finishing this step, then saving a checkpoint", signum)

    def agree(self, step: int, run) -> None:
        """After step ``step``, before its hooks: one process stops now; several stop after the same step, a few
        steps on (``parallel.agreed_stop``: within the steps between two of the loop's waits for the devices)."""
        margin = min(run.cfg.trainer.log_every_steps, run.steps_per_epoch) + 2
        self.signum = parallel.agreed_stop(self.received, step, margin)

    def restore(self):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)

    def exit(self, run, step: int) -> None:
        """Stop after this step (at the run's last step the run ends anyway: test and summary first)."""
        if step == run.total_steps:
            return
        checkpointer, run_dir = run.checkpointer, run.run_dir
        if checkpointer is not None:
            checkpointer.wait()
        name = signal.Signals(self.signum).name
        where = f"checkpoint saved at step {step} in {run_dir / 'checkpoints'}" if checkpointer else "no checkpoints (trainer.checkpoint=false)"
        requeue = self.requeue if self.signum in (signal.SIGTERM, signal.SIGUSR2) else None
        raise Preempted(f"stopped by {name}: {where}; " +
                        ("submitit requeues the job, which resumes there" if requeue else
                         "run the same command (same run directory) to resume"), self.signum, requeue)
