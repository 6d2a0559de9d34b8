"""Your own images (vision_train.data.files): image folders and Hugging Face datasets written by the tests with
PIL and datasets, scanned, split, decoded once into the cache, and read back; every bad input is one line."""

from __future__ import annotations

import gc
import json
import logging
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vision_train.config import DataConfig
from vision_train.data import files
from vision_train.data.load import load
from vision_train.errors import ConfigError, DataError

from .conftest import run_cli
from .helpers import FAST, TINY, compose
from .imagefiles import COLORS, write_digits_folder, write_hf_dataset, write_image_folder

MODES = ("L", "RGB", "RGBA", "CMYK", "P")


@pytest.fixture(autouse=True)
def _no_network(no_network):
    """Every test here runs without the network (conftest.no_network)."""


def folder_cfg(root, **kw) -> DataConfig:
    kw = {"image_size": 16, "workers": 2, **kw}
    return DataConfig(kind="image_folder", name="", root=str(root), **kw)


def add_bad_files(folder: Path, good_jpeg: Path) -> list[str]:
    """A corrupt file, a zero-byte file and a truncated JPEG (image names), a .txt and hidden files (ignored)."""
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))
    (folder / "empty.jpg").write_bytes(b"")
    data = good_jpeg.read_bytes()
    (folder / "cut.jpg").write_bytes(data[: len(data) * 2 // 3])
    (folder / "notes.txt").write_text("not an image")
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (folder / "Thumbs.db").write_bytes(b"\0" * 10)
    return ["corrupt.png", "empty.jpg", "cut.jpg"]


def big_jpeg(path: Path, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(path, quality=90)
    return path


# ------------------------------------------------------------------------------------------ folders
def test_mixed_folder_loads_classes_labels_shapes_and_lists_bad_files(tmp_path, caplog):
    written = write_image_folder(tmp_path, classes=("cat", "dog", "fox"), per_class=10, modes=MODES,
                                 formats=("png", "jpg"))
    bad = add_bad_files(tmp_path / "train" / "dog", big_jpeg(tmp_path / "src.jpg"))
    (tmp_path / "src.jpg").unlink()
    caplog.set_level(logging.INFO, logger="vision_train")
    cfg = folder_cfg(tmp_path, max_bad_fraction=0.2)

    ds = load(cfg)

    assert ds.class_names == ("cat", "dog", "fox") and ds.name == tmp_path.name and ds.num_classes == 3
    for split, part in (("train", ds.train), ("val", ds.val), ("test", ds.test)):
        assert part.images.shape == (len(written[split]), 16, 16, 3) and part.images.dtype == np.uint8
        assert part.labels.dtype == np.int32
        assert sorted(part.labels.tolist()) == sorted(label for _, label in written[split])
    # every mode became RGB: the class's colour at the centre (grey of that luminance from a grayscale file);
    # a split of its own keeps the files' order
    for image, label, (path, _) in zip(ds.test.images, ds.test.labels, written["test"]):
        colour = np.array(COLORS[label])
        if Image.open(path).mode == "L":
            colour = np.full(3, colour @ [0.299, 0.587, 0.114])
        assert np.abs(image[8, 8] - colour).max() < 40, (path, image[8, 8], colour)
    lines = [r.getMessage() for r in caplog.records]
    line = next(m for m in lines if "cannot be read" in m)
    assert f"3 of {sum(len(w) for w in written.values()) + 3} image files" in line
    for name in bad:
        assert f"train/dog/{name}" in line
    assert any("3 files" in m and "ignored" in m for m in lines), lines  # notes.txt, .DS_Store, Thumbs.db

    grey = load(folder_cfg(tmp_path, max_bad_fraction=0.2, channels=1))
    assert grey.train.images.shape == (len(written["train"]), 16, 16, 1) and len(grey.mean) == 1


def test_too_many_bad_files_stop_with_one_line(tmp_path):
    write_image_folder(tmp_path, per_class=4, splits=False)
    add_bad_files(tmp_path / "dog", big_jpeg(tmp_path / "src.jpg"))
    (tmp_path / "src.jpg").unlink()
    for i in range(4):
        (tmp_path / "cat" / f"zero{i}.png").write_bytes(b"")
    with pytest.raises(ConfigError) as info:
        files.open_images(folder_cfg(tmp_path, max_bad_fraction=0.1))
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("data.max_bad_fraction=0.1: 7 of 19 image files")
    assert "and 2 more" in msg and "raise data.max_bad_fraction" in msg


def test_decoding_modes_orientation_and_crop(tmp_path):
    """EXIF orientation is applied, the shorter side resized and the center cropped; 16-bit, palette, RGBA
    and CMYK images convert to the channel count."""
    tall = np.zeros((40, 20, 3), np.uint8)
    tall[:20], tall[20:] = (255, 0, 0), (0, 0, 255)  # red top, blue bottom, as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: shown turned 90 degrees clockwise (red on the right)
    Image.fromarray(tall).save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    a = files.decode(tmp_path / "rotated.jpg", 16, 3)
    assert a.shape == (16, 16, 3)
    assert a[8, 0, 2] > 200 and a[8, 0, 0] < 60 and a[8, 15, 0] > 200 and a[8, 15, 2] < 60

    wide = np.zeros((10, 30, 3), np.uint8)
    wide[:, :10], wide[:, 10:20], wide[:, 20:] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    Image.fromarray(wide).save(tmp_path / "wide.png")
    a = files.decode(tmp_path / "wide.png", 8, 3)  # only the green middle third survives the center crop
    assert (a[..., 1] > 200).all() and (a[..., 0] < 40).all() and (a[..., 2] < 40).all()

    Image.fromarray(np.full((12, 12), 65535, np.uint16)).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    assert (files.decode(tmp_path / "deep.png", 8, 1) == 255).all()
    assert (files.decode(tmp_path / "deep.png", 8, 3) == 255).all()
    rgba = np.zeros((12, 12, 4), np.uint8)
    rgba[..., 1], rgba[..., 3] = 200, 128
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    np.testing.assert_array_equal(files.decode(tmp_path / "alpha.png", 6, 3)[0, 0], [0, 200, 0])
    Image.fromarray(np.full((12, 12, 3), (10, 20, 200), np.uint8)).convert("P").save(tmp_path / "pal.gif")
    assert np.abs(files.decode(tmp_path / "pal.gif", 6, 3)[3, 3].astype(int) - [10, 20, 200]).max() < 16
    Image.fromarray(np.full((12, 12, 3), (200, 30, 30), np.uint8)).convert("CMYK").save(tmp_path / "c.jpg")
    assert np.abs(files.decode(tmp_path / "c.jpg", 6, 3)[3, 3].astype(int) - [200, 30, 30]).max() < 30


def test_split_folders_and_seeded_split_of_a_flat_root(tmp_path, caplog):
    write_image_folder(tmp_path / "split", per_class={"train": 8, "test": 3}, classes=("a", "b"))
    s = files.open_images(folder_cfg(tmp_path / "split", val_size=4))
    assert {k: len(v) for k, v in s.splits.items()} == {"train": 12, "val": 4, "test": 6}

    flat = write_image_folder(tmp_path / "flat", per_class=15, classes=("a", "b", "c"), splits=False)["all"]
    cfg = folder_cfg(tmp_path / "flat", val_size=5, test_size=9)
    one, two = files.open_images(cfg), files.open_images(cfg)
    assert {k: len(v) for k, v in one.splits.items()} == {"train": 31, "val": 5, "test": 9}
    paths = {k: r.paths for k, r in one.splits.items()}
    assert paths == {k: r.paths for k, r in two.splits.items()}  # reproducible
    together = [p for ps in paths.values() for p in ps]
    assert sorted(together) == sorted(str(p) for p, _ in flat)  # disjoint and complete
    for r in one.splits.values():  # labels follow the files
        assert [Path(p).parent.name for p in r.paths] == [one.class_names[i] for i in r.labels]
    other = files.open_images(folder_cfg(tmp_path / "flat", val_size=5, test_size=9, split_seed=7))
    assert other.splits["test"].paths != one.splits["test"].paths
    # test_fraction when test_size is 0: as data=digits, int(0.8 n) stay for training; one line says so
    with caplog.at_level(logging.INFO, logger="vision_train"):
        assert len(files.open_images(folder_cfg(tmp_path / "flat")).splits["test"]) == 45 - int(0.8 * 45)
    said = [r.getMessage() for r in caplog.records if "no test split" in r.getMessage()]
    assert len(said) == 1 and "9 of its 45 training images are held out for test (data.test_fraction=0.2" in said[0]


@pytest.mark.parametrize("case,expected", [
    ("missing", "no such folder"),
    ("empty", "is empty; expected <root>/train/<class>/<image>"),
    ("empty_class", "holds no images; add images to it or remove the folder"),
    ("unknown_class", "test/ has class folders that train/ does not have (zebra)"),
    ("no_classes_in_split", "holds no class folders"),
    ("val_too_big", "data.val_size=100"),
])
def test_bad_folders_are_one_line_naming_the_key(tmp_path, case, expected):
    root = tmp_path / "pets"
    if case != "missing":
        root.mkdir()
    if case in ("empty_class", "unknown_class", "no_classes_in_split", "val_too_big"):
        write_image_folder(root, per_class={"train": 3, "test": 1}, classes=("cat", "dog"))
    if case == "empty_class":
        (root / "train" / "owl").mkdir()
        (root / "train" / "owl" / "readme.txt").write_text("x")
    elif case == "unknown_class":
        write_image_folder(root, per_class={"test": 1}, classes=("zebra",))
    elif case == "no_classes_in_split":
        (root / "val").mkdir()
        (root / "val" / "a.png").write_bytes(b"")
    with pytest.raises((DataError, ConfigError)) as info:
        files.open_images(folder_cfg(root, val_size=100 if case == "val_too_big" else 0))
    msg = str(info.value)
    assert expected in msg and "\n" not in msg
    assert msg.startswith("data.val_size=" if case == "val_too_big" else f"data.root='{root}'")
    if case == "missing":
        assert str(root) in msg and "train/<class>/<image>" in msg


def test_the_folder_preset_composes_and_names_the_set_after_its_folder(tmp_path):
    cfg = compose(["data=image_folder", f"data.root={tmp_path / 'pets'}/", "model=cnn", "data.cache=True",
                   "data.stream=auto"])
    assert cfg.data.kind == "image_folder" and cfg.data.name == "pets" and cfg.data.cache == "True"
    assert compose(["data=image_folder", "data.root=x", "data.name=mine", "model=cnn"]).data.name == "mine"
    for overrides, line in ((["data.root=x", "data.cache=false", "data.stream=False"],
                             "data.stream='False': data.cache=false together with data.stream=false refuses both"),
                            (["data.root=x", "data.cache=maybe"], "data.cache='maybe': choose one of auto, true, false"),
                            (["data.root=x", "data.channels=4"], "data.channels=4: choose one of 1, 3"),
                            (["data.root=x", "data.max_bad_fraction=2"], "data.max_bad_fraction=2.0: must be in [0, 1]")):
        with pytest.raises(ConfigError) as info:
            compose(["data=image_folder", "model=cnn", *overrides])
        assert str(info.value).startswith(line)
    # the presets compose without a folder or a dataset (as every preset does); opening them says what is missing
    with pytest.raises(ConfigError, match="^data.root='': give the folder of your images"):
        files.open_images(compose(["data=image_folder", "model=cnn"]).data)
    with pytest.raises(ConfigError, match="^data.name='': give a Hugging Face dataset id"):
        files.open_images(compose(["data=hf", "model=cnn"]).data)


def test_links_and_unreadable_folders(tmp_path, monkeypatch):
    root = tmp_path / "pets"
    write_image_folder(root, per_class=3, classes=("cat", "dog"), splits=False)
    (root / "cat" / "again").symlink_to(root)  # a link back up: not followed (it would never end)
    (root / "dog" / "more").symlink_to(tmp_path / "more")  # a link elsewhere: followed
    write_image_folder(tmp_path / "more", per_class=2, classes=("x",), splits=False)
    (root / "dog" / "gone.png").symlink_to(root / "nowhere.png")  # a dangling link: an unreadable image
    s = files.open_images(folder_cfg(root, max_bad_fraction=0.5))
    assert sum(len(r) for r in s.splits.values()) == 3 + 3 + 2
    assert s.bad == ("dog/gone.png (a link to nothing)",)

    (root / "dog" / "locked").mkdir()
    real = os.scandir

    def denied(path="."):  # (as a folder without read permission; the tests run as root, who reads it anyway)
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", denied)
    with pytest.raises(DataError) as info:
        files.open_images(folder_cfg(root, max_bad_fraction=0.5))
    assert str(info.value) == (f"data.root='{root}': cannot read {root / 'dog' / 'locked'} (Permission denied); "
                               f"make it readable or move it out of the folder")


def ignored_line(caplog) -> str:
    lines = [r.getMessage() for r in caplog.records if "ignored" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in caplog.records]
    return lines[0]


@pytest.mark.parametrize("layout", ["flat", "split"])
def test_a_link_back_to_a_folder_above_is_skipped_and_counted(tmp_path, caplog, layout):
    """`ln -s . root/again` (and links to the split folder, or up from a class folder) would list every image
    twice, or as an extra class: each is skipped and named in the ignored line."""
    root = tmp_path / "pets"
    write_image_folder(root, per_class=4, classes=("cat", "dog"), splits=layout == "split")
    (root / "again").symlink_to(".")                      # the root itself, at the top
    (root / "up").symlink_to("..")                        # the root's parent, at the top
    if layout == "split":
        (root / "train" / "again").symlink_to(".")        # the train folder, among its classes
        (root / "val2").symlink_to("train")               # (not a split name: an ignored top-level folder)
        (root / "test" / "cat" / "up").symlink_to("..")
        (root / "train" / "dog" / "root").symlink_to("../..")
    else:
        (root / "cat" / "up").symlink_to("..")
        (root / "dog" / "deep").mkdir()
        (root / "dog" / "deep" / "top").symlink_to("../../..")  # the root's parent, from two levels down
    caplog.set_level(logging.INFO, logger="vision_train")
    s = files.open_images(folder_cfg(root, test_size=2 if layout == "flat" else 0))
    assert s.class_names == ("cat", "dog")
    total = 8 + (4 + 4 if layout == "split" else 0)
    assert sum(len(r) for r in s.splits.values()) == total and s.num_files == total
    paths = [p for r in s.splits.values() for p in r.paths]
    assert len(set(map(os.path.realpath, paths))) == len(paths)
    line = ignored_line(caplog)
    loops = 5 if layout == "split" else 4
    assert f"{loops} links to a folder above" in line, line
    assert ("1 folder beside train/, val/ and test/ (val2)" in line) == (layout == "split"), line
    assert "again" in line and "duplicate" not in line


def test_links_elsewhere_are_followed_and_a_file_reached_twice_is_listed_once(tmp_path, caplog):
    root = tmp_path / "pets"
    written = write_image_folder(root, per_class={"train": 3, "test": 2}, classes=("cat", "dog"))
    other = tmp_path / "other_disk"
    write_image_folder(other, per_class=2, classes=("owl", "extra_dog"), splits=False)
    (root / "train" / "owl").symlink_to(other / "owl")    # a class folder elsewhere: followed
    (root / "test" / "owl").mkdir()
    (root / "test" / "owl" / "x.jpg").symlink_to(big_jpeg(tmp_path / "owl_test.jpg"))  # an image that is a link
    (root / "train" / "dog" / "more").symlink_to(other / "extra_dog")  # a folder elsewhere, inside a class
    # the same file twice: a test image linked into train (twice), a folder linked a second time
    test_cat = sorted((root / "test" / "cat").iterdir())[0]
    (root / "train" / "cat" / "zz_again.png").symlink_to(test_cat)
    (root / "train" / "cat" / "zz_from_test.png").symlink_to(test_cat)
    (root / "train" / "dog" / "zz_more").symlink_to(other / "extra_dog")
    caplog.set_level(logging.INFO, logger="vision_train")

    s = files.open_images(folder_cfg(root))
    assert s.class_names == ("cat", "dog", "owl")
    train, test = s.splits["train"], s.splits["test"]
    names = lambda rec, label: sorted(os.path.relpath(p, root) for p, c in zip(rec.paths, rec.labels) if c == label)
    # the first in the walk's order keeps a file: train before test, class folders and names sorted
    assert names(train, 0) == sorted([os.path.relpath(p, root) for p, label in written["train"] if label == 0]
                                     + ["train/cat/zz_again.png"])
    assert names(train, 1) == sorted([os.path.relpath(p, root) for p, label in written["train"] if label == 1]
                                     + [f"train/dog/more/{p.name}" for p in (other / "extra_dog").iterdir()])
    assert names(train, 2) == sorted(f"train/owl/{p.name}" for p in (other / "owl").iterdir())
    assert str(test_cat) not in test.paths and names(test, 2) == ["test/owl/x.jpg"]
    assert len(train) == 4 + 5 + 2 and len(test) == 1 + 2 + 1 and s.num_files == len(train) + len(test)
    paths = [*train.paths, *test.paths]
    assert len(set(map(os.path.realpath, paths))) == len(paths)
    line = ignored_line(caplog)
    assert "4 duplicates" in line and "links to a folder above" not in line, line

    ds = files.load_cached(s, folder_cfg(root))  # the followed links decode
    assert len(ds.train.labels) == len(train) and len(ds.test.labels) == len(test)

    # a class folder that holds only files another class lists is one line, not an empty class
    (root / "train" / "cat2").symlink_to(root / "train" / "cat")
    with pytest.raises(DataError) as info:
        files.open_images(folder_cfg(root))
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"data.root='{root}': the class folder {root / 'train' / 'cat2'}")
    assert "already listed" in msg


@pytest.mark.parametrize("name,hint", [("pets.zip", "unzip"), ("pets.tar.gz", "tar -xf"), ("pets", "unpack")])
def test_a_root_that_is_a_file_says_so(tmp_path, name, hint):
    (tmp_path / name).write_bytes(b"PK\x03\x04")
    with pytest.raises(DataError) as info:
        files.open_images(folder_cfg(tmp_path / name))
    msg = str(info.value)
    assert msg.startswith(f"data.root='{tmp_path / name}': is a file, not a folder; ") and "\n" not in msg, msg
    assert hint in msg and "no such folder" not in msg


# -------------------------------------------------------------------------------------------- cache
def cache_dirs(root: Path) -> list[str]:
    d = root / ".vision_train_cache"
    return sorted(p.name for p in d.iterdir() if p.is_dir()) if d.is_dir() else []


def test_the_second_load_reads_the_cache_and_a_changed_file_changes_the_key(tmp_path, monkeypatch, caplog):
    written = write_image_folder(tmp_path, per_class=4, splits=False)["all"]
    cfg = folder_cfg(tmp_path, val_size=2)
    first = load(cfg)
    (key,) = cache_dirs(tmp_path)
    index = json.loads((tmp_path / ".vision_train_cache" / key / "index.json").read_text())
    assert index["class_names"] == ["cat", "dog", "fox"] and index["splits"] == {"train": 7, "val": 2, "test": 3}
    assert index["bad"] == [] and index["failed"] == [] and len(index["mean"]) == 3

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded an image although the cache holds them")

    monkeypatch.setattr(files, "decode", no_decoding)
    monkeypatch.setattr(files, "check_file", no_decoding)  # the scan's result is kept too
    caplog.set_level(logging.INFO, logger="vision_train")
    second = load(cfg)
    assert any("reading the decoded images" in r.getMessage() and key in r.getMessage() for r in caplog.records)
    for a, b in ((first.train, second.train), (first.val, second.val), (first.test, second.test)):
        np.testing.assert_array_equal(a.images, b.images)
        np.testing.assert_array_equal(a.labels, b.labels)
    assert isinstance(second.train.images, np.memmap) and first.mean == second.mean
    monkeypatch.undo()

    path = written[0][0]
    rgb = np.asarray(Image.open(path).convert("RGB")).copy()
    rgb[0, 0] = 255 - rgb[0, 0]
    Image.fromarray(rgb).save(path)
    os.utime(path, ns=(1, 1))  # (a new modification time even on coarse clocks)
    load(cfg)
    assert len(cache_dirs(tmp_path)) == 2  # a new key: decoded again (the old cache stays: first and second read it)
    assert files.open_images(folder_cfg(tmp_path, val_size=2, image_size=12)).key not in cache_dirs(tmp_path)


def test_a_changed_file_removes_the_superseded_cache_once_the_new_one_is_complete(tmp_path, caplog):
    written = write_image_folder(tmp_path, per_class=4, splits=False)["all"]
    cfg, other = folder_cfg(tmp_path, val_size=2), folder_cfg(tmp_path, val_size=2, image_size=12)
    load(cfg)
    load(other)  # another setting of the same folder: its cache stays
    other_key = files.open_images(other).key
    (old,) = [k for k in cache_dirs(tmp_path) if k != other_key]
    size = sum(f.stat().st_size for f in (tmp_path / ".vision_train_cache" / old).iterdir())

    def change(i):
        path = written[i][0]
        rgb = np.asarray(Image.open(path).convert("RGB")).copy()
        rgb[0, 0] = 255 - rgb[0, 0]
        Image.fromarray(rgb).save(path)
        os.utime(path, ns=(i + 1, i + 1))  # (a new modification time even on coarse clocks)

    change(0)
    caplog.set_level(logging.INFO, logger="vision_train")
    ds = load(cfg)
    new = files.open_images(cfg).key
    assert sorted(cache_dirs(tmp_path)) == sorted([new, other_key])
    assert not [p for p in (tmp_path / ".vision_train_cache").iterdir() if p.name.startswith(".")]
    lines = [r.getMessage() for r in caplog.records if "removed" in r.getMessage()]
    assert len(lines) == 1 and old in lines[0] and f"{size / 1e6:.3f} MB freed" in lines[0], lines
    decoded = next(i for i, r in enumerate(caplog.records) if r.getMessage().startswith("decoded "))
    assert caplog.records.index(next(r for r in caplog.records if "removed" in r.getMessage())) > decoded

    # a cache another process reads (here: this one, through ds) is kept, and removed by a later run
    caplog.clear()
    change(1)
    ds2 = load(cfg)
    assert new in cache_dirs(tmp_path) and len(cache_dirs(tmp_path)) == 3
    assert any("in use by another process" in r.getMessage() for r in caplog.records)
    assert ds.train.images.sum() >= 0  # (still readable)
    del ds
    gc.collect()
    caplog.clear()
    load(cfg)  # read from the cache; the superseded one is no longer held
    assert sorted(cache_dirs(tmp_path)) == sorted([files.open_images(cfg).key, other_key])
    assert any("removed 1 decoded cache" in r.getMessage() and new in r.getMessage() for r in caplog.records)
    del ds2


def test_a_decode_killed_half_way_leaves_no_trusted_cache(tmp_path, monkeypatch):
    write_image_folder(tmp_path, per_class=10, splits=False)
    cfg = folder_cfg(tmp_path, workers=0)
    calls = {"n": 0}
    real = files.FileRecords.read

    def dies(self, i):
        calls["n"] += 1
        if calls["n"] == 12:
            raise KeyboardInterrupt  # as Ctrl-C (a SIGKILL leaves a temporary directory, removed next time)
        return real(self, i)

    monkeypatch.setattr(files.FileRecords, "read", dies)
    with pytest.raises(KeyboardInterrupt):
        load(cfg)
    assert os.listdir(tmp_path / ".vision_train_cache") == [f for f in os.listdir(tmp_path / ".vision_train_cache")
                                                            if f.startswith("scan-")]
    monkeypatch.undo()

    # a temporary directory of a killed process on this host is removed; the next load decodes everything
    key = files.open_images(cfg).key
    stale = tmp_path / ".vision_train_cache" / f".tmp-{key}-{socket.gethostname()}-999999999-abcdef"
    stale.mkdir()
    ds = load(cfg)
    assert len(ds.train.labels) + len(ds.test.labels) == 30 and not stale.exists()
    assert cache_dirs(tmp_path) == [key]


def test_a_read_only_root_caches_in_the_home_cache(tmp_path):
    root = tmp_path / "ro"
    write_image_folder(root, per_class=3, splits=False)
    mounted = subprocess.run(["mount", "--bind", str(root), str(root)], check=False, capture_output=True).returncode == 0 \
        and subprocess.run(["mount", "-o", "remount,ro,bind", str(root)], check=False, capture_output=True).returncode == 0
    if not mounted:
        os.chmod(root, 0o555)
    try:
        if os.access(root, os.W_OK) and not mounted:
            pytest.skip("cannot make a read-only folder here")
        cfg = folder_cfg(root)
        s = files.open_images(cfg)
        assert s.cache_root == files.home_cache() and str(files.home_cache()).startswith(str(tmp_path / "home"))
        ds = files.load_cached(s, cfg)
        assert len(ds.train.labels) + len(ds.test.labels) == 9
        assert (files.home_cache() / s.key / "index.json").is_file() and not (root / ".vision_train_cache").exists()
        explicit = files.open_images(folder_cfg(root, cache_dir=str(tmp_path / "elsewhere")))
        assert explicit.cache_root == tmp_path / "elsewhere"
    finally:
        if mounted:
            subprocess.run(["umount", str(root)], check=False, capture_output=True)
        os.chmod(root, 0o755)


# ------------------------------------------------------------------------------------------ records
@pytest.mark.parametrize("channels", [1, 3])
def test_records_pickle_and_equal_the_cached_rows(tmp_path, channels):
    write_image_folder(tmp_path, per_class=5, modes=MODES, splits=False)
    cfg = folder_cfg(tmp_path, channels=channels, val_size=3)
    s = files.open_images(cfg)
    ds = files.load_cached(s, cfg)
    for split, part in (("train", ds.train), ("val", ds.val), ("test", ds.test)):
        rec = pickle.loads(pickle.dumps(s.splits[split]))
        np.testing.assert_array_equal(rec.labels, part.labels)
        for i in range(len(rec)):
            image, label = rec[i]
            assert image.dtype == np.uint8 and image.shape == (16, 16, channels) and label == part.labels[i]
            np.testing.assert_array_equal(image, part.images[i])
    # statistics: a sampled set (all of these few images) agrees with the cache's
    again = files.open_images(cfg)
    np.testing.assert_allclose(again.mean, ds.mean, rtol=1e-9)
    np.testing.assert_allclose(again.std, ds.std, rtol=1e-9)
    given_cfg = folder_cfg(tmp_path, channels=channels, val_size=3, mean=[0.5], std=[0.25])
    given = files.open_images(given_cfg)
    assert given.mean == (0.5,) * channels and files.load_cached(given, given_cfg).std == (0.25,) * channels


def test_an_image_that_fails_at_read_time_gives_the_next_one_and_one_warning(tmp_path, caplog):
    write_image_folder(tmp_path, per_class=3, splits=False)
    s = files.open_images(folder_cfg(tmp_path))
    rec = s.splits["train"]
    expected = rec[3]
    Path(rec.paths[2]).write_bytes(Path(rec.paths[2]).read_bytes()[:40])  # damaged after the scan
    caplog.set_level(logging.WARNING, logger="vision_train")
    for _ in range(3):
        image, label = rec[2]
        np.testing.assert_array_equal(image, expected[0])
        assert label == expected[1]
    warnings = [r.getMessage() for r in caplog.records if rec.paths[2] in r.getMessage()]
    assert len(warnings) == 1 and "next readable example" in warnings[0]
    with pytest.raises(IndexError):
        rec[len(rec)]


def test_an_image_that_fails_in_the_first_decode_is_left_out_of_the_cache(tmp_path, caplog):
    write_image_folder(tmp_path, per_class={"train": 4, "test": 2}, classes=("a", "b"))
    cfg = folder_cfg(tmp_path, max_bad_fraction=0.2)
    s = files.open_images(cfg)
    damaged = s.splits["train"].paths[5]
    Path(damaged).write_bytes(Path(damaged).read_bytes()[:40])  # after the scan
    caplog.set_level(logging.WARNING, logger="vision_train")
    ds = files.load_cached(s, cfg)
    keep = [i for i in range(8) if i != 5]
    assert ds.train.labels.tolist() == s.splits["train"].labels[keep].tolist()
    for row, i in enumerate(keep):
        np.testing.assert_array_equal(ds.train.images[row], s.splits["train"].read(i))
    assert any("1 of 12 image files" in r.getMessage() and damaged in r.getMessage() for r in caplog.records)
    with pytest.raises(ConfigError, match=r"data.max_bad_fraction=0.05: 1 of 12 image files of .*cannot be read"):
        files.load_cached(s, folder_cfg(tmp_path, max_bad_fraction=0.05))  # (the same cache, a stricter run)


def test_plan_follows_cache_and_stream(tmp_path):
    write_image_folder(tmp_path, per_class=3, splits=False)
    s = files.open_images(folder_cfg(tmp_path))
    assert s.decoded_bytes() == 9 * 16 * 16 * 3
    plan = lambda **kw: files.plan(folder_cfg(tmp_path, **kw), s)
    assert plan() == "cache" and plan(cache_max_gb=1e-6) == "stream"
    assert plan(cache="False") == "stream" and plan(cache="true", cache_max_gb=1e-6) == "cache"
    assert plan(stream="True") == "stream" and plan(stream="false", cache_max_gb=1e-6) == "cache"
    with pytest.raises(ConfigError, match="data.cache='False'.*data.stream=false"):
        plan(cache="False", stream="false")


# ------------------------------------------------------------------------------------- Hugging Face
def hf_cfg(name, **kw) -> DataConfig:
    return DataConfig(kind="hf", name=str(name), image_size=8, workers=2, **kw)


def test_hf_dataset_from_save_to_disk(tmp_path, monkeypatch):
    written = write_hf_dataset(tmp_path / "bugs", per_class=4, size=(12, 10))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = hf_cfg(tmp_path / "bugs", val_size=3)
    s = files.open_images(cfg)
    assert s.class_names == ("ant", "bee", "wasp") and s.name == "bugs"
    assert {k: len(v) for k, v in s.splits.items()} == {"train": 9, "val": 3, "test": 12}
    rec = pickle.loads(pickle.dumps(s.splits["test"]))
    image, label = rec[5]
    np.testing.assert_array_equal(image, files.fit(Image.fromarray(written["test"][0][5]), 8, 3))
    assert label == written["test"][1][5]
    ds = files.load_cached(s, cfg)
    assert ds.test.images.shape == (12, 8, 8, 3)
    np.testing.assert_array_equal(ds.test.images[5], image)
    assert sorted(np.concatenate([ds.train.labels, ds.val.labels]).tolist()) == sorted(written["train"][1])
    assert (files.home_cache() / s.key / "index.json").is_file()

    # plain string labels: the classes are their sorted distinct values
    write_hf_dataset(tmp_path / "plain", classes=("zulu", "alpha"), per_class=3, class_label=False)
    plain = files.open_images(hf_cfg(tmp_path / "plain"))
    assert plain.class_names == ("alpha", "zulu")
    assert plain.splits["test"].labels.tolist() == [1, 1, 1, 0, 0, 0]


def test_hf_folder_of_data_files(tmp_path, monkeypatch):
    """data=hf on a folder that is not a save_to_disk one: datasets' own builders read it (here: imagefolder)."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    write_image_folder(tmp_path / "pics", per_class={"train": 4, "validation": 2, "test": 2}, classes=("a", "b"))
    s = files.open_images(hf_cfg(tmp_path / "pics"))
    assert s.name == "pics" and s.class_names == ("a", "b")
    assert {k: len(v) for k, v in s.splits.items()} == {"train": 8, "val": 4, "test": 4}
    assert s.splits["val"][3][0].shape == (8, 8, 3) and s.splits["val"].labels.tolist() == [0, 0, 1, 1]


def test_hf_bad_keys_and_splits_are_one_line(tmp_path):
    write_hf_dataset(tmp_path / "bugs", per_class=2, splits=("train",))
    with pytest.raises(ConfigError) as info:
        files.open_images(hf_cfg(tmp_path / "bugs", image_key="img"))
    assert str(info.value) == f"data.image_key='img': {tmp_path / 'bugs'} has no such column; its columns: image, label"
    with pytest.raises(ConfigError, match="data.image_key=.label.: the column holds ClassLabel values, not images; .*: image$"):
        files.open_images(hf_cfg(tmp_path / "bugs", image_key="label", label_key="image"))
    with pytest.raises(ConfigError, match="data.train_split='training': .* has the splits train; choose one"):
        files.open_images(hf_cfg(tmp_path / "bugs", train_split="training"))
    s = files.open_images(hf_cfg(tmp_path / "bugs", test_size=2))  # no test split: held out of train
    assert len(s.splits["test"]) == 2 and len(s.splits["train"]) == 4


def test_hf_id_not_cached_offline_is_one_line(tmp_path):
    """In a fresh process (datasets reads the offline switches when it is imported)."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(Path(__file__).parent.parent)}
    code = ("from vision_train.config import DataConfig\nfrom vision_train.data import files\nfrom vision_train.errors"
            " import DataError\ntry:\n    files.open_images(DataConfig(kind='hf', name='someone/pets'))\n"
            "except DataError as e:\n    print(e)\n")
    r = subprocess.run(["python", "-c", code], env=env, capture_output=True, text=True, timeout=120, check=False)
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1, r.stdout + r.stderr[-2000:]
    line = lines[0]
    assert line.startswith("data.name='someone/pets': ") and "https://huggingface.co/datasets/someone/pets" in line
    assert str(tmp_path / "hf") in line and "save_to_disk" in line and "HF_HUB_OFFLINE=1" in line


def cache_hf_download(hf_home: Path, repo_id: str, source: Path) -> None:
    """``repo_id`` in datasets' Arrow cache under ``hf_home`` as load_dataset leaves a download there
    (``<namespace>___<name>/<config>/<version>/<hash>/<name>-<split>.arrow`` and dataset_info.json): the
    save_to_disk set ``source`` prepared by datasets' parquet builder, moved to the id's place."""
    import datasets

    cache = hf_home / "datasets"
    data = datasets.load_from_disk(str(source))
    for split, ds in data.items():
        ds.to_parquet(str(hf_home / f"{split}.parquet"))
    datasets.load_dataset("parquet", data_files={s: str(hf_home / f"{s}.parquet") for s in data},
                          cache_dir=str(cache))
    (built,) = [p for p in (cache / "parquet").glob("*/*/*") if p.is_dir()]
    namespace, name = repo_id.split("/")
    target = cache / f"{namespace}___{name}" / "default" / built.parent.name / built.name
    target.parent.mkdir(parents=True)
    built.rename(target)
    for arrow in target.glob("parquet-*.arrow"):
        arrow.rename(target / arrow.name.replace("parquet-", f"{name}-"))


OFFLINE_MACHINE = """
import logging, socket, sys, time
def unreachable(*args, **kwargs):  # as a machine without network: no name resolves, nothing connects
    raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
socket.getaddrinfo = unreachable
socket.socket.connect = lambda self, *a: (_ for _ in ()).throw(OSError(101, "Network is unreachable"))
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")  # (as the CLI: INFO on the console)
from vision_train.config import DataConfig
from vision_train.data import files
from vision_train.errors import DataError
t0 = time.time()
try:
    s = files.open_images(DataConfig(kind="hf", name=sys.argv[1]))
    print("loaded", s.class_names, {k: len(v) for k, v in s.splits.items()})
except DataError as e:
    print(e)
print(f"{time.time() - t0:.2f}", file=sys.stderr)
"""


def test_hf_id_with_no_network_is_one_line_at_once_and_a_cached_one_loads(tmp_path):
    """No network and no HF_HUB_OFFLINE: the hub is found unreachable in seconds (not the client's ~24 s of
    retries, two lines each), an id not cached is one line saying how to fetch it, a cached one loads."""
    write_hf_dataset(tmp_path / "bugs", per_class=2)
    cache_hf_download(tmp_path / "hf", "someone/cached", tmp_path / "bugs")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "DATASETS_"))}
    env.update(HF_HOME=str(tmp_path / "hf"), PYTHONPATH=str(Path(__file__).parent.parent))
    (tmp_path / "offline.py").write_text(OFFLINE_MACHINE)

    def run(name):
        r = subprocess.run([sys.executable, str(tmp_path / "offline.py"), name], env=env, capture_output=True,
                           text=True, timeout=120, check=False)
        assert r.returncode == 0, r.stderr[-3000:]
        return r.stdout.strip().splitlines(), r.stderr, float(r.stderr.strip().splitlines()[-1])

    lines, err, seconds = run("someone/pets")
    assert len(lines) == 1 and seconds < 8, (lines, err[-3000:])
    line = lines[0]
    assert line.startswith("data.name='someone/pets': ") and "https://huggingface.co/datasets/someone/pets" in line
    assert "not cached here and the hub huggingface.co:443 cannot be reached" in line, line
    assert "save_to_disk" in line and "hf download --repo-type dataset someone/pets" in line
    for chatter in ("Retry", "thrown while requesting", "JAX version", "available."):
        assert chatter not in err, err[-3000:]

    lines, err, seconds = run("someone/cached")
    assert lines == ["loaded ('ant', 'bee', 'wasp') {'train': 6, 'test': 6}"] and seconds < 8, (lines, err[-3000:])
    assert "Retry" not in err and "JAX version" not in err, err[-3000:]


