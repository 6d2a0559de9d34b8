"""Your own images as data sets: image folders (torchvision's ImageFolder layout) and Hugging Face datasets.

    imageset = open_images(cfg.data)       # scan and check (every bad-input error), split, classes
    plan(cfg.data, imageset)               # "cache" (decoded once, device-resident) or "stream" (Grain)
    load_cached(imageset, cfg.data)        # a sources.Dataset of memory-mapped uint8 arrays

A split is a ``Records``: random access to (uint8 image (S, S, C), int32 label), decoded with PIL the eval way
(EXIF orientation applied, converted to the channel count, the shorter side resized to S, center-cropped).
It holds paths (or a memory-mapped Hugging Face dataset), never an open file, so it pickles to Grain's
worker processes.

The decoded cache of a set lives in ``<cache root>/<key>/`` (``<root>/.vision_train_cache`` beside a folder,
``~/.cache/vision_train/data`` when that cannot be written or for Hugging Face datasets, or
``data.cache_dir``): ``<split>.npy`` (N, S, S, C) uint8, ``<split>_labels.npy`` and ``index.json`` (classes,
statistics, the files left out). The key hashes what the bytes depend on: every file's path, size and
modification time (a Hugging Face dataset's fingerprint), data.image_size, data.channels and the split
keys. It is written into a temporary directory renamed into place when complete, so a decode killed half
way leaves nothing a later run trusts. Once it is, the caches of the same data set and settings made before a
file changed are removed (one line says how much that freed), except those another process is reading.

A folder's listing holds each real file once: links to a folder above (``ln -s . root/again``) are not followed,
and a file reached again through a link is kept at its first path in the (sorted) walk; one line counts both.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import shutil
import socket
import sys
import threading
import time
import urllib.parse
import urllib.request
import uuid
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from tqdm import tqdm

try:
    import fcntl
except ImportError:  # (not POSIX: caches are removed without asking whether another process reads them)
    fcntl = None

from ..errors import ConfigError, DataError, remove_quietly, write_text
from . import sources

log = logging.getLogger(__name__)

CACHE_FORMAT = 1          # bump when the same files would decode to other bytes (a new resize, say)
GB = 1e9                  # data.cache_max_gb is in units of 10^9 bytes
STATS_SAMPLE = 10_000     # streamed sets: statistics from a deterministic sample of this many training images
VAL_DIRS = ("val", "valid", "validation")
SHOW = 5                  # bad files named in the one line; the rest are counted
# File name endings PIL can open; other files (and hidden ones) are ignored and counted.
IMAGE_EXTENSIONS = frozenset(ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)
EXAMPLE_TREE = ("expected <root>/train/<class>/<image> (optional val/ and test/ beside train/, e.g. pets/train/cat/1.jpg "
                "pets/train/dog/2.png pets/test/cat/3.jpg), or <root>/<class>/<image> split by data.val_size and "
                "data.test_size")


# ----------------------------------------------------------------------------------------- decoding
def fit(im: Image.Image, size: int, channels: int) -> np.ndarray:
    """``im`` the eval way: EXIF orientation applied, converted to ``channels`` (3: RGB, 1: grayscale), the
    shorter side resized to ``size`` and the center ``size`` x ``size`` cropped, in one resampling."""
    im = ImageOps.exif_transpose(im)
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):  # 16-bit and float grayscale to 8 bits
        a = np.asarray(im, np.float64)
        if im.mode.startswith("I;16") or a.max() > 255:
            a = a / 257.0  # 65535 -> 255
        elif im.mode == "F" and a.max() <= 1.0:
            a = a * 255.0
        im = Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8), "L")
    if im.mode == "PA" or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")  # (PIL warns when a palette with transparency goes straight to RGB)
    target = "RGB" if channels == 3 else "L"
    if im.mode != target:
        im = im.convert(target)
    w, h = im.size
    s = min(w, h)
    box = ((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2)
    # PIL's bilinear filter widens its support when it shrinks (antialiased, as torchvision's Resize).
    im = im.resize((size, size), Image.Resampling.BILINEAR, box=box)
    a = np.asarray(im, np.uint8)
    return a[..., None] if a.ndim == 2 else a


def decode(source, size: int, channels: int) -> np.ndarray:
    """Open ``source`` (a path or a file object) and ``fit`` it. Raises whatever PIL raises for a bad file."""
    with Image.open(source) as im:
        if im.format == "JPEG":  # decode at 1/2, 1/4 or 1/8 scale when that still covers size x size (much faster)
            im.draft("RGB" if channels == 3 else "L", (size, size))
        return fit(im, size, channels)


_warned: set[str] = set()


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0][:120] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


class Records(abc.ABC):
    """One split: ``records[i] -> (uint8 image (S, S, C), int32 label)``; ``labels`` without decoding.

    An image that fails to decode here (a truncated file that passed the scan) does not stop a run: the next
    readable example takes its place (the same one every time, so the order stays a function of the seed),
    and a warning names the file once per process."""

    def __init__(self, labels: np.ndarray, size: int, channels: int):
        self.labels = np.asarray(labels, np.int32)
        self.size, self.channels = size, channels

    def __len__(self) -> int:
        return len(self.labels)

    @abc.abstractmethod
    def name(self, i: int) -> str:
        """Example ``i``'s file (or row), for messages."""

    @abc.abstractmethod
    def read(self, i: int) -> np.ndarray:
        """Example ``i``'s image; raises when it cannot be decoded."""

    def __getitem__(self, i):
        n = len(self)
        i = int(i)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} examples")
        for k in range(n):
            j = (i + k) % n
            try:
                return self.read(j), self.labels[j]
            except Exception as e:  # noqa: BLE001 (PIL raises OSError, SyntaxError, ValueError... for damaged files)
                name = self.name(j)
                if name not in _warned:
                    _warned.add(name)
                    log.warning("warning: cannot decode %s (%s); the next readable example takes its place",
                                name, _reason(e))
        raise DataError(f"none of the {n} images of this split can be decoded")

    @abc.abstractmethod
    def subset(self, rows: np.ndarray) -> Records:
        """The examples at ``rows``, in that order."""


