"""LeNet-style CNN from seed 002 (after Flax's MNIST example): two conv+ReLU+avg-pool stages, two dense layers."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


class Model(nnx.Module):
    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, *,
                 features: Sequence[int], dense_dim: int, dtype=jnp.float32,
                 rngs: nnx.Rngs):
        h, w, c = input_shape
        stages = len(features)
        if h < 2**stages or w < 2**stages:
            raise ValueError(
                f"the cnn halves the image {stages} times, so it needs images of at least "
                f"{2**stages}x{2**stages}, got {h}x{w}; use model=mlp for this data"
            )
        chans = [c, *features]
        self.convs = nnx.List(
            [nnx.Conv(a, b, kernel_size=(3, 3), padding="SAME", dtype=dtype, rngs=rngs)
             for a, b in zip(chans[:-1], chans[1:])]
        )
        flat = (h // 2**stages) * (w // 2**stages) * features[-1]
        self.dense = nnx.Linear(flat, dense_dim, dtype=dtype, rngs=rngs)
        self.head = nnx.Linear(dense_dim, num_classes, dtype=dtype, rngs=rngs)
        self.dtype = dtype

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        del train
        x = x.astype(self.dtype)
        for conv in self.convs:
            x = nnx.avg_pool(jax.nn.relu(conv(x)), window_shape=(2, 2), strides=(2, 2))
        x = jnp.reshape(x, (x.shape[0], -1))
        return self.head(jax.nn.relu(self.dense(x)))
