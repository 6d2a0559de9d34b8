"""Data loaders on small files written in the real on-disk formats, read with ``download=False``.

No test here touches the network: an autouse fixture makes any socket connection fail loudly.
"""

from __future__ import annotations

import gzip
import importlib
import io
import os
import pickle
import struct

import numpy as np
import pytest
import scipy.io
import torch
from sklearn.datasets import load_digits

from vision_train.config import DataConfig
from vision_train.data import sources
from vision_train.errors import DataError

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
PER_BATCH = 20  # images per CIFAR-10 batch file (the real files hold 10,000)


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(autouse=True)
def _no_network(no_network):
    """Every test here runs without the network (conftest.no_network)."""


@pytest.fixture(scope="module")
def tvd():
    return sources.import_torchvision().datasets


@pytest.fixture
def skip_md5(monkeypatch, tvd):
    """Our files are tiny stand-ins, so their md5 cannot match the real archives' checksums.

    torchvision checks md5 in CIFAR10._check_integrity (data files), in CIFAR10._load_meta (batches.meta /
    meta, which _check_integrity does not cover) and in SVHN._check_integrity. All three go through the
    ``check_integrity`` name imported into their modules, so we replace that with a check that the file
    exists -- a missing file is still reported as missing. This is the only part of torchvision we bypass.
    """
    def exists_only(fpath, md5=None):
        return os.path.isfile(fpath)

    for mod in ("cifar", "svhn"):
        monkeypatch.setattr(importlib.import_module(f"torchvision.datasets.{mod}"), "check_integrity", exists_only)


def cfg(tmp_path, name, **kw):
    return DataConfig(name=name, root=str(tmp_path), download=False, **kw)


# ------------------------------------------------------------------------------------ file writers
class _Py2Pickler(pickle._Pickler):
    """Writes str and bytes as Python 2 ``str`` opcodes, as in the pickles inside the CIFAR tarballs.

    That is why torchvision reads them with ``encoding="latin1"`` (keys come back as "data") and the CIFAR
    web page with ``encoding="bytes"`` (keys come back as b"data"); the numpy array's raw buffer is a
    Python 2 string too.
    """

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj):
        data = obj.encode("latin1") if isinstance(obj, str) else bytes(obj)
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = _save_py2_str
    dispatch[bytes] = _save_py2_str


def _py2_pickle(path, obj):
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    path.write_bytes(buf.getvalue())


def _cifar_images(rng, n, first_index):
    """(n, 3072) uint8 rows in CIFAR's order (1024 red, 1024 green, 1024 blue, each row-major), and the same
    images as NHWC. Pixel [0, 0, red] and [0, 1, red] encode the example's index so that it can be tracked
    through a shuffle."""
    nhwc = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    idx = np.arange(first_index, first_index + n)
    nhwc[:, 0, 0, 0], nhwc[:, 0, 1, 0] = idx // 256, idx % 256
    rows = nhwc.transpose(0, 3, 1, 2).reshape(n, 3072)
    return np.ascontiguousarray(rows), nhwc


def write_cifar10(root, per_batch=PER_BATCH, n_test=10, seed=0):
    rng = np.random.default_rng(seed)
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    train_x, train_y = [], []
    for b in range(1, 6):
        rows, nhwc = _cifar_images(rng, per_batch, (b - 1) * per_batch)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        _py2_pickle(d / f"data_batch_{b}", {"batch_label": f"training batch {b} of 5", "labels": labels,
                                            "data": rows, "filenames": [f"img_{b}_{i}.png" for i in range(per_batch)]})
        train_x.append(nhwc)
        train_y += labels
    rows, test_x = _cifar_images(rng, n_test, 0)
    test_y = [int(v) for v in rng.integers(0, 10, n_test)]
    _py2_pickle(d / "test_batch", {"batch_label": "testing batch 1 of 1", "labels": test_y, "data": rows,
                                   "filenames": [f"test_{i}.png" for i in range(n_test)]})
    _py2_pickle(d / "batches.meta", {"num_cases_per_batch": per_batch, "label_names": CIFAR10_NAMES, "num_vis": 3072})
    return np.concatenate(train_x), np.array(train_y), test_x, np.array(test_y)


