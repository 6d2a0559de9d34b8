"""``python -m vision_train.preview <overrides> out=batch.png [n=64] [step=0]``: a picture of a training batch as
the train step sees it, after augmentation and mixing, before normalisation, with each image's label or label
mix. Check what ``data.augment.*`` does by looking at it.

The batch is the run's own: the same config (presets and overrides as for ``python -m vision_train``), the same
feed and the same random keys as step ``step`` (0-based) of that run (``train.steps.make_batch``), so what the
picture shows is what the step trained on. A run logs the same picture of its first batch to W&B once, at its
start (``train/batch_preview``; ``<run dir>/media/batch_preview.png``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

USAGE = ("usage: python -m vision_train.preview <overrides, as for python -m vision_train> out=batch.png [n=64] "
         "[step=0]  (step: 0-based, as the run's steps 1, 2, ... are 0, 1, ... here)")
OWN_KEYS = ("out", "n", "step")


def denormalize(x: np.ndarray, normalize) -> np.ndarray:
    """The model's input -> images as stored (0..255 for uint8 data sets), clipped and rounded to uint8."""
    mean, std = np.asarray(normalize.mean, np.float32), np.asarray(normalize.std, np.float32)
    stored = (np.asarray(x, np.float32) * std + mean) / normalize.scale
    return np.clip(np.round(stored), 0, 255).astype(np.uint8)


def captions(labels: np.ndarray, targets: np.ndarray | None, class_names) -> list[str]:
    """Each image's label, or its mix of labels ("0.62 cat + 0.38 dog": the target's two largest weights, label
    smoothing's floor taken off so the weights are the mix's)."""
    if targets is None:
        return [str(class_names[int(y)]) for y in labels]
    out = []
    for t in np.asarray(targets, np.float64):
        floor = t.min()
        w = (t - floor) / max(float((t - floor).sum()), 1e-12)
        top = np.argsort(-w, kind="stable")[:2]
        parts = [f"{w[c]:.2f} {class_names[c]}" for c in top if w[c] >= 0.005]
        out.append(" + ".join(parts) if len(parts) > 1 else str(class_names[top[0]]))
    return out


def batch_preview(feed, step: int, args: tuple, *, rng, mixing, num_classes: int, label_smoothing: float, n: int):
    """Step ``step``'s batch (its feed arguments ``args``: ``feed.train_args(step)``; first ``n`` images) as the train
    step sees it: (uint8 images, labels, targets or None), on the host. Every process of a run calls it (a
    jitted computation over the run's mesh)."""
    import jax

    from .train import steps

    batch = jax.jit(steps.make_batch(feed.train_batch, mixing=mixing, num_classes=num_classes,
                                     label_smoothing=label_smoothing))
    x, y, targets = batch(rng, np.int32(step), args)
    x, y = jax.device_get((x[:n], y[:n]))  # (global arrays: the first rows, replicated by the slice's fetch)
    targets = None if targets is None else np.asarray(jax.device_get(targets[:n]))
    return denormalize(x, feed.normalize), np.asarray(y), targets


def log_run_preview(run, step: int, args: tuple, n: int = 64) -> None:
    """A run's first batch as a picture (``<run dir>/media/batch_preview.png``), logged once to the trackers as
    ``train/batch_preview``: before the first step of a new run with ``logger.media`` on and image data. Never
    costs the run: a failure is one warning."""
    import logging

    from .train import build

    cfg = run.cfg
    if not cfg.logger.media or cfg.logger.mode == "disabled" or run.ds.train.images.dtype != np.uint8:
        return
    try:
        images, labels, targets = batch_preview(
            run.feed, step, args, rng=run.state.rng, mixing=build.mixing(cfg.data.augment),
            num_classes=cfg.model.num_classes or run.ds.num_classes, label_smoothing=cfg.optimizer.label_smoothing,
            n=min(n, run.feed.batch_size))
        if run.is_main:
            path = save(images, labels, targets, run.ds.class_names, run.run_dir / "media" / "batch_preview.png",
                        f"{run.ds.name}: step {step + 1}'s batch ({len(images)} of {run.feed.batch_size}), as trained on")
            run.tracker.log_image("train/batch_preview", path, step)
    except Exception as e:  # noqa: BLE001 (a picture must never cost the run)
        logging.getLogger("vision_train").warning("train/batch_preview not made: %s: %s", type(e).__name__, e)


def save(images: np.ndarray, labels: np.ndarray, targets, class_names, path: Path, title: str) -> Path:
    from .tracking import media

    path.parent.mkdir(parents=True, exist_ok=True)
    return media.plot_batch(images, captions(labels, targets, class_names), path, title)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    own = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in argv if a.split("=", 1)[0] in OWN_KEYS and "=" in a}
    overrides = [a for a in argv if a.split("=", 1)[0] not in OWN_KEYS]
    if "out" not in own or any(a in ("-h", "--help") for a in argv):
        print(USAGE, file=sys.stderr)
        return 2
    try:
        n, step = int(own.get("n", 64)), int(own.get("step", 0))
    except ValueError:
        print(f"error: n and step take integers, e.g. n=64 step=0 ({USAGE})", file=sys.stderr)
        return 2
    from .errors import UserError

    try:
        return _preview(overrides, Path(own["out"]), n, step)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _preview(overrides: list[str], out: Path, n: int, step: int) -> int:
    from .api import compose
    from .host_devices import configure_host_devices

    cfg = compose(overrides)
    configure_host_devices(cfg.hardware.platform, 1)  # one device: the batch does not depend on the count
    import jax

    from . import config as config_lib
    from .errors import ConfigError
    from .rng import stream
    from .train import build

    if step < 0:  # (before anything is loaded)
        raise ConfigError("step", step, "is a 0-based training step: give step=0 or later")
    hw = build.hardware(_one_device(cfg.hardware))
    ds, streamed, _ = build.data(cfg.data)
    cfg = config_lib.with_data(cfg, has_val=ds.val is not None)
    B = cfg.trainer.batch_size
    feed = build.feed(ds, streamed, cfg.data, batch_size=B, seed=cfg.trainer.seed, mesh=hw.mesh, eval_splits=(),
                      aug=build.augmentation(cfg.data.augment, ds, B),
                      normalize=build.normalize(ds.scale, ds.mean, ds.std, cfg.hardware.precision))
    try:
        rng = jax.random.key_data(stream(np.int32(cfg.trainer.seed), "step"))
        feed.start_epoch(step)
        images, labels, targets = batch_preview(
            feed, step, feed.train_args(step), rng=rng, mixing=build.mixing(cfg.data.augment),
            num_classes=cfg.model.num_classes or ds.num_classes, label_smoothing=cfg.optimizer.label_smoothing,
            n=max(1, min(n, B)))
    finally:
        feed.close()
    save(images, labels, targets, ds.class_names, out, f"{ds.name}: step {step + 1}'s batch ({len(images)} of {B})")
    print(f"wrote {out} ({len(images)} images of the batch of {B} the run's step {step + 1} trains on)")
    return 0


def _one_device(h):
    """``hardware.*`` with one device (and no FSDP axis: the batch's values do not depend on the mesh)."""
    import dataclasses

    one = {"num_devices": 1, **({"fsdp": 1} if hasattr(h, "fsdp") else {})}
    return dataclasses.replace(h, **one)


if __name__ == "__main__":
    sys.exit(main())