class FileRecords(Records):
    def __init__(self, paths, labels, size: int, channels: int):
        super().__init__(labels, size, channels)
        self.paths = tuple(paths)

    def name(self, i: int) -> str:
        return self.paths[i]

    def read(self, i: int) -> np.ndarray:
        return decode(self.paths[i], self.size, self.channels)

    def subset(self, rows) -> FileRecords:
        return FileRecords([self.paths[r] for r in rows], self.labels[rows], self.size, self.channels)


class HFRecords(Records):
    """Rows of a Hugging Face dataset whose image column is read undecoded ({"bytes", "path"}) and decoded
    here. The dataset is memory-mapped from its Arrow files, so it pickles as their paths."""

    def __init__(self, dataset, rows, image_key: str, labels, size: int, channels: int, name: str):
        super().__init__(labels, size, channels)
        self.dataset, self.rows, self.image_key, self.set_name = dataset, np.asarray(rows, np.int64), image_key, name

    def name(self, i: int) -> str:
        return f"{self.set_name} row {int(self.rows[i])}"

    def read(self, i: int) -> np.ndarray:
        value = self.dataset[int(self.rows[i])][self.image_key]
        if value is None:
            raise ValueError("no image")
        if value.get("bytes"):
            return decode(io.BytesIO(value["bytes"]), self.size, self.channels)
        return decode(value["path"], self.size, self.channels)

    def subset(self, rows) -> HFRecords:
        return HFRecords(self.dataset, self.rows[rows], self.image_key, self.labels[rows], self.size, self.channels,
                         self.set_name)


# ----------------------------------------------------------------------------------------- the set
@dataclass
class ImageSet:
    name: str
    splits: dict[str, Records]         # "train", optional "val", "test"
    class_names: tuple[str, ...]
    shape: tuple[int, int, int]        # (S, S, C)
    key: str                           # what the decoded bytes depend on (the cache's directory name)
    cache_root: Path | None            # None: nowhere writable (nothing is cached)
    bad: tuple[str, ...] = ()          # "path (why)" of the files the scan left out
    num_files: int = 0                 # image files found (bad ones included)
    workers: int = 0
    scale: float = 1.0 / 255
    family: str = ""                   # the set and settings, not the files: a cache of this family under another
    #                                    key was made before a file changed (removed once this key's is complete)
    _stats: tuple | None = field(default=None, repr=False)

    def decoded_bytes(self) -> int:
        return sum(len(r) for r in self.splits.values()) * math.prod(self.shape)

    @property
    def mean(self) -> tuple[float, ...]:
        return self.stats()[0]

    @property
    def std(self) -> tuple[float, ...]:
        return self.stats()[1]

    def stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and std of the training images in [0, 1] units: data.mean/std when given, else
        from the decoded cache (every image), else a deterministic sample of up to ``STATS_SAMPLE``
        training images, decoded once and kept beside the cache."""
        if self._stats is None:
            path = self.cache_root / f"{self.key}.stats.json" if self.cache_root else None
            if path is not None and path.is_file():
                saved = json.loads(path.read_text())
                self._stats = (tuple(saved["mean"]), tuple(saved["std"]))
            else:
                train = self.splits["train"]
                n = len(train)
                rows = np.arange(n) if n <= STATS_SAMPLE else np.sort(
                    np.random.default_rng(0).choice(n, STATS_SAMPLE, replace=False))
                acc = _Moments(self.shape[-1])
                t0 = time.time()
                with ThreadPoolExecutor(max(1, self.workers)) as pool:
                    for image, _ in pool.map(train.__getitem__, rows.tolist()):
                        acc.add(image[None])
                self._stats = acc.result()
                log.info("statistics of %s from %d training images (%.1f s)", self.name, len(rows), time.time() - t0)
                if path is not None:
                    _try_write(path, json.dumps({"mean": self._stats[0], "std": self._stats[1], "images": len(rows)}))
        return self._stats


class _Moments:
    """Per-channel mean and (population) std of uint8 images in [0, 1] units, accumulated in float64."""

    def __init__(self, channels: int):
        self.s, self.ss, self.n = np.zeros(channels), np.zeros(channels), 0

    def add(self, images: np.ndarray) -> None:
        x = images.reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
        self.s += x.sum(0)
        self.ss += (x * x).sum(0)
        self.n += len(x)

    def result(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        mean = self.s / max(self.n, 1)
        var = np.maximum(self.ss / max(self.n, 1) - mean * mean, 0.0)
        return tuple(float(v) for v in mean), tuple(float(max(v, 1e-6)) for v in np.sqrt(var))


def _key(*parts) -> str:
    return hashlib.sha1(json.dumps([CACHE_FORMAT, *parts], sort_keys=True).encode()).hexdigest()[:20]


def _try_write(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, text, "the data cache")
    except OSError as e:
        log.debug("could not write %s: %s", path, e)


def _writable(d: Path) -> bool:
    probe = d / f".probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
        return True
    except OSError:
        return False


def home_cache() -> Path:
    return Path.home() / ".cache" / "vision_train" / "data"


def _cache_root(cfg, beside: Path | None) -> Path | None:
    if cfg.cache_dir:
        return Path(os.path.expanduser(cfg.cache_dir)).absolute()
    if beside is not None:
        d = beside / ".vision_train_cache"
        if _writable(d):
            return d
        log.info("%s cannot be written: the decoded cache goes to %s", beside, home_cache())
    return home_cache() if _writable(home_cache()) else None


def _hold_out(n: int, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows kept and held out: the last ``count`` of a seeded permutation (as sources.split_off)."""
    perm = sources._permutation(n, seed)
    return perm[: n - count], perm[n - count:]


