"""The pure, jitted functions of a run: the train step, the eval step and prediction.

Each is built by its own function from what it needs, and jitted once per run: the model's graphdef and
the feed's batch function are closed over; everything that changes is an argument. A feed
(``train.feeds``) decides where a batch comes from (gathered from device-resident data, or streamed);
the steps only see ``feed.train_batch(args, key) -> (x, y)`` and ``feed.eval_batch(fixed, item) -> (x, y,
mask)``, traced inside jit.
"""

from __future__ import annotations

import collections
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ..data import mixing as mixing_lib
from ..data import pipeline
from .state import TrainState

# Equal-width confidence bins of the expected calibration error (the eval step counts them).
CALIBRATION_BINS = 15

# Times each step function was traced (a test asserts the train step is traced once per run).
TRACES: collections.Counter = collections.Counter()

# The train step's running sums, fetched (and reset) on log steps; a checkpoint keeps them (loop state). The
# loop also adds them up over each epoch (``LoopState.epoch_sums``) for the epoch line.
TRAIN_SUM_KEYS = ("loss", "correct", "count", "grad_norm", "steps")
# The train metrics, each a ratio of two running sums: logged every log interval, and on the epoch line (from the
# epoch's sums) where ``config.METRICS`` puts it there. A new training metric: its sum above and in the step, its
# ratio here (and a ``METRICS`` entry to be on the epoch line or pick the best checkpoint).
TRAIN_METRICS = {"train/loss": ("loss", "count"), "train/acc": ("correct", "count"),
                 "train/grad_norm": ("grad_norm", "steps")}


def train_metrics(sums: dict) -> dict:
    """``TRAIN_METRICS`` from host sums (an interval's or an epoch's); a ratio whose sums are missing or zero is
    left out (an epoch's sums from a checkpoint written before the sum existed)."""
    return {k: float(sums[a]) / float(sums[b]) for k, (a, b) in TRAIN_METRICS.items() if a in sums and sums.get(b)}


def new_epoch_sums() -> dict:
    return dict.fromkeys(TRAIN_SUM_KEYS, 0.0)


def new_train_sums(values: dict | None = None) -> dict:
    """Running sums the train step adds to. ``values``: host numbers to start from (a checkpoint's); a key
    it lacks starts at zero, so a sum added later does not break earlier checkpoints."""
    values = values or {}
    sums = {k: jnp.asarray(values.get(k, 0.0), jnp.float32) for k in TRAIN_SUM_KEYS}
    sums["nan_step"] = jnp.asarray(values.get("nan_step", -1), jnp.int32)  # 1-based step of the first NaN loss
    sums["lr"] = jnp.asarray(values.get("lr", 0.0), jnp.float32)  # the learning rate the latest step applied
    return sums


def forward(graphdef, params, other, x, *, train: bool, key=None):
    """The model's logits (float32) for a prepared batch."""
    return forward_with_stats(graphdef, params, other, x, train=train, key=key)[0]


def forward_with_stats(graphdef, params, other, x, *, train: bool, key=None):
    """``(logits float32, other)``: the model's logits and its non-parameter state after the call, with the
    batch statistics (``nnx.BatchStat``: BatchNorm's running mean and variance) a training call updated. The
    RNG streams in ``other`` are left as they were (they are reseeded from the step's key every step)."""
    model = nnx.merge(graphdef, params, other, copy=True)  # fresh Variables at this trace level
    if key is not None:
        nnx.reseed(model, dropout=key)
    logits = model(x, train=train).astype(jnp.float32)
    stats = nnx.state(model, nnx.BatchStat)
    if train and jax.tree.leaves(stats):
        other = nnx.merge_state(other, stats)
    return logits, other


def cross_entropy(logits, labels, label_smoothing: float = 0.0):
    targets = jax.nn.one_hot(labels, logits.shape[-1])
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def step_key(state: TrainState) -> jax.Array:
    """Step s's randomness (augmentation, dropout): a pure function of the run's key and s."""
    return jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)


