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

import contextlib
import copy
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import config as config_lib
from .config import MISSING, DataConfig, HardwareConfig, LoggerConfig
from .errors import (ConfigError, UserError, check_choice, check_positive, exit_on_user_error,
                     install_background_error_handling, write_text)
from .host_devices import configure_host_devices
from .tracking import Tracker, media, run_metadata

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


@contextlib.contextmanager
def reading_checkpoint(path: str):
    """Around reading ``checkpoint=`` (``train.build.read_checkpoint``, ``restore_model``): every failure is one
    ``CheckpointError`` naming ``checkpoint=`` and what to give instead."""
    from . import checkpoint as ckpt_lib  # (imports JAX: after the command line set XLA_FLAGS)

    try:
        yield
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


def _names(names, k: int = 4) -> str:
    names = [str(n) for n in names]
    return ", ".join(names[:k]) + (", ..." if len(names) > k else "")


def check_keys(ec: EvalConfig) -> None:
    """This command's own keys (the rest are validated with the checkpoint's config: ``eval_config``)."""
    check_choice("split", ec.split, SPLITS)
    check_positive("batch_size", ec.batch_size)
    check_positive("num_samples", ec.num_samples, allow_zero=True)
    if not ec.checkpoint or ec.checkpoint == MISSING:
        raise ConfigError("checkpoint", ec.checkpoint, CHECKPOINT_FIX)


def eval_config(ec: EvalConfig, trained: config_lib.Config, given: frozenset[str], data_preset: bool):
    """What this evaluation runs, as one validated ``Config``: the checkpoint's own (its model's real schema), with
    this command's hardware and logger, and its data: ``data=<preset>`` (``data_preset``), or the checkpoint's
    data config with the ``data.<key>`` in ``given`` taken from ``ec.data``. ``logger.project``/``.entity``/
    ``.group`` follow the training run unless in ``given``."""
    train_dict, mine = config_lib.to_dict(trained), config_lib.to_dict(ec.data)
    data = mine if data_preset else copy.deepcopy(train_dict["data"])
    if not data_preset:
        for key in (k for k in given if k.startswith("data.")):
            node, src, parts = data, mine, key.split(".")[1:]
            for part in parts[:-1]:
                node[part] = dict(node.get(part) or {})
                node, src = node[part], src[part]
            node[parts[-1]] = src[parts[-1]]
    logger = {**config_lib.to_dict(ec.logger), **{k: train_dict["logger"][k] for k in ("project", "entity", "group")
                                                  if f"logger.{k}" not in given}}
    return config_lib.from_dict({**train_dict, "data": data, "hardware": config_lib.to_dict(ec.hardware),
                                 "logger": logger})


def check_fits(ds, in_shape: tuple, cfg: config_lib.Config, ck) -> tuple[str, ...]:
    """The data must be what the checkpoint's model takes (its input shape and classes): its class names."""
    trained_on, shape, classes = ck.config.data.name, tuple(ck.data["shape"]), tuple(ck.data["class_names"])
    if in_shape != shape or tuple(ds.class_names) != classes:
        raise ConfigError(
            "data", cfg.data.name,
            f"its images are {'x'.join(map(str, in_shape))} with {ds.num_classes} classes ({_names(ds.class_names)}), "
            f"but the checkpoint's model was trained on {trained_on}: {'x'.join(map(str, shape))} images, "
            f"{len(classes)} classes ({_names(classes)}). Leave data= out to evaluate on {trained_on}, or give a data "
            f"set with the same image shape and classes")
    return classes