def _split(splits: dict[str, Records], cfg, where: str) -> dict[str, Records]:
    """Hold test (data.test_size, else data.test_fraction) and then val (data.val_size) out of train where
    the data have no such split of their own."""
    train = splits["train"]
    if "test" not in splits:
        n = len(train)
        count = cfg.test_size or n - int((1.0 - cfg.test_fraction) * n)
        if count >= n:
            raise ConfigError("data.test_size" if cfg.test_size else "data.test_fraction",
                              cfg.test_size or cfg.test_fraction,
                              f"{where} has {n} training images, too few to hold out {count} for test; hold out fewer")
        if count == 0:
            raise ConfigError("data.test_fraction", cfg.test_fraction, f"{where} has {n} training images and no test "
                              f"split: raise data.test_fraction or set data.test_size")
        keep, held = _hold_out(n, count, cfg.split_seed)
        splits["test"], train = train.subset(held), train.subset(keep)
        log.info("%s has no test split: %d of its %d training images are held out for test (%s; data.split_seed=%d)",
                 where, count, n, f"data.test_size={cfg.test_size}" if cfg.test_size else
                 f"data.test_fraction={cfg.test_fraction}", cfg.split_seed)
    if "val" not in splits and cfg.val_size:
        n = len(train)
        if cfg.val_size >= n:
            raise ConfigError("data.val_size", cfg.val_size, f"{where} has {n} training images left to hold "
                              f"validation images out of; lower data.val_size")
        keep, held = _hold_out(n, cfg.val_size, cfg.split_seed)
        splits["val"], train = train.subset(held), train.subset(keep)
    splits["train"] = train
    return {k: splits[k] for k in ("train", "val", "test") if k in splits}


def bad_line(bad, total: int, where: str) -> str:
    shown = ", ".join(bad[:SHOW]) + (f" and {len(bad) - SHOW} more" if len(bad) > SHOW else "")
    return f"{len(bad)} of {total} image files of {where} cannot be read and are left out: {shown}"


def check_bad(bad, total: int, max_fraction: float, where: str) -> None:
    """Log the files left out in one line; past ``max_fraction`` stop with that line."""
    if not bad:
        return
    line = bad_line(list(bad), total, where)
    if len(bad) > max_fraction * total:
        raise ConfigError("data.max_bad_fraction", max_fraction, f"{line}; repair or remove them, or raise "
                          f"data.max_bad_fraction (the fraction of unreadable images a run accepts)")
    log.warning("warning: %s", line)


# ------------------------------------------------------------------------------------ image folders
def _visible(name: str) -> bool:
    return not name.startswith(".") and name not in ("Thumbs.db", "desktop.ini", "__MACOSX")


def _above(real: str, chain: tuple[str, ...]) -> bool:
    """Whether the folder whose real path is ``real`` is one of the folders in ``chain`` (the real paths of the
    folders the walk is in) or holds one of them: a link to it leads back to where the walk already is."""
    inside = real.rstrip(os.sep) + os.sep
    return any(c == real or c.startswith(inside) for c in chain)


class _Found:
    """What a listing of an image folder sets aside: files ignored (hidden, not images by their name), folders
    beside the splits, links to a folder above (not followed: they would never end, or list everything again),
    and duplicates (a file reached a second time, through a link: the first in the walk's order keeps it)."""

    def __init__(self, root: Path):
        self.root = root
        self.ignored: list[str] = []
        self.beside: list[str] = []                   # folders beside train/, val/ and test/
        self.loops: list[str] = []
        self.duplicates: list[tuple[str, str]] = []   # (path, the path that keeps the file)
        self.first: dict[str, str] = {}               # real path -> the path that lists it

    def listed(self, path: str, real: str) -> bool:
        """Whether ``path`` (real path ``real``) is the first path of its file; else a duplicate."""
        first = self.first.setdefault(real, path)
        if first != path:
            self.duplicates.append((path, first))
            return False
        return True

    def line(self) -> str | None:
        """The one info line of what is set aside, or None."""
        rel = lambda p: os.path.relpath(p, self.root)
        n = lambda count, one, many: f"{count} {one if count == 1 else many}"
        parts = []
        if self.ignored:
            parts.append(f"{n(len(self.ignored), 'file', 'files')} hidden or not images by their name (e.g. "
                         f"{', '.join(rel(p) for p in self.ignored[:3])})")
        if self.beside:
            parts.append(f"{n(len(self.beside), 'folder', 'folders')} beside train/, val/ and test/ "
                         f"({', '.join(rel(p) for p in self.beside[:3])}{' ...' if len(self.beside) > 3 else ''})")
        if self.loops:
            parts.append(f"{n(len(self.loops), 'link', 'links')} to a folder above, not followed (it would list the "
                         f"same images again: {', '.join(rel(p) for p in self.loops[:3])}"
                         f"{' ...' if len(self.loops) > 3 else ''})")
        if self.duplicates:
            parts.append(f"{n(len(self.duplicates), 'duplicate', 'duplicates')} skipped: a file reached again "
                         f"through a link, kept at its first path (e.g. "
                         f"{', '.join(f'{rel(p)} = {rel(q)}' for p, q in self.duplicates[:2])})")
        return f"ignored under {self.root}: {'; '.join(parts)}" if parts else None


def _folders(folder: Path, chain: tuple[str, ...], found: _Found) -> list[str]:
    """The visible subfolders of ``folder`` (sorted), leaving out links to a folder above (counted)."""
    names = []
    with os.scandir(folder) as it:
        for e in sorted(it, key=lambda e: e.name):
            if e.is_dir() and _visible(e.name):
                if e.is_symlink() and _above(os.path.realpath(e.path), chain):
                    found.loops.append(e.path)
                else:
                    names.append(e.name)
    return names


