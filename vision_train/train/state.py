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
    ema: Any = None          # trainer.ema_decay > 0: the parameters' moving average (float32); else None


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


def hyperparameters(o) -> dict[str, float]:
    """The optimizer's numeric hyper-parameters. They live in the optimizer state (``optax.inject_hyperparams``),
    not in the compiled step, so jobs of a sweep over them run the same XLA programs and the second job
    onwards reads them from the persistent compilation cache instead of compiling."""
    return {"learning_rate": float(o.lr), "weight_decay": float(o.weight_decay), "grad_clip_norm": float(o.grad_clip_norm)}


def make_optimizer(o, *, lr_shape: optax.Schedule, hparams: dict | None = None) -> optax.GradientTransformation:
    """``o`` has OptimizerConfig's fields; ``lr_shape``: the schedule as a multiplier of the learning rate
    (peak 1: ``lr_schedule(name, 1.0, ...)``). With cosine decay to ``min_lr`` > 0, the ratio min_lr/lr is part
    of the shape, so it is compiled in. ``hparams`` (default ``hyperparameters(o)``) only set the initial
    state: ``update`` reads them from the state. Which transforms run follows the config (e.g. clipping on
    or off); their numbers follow the state."""

    def build(learning_rate, weight_decay, grad_clip_norm):
        parts = []
        if o.grad_clip_norm > 0:
            parts.append(optax.clip_by_global_norm(grad_clip_norm))
        if o.name in ("adam", "adamw"):
            if o.name == "adam" and o.weight_decay > 0:  # classic L2 on the gradient
                parts.append(optax.add_decayed_weights(weight_decay))
            parts.append(optax.scale_by_adam(b1=o.b1, b2=o.b2, eps=o.eps))
            if o.name == "adamw":  # decoupled, scaled by the learning rate (optax.adamw)
                parts.append(optax.add_decayed_weights(weight_decay))
        elif o.name == "sgd":
            if o.weight_decay > 0:
                parts.append(optax.add_decayed_weights(weight_decay))
            if o.momentum:
                parts.append(optax.trace(decay=o.momentum, nesterov=o.nesterov))
        else:
            raise ValueError(f"unknown optimizer {o.name!r}")
        parts.append(optax.scale_by_schedule(lambda count: -learning_rate * lr_shape(count)))
        return optax.chain(*parts)

    return optax.inject_hyperparams(build)(**(hparams if hparams is not None else hyperparameters(o)))


def set_hyperparameters(opt_state, hparams: dict[str, float], sharding=None):
    """Put the config's numbers into an optimizer state (a restored one): a resumed or warm-started run
    trains with the learning rate, weight decay and clip norm it is given, as a fresh run does."""
    values = {k: jax.device_put(jnp.asarray(v, opt_state.hyperparams[k].dtype), sharding) for k, v in hparams.items()}
    return opt_state._replace(hyperparams={**opt_state.hyperparams, **values})


def create(model: nnx.Module, tx: optax.GradientTransformation, seed: int, *,
           ema: bool = False) -> tuple[nnx.GraphDef, TrainState]:
    graphdef, params, other = nnx.split(model, nnx.Param, ...)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), other=other,
                       rng=jax.random.key_data(stream(seed, "step")),
                       ema=jax.tree.map(lambda p: p.astype(jnp.float32), params) if ema else None)
    return graphdef, state


def param_count(params) -> int:
    return int(sum(x.size for x in jax.tree.leaves(params)))
