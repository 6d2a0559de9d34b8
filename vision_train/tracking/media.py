"""Evaluation media from plain numpy: confusion matrix, per-class accuracy, calibration, PNG figures.

Everything here runs on the host after an eval, from arrays the eval step already returned (labels,
predictions, confidences); nothing touches the device. Figures use matplotlib's object-oriented API
(``Figure``, no pyplot state), so they can be drawn on the tracker's background thread, headless.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np


class _NoFontCacheNotes(logging.Filter):
    """matplotlib's notes on building its font cache (once per cache directory: a fresh $MPLCONFIGDIR or
    $HOME, e.g. a new container) are nothing a user can act on; they reached the console and train.log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(("Matplotlib is building the font cache", "generated new fontManager"))


# Before matplotlib is first imported (the figures below import it): its INFO lines off unless the user set a
# level for it; its warnings (e.g. an unwritable cache directory: set MPLCONFIGDIR) stay.
if logging.getLogger("matplotlib").level == logging.NOTSET:
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
logging.getLogger("matplotlib.font_manager").addFilter(_NoFontCacheNotes())


def per_class_accuracy(cm: np.ndarray) -> np.ndarray:
    totals = cm.sum(axis=1)
    return np.divide(np.diag(cm), totals, out=np.full(len(cm), np.nan), where=totals > 0)


def calibration_from_bins(count, confidence_sum, correct_sum) -> dict:
    """Expected calibration error and reliability-diagram data from the eval step's equal-width confidence
    bins (per bin: count, summed confidence, summed correctness)."""
    count, conf_sum, acc_sum = (np.asarray(a, np.float64) for a in (count, confidence_sum, correct_sum))
    edges = np.linspace(0.0, 1.0, len(count) + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf, mean_acc = conf_sum / count, acc_sum / count
    ece = float(np.sum(np.abs(acc_sum - conf_sum)) / max(float(count.sum()), 1.0))
    return {"ece": ece, "edges": edges, "count": count, "confidence": mean_conf, "accuracy": mean_acc}


def eval_scalars(split: str, confusion: np.ndarray, cal: dict, class_names) -> dict:
    """The scalars of one evaluation beyond loss/accuracy: ``<split>/ece`` and ``<split>/class_acc/<class>``
    (classes absent from the split are left out)."""
    scalars = {f"{split}/ece": cal["ece"]}
    for name, a in zip(class_names, per_class_accuracy(np.asarray(confusion))):
        if not np.isnan(a):
            scalars[f"{split}/class_acc/{name}"] = float(a)
    return scalars


def _figure(w: float, h: float):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), layout="constrained")
    return fig, fig.subplots()


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=100)  # (laid out as it is drawn: "constrained", a third cheaper than tight_layout's extra draw)
    return path


def plot_confusion(cm: np.ndarray, class_names, path: Path, title: str) -> Path:
    n = len(cm)
    fig, ax = _figure(max(4, 0.5 * n + 2), max(4, 0.5 * n + 1.5))
    ax.imshow(cm, cmap="Blues")
    if n <= 20:
        ax.set_xticks(range(n), class_names, rotation=45, ha="right")
        ax.set_yticks(range(n), class_names)
        for i in range(n):
            for j in range(n):
                ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    return _save(fig, path)


def plot_reliability(cal: dict, path: Path, title: str) -> Path:
    fig, ax = _figure(4.5, 4.5)
    centers = (cal["edges"][:-1] + cal["edges"][1:]) / 2
    width = cal["edges"][1] - cal["edges"][0]
    ok = cal["count"] > 0
    ax.bar(centers[ok], cal["accuracy"][ok], width=width * 0.9, edgecolor="k", label="accuracy")
    ax.plot([0, 1], [0, 1], "r--", label="perfect calibration")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title} (ECE {cal['ece']:.3f})")
    ax.legend(loc="upper left")
    return _save(fig, path)


def _to_rgb(images: np.ndarray) -> np.ndarray:
    x = images.astype(np.float32)
    x = x / 255.0 if images.dtype == np.uint8 else (x - x.min()) / max(float(x.max() - x.min()), 1e-6)
    return np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x[..., :3]


