"""Multi-layer perceptron on flattened inputs (seed 003: one hidden layer of 10 ReLU units on 2-D points)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx


class Model(nnx.Module):
    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, *, hidden_layers: int,
                 hidden_dim: int, dtype=jnp.float32, rngs: nnx.Rngs):
        dims = [math.prod(input_shape)] + [hidden_dim] * hidden_layers
        self.hidden = nnx.List(
            [nnx.Linear(a, b, dtype=dtype, rngs=rngs) for a, b in zip(dims[:-1], dims[1:])]
        )
        self.head = nnx.Linear(dims[-1], num_classes, dtype=dtype, rngs=rngs)
        self.dtype = dtype

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        del train
        x = jnp.reshape(x, (x.shape[0], -1)).astype(self.dtype)
        for layer in self.hidden:
            x = jax.nn.relu(layer(x))
        # Logits, not log-probabilities: the seed's extra log_softmax is a no-op under softmax CE.
        return self.head(x)
