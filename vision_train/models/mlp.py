"""Multi-layer perceptron on flattened inputs (seed 003: one hidden layer of 10 ReLU units on 2-D points). Its
``model.*`` keys, the network and its FLOPs."""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from types import SimpleNamespace

from ..errors import check_positive
from . import Architecture, ModelConfig, all_positive


@dataclass
class MLPConfig(ModelConfig):
    arch: str = "mlp"
    hidden_layers: int = 1           # Dense + ReLU layers before the head (0: a linear classifier)
    hidden_dim: int = 10             # each hidden layer's width

    def check(self) -> None:
        super().check()
        all_positive(self, "hidden_dim")
        check_positive("model.hidden_layers", self.hidden_layers, allow_zero=True)


@functools.cache
def network() -> SimpleNamespace:
    """The network (``.Model``), defined on the first call: JAX is imported here, when a model is built, never
    when the schema is read."""
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

    return SimpleNamespace(Model=Model)


def forward_flops(m: MLPConfig, input_shape, num_classes: int, dtype=None) -> float:
    """One example's forward (vision_train.perf's rules)."""
    h, w, c = input_shape
    dims = [h * w * c] + [m.hidden_dim] * m.hidden_layers + [num_classes]
    return sum(2 * a * b for a, b in itertools.pairwise(dims))


ARCHITECTURE = Architecture(schema=MLPConfig, network=network, forward_flops=forward_flops)
