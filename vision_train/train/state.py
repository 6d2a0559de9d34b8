"""TrainState and the optimizer. Plain pytrees: no config objects, no NNX modules inside jit."""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from ..errors import ConfigError
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


# ------------------------------------------------------------------ per-parameter learning rates
# Layer-wise decay (BEiT; timm's param_groups_layer_decay; big_vision): the embedding is layer 0, blocks.<i> is
# layer i + 1, everything else (the final norm, the head) is layer L + 1, for L blocks. The embedding's names, as
# timm's group matchers for ViT and Mixer (patch_embed, cls_token, pos_embed; stem) and ours (embed, cls).
EMBEDDING = re.compile(r"(embed|patch_embed|stem|cls|cls_token|reg_token|pos_embed)(\..*)?")
BLOCK = re.compile(r"blocks\.(\d+)(\..*)?")
FROZEN = "frozen"


def _path(keypath) -> str:
    """A parameter's dotted path (``blocks.3.attn.qkv.kernel``), from its pytree key path (an nnx.State's, a
    checkpoint's or a nested dict's; the Variable's own ``value`` is not part of it)."""
    names = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in keypath]
    if names and names[-1] == "value":  # (a Variable's, or its restored form: a dict of one "value")
        names.pop()
    return ".".join(names)


def param_paths(params) -> dict[str, Any]:
    """Every parameter array by its dotted path, in the tree's order (the names ``optimizer.lr_mults`` matches)."""
    return {_path(kp): leaf for kp, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


def _layer(path: str, num_blocks: int) -> int:
    block = BLOCK.fullmatch(path)
    if block:
        return int(block.group(1)) + 1
    return 0 if EMBEDDING.fullmatch(path) else num_blocks + 1


def lr_multipliers(o, params) -> dict[str, float]:
    """Each parameter's learning-rate multiplier, by path: the first ``o.lr_mults`` pattern that matches the
    whole path (``re.fullmatch``; none: 1), times ``o.layer_decay ** (L + 1 - layer)``. 0 freezes. A pattern
    that matches no parameter, or layer decay on a model without blocks, is a ConfigError."""
    paths = list(param_paths(params))
    patterns = [(re.compile(k), float(v)) for k, v in o.lr_mults.items()]
    for (pattern, _), key in zip(patterns, o.lr_mults):
        if not any(pattern.fullmatch(p) for p in paths):
            examples = ", ".join(paths[:3] + paths[-3:] if len(paths) > 6 else paths)
            raise ConfigError("optimizer.lr_mults", key, f"matches no parameter (the pattern must match a whole "
                              f"path); this model's {len(paths)} parameter paths include {examples}")
    mults = {p: next((m for pattern, m in patterns if pattern.fullmatch(p)), 1.0) for p in paths}
    if o.layer_decay != 1.0:
        num_blocks = len({int(b.group(1)) for b in map(BLOCK.fullmatch, paths) if b})
        if not num_blocks:
            raise ConfigError("optimizer.layer_decay", o.layer_decay, "needs a model made of blocks (parameters "
                              "named blocks.<i>.*: vit, mixer); set optimizer.layer_decay=1 for this one")
        mults = {p: m * o.layer_decay ** (num_blocks + 1 - _layer(p, num_blocks)) for p, m in mults.items()}
    return mults


def describe_multipliers(o, params) -> str | None:
    """One line for the run's log: what ``optimizer.lr_mults`` / ``layer_decay`` do to this model (None: nothing).
    E.g. "optimizer.lr_mults: 30 arrays frozen (4,848 params), 2 arrays at x1 (170 params)"."""
    if not o.lr_mults and o.layer_decay == 1.0:
        return None
    mults, arrays = lr_multipliers(o, params), param_paths(params)
    groups: dict[float, list[int]] = {}
    for p, m in mults.items():
        groups.setdefault(m, []).append(int(arrays[p].size))
    parts = [f"{len(sizes)} arrays {'frozen' if m == 0 else f'at x{m:.4g}'} ({sum(sizes):,} params)"
             for m, sizes in sorted(groups.items())]
    keys = (["lr_mults"] if o.lr_mults else []) + ([f"layer_decay={o.layer_decay:g}"] if o.layer_decay != 1.0 else [])
    return f"optimizer.{' and '.join(keys)}: " + ", ".join(parts)


# --------------------------------------------------------------------------------- the optimizer
def decayed(tree):
    """Which arrays of ``tree`` weight decay applies to under ``optimizer.weight_decay_1d=false``: those of two or
    more dimensions (kernels, embeddings), not biases, norms' scales or LayerScale's gammas (timm's
    ``param_groups_weight_decay``; big_vision decays kernels only). Masked-out leaves (``optax.partition``'s) are
    not decayed."""
    return jax.tree.map(lambda x: getattr(x, "ndim", 0) > 1, tree)


def make_optimizer(o, *, lr_shape: optax.Schedule, hparams: dict | None = None,
                   params=None) -> optax.GradientTransformation:
    """``o`` has OptimizerConfig's fields; ``lr_shape``: the schedule as a multiplier of the learning rate
    (peak 1: ``lr_schedule(name, 1.0, ...)``). With cosine decay to ``min_lr`` > 0, the ratio min_lr/lr is part
    of the shape, so it is compiled in. ``hparams`` (default ``hyperparameters(o)``) only set the initial
    state: ``update`` reads them from the state. Which transforms run follows the config (e.g. clipping on
    or off); their numbers follow the state.

    ``params`` (the parameters, or their shapes): needed with ``o.lr_mults`` or ``o.layer_decay`` < 1, whose
    multipliers follow the parameters' paths (``lr_multipliers``). Then the update after clipping runs once
    per distinct multiplier (``optax.partition``), scaled by it (so is weight decay); multiplier 0 is
    ``optax.set_to_zero``: those parameters have no optimizer state, and their gradients are left out of the
    clipping norm. The learning rate in the state stays the base rate. Without either key the transform and
    its state are what they were before these keys existed (earlier checkpoints restore)."""
    labels = None
    if o.lr_mults or o.layer_decay != 1.0:
        if params is None:
            raise ValueError("make_optimizer needs the parameters (params=) for optimizer.lr_mults / layer_decay")
        mults = lr_multipliers(o, params)
        if any(m != 1.0 for m in mults.values()):
            labels = {p: FROZEN if m == 0 else f"x{m!r}" for p, m in mults.items()}
            factor = {f"x{m!r}": m for m in mults.values() if m != 0}

    def label_tree(tree):  # (a function of the tree it is given: the gradients' tree, the parameters')
        return jax.tree_util.tree_map_with_path(lambda kp, _: labels[_path(kp)], tree)

    def build(learning_rate, weight_decay, grad_clip_norm):
        parts = []
        if o.grad_clip_norm > 0:
            if labels is not None and FROZEN in labels.values():  # frozen: as if they had no gradient
                parts.append(optax.masked(optax.set_to_zero(),
                                          lambda tree: jax.tree.map(lambda lab: lab == FROZEN, label_tree(tree))))
            parts.append(optax.clip_by_global_norm(grad_clip_norm))

        def decay():  # weight decay; with optimizer.weight_decay_1d=false only on arrays of 2+ dimensions
            return (optax.add_decayed_weights(weight_decay) if o.weight_decay_1d else
                    optax.add_decayed_weights(weight_decay, mask=decayed))

        direction = []  # the update's direction, before the learning rate
        if o.name in ("adam", "adamw"):
            if o.name == "adam" and o.weight_decay > 0:  # classic L2 on the gradient
                direction.append(decay())
            direction.append(optax.scale_by_adam(b1=o.b1, b2=o.b2, eps=o.eps))
            if o.name == "adamw":  # decoupled, scaled by the learning rate (optax.adamw)
                direction.append(decay())
        elif o.name == "lamb":  # optax.lamb: Adam's direction plus decoupled decay, scaled per array by the trust
            # ratio ||param|| / ||direction|| (1 where either is 0), then by the learning rate. weight_decay_1d=false:
            # arrays without decay are not adapted either (timm's Lamb: no trust ratio in a group without decay)
            trust = optax.scale_by_trust_ratio()
            direction += [optax.scale_by_adam(b1=o.b1, b2=o.b2, eps=o.eps), decay(),
                          trust if o.weight_decay_1d else optax.masked(trust, decayed)]
        elif o.name == "sgd":
            if o.weight_decay > 0:
                direction.append(decay())
            if o.momentum:
                direction.append(optax.trace(decay=o.momentum, nesterov=o.nesterov))
        else:
            raise ValueError(f"unknown optimizer {o.name!r}")
        if labels is None:
            parts += direction
        else:
            groups = {label: optax.chain(optax.identity(), *direction, *([optax.scale(m)] if m != 1.0 else []))
                      for label, m in factor.items()}  # (identity: plain SGD at x1 has nothing else to chain)
            if FROZEN in labels.values():
                groups[FROZEN] = optax.set_to_zero()
            parts.append(optax.partition(groups, label_tree))
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
