"""``python -m vision_train.evaluate checkpoint=<run dir | its checkpoints/ dir | one step's dir> [overrides]``

Restores a trained model and evaluates it on a whole split (``split=test`` by default) of the data set it
was trained on, or of ``data=<preset>`` (same image shape and classes). Any device count works: the
model is replicated over a data-parallel mesh (``hardware=...``, CPU included) and the training run's own
eval step visits every example exactly once. Prints accuracy, loss, the confusion matrix and a few
predictions; writes ``eval.json``, ``media/*.png``, ``metrics.jsonl`` and ``evaluate.log`` into its own
run directory, and logs a W&B run with ``job_type="eval"`` in the training run's project whose config
links back to the training run (``train_wandb_run_id``, ``train_run_dir``).

``evaluate_checkpoint(...)`` is importable without Hydra.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import config as config_lib
from .config import MISSING, DataConfig, HardwareConfig, LoggerConfig
from .errors import ConfigError, UserError, exit_on_user_error, install_background_error_handling, write_text
from .host_devices import configure_host_devices

log = logging.getLogger("vision_train")

SPLITS = ("train", "val", "test")
CHECKPOINT_FIX = ("give the training run's directory (e.g. checkpoint=outputs/2026-01-31/12-00-00), its "
                  "checkpoints/ directory, or one step's directory inside it")


@dataclass
class EvalConfig:
    checkpoint: str = MISSING          # a run dir, its checkpoints/ dir, or one step's dir (default: latest step)
    split: str = "test"                # train | val | test
    batch_size: int = 256              # rounded up to a multiple of the device count; does not change results
    num_samples: int = 10              # sample predictions printed (the figures/W&B table use logger.num_samples)
    # The data set the checkpoint was trained on, unless data=<preset> is given (data.<key>=... overrides
    # a key of the checkpoint's own data config, e.g. data.root=/elsewhere).
    data: DataConfig = field(default_factory=DataConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


def register_configs() -> None:
    from hydra.core.config_store import ConfigStore  # (Hydra: only at the command line's edge)

    config_lib.register_configs()
    ConfigStore.instance().store(name="eval_schema", node=EvalConfig)


# ------------------------------------------------------------------------------------- helpers
def command_line_keys(overrides) -> frozenset[str]:
    """The dotted keys given on the command line (``+a.b=1``, ``a.b=1`` -> ``a.b``)."""
    return frozenset(o.lstrip("+~").split("=", 1)[0] for o in overrides)


def train_run_dir(checkpoints_dir: Path) -> Path | None:
    return checkpoints_dir.parent if checkpoints_dir.name == "checkpoints" else None


def quiet_libraries() -> None:
    """For the CLIs: library noise off, so an error stays one line (and background threads' tracebacks go
    to the log file: ``errors.install_background_error_handling``)."""
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.ERROR)  # "no TPU found" noise
    logging.getLogger("absl").setLevel(logging.ERROR)  # Orbax: "Given directory is read only" for every open
    install_background_error_handling()


def confusion_text(cm: np.ndarray, class_names, max_classes: int = 20) -> str:
    """Rows: true class; columns: predicted class."""
    k = len(cm)
    if k > max_classes:
        return f"(confusion matrix: {k} classes, too many to print; see eval.json and media/)"
    names = [str(n)[:8] for n in class_names]
    width = max(4, max(len(n) for n in names), len(str(int(cm.max()))) if cm.size else 1) + 1
    label_w = max(len(n) for n in names) + 1
    lines = ["confusion matrix (rows: true class, columns: predicted class)",
             " " * label_w + "".join(n.rjust(width) for n in names)]
    for name, row in zip(names, cm):
        lines.append(name.rjust(label_w) + "".join(str(int(v)).rjust(width) for v in row))
    return "\n".join(lines)


def load_checkpoint(path: str, sharding=None):
    """``checkpoint.restore_model``, with every failure one ``CheckpointError`` naming ``checkpoint=`` and
    what to give instead."""
    from . import checkpoint as ckpt_lib  # (imports JAX: after the command line set XLA_FLAGS)

    try:
        restored = ckpt_lib.restore_model(path, sharding=sharding)
    except ckpt_lib.DamagedCheckpoint as e:  # names the earlier steps to give instead
        raise e.for_key("checkpoint") from None
    except ckpt_lib.CheckpointError as e:
        msg = str(e)
        fix = "" if "give a run directory" in msg else f"; {CHECKPOINT_FIX} (from a finished or saved training run)"
        raise ckpt_lib.CheckpointError(f"checkpoint={path}: {msg}{fix}") from None
    except (ValueError, KeyError, TypeError) as e:  # parameters that do not fit the model built from its config
        raise ckpt_lib.CheckpointError(
            f"checkpoint={path}: its parameters do not fit the model in its own config ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200]}); the checkpoint is damaged or was written by another version") from None
    return restored


def _names(names, k: int = 4) -> str:
    names = [str(n) for n in names]
    return ", ".join(names[:k]) + (", ..." if len(names) > k else "")


# ---------------------------------------------------------------------------------------- main
def evaluate_checkpoint(ec: EvalConfig, run_dir: str | Path, *, given: frozenset[str] = frozenset(),
                        data_preset: bool = False) -> dict:
    """Evaluate ``ec.checkpoint``; write ``eval.json`` and media into ``run_dir``; return the report.

    ``data_preset``: ``ec.data`` was chosen (``data=<preset>``) and replaces the checkpoint's data config;
    otherwise the checkpoint's data config is used with the keys in ``given`` (``data.<key>``) taken from
    ``ec.data``. ``logger.project``/``.entity``/``.group`` follow the training run unless in ``given``."""
    # JAX starts here, not when this module is imported: the command line sets XLA_FLAGS (hardware.*) first.
    import jax
    from flax import nnx

    from . import parallel
    from .tracking import Tracker, media, run_metadata
    from .train import evaluation
    from .train import steps as steps_lib
    from .train.assembly import compute_dtype
    from .data.load import load_data
    from .train.feeds import Normalize, input_shape, make_feed

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if ec.split not in SPLITS:
        raise ConfigError("split", ec.split, f"choose one of {', '.join(SPLITS)}")
    if ec.batch_size <= 0:
        raise ConfigError("batch_size", ec.batch_size, "must be > 0")
    if ec.num_samples < 0:
        raise ConfigError("num_samples", ec.num_samples, "must be >= 0")
    if not ec.checkpoint or ec.checkpoint == MISSING:
        raise ConfigError("checkpoint", ec.checkpoint, CHECKPOINT_FIX)
    hw = config_lib.to_run_config(config_lib.Config(model=config_lib.CNNConfig(), hardware=ec.hardware)).hardware
    config_lib.validate(config_lib.Config(model=config_lib.CNNConfig(), logger=ec.logger))

    # ---------------------------------------------------------------- devices and the model
    parallel.initialize_distributed(hw.distributed, hw.platform)  # (auto: where several processes run)
    devices = parallel.select_devices(hw.platform, hw.num_devices)
    mesh = parallel.make_mesh(devices)
    replicated = parallel.replicated(mesh)
    is_main = jax.process_index() == 0

    model, train_cfg, facts, step, meta, ckpt_dir = load_checkpoint(ec.checkpoint, sharding=replicated)
    step_dir, train_dir = ckpt_dir / str(step), train_run_dir(ckpt_dir)
    train_id = Tracker.run_ids_from_meta(meta).get("wandb")  # the training run's W&B run, if it had one
    train_dict = config_lib.to_dict(train_cfg)

    # ---------------------------------------------------------------- data
    if data_preset:
        data_dict = config_lib.to_dict(ec.data)
    else:
        data_dict = dict(train_dict["data"])
        mine = config_lib.to_dict(ec.data)
        for key in given:
            if key.startswith("data."):
                node, parts = data_dict, key.split(".")[1:]
                src = mine
                for p in parts[:-1]:
                    node[p] = dict(node.get(p) or {})
                    node, src = node[p], src[p]
                node[parts[-1]] = src[parts[-1]]
    data_cfg = config_lib.from_dict({**train_dict, "data": data_dict}).data  # validated
    ds, streamed = load_data(data_cfg)
    trained_on = train_cfg.data.name
    shape, classes = tuple(facts["shape"]), tuple(facts["class_names"])
    in_shape = input_shape(ds, data_cfg)  # (a built-in set resampled to data.image_size inside jit)
    if in_shape != shape or tuple(ds.class_names) != classes:
        what = "x".join(map(str, in_shape))
        raise ConfigError(
            "data", data_cfg.name,
            f"its images are {what} with {ds.num_classes} classes ({_names(ds.class_names)}), but the "
            f"checkpoint's model was trained on {trained_on}: {'x'.join(map(str, shape))} images, {len(classes)} "
            f"classes ({_names(classes)}). Leave data= out to evaluate on {trained_on}, or give a data "
            f"set with the same image shape and classes")
    split = {"train": ds.train, "val": ds.val, "test": ds.test}[ec.split]
    if split is None or len(split.labels) == 0:
        raise ConfigError("split", ec.split, f"{data_cfg.name} has no {ec.split} split here (data.val_size="
                          f"{data_cfg.val_size}); use split=test, or set data.val_size > 0")
    n = len(split.labels)

    # ---------------------------------------------------------------- the evaluation (the training run's own)
    nd = len(devices)
    B = -(-ec.batch_size // nd) * nd
    if B != ec.batch_size:
        log.info("batch_size=%d rounded up to %d: a multiple of the %d devices", ec.batch_size, B, nd)
    graphdef, params, other = nnx.split(model, nnx.Param, ...)
    feed = make_feed(ds, streamed, data_cfg, batch_size=B, mesh=mesh, train=False, eval_splits=(ec.split,),
                     normalize=Normalize(facts["scale"], tuple(facts["mean"]), tuple(facts["std"]),
                                         compute_dtype(train_cfg)))
    eval_step = jax.jit(steps_lib.make_eval_step(graphdef, feed.eval_batches, feed.eval_batch,
                                                 label_smoothing=train_cfg.optimizer.label_smoothing),
                        out_shardings=replicated)
    result = evaluation.run_split(eval_step, params, other, feed, ec.split, classes)
    preds, confidence = result.preds.astype(np.int64), result.confidence.astype(np.float64)
    predict = jax.jit(steps_lib.make_predict(graphdef, feed.normalize, feed.size))
    sample_idx = np.arange(min(max(ec.num_samples, ec.logger.num_samples if ec.logger.media else 0), n))
    probs = (np.asarray(predict(params, other, split.images[sample_idx])) if len(sample_idx)
             else np.zeros((0, len(classes))))

    # ---------------------------------------------------------------- report
    cm, cal = result.confusion.astype(np.int64), result.calibration  # the eval step's counts, as in training
    per_class = {c: (None if np.isnan(a) else float(a)) for c, a in zip(classes, media.per_class_accuracy(cm))}
    s = ec.split
    metrics = result.scalars
    acc, loss = metrics[f"{s}/acc"], metrics[f"{s}/loss"]
    samples = [{"index": int(i), "true": classes[int(split.labels[i])], "pred": classes[int(p.argmax())],
                "confidence": float(p.max())} for i, p in zip(sample_idx[:ec.num_samples], probs[:ec.num_samples])]
    report = {
        "checkpoint": str(step_dir), "step": step, "train_run_dir": str(train_dir) if train_dir else None,
        "train_wandb_run_id": train_id, "model": train_cfg.model.arch, "trained_on": trained_on,
        "data": data_cfg.name, "split": s, "num_examples": n, "num_devices": nd, "platform": devices[0].platform,
        "batch_size": B, "precision": train_cfg.hardware.precision,
        "label_smoothing": train_cfg.optimizer.label_smoothing,
        **metrics, "per_class_acc": per_class, "class_names": list(classes), "confusion_matrix": cm.tolist(),
        "samples": samples,
    }

    text = [f"checkpoint {step_dir} (step {step}; {train_cfg.model.arch} trained on {trained_on})",
            f"{data_cfg.name} {s}: {n} examples on {nd} x {devices[0].platform}, batch {B}",
            f"{s}/acc {acc:.4f}  {s}/loss {loss:.4f}  {s}/ece {cal['ece']:.4f}",
            confusion_text(cm, classes),
            "per-class accuracy: " + "  ".join(f"{c} {a:.3f}" if a is not None else f"{c} -"
                                               for c, a in list(per_class.items())[:20])
            + ("  ..." if len(per_class) > 20 else "")]
    if samples:
        text.append("sample predictions (index: true -> predicted, confidence):")
        text += [f"  {r['index']:>5}: {r['true']} -> {r['pred']} {r['confidence']:.3f}"
                 + ("" if r["true"] == r["pred"] else "  x") for r in samples]
    if is_main:
        for block in text:
            log.info("%s", block)

    # ---------------------------------------------------------------- files and W&B
    lg = ec.logger
    changes = {k: getattr(train_cfg.logger, k) for k in ("project", "entity", "group") if f"logger.{k}" not in given}
    lg = dataclasses.replace(lg, **changes)
    train_path = "/".join(x for x in (train_cfg.logger.entity, train_cfg.logger.project, train_id) if x) \
        if train_id else None
    wandb_config = {
        "job": "eval", "checkpoint": str(step_dir), "checkpoint_step": step,
        "train_run_dir": str(train_dir) if train_dir else None, "train_wandb_run_id": train_id,
        "train_wandb_run_path": train_path,
        "split": s, "batch_size": B, "data": config_lib.to_dict(data_cfg),
        "model": train_dict["model"], "train_config": train_dict, "hardware": config_lib.to_dict(hw),
        "meta": run_metadata(run_dir, devices, sum(x.size for x in jax.tree.leaves(params))) if is_main else {},
    }
    name = lg.name or f"eval {train_cfg.model.arch}-{data_cfg.name} {s}" + (
        f" (train {train_id})" if train_id else "")
    tracker = Tracker(run_dir, wandb_config, lg, is_main=is_main, name=name[:128], job_type="eval")
    exit_code = 1
    try:
        tracker.log(metrics, step)
        if lg.media and is_main:
            figures = tracker.log_eval(
                s, step, labels=split.labels, preds=preds, confidence=confidence, class_names=classes,
                images=split.images, sample={"index": sample_idx[:lg.num_samples], "probs": probs[:lg.num_samples]},
                confusion=cm, cal=cal)
            made = figures.result() if figures is not None else None
            if made:
                report["media"] = {k: str(v) for k, v in made["files"].items()}
        tracker.summary({**metrics, "num_examples": n, "checkpoint_step": step})
        if is_main:
            write_text(run_dir / "eval.json", json.dumps(report, indent=2), "the evaluation report")
            log.info("wrote %s", run_dir / "eval.json")
        exit_code = 0
    finally:
        tracker.finish(exit_code)
    return report


def require_checkpoint(cfg) -> None:
    """The evaluate/predict command lines: ``checkpoint=`` must be given (a Hydra DictConfig)."""
    from omegaconf import OmegaConf

    if OmegaConf.is_missing(cfg, "checkpoint") or not str(cfg.checkpoint).strip():
        raise UserError(f"checkpoint= is missing: {CHECKPOINT_FIX}")


def _main():
    import hydra
    from omegaconf import DictConfig, OmegaConf

    register_configs()

    @hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
    def main(cfg: DictConfig) -> float | None:
        from hydra.core.hydra_config import HydraConfig

        quiet_libraries()
        hc = HydraConfig.get()
        with exit_on_user_error(log):
            require_checkpoint(cfg)
            ec = OmegaConf.to_object(cfg)
            configure_host_devices(ec.hardware.platform, ec.hardware.num_devices)
            report = evaluate_checkpoint(ec, hc.runtime.output_dir, given=command_line_keys(hc.overrides.task),
                                         data_preset=hc.runtime.choices.get("data") is not None)
            return report[f"{ec.split}/acc"]

    main()


if __name__ == "__main__":
    _main()