def _walk(folder: Path, chain: tuple[str, ...], found: _Found) -> list[tuple[str, int, int]]:
    """Image files under ``folder`` (recursively, sorted, hidden ones skipped) as (path, size, mtime_ns), each
    real file once (``found.listed``); ``chain``: the real paths of the folders above. Other files, links to a
    folder above and duplicates go to ``found``."""
    out = []
    real = os.path.realpath(folder)
    chain = (*chain, real)
    with os.scandir(folder) as it:
        entries = sorted(it, key=lambda e: e.name)
    for e in entries:
        if not _visible(e.name):
            found.ignored.append(e.path)
        elif e.is_dir():
            if e.is_symlink() and _above(os.path.realpath(e.path), chain):
                found.loops.append(e.path)
            else:
                out += _walk(Path(e.path), chain, found)
        elif os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS:
            # (a link's real path is looked up; a plain file's is its folder's real path and its name)
            if not found.listed(e.path, os.path.realpath(e.path) if e.is_symlink() else os.path.join(real, e.name)):
                continue
            try:
                st = e.stat()
                out.append((e.path, st.st_size, st.st_mtime_ns))
            except FileNotFoundError:  # a dangling link
                out.append((e.path, -1, 0))
        else:
            found.ignored.append(e.path)
    return out


def check_file(path: str, size: int) -> str | None:
    """Why ``path`` is not a readable image (empty, not an image, truncated), or None. Reads the header and,
    for JPEG and PNG, the file's end (a truncated one lacks its end marker): no decoding."""
    if size < 0:
        return "a link to nothing"
    if size == 0:
        return "empty file"
    try:
        with Image.open(path) as im:
            fmt = im.format
    except Exception as e:  # noqa: BLE001 (UnidentifiedImageError, or a damaged header)
        return "not an image" if isinstance(e, Image.UnidentifiedImageError) else _reason(e)
    marker = {"JPEG": b"\xff\xd9", "MPO": b"\xff\xd9", "PNG": b"IEND"}.get(fmt)
    if marker is not None:
        try:
            with open(path, "rb") as f:
                f.seek(max(0, size - 4096))
                tail = f.read()
        except OSError as e:
            return _reason(e)
        if marker not in tail:
            return "truncated"
    return None


def _scan(files: list[tuple[str, int, int]], root: Path, cache_root: Path | None, workers: int) -> dict[str, str]:
    """{path: why} of the files ``check_file`` refuses; remembered per listing (paths, sizes, times)."""
    path = cache_root / f"scan-{_key('scan', [(os.path.relpath(p, root), s, t) for p, s, t in files])}.json" \
        if cache_root else None
    if path is not None and path.is_file():
        return {str(root / p): why for p, why in json.loads(path.read_text())["bad"].items()}
    t0, reasons = time.time(), []
    with ThreadPoolExecutor(max(1, workers)) as pool, \
            tqdm(total=len(files), unit="file", desc=f"checking {root.name}", leave=False) as bar:
        for start in range(0, len(files), 4096):  # (blocks: a bounded number of pending futures)
            block = files[start:start + 4096]
            reasons += pool.map(lambda f: check_file(f[0], f[1]), block)
            bar.update(len(block))
    bad = {p: why for (p, _, _), why in zip(files, reasons) if why}
    log.info("checked %d files under %s (%.1f s)", len(files), root, time.time() - t0)
    if path is not None:
        _try_write(path, json.dumps({"bad": {os.path.relpath(p, root): why for p, why in bad.items()}}))
    return bad


def open_folder(cfg) -> ImageSet:
    try:
        return _open_folder(cfg)
    except OSError as e:  # a folder or file that cannot be listed or read (permissions, a broken disk)
        if e.filename is None:
            raise
        raise DataError(f"data.root={cfg.root!r}: cannot read {e.filename} ({e.strerror}); make it readable or "
                        f"move it out of the folder") from None


_TAR = "mkdir -p {t} && tar -xf {a} -C {t}"
ARCHIVES = {".zip": "unzip {a} -d {t}", ".7z": "7z x {a} -o{t}", ".rar": "mkdir -p {t} && unrar x {a} {t}/",
            **{s: _TAR for s in (".tar", ".tgz", ".tar.gz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar.zst")}}


def _not_a_folder(given: str, root: Path) -> DataError:
    """data.root names a file: an archive to unpack (the command for its kind), or some other file."""
    name = root.name.lower()
    suffix = max((s for s in ARCHIVES if name.endswith(s)), key=len, default=None)
    if suffix is None:
        return DataError(f"data.root={given!r}: is a file, not a folder; unpack it if it is an archive, "
                         f"and set data.root to the folder of images; {EXAMPLE_TREE}")
    target = root.with_name(root.name[: -len(suffix)] or "images")
    command = ARCHIVES[suffix].format(a=root, t=target)
    return DataError(f"data.root={given!r}: is a file, not a folder; unpack it ({command}) and set "
                     f"data.root to the folder of images it holds (e.g. data.root={target}); {EXAMPLE_TREE}")