def make_update(graphdef, tx: optax.GradientTransformation, *, label_smoothing: float = 0.0,
                accum_steps: int = 1, ema_decay: float = 0.0, lr_shape: Callable | None = None,
                loss: str = "ce") -> Callable:
    """``update(state, sums, x, y, targets=None) -> (state, sums)``: forward, backward, optimizer update, the
    parameters' moving average and the running sums, on a prepared batch (the train step after its input
    pipeline). ``targets`` (B, num_classes): soft targets (mixup / CutMix's, label smoothing folded in), trained
    on in place of the labels ``y``; the running sums' accuracy then counts the targets' largest class.

    ``loss``: 'ce' (softmax cross-entropy; on integer labels, ``label_smoothing`` applied here) or 'bce'
    (sigmoid binary cross-entropy per class on the targets, timm's ``BinaryCrossEntropy``: DeiT III, RSB).
    ``accum_steps`` > 1: the batch is split into that many micro-batches, run one after another in a
    scan; their gradients are averaged before the one optimizer update (activation memory / accum_steps);
    batch statistics (BatchNorm) are updated by each micro-batch in turn, as in PyTorch.
    ``ema_decay`` > 0: ``state.ema`` (float32) moves towards the new parameters. ``lr_shape``: the schedule's
    shape (``state.lr_schedule`` with peak 1), for the running sums' ``lr``: the learning rate this step applied
    (the rate in the optimizer state times the shape at this step, as ``make_optimizer``'s update computes it)."""
    def loss_of(logits, y, t):
        if t is None and loss == "ce":
            return cross_entropy(logits, y, label_smoothing)
        if t is None:
            t = mixing_lib.smooth_one_hot(y, logits.shape[-1], label_smoothing)
        if loss == "bce":
            return mixing_lib.binary_cross_entropy(logits, t)
        return mixing_lib.soft_target_cross_entropy(logits, t)

    def grads_of(params, other, x, y, t, key):
        def objective(p):
            logits, new_other = forward_with_stats(graphdef, p, other, x, train=True, key=key)
            return loss_of(logits, y, t).mean(), (logits, new_other)

        (loss_value, (logits, new_other)), grads = jax.value_and_grad(objective, has_aux=True)(params)
        truth = y if t is None else jnp.argmax(t, -1)
        return loss_value, jnp.sum(jnp.argmax(logits, -1) == truth), grads, new_other

    def update(state: TrainState, sums: dict, x, y, targets=None):
        _, k_drop = jax.random.split(step_key(state))
        batch = y.shape[0]
        if accum_steps == 1:
            loss_value, correct, grads, other = grads_of(state.params, state.other, x, y, targets, k_drop)
        else:
            micro = lambda a: a.reshape(accum_steps, batch // accum_steps, *a.shape[1:])  # noqa: E731

            def body(carry, inputs):
                i, xm, ym, tm = inputs
                total_loss, total_correct, total_grads, other = carry
                loss_value, correct, grads, other = grads_of(state.params, other, xm, ym, tm,
                                                             jax.random.fold_in(k_drop, i))
                return (total_loss + loss_value, total_correct + correct, jax.tree.map(jnp.add, total_grads, grads),
                        other), None

            zero = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32),
                    jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params), state.other)
            (loss_value, correct, grads, other), _ = jax.lax.scan(
                body, zero, (jnp.arange(accum_steps), micro(x), micro(y), None if targets is None else micro(targets)))
            loss_value = loss_value / accum_steps
            grads = jax.tree.map(lambda g, p: (g / accum_steps).astype(p.dtype), grads, state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema
        if ema_decay:
            ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p.astype(jnp.float32), ema, params)
        bad = ~jnp.isfinite(loss_value)
        sums = {
            "loss": sums["loss"] + loss_value * batch,
            "correct": sums["correct"] + correct,
            "count": sums["count"] + batch,
            "grad_norm": sums["grad_norm"] + optax.global_norm(grads),
            "steps": sums["steps"] + 1,
            # 1-based, like the step numbers in metrics.jsonl and W&B
            "nan_step": jnp.where(bad & (sums["nan_step"] < 0), state.step + 1, sums["nan_step"]),
            "lr": sums["lr"] if lr_shape is None else
            (state.opt_state.hyperparams["learning_rate"] * lr_shape(state.step)).astype(jnp.float32),
        }
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema, other=other), sums

    return update


def make_batch(train_batch: Callable, *, mixing=None, num_classes: int | None = None,
               label_smoothing: float = 0.0) -> Callable:
    """``batch(rng, step, args) -> (x, y, targets)``: step ``step``'s training batch as the update sees it, from
    the run's key data ``rng`` (``TrainState.rng``): the feed's (``train_batch(args, key) -> (x, y)``: gathered,
    augmented, normalised), then mixed where ``mixing`` (a ``data.mixing.Mixing``) is on: timm's Mixup on the
    global batch, before any split into micro-batches, so the result depends neither on the accumulation steps
    nor on the device count; its randomness is its own stream (``fold_in(step key, 2)``), so runs without
    mixing keep their numbers. ``targets``: the mixed soft targets (label smoothing folded in), or None."""
    mixes = mixing is not None and mixing.enabled

    def batch(rng, step, args):
        key = jax.random.fold_in(jax.random.wrap_key_data(rng), step)  # (step_key's)
        k_aug, _ = jax.random.split(key)
        x, y = train_batch(args, k_aug)
        if not mixes:
            return x, y, None
        mixed, targets = mixing_lib.mix(jax.random.fold_in(key, 2), x.astype(jnp.float32), y, mixing, num_classes,
                                        label_smoothing=label_smoothing)
        return mixed.astype(x.dtype), y, targets

    return batch


