"""Image data sets on disk for tests, written by the libraries that own the formats (PIL, datasets).

    write_image_folder(root, ...)   an ImageFolder tree (<root>/train/<class>/*, val/, test/; or classes at the root)
    write_digits_folder(root)       scikit-learn's digits as 8x8 grayscale PNGs, train/ and test/ as data=digits splits
    write_hf_dataset(path, ...)     a Hugging Face DatasetDict (Image + ClassLabel features) written with save_to_disk
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

JPEG_MODES = ("L", "RGB", "CMYK")  # the modes a JPEG file can hold; others are written as PNG
COLORS = [(230, 40, 40), (40, 200, 60), (50, 70, 230), (230, 210, 40), (200, 50, 220), (40, 210, 210)]


def class_image(label: int, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """An RGB uint8 image a small model can tell apart by class: the class's colour, a bright square in a
    class-dependent corner, and noise."""
    a = np.empty((height, width, 3), np.float64)
    a[:] = COLORS[label % len(COLORS)]
    qh, qw = max(1, height // 3), max(1, width // 3)
    y, x = (0, 0) if label % 2 == 0 else (height - qh, width - qw)
    a[y:y + qh, x:x + qw] = 255
    a += rng.normal(0, 12, a.shape)
    return np.clip(a, 0, 255).astype(np.uint8)


def _save(rgb: np.ndarray, mode: str, path_stem: Path, fmt: str) -> Path:
    im = Image.fromarray(rgb, "RGB")
    if mode == "P":
        im = im.convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    elif mode != "RGB":
        im = im.convert(mode)
    if fmt == "jpg" and mode not in JPEG_MODES:
        fmt = "png"
    elif fmt == "png" and mode == "CMYK":  # (PNG cannot hold CMYK; TIFF can)
        fmt = "tif"
    path = path_stem.with_suffix(f".{fmt}")
    im.save(path, quality=95) if fmt == "jpg" else im.save(path)
    return path


def write_image_folder(root, classes=("cat", "dog", "fox"), per_class=6, size=(20, 14), splits=True,
                       formats=("png", "jpg"), modes=("RGB",), seed=0) -> dict[str, list[tuple[Path, int]]]:
    """Write an ImageFolder tree under ``root`` and return {split: [(path, label), ...]}.

    ``splits``: True writes train/, val/ and test/ (``per_class`` images a class in train, half that, at least
    one, in val and test); False puts the class folders at ``root``. ``per_class`` may also be
    {split: count}. Image i of a class is ``size`` (width, height) plus 3 * (i % 3) pixels each way, in
    ``modes[i % len(modes)]`` and ``formats[i % len(formats)]`` (JPEG only where it can hold the mode)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    if splits:
        counts = per_class if isinstance(per_class, dict) else \
            {"train": per_class, "val": max(1, per_class // 2), "test": max(1, per_class // 2)}
        folders = {s: root / s for s in counts}
    else:
        counts, folders = {"all": per_class}, {"all": root}
    written: dict[str, list[tuple[Path, int]]] = {}
    for split, folder in folders.items():
        written[split] = []
        for label, name in enumerate(classes):
            (folder / name).mkdir(parents=True, exist_ok=True)
            for i in range(counts[split]):
                w, h = size[0] + 3 * (i % 3), size[1] + 3 * (i % 3)
                path = _save(class_image(label, w, h, rng), modes[i % len(modes)], folder / name / f"{split}_{i:03d}",
                             formats[i % len(formats)])
                written[split].append((path, label))
    return written


def write_digits_folder(root) -> dict[str, int]:
    """scikit-learn's digits as 8x8 grayscale PNGs (values 0..16 scaled to 0..255, as data=digits), in
    train/<digit>/ and test/<digit>/ by the 80/20 split data=digits draws (test_fraction 0.2, split_seed 42),
    so accuracies compare. Returns the number of images per split."""
    from vision_train.data import sources

    full, _ = sources.load_digits()
    train, test = sources._train_test(full, 0.2, 42)
    root = Path(root)
    for split, part in (("train", train), ("test", test)):
        for i, (image, label) in enumerate(zip(part.images, part.labels)):
            folder = root / split / str(int(label))
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image[..., 0], "L").save(folder / f"{i:04d}.png")
    return {"train": len(train.labels), "test": len(test.labels)}


def write_hf_dataset(path, classes=("ant", "bee", "wasp"), per_class=4, splits=("train", "test"), size=(12, 10),
                     image_key="image", label_key="label", class_label=True, seed=0):
    """A ``datasets.DatasetDict`` of PNG images (an ``Image`` feature) and labels (a ``ClassLabel`` feature,
    or plain strings with ``class_label=False``), written with ``save_to_disk`` to ``path``. Returns
    {split: (images as RGB uint8 arrays, int labels)}."""
    import datasets  # (about a second to import: only the tests of Hugging Face data need it)

    rng = np.random.default_rng(seed)
    parts, out = {}, {}
    for split in splits:
        images, labels = [], []
        for label in range(len(classes)):
            for i in range(per_class):
                rgb = class_image(label, size[0] + i, size[1], rng)
                buf = io.BytesIO()
                Image.fromarray(rgb).save(buf, format="PNG")
                images.append({"bytes": buf.getvalue(), "path": None})
                labels.append(label)
        out[split] = ([np.asarray(Image.open(io.BytesIO(x["bytes"]))) for x in images], labels)
        if class_label:
            features = datasets.Features({image_key: datasets.Image(), label_key: datasets.ClassLabel(names=list(classes))})
            values = labels
        else:
            features = datasets.Features({image_key: datasets.Image(), label_key: datasets.Value("string")})
            values = [classes[v] for v in labels]
        parts[split] = datasets.Dataset.from_dict({image_key: images, label_key: values}, features=features)
    datasets.DatasetDict(parts).save_to_disk(str(path))
    return out
