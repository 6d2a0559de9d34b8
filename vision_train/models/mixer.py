"""MLP-Mixer (Tolstikhin et al. 2021), as in seed 000: its ``model.*`` keys, the network, its FLOPs and its
pretrained weights (timm, big_vision, vision_transformer).

Each block mixes tokens (an MLP across the patch axis, applied per channel) then channels (an MLP
across features, per token), each pre-LayerNorm over the feature axis with a residual; optionally each branch
times a LayerScale gamma and dropped per example (stochastic depth, growing linearly with depth). Seed 001's
PyTorch version normalised over the wrong axis and applied its "token" MLP to channels, so it never
mixed tokens; ``mixer_small`` uses its sizes with this correct block.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional

from ..errors import ConfigError, check_choice, check_positive
from . import GELU, Architecture, ModelConfig, Patches, WeightFormat, Weights, all_positive, layer_scale_mismatch


# ------------------------------------------------------------------------------------------- schema
@dataclass
class MixerConfig(Patches, ModelConfig):
    arch: str = "mixer"
    patch_size: int = 4              # square patches, one token each; must tile the images
    num_blocks: int = 8              # mixer blocks (token mixing, then channel mixing)
    hidden_dim: int = 192            # channels per token (the patch embedding's width)
    tokens_mlp_dim: int = 96         # the token-mixing MLP's hidden width
    channels_mlp_dim: int = 768      # the channel-mixing MLP's hidden width
    gelu: str = "tanh"               # tanh | exact (timm's checkpoints)
    layer_norm_eps: float = 1e-6     # LayerNorm's epsilon (timm's: 1e-6)
    stochastic_depth: float = 0.0    # drop rate of the last block (per example); grows linearly from 0
    # LayerScale (as model.layer_scale of vit; timm's init_values): each mixing branch times a learned per-channel
    # gamma starting at this value (blocks.<i>.ls1.gamma / ls2.gamma). 0 = off (no parameters)
    layer_scale: float = 0.0

    def check(self) -> None:
        super().check()
        all_positive(self, "patch_size", "hidden_dim", "num_blocks", "tokens_mlp_dim", "channels_mlp_dim",
                     "layer_norm_eps")
        check_choice("model.gelu", self.gelu, GELU)
        if not 0.0 <= self.stochastic_depth < 1.0:
            raise ConfigError("model.stochastic_depth", self.stochastic_depth, "must be in [0, 1)")
        check_positive("model.layer_scale", self.layer_scale, allow_zero=True)


# ------------------------------------------------------------------------------------------ network
@functools.cache
def network() -> SimpleNamespace:
    """The network's classes (``.Model``, ``.MixerBlock``), defined on the first call: JAX is imported here, when
    a model is built, never when the schema is read."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from .layers import LayerScale, Mlp, PatchEmbed, check_patch_size

    class MixerBlock(nnx.Module):
        def __init__(self, num_tokens: int, dim: int, tokens_mlp_dim: int, channels_mlp_dim: int, *,
                     gelu: str, eps: float, drop_path: float = 0.0, layer_scale: float = 0.0, dtype,
                     rngs: nnx.Rngs):
            self.norm1 = nnx.LayerNorm(dim, epsilon=eps, dtype=dtype, rngs=rngs)
            self.token_mixing = Mlp(num_tokens, tokens_mlp_dim, gelu=gelu, dtype=dtype, rngs=rngs)
            self.norm2 = nnx.LayerNorm(dim, epsilon=eps, dtype=dtype, rngs=rngs)
            self.channel_mixing = Mlp(dim, channels_mlp_dim, gelu=gelu, dtype=dtype, rngs=rngs)
            # Only where asked for, so that a Mixer without them has the state (and checkpoints) it always had.
            # Stochastic depth: dropout whose mask is shared over tokens and features = drop whole examples.
            self.drop_path = nnx.Dropout(drop_path, broadcast_dims=(1, 2), rngs=rngs) if drop_path else None
            self.ls1 = LayerScale(dim, layer_scale) if layer_scale else None
            self.ls2 = LayerScale(dim, layer_scale) if layer_scale else None

        def _residual(self, x: jax.Array, y: jax.Array, scale, train: bool) -> jax.Array:
            if scale is not None:
                y = scale(y)
            if self.drop_path is not None:
                y = self.drop_path(y, deterministic=not train)
            return x + y

        def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:  # x: (B, tokens, dim)
            y = jnp.swapaxes(self.norm1(x), 1, 2)          # (B, dim, tokens): the MLP runs across tokens
            x = self._residual(x, jnp.swapaxes(self.token_mixing(y, train=train), 1, 2), self.ls1, train)
            return self._residual(x, self.channel_mixing(self.norm2(x), train=train), self.ls2, train)

    class Model(nnx.Module):
        def __init__(self, input_shape: tuple[int, int, int], num_classes: int, *, patch_size: int,
                     num_blocks: int, hidden_dim: int, tokens_mlp_dim: int,
                     channels_mlp_dim: int, gelu: str, layer_norm_eps: float, stochastic_depth: float = 0.0,
                     layer_scale: float = 0.0, dtype=jnp.float32, rngs: nnx.Rngs):
            h, w, c = input_shape
            check_patch_size((h, w), patch_size)
            num_tokens = (h // patch_size) * (w // patch_size)
            self.stem = PatchEmbed(c, hidden_dim, patch_size, dtype=dtype, rngs=rngs)
            self.blocks = nnx.List([
                MixerBlock(num_tokens, hidden_dim, tokens_mlp_dim, channels_mlp_dim, gelu=gelu, eps=layer_norm_eps,
                           drop_path=stochastic_depth * i / max(num_blocks - 1, 1), layer_scale=layer_scale,
                           dtype=dtype, rngs=rngs)
                for i in range(num_blocks)
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

    return SimpleNamespace(Model=Model, MixerBlock=MixerBlock)


# -------------------------------------------------------------------------------------------- FLOPs
def forward_flops(m: MixerConfig, input_shape, num_classes: int, dtype=None) -> float:
    """One example's forward (vision_train.perf's rules)."""
    h, w, c = input_shape
    p, d = m.patch_size, m.hidden_dim
    s = (h // p) * (w // p)
    embed = 2 * s * p * p * c * d
    tokens = 2 * d * 2 * s * m.tokens_mlp_dim      # per channel: tokens -> tokens_mlp_dim -> tokens
    channels = 2 * s * 2 * d * m.channels_mlp_dim  # per token: dim -> channels_mlp_dim -> dim
    return embed + m.num_blocks * (tokens + channels) + 2 * d * num_classes


# ------------------------------------------------------------------------------ pretrained weights
def from_timm(sd: dict) -> dict:
    """timm's ``MlpMixer`` (its PyTorch layouts already made Flax's) -> our paths."""
    out = {}
    for name, a in sd.items():
        out[name.replace(".mlp_tokens.", ".token_mixing.").replace(".mlp_channels.", ".channel_mixing.")] = a
    return out


def from_big_vision(w: dict) -> dict:
    """vision_transformer's ``models_mixer.py`` / big_vision's ``mlp_mixer.py`` -> our paths: ``stem``,
    ``MixerBlock_{i}/{LayerNorm_0, token_mixing/Dense_{0,1}, LayerNorm_1, channel_mixing/Dense_{0,1}}``,
    ``pre_head_layer_norm``, ``head``."""
    out = {}
    for k, a in w.items():
        m = re.match(r"MixerBlock_(\d+)/(.+)$", k)
        leaf = k.rsplit("/", 1)[-1]
        if k.startswith("stem/"):
            out["stem.proj." + leaf] = a
        elif k.startswith("pre_head_layer_norm/"):
            out["norm." + leaf] = a
        elif k.startswith("head/"):
            out["head." + leaf] = a
        elif m:
            i, rest = m.group(1), m.group(2)
            rest = (rest.replace("LayerNorm_0", "norm1").replace("LayerNorm_1", "norm2")
                    .replace("Dense_0", "fc1").replace("Dense_1", "fc2"))
            out[f"blocks.{i}." + rest.replace("/", ".")] = a
        else:
            out["?" + k] = a  # not part of the model: reported as the file's extra names
    return out


class MixerWeights(Weights):
    """timm's ``MlpMixer`` (``stem.proj.weight`` OIHW, ``blocks.0.mlp_tokens.fc1.weight`` ...) and big_vision's /
    vision_transformer's Mixer (``from_big_vision``)."""
    formats = (WeightFormat("timm Mixer", "stem.proj.weight", from_timm, gelu="exact", pytorch=True),
               WeightFormat("big_vision Mixer", "stem/kernel", from_big_vision, gelu="tanh"))
    input_kernel = "stem.proj.kernel"

    def file_keys(self, ours: dict) -> dict:
        k = ours[self.input_kernel]
        depth = len({k.split(".")[1] for k in ours if k.startswith("blocks.")})
        keys = {"patch_size": int(k.shape[0]), "hidden_dim": int(k.shape[-1]), "num_blocks": depth}
        if "blocks.0.token_mixing.fc1.kernel" in ours:
            keys["tokens_mlp_dim"] = int(ours["blocks.0.token_mixing.fc1.kernel"].shape[-1])
        if "blocks.0.channel_mixing.fc1.kernel" in ours:
            keys["channels_mlp_dim"] = int(ours["blocks.0.channel_mixing.fc1.kernel"].shape[-1])
        return keys

    def mismatch(self, wrong: list[str], ours: dict, want: dict, keys: dict) -> Optional[str]:
        """LayerScale in one of the file and the model only; a Mixer's token-mixing weights fit one token count, so
        one image size: say which."""
        if line := layer_scale_mismatch(ours, want):
            return line
        if not wrong or not all("token_mixing.fc1" in k or "token_mixing.fc2" in k for k in wrong):
            return None
        n = ours["blocks.0.token_mixing.fc1.kernel"].shape[0]
        g, p = math.isqrt(n), keys["patch_size"]
        return (f"the file's Mixer mixes {n} tokens ({g}x{g} patches of {p}: {g * p}x{g * p} images), the model "
                f"{want['blocks.0.token_mixing.fc1.kernel'].shape[0]}; a Mixer's token-mixing weights fit one image "
                f"size: train at {g * p}x{g * p}")


ARCHITECTURE = Architecture(schema=MixerConfig, network=network, forward_flops=forward_flops,
                            weights=MixerWeights())
