"""A data config -> its data set, and whether it streams: the one place that picks between the built-in sets
(``sources``) and your own images (``files``).

    ds, streamed = load_data(cfg.data)   # what training and evaluation feed (``train.feeds``)
    ds = load(cfg.data)                  # in memory (your own images: decoded into the cache)

``files`` imports ``sources`` (its ``Dataset``, the seeded split), never the other way round; this module
imports both. No JAX here.
"""

from __future__ import annotations

import numpy as np

from . import files, sources
from .sources import Dataset, Split
from .stream import LazyImages


def load_data(d) -> tuple[Dataset, bool]:
    """The data set of ``d`` (a DataConfig) and whether it streams (``data.stream``, ``data.cache``): built-in
    sets are in memory (streamed from there with data.stream=true); your own images are decoded once into a
    cache when they fit, else streamed from their files (``vision_train.data.files``)."""
    if d.kind == "builtin":
        return sources.load(d), str(d.stream).lower() == "true"
    images = files.open_images(d)
    if files.plan(d, images) == "cache":
        return files.load_cached(images, d), False
    split = lambda records: None if records is None else Split(  # noqa: E731
        LazyImages(records, tuple(images.shape)), np.asarray(records.labels, np.int32))
    return Dataset(images.name, split(images.splits["train"]), split(images.splits.get("val")),
                   split(images.splits["test"]), tuple(images.class_names), tuple(images.mean), tuple(images.std),
                   images.scale), True


def load(d) -> Dataset:
    """The data set of ``d`` in memory, whatever ``data.cache``/``data.stream`` say: a built-in set as loaded,
    your own images decoded once into the cache and memory-mapped from it."""
    if getattr(d, "kind", "builtin") == "builtin":
        return sources.load(d)
    return files.load_cached(files.open_images(d), d)
