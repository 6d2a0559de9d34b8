"""``train(cfg, run_dir)``: the whole run, top to bottom, in data-flow order.

Importable without Hydra: tests and benchmarks call it with a ``Config`` built in Python.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np

from .. import config as config_lib
from .. import records
from ..errors import ConfigError, TrainingError, UserError

log = logging.getLogger("vision_train")


def itstime(step: int, every: int, total: int) -> bool:
    """Periodic work: every ``every`` steps and at the last step."""
    return (every > 0 and step % every == 0) or step == total


def _build_model(cfg, ds, rngs, dtype):
    from .. import models
    from ..models.layers import valid_patch_sizes

    m = cfg.model
    num_classes = m.num_classes or ds.num_classes
    if num_classes < ds.num_classes:
        raise ConfigError("model.num_classes", m.num_classes,
                          f"{cfg.data.name} has {ds.num_classes} classes; set model.num_classes={ds.num_classes} "
                          f"or leave it unset (null) to follow the data")
    h, w, _ = ds.shape
    if hasattr(m, "patch_size") and m.patch_size not in valid_patch_sizes(h, w):
        raise ConfigError("model.patch_size", m.patch_size, f"does not divide the {h}x{w} {cfg.data.name} images; "
                          f"use one of {valid_patch_sizes(h, w)}")
    try:
        return models.create(m.arch, ds.shape, num_classes, rngs=rngs, dtype=dtype, **config_lib.model_kwargs(m))
    except ValueError as e:
        raise ConfigError(f"model={m.arch}", cfg.data.name, str(e)) from None


def train(cfg: config_lib.Config, run_dir: str | Path, started_at: float | None = None) -> dict:
    """Train, evaluate, test. Returns the summary (also written to ``<run_dir>/summary.json``).

    ``started_at``: when this job started (the CLI passes the process's import time for its first job),
    so ``time/startup_s`` in the summary is start-up to the first finished step (imports, data, compile)."""
    t_start = time.time()
    started_at = started_at or t_start
    run_dir = Path(run_dir)
    if cfg.trainer.checkpoint and any(c in str(run_dir.resolve()) for c in "[]"):  # before anything loads
        raise ConfigError("hydra.run.dir", str(run_dir), "Orbax cannot restore checkpoints from a path holding [ or ] "
                          "(in a sweep: hydra.sweep.dir); choose a directory without them, or set "
                          "trainer.checkpoint=false")
    run_dir.mkdir(parents=True, exist_ok=True)

    # ---------------------------------------------------------------- hardware
    from .. import parallel

    if cfg.hardware.distributed:
        parallel.initialize_distributed()
    parallel.enable_compilation_cache(cfg.hardware.compilation_cache)
    import jax
    import jax.numpy as jnp
    from flax import nnx

    devices = parallel.select_devices(cfg.hardware.platform, cfg.hardware.num_devices)
    parallel.check_batch_divisible(cfg.trainer.batch_size, len(devices))
    mesh = parallel.make_mesh(devices)
    replicated, batch_sharding = parallel.replicated(mesh), parallel.batch_sharded(mesh)
    is_main = jax.process_index() == 0

    # ---------------------------------------------------------------- data
    from ..data import pipeline, sources

    ds = sources.load(cfg.data)
    t, B = cfg.trainer, cfg.trainer.batch_size
    steps_per_epoch = len(ds.train.labels) // B  # the last partial batch is dropped, as in the seeds
    if steps_per_epoch == 0:
        raise ConfigError("trainer.batch_size", B,
                          f"larger than the {len(ds.train.labels)} training examples of {cfg.data.name}; "
                          f"use at most {len(ds.train.labels) // len(devices) * len(devices)}")
    total_steps = steps_per_epoch * t.epochs
    a = cfg.data.augment
    aug = pipeline.Augment(a.flip, a.random_resized_crop, tuple(a.crop_scale), tuple(a.crop_ratio), a.pad_crop)
    if aug.enabled and ds.train.images.dtype != np.uint8:
        raise ConfigError("data.augment", cfg.data.name, "image augmentation needs image data; turn it off for this data set")

    # ---------------------------------------------------------------- model, optimizer, state
    from ..rng import stream
    from . import state as state_lib
    from .steps import make_steps, new_accumulator

    dtype = jnp.bfloat16 if cfg.hardware.precision == "bfloat16" else jnp.float32
    o = cfg.optimizer
    warmup = round(o.warmup_epochs * steps_per_epoch)
    schedule = state_lib.lr_schedule(o.schedule, o.lr, total_steps, warmup, o.min_lr)  # (logged as "lr")
    shape = state_lib.lr_schedule(o.schedule, 1.0, total_steps, warmup, o.min_lr / o.lr)
    tx = state_lib.make_optimizer(o, lr_shape=shape)

    # Model + optimizer state built inside one jit (eager NNX init runs op by op: slow). The seed and the
    # optimizer's hyper-parameters are arguments, not constants: the jobs of a sweep over them compile the
    # same programs (train step included), which the persistent compilation cache then serves.
    seed = np.int32(t.seed)
    hparams = {k: np.float32(v) for k, v in state_lib.hyperparameters(o).items()}

    def init(seed, hparams):
        rngs = nnx.Rngs(params=stream(seed, "params"), dropout=stream(seed, "dropout"))
        model = _build_model(cfg, ds, rngs, dtype)
        return state_lib.create(model, state_lib.make_optimizer(o, lr_shape=shape, hparams=hparams), seed)

    graphdef, _ = nnx.eval_shape(init, seed, hparams)  # shape errors surface here, before anything compiles
    state = jax.jit(lambda s, h: init(s, h)[1], out_shardings=replicated)(seed, hparams)
    n_params = state_lib.param_count(state.params)

    # The data sets live on every device; steps gather their batches from them.
    put = lambda x: parallel.put_replicated(x, replicated)  # noqa: E731
    train_x, train_y = put(ds.train.images), put(ds.train.labels)
    splits = {"val": ds.val, "test": ds.test}
    eval_data = {}
    for name, split in splits.items():
        if split is not None and len(split.labels):
            idx, mask = pipeline.eval_batches(len(split.labels), B)
            eval_data[name] = (put(split.images), put(split.labels), put(idx), put(mask))

    steps = make_steps(graphdef, tx, batch_size=B, aug=aug, scale=ds.scale, mean=ds.mean, std=ds.std, dtype=dtype,
                       label_smoothing=o.label_smoothing, batch_sharding=batch_sharding)
    train_step = jax.jit(steps.train, donate_argnums=(0, 1))
    eval_step = jax.jit(steps.eval, out_shardings=replicated)  # fetchable from any process
    permutation = jax.jit(pipeline.epoch_permutation, static_argnums=(2,), out_shardings=replicated)

    # ---------------------------------------------------------------- checkpoints, resume
    from .. import checkpoint as ckpt_lib

    new_acc = jax.jit(new_accumulator, out_shardings=replicated)
    acc = new_acc()
    ckpt_dir = run_dir / "checkpoints"
    shapes = ckpt_lib.param_shapes(state.params)
    if t.resume == "never" and is_main:
        moved = records.set_aside_run(run_dir)  # nothing an earlier run wrote is overwritten or deleted
        if moved:
            log.info("trainer.resume=never: the earlier run's files were moved to %s", moved)
    source = None
    if t.resume not in ("auto", "never"):
        source = ckpt_lib.find(t.resume)
    own = source is not None and source[0].resolve() == ckpt_dir.resolve()
    if own and source[1] is not None and is_main:
        _set_aside_after(run_dir, ckpt_dir, source[1])  # resuming from an earlier step of this run
    checkpointer = (ckpt_lib.Checkpointer(ckpt_dir, keep=t.keep_checkpoints, best_metric=t.best_metric,
                                          best_mode=t.best_mode) if t.checkpoint else None)
    if t.resume == "auto" and checkpointer is not None and checkpointer.latest() is not None:
        source, own = (ckpt_dir, None), True
    resumed: dict = {}
    parent: dict | None = None
    if source is not None:
        src_dir, src_step = source
        reader = checkpointer if (checkpointer and own) else \
            ckpt_lib.Checkpointer(src_dir, best_metric=None, read_only=True)
        src_step = reader.resolve_step(src_step)
        ckpt_lib.check_compatible(reader.read_meta(src_step), shapes, src_dir / str(src_step))
        items, resumed = reader.restore(src_step, ckpt_lib.abstract_like({"state": state, "acc": acc}, replicated))
        state, acc = items["state"], items["acc"]
        # The optimizer's numbers come from this run's config, not the checkpoint's (they live in the state).
        state = state.replace(opt_state=state_lib.set_hyperparameters(state.opt_state, hparams, replicated))
        log.info("resumed from %s at step %d", src_dir / str(src_step), src_step)
        if not own:  # another run's checkpoint: this is a new run (new tracking runs) that names its parent
            from ..tracking import Tracker

            parent = {"checkpoint": str(src_dir / str(src_step)), "step": src_step,
                      "run_dir": str(src_dir.parent) if src_dir.name == "checkpoints" else None,
                      **Tracker.parent_ids(resumed)}
            resumed = {"loop": resumed.get("loop", {})}
    start_step = int(jax.device_get(state.step))
    loop_state = resumed.get("loop", {})
    if own and start_step == total_steps and (run_dir / "summary.json").exists():
        done = json.loads((run_dir / "summary.json").read_text())
        log.info("this run finished (step %d of %d); nothing to do. Its summary: %s. To train it again from the "
                 "start use trainer.resume=never (the finished run's files are set aside, not overwritten)",
                 start_step, total_steps, run_dir / "summary.json")
        if checkpointer is not None:
            checkpointer.close()
        return done

    # ---------------------------------------------------------------- tracking
    from ..tracking import Tracker, default_run_name, run_metadata

    resolved = config_lib.to_dict(cfg)
    if is_main:
        _write_yaml(run_dir / "config.yaml", resolved)
    meta = run_metadata(run_dir, devices, n_params) if is_main else {}
    if parent:
        meta["parent"] = parent
    tracker = Tracker(run_dir, {**resolved, "meta": meta}, cfg.logger, is_main=is_main,
                      name=default_run_name(cfg, run_dir),
                      resume=None if source is None else {"step": start_step,
                                                          "rows": loop_state.get("rows") if own else None,
                                                          "sinks": Tracker.resume_from_meta(resumed) if own else None})
    log.info("%s: %s parameters | %s: train %d, val %d, test %d, %s | %d x %s | batch %d, %d steps/epoch, %d epochs",
             cfg.model.arch, f"{n_params:,}", cfg.data.name, len(ds.train.labels),
             0 if ds.val is None else len(ds.val.labels), len(ds.test.labels), "x".join(map(str, ds.shape)),
             len(devices), devices[0].platform, B, steps_per_epoch, t.epochs)

    predict = jax.jit(steps.predict)

    timing = {"startup_s": 0.0, "train_s": 0.0, "eval_s": 0.0, "media_s": 0.0, "checkpoint_s": 0.0}

    def evaluate(name: str, step: int) -> dict:
        """One pass over a split; its scalars (loss, accuracy, ECE, per-class accuracy) come from the eval
        step's sums, fetched here; the figures are drawn on the media thread from the same counts."""
        from ..tracking import media

        t0 = time.time()
        x, y, idx, mask = eval_data[name]
        out = eval_step(state.params, state.other, x, y, idx, mask)
        host = jax.device_get({k: out[k] for k in ("loss", "correct", "count", "confusion", "bins")})
        n = float(host["count"])
        cal = media.calibration_from_bins(host["bins"]["count"], host["bins"]["confidence"], host["bins"]["correct"])
        scalars = {f"{name}/loss": float(host["loss"]) / n, f"{name}/acc": float(host["correct"]) / n,
                   **media.eval_scalars(name, host["confusion"], cal, ds.class_names)}
        t1 = time.time()
        timing["eval_s"] += t1 - t0
        if cfg.logger.media:
            split = splits[name]
            valid = np.asarray(mask).reshape(-1)
            # The same rows every time, so a table's rows change over training, not its images.
            sample_idx = np.arange(min(cfg.logger.num_samples, len(split.labels)))
            sample = {"index": sample_idx,
                      "probs": np.asarray(predict(state.params, state.other, split.images[sample_idx]))}
            boundary = _boundary_grid(split, predict, state) if ds.shape == (1, 1, 2) else None  # 2-D points
            tracker.log_eval(name, step, labels=split.labels, preds=np.asarray(out["pred"])[valid],
                             confidence=np.asarray(out["confidence"])[valid], class_names=ds.class_names,
                             images=split.images, sample=sample, boundary=boundary, confusion=host["confusion"],
                             cal=cal)
            timing["media_s"] += time.time() - t1
        return scalars

    # ---------------------------------------------------------------- loop
    summary: dict = {"parameters": n_params, "num_devices": len(devices)}
    best_val, best_step = loop_state.get("best_val", -1.0), loop_state.get("best_step", -1)
    last_val = loop_state.get("last_val", {})
    exit_code = 1
    stop = _StopOnSignal()

    def save(step: int, metrics: dict | None = None) -> None:
        if checkpointer is None:
            return
        # A deep copy: the save is written on a background thread while the loop goes on changing its sums.
        meta = copy.deepcopy({
            "config": resolved, **tracker.resume_state(),
            "param_shapes": shapes, "step": step,
            "data": {"shape": list(ds.shape), "class_names": list(ds.class_names), "mean": list(ds.mean),
                     "std": list(ds.std), "scale": ds.scale},
            "versions": tracker.versions, "best_metric": t.best_metric,
            "loop": {"epoch_sums": epoch_sums, "best_val": best_val, "best_step": best_step, "last_val": last_val,
                     "rows": tracker.rows}})
        t0 = time.time()
        checkpointer.save(step, {"state": state, "acc": acc}, meta, metrics)  # blocks for the device->host copy
        timing["checkpoint_s"] += time.time() - t0

    try:
        lr_at = jax.jit(schedule)
        step = start_step
        first_epoch, first_index = divmod(start_step, steps_per_epoch)
        for epoch in range(first_epoch, t.epochs):
            perm = permutation(seed, epoch, len(ds.train.labels))
            # Resumed mid-epoch: the sums so far come from the checkpoint (at an epoch boundary they are
            # the finished epoch's, so a fresh epoch starts from zero).
            epoch_sums = loop_state["epoch_sums"] if epoch == first_epoch and first_index and loop_state else \
                {"loss": 0.0, "correct": 0.0, "count": 0.0}
            t_epoch = t_log = time.time()
            timed_images = 0
            start_i = first_index if epoch == first_epoch else 0
            bar = _progress(steps_per_epoch, f"epoch {epoch + 1}/{t.epochs}", enabled=t.progress_bar and is_main,
                            initial=start_i)
            for i in range(start_i, steps_per_epoch):
                state, acc = train_step(state, acc, train_x, train_y, perm, i)
                step += 1
                bar.update(1)
                timed_images += B
                if step == start_step + 1:  # leave compilation out of images/s (one extra sync, once per run)
                    jax.block_until_ready(acc)
                    t_log, timed_images = time.time(), 0
                    timing["startup_s"] = t_log - started_at
                    log.info("first step done %.1fs after start (imports, data, compilation)", timing["startup_s"])
                if itstime(step, t.log_every_steps, total_steps) or i == steps_per_epoch - 1:
                    host = jax.device_get(acc)  # sync point: the only per-interval device fetch
                    acc = new_acc()
                    now = time.time()
                    if int(host["nan_step"]) >= 0:
                        bad = int(host["nan_step"])
                        raise TrainingError(
                            f"loss became NaN/inf at step {bad} (epoch {(bad - 1) // steps_per_epoch + 1}); lower "
                            f"optimizer.lr (now {o.lr:g}) or set optimizer.grad_clip_norm. Metrics up to step "
                            f"{step - int(host['steps'])} are in {run_dir / 'metrics.jsonl'}")
                    for k in epoch_sums:
                        epoch_sums[k] += float(host[k])
                    metrics = {
                        "train/loss": float(host["loss"] / host["count"]),
                        "train/acc": float(host["correct"] / host["count"]),
                        "train/grad_norm": float(host["grad_norm"] / host["steps"]),
                        "lr": float(lr_at(step - 1)),
                        "epoch": step / steps_per_epoch,
                    }
                    if timed_images:
                        metrics["images_per_sec"] = timed_images / max(now - t_log, 1e-9)
                    t_log, timed_images = now, 0
                    tracker.log(metrics, step)
                    bar.set_postfix(loss=f"{metrics['train/loss']:.4f}", acc=f"{metrics['train/acc']:.4f}",
                                    img_s=f"{metrics.get('images_per_sec', 0):,.0f}", refresh=False)
                if i < steps_per_epoch - 1 and (stop.signum or itstime(step, t.checkpoint_every_steps, -1)):
                    save(step)  # (the epoch's last step is saved below, after its evaluation)
                    if stop.signum:
                        stop.exit(checkpointer, step, run_dir)
            bar.close()
            epoch_time = time.time() - t_epoch
            timing["train_s"] += epoch_time
            line = {"train/loss": epoch_sums["loss"] / epoch_sums["count"],
                    "train/acc": epoch_sums["correct"] / epoch_sums["count"]}
            last = epoch == t.epochs - 1
            if "val" in eval_data and ((t.eval_every_epochs and (epoch + 1) % t.eval_every_epochs == 0) or last):
                val = evaluate("val", step)
                if val["val/acc"] > best_val:
                    best_val, best_step = val["val/acc"], step
                # best/val/acc over time too: a W&B Sweep's early termination (Hyperband) reads its metric
                # from the history, and the summary gets the final value.
                tracker.log({**val, "best/val/acc": best_val, "epoch": float(epoch + 1)}, step)
                tracker.log_curves()
                last_val = {k: val[k] for k in ("val/loss", "val/acc")}  # (per-class values: in metrics.jsonl)
                line.update(last_val)
            log.info("epoch %d/%d  %s  %s img/s  %.1fs", epoch + 1, t.epochs,
                     "  ".join(f"{k} {v:.4f}" for k, v in line.items()),
                     f"{epoch_sums['count'] / epoch_time:,.0f}", epoch_time)
            if (stop.signum or last or itstime(step, t.checkpoint_every_steps, -1)
                    or (t.checkpoint_every_epochs and (epoch + 1) % t.checkpoint_every_epochs == 0)):
                save(step, line if t.best_metric in line else None)
            if stop.signum and not last:
                stop.exit(checkpointer, step, run_dir)
        if checkpointer is not None:
            checkpointer.wait()
            tracker.log_checkpoints(ckpt_dir, {"best": checkpointer.best(), "latest": checkpointer.latest()})

        test = evaluate("test", step)
        tracker.log(test, step)
        tracker.log_curves()
        test = {k: test[k] for k in ("test/loss", "test/acc", "test/ece")}
        log.info("test  %s", "  ".join(f"{k} {v:.4f}" for k, v in test.items()))
        summary.update(test)
        summary.update(last_val)  # the final evaluation's val/loss, val/acc
        if best_step >= 0:
            summary.update({"best/val/acc": best_val, "best/step": best_step})
        summary.update({"step": step, "images_seen": step * B, "wall_time_s": time.time() - t_start,
                        **{f"time/{k}": v for k, v in timing.items()}})
        tracker.summary(summary)
        exit_code = 0
        return summary
    finally:
        stop.restore()
        try:
            if checkpointer is not None:
                checkpointer.close()  # waits for a save in flight (its failure, e.g. a full disk, is raised here)
        finally:
            tracker.finish(exit_code)


class Preempted(UserError):
    """SIGTERM/SIGINT/SIGUSR2: the step in progress finished, a checkpoint was saved, the run stops.
    ``requeue``: under submitit (SLURM), its checkpoint-and-requeue handler, for the caller to call once
    the run's records are written (it requeues the job, which resumes from the checkpoint, and exits)."""

    def __init__(self, message: str, signum: int = 0, requeue=None):
        super().__init__(message)
        self.signum, self.requeue = signum, requeue


class _StopOnSignal:
    """SIGTERM (preemption) and SIGINT (Ctrl-C) ask the loop to stop after the current step. Under
    submitit (SLURM jobs of hydra/launcher=slurm), SIGUSR2 (sent before the time limit, and on
    preemption) does too, and submitit's own handler for it, which requeues the job, is handed on."""

    def __init__(self):
        import signal
        import threading

        self.signum = 0
        self._old = {}
        self.requeue = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.getsignal(signal.SIGUSR2)
            self.requeue = previous if callable(previous) else None  # submitit's checkpoint_and_try_requeue
            for sig in (signal.SIGTERM, signal.SIGINT) + ((signal.SIGUSR2,) if self.requeue else ()):
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        import signal

        if self.signum:
            if signum == signal.SIGINT:  # a second Ctrl-C: stop now
                raise KeyboardInterrupt
            return  # SLURM sends SIGUSR2 and SIGTERM on preemption: the save already asked for goes on
        self.signum = signum
        log.warning("received signal %d: finishing this step, then saving a checkpoint", signum)

    def restore(self):
        import signal

        for sig, handler in self._old.items():
            signal.signal(sig, handler)

    def exit(self, checkpointer, step: int, run_dir: Path):
        import signal

        if checkpointer is not None:
            checkpointer.wait()
        name = signal.Signals(self.signum).name
        where = f"checkpoint saved at step {step} in {run_dir / 'checkpoints'}" if checkpointer else "no checkpoints (trainer.checkpoint=false)"
        requeue = self.requeue if self.signum in (signal.SIGTERM, signal.SIGUSR2) else None
        raise Preempted(f"stopped by {name}: {where}; " +
                        ("submitit requeues the job, which resumes there" if requeue else
                         "run the same command (same run directory) to resume"), self.signum, requeue)


def _set_aside_after(run_dir: Path, ckpt_dir: Path, step: int) -> None:
    """Resuming from an earlier step of this run: what came after it is replaced. The later checkpoints,
    the summary and a copy of metrics.jsonl (which the resume cuts back to that step) go to
    ``<run dir>/earlier/<time>/``; nothing is deleted."""
    later = sorted((p for p in ckpt_dir.iterdir() if p.name.isdigit() and int(p.name) > step), key=lambda p: int(p.name))
    if not later:
        return
    dest = records.aside_dir(run_dir)
    (dest / "checkpoints").mkdir(parents=True)
    for p in later:
        shutil.move(str(p), dest / "checkpoints" / p.name)
    if (run_dir / "summary.json").exists():
        shutil.move(str(run_dir / "summary.json"), dest / "summary.json")
    if (run_dir / "metrics.jsonl").exists():
        shutil.copy2(run_dir / "metrics.jsonl", dest / "metrics.jsonl")
    log.info("resuming from step %d: the later checkpoints (%s) and the records after it were set aside in %s",
             step, ", ".join(p.name for p in later), dest)


def _boundary_grid(split, predict, state) -> dict:
    """The model's class over a grid covering 2-D data (drawn later, on the media thread)."""
    pts = split.images.reshape(-1, 2)
    lo, hi = pts.min(0) - 1.0, pts.max(0) + 1.0
    xx, yy = np.meshgrid(np.linspace(lo[0], hi[0], 200), np.linspace(lo[1], hi[1], 200))
    grid = np.stack([xx.ravel(), yy.ravel()], -1).astype(np.float32).reshape(-1, 1, 1, 2)
    pred = np.asarray(predict(state.params, state.other, grid)).argmax(-1)
    return {"points": pts, "grid": (xx, yy), "grid_pred": pred}


def _progress(total: int, desc: str, enabled: bool, initial: int = 0):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, leave=False, disable=not enabled, dynamic_ncols=True,
                mininterval=0.5, unit="step")


def _write_yaml(path: Path, data: dict) -> None:
    import yaml

    from ..errors import writing

    with writing(path, "the run's config"):  # (a full disk: one line)
        path.write_text(yaml.safe_dump(data, sort_keys=False))
