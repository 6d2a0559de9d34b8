"""Pure train and eval steps. Built once per run by ``make_steps`` and jitted once; the graphdef, the
augmentation and the normalisation constants are closed over, everything that changes is an argument."""

from __future__ import annotations

import collections
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ..data import pipeline
from .state import TrainState

# Equal-width confidence bins of the expected calibration error (the eval step counts them).
CALIBRATION_BINS = 15

# Times each step function was traced (a test asserts the train step is traced once per run).
TRACES: collections.Counter = collections.Counter()


def new_accumulator() -> dict:
    """Running sums the train step adds to; fetched (and reset) only on log steps and at epoch end."""
    z = lambda: jnp.zeros((), jnp.float32)  # noqa: E731  (distinct buffers: they are donated)
    return {"loss": z(), "correct": z(), "count": z(), "grad_norm": z(), "steps": z(),
            "nan_step": jnp.full((), -1, jnp.int32)}


class Steps(NamedTuple):
    train: Callable    # (state, acc, images, labels, perm, index) -> (state, acc): gather, augment, update
    eval: Callable     # (params, other, images, labels, idx, mask) -> sums, confusion, calibration bins, predictions
    predict: Callable  # (params, other, images) -> class probabilities
    update: Callable   # (state, acc, x, y) -> (state, acc): the train step after its input pipeline


def make_steps(graphdef, tx: optax.GradientTransformation, *, batch_size: int, aug: pipeline.Augment,
               scale: float, mean, std, dtype, label_smoothing: float, batch_sharding) -> Steps:
    """The step functions, not yet jitted."""

    def forward(params, other, x, *, train: bool, key=None):
        model = nnx.merge(graphdef, params, other, copy=True)  # fresh Variables at this trace level
        if key is not None:
            nnx.reseed(model, dropout=key)
        return model(x, train=train).astype(jnp.float32)

    def loss_fn(logits, labels, num_classes):
        targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing) \
            if label_smoothing else jax.nn.one_hot(labels, num_classes)
        return optax.softmax_cross_entropy(logits, targets)

    def update(state: TrainState, acc: dict, x, y):
        """Forward, backward, optimizer update and running sums on a prepared (normalised) batch."""
        _, k_drop = jax.random.split(_step_key(state))

        def objective(params):
            logits = forward(params, state.other, x, train=True, key=k_drop)
            return loss_fn(logits, y, logits.shape[-1]).mean(), logits

        (loss, logits), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        bad = ~jnp.isfinite(loss)
        acc = {
            "loss": acc["loss"] + loss * batch_size,
            "correct": acc["correct"] + jnp.sum(jnp.argmax(logits, -1) == y),
            "count": acc["count"] + batch_size,
            "grad_norm": acc["grad_norm"] + optax.global_norm(grads),
            "steps": acc["steps"] + 1,
            # 1-based, like the step numbers in metrics.jsonl and W&B
            "nan_step": jnp.where(bad & (acc["nan_step"] < 0), state.step + 1, acc["nan_step"]),
        }
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), acc

    def train_step(state: TrainState, acc: dict, images, labels, perm, index):
        TRACES["train_step"] += 1
        idx = jax.lax.dynamic_slice_in_dim(perm, index * batch_size, batch_size)
        idx = jax.lax.with_sharding_constraint(idx, batch_sharding)
        k_aug, _ = jax.random.split(_step_key(state))
        x = pipeline.augment(jnp.take(images, idx, axis=0), k_aug, aug)
        x = pipeline.normalize(x, scale, mean, std, dtype)
        return update(state, acc, x, jnp.take(labels, idx, axis=0))

    def eval_step(params, other, images, labels, idx, mask):
        """One pass over a whole split (idx, mask: (num_batches, batch)); every example counted once."""
        TRACES["eval_step"] += 1

        num_classes = jax.eval_shape(lambda: forward(
            params, other, pipeline.normalize(images[:1], scale, mean, std, dtype), train=False)).shape[-1]

        def body(carry, batch):
            bidx, bmask = batch
            bidx = jax.lax.with_sharding_constraint(bidx, batch_sharding)
            x = pipeline.normalize(jnp.take(images, bidx, axis=0), scale, mean, std, dtype)
            y = jnp.take(labels, bidx, axis=0)
            logits = forward(params, other, x, train=False)
            m = bmask.astype(jnp.float32)
            loss = jnp.sum(loss_fn(logits, y, logits.shape[-1]) * m)
            probs = jax.nn.softmax(logits)
            pred = jnp.argmax(logits, -1)
            conf = jnp.max(probs, -1)
            hit = (pred == y).astype(jnp.float32) * m
            # Confusion counts (rows: true class) and calibration bins: the per-class accuracy and the
            # ECE are computed here, with the eval, so they never depend on the media thread.
            confusion = carry["confusion"].at[y, pred].add(m)
            b = jnp.clip(jnp.floor(conf * CALIBRATION_BINS).astype(jnp.int32), 0, CALIBRATION_BINS - 1)
            bins = {"count": carry["bins"]["count"].at[b].add(m),
                    "confidence": carry["bins"]["confidence"].at[b].add(conf * m),
                    "correct": carry["bins"]["correct"].at[b].add(hit)}
            carry = {"loss": carry["loss"] + loss, "correct": carry["correct"] + jnp.sum(hit),
                     "count": carry["count"] + jnp.sum(m), "confusion": confusion, "bins": bins}
            return carry, (pred, conf)

        z = jnp.zeros((), jnp.float32)
        zb = jnp.zeros((CALIBRATION_BINS,), jnp.float32)
        init = {"loss": z, "correct": z, "count": z, "confusion": jnp.zeros((num_classes, num_classes), jnp.float32),
                "bins": {"count": zb, "confidence": zb, "correct": zb}}
        sums, (pred, conf) = jax.lax.scan(body, init, (idx, mask))
        return {**sums, "pred": pred.reshape(-1), "confidence": conf.reshape(-1)}

    def predict(params, other, images):
        """Class probabilities for a small host batch (sample tables, decision boundaries)."""
        x = pipeline.normalize(images, scale, mean, std, dtype)
        return jax.nn.softmax(forward(params, other, x, train=False))

    return Steps(train_step, eval_step, predict, update)


def _step_key(state: TrainState) -> jax.Array:
    """Step s's randomness (augmentation, dropout): a pure function of the run's key and s."""
    return jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
