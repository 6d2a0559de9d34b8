"""Feeds: how training and evaluation batches reach the jitted steps (DESIGN.md, decision 3).

A feed has two sides. On the host, ``start_epoch(step)`` prepares an epoch before its clock starts, and per
step ``train_args(step)`` returns the arguments the jitted train step takes after ``(state, train_sums)``;
inside jit, ``train_batch(args, key) -> (x, y)`` turns them into a prepared (augmented, normalised) batch.
Evaluation is the same: ``eval_args(split)`` yields chunks of a split on the host, and inside jit
``eval_batches(args) -> (fixed, items)`` gives what a scan runs over and ``eval_batch(fixed, item) -> (x, y,
mask)`` one batch of it. The order of the training examples is a pure
function of (seed, epoch), so resuming at step s needs no other state.

``DeviceFeed``: the data sets live on every device as uint8; a step gathers its batch by index from the
epoch's permutation, augments and normalises it, all inside jit; an evaluation is one scan over a whole
split (padding masked).

``StreamFeed``: data larger than memory. Grain reads each host's rows of every step's batch from a
random-access source (files decoded on demand, or a memory-mapped array) in worker processes, ahead of
the step; the global batch is assembled from the hosts' rows (``jax.make_array_from_process_local_data``),
and augmentation and normalisation run inside jit exactly as for ``DeviceFeed``. Each element is a pure
function of its step (``data.stream``), so the pipeline's position is its state.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from .. import parallel
from ..data import mixing, pipeline
from ..data import stream as host
from ..data.sources import Dataset, Split

log = logging.getLogger("vision_train")


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
    """What the loop, the steps, the hooks, evaluation and the checkpoints ask of a feed (``DeviceFeed``,
    ``StreamFeed``)."""
    batch_size: int
    steps_per_epoch: int           # the last partial batch of an epoch is dropped
    splits: dict[str, Split]       # host copies of the evaluation splits (labels, sample images for media)
    sharding: NamedSharding        # replicated over the mesh (the eval sums, fetchable from any process)
    normalize: Normalize           # stored values -> the model's input (prediction normalises with it too)
    size: tuple[int, int] | None   # the model's input (H, W) where the stored images differ (resampled in jit)

    def start_epoch(self, step: int) -> None:
        """Before step ``step`` (0-based) when it opens an epoch or is this process's first: what the epoch's
        steps need (the permutation; the pipeline at ``step``), prepared before the epoch's clock starts."""
    def train_args(self, step: int) -> tuple: ...
    def train_batch(self, args: tuple, key) -> tuple: ...
    def eval_args(self, split: str) -> Iterator[tuple]: ...
    def eval_batches(self, args: tuple) -> tuple: ...
    def eval_batch(self, fixed, item) -> tuple: ...
    def valid(self, split: str) -> np.ndarray: ...
    def state(self) -> dict:
        """What a checkpoint's metadata records of the feed ({}: nothing, the order is a function of the step)."""
    def close(self) -> None: ...