def _open_folder(cfg) -> ImageSet:
    given = cfg.root
    if not str(given).strip():
        raise ConfigError("data.root", given, "give the folder of your images, e.g. data.root=~/pets holding "
                          "train/<class>/<image> (optional val/ and test/), or <class>/<image> to be split")
    root = Path(os.path.expanduser(given)).absolute()
    if not root.is_dir():
        if root.exists():
            raise _not_a_folder(given, root)
        raise DataError(f"data.root={given!r}: no such folder ({root}); {EXAMPLE_TREE}")
    found = _Found(root)
    top_chain = (os.path.realpath(root),)
    top = _folders(root, top_chain, found)  # (a link to the root or above is neither a split nor a class)
    split_layout = "train" in top
    if split_layout:
        val = next((d for d in VAL_DIRS if d in top), None)
        dirs = {"train": root / "train", **({"val": root / val} if val else {}),
                **({"test": root / "test"} if "test" in top else {})}
    else:
        dirs = {"train": root}
    where = f"data.root={given!r}"
    found.beside += [str(root / d) for d in top if split_layout and root / d not in dirs.values()]
    listing: dict[str, dict[str, list]] = {}
    only_duplicates: dict[tuple[str, str], str] = {}  # (split, class) -> a path listing its first file
    for split, folder in dirs.items():
        chain = top_chain if folder == root else (*top_chain, os.path.realpath(folder))
        classes = top if folder == root else _folders(folder, chain, found)
        if not classes:
            what = "is empty" if not os.listdir(folder) else "holds no class folders"
            raise DataError(f"{where}: {folder} {what}; {EXAMPLE_TREE}")
        with os.scandir(folder) as it:
            found.ignored += sorted(e.path for e in it if not e.is_dir())
        listing[split] = {}
        for c in classes:
            before = len(found.duplicates)
            listing[split][c] = _walk(folder / c, chain, found)
            if not listing[split][c] and len(found.duplicates) > before:
                only_duplicates[split, c] = found.duplicates[before][1]
    class_names = tuple(listing["train"])
    for split, by_class in listing.items():
        unknown = [c for c in by_class if c not in class_names]
        if unknown:
            raise DataError(f"{where}: {dirs[split].name}/ has class folders that train/ does not have "
                            f"({', '.join(unknown[:SHOW])}); the classes are train/'s folders "
                            f"({', '.join(class_names[:10])}{' ...' if len(class_names) > 10 else ''}): rename "
                            f"or remove them")
        for c, images in by_class.items():
            if not images and (split, c) in only_duplicates:
                raise DataError(f"{where}: the class folder {dirs[split] / c} holds only images already listed, "
                                f"reached again through a link (e.g. the file of "
                                f"{os.path.relpath(only_duplicates[split, c], root)}); each file is listed once, "
                                f"so remove the link or give the folder images of its own")
            if not images:
                raise DataError(f"{where}: the class folder {dirs[split] / c} holds no images; add images to it "
                                f"or remove the folder (readable formats: .jpg, .png, .webp, .bmp, .tif, ...)")
    line = found.line()
    if line:
        log.info("%s", line)

    every = [f for by_class in listing.values() for images in by_class.values() for f in images]
    cache_root = _cache_root(cfg, root)
    bad = _scan(every, root, cache_root, cfg.workers)
    bad_lines = [f"{os.path.relpath(p, root)} ({why})" for p, why in bad.items()]
    check_bad(bad_lines, len(every), cfg.max_bad_fraction, where)

    splits: dict[str, Records] = {}
    for split, by_class in listing.items():
        paths, labels = [], []
        for c, images in by_class.items():
            good = [p for p, _, _ in images if p not in bad]
            if not good:
                raise DataError(f"{where}: the class folder {dirs[split] / c} holds no readable images "
                                f"({len(images)} unreadable); replace them or remove the folder")
            paths += good
            labels += [class_names.index(c)] * len(good)
        splits[split] = FileRecords(paths, labels, cfg.image_size, cfg.channels)
    splits = _split(splits, cfg, where)
    settings = (cfg.image_size, cfg.channels, cfg.val_size, cfg.test_size, cfg.test_fraction, cfg.split_seed)
    key = _key("image_folder", *settings, {s: [(os.path.relpath(p, root), size, t) for c in by_class.values()
                                               for p, size, t in c] for s, by_class in listing.items()})
    return ImageSet(cfg.name or root.name, splits, class_names, (cfg.image_size, cfg.image_size, cfg.channels), key,
                    cache_root, tuple(bad_lines), len(every), cfg.workers,
                    family=_key("image_folder family", os.path.realpath(root), *settings))


# -------------------------------------------------------------------------------- Hugging Face
HUB_PROBE_S = 3.0  # how long a Hugging Face dataset id waits to learn whether the hub can be reached


def _import_datasets():
    """``datasets`` (about a second to import; only data.kind=hf needs it), without the INFO lines it logs while
    it imports ("JAX version ... available.") reaching the console; DATASETS_VERBOSITY still rules."""
    if "datasets" not in sys.modules and not os.environ.get("DATASETS_VERBOSITY"):
        logging.getLogger("datasets").setLevel(logging.WARNING)  # (datasets' own default, set before it is)
    import datasets

    return datasets


