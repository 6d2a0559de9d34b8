"""The one evaluation: the training loop's periodic and final evaluations, ``python -m vision_train.evaluate``
and the values a sweep ranks jobs by (summary.json) all come from ``run_split`` and ``scalars`` here.

An evaluation runs the jitted eval step over every chunk of a split the feed gives, adding to one set of
sums on the device (loss, hits, count, confusion counts, calibration bins), then fetches them once.
Every scalar is a function of those sums: ``<prefix>/loss``, ``/acc``, ``/ece`` and ``/class_acc/<class>``.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import numpy as np

from ..tracking import media
from .steps import new_eval_sums


@dataclass
class EvalResult:
    scalars: dict          # {"<prefix>/loss": ..., "<prefix>/acc": ..., "<prefix>/ece": ..., "<prefix>/class_acc/<c>": ...}
    confusion: np.ndarray  # (classes, classes) counts; rows: true class
    calibration: dict      # media.calibration_from_bins: ece, bin edges, counts, mean confidence and accuracy
    preds: np.ndarray      # predicted class of every example, in the split's order
    confidence: np.ndarray # the predicted class's probability


def scalars(prefix: str, sums: dict, class_names) -> tuple[dict, dict]:
    """The metric definitions: host sums -> (scalars, calibration)."""
    n = float(sums["count"])
    cal = media.calibration_from_bins(sums["bins"]["count"], sums["bins"]["confidence"], sums["bins"]["correct"])
    out = {f"{prefix}/loss": float(sums["loss"]) / n, f"{prefix}/acc": float(sums["correct"]) / n,
           **media.eval_scalars(prefix, sums["confusion"], cal, class_names)}
    return out, cal


def run_split(eval_step, params, other, feed, split: str, class_names, *, prefix: str | None = None) -> EvalResult:
    """One pass over ``split`` of ``feed`` with ``params``; every example counted once (padding masked).
    ``prefix``: the metrics' name (default: the split's; e.g. ``val_ema`` for the moving average)."""
    sums = jax.device_put(new_eval_sums(len(class_names)), feed.sharding)
    preds, confs = [], []
    for args in feed.eval_args(split):
        sums, pred, conf = eval_step(params, other, sums, args)
        preds.append(pred)
        confs.append(conf)
    host, preds, confs = jax.device_get((sums, preds, confs))
    valid = feed.valid(split)
    values, cal = scalars(prefix or split, host, class_names)
    return EvalResult(values, np.asarray(host["confusion"]), cal, np.concatenate(preds)[valid],
                      np.concatenate(confs)[valid])
