"""LeNet-style CNN from seed 002 (after Flax's MNIST example): two conv+ReLU+avg-pool stages, two dense layers. Its
``model.*`` keys, the network and its FLOPs."""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import List, Sequence

from ..errors import ConfigError
from . import Architecture, ModelConfig, all_positive


@dataclass
class CNNConfig(ModelConfig):
    arch: str = "cnn"
    features: List[int] = field(default_factory=lambda: [32, 64])  # each 3x3 conv's channels (ReLU, 2x2 avg pool after)
    dense_dim: int = 256             # the dense ReLU layer before the head

    def check(self) -> None:
        super().check()
        all_positive(self, "dense_dim")
        if not self.features or any(f <= 0 for f in self.features):
            raise ConfigError("model.features", list(self.features),
                              "give one or more channel counts, all > 0, e.g. [32,64]")


@functools.cache
def network() -> SimpleNamespace:
    """The network (``.Model``), defined on the first call: JAX is imported here, when a model is built, never
    when the schema is read."""
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

    return SimpleNamespace(Model=Model)


def _conv_taps(n: int, k: int, stride: int = 1, pad: int = 0) -> int:
    """Kernel positions that land on the input, summed over one dimension's outputs (zero padding excluded)."""
    out = (n + 2 * pad - k) // stride + 1
    return sum(min(i * stride - pad + k, n) - max(i * stride - pad, 0) for i in range(out))


def forward_flops(m: CNNConfig, input_shape, num_classes: int, dtype=None) -> float:
    """One example's forward (vision_train.perf's rules). A convolution counts the taps that land on the image,
    not on its zero padding (as XLA counts them)."""
    h, w, c = input_shape
    total, chans = 0, [c, *m.features]
    for a, b in itertools.pairwise(chans):  # 3x3 SAME convolutions, then 2x2 average pooling
        total += 2 * _conv_taps(h, 3, pad=1) * _conv_taps(w, 3, pad=1) * a * b
        h, w = h // 2, w // 2
    flat = h * w * chans[-1]
    return total + 2 * flat * m.dense_dim + 2 * m.dense_dim * num_classes


ARCHITECTURE = Architecture(schema=CNNConfig, network=network, forward_flops=forward_flops)