def write_cifar100(root, n_train=30, n_test=12, seed=1):
    rng = np.random.default_rng(seed)
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    fine_names = [f"fine_{i}" for i in range(100)]
    out = []
    for fname, n in (("train", n_train), ("test", n_test)):
        rows, nhwc = _cifar_images(rng, n, 0)
        fine = [int(v) for v in rng.integers(0, 100, n)]
        _py2_pickle(d / fname, {"filenames": [f"{fname}_{i}.png" for i in range(n)], "batch_label": f"{fname} batch",
                                "fine_labels": fine, "coarse_labels": [v // 5 for v in fine], "data": rows})
        out += [nhwc, np.array(fine)]
    _py2_pickle(d / "meta", {"fine_label_names": fine_names, "coarse_label_names": [f"coarse_{i}" for i in range(20)]})
    return (*out, fine_names)


def _idx_images(x):
    return struct.pack(">IIII", 2051, len(x), x.shape[1], x.shape[2]) + x.astype(np.uint8).tobytes()


def _idx_labels(y):
    return struct.pack(">II", 2049, len(y)) + y.astype(np.uint8).tobytes()


def write_mnist(root, folder="MNIST", n_train=24, n_test=8, seed=2, gz=False):
    """idx files as in the MNIST distribution. torchvision reads the *uncompressed* files from
    <root>/<ClassName>/raw/ and, without download, only checks that they exist (no md5)."""
    rng = np.random.default_rng(seed)
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    out = []
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, n).astype(np.uint8)
        for suffix, blob in (("images-idx3-ubyte", _idx_images(x)), ("labels-idx1-ubyte", _idx_labels(y))):
            if gz:
                (raw / f"{prefix}-{suffix}.gz").write_bytes(gzip.compress(blob))
            else:
                (raw / f"{prefix}-{suffix}").write_bytes(blob)
        out += [x, y]
    return out


def write_svhn(root, n_train=15, n_test=7, seed=3):
    """The .mat layout of the SVHN site: X (32, 32, 3, N) uint8, y (N, 1) with 10 for the digit 0."""
    rng = np.random.default_rng(seed)
    out = []
    for fname, n in (("train_32x32.mat", n_train), ("test_32x32.mat", n_test)):
        nhwc = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
        digits = np.arange(n) % 10  # every digit, 0 included
        y = np.where(digits == 0, 10, digits).astype(np.uint8)[:, None]
        scipy.io.savemat(str(root / fname), {"X": np.ascontiguousarray(nhwc.transpose(1, 2, 3, 0)), "y": y})
        out += [nhwc, digits]
    return out


# ---------------------------------------------------------------------------------------- CIFAR-10
def test_cifar10_files_round_trip(tmp_path, skip_md5):
    train_x, train_y, test_x, test_y = write_cifar10(tmp_path)
    train, test, classes = sources.load_torchvision("cifar10", str(tmp_path), download=False)

    assert train.images.shape == (5 * PER_BATCH, 32, 32, 3) and train.images.dtype == np.uint8
    assert test.images.shape == (10, 32, 32, 3) and test.images.dtype == np.uint8
    assert train.labels.dtype == np.int32 and test.labels.dtype == np.int32
    # The pickled rows are CHW; the loader must hand back the same pixels as HWC, batches 1..5 in order.
    np.testing.assert_array_equal(train.images, train_x)
    np.testing.assert_array_equal(test.images, test_x)
    np.testing.assert_array_equal(train.labels, train_y)
    np.testing.assert_array_equal(test.labels, test_y)
    assert classes == tuple(CIFAR10_NAMES)


def test_cifar10_val_split_is_torch_random_split(tmp_path, skip_md5):
    train_x, train_y, test_x, _ = write_cifar10(tmp_path)
    n, v = len(train_y), 10  # the 45,000/5,000 split of seeds 000/002/004, scaled down to 90/10
    ds = sources.load(cfg(tmp_path, "cifar10", val_size=v))

    assert len(ds.val.labels) == v and len(ds.train.labels) == n - v
    assert len(ds.test.labels) == len(test_x)  # the test set is never split
    assert ds.shape == (32, 32, 3) and ds.num_classes == 10 and ds.class_names == tuple(CIFAR10_NAMES)
    assert ds.mean == sources.STATS["cifar10"][0] and ds.std == sources.STATS["cifar10"][1]

    def indices(split):  # recover each example's original index from the pixels that encode it
        return split.images[:, 0, 0, 0].astype(int) * 256 + split.images[:, 0, 1, 0]

    tr, va = indices(ds.train), indices(ds.val)
    assert not set(tr) & set(va), "train and val share examples"
    assert sorted(np.concatenate([tr, va])) == list(range(n)), "train + val is not the whole training set"

    ref_train, ref_val = torch.utils.data.random_split(range(n), [n - v, v],
                                                       generator=torch.Generator().manual_seed(42))
    np.testing.assert_array_equal(tr, list(ref_train))
    np.testing.assert_array_equal(va, list(ref_val))
    # images and labels stay paired
    np.testing.assert_array_equal(ds.train.images, train_x[tr])
    np.testing.assert_array_equal(ds.train.labels, train_y[tr])
    np.testing.assert_array_equal(ds.val.images, train_x[va])
    np.testing.assert_array_equal(ds.val.labels, train_y[va])


def test_cifar10_no_val_split_keeps_everything_in_order(tmp_path, skip_md5):
    train_x, train_y, _, _ = write_cifar10(tmp_path)
    ds = sources.load(cfg(tmp_path, "cifar10", val_size=0))
    assert ds.val is None
    np.testing.assert_array_equal(ds.train.images, train_x)
    np.testing.assert_array_equal(ds.train.labels, train_y)


def test_cifar10_val_size_too_large_is_a_data_error(tmp_path, skip_md5):
    write_cifar10(tmp_path)
    with pytest.raises(DataError, match="val_size"):
        sources.load(cfg(tmp_path, "cifar10", val_size=5 * PER_BATCH))


def test_cifar10_checksums_are_checked(tmp_path):
    """Without the md5 bypass, files that are not the real ones are reported as corrupt, not loaded."""
    write_cifar10(tmp_path)
    with pytest.raises(DataError, match="corrupted"):
        sources.load(cfg(tmp_path, "cifar10"))


# --------------------------------------------------------------------------------------- CIFAR-100
def test_cifar100_files_round_trip(tmp_path, skip_md5):
    train_x, train_y, test_x, test_y, fine_names = write_cifar100(tmp_path)
    ds = sources.load(cfg(tmp_path, "cifar100", val_size=6))

    assert ds.class_names == tuple(fine_names) and ds.num_classes == 100
    np.testing.assert_array_equal(ds.test.images, test_x)
    np.testing.assert_array_equal(ds.test.labels, test_y)  # fine labels, not coarse
    held = np.concatenate([ds.train.images, ds.val.images])
    labels = np.concatenate([ds.train.labels, ds.val.labels])
    assert len(ds.val.labels) == 6 and len(labels) == len(train_y)
    order = np.lexsort(held.reshape(len(held), -1).T[::-1])
    ref = np.lexsort(train_x.reshape(len(train_x), -1).T[::-1])
    np.testing.assert_array_equal(held[order], train_x[ref])
    np.testing.assert_array_equal(labels[order], train_y[ref])


# ---------------------------------------------------------------------------- MNIST / Fashion-MNIST
@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_idx_files_round_trip(tmp_path, name, folder):
    train_x, train_y, test_x, test_y = write_mnist(tmp_path, folder=folder)
    ds = sources.load(cfg(tmp_path, name))

    assert ds.train.images.shape == (len(train_x), 28, 28, 1) and ds.train.images.dtype == np.uint8
    assert ds.test.images.shape == (len(test_x), 28, 28, 1) and ds.test.images.dtype == np.uint8
    np.testing.assert_array_equal(ds.train.images[..., 0], train_x)
    np.testing.assert_array_equal(ds.test.images[..., 0], test_x)
    np.testing.assert_array_equal(ds.train.labels, train_y)
    np.testing.assert_array_equal(ds.test.labels, test_y)
    assert ds.train.labels.dtype == np.int32
    assert ds.num_classes == 10 and ds.shape == (28, 28, 1)
    assert ds.mean == sources.STATS[name][0]


def test_mnist_is_read_from_its_own_folder(tmp_path):
    """Fashion-MNIST files must not be picked up as MNIST (the two share file names)."""
    write_mnist(tmp_path, folder="FashionMNIST")
    with pytest.raises(DataError):
        sources.load(cfg(tmp_path, "mnist"))


def test_mnist_gz_files_are_enough_as_the_error_says(tmp_path):
    """The missing-data message says the .gz files are enough: with data.download=false too."""
    _, train_y, _, _ = write_mnist(tmp_path, gz=True)
    ds = sources.load(cfg(tmp_path, "mnist"))
    np.testing.assert_array_equal(ds.train.labels, train_y)


# -------------------------------------------------------------------------------------------- SVHN
def test_svhn_mat_files_round_trip(tmp_path, skip_md5):
    train_x, train_d, test_x, test_d = write_svhn(tmp_path)
    ds = sources.load(cfg(tmp_path, "svhn"))

    assert ds.train.images.shape == (len(train_x), 32, 32, 3) and ds.train.images.dtype == np.uint8
    assert ds.train.images.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(ds.train.images, train_x)  # (H, W, C, N) on disk -> NHWC, H and W not swapped
    np.testing.assert_array_equal(ds.test.images, test_x)
    np.testing.assert_array_equal(ds.train.labels, train_d)  # label 10 on disk is the digit 0
    np.testing.assert_array_equal(ds.test.labels, test_d)
    assert ds.train.labels.min() == 0 and ds.train.labels.max() == 9
    assert ds.class_names == tuple(str(i) for i in range(10))


# ------------------------------------------------------------------------------------ missing data
def test_missing_cifar10_says_where_and_how(tmp_path, tvd):
    with pytest.raises(DataError) as info:
        sources.load(cfg(tmp_path, "cifar10"))
    msg = str(info.value)
    assert os.path.join(str(tmp_path), "cifar-10-batches-py") in msg
    assert tvd.CIFAR10.url in msg and "tar xzf" in msg
    assert "download=false" in msg
    assert not os.listdir(tmp_path), "loading with download=False created files"


def test_missing_mnist_says_where_and_how(tmp_path, tvd):
    with pytest.raises(DataError) as info:
        sources.load(cfg(tmp_path, "mnist"))
    msg = str(info.value)
    assert os.path.join(str(tmp_path), "MNIST", "raw") in msg
    assert tvd.MNIST.mirrors[0] in msg and "train-images-idx3-ubyte" in msg
    assert "download=false" in msg


def test_missing_svhn_says_where_and_how(tmp_path, tvd):
    with pytest.raises(DataError) as info:
        sources.load(cfg(tmp_path, "svhn"))
    msg = str(info.value)
    assert os.path.join(str(tmp_path), "train_32x32.mat") in msg
    assert tvd.SVHN.split_list["train"][0] in msg


def test_unknown_data_set_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="imagenet"):
        sources.load(cfg(tmp_path, "imagenet"))


# -------------------------------------------------------------------------------- offline data sets
def test_digits(tmp_path):
    ds = sources.load(cfg(tmp_path, "digits", val_size=100))
    sizes = [len(s.labels) for s in (ds.train, ds.val, ds.test)]
    assert sum(sizes) == 1797
    assert sizes[0] + sizes[1] == int(0.8 * 1797) and sizes[2] == 1797 - int(0.8 * 1797)
    assert sizes[1] == 100
    for s in (ds.train, ds.val, ds.test):
        assert s.images.shape[1:] == (8, 8, 1) and s.images.dtype == np.uint8 and s.labels.dtype == np.int32
    everything = np.concatenate([ds.train.images, ds.val.images, ds.test.images])
    assert everything.min() == 0 and everything.max() == 255  # 0..16 rescaled to the full uint8 range
    assert set(np.concatenate([ds.train.labels, ds.test.labels]).tolist()) == set(range(10))
    assert ds.num_classes == 10
    # statistics come from the training images, in [0, 1] units
    np.testing.assert_allclose(ds.mean, [ds.train.images.mean() / 255], rtol=1e-6)
    np.testing.assert_allclose(ds.std, [ds.train.images.std() / 255], rtol=1e-6)


def test_digits_split_is_disjoint_and_complete(tmp_path):
    ds = sources.load(cfg(tmp_path, "digits"))
    full = np.round(load_digits().images * 255 / 16).astype(np.uint8)
    got = np.concatenate([ds.train.images, ds.test.images])[..., 0]
    key = lambda x: np.lexsort(x.reshape(len(x), -1).T[::-1])  # noqa: E731
    np.testing.assert_array_equal(got[key(got)], full[key(full)])


def test_digits_are_scikit_learns_exactly():
    """Read from scikit-learn's own file without importing it: the same images, labels and order."""
    ref = load_digits()
    split, names = sources.load_digits()
    np.testing.assert_array_equal(split.images[..., 0], np.round(ref.images * 255 / 16).astype(np.uint8))
    np.testing.assert_array_equal(split.labels, ref.target)
    assert split.labels.dtype == np.int32 and names == tuple(map(str, range(10)))


@pytest.mark.parametrize("n", [0, 1, 2, 3, 10, 1797, 50_000])
def test_splits_draw_torchs_randperm_without_torch(n):
    """The held-out and train/test splits are random_split's (torch.randperm with a seeded generator), drawn in
    numpy so a run's start-up does not import torch."""
    for seed in (0, 1, 42, 2**31 + 5, 2**32 - 1):
        want = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
        np.testing.assert_array_equal(sources._permutation(n, seed), want, err_msg=f"n={n} seed={seed}")


def test_toy(tmp_path):
    ds = sources.load(cfg(tmp_path, "toy", num_examples=1000))
    assert len(ds.train.labels) == 800 and len(ds.test.labels) == 200 and ds.val is None
    assert ds.train.images.shape == (800, 1, 1, 2) and ds.train.images.dtype == np.float32
    assert set(np.concatenate([ds.train.labels, ds.test.labels]).tolist()) == {0, 1}
    assert ds.num_classes == 2 and ds.scale == 1.0  # raw coordinates, not pixel values
    # standardised with the training split's statistics (seed 003 used raw coordinates; see conf/data/toy.yaml)
    np.testing.assert_allclose(ds.mean, ds.train.images.reshape(-1, 2).mean(0), rtol=1e-5)
    np.testing.assert_allclose(ds.std, ds.train.images.reshape(-1, 2).std(0), rtol=1e-5)

    again = sources.load(cfg(tmp_path, "toy", num_examples=1000))
    np.testing.assert_array_equal(again.train.images, ds.train.images)
    np.testing.assert_array_equal(again.test.labels, ds.test.labels)
    other = sources.load(cfg(tmp_path, "toy", num_examples=1000, split_seed=7))
    assert not np.array_equal(other.train.images, ds.train.images)


def test_synthetic(tmp_path):
    ds = sources.load(cfg(tmp_path, "synthetic", num_examples=250, image_shape=[12, 10, 2], num_classes=5,
                          val_size=25))
    assert len(ds.train.labels) + len(ds.val.labels) + len(ds.test.labels) == 250
    assert len(ds.test.labels) == 250 - int(0.8 * 250) and len(ds.val.labels) == 25
    assert ds.shape == (12, 10, 2) and ds.train.images.dtype == np.uint8
    assert ds.num_classes == 5 and len(ds.class_names) == 5
    labels = np.concatenate([ds.train.labels, ds.val.labels, ds.test.labels])
    assert labels.min() >= 0 and labels.max() < 5 and len(set(labels.tolist())) == 5
    assert len(ds.mean) == 2 and len(ds.std) == 2
    # learnable: same-class images are closer to their class mean than to other classes' means
    x = ds.train.images.reshape(len(ds.train.labels), -1).astype(np.float32)
    centers = np.stack([x[ds.train.labels == c].mean(0) for c in range(5)])
    nearest = ((x[:, None] - centers[None]) ** 2).sum(-1).argmin(1)
    assert (nearest == ds.train.labels).mean() > 0.95


def test_mean_std_override_broadcasts_and_is_checked(tmp_path):
    ds = sources.load(cfg(tmp_path, "synthetic", num_examples=50, image_shape=[4, 4, 3], mean=[0.5], std=[0.25]))
    assert ds.mean == (0.5, 0.5, 0.5) and ds.std == (0.25, 0.25, 0.25)
    with pytest.raises(DataError, match="channels"):
        sources.load(cfg(tmp_path, "synthetic", num_examples=50, image_shape=[4, 4, 3], mean=[0.5, 0.5], std=[0.2, 0.2]))


# ------------------------------------------------------------------------------------- data.channels
def test_digits_with_three_channels_repeats_the_gray_channel(tmp_path):
    """data.channels=3 on a 1-channel set: each image's gray channel three times (a 3-channel pretrained
    model's input), the same split, statistics per channel."""
    gray = sources.load(cfg(tmp_path, "digits", val_size=100))
    rgb = sources.load(cfg(tmp_path, "digits", val_size=100, channels=3))
    assert rgb.shape == (8, 8, 3)
    for g, c in ((gray.train, rgb.train), (gray.val, rgb.val), (gray.test, rgb.test)):
        assert c.images.shape == g.images.shape[:-1] + (3,) and c.images.dtype == np.uint8
        for k in range(3):
            np.testing.assert_array_equal(c.images[..., k], g.images[..., 0])
        np.testing.assert_array_equal(c.labels, g.labels)
    assert rgb.mean == gray.mean * 3 and rgb.std == gray.std * 3
    assert sources.load(cfg(tmp_path, "digits", channels=1)).shape == (8, 8, 1)  # (as stored: unchanged)


def test_mnist_with_three_channels_keeps_its_published_statistics(tmp_path):
    train_x, *_ = write_mnist(tmp_path, folder="MNIST")
    ds = sources.load(cfg(tmp_path, "mnist", channels=3))
    assert ds.shape == (28, 28, 3)
    np.testing.assert_array_equal(ds.train.images, np.repeat(train_x[..., None], 3, axis=-1))
    assert ds.mean == sources.STATS["mnist"][0] * 3 and ds.std == sources.STATS["mnist"][1] * 3
    given = sources.load(cfg(tmp_path, "mnist", channels=3, mean=[0.5], std=[0.25]))
    assert given.mean == (0.5,) * 3 and given.std == (0.25,) * 3


def test_cifar10_with_one_channel_is_pils_gray(tmp_path, skip_md5):
    """data.channels=1 on an RGB set converts as your own images are converted (PIL's "L")."""
    from PIL import Image

    train_x, _, test_x, _ = write_cifar10(tmp_path)
    ds = sources.load(cfg(tmp_path, "cifar10", channels=1))
    assert ds.shape == (32, 32, 1)
    for got, rgb in ((ds.train.images, train_x), (ds.test.images, test_x)):
        want = np.stack([np.asarray(Image.fromarray(im).convert("L")) for im in rgb])
        np.testing.assert_array_equal(got[..., 0], want)
    np.testing.assert_allclose(ds.mean, [ds.train.images.mean() / 255], rtol=1e-6)  # (its own, not RGB statistics)


def test_channels_of_the_toy_set_are_refused(tmp_path):
    with pytest.raises(DataError, match="data.channels=3: toy holds 2-channel features, not images"):
        sources.load(cfg(tmp_path, "toy", channels=3))


def test_data_channels_in_the_config():
    """Unset: as stored, which the resolved config says (built-in sets: their own count, so runs written when
    data.channels=3 was the schema's default resume; your own images: 3); the toy set's 2-D points take none."""
    from vision_train import fate
    from vision_train.config import from_dict, to_dict
    from vision_train.errors import ConfigError

    from .helpers import compose

    assert compose(["data=digits"]).data.channels == 1 and compose(["data=cifar10"]).data.channels == 3
    assert compose(["data=mnist", "data.channels=3"]).data.channels == 3
    assert compose(["data=image_folder", "data.root=x"]).data.channels == 3
    assert compose(["data=toy"]).data.channels is None
    with pytest.raises(ConfigError, match="data.channels=3: the toy set is 2-D points"):
        compose(["data=toy", "data.channels=3"])
    with pytest.raises(ConfigError, match="data.channels=2: choose one of 1, 3"):
        compose(["data=digits", "data.channels=2"])
    # A config written before (data.channels: 3 for every built-in set, applied to none of them):
    cifar = to_dict(compose(["data=cifar10"]))
    assert fate.differences({**cifar, "data": {**cifar["data"], "channels": 3}}, cifar) == []
    toy = to_dict(compose(["data=toy", "model=mlp"]))
    assert from_dict({**toy, "data": {**toy["data"], "channels": 3}}).data.channels is None