class DeviceFeed:
    """Every split on every device (replicated); batches gathered inside the jitted steps."""

    def __init__(self, ds: Dataset, *, batch_size: int, normalize: Normalize, mesh, seed: int = 0,
                 aug: pipeline.Augment = pipeline.Augment(), eval_batch_size: int | None = None, train: bool = True,
                 eval_splits: tuple[str, ...] = ("val", "test"), size: tuple[int, int] | None = None,
                 repeats: int = 1):
        """``train=False``: evaluation only (``python -m vision_train.evaluate``): the training split is not
        put on the devices unless it is one of ``eval_splits``. ``repeats`` (data.repeated_aug): each image that
        many times in a row in the epoch's order (``data.mixing.repeated_order``)."""
        self.ds, self.batch_size, self.seed, self.aug, self.normalize = ds, batch_size, seed, aug, normalize
        self.size = size  # the model's input (H, W) when the stored images differ (resampled inside jit)
        self.repeats = repeats
        # the last partial batch is dropped, as in the seeds
        self.steps_per_epoch = host.epoch_length(len(ds.train.labels), repeats) // batch_size
        self.sharding = self._replicated = parallel.replicated(mesh)
        self._batch = parallel.batch_sharded(mesh)
        put = lambda x: parallel.put_replicated(x, self._replicated)
        self._train = (put(ds.train.images), put(ds.train.labels)) if train else None
        every = {"train": ds.train, "val": ds.val, "test": ds.test}
        self.splits = {name: every[name] for name in eval_splits if every[name] is not None and len(every[name].labels)}
        eb = eval_batch_size or batch_size
        self._eval = {}
        for name, split in self.splits.items():
            idx, mask = pipeline.eval_batches(len(split.labels), eb)
            self._eval[name] = (put(split.images), put(split.labels), put(idx), put(mask))
        order = (pipeline.epoch_permutation if repeats == 1 else
                 lambda seed, epoch, n: mixing.repeated_order(n, repeats, seed, epoch))
        self._permutation = jax.jit(order, static_argnums=(2,), out_shardings=self._replicated)
        self._perm_epoch, self._perm = None, None

    def start_epoch(self, step: int) -> None:
        """The epoch's permutation: computed once per epoch (compiled once per run), dispatched asynchronously."""
        epoch = step // self.steps_per_epoch
        if epoch != self._perm_epoch:
            self._perm_epoch, self._perm = epoch, self._permutation(self.seed, epoch, len(self.ds.train.labels))

    def train_args(self, step: int) -> tuple:
        """Step ``step`` (0-based) of the run: the data, the epoch's permutation and the batch's index in it."""
        self.start_epoch(step)  # (the permutation already there unless the caller skipped start_epoch)
        return (*self._train, self._perm, step % self.steps_per_epoch)

    def train_batch(self, args: tuple, key):
        images, labels, perm, index = args
        idx = jax.lax.dynamic_slice_in_dim(perm, index * self.batch_size, self.batch_size)
        idx = jax.lax.with_sharding_constraint(idx, self._batch)
        x = pipeline.train_images(jnp.take(images, idx, axis=0), key, self.aug, self.normalize, self.size)
        return x, jnp.take(labels, idx, axis=0)

    def eval_args(self, split: str) -> Iterator[tuple]:
        yield self._eval[split]  # one chunk: the scan covers the whole split

    def eval_batches(self, args: tuple):
        images, labels, idx, mask = args
        return (images, labels), (idx, mask)

    def eval_batch(self, fixed, item):
        images, labels = fixed
        idx, mask = item
        idx = jax.lax.with_sharding_constraint(idx, self._batch)
        return self.normalize(pipeline.resize(jnp.take(images, idx, axis=0), self.size)), jnp.take(labels, idx, axis=0), mask

    def valid(self, split: str) -> np.ndarray:
        """Which of the eval step's predictions (flattened, padding included) are real examples."""
        return np.asarray(self._eval[split][3]).reshape(-1)

    def state(self) -> dict:
        return {}  # the order is a pure function of (seed, epoch): resuming at a step needs nothing else

    def close(self) -> None:
        pass


