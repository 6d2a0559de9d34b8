"""``python -m vision_train.predict checkpoint=<run dir | checkpoints dir | step dir> inputs=<files or a folder>``

Classifies image files (anything PIL reads: PNG, JPEG, ...) with a trained model. Each image is converted
to the model's channel count (RGB -> grayscale for 1-channel models, grayscale -> RGB for 3-channel
ones), resized to the training image size (said once on stderr), and normalised exactly as in training
(the checkpoint's scale, mean and std). Prints a table (file, top-k classes with probabilities) on
stdout and writes the same as JSON (``json=<path>``, default ``<run dir>/predictions.json``). Files that
cannot be read as images are reported (stderr and the JSON's ``errors``) and make the exit status 1;
the others are still classified.

``inputs``: one file, a folder (its files, not recursive), ``inputs=[a.png,b.jpg]``, or a comma-separated
list in quotes (``"inputs='a.png,b.jpg'"``: Hydra reads an unquoted ``a,b`` as a sweep).

``predict(...)`` is importable without Hydra.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .config import MISSING, HardwareConfig
from .config import register_configs as register_training_configs
from .errors import ConfigError, UserError, exit_on_user_error, write_text, writing
from .evaluate import CHECKPOINT_FIX, load_checkpoint, quiet_libraries, require_checkpoint
from .host_devices import configure_host_devices

log = logging.getLogger("vision_train")


@dataclass
class PredictConfig:
    checkpoint: str = MISSING          # a run dir, its checkpoints/ dir, or one step's dir (default: latest step)
    inputs: Any = MISSING              # a file, a folder, [a.png,b.png], or 'a.png,b.png'
    top_k: int = 5
    json: Optional[str] = None         # where to write the predictions; None: <run dir>/predictions.json
    batch_size: int = 256
    hardware: HardwareConfig = field(default_factory=HardwareConfig)


def register_configs() -> None:
    from hydra.core.config_store import ConfigStore  # (Hydra: only at the command line's edge)

    register_training_configs()
    ConfigStore.instance().store(name="predict_schema", node=PredictConfig)


class Unreadable(Exception):
    """A file that is not an image PIL can read."""


def expand_inputs(inputs) -> list[Path]:
    """Files from ``inputs``: a path or comma-separated paths (str), or a list of them; folders give their
    files (sorted, not recursive, hidden files skipped). Order is kept; missing paths are kept (and
    reported when read)."""
    if inputs is None or inputs == MISSING:
        items = []
    elif isinstance(inputs, str):
        items = [s.strip() for s in inputs.split(",")]
    else:
        items = [str(s).strip() for s in inputs]
    files = []
    for item in filter(None, items):
        p = Path(item).expanduser()
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith("."))
        else:
            files.append(p)
    return files


def read_image(path: Path, height: int, width: int, channels: int) -> tuple[np.ndarray, dict]:
    """An image file -> (H, W, C) uint8 at the model's size and channel count, and what was done to it."""
    from PIL import Image, UnidentifiedImageError

    if not path.exists():
        raise Unreadable("no such file")
    if not path.is_file():
        raise Unreadable("not a file")
    try:
        with Image.open(path) as im:
            im.load()
            info = {"mode": im.mode, "size": [im.width, im.height]}
            if im.mode.startswith("I;16"):  # 16-bit grayscale: scale to 8 bits (convert("L") would clip)
                im = Image.fromarray((np.asarray(im, np.float64) / 257.0).round().astype(np.uint8), "L")
            target = "L" if channels == 1 else "RGB"
            if im.mode != target:
                im = im.convert(target)
            if im.size != (width, height):
                im = im.resize((width, height), Image.Resampling.BILINEAR)
            x = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        why = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise Unreadable(f"cannot read it as an image ({why})") from None
    if x.ndim == 2:
        x = x[..., None]
    info["converted"] = info["mode"] != target
    info["resized"] = info["size"] != [width, height]
    return x, info


def format_table(rows: list[dict], k: int) -> str:
    """One line per file: the file, then the top-k classes with their probabilities."""
    cells = [[r["file"]] + [f"{t['class']} {t['prob']:.3f}" for t in r["top_k"]] for r in rows]
    header = ["file"] + [f"top-{i + 1}" for i in range(k)]
    widths = [max(len(row[i]) if i < len(row) else 0 for row in [header] + cells) for i in range(k + 1)]
    fmt = lambda row: "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(header)] + [fmt(row) for row in cells])


