"""Assembly: everything a run has before its first step, built in data-flow order and returned as one
``Run``: devices and mesh, the feed, the model and its train state (restored when resuming), the jitted
steps, the checkpointer, the tracker. The loop (``train.loop``) only steps it and calls its hooks.

Importable without Hydra; JAX is started by the caller (the CLI sets XLA_FLAGS first).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import yaml  # (PyYAML: a dependency of Hydra's OmegaConf, installed with it)
from flax import nnx

from .. import checkpoint as ckpt_lib
from .. import config as config_lib
from .. import models, parallel, perf, records
from ..data import sources
from ..errors import ConfigError, writing
from ..fate import Fate
from ..models import pretrained
from ..rng import stream
from ..tracking import Tracker, default_run_name, run_metadata
from . import build
from . import state as state_lib
from . import steps as steps_lib
from .feeds import Feed

log = logging.getLogger("vision_train")


@dataclass
class LoopState:
    """What the loop carries from step to step besides the train state; saved (a copy) in every checkpoint
    and read back on resume. Keys of earlier checkpoints' "loop" metadata are read as they were."""
    epoch_sums: dict = field(default_factory=steps_lib.new_epoch_sums)  # the train sums of the epoch so far
    best_val: float = -1.0        # the best val/acc so far, and its step (-1: none yet)
    best_step: int = -1
    last_val: dict = field(default_factory=dict)  # the latest validation's loss/accuracy (summary.json)
    rows: int = 0                 # rows in metrics.jsonl when saved: a resume cuts the file back to them
    train_sums: dict | None = None  # the train step's running sums since the last log step (host numbers)

    # Keys earlier checkpoints' "loop" metadata wrote under another name.
    RENAMED: ClassVar[dict[str, str]] = {"acc": "train_sums"}

    def to_meta(self) -> dict:
        return copy.deepcopy(dataclasses.asdict(self))  # (the save is written while the loop goes on)

    @classmethod
    def from_meta(cls, meta: dict | None) -> LoopState:
        names = {f.name for f in dataclasses.fields(cls)}
        meta = dict(meta or {})
        for old, new in cls.RENAMED.items():
            if old in meta:
                meta.setdefault(new, meta.pop(old))
        return cls(**copy.deepcopy({k: v for k, v in meta.items() if k in names}))


@dataclass
class Run:
    """One run, assembled: what the loop steps and what its hooks use."""
    cfg: Any
    run_dir: Path
    devices: list
    mesh: Any
    is_main: bool
    ds: sources.Dataset
    input_shape: tuple         # the model's input (H, W, C): the data's, or data.image_size for a resampled built-in set
    feed: Feed
    graphdef: Any
    state: Any                 # TrainState (replicated)
    train_sums: dict           # the train step's running sums (on the device)
    loop: LoopState
    train_step: Callable       # jitted (state, train_sums, *feed.train_args(step)) -> (state, train_sums), both donated
    eval_step: Callable        # jitted (params, other, sums, args) -> (sums, pred, confidence)
    predict: Callable          # jitted (params, other, images) -> probabilities
    new_train_sums: Callable   # (host values or None) -> running sums on the device, from those or zero
    checkpointer: Any          # ckpt_lib.Checkpointer, or None (trainer.checkpoint=false)
    tracker: Tracker
    resolved: dict             # the resolved config (config.yaml, W&B, checkpoints)
    shapes: dict               # parameter shapes (checked on restore)
    n_params: int
    start_step: int
    total_steps: int
    steps_per_epoch: int
    started_at: float
    t_start: float
    own_resume: bool           # resumed from this run's own checkpoint
    flops_per_example: float = 0.0     # model FLOPs of one example in one training step (perf.train_flops)
    peak_tflops: float | None = None   # dense peak TFLOP/s of one device in the compute dtype (None: unknown)
    memory: dict = field(default_factory=dict)  # memory/* per device (report_memory; the summary and W&B config)

    def epoch_of(self, step: int) -> int:
        """The 0-based epoch that step ``step`` (1-based: the step just taken) belongs to."""
        return (step - 1) // self.steps_per_epoch

    def data_facts(self) -> dict:
        ds = self.ds
        return {"shape": list(self.input_shape), "class_names": list(ds.class_names), "mean": list(ds.mean),
                "std": list(ds.std), "scale": ds.scale}

    def checkpoint_meta(self, step: int) -> dict:
        return {"config": self.resolved, **self.tracker.resume_state(), "param_shapes": self.shapes, "step": step,
                "data": self.data_facts(), "versions": self.tracker.versions,
                "best_metric": self.cfg.trainer.best_metric, "loop": self.loop.to_meta(),
                **({"feed": feed} if (feed := self.feed.state()) else {})}  # (a streamed run's pipeline position)


