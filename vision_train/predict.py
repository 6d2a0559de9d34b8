"""``python -m vision_train.predict checkpoint=<run dir | checkpoints dir | step dir> inputs=<files or a folder>``
``python -m vision_train.predict weights=<file> model=<preset> inputs=<files or a folder>``

Classifies image files (anything PIL reads: PNG, JPEG, ...) with a trained model: a checkpoint of a run
(``checkpoint=``), or a pretrained classifier as it is, with its own head (``weights=``: timm's .safetensors/.bin,
a big_vision / vision_transformer .npz, ``hf-hub:<repo id>`` or a URL, read as ``model.init_from`` reads it;
``model=`` the preset it fits, e.g. ``model=vit_b``), so a checkpoint can be checked before tuning it. The two
are exclusive. Each image is converted to the model's channel count (RGB -> grayscale for 1-channel models,
grayscale -> RGB for 3-channel ones), resized to the model's image size (said once on stderr), and normalised:
a checkpoint's as in training (its scale, mean and std); pretrained weights' with ``mean``/``std`` (default: the
architecture's checkpoints' convention, ``Weights.mean``/``std`` in its module: 0.5, 0.5 for ViT and Mixer, pixels
in [-1, 1]; ImageNet's for ResNets) at ``image_size`` (default 224). Class names: a checkpoint's own; for weights,
``class_names=<file>`` (one per line), else the class indices. Prints a table (file, top-k classes with
probabilities) on stdout and writes the same as JSON (``json=<path>``, default ``<run dir>/predictions.json``).
Files that cannot be read as images are reported (stderr and the JSON's ``errors``) and make the exit status 1;
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
from typing import Any, List, Optional

import numpy as np
from PIL import Image, UnidentifiedImageError

from . import models
from .config import MISSING, HardwareConfig, ModelConfig
from .config import register_configs as register_training_configs
from .errors import ConfigError, UserError, check_positive, exit_on_user_error, write_text, writing
from .evaluate import CHECKPOINT_FIX, quiet_libraries, reading_checkpoint
from .host_devices import configure_host_devices

log = logging.getLogger("vision_train")


WEIGHTS_FIX = ("or weights=<file> model=<preset> for a pretrained classifier (timm .safetensors/.bin, big_vision "
               ".npz), e.g. weights=vit_b16.safetensors model=vit_b")


@dataclass
class PredictConfig:
    checkpoint: Optional[str] = None   # a run dir, its checkpoints/ dir, or one step's dir (default: latest step)
    inputs: Any = MISSING              # a file, a folder, [a.png,b.png], or 'a.png,b.png'
    top_k: int = 5
    json: Optional[str] = None         # where to write the predictions; None: <run dir>/predictions.json
    batch_size: int = 256
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    # Instead of checkpoint=: a pretrained classifier as it is (its own head), and the model preset it fits.
    weights: Optional[str] = None      # a file (timm .safetensors/.bin, big_vision .npz), hf-hub:<repo id>, or a URL
    model: Any = None                  # with weights=: model=<preset> (conf/model/), e.g. model=vit_b
    image_size: int = 224              # with weights=: images are resized to image_size x image_size
    # with weights=: the input normalisation per channel, in [0, 1] units. None: the architecture's checkpoints'
    # convention (0.5 / 0.5, pixels in [-1, 1], for timm's and big_vision's ViT and Mixer checkpoints; ImageNet's
    # 0.485,0.456,0.406 / 0.229,0.224,0.225 for ResNets); a checkpoint trained otherwise (its card says) needs both
    mean: Optional[List[float]] = None
    std: Optional[List[float]] = None
    class_names: Optional[str] = None  # with weights=: a text file, one class name per line; None: the indices


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


def check_source(checkpoint, weights) -> None:
    """Exactly one of ``checkpoint=`` and ``weights=`` (one line otherwise)."""
    given = lambda v: v is not None and v != MISSING and bool(str(v).strip())
    if given(checkpoint) and given(weights):
        raise ConfigError("weights", weights, f"give checkpoint= (a run trained here, {checkpoint}) or weights= (a "
                          f"pretrained classifier), not both")
    if not given(checkpoint) and not given(weights):
        raise ConfigError("checkpoint", None, f"{CHECKPOINT_FIX}; {WEIGHTS_FIX}")


@dataclass
class Classifier:
    """What predict classifies with, from a checkpoint or from pretrained weights."""
    graphdef: Any
    params: Any
    other: Any
    normalize: Any          # train.build.normalize's: stored values -> the model's input
    shape: tuple            # (H, W, C) the model takes
    classes: list
    about: dict             # the JSON's description of the model
    size_note: str          # what the resize brings images to


def _from_checkpoint(pc: PredictConfig, device) -> Classifier:
    import jax  # (after the command line set XLA_FLAGS)

    from .train import build

    with reading_checkpoint(pc.checkpoint):
        ck = build.read_checkpoint(pc.checkpoint)
        trained = build.restore_model(ck, jax.sharding.SingleDeviceSharding(device))
    cfg, facts = ck.config, ck.data
    h, w, c = facts["shape"]
    if c not in (1, 3) or facts["scale"] == 1.0:
        raise ConfigError("checkpoint", pc.checkpoint,
                          f"its model was trained on {cfg.data.name} ({h}x{w}x{c} inputs, not 8-bit images); "
                          f"predict works with image models (trained on 1- or 3-channel image data)")
    if pc.class_names:
        raise ConfigError("class_names", pc.class_names, "is for weights=; a checkpoint has its own class names")
    return Classifier(trained.graphdef, trained.params, trained.other,
                      build.normalize(facts["scale"], facts["mean"], facts["std"], cfg.hardware.precision),
                      (h, w, c), list(facts["class_names"]),
                      {"checkpoint": str(ck.path), "step": ck.step, "model": cfg.model.arch,
                       "trained_on": cfg.data.name}, "the size the model was trained on")


def _file_head(source: str) -> tuple[int | None, int]:
    """The pretrained file's class count (None: it has no head) and input channels, from its arrays."""
    from .models import pretrained

    info = pretrained.describe(source)  # (the architecture's own first-layer kernel: no path named here)
    return info["num_classes"], info["in_channels"]