# ---------------------------------------------------------------------------------------- main
def evaluate_checkpoint(ec: EvalConfig, run_dir: str | Path, *, given: frozenset[str] = frozenset(),
                        data_preset: bool = False) -> dict:
    """Evaluate ``ec.checkpoint``; write ``eval.json`` and media into ``run_dir``; return the report.

    Built as training builds its evaluation (``train.build``): the devices and mesh, the data and its feed, the
    checkpoint's model and its training run's eval step. ``data_preset``, ``given``: see ``eval_config``."""
    check_keys(ec)
    # JAX starts here, not when this module is imported: the command line sets XLA_FLAGS (hardware.*) first.
    from .train import build, evaluation
    from .train.state import param_count

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    # ---------------------------------------------------------------- the checkpoint, the devices
    build.join_processes(ec.hardware)  # (reading a checkpoint starts JAX's backend: the processes join first)
    with reading_checkpoint(ec.checkpoint):
        ck = build.read_checkpoint(ec.checkpoint)
    cfg, train_cfg = eval_config(ec, ck.config, given, data_preset), ck.config
    hw = build.hardware(cfg.hardware)
    with reading_checkpoint(ec.checkpoint):
        trained = build.restore_model(ck, hw.shardings)

    # ---------------------------------------------------------------- data
    ds, streamed, in_shape = build.data(cfg.data)
    classes = check_fits(ds, in_shape, cfg, ck)
    split = {"train": ds.train, "val": ds.val, "test": ds.test}[ec.split]
    if split is None or len(split.labels) == 0:
        raise ConfigError("split", ec.split, f"{cfg.data.name} has no {ec.split} split here (data.val_size="
                          f"{cfg.data.val_size}); use split=test, or set data.val_size > 0")

    # ---------------------------------------------------------------- the evaluation (the training run's own)
    nd = len(hw.devices)
    B = -(-ec.batch_size // nd) * nd
    if B != ec.batch_size:
        log.info("batch_size=%d rounded up to %d: a multiple of the %d devices", ec.batch_size, B, nd)
    facts = ck.data
    feed = build.feed(ds, streamed, cfg.data, batch_size=B, mesh=hw.mesh, train=False, eval_splits=(ec.split,),
                      normalize=build.normalize(facts["scale"], facts["mean"], facts["std"],
                                                train_cfg.hardware.precision))
    try:
        eval_step = build.eval_step(trained.graphdef, feed, label_smoothing=train_cfg.optimizer.label_smoothing,
                                    sharding=hw.replicated)
        result = evaluation.run_split(eval_step, trained.params, trained.other, feed, ec.split, classes)
    finally:
        feed.close()
    predict = build.predict_fn(trained.graphdef, feed.normalize, feed.size)
    sample_idx = np.arange(min(max(ec.num_samples, cfg.logger.num_samples if cfg.logger.media else 0),
                               len(split.labels)))
    probs = (np.asarray(predict(trained.params, trained.other, split.images[sample_idx])) if len(sample_idx)
             else np.zeros((0, len(classes))))

    # ---------------------------------------------------------------- report, files and W&B
    where = {"num_devices": nd, "platform": hw.devices[0].platform, "batch_size": B}
    report = make_report(ec, cfg, ck, split, result, sample_idx, probs, where)
    if hw.is_main:
        for block in report_text(report, result):
            log.info("%s", block)
    record(run_dir, cfg, ck, report, result, split, sample_idx, probs, hw, param_count(trained.params))
    return report


def make_report(ec: EvalConfig, cfg, ck, split, result, sample_idx, probs, where: dict) -> dict:
    """eval.json's content: what was evaluated, where, and every metric (the eval step's counts, as in training)."""
    train_cfg, classes, s = ck.config, list(ck.data["class_names"]), ec.split
    cm = result.confusion.astype(np.int64)
    per_class = {c: (None if np.isnan(a) else float(a)) for c, a in zip(classes, media.per_class_accuracy(cm))}
    samples = [{"index": int(i), "true": classes[int(split.labels[i])], "pred": classes[int(p.argmax())],
                "confidence": float(p.max())} for i, p in zip(sample_idx[:ec.num_samples], probs[:ec.num_samples])]
    train_dir = train_run_dir(ck.directory)
    return {
        "checkpoint": str(ck.path), "step": ck.step, "train_run_dir": str(train_dir) if train_dir else None,
        "train_wandb_run_id": Tracker.run_ids_from_meta(ck.meta).get("wandb"),  # (the training run's, if it had one)
        "model": train_cfg.model.arch, "trained_on": train_cfg.data.name, "data": cfg.data.name, "split": s,
        "num_examples": len(split.labels), **where, "precision": train_cfg.hardware.precision,
        "label_smoothing": train_cfg.optimizer.label_smoothing,
        **result.scalars, "per_class_acc": per_class, "class_names": classes, "confusion_matrix": cm.tolist(),
        "samples": samples,
    }


def report_text(r: dict, result) -> list[str]:
    """The report as the console shows it."""
    s, per_class = r["split"], r["per_class_acc"]
    text = [f"checkpoint {r['checkpoint']} (step {r['step']}; {r['model']} trained on {r['trained_on']})",
            f"{r['data']} {s}: {r['num_examples']} examples on {r['num_devices']} x {r['platform']}, batch "
            f"{r['batch_size']}",
            f"{s}/acc {r[f'{s}/acc']:.4f}  {s}/loss {r[f'{s}/loss']:.4f}  {s}/ece {result.calibration['ece']:.4f}",
            confusion_text(np.asarray(r["confusion_matrix"]), r["class_names"]),
            "per-class accuracy: " + "  ".join(f"{c} {a:.3f}" if a is not None else f"{c} -"
                                               for c, a in list(per_class.items())[:20])
            + ("  ..." if len(per_class) > 20 else "")]
    if r["samples"]:
        text.append("sample predictions (index: true -> predicted, confidence):")
        text += [f"  {x['index']:>5}: {x['true']} -> {x['pred']} {x['confidence']:.3f}"
                 + ("" if x["true"] == x["pred"] else "  x") for x in r["samples"]]
    return text


def record(run_dir: Path, cfg, ck, report: dict, result, split, sample_idx, probs, hw, n_params: int) -> None:
    """The evaluation's records: metrics.jsonl, media and eval.json in ``run_dir``, and a W&B run of job type
    "eval" in the training run's project whose config links back to it."""
    train_cfg, train_dict, lg, s = ck.config, config_lib.to_dict(ck.config), cfg.logger, report["split"]
    train_id = report["train_wandb_run_id"]
    train_path = "/".join(x for x in (train_cfg.logger.entity, train_cfg.logger.project, train_id) if x) \
        if train_id else None
    wandb_config = {
        "job": "eval", "checkpoint": report["checkpoint"], "checkpoint_step": ck.step,
        "train_run_dir": report["train_run_dir"], "train_wandb_run_id": train_id, "train_wandb_run_path": train_path,
        "split": s, "batch_size": report["batch_size"], "data": config_lib.to_dict(cfg.data),
        "model": train_dict["model"], "train_config": train_dict, "hardware": config_lib.to_dict(cfg.hardware),
        "meta": run_metadata(run_dir, hw.devices, n_params) if hw.is_main else {},
    }
    name = lg.name or f"eval {train_cfg.model.arch}-{cfg.data.name} {s}" + (f" (train {train_id})" if train_id else "")
    tracker = Tracker(run_dir, wandb_config, lg, is_main=hw.is_main, name=name[:128], job_type="eval")
    metrics, classes = result.scalars, report["class_names"]
    exit_code = 1
    try:
        tracker.log(metrics, ck.step)
        if lg.media and hw.is_main:
            figures = tracker.log_eval(
                s, ck.step, labels=split.labels, preds=result.preds.astype(np.int64),
                confidence=result.confidence.astype(np.float64), class_names=classes, images=split.images,
                sample={"index": sample_idx[:lg.num_samples], "probs": probs[:lg.num_samples]},
                confusion=result.confusion.astype(np.int64), cal=result.calibration)
            made = figures.result() if figures is not None else None
            if made:
                report["media"] = {k: str(v) for k, v in made["files"].items()}
        tracker.summary({**metrics, "num_examples": report["num_examples"], "checkpoint_step": ck.step})
        if hw.is_main:
            write_text(run_dir / "eval.json", json.dumps(report, indent=2), "the evaluation report")
            log.info("wrote %s", run_dir / "eval.json")
        exit_code = 0
    finally:
        tracker.finish(exit_code)


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