def _hub_unreachable() -> str | None:
    """Why the Hugging Face hub (HF_ENDPOINT, or the proxy the environment names for it) cannot be reached: a
    TCP connection within ``HUB_PROBE_S`` seconds, name lookup included; None when it can. (Its client retries
    an unreachable hub for about 24 s, five times, with two lines each.)"""
    from huggingface_hub import constants

    url = urllib.parse.urlsplit(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    proxy = urllib.request.getproxies().get(url.scheme) or urllib.request.getproxies().get("all")
    if proxy and not urllib.request.proxy_bypass(host):
        p = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = p.hostname or host, p.port or (443 if p.scheme == "https" else 80)
    failure: list[str] = ["no answer"]

    def probe():
        try:
            socket.create_connection((host, port), timeout=HUB_PROBE_S).close()
            failure.clear()
        except BaseException as e:  # noqa: BLE001 (OSError, socket.gaierror; whatever a patched socket raises)
            failure[:] = [_reason(e)]

    thread = threading.Thread(target=probe, name="hub-probe", daemon=True)  # (a name lookup has no timeout)
    thread.start()
    thread.join(HUB_PROBE_S + 0.5)
    return f"{host}:{port} cannot be reached ({failure[0]})" if failure else None


@contextlib.contextmanager
def _hub_offline(datasets):
    """datasets and huggingface_hub in offline mode (as HF_HUB_OFFLINE=1): local caches only, no request made."""
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE
    constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE = saved


def _hf_unreachable(name: str, why: str) -> DataError:
    datasets = _import_datasets()  # (already imported by the caller)
    from huggingface_hub import constants

    folder = name.replace("/", "_")
    return DataError(
        f"data.name={name!r}: the Hugging Face dataset {name} could not be loaded from the hub "
        f"(https://huggingface.co/datasets/{name}) or from the local caches ({datasets.config.HF_DATASETS_CACHE}, "
        f"{constants.HF_HUB_CACHE}): {why}. To fetch it: on a machine with network run python -c "
        f"\"import datasets; datasets.load_dataset('{name}').save_to_disk('{folder}')\" (or hf download --repo-type "
        f"dataset {name} --local-dir {folder}), copy that folder here and set data.name=<that folder> (or copy its "
        f"HF_HOME cache here and set HF_HUB_OFFLINE=1)")


def _hf_load(cfg):
    datasets = _import_datasets()

    name = cfg.name
    if not str(name).strip():
        raise ConfigError("data.name", name, "give a Hugging Face dataset id (e.g. data.name=beans) or the path of a "
                          "dataset saved with save_to_disk")
    path = Path(os.path.expanduser(name))
    try:
        if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
            obj = datasets.load_from_disk(str(path))  # written by save_to_disk
        elif path.exists():
            obj = datasets.load_dataset(str(path.absolute()))  # a folder of data files: imagefolder, parquet, ...
        else:
            obj = None
    except Exception as e:  # noqa: BLE001 a damaged or unsupported local dataset
        raise DataError(f"data.name={name!r}: {path} is not a dataset datasets can read ({_reason(e)}); give a "
                        f"save_to_disk folder, a folder of data files, or a Hugging Face dataset id") from None
    if obj is None:
        # An unreachable hub: the local caches only, at once (offline mode), not the client's retries.
        unreachable = None if datasets.config.HF_HUB_OFFLINE else _hub_unreachable()
        try:
            if unreachable:
                with _hub_offline(datasets):
                    obj = datasets.load_dataset(name)
            else:
                obj = datasets.load_dataset(name)
        except Exception as e:  # noqa: BLE001 (offline, not cached, no such id: its client's many kinds)
            if not unreachable:
                why = _reason(e)
            elif isinstance(e, (ConnectionError, FileNotFoundError)):  # (offline mode's "not cached")
                why = f"it is not cached here and the hub {unreachable}"
            else:
                why = f"the hub {unreachable}, and reading the local cache failed ({_reason(e)})"
            raise _hf_unreachable(name, why) from None
    if isinstance(obj, datasets.Dataset):
        obj = {cfg.train_split: obj}
    display = path.name if path.exists() else name
    return obj, display, path.exists()


def open_hf(cfg) -> ImageSet:
    datasets = _import_datasets()

    obj, display, local = _hf_load(cfg)
    name = cfg.name
    if cfg.train_split not in obj:
        raise ConfigError("data.train_split", cfg.train_split, f"{name} has the splits {', '.join(obj)}; choose one")
    train = obj[cfg.train_split]
    for key, column in (("data.image_key", cfg.image_key), ("data.label_key", cfg.label_key)):
        if column not in train.column_names:
            raise ConfigError(key, column, f"{name} has no such column; its columns: {', '.join(train.column_names)}")
    feature = train.features[cfg.image_key]
    if not isinstance(feature, datasets.Image):
        images = [k for k, f in train.features.items() if isinstance(f, datasets.Image)]
        raise ConfigError("data.image_key", cfg.image_key, f"the column holds {type(feature).__name__} values, not "
                          f"images; {name}'s image columns: {', '.join(images) or 'none'}")
    label_feature = train.features[cfg.label_key]
    parts = {"train": train, "val": obj.get(cfg.val_split), "test": obj.get(cfg.test_split)}
    parts = {k: v for k, v in parts.items() if v is not None}

    raw = {}
    for split, ds in parts.items():
        for column in (cfg.image_key, cfg.label_key):
            if column not in ds.column_names:
                raise ConfigError("data.image_key" if column == cfg.image_key else "data.label_key", column,
                                  f"{name}'s {split} split has no such column; its columns: {', '.join(ds.column_names)}")
        raw[split] = ds.with_format("numpy", columns=[cfg.label_key])[cfg.label_key]
    if isinstance(label_feature, datasets.ClassLabel):
        class_names = tuple(label_feature.names)
        labels = {s: np.asarray(v, np.int64) for s, v in raw.items()}
    else:  # plain values (ints or strings): the classes are train's distinct values, sorted
        distinct = sorted(set(np.asarray(raw["train"]).tolist()))
        class_names = tuple(str(v) for v in distinct)
        index = {v: i for i, v in enumerate(distinct)}
        labels = {}
        for s, v in raw.items():
            values = np.asarray(v).tolist()
            unknown = sorted(map(str, set(values) - set(index)))
            if unknown:
                raise ConfigError("data.label_key", cfg.label_key, f"{name}'s {s} split has labels its train split "
                                  f"does not have ({', '.join(unknown[:SHOW])}); give a split with the same classes")
            labels[s] = np.asarray([index[x] for x in values], np.int64)
    for s, v in labels.items():
        if len(v) and (v.min() < 0 or v.max() >= len(class_names)):
            split_key = {"train": "data.train_split", "val": "data.val_split", "test": "data.test_split"}[s]
            raise ConfigError(split_key, getattr(cfg, split_key.split(".")[1]),
                              f"{name}'s {s} split has labels outside 0..{len(class_names) - 1} (unlabelled "
                              f"examples?); name a labelled split, or one that does not exist to hold it out of train")
        if len(v) == 0:
            raise DataError(f"data.name={name!r}: its {s} split is empty")

    undecoded = {s: ds.select_columns([cfg.image_key]).cast_column(cfg.image_key, datasets.Image(decode=False))
                 for s, ds in parts.items()}  # (a row read is its image's bytes only)
    splits = {s: HFRecords(undecoded[s], np.arange(len(labels[s])), cfg.image_key, labels[s], cfg.image_size,
                           cfg.channels, f"{display}[{s}]") for s in parts}
    splits = _split(splits, cfg, f"data.name={name!r}")
    settings = (cfg.image_key, cfg.label_key, cfg.train_split, cfg.val_split, cfg.test_split, cfg.image_size,
                cfg.channels, cfg.val_size, cfg.test_size, cfg.test_fraction, cfg.split_seed)
    key = _key("hf", name, {s: ds._fingerprint for s, ds in parts.items()}, *settings)
    where = os.path.realpath(os.path.expanduser(name)) if local else name
    return ImageSet(display, splits, class_names, (cfg.image_size, cfg.image_size, cfg.channels), key,
                    _cache_root(cfg, None), (), sum(len(r) for r in splits.values()), cfg.workers,
                    family=_key("hf family", where, *settings))


# ----------------------------------------------------------------------------------------- the API
def open_images(cfg) -> ImageSet:
    """Scan and check ``cfg`` (a DataConfig of kind image_folder or hf): every bad-input error is raised
    here, before anything compiles. Splits, class names and the cache key; statistics on first use."""
    if cfg.channels is None:  # (validate makes it 3; a DataConfig built in Python may leave it unset)
        cfg = dataclasses.replace(cfg, channels=3)
    if cfg.kind == "image_folder":
        s = open_folder(cfg)
    elif cfg.kind == "hf":
        s = open_hf(cfg)
    else:
        raise ConfigError("data.kind", cfg.kind, "open_images reads data.kind=image_folder or hf")
    if cfg.mean is not None:
        s._stats = _given_stats(cfg, s.shape[-1], s.name)
    return s


def _given_stats(cfg, channels: int, name: str):
    mean, std = tuple(cfg.mean), tuple(cfg.std)
    if len(mean) == 1 and channels > 1:
        mean, std = mean * channels, std * channels
    if len(mean) != channels or len(std) != channels:
        raise ConfigError("data.mean", list(cfg.mean), f"{name} images have {channels} channels (data.channels): give "
                          f"one value per channel in data.mean and data.std, or one for all")
    return mean, std


def _flag(value) -> str:
    return str(value).strip().lower()


def plan(cfg, imageset: ImageSet) -> str:
    """"cache" (decoded once into memory-mapped uint8, trained device-resident) or "stream" (Grain)."""
    stream, cache = _flag(cfg.stream), _flag(cfg.cache)
    if stream == "true":
        return "stream"
    if stream == "false":
        if cache == "false":
            raise ConfigError("data.cache", cfg.cache, "data.stream=false refuses to stream and data.cache=false "
                              "refuses to cache; allow one of them (auto)")
        return "cache"
    if cache in ("true", "false"):
        return "cache" if cache == "true" else "stream"
    return "cache" if imageset.decoded_bytes() <= cfg.cache_max_gb * GB else "stream"


def _remove_stale(root: Path, key: str) -> None:
    """Temporary directories of this key left by decodes on this host that were killed, and superseded caches
    whose removal was killed half way (any key)."""
    host = socket.gethostname()
    for d in [*root.glob(f".tmp-{key}-{host}-*"), *root.glob(".superseded-*")]:
        try:
            if d.name.startswith(".superseded-"):  # .superseded-<key>-<host>-<pid> (the key has no "-")
                where, pid = d.name.split("-", 2)[2].rsplit("-", 1)
                if where != host:
                    continue
                pid = int(pid)
            else:
                pid = int(d.name.split("-")[-2])
            os.kill(pid, 0)
        except ProcessLookupError:
            remove_quietly(d)
        except (ValueError, PermissionError, IndexError):
            pass


class _Hold:
    """An open descriptor of a cache's index.json under a shared lock, while its arrays are memory-mapped:
    ``_remove_superseded`` in another process (or this one) leaves that cache alone. Closed with the arrays."""

    def __init__(self, fd: int):
        weakref.finalize(self, os.close, fd)


def _hold(final: Path) -> _Hold | None:
    """Hold the complete cache ``final`` for reading; None when there is none (or it was just removed)."""
    index = final / "index.json"
    try:
        fd = os.open(index, os.O_RDONLY)
    except (FileNotFoundError, NotADirectoryError):
        return None
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)  # (waits only while a remover renames it away)
        except OSError:
            pass  # a file system without locks
    try:
        same = os.path.samestat(os.fstat(fd), os.stat(index))
    except OSError:
        same = False
    if not same:  # removed while this process waited for the lock
        os.close(fd)
        return None
    return _Hold(fd)


