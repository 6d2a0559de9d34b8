"""The host side of the streamed feed (DESIGN.md, decision 3): what Grain's worker processes run.

No JAX here: Grain starts its workers with ``spawn`` and unpickles these objects in them, so this module
must stay cheap to import (numpy only; the images' own reader, e.g. PIL, comes with the split it reads).

Every element is a pure function of its step. ``TrainBatches(step)`` is this host's rows of step ``step``'s
global batch: the epoch's order (``epoch_order(seed, epoch, n)``, the same in every process and every
worker) sliced at the step's position. ``EvalBatches(b)`` is this host's rows of evaluation batch ``b``,
padded past the end with a mask. So the pipeline's position is its whole state: a run resumed at step s
builds its pipeline from s and reads exactly what the uninterrupted run read, whatever the number of
workers or hosts.

A split's ``images`` is anything indexable by an array of indices: an in-memory or memory-mapped uint8
array, ``NpyImages`` (a ``.npy`` file opened in each process), or ``LazyImages`` over random-access records
(decoded from files on demand).
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time
from typing import Any

import numpy as np


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The training order of ``epoch``: a permutation of 0..n-1 that is a pure function of (seed, epoch).

    Philox's raw output is stable across numpy versions (``Generator`` methods are not promised to be),
    so the order is too: random 64-bit keys, sorted (stably)."""
    keys = np.random.Philox(key=[seed & 0xFFFFFFFFFFFFFFFF, epoch]).random_raw(n)
    return np.argsort(keys, kind="stable").astype(np.int64)


# ------------------------------------------------------------------ repeated augmentation (DeiT's RASampler)
def repeated_epoch_length(n: int, num_repeats: float, selected_round: int = 256) -> int:
    """Examples per epoch under repeated augmentation, DeiT's: the data set's size rounded down to a multiple of
    ``selected_round`` (if it has that many; ``0``: not rounded), not ``num_repeats`` times it. timm's
    ``RepeatAugSampler`` gives each of P processes ``floor(n // 256 * 256 / P)`` (or ``ceil(n / P)`` below 256);
    here the length does not depend on the device count (equal to P times that whenever P divides it)."""
    if num_repeats < 1:
        raise ValueError(f"num_repeats must be >= 1, got {num_repeats}")
    return n // selected_round * selected_round if selected_round and n >= selected_round else n


def epoch_length(n: int, repeats: int) -> int:
    """Examples in an epoch's order: the training split's ``n``, or ``repeated_epoch_length`` under repeated
    augmentation (``repeats`` > 1)."""
    return n if repeats == 1 else repeated_epoch_length(n, repeats)


def repeat_order(perm, num_repeats: float, length: int):
    """``perm`` with each entry repeated ``num_repeats`` times in a row (timm's ``repeat_interleave``; a
    fractional count as timm's ``perm[int(i // num_repeats)]``), cut to its first ``length`` entries. numpy in,
    numpy out; jax in (inside jit too), jax out."""
    if float(num_repeats).is_integer():
        idx = np.arange(length) // int(num_repeats)
    else:
        idx = np.floor_divide(np.arange(length, dtype=np.float64), float(num_repeats)).astype(np.int64)
    return perm[idx]


def host_rows(batch_size: int, process_index: int, process_count: int) -> tuple[int, int]:
    """The rows of a global batch this host reads (its devices' rows: contiguous, in process order)."""
    per = batch_size // process_count
    return process_index * per, (process_index + 1) * per