def check_run_dir(cfg, run_dir: Path) -> None:
    if cfg.trainer.checkpoint and any(c in str(run_dir.resolve()) for c in "[]"):  # before anything loads
        raise ConfigError("hydra.run.dir", str(run_dir), "Orbax cannot restore checkpoints from a path holding [ or ] "
                          "(in a sweep: hydra.sweep.dir); choose a directory without them, or set "
                          "trainer.checkpoint=false")


def assemble(cfg: config_lib.Config, run_dir: Path, started_at: float, fate: Fate) -> Run:
    """Build the run whose fate (new, resume, branch: never finished) was decided before (``vision_train.fate``)."""
    t_start = time.time()
    t = cfg.trainer
    run_dir.mkdir(parents=True, exist_ok=True)

    # ---------------------------------------------------------------- hardware
    hw = build.hardware(cfg.hardware)
    devices, mesh, replicated, is_main = hw.devices, hw.mesh, hw.replicated, hw.is_main
    parallel.check_batch_divisible(t.batch_size, len(devices))
    micro = t.batch_size // t.grad_accum_steps
    if micro % len(devices):
        fits = [k for k in range(1, t.batch_size + 1) if t.batch_size % k == 0 and (t.batch_size // k) % len(devices) == 0]
        raise ConfigError("trainer.grad_accum_steps", t.grad_accum_steps,
                          f"its micro-batches of {micro} examples do not divide evenly across the {len(devices)} "
                          f"devices; use trainer.grad_accum_steps={' or '.join(map(str, fits[-3:]))}")

    # ---------------------------------------------------------------- data
    ds, streamed, in_shape = build.data(cfg.data)  # (in_shape: built-in sets resampled to data.image_size in jit)
    cfg = config_lib.with_data(cfg, has_val=ds.val is not None)  # (auto metrics where only the data could tell)
    t = cfg.trainer
    if line := config_lib.objective_line(cfg):
        log.info(line)
    B = t.batch_size
    if len(ds.train.labels) < B:
        raise ConfigError("trainer.batch_size", B,
                          f"larger than the {len(ds.train.labels)} training examples of {cfg.data.name}; "
                          f"use at most {len(ds.train.labels) // len(devices) * len(devices)}")
    aug, mixes = build.augmentation(cfg.data.augment, ds, B), build.mixing(cfg.data.augment)
    if (aug.enabled or mixes) and ds.train.images.dtype != np.uint8:
        raise ConfigError("data.augment", cfg.data.name, "image augmentation needs image data; turn it off for this data set")
    if mixes and B % 2:
        raise ConfigError("trainer.batch_size", B, "mixup / CutMix mix each image with its mirror in the batch: use an "
                          "even batch size")
    if cfg.data.repeated_aug > 1 and B % cfg.data.repeated_aug:
        raise ConfigError("data.repeated_aug", cfg.data.repeated_aug, f"must divide trainer.batch_size={B} (each batch "
                          "holds every repeat of its images)")
    dtype = build.compute_dtype(cfg.hardware.precision)
    feed = build.feed(ds, streamed, cfg.data, batch_size=B, seed=t.seed, aug=aug, mesh=mesh,
                      normalize=build.normalize(ds.scale, ds.mean, ds.std, cfg.hardware.precision))
    steps_per_epoch = feed.steps_per_epoch
    total_steps = steps_per_epoch * t.epochs
    perf.check_profile_steps(t.profile_steps, total_steps)

    # ---------------------------------------------------------------- model, optimizer, state
    o = cfg.optimizer
    warmup = round(o.warmup_epochs * steps_per_epoch)
    # The schedule's shape (peak 1); the learning rate itself is a number in the optimizer state, so the
    # jobs of a sweep over it (or the seed, weight decay, clip norm) compile the same programs, which the
    # persistent compilation cache then serves.
    shape = state_lib.lr_schedule(o.schedule, 1.0, total_steps, warmup, o.min_lr / o.lr)
    seed = np.int32(t.seed)
    hparams = {k: np.float32(v) for k, v in state_lib.hyperparameters(o).items()}

    def init(seed, hparams):  # model + optimizer state built inside one jit (eager NNX init runs op by op)
        rngs = nnx.Rngs(params=stream(seed, "params"), dropout=stream(seed, "dropout"))
        model = models.build(cfg.model, in_shape, ds.num_classes, rngs=rngs, dtype=dtype, data=cfg.data.name)
        tx = state_lib.make_optimizer(o, lr_shape=shape, hparams=hparams, params=nnx.state(model, nnx.Param))
        return state_lib.create(model, tx, seed, ema=t.ema_decay > 0)

    graphdef, abstract = nnx.eval_shape(init, seed, hparams)  # shape errors surface here, before anything compiles
    shardings = hw.shardings(abstract)  # the state's place on the mesh: FSDP's split (hardware.fsdp), else replicated

    # ---------------------------------------------------------------- pretrained weights
    # Into a new run only: a resume restores the tuned weights (and must not need the file again). Read and
    # checked against the model's parameter shapes (``abstract``) before the init compiles: a bad file costs
    # no compile; the arrays go into the state once it is built.
    pre = None
    if cfg.model.init_from and not fate.resuming:
        t_load = time.time()
        pre = pretrained.load(cfg.model.init_from, cfg.model, input_shape=in_shape,
                              num_classes=cfg.model.num_classes or ds.num_classes, reset_head=cfg.model.reset_head,
                              like=abstract.params)
        t_load = time.time() - t_load
    del abstract
    state = jax.jit(lambda s, h: init(s, h)[1], out_shardings=shardings)(seed, hparams)
    pretrained_info = None
    if pre is not None:
        t_merge = time.time()
        state = state.replace(params=pretrained.merge(state.params, pre),
                              other=pretrained.merge_stats(state.other, pre),  # (BatchNorm's running statistics)
                              ema=None if state.ema is None else pretrained.merge(state.ema, pre))
        pretrained_info = pre.info
        log.info("model.init_from: %s (%s, sha256 %s) | head %s | position embeddings %s | %.1f s",
                 pre.info["path"], pre.info["format"], pre.info["sha256"][:12], pre.info["head"],
                 pre.info["posemb"], t_load + time.time() - t_merge)
        del pre
    n_params = state_lib.param_count(state.params)
    tx = state_lib.make_optimizer(o, lr_shape=shape, params=state.params)
    if multipliers := state_lib.describe_multipliers(o, state.params):  # optimizer.lr_mults, layer_decay
        log.info(multipliers)

    train_step = jax.jit(steps_lib.make_train_step(
        graphdef, tx, feed.train_batch, label_smoothing=o.label_smoothing, accum_steps=t.grad_accum_steps,
        ema_decay=t.ema_decay, lr_shape=shape, loss=t.loss, mixing=mixes,
        num_classes=cfg.model.num_classes or ds.num_classes), donate_argnums=(0, 1),
        out_shardings=(shardings, replicated))
    eval_step = build.eval_step(graphdef, feed, label_smoothing=o.label_smoothing, sharding=replicated)
    predict = build.predict_fn(graphdef, feed.normalize, feed.size)
    new_train_sums = lambda values=None: jax.device_put(steps_lib.new_train_sums(values), replicated)  # noqa: E731

    # ---------------------------------------------------------------- checkpoints, resume
    ckpt_dir = run_dir / "checkpoints"
    shapes = ckpt_lib.param_shapes(state.params)
    if fate.start_over and is_main:
        moved = records.set_aside_run(run_dir)  # nothing an earlier run wrote is overwritten or deleted
        if moved:
            log.info("trainer.resume=never: the earlier run's files were moved to %s", moved)
    own = fate.kind == "resume"
    if own and fate.step is not None and is_main:
        _set_aside_after(run_dir, ckpt_dir, fate.step)  # resuming from an earlier step of this run
    checkpointer = (ckpt_lib.Checkpointer(ckpt_dir, keep=t.keep_checkpoints, best_metric=t.best_metric,
                                          best_mode=t.best_mode) if t.checkpoint else None)
    train_sums, meta, parent = new_train_sums(), {}, None
    if fate.resuming:
        state, train_sums, meta, parent = _resume(fate, checkpointer, state, shapes, hparams, new_train_sums,
                                                  replicated)
    start_step = int(jax.device_get(state.step))
    saved_feed = meta.get("feed") or {}
    if saved_feed.get("next_step") not in (None, start_step):  # (a streamed run's pipeline position)
        raise ckpt_lib.CheckpointError(f"checkpoint at step {start_step} records its input pipeline at step "
                                       f"{saved_feed['next_step']}; it is inconsistent, resume from another step")
    loop = LoopState.from_meta(meta.get("loop"))

    # ---------------------------------------------------------------- tracking
    resolved = config_lib.to_dict(cfg)
    run_meta = run_metadata(run_dir, devices, n_params) if is_main else {}
    if is_main:
        _write_yaml(run_dir / "config.yaml", resolved,
                    _versions_note(run_meta["versions"]) + _pretrained_note(pretrained_info))
    if parent:
        run_meta["parent"] = parent
    if pretrained_info:
        run_meta["init_from"] = pretrained_info
    flops = perf.train_flops(cfg.model, in_shape, cfg.model.num_classes or ds.num_classes, dtype=dtype)
    peak = perf.peak_tflops(devices[0], cfg.hardware.precision, cfg.hardware.peak_tflops)
    if is_main:
        run_meta.update(flops_per_example=flops, peak_tflops=peak)
    resume = ({"step": start_step, "rows": meta.get("loop", {}).get("rows") if own else None,
               "sinks": Tracker.resume_from_meta(meta) if own else None} if fate.resuming else None)
    tracker = Tracker(run_dir, {**resolved, "meta": run_meta}, cfg.logger, is_main=is_main,
                      name=default_run_name(cfg, run_dir), resume=resume)
    log.info("%s: %s parameters | %s: train %d, val %d, test %d, %s | %d x %s | batch %d, %d steps/epoch, %d epochs",
             cfg.model.arch, f"{n_params:,}", cfg.data.name, len(ds.train.labels),
             0 if ds.val is None else len(ds.val.labels), len(ds.test.labels), "x".join(map(str, in_shape)),
             len(devices), devices[0].platform, B, steps_per_epoch, t.epochs)
    log.info(perf.describe(flops, peak, devices[0], cfg.hardware.precision, cfg.hardware.peak_tflops is not None))
    return Run(cfg=cfg, run_dir=run_dir, devices=devices, mesh=mesh, is_main=is_main, ds=ds, input_shape=in_shape, feed=feed,
               graphdef=graphdef, state=state, train_sums=train_sums, loop=loop, train_step=train_step,
               eval_step=eval_step, predict=predict, new_train_sums=new_train_sums, checkpointer=checkpointer,
               tracker=tracker,
               resolved=resolved, shapes=shapes, n_params=n_params, start_step=start_step, total_steps=total_steps,
               steps_per_epoch=steps_per_epoch, started_at=started_at, t_start=t_start, own_resume=own,
               flops_per_example=flops, peak_tflops=peak)


def report_memory(run: Run, args: tuple) -> dict:
    """Before the first step (``args``: its feed arguments): the bytes on the fullest device of the parameters (and
    their moving average) and of the optimizer state, from the arrays' shards, and, where XLA reports it
    (``memory_analysis``), the train step's temporaries, from the compiled step. That compiled step becomes
    ``run.train_step``, the program every step then runs (it was lowered and compiled a second time by the first
    jitted call). One log line; ``run.memory``, which the summary and the W&B config get."""
    state = run.state
    mem = {"memory/param_bytes_per_device": parallel.bytes_per_device(state.params),
           "memory/opt_state_bytes_per_device": parallel.bytes_per_device(state.opt_state)}
    if state.ema is not None:
        mem["memory/ema_bytes_per_device"] = parallel.bytes_per_device(state.ema)
    stats = None
    try:
        compiled = run.train_step.lower(state, run.train_sums, *args).compile()
    except Exception as e:  # noqa: BLE001 (the jitted step compiles at its first call, and says why)
        log.debug("compiling the train step ahead of its first call: %s", e)
    else:
        run.train_step = compiled
        try:
            stats = compiled.memory_analysis()
        except Exception as e:  # noqa: BLE001 (a backend without the analysis)
            log.debug("memory_analysis: %s", e)
    if stats is not None and getattr(stats, "temp_size_in_bytes", None) is not None:
        mem["memory/step_temp_bytes_per_device"] = int(stats.temp_size_in_bytes)
    run.memory = mem

    def mb(key: str) -> str:
        n = mem[key]
        return next(f"{n / 2**e:,.1f} {unit}" for e, unit in ((30, "GiB"), (20, "MiB"), (10, "KiB"), (0, "B"))
                    if n >= 2**e or e == 0)

    shape = " x ".join(f"{name}={size}" for name, size in run.mesh.shape.items())
    log.info("memory per device (mesh %s): parameters %s, optimizer state %s%s%s", shape,
             mb("memory/param_bytes_per_device"), mb("memory/opt_state_bytes_per_device"),
             f", moving average {mb('memory/ema_bytes_per_device')}" if state.ema is not None else "",
             f", train step temporaries {mb('memory/step_temp_bytes_per_device')} (XLA)"
             if "memory/step_temp_bytes_per_device" in mem else "")
    run.tracker.config(mem)
    return mem


def _resume(fate: Fate, checkpointer, state, shapes: dict, hparams: dict, new_train_sums: Callable, sharding):
    """The checkpoint ``fate`` resumes (this run's) or branches from (another run's), restored onto this run's
    state: (state, train sums, its metadata, the parent run a branch names or None). A branch is a new run (new
    tracking runs): of the metadata it keeps the loop state only."""
    own = fate.kind == "resume"
    src_dir = fate.source
    reader = checkpointer if (checkpointer and own) else ckpt_lib.Checkpointer(src_dir, best_metric=None, read_only=True)
    step = reader.resolve_step(fate.step)
    ckpt_lib.check_compatible(reader.read_meta(step), shapes, src_dir / str(step))
    state, train_sums, meta = _restore(reader, step, state, new_train_sums(), sharding)
    # The optimizer's numbers come from this run's config, not the checkpoint's (they live in the state).
    state = state.replace(opt_state=state_lib.set_hyperparameters(state.opt_state, hparams, sharding))
    if train_sums is None:  # the running sums, kept in the loop state (earlier checkpoints: as arrays)
        train_sums = new_train_sums(LoopState.from_meta(meta.get("loop")).train_sums)
    log.info("resumed from %s at step %d", src_dir / str(step), step)
    if own:
        return state, train_sums, meta, None
    parent = {"checkpoint": str(src_dir / str(step)), "step": step,
              "run_dir": str(src_dir.parent) if src_dir.name == "checkpoints" else None, **Tracker.parent_ids(meta)}
    return state, train_sums, {"loop": meta.get("loop", {})}, parent


def _restore(reader, step: int, state, train_sums, sharding):
    """Restore a checkpoint onto this run's state, each array where this run's is (any mesh and device count wrote
    it; what this run does not keep: placed with ``sharding``). Fields are matched by name:
    one this run does not keep (None, e.g. no moving average) is read and dropped, or skipped where the
    checkpoint has none either; so checkpoints written before a field existed restore. Returns
    (state, train sums or None, meta): the sums from checkpoints that kept them as arrays (an item "acc")."""
    saved = ckpt_lib.saved_tree(reader, step)
    fields = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
    missing = [k for k, v in fields.items() if v is not None and saved["state"].get(k) is None]
    if missing == ["ema"]:  # the average turned on for a checkpoint without one: it starts at the weights
        log.info("the checkpoint has no moving average of the parameters; it starts at the restored parameters")
    elif missing:
        raise ckpt_lib.CheckpointError(f"checkpoint {reader.directory / str(step)} lacks {', '.join(missing)}; it was "
                                       f"written by another version of vision_train")
    as_saved = lambda tree: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), tree)  # noqa: E731
    target = {"state": {k: (None if v is None else ckpt_lib.abstract_like(fields[k])  # (where this run's arrays are)
                            if fields.get(k) is not None else as_saved(v)) for k, v in saved["state"].items()}}
    if "acc" in saved:  # (the running sums' item, in checkpoints written before they moved into the loop state)
        target["acc"] = ckpt_lib.abstract_like(train_sums, sharding)
    items, meta = reader.restore(step, target)
    restored = {k: items["state"].get(k) for k in fields}
    if missing:
        # (copies: the step donates the parameters and the average, which must not share a buffer)
        restored["ema"] = jax.tree.map(lambda p: jnp.copy(p.astype(jnp.float32)), restored["params"])
    if state.ema is None:
        restored["ema"] = None  # (kept by the checkpoint, not used by this run)
    return type(state)(**restored), items.get("acc"), meta


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


def _versions_note(versions: dict) -> str:
    """config.yaml's record of the packages a run ran with (W&B's config has them too), as comments: its keys
    are compared with a re-run's (vision_train.fate), and other versions are no reason to refuse one."""
    return "".join(f"# version {name}=={v}\n" for name, v in {"python": platform.python_version(), **versions}.items())


def _pretrained_note(info: dict | None) -> str:
    """config.yaml's record of the weights a run started from, as comments (the config itself is compared
    with a re-run's, which has no such keys)."""
    if not info:
        return ""
    return "".join(f"# model.init_from {k}: {v}\n" for k, v in info.items())


def _write_yaml(path: Path, data: dict, header: str = "") -> None:
    with writing(path, "the run's config"):  # (a full disk: one line)
        path.write_text(header + yaml.safe_dump(data, sort_keys=False))