def _lock_to_remove(index: Path) -> int | None:
    """An exclusive lock on a cache's index.json (a descriptor to close; -1 where there are no locks), or None
    while another process holds the cache (``_hold``)."""
    if fcntl is None:
        return -1
    try:
        fd = os.open(index, os.O_RDWR)  # (NFS emulates flock with POSIX locks: an exclusive one needs write access)
    except OSError:
        try:
            fd = os.open(index, os.O_RDONLY)
        except OSError:
            return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError:
        pass  # a file system without locks: removed as on a system without them
    return fd


def _bytes_under(d: Path) -> int:
    total = 0
    for folder, _, names in os.walk(d):
        for n in names:
            try:
                total += os.lstat(os.path.join(folder, n)).st_size
            except OSError:
                pass
    return total


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e6:.3f} MB"


def _remove_superseded(imageset: ImageSet, final: Path) -> None:
    """Remove the complete caches of the same data set and settings as ``final`` (its family) but another key:
    made before a file changed, no run reads them again. Not those another process holds (``_hold``)."""
    if not imageset.family:
        return
    root, host = final.parent, socket.gethostname()
    removed, freed, busy = [], 0, 0
    try:
        entries = sorted(root.iterdir())
    except OSError:
        return
    for d in entries:
        if d == final or d.name.startswith(".") or d.is_symlink() or not d.is_dir():
            continue
        index = d / "index.json"
        try:
            if json.loads(index.read_text()).get("family") != imageset.family:
                continue
        except (OSError, ValueError, AttributeError):  # not a complete cache (or another program's folder)
            continue
        fd = _lock_to_remove(index)
        if fd is None:
            busy += 1
            continue
        try:
            size = _bytes_under(d)
            gone = root / f".superseded-{d.name}-{host}-{os.getpid()}"
            os.rename(d, gone)  # (at once out of every reader's sight; then removed at leisure)
        except OSError as e:
            log.debug("could not remove the superseded cache %s: %s", d, e)
            continue
        finally:
            if fd >= 0:
                os.close(fd)
        remove_quietly(gone)
        removed.append(d.name)
        freed += size
    if removed or busy:
        line = (f"removed {len(removed)} decoded cache{'s' if len(removed) != 1 else ''} of {imageset.name} made "
                f"before its files changed ({', '.join(removed)} in {root}): {_mb(freed)} freed") \
            if removed else f"kept the decoded caches of {imageset.name} made before its files changed"
        if busy:
            line += (f"; {busy} more {'is' if busy == 1 else 'are'} in use by another process and stay "
                     f"(a later run removes {'it' if busy == 1 else 'them'})" if removed else
                     f" ({busy} in {root}): in use by another process (a later run removes them)")
        log.info("%s", line)