class StreamFeed:
    """Batches read on the host, ahead of the step, by Grain (``data.workers`` processes), each host its own
    rows; evaluation batches in chunks of ``eval_chunk`` batches per scan. The same jitted step as
    ``DeviceFeed`` after the gather: ``train_batch`` augments and normalises the uint8 batch it is given.

    ``ds``'s splits may hold their images as any array-like indexable by index arrays (``data.stream``):
    they are pickled to the worker processes, so give large ones as files (``NpyImages``, ``LazyImages``)."""

    def __init__(self, ds: Dataset, *, batch_size: int, normalize: Normalize, mesh, seed: int = 0,
                 aug: pipeline.Augment = pipeline.Augment(), eval_batch_size: int | None = None, train: bool = True,
                 eval_splits: tuple[str, ...] = ("val", "test"), workers: int = 2, prefetch: int = 4,
                 eval_chunk: int = 8, size: tuple[int, int] | None = None, repeats: int = 1):
        self.ds, self.batch_size, self.seed, self.aug, self.normalize = ds, batch_size, seed, aug, normalize
        self.size = size  # the model's input (H, W) when the stored images differ (resampled inside jit)
        self.workers, self.prefetch = workers, max(1, prefetch)
        self.repeats = repeats  # data.repeated_aug (as DeviceFeed's)
        # the last partial batch is dropped, as in-memory
        self.steps_per_epoch = host.epoch_length(len(ds.train.labels), repeats) // batch_size
        self.sharding = parallel.replicated(mesh)
        self._batch = parallel.batch_sharded(mesh)
        self._chunk_sharding = parallel.batch_sharded(mesh, dim=1)  # (chunks of batches: split each batch)
        pc, pi = jax.process_count(), jax.process_index()
        self._train = (host.TrainBatches(ds.train.images, ds.train.labels, seed=seed, batch_size=batch_size,
                                         steps_per_epoch=self.steps_per_epoch, rows=host.host_rows(batch_size, pi, pc),
                                         repeats=repeats)
                       if train else None)
        every = {"train": ds.train, "val": ds.val, "test": ds.test}
        self.splits = {name: every[name] for name in eval_splits if every[name] is not None and len(every[name].labels)}
        eb = eval_batch_size or batch_size
        self._eval = {name: host.EvalBatches(split.images, split.labels, batch_size=eb, rows=host.host_rows(eb, pi, pc))
                      for name, split in self.splits.items()}
        self._chunk = {name: min(eval_chunk, e.num_batches) for name, e in self._eval.items()}
        self._it, self._next, self._ahead = None, None, None

    # ------------------------------------------------------------------ training
    def _open(self, step: int) -> None:
        """The pipeline from step ``step`` on: a pure function of the step, so this is also how a resumed run
        continues exactly where the checkpoint was taken."""
        grain = _grain()
        self.close()
        ds = grain.MapDataset.range(step, 2**62).map(self._train)  # (lazy: elements are made when read)
        if self.workers > 0:  # each worker reads whole batches, ahead; results come back in step order
            it = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1)).mp_prefetch(
                grain.MultiprocessingOptions(num_workers=self.workers,
                                             per_worker_buffer_size=max(1, math.ceil(self.prefetch / self.workers))),
                worker_init_fn=host.WorkerInit())
        else:  # in this process, one thread reading ahead
            it = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=self.prefetch))
        self._next = step
        if self.workers > 0:
            with host.starting_workers():  # (Ctrl-C held back from them, the start method theirs)
                self._it = iter(it)
                self._ahead = next(self._it)
        else:
            self._it = iter(it)

    def start_epoch(self, step: int) -> None:
        """The pipeline at ``step`` (opened there, its workers started, when it is elsewhere) and the epoch's
        first batch read, before the epoch's clock starts."""
        if self._it is None or self._next != step:
            self._open(step)
        if self._ahead is None:
            self._ahead = next(self._it)

    def train_args(self, step: int) -> tuple:
        """Step ``step``'s batch on the devices: (images uint8, labels), each host's rows read by its pipeline."""
        if self._it is None or self._next != step:
            self._open(step)
        item, self._ahead = self._ahead if self._ahead is not None else next(self._it), None
        if int(item["step"]) != step:  # cannot happen unless the pipeline is wrong: never train on another batch
            raise RuntimeError(f"the input pipeline gave step {int(item['step'])}'s batch for step {step}")
        self._next = step + 1
        # Copied out of the worker's shared memory (freed when its array is dropped: a device array on the CPU
        # may alias host memory it is given, and must not alias memory that is about to be unmapped).
        images, labels = np.array(item["images"]), np.array(item["labels"])
        del item
        return self._global(images, self._batch), self._global(labels, self._batch)

    def _global(self, local: np.ndarray, sharding) -> jax.Array:
        """This host's rows -> the global array (every host contributes its rows; no host holds the whole)."""
        return jax.make_array_from_process_local_data(sharding, local)

    def train_batch(self, args: tuple, key):
        images, labels = args
        return pipeline.train_images(images, key, self.aug, self.normalize, self.size), labels

    def state(self) -> dict:
        """The pipeline's position (for a checkpoint's metadata): the next step it reads."""
        return {"next_step": self._next}

    # ------------------------------------------------------------------ evaluation
    def eval_args(self, split: str) -> Iterator[tuple]:
        """Chunks of ``eval_chunk`` batches (the last padded with empty batches, so one program serves every
        chunk), read by threads of this process ahead of the scan."""
        grain = _grain()
        ev, k = self._eval[split], self._chunk[split]
        ds = grain.MapDataset.range(ev.num_batches).map(ev)
        it = ds.to_iter_dataset(grain.ReadOptions(num_threads=max(1, self.workers), prefetch_buffer_size=2 * k))
        batches = []
        for b in it:
            batches.append(b)
            if len(batches) == k:
                yield self._eval_chunk(batches)
                batches = []
        if batches:
            empty = {**batches[0], "mask": np.zeros_like(batches[0]["mask"])}
            yield self._eval_chunk(batches + [empty] * (k - len(batches)))

    def _eval_chunk(self, batches: list[dict]) -> tuple:
        return tuple(self._global(np.stack([b[key] for b in batches]), self._chunk_sharding)
                     for key in ("images", "labels", "mask"))

    def eval_batches(self, args: tuple):
        return (), args

    def eval_batch(self, fixed, item):
        images, labels, mask = item
        images = jax.lax.with_sharding_constraint(images, self._batch)
        return self.normalize(pipeline.resize(images, self.size)), labels, mask

    def valid(self, split: str) -> np.ndarray:
        ev, k = self._eval[split], self._chunk[split]
        n_batches = math.ceil(ev.num_batches / k) * k
        return np.arange(n_batches * ev.batch_size) < len(ev.labels)

    def close(self) -> None:
        """Stops the worker processes (also at garbage collection; this makes it prompt)."""
        it, self._it, self._ahead = self._it, None, None
        if it is not None and hasattr(it, "close"):
            it.close()


