"""TrainState and the optimizer. Plain pytrees: no config objects, no NNX modules inside jit."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from ..rng import stream


@struct.dataclass
class TrainState:
    step: jax.Array          # int32 scalar: optimizer steps taken
    params: Any              # nnx.State of nnx.Param
    opt_state: Any
    other: Any               # the model's non-parameter state (RNG streams), reseeded every step
    rng: jax.Array           # base key for dropout; step s uses fold_in(rng, s)


def lr_schedule(name: str, lr: float, total_steps: int, warmup_steps: int, min_lr: float) -> optax.Schedule:
    warmup_steps = min(warmup_steps, total_steps)
    if name == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=lr, warmup_steps=warmup_steps,
            decay_steps=max(total_steps, warmup_steps + 1), end_value=min_lr)
    if warmup_steps:
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, warmup_steps), optax.constant_schedule(lr)], [warmup_steps])
    return optax.constant_schedule(lr)


def make_optimizer(o, schedule: optax.Schedule) -> optax.GradientTransformation:
    """``o`` has OptimizerConfig's fields."""
    parts = []
    if o.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(o.grad_clip_norm))
    if o.name == "adamw":
        parts.append(optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay))
    else:
        if o.weight_decay > 0:  # classic L2 on the gradient
            parts.append(optax.add_decayed_weights(o.weight_decay))
        if o.name == "adam":
            parts.append(optax.adam(schedule, b1=o.b1, b2=o.b2, eps=o.eps))
        elif o.name == "sgd":
            parts.append(optax.sgd(schedule, momentum=o.momentum or None, nesterov=o.nesterov))
        else:
            raise ValueError(f"unknown optimizer {o.name!r}")
    return optax.chain(*parts) if len(parts) > 1 else parts[0]


def create(model: nnx.Module, tx: optax.GradientTransformation, seed: int) -> tuple[nnx.GraphDef, TrainState]:
    graphdef, params, other = nnx.split(model, nnx.Param, ...)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), other=other,
                       rng=jax.random.key_data(stream(seed, "step")))
    return graphdef, state


def param_count(params) -> int:
    return int(sum(x.size for x in jax.tree.leaves(params)))