def take(images, labels: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(images[idx], labels[idx])`` read in ascending index order (sequential reads of a memory-mapped
    file), returned in ``idx``'s order. Records that put the next readable example in the place of one they
    cannot decode (``LazyImages``) give that example's label with its image, never the damaged one's."""
    order = np.argsort(idx, kind="stable")
    out, out_labels = np.empty((len(idx), *images.shape[1:]), images.dtype), np.empty(len(idx), labels.dtype)
    if isinstance(images, LazyImages):
        out[order], out_labels[order] = images.pairs(idx[order])
    else:
        out[order], out_labels[order] = images[idx[order]], labels[idx[order]]
    return out, out_labels


class TrainBatches:
    """``step -> {"step", "images", "labels"}``: this host's rows of the step's global batch (uint8 as stored;
    augmentation and normalisation run inside the jitted step, as for the device-resident feed)."""

    def __init__(self, images, labels: np.ndarray, *, seed: int, batch_size: int, steps_per_epoch: int,
                 rows: tuple[int, int], repeats: int = 1):
        self.images, self.labels = images, np.asarray(labels, np.int32)
        self.seed, self.batch_size, self.steps_per_epoch, self.rows = seed, batch_size, steps_per_epoch, rows
        self.repeats = repeats  # data.repeated_aug: each image this many times in a row (``mixing.repeat_order``)
        self._epoch, self._order = None, None

    def indices(self, step: int) -> np.ndarray:
        epoch, index = divmod(int(step), self.steps_per_epoch)
        if epoch != self._epoch:  # once per epoch in each process
            order = epoch_order(self.seed, epoch, len(self.labels))
            if self.repeats > 1:
                order = repeat_order(order, self.repeats, epoch_length(len(self.labels), self.repeats))
            self._epoch, self._order = epoch, order
        lo, hi = self.rows
        return self._order[index * self.batch_size + lo: index * self.batch_size + hi]

    def __call__(self, step: int) -> dict:
        images, labels = take(self.images, self.labels, self.indices(step))
        return {"step": np.int64(step), "images": images, "labels": labels}


class EvalBatches:
    """``b -> {"images", "labels", "mask"}``: this host's rows of evaluation batch ``b`` of a split of ``n``
    examples, in order; rows past the end repeat example 0 with mask False (they count nowhere)."""

    def __init__(self, images, labels: np.ndarray, *, batch_size: int, rows: tuple[int, int]):
        self.images, self.labels, self.batch_size, self.rows = images, np.asarray(labels, np.int32), batch_size, rows

    @property
    def num_batches(self) -> int:
        return max(1, math.ceil(len(self.labels) / self.batch_size))

    def positions(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self.rows
        pos = np.arange(b * self.batch_size + lo, b * self.batch_size + hi)
        mask = pos < len(self.labels)
        return np.where(mask, pos, 0), mask

    def __call__(self, b: int) -> dict:
        idx, mask = self.positions(b)
        images, labels = take(self.images, self.labels, idx)
        return {"images": images, "labels": labels, "mask": mask}


class NpyImages:
    """A ``.npy`` file of uint8 images, memory-mapped in each process that reads it (pickles as its path,
    not its contents, so worker processes do not receive a copy of the data)."""

    def __init__(self, path: str):
        self.path = str(path)
        self._array = None
        self.shape, self.dtype = self._open().shape, self._open().dtype

    def _open(self) -> np.ndarray:
        if self._array is None:
            self._array = np.load(self.path, mmap_mode="r")
        return self._array

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx) -> np.ndarray:
        return np.asarray(self._open()[idx])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_array": None}


class LazyImages:
    """Images decoded on demand from random-access ``records`` (``len``, ``records[i] -> (image, label)``,
    images of one shape): indexable like an array (an int, a slice or an array of indices)."""

    def __init__(self, records: Any, shape: tuple[int, ...], dtype=np.uint8):
        self.records = records
        self.shape, self.dtype = (len(records), *shape), np.dtype(dtype)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx) -> np.ndarray:
        if isinstance(idx, (int, np.integer)):
            return np.asarray(self.records[int(idx)][0], self.dtype)
        idx = np.arange(len(self))[idx] if isinstance(idx, slice) else np.asarray(idx).reshape(-1)
        return self.pairs(idx)[0]

    def pairs(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The images at ``idx`` and the labels the records give with them."""
        out, labels = np.empty((len(idx), *self.shape[1:]), self.dtype), np.empty(len(idx), np.int32)
        for j, i in enumerate(idx):
            out[j], labels[j] = self.records[int(i)]
        return out, labels


HELD = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def starting_workers():
    """Around the start of worker processes (they start in here, from threads started in here):

    Ctrl-C and SIGTERM are held back from this thread. A worker inherits the mask: held, a signal sent to
    the process group waits in it until ``WorkerInit`` ignores it, instead of a KeyboardInterrupt traceback
    from a worker still importing (seconds) and the pipeline failing with it. Here the signal goes to
    another thread, or waits to the end of the block: Python runs its handler on the main thread either
    way. (multiprocessing guards its resource tracker's start so too, bpo-33613, then unblocks the
    signals: the tracker is started first, outside the block.)

    A spawned worker first sets the start method of the process that started it. In the joblib launcher's
    processes that is loky's, which a fresh process does not know ("cannot find context for 'loky'": every
    worker dead): spawn's meanwhile."""
    import multiprocessing
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()
    method = multiprocessing.get_start_method(allow_none=True)
    foreign = method not in (None, *multiprocessing.get_all_start_methods())
    if foreign:
        multiprocessing.set_start_method("spawn", force=True)
    old = signal.pthread_sigmask(signal.SIG_BLOCK, HELD)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
        if foreign:
            multiprocessing.set_start_method(method, force=True)


class WorkerInit:
    """Run first in every worker process. Ctrl-C reaches the whole process group: the training process
    stops the run and then its workers, so the workers ignore it (no traceback from them). And a worker
    must not outlive a training process killed with -9 (Grain's own shutdown covers the other exits): a
    thread of the worker checks every second that its parent is alive. (The kernel's PR_SET_PDEATHSIG
    would be prompter, but it fires when the parent's *thread* that started the worker ends.)"""

    def __init__(self):
        self.parent = os.getpid()

    def __call__(self, *args) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # (a group-wide SIGTERM: the parent stops them)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD)  # (held while it started: starting_workers)
        threading.Thread(target=self._watch, name="parent-watch", daemon=True).start()

    def _watch(self) -> None:
        while os.getppid() == self.parent:
            time.sleep(1.0)
        os._exit(0)