def make_train_step(graphdef, tx: optax.GradientTransformation, train_batch: Callable, *,
                    label_smoothing: float = 0.0, accum_steps: int = 1, ema_decay: float = 0.0,
                    lr_shape: Callable | None = None, loss: str = "ce", mixing=None,
                    num_classes: int | None = None) -> Callable:
    """``train_step(state, sums, *args) -> (state, sums)``: ``make_batch``'s batch for ``args`` (the feed's,
    traced here, then mixed), then ``make_update``'s update."""
    update = make_update(graphdef, tx, label_smoothing=label_smoothing, accum_steps=accum_steps,
                         ema_decay=ema_decay, lr_shape=lr_shape, loss=loss)
    batch = make_batch(train_batch, mixing=mixing, num_classes=num_classes, label_smoothing=label_smoothing)

    def train_step(state: TrainState, sums: dict, *args):
        TRACES["train_step"] += 1
        x, y, targets = batch(state.rng, state.step, args)
        return update(state, sums, x, y, targets)

    return train_step


def new_eval_sums(num_classes: int) -> dict:
    """What the eval step adds up over a split: loss, hits, examples, the confusion counts (rows: true
    class) and the calibration bins. Every eval metric is computed from these (``train.evaluation``)."""
    z = jnp.zeros((), jnp.float32)
    zb = jnp.zeros((CALIBRATION_BINS,), jnp.float32)
    return {"loss": z, "correct": z, "count": z, "confusion": jnp.zeros((num_classes, num_classes), jnp.float32),
            "bins": {"count": zb, "confidence": zb, "correct": zb}}


def make_eval_step(graphdef, eval_batches: Callable, eval_batch: Callable, *, label_smoothing: float = 0.0) -> Callable:
    """``eval_step(params, other, sums, args) -> (sums, pred, confidence)``: the feed's batches of one
    chunk of a split (``eval_batches(args) -> (fixed, items)``; ``eval_batch(fixed, item) -> (x, y, mask)``)
    in a scan, added to ``sums``. Padding (mask 0) counts nowhere, so every example counts once."""

    def eval_step(params, other, sums, args):
        TRACES["eval_step"] += 1
        fixed, items = eval_batches(args)

        def body(carry, item):
            x, y, mask = eval_batch(fixed, item)
            logits = forward(graphdef, params, other, x, train=False)
            m = mask.astype(jnp.float32)
            probs = jax.nn.softmax(logits)
            pred = jnp.argmax(logits, -1)
            conf = jnp.max(probs, -1)
            hit = (pred == y).astype(jnp.float32) * m
            b = jnp.clip(jnp.floor(conf * CALIBRATION_BINS).astype(jnp.int32), 0, CALIBRATION_BINS - 1)
            bins = carry["bins"]
            carry = {"loss": carry["loss"] + jnp.sum(cross_entropy(logits, y, label_smoothing) * m),
                     "correct": carry["correct"] + jnp.sum(hit), "count": carry["count"] + jnp.sum(m),
                     "confusion": carry["confusion"].at[y, pred].add(m),
                     "bins": {"count": bins["count"].at[b].add(m), "confidence": bins["confidence"].at[b].add(conf * m),
                              "correct": bins["correct"].at[b].add(hit)}}
            return carry, (pred, conf)

        sums, (pred, conf) = jax.lax.scan(body, sums, items)
        return sums, pred.reshape(-1), conf.reshape(-1)

    return eval_step


def make_predict(graphdef, normalize: Callable, size: tuple[int, int] | None = None) -> Callable:
    """``predict(params, other, images) -> class probabilities`` for raw images (uint8 or float, as the data
    set stores them): ``normalize`` is the training data's (``feeds.Normalize``); ``size``: the model's input
    (H, W) when the images are stored at another size (resampled as the eval step does)."""

    def predict(params, other, images):
        x = normalize(images if size is None else pipeline.resize(images, size))
        return jax.nn.softmax(forward(graphdef, params, other, x, train=False))

    return predict
