"""Vision Transformer (Dosovitskiy et al. 2021), as in seed 004 (after Scenic's ViT): its ``model.*`` keys, the
network, its FLOPs and its pretrained weights (timm, big_vision, vision_transformer).

Pre-LN encoder blocks, learned 1-D position embedding (or big_vision's fixed 2-D sin-cos one), class token or
global average pooling, dropout, optional stochastic depth (per example, growing linearly with depth) and
LayerScale (CaiT, DeiT III: each branch's output times a learned per-channel gamma). The options pretrained
checkpoints need (``gelu``, ``qkv_bias``, ``layer_norm_eps``, ``fc_norm``, ``representation_size``) make it
compute what timm's ``VisionTransformer`` and big_vision's ViT compute (``ViTWeights``, models/pretrained.py).
Attention goes through ``jax.nn.dot_product_attention`` (XLA on CPU, cuDNN where it applies). Seed 004 never
passed ``train=True`` to its model, so its dropout never ran; here it does.
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
class ViTConfig(Patches, ModelConfig):
    arch: str = "vit"
    patch_size: int = 4              # square patches, one token each; must tile the images
    hidden_size: int = 128           # the token width
    num_layers: int = 6              # encoder blocks
    num_heads: int = 8               # attention heads; must divide hidden_size
    mlp_dim: int = 256               # each block's MLP hidden width
    classifier: str = "token"        # token | gap
    dropout: float = 0.1             # after the embedding, after attention and inside each MLP
    attention_dropout: float = 0.0   # on the attention weights
    stochastic_depth: float = 0.0    # drop rate of the last block; grows linearly from 0
    # LayerScale (CaiT; DeiT III: 1e-4 for ViT-S/B; timm's init_values): each residual branch times a learned
    # per-channel gamma starting at this value (blocks.<i>.ls1.gamma / ls2.gamma, as timm). 0 = off (no parameters)
    layer_scale: float = 0.0
    # learn: a learned (1, tokens, D) table (pos_embed) | sincos2d: big_vision's fixed 2-D sin-cos embedding of the
    # patch grid (no parameter; a class token gets none), as its vit_s16_i1k
    posemb: str = "learn"
    pad_tokens_to_multiple: int = 1  # e.g. 8: 65 tokens -> 72 (masked), for fused attention kernels
    # auto: cuDNN's fused attention on a GPU in bfloat16/float16 where it applies (head dim <= 128, a multiple
    # of 8; a class-token sequence is padded to a multiple of 8 for it), XLA elsewhere | xla | cudnn
    attention: str = "auto"
    # What pretrained checkpoints need (the defaults compute what seed 004 did):
    gelu: str = "tanh"               # tanh | exact (timm's checkpoints; big_vision's use tanh)
    qkv_bias: bool = True            # biases in the query/key/value projection
    layer_norm_eps: float = 1e-6     # LayerNorm's epsilon (timm's: 1e-6)
    fc_norm: bool = False            # the final LayerNorm after pooling, not before (timm's global_pool='avg')
    representation_size: Optional[int] = None  # a Dense+tanh before the head (big_vision's pre_logits)

    def check(self) -> None:
        super().check()
        all_positive(self, "patch_size", "hidden_size", "num_layers", "num_heads", "mlp_dim", "layer_norm_eps")
        check_choice("model.classifier", self.classifier, ("token", "gap"))
        check_choice("model.posemb", self.posemb, POSEMB)
        if self.posemb == "sincos2d" and self.hidden_size % 4:
            raise ConfigError("model.posemb", self.posemb, f"sincos2d needs model.hidden_size divisible by 4 "
                              f"(here {self.hidden_size}); use model.posemb=learn")
        check_positive("model.layer_scale", self.layer_scale, allow_zero=True)
        check_choice("model.gelu", self.gelu, GELU)
        if self.representation_size is not None:
            check_positive("model.representation_size", self.representation_size)
        if self.hidden_size % self.num_heads:
            raise ConfigError("model.num_heads", self.num_heads, f"must divide model.hidden_size={self.hidden_size}")
        for name in ("dropout", "attention_dropout", "stochastic_depth"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"model.{name}", getattr(self, name), "must be in [0, 1)")
        check_positive("model.pad_tokens_to_multiple", self.pad_tokens_to_multiple)
        check_choice("model.attention", self.attention, ("auto", "xla", "cudnn"))


def attention_implementation(setting: str, head_dim: int, dtype) -> str:
    """``model.attention`` resolved for this backend: "cudnn" (fused flash attention) on a GPU in bfloat16 or
    float16 with a head dimension it supports, else "xla". Asking for cudnn where it cannot run is an error."""
    import jax
    import jax.numpy as jnp

    gpu = jax.default_backend() == "gpu"
    fits = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) and head_dim <= 128 and head_dim % 8 == 0
    if setting == "cudnn" and not (gpu and fits):
        raise ValueError(f"model.attention=cudnn needs a GPU, hardware.precision=bfloat16 and a head dimension <= 128 "
                         f"that is a multiple of 8 (here: {jax.default_backend()}, {jnp.dtype(dtype).name}, "
                         f"{head_dim}); use model.attention=auto")
    if setting == "auto":
        return "cudnn" if gpu and fits else "xla"
    return setting


POSEMB = ("learn", "sincos2d")


def posemb_sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.0):
    """big_vision's ``posemb_sincos_2d``: (1, h*w, width) float32, the patch grid row-major; a quarter of the
    features each sin(x), cos(x), sin(y), cos(y) at ``width // 4`` frequencies from 1 to 1/temperature."""
    import numpy as np

    y, x = np.mgrid[:h, :w]
    omega = 1.0 / temperature ** (np.arange(width // 4) / (width // 4 - 1))
    y = np.einsum("m,d->md", y.flatten(), omega)
    x = np.einsum("m,d->md", x.flatten(), omega)
    return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)[None].astype(np.float32)


# ------------------------------------------------------------------------------------------ network
@functools.cache
def network() -> SimpleNamespace:
    """The network's classes (``.Model``, ``.EncoderBlock``, ``.Attention``), defined on the first call: JAX is
    imported here, when a model is built, never when the schema is read."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from .layers import LayerScale, Mlp, PatchEmbed, check_patch_size

    xavier = nnx.initializers.xavier_uniform()

    class Attention(nnx.Module):
        def __init__(self, dim: int, num_heads: int, *, dropout: float, qkv_bias: bool = True,
                     implementation: str = "xla", dtype, rngs: nnx.Rngs):
            if dim % num_heads:
                raise ValueError(f"hidden_size {dim} is not divisible by num_heads {num_heads}")
            self.num_heads, self.implementation = num_heads, implementation
            # Output features [q | k | v], each head-major: timm's qkv and big_vision's query/key/value alike.
            self.qkv = nnx.Linear(dim, 3 * dim, use_bias=qkv_bias, dtype=dtype, kernel_init=xavier, rngs=rngs)
            self.out = nnx.Linear(dim, dim, dtype=dtype, kernel_init=xavier, rngs=rngs)
            self.drop = nnx.Dropout(dropout, rngs=rngs)
            self.dropout = dropout

        def __call__(self, x: jax.Array, mask: jax.Array | None, *, train: bool,
                     num_tokens: int | None = None) -> jax.Array:
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
                     attention: str = "xla", layer_scale: float = 0.0, dtype, rngs: nnx.Rngs):
            self.norm1 = nnx.LayerNorm(dim, epsilon=eps, dtype=dtype, rngs=rngs)
            self.attn = Attention(dim, num_heads, dropout=attention_dropout, qkv_bias=qkv_bias,
                                  implementation=attention, dtype=dtype, rngs=rngs)
            self.norm2 = nnx.LayerNorm(dim, epsilon=eps, dtype=dtype, rngs=rngs)
            self.mlp = Mlp(dim, mlp_dim, dropout=dropout, gelu=gelu, dtype=dtype, kernel_init=xavier,
                           bias_init=nnx.initializers.normal(1e-6), rngs=rngs)
            self.drop = nnx.Dropout(dropout, rngs=rngs)
            # Stochastic depth: dropout whose mask is shared over tokens and features = drop whole examples.
            self.drop_path = nnx.Dropout(drop_path, broadcast_dims=(1, 2), rngs=rngs)
            # LayerScale: only where asked for (off: the parameter tree has no gamma)
            self.ls1 = LayerScale(dim, layer_scale) if layer_scale else None
            self.ls2 = LayerScale(dim, layer_scale) if layer_scale else None

        def __call__(self, x: jax.Array, mask: jax.Array | None, *, train: bool,
                     num_tokens: int | None = None) -> jax.Array:
            y = self.drop(self.attn(self.norm1(x), mask, train=train, num_tokens=num_tokens), deterministic=not train)
            if self.ls1 is not None:
                y = self.ls1(y)
            x = x + self.drop_path(y, deterministic=not train)
            y = self.mlp(self.norm2(x), train=train)
            if self.ls2 is not None:
                y = self.ls2(y)
            return x + self.drop_path(y, deterministic=not train)

    class Model(nnx.Module):
        def __init__(self, input_shape: tuple[int, int, int], num_classes: int, *, patch_size: int,
                     hidden_size: int, num_layers: int, num_heads: int, mlp_dim: int,
                     classifier: str, dropout: float, attention_dropout: float,
                     stochastic_depth: float, pad_tokens_to_multiple: int, gelu: str = "tanh", qkv_bias: bool = True,
                     layer_norm_eps: float = 1e-6, fc_norm: bool = False, representation_size: int | None = None,
                     attention: str = "auto", layer_scale: float = 0.0, posemb: str = "learn", dtype=jnp.float32,
                     rngs: nnx.Rngs):
            h, w, c = input_shape
            check_patch_size((h, w), patch_size)
            if classifier not in ("token", "gap"):
                raise ValueError(f"classifier must be 'token' or 'gap', got {classifier!r}")
            self.classifier = classifier
            self.num_tokens = (h // patch_size) * (w // patch_size) + (classifier == "token")
            self.attention = attention_implementation(attention, hidden_size // num_heads, dtype)
            self.seq_len = padded_tokens(self.num_tokens, pad_tokens_to_multiple, self.attention)
            self.embed = PatchEmbed(c, hidden_size, patch_size, dtype=dtype, rngs=rngs)
            if classifier == "token":
                self.cls = nnx.Param(jnp.zeros((1, 1, hidden_size)))
            if posemb not in POSEMB:
                raise ValueError(f"posemb must be one of {POSEMB}, got {posemb!r}")
            self.posemb = posemb
            if posemb == "learn":
                self.pos_embed = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(),
                                                                          (1, self.num_tokens, hidden_size)))
            else:  # a constant of the patch grid, added before the class token joins (big_vision)
                self.grid = (h // patch_size, w // patch_size)
            self.drop = nnx.Dropout(dropout, rngs=rngs)
            self.blocks = nnx.List([
                EncoderBlock(hidden_size, num_heads, mlp_dim, dropout=dropout, attention_dropout=attention_dropout,
                             drop_path=stochastic_depth * i / max(num_layers - 1, 1), gelu=gelu, qkv_bias=qkv_bias,
                             eps=layer_norm_eps, attention=self.attention, layer_scale=layer_scale, dtype=dtype,
                             rngs=rngs)
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
            if self.posemb == "sincos2d":
                x = x + jnp.asarray(posemb_sincos_2d(*self.grid, d), x.dtype)
            if self.classifier == "token":
                x = jnp.concatenate([jnp.broadcast_to(self.cls.value.astype(x.dtype), (b, 1, d)), x], axis=1)
            if self.posemb == "learn":
                x = x + self.pos_embed.value.astype(x.dtype)
            x = self.drop(x, deterministic=not train)
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

    return SimpleNamespace(Model=Model, EncoderBlock=EncoderBlock, Attention=Attention)


def padded_tokens(num_tokens: int, multiple: int, attention: str) -> int:
    """The sequence the blocks compute: ``num_tokens`` padded (masked) to a multiple of ``multiple``, of 8 for
    cuDNN's fused kernel (it refuses e.g. a class token's 65 tokens; 72, the padding masked, it runs)."""
    m = max(1, multiple)
    if attention == "cudnn" and m == 1:
        m = 8
    return -(-num_tokens // m) * m


# -------------------------------------------------------------------------------------------- FLOPs
def forward_flops(m: ViTConfig, input_shape, num_classes: int, dtype=None) -> float:
    """One example's forward (vision_train.perf's rules). Every token the blocks compute counts, padding tokens
    (``model.pad_tokens_to_multiple``, cuDNN's multiple of 8 where ``model.attention`` picks it for ``dtype``)
    and the class token included: they cost the device the same. ViT-B/4 on 32x32 images (768 wide, 12 layers,
    MLP 3072, 64 patches + class token) is 11.2 GFLOP."""
    h, w, c = input_shape
    p, d = m.patch_size, m.hidden_size
    patches = (h // p) * (w // p)
    tokens = patches + (m.classifier == "token")
    attention = "xla"
    if dtype is not None and m.pad_tokens_to_multiple <= 1 and m.attention != "xla":
        attention = attention_implementation(m.attention, d // m.num_heads, dtype)  # (JAX: this backend's kernel)
    t = padded_tokens(tokens, m.pad_tokens_to_multiple, attention)  # as the network pads
    embed = 2 * patches * p * p * c * d
    dense = 2 * t * d * (3 * d + d + 2 * m.mlp_dim)  # qkv, out, fc1 + fc2
    attend = 2 * 2 * t * t * d                        # QK^T and AV over all heads
    head_in = m.representation_size or d
    head = 2 * d * m.representation_size if m.representation_size else 0
    return embed + m.num_layers * (dense + attend) + head + 2 * head_in * num_classes


# ------------------------------------------------------------------------------ pretrained weights
def _renamed(arrays: dict, renames) -> dict:
    out = {}
    for name, a in arrays.items():
        for old, new in renames:
            name = name.replace(old, new)
        out[name] = a
    return out


def from_timm(sd: dict) -> dict:
    """timm's ``VisionTransformer`` (its PyTorch layouts already made Flax's) -> our paths. (fc_norm, the norm
    after pooling, keeps its name here: ``ViTWeights.check`` makes it ``norm`` for model.fc_norm=true.)"""
    return _renamed(sd, [("patch_embed.", "embed."), (".attn.proj.", ".attn.out."), ("cls_token", "cls"),
                         ("pre_logits.fc.", "pre_logits.")])


def _old_numbering(w: dict) -> bool:
    """vision_transformer's ``vit_jax/models_vit.py`` numbers the block's modules 0, 1, 2, 3; big_vision 0, 0, 1, 0."""
    return any("MultiHeadDotProductAttention_1/" in k for k in w)


def _leaf(name: str) -> str:
    return name.rsplit("/", 1)[-1]


def from_big_vision(w: dict) -> dict:
    """big_vision's ``models/vit.py`` (or vision_transformer's ``models_vit.py``) -> our paths: ``embedding/kernel``
    HWIO, ``pos_embedding`` (1, N, D) added before the class token ``cls`` joins (vision_transformer's
    ``Transformer/posembed_input/pos_embedding`` (1, 1 + N, D) after), ``Transformer/encoderblock_{i}/
    {LayerNorm_0, MultiHeadDotProductAttention_0/{query,key,value}/kernel (D, H, D/H), LayerNorm_1,
    MlpBlock_0/Dense_{0,1}}`` (vision_transformer: ``MultiHeadDotProductAttention_1``, ``LayerNorm_2``,
    ``MlpBlock_3``), ``Transformer/encoder_norm``, ``pre_logits``, ``head``; scanned checkpoints stack the blocks
    as ``Transformer/encoderblock/...``."""
    import numpy as np

    mha, ln2, mlp = ("MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3") if _old_numbering(w) else \
        ("MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0")
    blocks = {}  # i -> {name inside the block: array}
    rest = {}
    for k, a in w.items():
        m = re.match(r"Transformer/encoderblock_(\d+)/(.+)$", k)
        if m:
            blocks.setdefault(int(m.group(1)), {})[m.group(2)] = a
        elif k.startswith("Transformer/encoderblock/"):  # scanned: the blocks stacked on a leading axis
            for i in range(a.shape[0]):
                blocks.setdefault(i, {})[k[len("Transformer/encoderblock/"):]] = a[i]
        else:
            rest[k] = a
    out = {}
    for k, a in rest.items():
        if k.startswith("embedding/"):
            out["embed.proj." + _leaf(k)] = a
        elif k in ("pos_embedding", "Transformer/pos_embedding", "Transformer/posembed_input/pos_embedding"):
            out["pos_embed"] = a
        elif k == "cls":
            out["cls"] = a
        elif k.startswith("Transformer/encoder_norm/"):
            out["norm." + _leaf(k)] = a
        elif k.split("/")[0] in ("pre_logits", "head"):
            out[k.replace("/", ".")] = a
        else:
            out["?" + k] = a  # not part of the model: reported as the file's extra names
    for i, b in blocks.items():
        p = f"blocks.{i}."
        qkv = {}
        for k, a in b.items():
            if k.startswith(mha + "/"):
                part, leaf = k.split("/")[1:3]
                if part == "out":  # (H, D/H, D) -> (D, D)
                    out[p + "attn.out." + leaf] = a.reshape(-1, a.shape[-1]) if leaf == "kernel" else a
                else:  # query/key/value: (D, H, D/H) -> (D, D), bias (H, D/H) -> (D,)
                    qkv[(part, leaf)] = a.reshape(a.shape[0], -1) if leaf == "kernel" else a.reshape(-1)
            elif k.startswith("LayerNorm_0/"):
                out[p + "norm1." + _leaf(k)] = a
            elif k.startswith(ln2 + "/"):
                out[p + "norm2." + _leaf(k)] = a
            elif k.startswith(mlp + "/Dense_"):
                j = int(k.split("/")[1].split("_")[1])
                out[p + f"mlp.fc{j + 1}." + _leaf(k)] = a
            else:
                out["?" + f"Transformer/encoderblock_{i}/{k}"] = a
        for leaf in ("kernel", "bias"):
            parts = [qkv.get((n, leaf)) for n in ("query", "key", "value")]
            if all(x is not None for x in parts):
                out[p + "attn.qkv." + leaf] = np.concatenate(parts, axis=-1)
    return out


class ViTWeights(Weights):
    """timm's ``VisionTransformer`` (PyTorch names and layouts: ``patch_embed.proj.weight`` OIHW,
    ``blocks.0.attn.qkv.weight`` (3D, D), ``head.weight`` (K, D); the .safetensors the Hugging Face hub serves),
    big_vision's and vision_transformer's ViT (``from_big_vision``)."""
    formats = (WeightFormat("timm ViT", "patch_embed.proj.weight", from_timm, gelu="exact", pytorch=True),
               WeightFormat("vision_transformer ViT", "embedding/kernel", from_big_vision, gelu="tanh",
                            matches=_old_numbering),
               WeightFormat("big_vision ViT", "embedding/kernel", from_big_vision, gelu="tanh"))
    input_kernel = "embed.proj.kernel"

    def file_keys(self, ours: dict) -> dict:
        k = ours[self.input_kernel]
        depth = len({k.split(".")[1] for k in ours if k.startswith("blocks.")})
        keys = {"patch_size": int(k.shape[0]), "hidden_size": int(k.shape[-1]), "num_layers": depth}
        if "blocks.0.mlp.fc1.kernel" in ours:
            keys["mlp_dim"] = int(ours["blocks.0.mlp.fc1.kernel"].shape[-1])
        keys["classifier"] = "token" if "cls" in ours else "gap"
        keys["qkv_bias"] = "blocks.0.attn.qkv.bias" in ours
        keys["fc_norm"] = "fc_norm.scale" in ours
        if "pre_logits.kernel" in ours:
            keys["representation_size"] = int(ours["pre_logits.kernel"].shape[-1])
        return keys

    def check(self, ours: dict, keys: dict, cfg: ViTConfig, source: str) -> tuple[dict, Optional[str]]:
        """The norm after pooling (timm's fc_norm) has the names of the norm before it: the file decides."""
        if keys["fc_norm"]:
            if keys["classifier"] == "token":
                raise ConfigError("model.init_from", source, "the file normalises after pooling and has a class "
                                  "token (timm's global_pool='avg' with class_token=True, e.g. MAE/BEiT fine-tunes): "
                                  "average pooling beside a class token is not supported here")
            ours = {("norm." + k.split(".", 1)[1] if k.startswith("fc_norm.") else k): v for k, v in ours.items()}
        if keys["fc_norm"] != cfg.fc_norm:
            return ours, (f"the file's final norm comes {'after' if keys['fc_norm'] else 'before'} pooling, "
                          f"model.fc_norm={str(cfg.fc_norm).lower()}")
        return ours, None

    def mismatch(self, wrong: list[str], ours: dict, want: dict, keys: dict) -> Optional[str]:
        """LayerScale, or learned position embeddings, in one of the file and the model only."""
        if line := layer_scale_mismatch(ours, want):
            return line
        if "pos_embed" in ours and "pos_embed" not in want:
            return ("the file has learned position embeddings (pos_embed) and the model fixed ones "
                    "(model.posemb=sincos2d); set model.posemb=learn")
        if "pos_embed" in want and "pos_embed" not in ours:
            return ("the file has no position embeddings (big_vision's posemb='sincos2d' computes them); set "
                    "model.posemb=sincos2d")
        return None

    def fit(self, ours: dict, cfg: ViTConfig, input_shape, source: str) -> str:
        """The file's position embeddings onto the model's token grid (resampled where the grid differs, as
        big_vision's ``resample_posemb``), with or without the class token's."""
        import numpy as np

        from .pretrained import resample_posemb

        pe = ours.get("pos_embed")
        if pe is None or pe.ndim != 3:
            return "as saved"
        token = cfg.classifier == "token"
        n = pe.shape[1]
        has_cls = math.isqrt(n) ** 2 != n and math.isqrt(n - 1) ** 2 == n - 1  # vision_transformer/timm: cls first
        tok, grid = (pe[:, :1], pe[:, 1:]) if has_cls else (np.zeros_like(pe[:, :1]), pe)
        gs = math.isqrt(grid.shape[1])
        if gs * gs != grid.shape[1]:
            raise ConfigError("model.init_from", source, f"its position embeddings ({n} tokens) are not a square grid"
                              f"{' plus a class token' if has_cls else ''}; this loader reads square grids only")
        p = cfg.patch_size
        hw = (input_shape[0] // p, input_shape[1] // p)
        done = "as saved"
        if (gs, gs) != hw:
            grid = resample_posemb(grid, hw)
            done = f"resampled {gs}x{gs} -> {hw[0]}x{hw[1]}"
        # big_vision adds them before the class token joins: its entry is 0 here (the same sums)
        ours["pos_embed"] = np.concatenate([tok, grid], axis=1) if token else grid
        if not token and has_cls:
            ours["?pos_embed of the class token"] = tok
        return done


ARCHITECTURE = Architecture(schema=ViTConfig, network=network, forward_flops=forward_flops, weights=ViTWeights())