def _from_weights(pc: PredictConfig, device) -> Classifier:
    import jax  # (after the command line set XLA_FLAGS)
    from flax import nnx

    from .models import pretrained
    from .train import build

    m = pc.model
    if not isinstance(m, ModelConfig):
        raise ConfigError("model", m, "weights= needs the model preset the file fits, e.g. model=vit_b or "
                          "model=mixer_b (conf/model/; a file that does not fit says which would)")
    m.check()
    check_positive("image_size", pc.image_size)
    try:
        file_classes, c = _file_head(pc.weights)
        if file_classes is None:
            raise ConfigError("weights", pc.weights, "the file has no classifier head (a backbone for fine-tuning): "
                              "train one with model.init_from=<file>, then predict with checkpoint=<that run>")
        k = m.num_classes or file_classes
        names = [str(i) for i in range(k)]
        if pc.class_names:
            names = _read_class_names(pc.class_names, k)
        shape = (pc.image_size, pc.image_size, c)
        norm, given = _normalisation(pc, m.arch, c)
        for key, v in norm.items():
            if len(v) != c or (key == "std" and any(x <= 0 for x in v)):
                raise ConfigError(key, v, f"give {c} numbers (one per channel of the model's {c}-channel input, in "
                                  f"[0, 1] units)" + (", each > 0" if key == "std" else ""))
        pre = pretrained.load(pc.weights, m, input_shape=shape, num_classes=k, reset_head="false")
    except ConfigError as e:  # the loader names model.init_from, the training key; here it is weights=
        if e.key == pretrained.KEY:
            raise ConfigError("weights", e.value, e.fix.replace("data.image_size", "image_size")) from None
        raise
    dtype = build.compute_dtype(pc.hardware.precision)
    with jax.default_device(device):
        model = models.build(m, shape, k, rngs=nnx.Rngs(0), dtype=dtype, data=f"the {pc.image_size}x{pc.image_size} "
                             f"images (image_size)")
        graphdef, params, other = nnx.split(model, nnx.Param, ...)
        params, other = pretrained.merge(params, pre), pretrained.merge_stats(other, pre)
    log.info("weights: %s (%s, head %s, position embeddings %s) | inputs normalised with mean %s, std %s (%s)",
             pre.info["path"], pre.info["format"], pre.info["head"], pre.info["posemb"], norm["mean"], norm["std"],
             given)
    normalize = build.normalize(1 / 255, norm["mean"], norm["std"], pc.hardware.precision)
    return Classifier(graphdef, params, other, normalize, shape, names,
                      {"weights": pre.info["path"], "sha256": pre.info["sha256"], "format": pre.info["format"],
                       "model": m.arch, **norm}, "the model's input size (image_size)")


