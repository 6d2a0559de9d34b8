"""Pieces shared by several models: patch embedding and the checks that come with it."""

from __future__ import annotations

import einops
import jax
import jax.numpy as jnp
from flax import nnx

from . import valid_patch_sizes


def check_patch_size(image_hw: tuple[int, int], patch_size: int) -> None:
    """Raise a readable error when ``patch_size`` does not tile the image exactly."""
    h, w = image_hw
    if patch_size <= 0 or h % patch_size or w % patch_size:
        raise ValueError(
            f"patch_size {patch_size} does not divide the {h}x{w} image; "
            f"use one of {valid_patch_sizes(h, w)} (set model.patch_size)"
        )


class PatchEmbed(nnx.Module):
    """Non-overlapping patches -> tokens, as one strided convolution: (B,H,W,C) -> (B, H/p * W/p, D)."""

    def __init__(self, in_channels: int, dim: int, patch_size: int, *, dtype, rngs: nnx.Rngs):
        self.proj = nnx.Conv(
            in_channels, dim, kernel_size=(patch_size, patch_size), strides=(patch_size, patch_size),
            padding="VALID", dtype=dtype, rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return einops.rearrange(self.proj(x), "b h w d -> b (h w) d")


class Mlp(nnx.Module):
    """Dense -> GELU -> (dropout) -> Dense -> (dropout). ``gelu``: "tanh" (jax.nn.gelu's default approximation,
    as Flax and big_vision) or "exact" (erf, as PyTorch and timm)."""

    def __init__(self, dim: int, hidden: int, *, dropout: float = 0.0, gelu: str = "tanh", dtype, rngs: nnx.Rngs,
                 kernel_init=nnx.initializers.lecun_normal(), bias_init=nnx.initializers.zeros_init()):
        self.fc1 = nnx.Linear(dim, hidden, dtype=dtype, kernel_init=kernel_init, bias_init=bias_init, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, dim, dtype=dtype, kernel_init=kernel_init, bias_init=bias_init, rngs=rngs)
        self.drop = nnx.Dropout(dropout, rngs=rngs)
        if gelu not in ("tanh", "exact"):
            raise ValueError(f"gelu must be 'tanh' or 'exact', got {gelu!r}")
        self.approximate = gelu == "tanh"

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        x = self.drop(jax.nn.gelu(self.fc1(x), approximate=self.approximate), deterministic=not train)
        return self.drop(self.fc2(x), deterministic=not train)


class LayerScale(nnx.Module):
    """A residual branch's output times a learned per-channel ``gamma`` that starts at ``init_value`` (CaiT,
    DeiT III; timm's ``LayerScale``, whose parameter has the same name). The parameter stays float32."""

    def __init__(self, dim: int, init_value: float):
        self.gamma = nnx.Param(jnp.full((dim,), init_value, jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x * self.gamma.value.astype(x.dtype)
