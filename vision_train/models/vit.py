"""Vision Transformer (Dosovitskiy et al. 2021), as in seed 004 (after Scenic's ViT).

Pre-LN encoder blocks, learned 1-D position embedding, class token or global average pooling,
dropout, optional stochastic depth (per example, growing linearly with depth). The options pretrained
checkpoints need (``gelu``, ``qkv_bias``, ``layer_norm_eps``, ``fc_norm``, ``representation_size``) make it
compute what timm's ``VisionTransformer`` and big_vision's ViT compute (models/pretrained.py). Attention goes through
``jax.nn.dot_product_attention`` (XLA on CPU, cuDNN where it applies). Seed 004 never passed
``train=True`` to its model, so its dropout never ran; here it does.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from .layers import Mlp, PatchEmbed, check_patch_size

_xavier = nnx.initializers.xavier_uniform()


def attention_implementation(setting: str, head_dim: int, dtype) -> str:
    """``model.attention`` resolved for this backend: "cudnn" (fused flash attention) on a GPU in bfloat16 or
    float16 with a head dimension it supports, else "xla". Asking for cudnn where it cannot run is an error."""
    gpu = jax.default_backend() == "gpu"
    fits = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) and head_dim <= 128 and head_dim % 8 == 0
    if setting == "cudnn" and not (gpu and fits):
        raise ValueError(f"model.attention=cudnn needs a GPU, hardware.precision=bfloat16 and a head dimension <= 128 "
                         f"that is a multiple of 8 (here: {jax.default_backend()}, {jnp.dtype(dtype).name}, "
                         f"{head_dim}); use model.attention=auto")
    if setting == "auto":
        return "cudnn" if gpu and fits else "xla"
    return setting


class Attention(nnx.Module):
    def __init__(self, dim: int, num_heads: int, *, dropout: float, qkv_bias: bool = True, implementation: str = "xla",
                 dtype, rngs: nnx.Rngs):
        if dim % num_heads:
            raise ValueError(f"hidden_size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.implementation = num_heads, implementation
        # Output features [q | k | v], each head-major: timm's qkv and big_vision's query/key/value alike.
        self.qkv = nnx.Linear(dim, 3 * dim, use_bias=qkv_bias, dtype=dtype, kernel_init=_xavier, rngs=rngs)
        self.out = nnx.Linear(dim, dim, dtype=dtype, kernel_init=_xavier, rngs=rngs)
        self.drop = nnx.Dropout(dropout, rngs=rngs)
        self.dropout = dropout

    def __call__(self, x: jax.Array, mask: jax.Array | None, *, train: bool, num_tokens: int | None = None) -> jax.Array:
        """``mask``: (1, 1, 1, T) keys to attend to (the real tokens of a padded sequence: its first
        ``num_tokens``), or None."""
        b, t, d = x.shape
        q, k, v = jnp.split(self.qkv(x).reshape(b, t, 3 * self.num_heads, d // self.num_heads), 3, axis=2)
        if self.implementation == "cudnn" and not (train and self.dropout > 0):
            # The fused kernel takes the padding as sequence lengths rather than a mask.
            lengths = None if mask is None else jnp.full((b,), num_tokens, jnp.int32)
            y = jax.nn.dot_product_attention(q, k, v, query_seq_lengths=lengths, key_value_seq_lengths=lengths,
                                             implementation="cudnn")
            return self.out(y.reshape(b, t, d))
        if train and self.dropout > 0:  # fused kernels cannot drop attention weights
            logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d // self.num_heads)
            if mask is not None:
                logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
            w = self.drop(jax.nn.softmax(logits.astype(jnp.float32)).astype(v.dtype), deterministic=False)
            y = jnp.einsum("bhqk,bkhd->bqhd", w, v)
        else:
            y = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
        return self.out(y.reshape(b, t, d))


class EncoderBlock(nnx.Module):
    def __init__(self, dim: int, num_heads: int, mlp_dim: int, *, dropout: float, attention_dropout: float,
                 drop_path: float, gelu: str = "tanh", qkv_bias: bool = True, eps: float = 1e-6,
                 attention: str = "xla", dtype, rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(dim, epsilon=eps, dtype=dtype, rngs=rngs)
        self.attn = Attention(dim, num_heads, dropout=attention_dropout, qkv_bias=qkv_bias, implementation=attention,
                              dtype=dtype, rngs=rngs)
        self.norm2 = nnx.LayerNorm(dim, epsilon=eps, dtype=dtype, rngs=rngs)
        self.mlp = Mlp(dim, mlp_dim, dropout=dropout, gelu=gelu, dtype=dtype, kernel_init=_xavier,
                       bias_init=nnx.initializers.normal(1e-6), rngs=rngs)
        self.drop = nnx.Dropout(dropout, rngs=rngs)
        # Stochastic depth: dropout whose mask is shared over tokens and features = drop whole examples.
        self.drop_path = nnx.Dropout(drop_path, broadcast_dims=(1, 2), rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array | None, *, train: bool, num_tokens: int | None = None) -> jax.Array:
        y = self.drop(self.attn(self.norm1(x), mask, train=train, num_tokens=num_tokens), deterministic=not train)
        x = x + self.drop_path(y, deterministic=not train)
        y = self.mlp(self.norm2(x), train=train)
        return x + self.drop_path(y, deterministic=not train)


class Model(nnx.Module):
    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, *, patch_size: int,
                 hidden_size: int, num_layers: int, num_heads: int, mlp_dim: int,
                 classifier: str, dropout: float, attention_dropout: float,
                 stochastic_depth: float, pad_tokens_to_multiple: int, gelu: str = "tanh", qkv_bias: bool = True,
                 layer_norm_eps: float = 1e-6, fc_norm: bool = False, representation_size: int | None = None,
                 attention: str = "auto", dtype=jnp.float32, rngs: nnx.Rngs):
        h, w, c = input_shape
        check_patch_size((h, w), patch_size)
        if classifier not in ("token", "gap"):
            raise ValueError(f"classifier must be 'token' or 'gap', got {classifier!r}")
        self.classifier = classifier
        self.num_tokens = (h // patch_size) * (w // patch_size) + (classifier == "token")
        self.attention = attention_implementation(attention, hidden_size // num_heads, dtype)
        m = max(1, pad_tokens_to_multiple)
        if self.attention == "cudnn" and m == 1:
            m = 8  # (cuDNN's fused kernel refuses e.g. a class token's 65 tokens; 72, the padding masked, it runs)
        self.seq_len = -(-self.num_tokens // m) * m  # padded with masked-out tokens, e.g. 65 -> 72
        self.embed = PatchEmbed(c, hidden_size, patch_size, dtype=dtype, rngs=rngs)
        if classifier == "token":
            self.cls = nnx.Param(jnp.zeros((1, 1, hidden_size)))
        self.pos_embed = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (1, self.num_tokens, hidden_size)))
        self.drop = nnx.Dropout(dropout, rngs=rngs)
        self.blocks = nnx.List([
            EncoderBlock(hidden_size, num_heads, mlp_dim, dropout=dropout, attention_dropout=attention_dropout,
                         drop_path=stochastic_depth * i / max(num_layers - 1, 1), gelu=gelu, qkv_bias=qkv_bias,
                         eps=layer_norm_eps, attention=self.attention, dtype=dtype, rngs=rngs)
            for i in range(num_layers)
        ])
        self.norm = nnx.LayerNorm(hidden_size, epsilon=layer_norm_eps, dtype=dtype, rngs=rngs)
        self.fc_norm = fc_norm  # (the norm after pooling: for the class token the same numbers, per token)
        features = hidden_size
        if representation_size:
            self.pre_logits = nnx.Linear(hidden_size, representation_size, dtype=dtype, rngs=rngs)
            features = representation_size
        self.representation_size = representation_size
        self.head = nnx.Linear(features, num_classes, dtype=dtype, rngs=rngs)
        self.dtype = dtype

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        x = self.embed(x.astype(self.dtype))
        b, _, d = x.shape
        if self.classifier == "token":
            x = jnp.concatenate([jnp.broadcast_to(self.cls.value.astype(x.dtype), (b, 1, d)), x], axis=1)
        x = self.drop(x + self.pos_embed.value.astype(x.dtype), deterministic=not train)
        mask = None
        if self.seq_len > self.num_tokens:
            x = jnp.pad(x, ((0, 0), (0, self.seq_len - self.num_tokens), (0, 0)))
            mask = (jnp.arange(self.seq_len) < self.num_tokens)[None, None, None, :]  # keys only
        for block in self.blocks:
            x = block(x, mask, train=train, num_tokens=self.num_tokens)
        if not self.fc_norm:
            x = self.norm(x)
        x = x[:, 0] if self.classifier == "token" else jnp.mean(x[:, : self.num_tokens], axis=1)
        if self.fc_norm:
            x = self.norm(x)
        if self.representation_size:
            x = jnp.tanh(self.pre_logits(x))
        return self.head(x)