def _normalisation(pc: PredictConfig, arch: str, channels: int) -> tuple[dict, str]:
    """``({"mean": [...], "std": [...]}, where they came from)`` for a weights file of ``arch`` with ``channels``
    input channels: the keys given, else the architecture's checkpoints' convention (``Weights.mean``/``std``),
    averaged over the colours for a 1-channel file."""
    weights = models.architecture(arch).weights or models.Weights()  # (none: the loader then says why)
    norm, default = {}, []
    for key in ("mean", "std"):
        value = getattr(pc, key)
        if value is None:
            value = getattr(weights, key)
            if channels != len(value):
                value = [sum(value) / len(value)] * channels
            default.append(key)
        norm[key] = [float(v) for v in value]
    if not default:
        return norm, "given"
    return norm, f"{' and '.join(default)}: the {arch} checkpoints' convention; set mean= and std= for another"


def _read_class_names(path: str, k: int) -> list[str]:
    try:
        lines = Path(path).expanduser().read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ConfigError("class_names", path, f"cannot be read ({e.strerror or e}); give a text file with one "
                          f"class name per line, in the head's order") from None
    while lines and not lines[-1].strip():
        lines.pop()
    if len(lines) != k:
        raise ConfigError("class_names", path, f"has {len(lines)} lines, the model's head {k} classes; give one "
                          f"name per line, in the head's order")
    return [line.strip() for line in lines]


def predict(pc: PredictConfig, run_dir: str | Path) -> dict:
    """Classify ``pc.inputs``; print the table; write the JSON. Returns the JSON's content."""
    run_dir = Path(run_dir)
    if pc.top_k <= 0:
        raise ConfigError("top_k", pc.top_k, "must be >= 1")
    if pc.batch_size <= 0:
        raise ConfigError("batch_size", pc.batch_size, "must be > 0")
    check_source(pc.checkpoint, pc.weights)
    files = expand_inputs(pc.inputs)
    if not files:
        raise ConfigError("inputs", pc.inputs if pc.inputs != MISSING else None,
                          "give image files or a folder, e.g. inputs=photo.png, inputs=[a.png,b.jpg] or "
                          "inputs=images/ (a folder given must hold files)")

    # JAX starts here, not when this module is imported: the command line sets XLA_FLAGS (hardware.*) first.
    import jax

    from . import parallel
    from .train import build

    device = parallel.select_devices(pc.hardware.platform, 0)[0]  # one device is plenty
    source = _from_weights(pc, device) if pc.weights else _from_checkpoint(pc, device)
    h, w, c = source.shape
    classes = source.classes

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
            log.warning("note: resizing images to %dx%d, %s (first: %s, %dx%d); the aspect ratio is not kept",
                        w, h, source.size_note, f, *info["size"])
        images.append(x)
        ok.append((f, info))

    # ---------------------------------------------------------------- classify
    rows = []
    if images:
        params, other = source.params, source.other
        forward = build.predict_fn(source.graphdef, source.normalize)
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
    out = {**source.about, "input_shape": [h, w, c], "class_names": classes,
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
            check_source(cfg.checkpoint, cfg.weights)
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