def plot_predictions(images: np.ndarray, labels, preds, confidence, class_names, path: Path, title: str) -> Path:
    """Image grid with true/pred captions; wrong predictions in red. One mosaic in one axes: drawing a
    subplot per image costs ~35 ms each, this ~0.1 s for the whole grid."""
    n = len(images)
    cols = min(8, n)
    rows = -(-n // cols)
    h, w = images.shape[1:3]
    pad, cap = max(1, w // 16), max(4, h // 2)  # cap: a white band above each image for its caption
    cell_h, cell_w = cap + h + pad, w + pad
    mosaic = np.ones((rows * cell_h, cols * cell_w, 3), np.float32)
    for k, img in enumerate(_to_rgb(images)):
        r, c = divmod(k, cols)
        mosaic[r * cell_h + cap: r * cell_h + cap + h, c * cell_w: c * cell_w + w] = img
    fig, ax = _figure(1.6 * cols, 2.0 * rows)
    ax.imshow(mosaic, interpolation="nearest")
    for k in range(n):
        r, c = divmod(k, cols)
        wrong = labels[k] != preds[k]
        ax.text(c * cell_w + w / 2, r * cell_h + cap - 0.5, f"{'x ' if wrong else ''}{class_names[labels[k]]}\n"
                f"-> {class_names[preds[k]]} {confidence[k]:.2f}", ha="center", va="bottom", fontsize=7,
                color="red" if wrong else "black")
    ax.axis("off")
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def plot_batch(images: np.ndarray, captions: list[str], path: Path, title: str) -> Path:
    """A training batch (uint8 images as stored) in a grid, each image under its caption (its label or label
    mix): ``python -m vision_train.preview`` and a run's ``train/batch_preview``. Small images are enlarged
    (nearest) to at least 64 pixels so the augmentation can be seen."""
    n = len(images)
    cols = min(8, n)
    rows = -(-n // cols)
    zoom = max(1, -(-64 // max(1, min(images.shape[1:3]))))
    big = np.repeat(np.repeat(_to_rgb(images), zoom, axis=1), zoom, axis=2)
    h, w = big.shape[1:3]
    pad, cap = max(2, w // 16), max(8, h // 3)
    cell_h, cell_w = cap + h + pad, w + pad
    mosaic = np.ones((rows * cell_h, cols * cell_w, 3), np.float32)
    for k, img in enumerate(big):
        r, c = divmod(k, cols)
        mosaic[r * cell_h + cap: r * cell_h + cap + h, c * cell_w: c * cell_w + w] = img
    fig, ax = _figure(1.6 * cols, 1.9 * rows + 0.4)
    ax.imshow(mosaic, interpolation="nearest")
    for k, text in enumerate(captions):
        r, c = divmod(k, cols)
        ax.text(c * cell_w + w / 2, r * cell_h + cap - 1, text, ha="center", va="bottom", fontsize=6)
    ax.axis("off")
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def plot_curves(rows: list[dict], path: Path) -> Path:
    """Loss and accuracy curves from metrics.jsonl rows."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.8), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, what in zip(axes, ("loss", "acc")):
        for split in ("train", "val"):
            pts = [(r["step"], r[f"{split}/{what}"]) for r in rows if r.get(f"{split}/{what}") is not None]
            if pts:
                ax.plot(*zip(*pts), marker="." if split == "val" else None, label=f"{split}/{what}")
        ax.set_xlabel("step")
        ax.set_title(what)
        ax.legend()
        ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_decision_boundary(points: np.ndarray, labels: np.ndarray, grid: tuple, grid_pred: np.ndarray,
                           path: Path, title: str) -> Path:
    """2-D data: the model's predicted class over a grid, with the points on top (seed 003's figure)."""
    xx, yy = grid
    fig, ax = _figure(5, 5)
    ax.contourf(xx, yy, grid_pred.reshape(xx.shape), levels=np.arange(grid_pred.max() + 2) - 0.5,
                cmap="tab10", vmin=0, vmax=9, alpha=0.35)
    ax.scatter(points[:, 0], points[:, 1], c=labels, cmap="tab10", vmin=0, vmax=9, s=8, edgecolors="k", linewidths=0.2)
    ax.set_title(title)
    return _save(fig, path)


def eval_report(split: str, *, labels: np.ndarray, preds: np.ndarray, confidence: np.ndarray, class_names,
                images: np.ndarray | None, out_dir: Path, confusion: np.ndarray, cal: dict, sample: dict | None = None,
                top_mistakes: int = 16) -> dict:
    """Figures for one evaluation from the eval step's counts (``confusion``; ``cal``, from
    ``calibration_from_bins``). Returns {"files": {name: path}, "confusion": cm, "sample": sample}; figures
    are written to ``out_dir``. (Its scalars come from ``eval_scalars``, logged with the eval.)"""
    out_dir.mkdir(parents=True, exist_ok=True)
    correct = preds == labels
    cm = np.asarray(confusion).astype(np.int64)
    files = {
        "confusion_heatmap": plot_confusion(cm, class_names, out_dir / f"{split}_confusion.png", f"{split} confusion matrix"),
        "reliability": plot_reliability(cal, out_dir / f"{split}_reliability.png", f"{split} reliability"),
    }
    is_image = images is not None and images.dtype == np.uint8
    if is_image and sample is not None:
        files["predictions"] = plot_predictions(images[sample["index"]], labels[sample["index"]],
                                                sample["probs"].argmax(-1), sample["probs"].max(-1), class_names,
                                                out_dir / f"{split}_predictions.png", f"{split} predictions (x = wrong)")
    wrong = np.flatnonzero(~correct)
    if is_image and len(wrong):
        worst = wrong[np.argsort(-confidence[wrong])][:top_mistakes]
        files["confident_mistakes"] = plot_predictions(images[worst], labels[worst], preds[worst], confidence[worst],
                                                       class_names, out_dir / f"{split}_mistakes.png",
                                                       f"{split}: most confident mistakes")
    return {"files": files, "confusion": cm, "sample": sample}
