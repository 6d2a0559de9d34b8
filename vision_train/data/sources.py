"""Data sets as in-memory arrays: torchvision (real download code), scikit-learn digits, seed 003's toy set,
and synthetic data. Every loader returns a ``Dataset`` of NHWC arrays (uint8 images, or float32 features
for the 2-D toy set) with int32 labels, already split into train / val / test.

Splits follow the seeds: ``torch.randperm(n, generator=torch.Generator().manual_seed(seed))`` is exactly
what ``torch.utils.data.random_split`` draws, so CIFAR-10's 45,000/5,000 split matches seeds 000/002/004.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ..errors import DataError


class Split(NamedTuple):
    images: np.ndarray  # (N, H, W, C) uint8 (or float32 features)
    labels: np.ndarray  # (N,) int32


@dataclass(frozen=True)
class Dataset:
    name: str
    train: Split
    val: Split | None
    test: Split
    class_names: tuple[str, ...]
    mean: tuple[float, ...]  # per channel, in the units the pipeline sees after scaling (see ``scale``)
    std: tuple[float, ...]
    scale: float = 1.0 / 255  # multiply stored values by this before normalising (1.0 for float features)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


# Per-channel statistics of the training images, in [0, 1] units.
STATS = {
    "cifar10": ((0.49139968, 0.48215841, 0.44653091), (0.24703223, 0.24348513, 0.26158784)),  # seeds 000/002/004
    "cifar100": ((0.50707516, 0.48654887, 0.44091784), (0.26733429, 0.25643846, 0.27615047)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
}


def _permutation(n: int, seed: int) -> np.ndarray:
    """``torch.randperm(n, generator=torch.Generator().manual_seed(seed))``, drawn without importing torch (1.5 s
    of every run's start-up): torch's CPU generator is MT19937 seeded as numpy's ``RandomState(seed)`` is, and its
    randperm (for n < 2**32 / 20) is a Fisher-Yates shuffle that swaps ``r[i]`` with ``r[i + u32 % (n - i)]``.
    ``tests/test_data_sources.py`` holds it to torch's; outside that range torch itself draws it."""
    if not (0 <= seed < 2**32 and n < 2**32 // 20):
        import torch  # (here, not at the top: the streamed feed's worker processes import this module's neighbours)

        return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    draws = np.random.RandomState(seed).randint(0, 2**32, size=max(n - 1, 0), dtype=np.uint32)
    picks = (draws % np.arange(n, 1, -1, dtype=np.uint32)).tolist() if n > 1 else []
    r = list(range(n))
    for i, z in enumerate(picks):
        r[i], r[i + z] = r[i + z], r[i]
    return np.asarray(r, dtype=np.int64)


def split_off(split: Split, count: int, seed: int, what: str) -> tuple[Split, Split | None]:
    """Hold out the last ``count`` examples of a seeded permutation (random_split([n - count, count]))."""
    if count == 0:
        return split, None
    n = len(split.labels)
    if count >= n:
        raise DataError(f"cannot hold out {count} {what} examples from {n}; lower data.val_size")
    perm = _permutation(n, seed)
    keep, held = perm[: n - count], perm[n - count:]
    return Split(split.images[keep], split.labels[keep]), Split(split.images[held], split.labels[held])


# --------------------------------------------------------------------------------- torchvision
def import_torchvision():
    """Import torchvision, working around CUDA builds of it next to a CPU-only torch.

    torchvision's CUDA ``_C.so`` does not load on CPU torch, and ``import torchvision`` then dies with
    ``operator torchvision::nms does not exist``. Declaring the two operator schemas it registers
    Python fallbacks for lets the data sets and transforms import (its C++ ops stay unavailable).
    Imported here, not at the top: only the torchvision data sets need it (a second or more to import).
    """
    import torch

    try:
        import torchvision
        return torchvision
    except RuntimeError as e:
        if "torchvision::nms" not in str(e) or torch.version.cuda is not None:
            raise
        for mod in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[mod]
        lib = torch.library.Library("torchvision", "FRAGMENT")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        import_torchvision._keepalive = lib  # the schemas live as long as the Library object
        import torchvision
        return torchvision


def _where_to_put(name: str, root: str, tvd) -> str:
    """How to place a data set by hand: the files torchvision expects and where to get them."""
    if name in ("cifar10", "cifar100"):
        cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
        return (f"Expected {os.path.join(root, cls.base_folder)}/ (from {cls.filename}). Download {cls.url} "
                f"and extract it into {root}/ (tar xzf {cls.filename} -C {root}), or set data.root")
    if name in ("mnist", "fashion_mnist"):
        cls = tvd.MNIST if name == "mnist" else tvd.FashionMNIST
        folder = os.path.join(root, cls.__name__, "raw")
        files = ", ".join(f for f, _ in cls.resources)
        return (f"Expected {folder}/ holding {files}. Download them from {cls.mirrors[0]} into {folder}/ "
                f"(the .gz files are enough), or set data.root")
    if name == "svhn":
        urls = " and ".join(tvd.SVHN.split_list[s][0] for s in ("train", "test"))
        return f"Expected {root}/train_32x32.mat and {root}/test_32x32.mat. Download {urls} into {root}/, or set data.root"
    return f"Expected it under {root}"


def load_torchvision(name: str, root: str, *, download: bool) -> tuple[Split, Split, tuple[str, ...]]:
    tv = import_torchvision()
    tvd = tv.datasets
    root = os.path.abspath(os.path.expanduser(root))
    try:
        if name in ("cifar10", "cifar100"):
            cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
            sets = [cls(root, train=t, download=download) for t in (True, False)]
            splits = [Split(np.asarray(s.data, np.uint8), np.asarray(s.targets, np.int32)) for s in sets]
            classes = tuple(sets[0].classes)
        elif name in ("mnist", "fashion_mnist"):
            cls = tvd.MNIST if name == "mnist" else tvd.FashionMNIST
            # torchvision only reads unpacked idx files unless it downloads; accept the .gz files too.
            folder = os.path.join(root, cls.__name__, "raw")
            for fname, _ in cls.resources:
                gz = os.path.join(folder, fname)
                if os.path.isfile(gz) and not os.path.isfile(gz[: -len(".gz")]):
                    tvd.utils.extract_archive(gz, folder)
            sets = [cls(root, train=t, download=download) for t in (True, False)]
            splits = [Split(s.data.numpy().astype(np.uint8)[..., None], s.targets.numpy().astype(np.int32)) for s in sets]
            classes = tuple(sets[0].classes)
        elif name == "svhn":
            sets = [tvd.SVHN(root, split=s, download=download) for s in ("train", "test")]
            splits = [Split(np.ascontiguousarray(s.data.transpose(0, 2, 3, 1)).astype(np.uint8),
                            np.asarray(s.labels, np.int32)) for s in sets]
            classes = tuple(str(i) for i in range(10))
        else:
            raise ValueError(name)
    except DataError:
        raise
    except Exception as e:  # missing files, failed download, corrupt archive: all need the same fix
        why = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        tried = "could not be downloaded" if download else "data.download=false"
        raise DataError(f"data set {name!r} is not available under {root} ({tried}; {why}). "
                        f"{_where_to_put(name, root, tvd)}") from None
    return splits[0], splits[1], classes


# ------------------------------------------------------------------------------- offline sets
def load_digits() -> tuple[Split, tuple[str, ...]]:
    """scikit-learn's bundled 8x8 digits (1,797 images, values 0..16) as uint8 8x8x1 images."""
    import gzip
    import importlib.util

    # scikit-learn's own file, read as its load_digits reads it (np.loadtxt of the gzipped CSV: 64 pixels, then
    # the label) without importing scikit-learn (2.5 s of every digits run's start-up).
    spec = importlib.util.find_spec("sklearn")
    found = [os.path.join(d, "datasets", "data", "digits.csv.gz") for d in (spec and spec.submodule_search_locations or ())]
    path = next((f for f in found if os.path.exists(f)), None)
    if path is None:  # (a scikit-learn that keeps it elsewhere)
        from sklearn.datasets import load_digits as sk_digits

        d = sk_digits()
        pixels, target = d.data, d.target
    else:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            data = np.loadtxt(f, delimiter=",")
        pixels, target = data[:, :-1], data[:, -1]
    images = np.round(pixels.reshape(-1, 8, 8) * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return Split(images, target.astype(np.int32)), tuple(str(i) for i in range(10))


def make_toy(num_examples: int, seed: int) -> Split:
    """Seed 003's 2-D set: two Gaussian blobs (20%) and two concentric circles (60% outer, 20% inner),
    scaled and moved below the blobs. Points are float32 'images' of shape 1x1x2."""
    from sklearn.datasets import make_blobs, make_circles  # (scikit-learn: see load_digits)

    x, y = make_blobs(n_samples=int(num_examples * 0.2), n_features=2, centers=2, cluster_std=1.9, random_state=seed)
    n_outer = int(num_examples * 0.6)
    n_inner = num_examples - int(num_examples * 0.2) - n_outer  # == int(0.2 n) when n is a multiple of 5
    x1, y1 = make_circles(n_samples=(n_outer, n_inner), noise=0.05, factor=0.1,
                          random_state=seed)
    x1 = x1 * 3 + np.array([2.5, -7.0])
    feats = np.concatenate([x, x1]).astype(np.float32)
    return Split(feats[:, None, None, :], np.concatenate([y, y1]).astype(np.int32))


def make_synthetic(num_examples: int, shape, num_classes: int, seed: int) -> Split:
    """Random uint8 images that are learnable: each class is a fixed random pattern plus noise."""
    rng = np.random.default_rng(seed)
    protos = rng.integers(0, 256, size=(num_classes, *shape), dtype=np.uint8)
    labels = rng.integers(0, num_classes, size=num_examples).astype(np.int32)
    noise = rng.integers(0, 256, size=(num_examples, *shape), dtype=np.uint8)
    images = (protos[labels].astype(np.uint16) * 3 + noise) // 4
    return Split(images.astype(np.uint8), labels)


def _train_test(split: Split, test_fraction: float, seed: int) -> tuple[Split, Split]:
    n = len(split.labels)
    n_train = int((1.0 - test_fraction) * n)  # as seed 003: int(0.8 * len(dataset))
    perm = _permutation(n, seed)
    a, b = perm[:n_train], perm[n_train:]
    return Split(split.images[a], split.labels[a]), Split(split.images[b], split.labels[b])


def _channel_stats(images: np.ndarray, scale: float) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x = images.reshape(-1, images.shape[-1]).astype(np.float64) * scale
    return tuple(float(v) for v in x.mean(0)), tuple(float(max(v, 1e-6)) for v in x.std(0))


def to_channels(split: Split, channels: int, name: str) -> Split:
    """``split``'s images with ``channels`` channels, as PIL converts your own images (data.channels): gray
    repeated to RGB ("L" -> "RGB"), RGB to gray by ITU-R 601-2 luma ("RGB" -> "L", PIL's integer rounding)."""
    images = split.images
    have = images.shape[-1]
    if images.dtype != np.uint8 or (have, channels) not in ((1, 3), (3, 1)):
        raise DataError(f"data.channels={channels}: {name} holds {have}-channel "
                        f"{'images' if images.dtype == np.uint8 else 'features, not images'}; data.channels converts "
                        f"1-channel (gray) images to 3 and 3-channel (RGB) ones to 1; leave it unset (null)")
    if channels == 3:
        return Split(np.repeat(images, 3, axis=-1), split.labels)
    gray = np.empty(images.shape[:-1] + (1,), np.uint8)
    for i in range(0, len(images), 4096):  # (in chunks: the 32-bit sums of a whole set would be 4x its size)
        x = images[i:i + 4096].astype(np.uint32)
        gray[i:i + 4096, ..., 0] = (x[..., 0] * 19595 + x[..., 1] * 38470 + x[..., 2] * 7471 + 0x8000) >> 16
    return Split(gray, split.labels)


def load(cfg) -> Dataset:
    """A built-in data set; ``cfg`` is a ``DataConfig`` (or anything with its fields). Your own images
    (data.kind=image_folder or hf) are ``vision_train.data.files``' (``data.load`` picks)."""
    if getattr(cfg, "kind", "builtin") != "builtin":
        raise ValueError(f"data.kind={cfg.kind}: sources.load reads the built-in sets; use vision_train.data.load")
    name, scale = cfg.name, 1.0 / 255
    if name in STATS:
        train, test, classes = load_torchvision(name, cfg.root, download=cfg.download)
    elif name == "digits":
        full, classes = load_digits()
        train, test = _train_test(full, cfg.test_fraction, cfg.split_seed)
    elif name == "toy":
        full, classes, scale = make_toy(cfg.num_examples, cfg.split_seed), ("0", "1"), 1.0
        train, test = _train_test(full, cfg.test_fraction, cfg.split_seed)
    elif name == "synthetic":
        full = make_synthetic(cfg.num_examples, tuple(cfg.image_shape), cfg.num_classes, cfg.split_seed)
        classes = tuple(f"class_{i}" for i in range(cfg.num_classes))
        train, test = _train_test(full, cfg.test_fraction, cfg.split_seed)
    else:
        raise DataError(f"unknown data set {name!r}")
    train, val = split_off(train, cfg.val_size, cfg.split_seed, "validation")
    if len(test.labels) == 0:
        raise DataError(f"the {name} test split is empty; raise data.test_fraction (now {cfg.test_fraction})")
    stored = train.images  # (gray statistics hold for gray repeated to RGB: computed on the stored images)
    want = getattr(cfg, "channels", None)  # data.channels (null: as stored)
    if want is not None and want != stored.shape[-1]:
        train, test = to_channels(train, want, name), to_channels(test, want, name)
        val = None if val is None else to_channels(val, want, name)
    channels = train.images.shape[-1]

    if cfg.mean is not None:
        mean, std = tuple(cfg.mean), tuple(cfg.std)
    elif name in STATS and len(STATS[name][0]) in (1, channels):
        mean, std = STATS[name]
    else:
        mean, std = _channel_stats(stored if stored.shape[-1] == 1 else train.images, scale)
    if len(mean) == 1 and channels > 1:
        mean, std = mean * channels, std * channels
    if len(mean) != channels or len(std) != channels:
        raise DataError(f"data.mean/data.std have {len(mean)}/{len(std)} values but {name} images have "
                        f"{channels} channels; give one value per channel (or one for all)")
    return Dataset(name, train, val, test, classes, mean, std, scale)
