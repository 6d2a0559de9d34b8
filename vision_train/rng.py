"""One seed, independent random streams: each consumer folds its own constant into ``key(seed)``, so
model initialisation, data order, and per-step dropout/augmentation never share random bits."""

import jax

STREAMS = {"params": 0, "dropout": 1, "data_order": 2, "step": 3}


def stream(seed: int, name: str) -> jax.Array:
    return jax.random.fold_in(jax.random.key(seed), STREAMS[name])
