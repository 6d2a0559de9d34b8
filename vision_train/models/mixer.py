"""MLP-Mixer (Tolstikhin et al. 2021), as in seed 000.

Each block mixes tokens (an MLP across the patch axis, applied per channel) then channels (an MLP
across features, per token), each pre-LayerNorm over the feature axis with a residual. Seed 001's
PyTorch version normalised over the wrong axis and applied its "token" MLP to channels, so it never
mixed tokens; ``mixer_small`` uses its sizes with this correct block.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from .layers import Mlp, PatchEmbed, check_patch_size


class MixerBlock(nnx.Module):
    def __init__(self, num_tokens: int, dim: int, tokens_mlp_dim: int, channels_mlp_dim: int, *,
                 gelu: str, eps: float, dtype, rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(dim, epsilon=eps, dtype=dtype, rngs=rngs)
        self.token_mixing = Mlp(num_tokens, tokens_mlp_dim, gelu=gelu, dtype=dtype, rngs=rngs)
        self.norm2 = nnx.LayerNorm(dim, epsilon=eps, dtype=dtype, rngs=rngs)
        self.channel_mixing = Mlp(dim, channels_mlp_dim, gelu=gelu, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:  # x: (B, tokens, dim)
        y = jnp.swapaxes(self.norm1(x), 1, 2)          # (B, dim, tokens): the MLP runs across tokens
        x = x + jnp.swapaxes(self.token_mixing(y, train=train), 1, 2)
        return x + self.channel_mixing(self.norm2(x), train=train)


class Model(nnx.Module):
    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, *, patch_size: int,
                 num_blocks: int, hidden_dim: int, tokens_mlp_dim: int,
                 channels_mlp_dim: int, gelu: str, layer_norm_eps: float, dtype=jnp.float32, rngs: nnx.Rngs):
        h, w, c = input_shape
        check_patch_size((h, w), patch_size)
        num_tokens = (h // patch_size) * (w // patch_size)
        self.stem = PatchEmbed(c, hidden_dim, patch_size, dtype=dtype, rngs=rngs)
        self.blocks = nnx.List([
            MixerBlock(num_tokens, hidden_dim, tokens_mlp_dim, channels_mlp_dim, gelu=gelu, eps=layer_norm_eps,
                       dtype=dtype, rngs=rngs)
            for _ in range(num_blocks)
        ])
        self.norm = nnx.LayerNorm(hidden_dim, epsilon=layer_norm_eps, dtype=dtype, rngs=rngs)
        # Zero-initialised head, as in the paper's code (and seed 000).
        self.head = nnx.Linear(hidden_dim, num_classes, dtype=dtype,
                               kernel_init=nnx.initializers.zeros_init(), rngs=rngs)
        self.dtype = dtype

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        x = self.stem(x.astype(self.dtype))
        for block in self.blocks:
            x = block(x, train=train)
        return self.head(jnp.mean(self.norm(x), axis=1))
