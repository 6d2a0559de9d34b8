"""Models, picked by name. Each file exports one ``Model(input_shape, num_classes, *, ..., dtype, rngs)``
with ``__call__(x, *, train)`` on NHWC inputs of any size and channel count. No config imports here."""

from __future__ import annotations

import importlib

ARCHITECTURES = ("mlp", "cnn", "mixer", "vit")


def create(arch: str, input_shape, num_classes: int, *, rngs, **kwargs):
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {ARCHITECTURES}")
    module = importlib.import_module(f"{__name__}.{arch}")
    return module.Model(tuple(input_shape), num_classes, rngs=rngs, **kwargs)