def _grain():
    """Grain (imported on the streamed path only). Its worker processes read its absl flags, which a program
    that does not start through ``absl.app`` never parses: take their defaults."""
    import grain
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    return grain


def make_feed(ds: Dataset, streamed: bool, d, **kwargs):
    """The feed for ``ds``: ``StreamFeed`` (with ``d``'s workers and prefetch) or ``DeviceFeed``, resampling
    batches to the model's input (``input_shape``) where the stored images differ from it."""
    shape = input_shape(ds, d)
    kwargs["size"] = None if shape == tuple(ds.shape) else shape[:2]
    kwargs.setdefault("repeats", getattr(d, "repeated_aug", 1))
    if streamed:
        log.info("streaming %s from %s: %s read batches ahead (data.workers=%d, data.prefetch=%d)", ds.name,
                 "memory" if d.kind == "builtin" else "its files",
                 f"{d.workers} worker processes" if d.workers else "a thread of this process", d.workers, d.prefetch)
        return StreamFeed(ds, workers=d.workers, prefetch=d.prefetch, **kwargs)
    return DeviceFeed(ds, **kwargs)


def input_shape(ds: Dataset, d) -> tuple[int, ...]:
    """The model's input shape: the stored images', or (data.image_size, data.image_size, C) for a built-in set
    resampled inside the jitted step."""
    if d.kind == "builtin" and d.image_size is not None and (d.image_size, d.image_size) != tuple(ds.shape[:2]):
        return (d.image_size, d.image_size, ds.shape[2])
    return tuple(ds.shape)