def _decode_all(imageset: ImageSet, final: Path) -> None:
    """Decode every split into ``final`` (via a temporary directory renamed into place when complete)."""
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale(root, imageset.key)
    free = shutil.disk_usage(root).free
    if free < imageset.decoded_bytes() * 1.02 + 2**20:  # (a memory-mapped write past a full disk is a SIGBUS)
        raise DataError(f"the decoded images of {imageset.name} need {imageset.decoded_bytes() / GB:.2f} GB in {root} "
                        f"but {free / GB:.2f} GB are free; set data.cache_dir to a disk with room, or stream them "
                        f"(data.cache=false)")
    tmp = root / f".tmp-{imageset.key}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    tmp.mkdir()
    S, _, C = imageset.shape
    total = sum(len(r) for r in imageset.splits.values())
    log.info("decoding the %d images of %s once (%.2f GB at %dx%dx%d) into %s", total, imageset.name,
             imageset.decoded_bytes() / GB, S, S, C, final)
    t0, failed, index = time.time(), [], {"splits": {}}
    try:
        # Threads, not processes: PIL releases the GIL while it decodes and resizes, each result goes
        # straight into the memory-mapped array (nothing pickled back), and no process is forked from one
        # that has JAX's threads running.
        with ThreadPoolExecutor(max(1, imageset.workers)) as pool, \
                tqdm(total=total, unit="img", desc=f"decoding {imageset.name}", leave=False) as bar:
            for split, rec in imageset.splits.items():
                arr = np.lib.format.open_memmap(tmp / f"{split}.npy", mode="w+", dtype=np.uint8, shape=(len(rec), S, S, C))
                ok = np.ones(len(rec), bool)

                def one(i, rec=rec, arr=arr):
                    try:
                        arr[i] = rec.read(i)
                        return None
                    except Exception as e:  # noqa: BLE001 (a file damaged past what the scan sees)
                        return e

                for start in range(0, len(rec), 1024):  # (blocks: a bounded number of pending futures)
                    rows = range(start, min(start + 1024, len(rec)))
                    for i, err in zip(rows, pool.map(one, rows)):
                        if err is not None:
                            ok[i] = False
                            failed.append(f"{rec.name(i)} ({_reason(err)})")
                    bar.update(len(rows))
                arr.flush()
                if not ok.all():  # left out: the array without those rows
                    kept = np.lib.format.open_memmap(tmp / f"{split}.part.npy", mode="w+", dtype=np.uint8,
                                                     shape=(int(ok.sum()), S, S, C))
                    kept[:] = arr[ok]
                    kept.flush()
                    del arr, kept
                    os.replace(tmp / f"{split}.part.npy", tmp / f"{split}.npy")
                else:
                    del arr
                np.save(tmp / f"{split}_labels.npy", rec.labels[ok])
                index["splits"][split] = int(ok.sum())
        train = np.load(tmp / "train.npy", mmap_mode="r")
        acc = _Moments(C)
        for start in range(0, len(train), 4096):
            acc.add(np.asarray(train[start:start + 4096]))
        mean, std = acc.result()
        index.update(name=imageset.name, class_names=list(imageset.class_names), shape=[S, S, C], mean=mean, std=std,
                     bad=list(imageset.bad), failed=failed, key=imageset.key, family=imageset.family,
                     format=CACHE_FORMAT)
        (tmp / "index.json").write_text(json.dumps(index, indent=1))
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "index.json").is_file():
                raise
            remove_quietly(tmp)  # another process (a second host) finished the same cache first
    except BaseException:
        remove_quietly(tmp)
        raise
    dt = time.time() - t0
    log.info("decoded %d images in %.1f s (%.0f images/s); cached in %s", total, dt, total / max(dt, 1e-9), final)


def load_cached(imageset: ImageSet, cfg) -> sources.Dataset:
    """The set as an in-memory ``sources.Dataset``: decoded once into the cache, memory-mapped from it after."""
    if imageset.cache_root is None:
        raise DataError(f"nowhere to write the decoded cache of {imageset.name}: neither beside the data nor "
                        f"{home_cache()} can be written; set data.cache_dir to a writable directory (or data.stream=true)")
    final = imageset.cache_root / imageset.key
    held = _hold(final)
    if held is None:
        _decode_all(imageset, final)
        held = _hold(final)
    else:
        log.info("reading the decoded images of %s from %s", imageset.name, final)
    _remove_superseded(imageset, final)
    index = json.loads((final / "index.json").read_text())
    failed = index["failed"]
    if failed:  # files the scan passed but PIL could not decode: the bad files together
        check_bad([*imageset.bad, *failed], max(imageset.num_files, 1), cfg.max_bad_fraction, imageset.name)
    if cfg.mean is None:  # every training image's statistics (a streamed set's come from a sample)
        imageset._stats = (tuple(index["mean"]), tuple(index["std"]))
    parts = {s: sources.Split(np.load(final / f"{s}.npy", mmap_mode="r"), np.load(final / f"{s}_labels.npy"))
             for s in index["splits"]}
    for part in parts.values():  # (held while any of the arrays is)
        with contextlib.suppress(AttributeError):
            part.images._vision_train_hold = held
    if len(parts["train"].labels) == 0 or len(parts["test"].labels) == 0:
        raise DataError(f"{imageset.name}: no image of its {'train' if not len(parts['train'].labels) else 'test'} "
                        f"split could be decoded")
    return sources.Dataset(imageset.name, parts["train"], parts.get("val"), parts["test"], imageset.class_names,
                           imageset.mean, imageset.std, imageset.scale)