def predict(pc: PredictConfig, run_dir: str | Path) -> dict:
    """Classify ``pc.inputs``; print the table; write the JSON. Returns the JSON's content."""
    run_dir = Path(run_dir)
    if pc.top_k <= 0:
        raise ConfigError("top_k", pc.top_k, "must be >= 1")
    if pc.batch_size <= 0:
        raise ConfigError("batch_size", pc.batch_size, "must be > 0")
    if not pc.checkpoint or pc.checkpoint == MISSING:
        raise ConfigError("checkpoint", pc.checkpoint, CHECKPOINT_FIX)
    files = expand_inputs(pc.inputs)
    if not files:
        raise ConfigError("inputs", pc.inputs if pc.inputs != MISSING else None,
                          "give image files or a folder, e.g. inputs=photo.png, inputs=[a.png,b.jpg] or "
                          "inputs=images/ (a folder given must hold files)")

    # JAX starts here, not when this module is imported: the command line sets XLA_FLAGS (hardware.*) first.
    import jax
    from flax import nnx

    from . import parallel
    from .train.assembly import compute_dtype
    from .train.feeds import Normalize
    from .train.steps import make_predict

    device = parallel.select_devices(pc.hardware.platform, 0)[0]  # one device is plenty
    model, cfg, facts, step, _, ckpt_dir = load_checkpoint(pc.checkpoint, jax.sharding.SingleDeviceSharding(device))
    h, w, c = facts["shape"]
    classes = list(facts["class_names"])
    if c not in (1, 3) or facts["scale"] == 1.0:
        raise ConfigError("checkpoint", pc.checkpoint,
                          f"its model was trained on {cfg.data.name} ({h}x{w}x{c} inputs, not 8-bit images); "
                          f"predict works with image models (trained on 1- or 3-channel image data)")

    # ---------------------------------------------------------------- read the images
    images, ok, errors, said = [], [], [], set()
    for f in files:
        try:
            x, info = read_image(f, h, w, c)
        except Unreadable as e:
            errors.append({"file": str(f), "error": str(e)})
            log.warning("refused %s: %s", f, e)
            continue
        if info["converted"] and "convert" not in said:
            said.add("convert")
            log.warning("note: converting %s images to %s for this %d-channel model (first: %s)", info["mode"],
                        "grayscale" if c == 1 else "RGB", c, f)
        if info["resized"] and "resize" not in said:
            said.add("resize")
            log.warning("note: resizing images to %dx%d, the size the model was trained on (first: %s, %dx%d); "
                        "the aspect ratio is not kept", w, h, f, *info["size"])
        images.append(x)
        ok.append((f, info))

    # ---------------------------------------------------------------- classify
    rows = []
    if images:
        graphdef, params, other = nnx.split(model, nnx.Param, ...)
        normalize = Normalize(facts["scale"], tuple(facts["mean"]), tuple(facts["std"]), compute_dtype(cfg))
        forward = jax.jit(make_predict(graphdef, normalize))
        x = np.stack(images)
        B = min(pc.batch_size, len(x))  # one shape: the last chunk is padded
        probs = []
        for i in range(0, len(x), B):
            chunk = x[i:i + B]
            pad = np.zeros((B - len(chunk), *chunk.shape[1:]), np.uint8)
            probs.append(np.asarray(jax.device_get(forward(params, other, np.concatenate([chunk, pad]))))[:len(chunk)])
        probs = np.concatenate(probs).astype(np.float64)
        k = min(pc.top_k, len(classes))
        for (f, info), p in zip(ok, probs):
            top = np.argsort(-p, kind="stable")[:k]
            rows.append({"file": str(f), "top_k": [{"class": classes[j], "index": int(j), "prob": float(p[j])}
                                                   for j in top],
                         "original_mode": info["mode"], "original_size": info["size"],
                         "converted": info["converted"], "resized": info["resized"]})
        print(format_table(rows, k), flush=True)

    # ---------------------------------------------------------------- write
    out = {"checkpoint": str(ckpt_dir / str(step)), "step": step, "model": cfg.model.arch,
           "trained_on": cfg.data.name, "input_shape": [h, w, c], "class_names": classes,
           "top_k": min(pc.top_k, len(classes)), "predictions": rows, "errors": errors}
    path = Path(pc.json).expanduser() if pc.json else run_dir / "predictions.json"
    with writing(path, "the predictions"):
        path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(out, indent=2), "the predictions")
    print(f"predictions: {path}", flush=True)
    if errors:
        log.warning("%d of %d inputs could not be read as images (listed above and under \"errors\" in %s)",
                    len(errors), len(files), path)
    return out


def quote_input_list(argv: list[str]) -> list[str]:
    """``inputs=a.png,b.png`` -> ``inputs='a.png,b.png'``: Hydra reads an unquoted comma list as a sweep
    and refuses it outside --multirun; here it is a list of files."""
    if any(a in ("-m", "--multirun") for a in argv):
        return argv
    out = []
    for a in argv:
        if a.startswith("inputs=") and "," in a and a[len("inputs="):][:1] not in ("[", "'", '"'):
            a = "inputs='" + a[len("inputs="):].replace("'", "\\'") + "'"
        out.append(a)
    return out


def _main():
    import hydra
    from omegaconf import DictConfig, OmegaConf

    register_configs()
    sys.argv = [sys.argv[0], *quote_input_list(sys.argv[1:])]

    @hydra.main(version_base="1.3", config_path="../conf", config_name="predict")
    def main(cfg: DictConfig) -> None:
        from hydra.core.hydra_config import HydraConfig


        quiet_libraries()
        with exit_on_user_error(log):
            require_checkpoint(cfg)
            if OmegaConf.is_missing(cfg, "inputs"):
                raise UserError("inputs= is missing: give image files or a folder, e.g. inputs=photo.png, "
                                "inputs=[a.png,b.jpg] or inputs=images/")
            pc = OmegaConf.to_object(cfg)
            if not isinstance(pc.inputs, (str, list, tuple)):
                pc.inputs = str(pc.inputs)
            configure_host_devices(pc.hardware.platform, 0)
            out = predict(pc, HydraConfig.get().runtime.output_dir)
        if out["errors"]:
            sys.exit(1)

    main()


if __name__ == "__main__":
    _main()