# --------------------------------------------------------------------------------------------- CLI
def test_cli_trains_on_an_image_folder(tmp_path):
    write_image_folder(tmp_path / "pets", per_class={"train": 16, "test": 4}, classes=("cat", "dog"),
                       modes=("RGB", "L"), size=(18, 16))
    run = tmp_path / "run"
    r = run_cli([*TINY["cnn"], *FAST, "data=image_folder", f"data.root={tmp_path / 'pets'}", "data.image_size=16",
                 "data.val_size=8", "trainer.batch_size=8", "trainer.epochs=2", f"hydra.run.dir={run}"], cwd=tmp_path)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert "test/acc" in summary and (run / "metrics.jsonl").is_file()
    assert (tmp_path / "pets" / ".vision_train_cache").is_dir()


@pytest.mark.parametrize("case,expected", [
    ("missing", "data.root='{root}': no such folder"),
    ("empty_class", "the class folder {root}/train/owl holds no images"),
    ("bad_files", "data.max_bad_fraction=0.01: 1 of 4 image files of data.root='{root}' cannot be read"),
])
def test_cli_bad_folder_is_one_line_and_nonzero_exit(tmp_path, case, expected):
    root = tmp_path / "pets"
    if case != "missing":
        write_image_folder(root, per_class={"train": 2, "test": 1}, classes=("cat",), size=(8, 8))
    if case == "empty_class":
        (root / "train" / "owl").mkdir()
    elif case == "bad_files":
        (root / "train" / "cat" / "zero.png").write_bytes(b"")
    r = run_cli([*TINY["cnn"], *FAST, "data=image_folder", f"data.root={root}", f"hydra.run.dir={tmp_path / 'run'}"],
                cwd=tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode != 0 and "Traceback" not in out, out[-3000:]
    errors = [line for line in out.splitlines() if "error:" in line]
    assert len(errors) == 1 and expected.format(root=root) in errors[0], out[-3000:]


def test_digits_folder_matches_the_builtin_split(tmp_path):
    counts = write_digits_folder(tmp_path)
    ds = load(folder_cfg(tmp_path, image_size=8, channels=1))
    builtin = load(DataConfig(name="digits"))
    assert counts == {"train": len(builtin.train.labels), "test": len(builtin.test.labels)}
    assert ds.class_names == tuple(str(i) for i in range(10))
    key = lambda x: np.lexsort(x.reshape(len(x), -1).T[::-1])
    for mine, theirs in ((ds.train, builtin.train), (ds.test, builtin.test)):
        np.testing.assert_array_equal(mine.images[key(mine.images)], theirs.images[key(theirs.images)])
