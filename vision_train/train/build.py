"""Builders: the pieces that training (``assembly.assemble``) and the command lines that use a trained model
(``python -m vision_train.evaluate``, ``python -m vision_train.predict``) share, each built one way here.

    hw = hardware(cfg.hardware)                       # devices, the data-parallel mesh, process 0
    ds, streamed, in_shape = data(cfg.data)           # the data set, whether it streams, the model's input shape
    batches = feed(ds, streamed, cfg.data, batch_size=B, mesh=hw.mesh, normalize=normalize(...))
    step = eval_step(graphdef, batches, label_smoothing=..., sharding=hw.replicated)
    probs = predict_fn(graphdef, batches.normalize, batches.size)
    trained = restore_model(read_checkpoint(path), hw.shardings)    # a checkpoint's model, rebuilt from its config

So evaluating a checkpoint runs its training run's own eval step over the same kind of feed, and a prediction
normalises images as training did. A checkpoint knows no models (``vision_train.checkpoint``): the model is
rebuilt here from the config the checkpoint carries.

Imports JAX: the command lines import this after they have set ``XLA_FLAGS``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from .. import checkpoint as ckpt_lib
from .. import config as config_lib
from .. import models, parallel
from ..data import augment as augment_ops
from ..data import mixing as mixing_lib
from ..data import pipeline
from ..data.load import load_data
from ..data.sources import Dataset
from ..errors import UserError
from . import steps as steps_lib
from .feeds import Feed, Normalize, input_shape, make_feed


# ---------------------------------------------------------------------------------------- hardware
@dataclass(frozen=True)
class Hardware:
    devices: list
    mesh: Any           # data x fsdp (hardware.fsdp)
    replicated: Any     # NamedSharding over the whole mesh (sums fetchable from any process, small arrays)
    is_main: bool       # process 0: writes the files and talks to W&B
    sharding_rules: Any = None  # hardware.sharding_rules

    def shardings(self, tree, params=None):
        """Where each array of ``tree`` (a train state, a checkpoint's parameters; arrays or their shapes) goes: a
        parameter and what mirrors it (moving average, optimizer moments) sharded over fsdp by the rule or
        ``hardware.sharding_rules``, the rest replicated (``parallel.state_shardings``). ``params``: the tree's
        parameters (default: ``tree.params`` or ``tree["params"]``)."""
        if params is None:
            params = tree["params"] if isinstance(tree, dict) else tree.params
        return parallel.state_shardings(tree, params, self.mesh, self.sharding_rules)


def join_processes(h) -> bool:
    """``hardware.distributed``: join the run's other processes (``jax.distributed``), before anything starts
    JAX's backend (reading a checkpoint does). Whether this process is one of several."""
    return parallel.initialize_distributed(h.distributed, h.platform)


def hardware(h) -> Hardware:
    """``hardware.*`` -> the devices (the platform's, or its first ``num_devices``) and the mesh over them; after
    ``join_processes`` (the training loop's ``parallel_setup``), so a run of several processes has them all. The mesh is
    data x fsdp (``hardware.fsdp``; 1: data parallelism)."""
    devices = parallel.select_devices(h.platform, h.num_devices)
    mesh = parallel.make_mesh(devices, getattr(h, "fsdp", 1))
    return Hardware(devices, mesh, parallel.replicated(mesh), jax.process_index() == 0,
                    dict(getattr(h, "sharding_rules", None) or {}))


def compute_dtype(precision: str):
    """``hardware.precision`` -> the dtype the model computes in (its parameters stay float32)."""
    return jnp.bfloat16 if precision == "bfloat16" else jnp.float32


# -------------------------------------------------------------------------------------- data, feed
def data(d) -> tuple[Dataset, bool, tuple[int, ...]]:
    """``data.*`` -> (the data set, whether it streams, the model's input shape: the stored images', or
    data.image_size for a built-in set resampled inside the jitted steps)."""
    ds, streamed = load_data(d)
    return ds, streamed, input_shape(ds, d)


def normalize(scale: float, mean, std, precision: str) -> Normalize:
    """Stored values -> the model's input, ``(x * scale - mean) / std`` in the compute dtype of ``precision``."""
    return Normalize(scale, tuple(mean), tuple(std), compute_dtype(precision))


def feed(ds: Dataset, streamed: bool, d, *, batch_size: int, mesh, normalize: Normalize, **kwargs) -> Feed:
    """The feed of ``ds`` (streamed or device-resident; ``feeds.make_feed``): training's (``seed``, ``aug``), or
    evaluation's alone (``train=False``, ``eval_splits``)."""
    return make_feed(ds, streamed, d, batch_size=batch_size, mesh=mesh, normalize=normalize, **kwargs)


# ---------------------------------------------------------------------------------- augmentation
def augmentation(a, ds: Dataset, batch_size: int) -> pipeline.Augment:
    """``data.augment.*`` -> the training batch's augmentation (``pipeline.train_images``): the crop and flip, the
    policy's ops and colour jitter (``data.augment``'s pure-JAX ops; geometric ops fill with the data set's mean
    colour, ``round(mean / scale)`` as timm's ``img_mean``), random erasing. The ops are chosen per group of
    ``gcd(batch_size, 8)`` images (``data.augment``'s docstring says why and what it costs)."""
    policy = None
    if a.policy != "none":
        fill = tuple(float(round(m / ds.scale)) for m in ds.mean)
        groups = math.gcd(batch_size, 8)
        if a.policy == "randaugment":
            policy = augment_ops.policy("rand", a.num_ops, a.magnitude, magnitude_std=a.magnitude_std, fill=fill,
                                        groups=groups, color_jitter=a.color_jitter or None)
        elif a.policy == "trivialaugment":
            policy = augment_ops.policy("trivial", groups=groups, color_jitter=a.color_jitter or None)
        else:  # 3augment: its colour jitter is data.augment.color_jitter (DeiT III: 0.3; 0 = off)
            policy = augment_ops.policy("3a", fill=fill, groups=groups, color_jitter=a.color_jitter)
    elif a.color_jitter > 0:  # colour jitter alone (timm's --color-jitter without an auto-augment policy)
        policy = augment_ops.Policy("rand", (), num_ops=0, groups=None,
                                    color_jitter=(a.color_jitter, a.color_jitter, a.color_jitter, 0.0))
    return pipeline.Augment(a.flip, a.random_resized_crop, tuple(a.crop_scale), tuple(a.crop_ratio), a.pad_crop,
                            policy=policy, erasing=a.random_erasing)


def mixing(a) -> mixing_lib.Mixing | None:
    """``data.augment``'s mixup / CutMix keys -> timm's ``Mixup`` arguments, or None where both are off."""
    m = mixing_lib.Mixing(mixup_alpha=a.mixup_alpha, cutmix_alpha=a.cutmix_alpha, prob=a.mix_prob,
                          switch_prob=a.switch_prob, mode=a.mix_mode)
    return m if m.enabled else None


# ------------------------------------------------------------------------------ steps from a graphdef
def eval_step(graphdef, feed: Feed, *, label_smoothing: float, sharding) -> Callable:
    """The eval step over ``feed``'s chunks, jitted: ``(params, other, sums, args) -> (sums, pred, confidence)``;
    the sums placed with ``sharding`` (replicated: fetchable from any process)."""
    return jax.jit(steps_lib.make_eval_step(graphdef, feed.eval_batches, feed.eval_batch,
                                            label_smoothing=label_smoothing), out_shardings=sharding)


def predict_fn(graphdef, normalize: Normalize, size: tuple[int, int] | None = None) -> Callable:
    """Prediction, jitted: ``(params, other, images) -> class probabilities`` for images as stored, resampled to
    ``size`` (H, W) where given and normalised, as the eval step prepares them."""
    return jax.jit(steps_lib.make_predict(graphdef, normalize, size))


# --------------------------------------------------------------------------- a checkpoint's model
class Checkpoint(NamedTuple):
    """A checkpoint's metadata (no array read): what its model is rebuilt from."""
    config: Any        # the Config it was trained with, validated against its model's schema
    data: dict         # its training data's facts: shape (the model's input), class_names, mean, std, scale
    step: int
    meta: dict         # the whole JSON metadata (W&B run id, versions, ...)
    directory: Path    # the checkpoints directory

    @property
    def path(self) -> Path:
        return self.directory / str(self.step)


class Restored(NamedTuple):
    """A checkpoint's model: its graphdef, its trained parameters and other state (``nnx.split``'s parts)."""
    graphdef: Any
    params: Any
    other: Any
    checkpoint: Checkpoint

    @property
    def model(self):
        return nnx.merge(self.graphdef, self.params, self.other)


def read_checkpoint(path: str | Path) -> Checkpoint:
    """A run dir, its checkpoints dir or one step's dir (the latest step unless one is named) -> its metadata,
    the config it carries validated (a ``CheckpointError`` where it is not a vision_train checkpoint's)."""
    directory, step, meta = ckpt_lib.read_meta(path)
    try:
        cfg = config_lib.from_dict(meta["config"])
        facts = meta["data"]
    except (KeyError, TypeError, UserError) as e:
        raise ckpt_lib.CheckpointError(f"{directory} is not a vision_train checkpoint (its metadata: {e})") from None
    return Checkpoint(cfg, facts, step, meta, directory)


def restore_model(ck: Checkpoint, sharding=None) -> Restored:
    """The model ``ck`` was trained, built from its config and given its trained parameters (placed with
    ``sharding``, or ``Hardware.shardings``: over the mesh by the FSDP rule; default: the first device). The
    optimizer state is not read."""
    cfg, facts = ck.config, ck.data
    num_classes = cfg.model.num_classes or len(facts["class_names"])
    abstract = nnx.eval_shape(lambda: models.create(cfg.model, tuple(facts["shape"]), num_classes,
                                                    rngs=nnx.Rngs(params=0, dropout=1),
                                                    dtype=compute_dtype(cfg.hardware.precision)))
    graphdef, params, other = nnx.split(abstract, nnx.Param, ...)
    # replace_by_pure_dict does not check shapes: checked here, naming what differs, before anything is read.
    ckpt_lib.check_compatible(ck.meta, ckpt_lib.param_shapes(params), ck.path)
    arrays = ckpt_lib.read_params(ck.directory, ck.step, sharding)
    nnx.replace_by_pure_dict(params, ckpt_lib.pure(arrays["params"]))
    if arrays["other"]:
        nnx.replace_by_pure_dict(other, ckpt_lib.pure(arrays["other"]))
    return Restored(graphdef, params, other, ck)
