"""Feeds: how training and evaluation batches reach the jitted steps (DESIGN.md, decision 3).

A feed has two sides. On the host, per step, ``train_args(step)`` returns the arguments the jitted train
step takes after ``(state, acc)``; inside jit, ``train_batch(args, key) -> (x, y)`` turns them into a
prepared (augmented, normalised) batch. Evaluation is the same: ``eval_args(split)`` yields chunks of a
split on the host, and inside jit ``eval_batches(args) -> (fixed, items)`` gives what a scan runs over and
``eval_batch(fixed, item) -> (x, y, mask)`` one batch of it. The order of the training examples is a pure
function of (seed, epoch), so resuming at step s needs no other state.

``DeviceFeed``: the data sets live on every device as uint8; a step gathers its batch by index from the
epoch's permutation, augments and normalises it, all inside jit; an evaluation is one scan over a whole
split (padding masked). A streamed feed (data larger than memory) implements the same methods.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from .. import parallel
from ..data import pipeline
from ..data.sources import Dataset, Split


@dataclass(frozen=True)
class Normalize:
    """Stored values -> the model's input: ``(x * scale - mean) / std`` in the compute dtype."""
    scale: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    dtype: jnp.dtype = jnp.float32

    def __call__(self, x):
        return pipeline.normalize(x, self.scale, self.mean, self.std, self.dtype)


class Feed(Protocol):
    steps_per_epoch: int
    splits: dict[str, Split]   # host copies of the evaluation splits (labels, sample images for media)

    def train_args(self, step: int) -> tuple: ...
    def train_batch(self, args: tuple, key) -> tuple: ...
    def eval_args(self, split: str) -> Iterator[tuple]: ...
    def eval_batches(self, args: tuple) -> tuple: ...
    def eval_batch(self, fixed, item) -> tuple: ...


class DeviceFeed:
    """Every split on every device (replicated); batches gathered inside the jitted steps."""

    def __init__(self, ds: Dataset, *, batch_size: int, normalize: Normalize, mesh, seed: int = 0,
                 aug: pipeline.Augment = pipeline.Augment(), eval_batch_size: int | None = None, train: bool = True,
                 eval_splits: tuple[str, ...] = ("val", "test")):
        """``train=False``: evaluation only (``python -m vision_train.evaluate``): the training split is not
        put on the devices unless it is one of ``eval_splits``."""
        self.ds, self.batch_size, self.seed, self.aug, self.normalize = ds, batch_size, seed, aug, normalize
        self.steps_per_epoch = len(ds.train.labels) // batch_size  # the last partial batch is dropped, as in the seeds
        self.sharding = self._replicated = parallel.replicated(mesh)
        self._batch = parallel.batch_sharded(mesh)
        put = lambda x: parallel.put_replicated(x, self._replicated)  # noqa: E731
        self._train = (put(ds.train.images), put(ds.train.labels)) if train else None
        every = {"train": ds.train, "val": ds.val, "test": ds.test}
        self.splits = {name: every[name] for name in eval_splits if every[name] is not None and len(every[name].labels)}
        eb = eval_batch_size or batch_size
        self._eval = {}
        for name, split in self.splits.items():
            idx, mask = pipeline.eval_batches(len(split.labels), eb)
            self._eval[name] = (put(split.images), put(split.labels), put(idx), put(mask))
        self._permutation = jax.jit(pipeline.epoch_permutation, static_argnums=(2,), out_shardings=self._replicated)
        self._perm_epoch, self._perm = None, None

    def train_args(self, step: int) -> tuple:
        """Step ``step`` (0-based) of the run: the data, the epoch's permutation and the batch's index in it."""
        epoch, index = divmod(step, self.steps_per_epoch)
        if epoch != self._perm_epoch:  # once per epoch, dispatched asynchronously
            self._perm_epoch, self._perm = epoch, self._permutation(self.seed, epoch, len(self.ds.train.labels))
        return (*self._train, self._perm, index)

    def train_batch(self, args: tuple, key):
        images, labels, perm, index = args
        idx = jax.lax.dynamic_slice_in_dim(perm, index * self.batch_size, self.batch_size)
        idx = jax.lax.with_sharding_constraint(idx, self._batch)
        x = pipeline.augment(jnp.take(images, idx, axis=0), key, self.aug)
        return self.normalize(x), jnp.take(labels, idx, axis=0)

    def eval_args(self, split: str) -> Iterator[tuple]:
        yield self._eval[split]  # one chunk: the scan covers the whole split

    def eval_batches(self, args: tuple):
        images, labels, idx, mask = args
        return (images, labels), (idx, mask)

    def eval_batch(self, fixed, item):
        images, labels = fixed
        idx, mask = item
        idx = jax.lax.with_sharding_constraint(idx, self._batch)
        return self.normalize(jnp.take(images, idx, axis=0)), jnp.take(labels, idx, axis=0), mask

    def valid(self, split: str) -> np.ndarray:
        """Which of the eval step's predictions (flattened, padding included) are real examples."""
        return np.asarray(self._eval[split][3]).reshape(-1)
