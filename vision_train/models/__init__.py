"""The model registry: every architecture, its config schema and its module, in one place.

An architecture is
- a module ``vision_train/models/<arch>.py`` exporting ``Model(input_shape, num_classes, *, <the keys of its
  schema>, dtype, rngs)`` with ``__call__(x, *, train)`` on NHWC images of any size and channel count;
- its schema here: a dataclass of the ``model.*`` keys with their defaults and their checks, listed in
  ``ARCHITECTURES``;
- its presets, ``conf/model/<name>.yaml`` (``defaults: [/schema/model/<arch>@_here_, _self_]``).
Nothing else names architectures: the config (Hydra's schema, validation, unknown keys, the config a
checkpoint carries), training, evaluation and prediction read them from here.

This module imports neither JAX nor Hydra (DESIGN.md, decision 10; the config reads it before the command
line sets ``XLA_FLAGS``): an architecture's module, which imports JAX, is loaded when its model is built.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from typing import ClassVar, List, Optional

from ..errors import ConfigError, check_choice, check_positive

MISSING = "???"  # OmegaConf's marker for a value that must be given


class Freezable:
    """Config dataclasses that become read-only once validated (``config.to_run_config``; Hydra needs them
    mutable while composing). Here because the model schemas need it and this package imports no config."""

    def __setattr__(self, name, value):
        if self.__dict__.get("_frozen"):
            raise dataclasses.FrozenInstanceError(f"RunConfig is read-only; cannot set {name!r}")
        object.__setattr__(self, name, value)


RESET_HEAD = ("auto", "true", "false")
GELU = ("tanh", "exact")  # jax.nn.gelu's tanh approximation (Flax, big_vision) | erf (timm, PyTorch)


def valid_patch_sizes(h: int, w: int) -> list[int]:
    return [p for p in range(1, min(h, w) + 1) if h % p == 0 and w % p == 0]


# ------------------------------------------------------------------------------------------ schemas
@dataclass
class ModelConfig(Freezable):
    """The keys every model has. An architecture's schema adds its own, and its checks."""
    arch: str = MISSING                # which architecture (ARCHITECTURES), i.e. which module here
    num_classes: Optional[int] = None  # None: as many as the data set has
    # Pretrained weights (models/pretrained.py): a local file (timm .safetensors/.bin, big_vision .npz),
    # hf-hub:<repo id>[/<file>] or an https URL; read into a new run before step 1 (a resume restores its own).
    init_from: Optional[str] = None
    reset_head: str = "auto"           # auto: a new head when the class count differs | true | false
    # Only these architectures have weight mappings (models/pretrained.py).
    loads_pretrained: ClassVar[bool] = False

    def check(self) -> None:
        """Impossible values, each a ``ConfigError`` naming the key, the value and the fix."""
        if self.num_classes is not None:
            check_positive("model.num_classes", self.num_classes)
        check_choice("model.reset_head", str(self.reset_head).lower(), RESET_HEAD)
        if self.init_from is not None and not self.loads_pretrained:
            loadable = [a for a, s in ARCHITECTURES.items() if s.loads_pretrained]
            raise ConfigError("model.init_from", self.init_from,
                              f"model={self.arch} cannot load pretrained weights; use one of the "
                              f"{'/'.join(loadable)} presets (e.g. model=vit_b) or leave model.init_from unset")

    def check_input(self, shape: tuple[int, int, int], data: str) -> None:
        """Values impossible for images of ``shape`` (H, W, C) of the data set named ``data``."""

    def kwargs(self) -> dict:
        """The architecture's keys as ``Model``'s keyword arguments (lists as tuples)."""
        kw = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
              if f.name not in ("arch", "num_classes", "init_from", "reset_head")}
        return {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in kw.items()}


class _Patches:
    """For schemas with ``patch_size``: it must tile the images exactly."""

    def check_input(self, shape, data: str) -> None:
        h, w = shape[:2]
        if self.patch_size not in valid_patch_sizes(h, w):
            raise ConfigError("model.patch_size", self.patch_size,
                              f"does not divide the {h}x{w} {data} images; use one of {valid_patch_sizes(h, w)}")


def _all_positive(schema: ModelConfig, *names: str) -> None:
    for name in names:
        check_positive(f"model.{name}", getattr(schema, name))


@dataclass
class MLPConfig(ModelConfig):
    arch: str = "mlp"
    hidden_layers: int = 1
    hidden_dim: int = 10

    def check(self) -> None:
        super().check()
        _all_positive(self, "hidden_dim")
        check_positive("model.hidden_layers", self.hidden_layers, allow_zero=True)


@dataclass
class CNNConfig(ModelConfig):
    arch: str = "cnn"
    features: List[int] = field(default_factory=lambda: [32, 64])
    dense_dim: int = 256

    def check(self) -> None:
        super().check()
        _all_positive(self, "dense_dim")
        if not self.features or any(f <= 0 for f in self.features):
            raise ConfigError("model.features", list(self.features),
                              "give one or more channel counts, all > 0, e.g. [32,64]")


@dataclass
class MixerConfig(_Patches, ModelConfig):
    arch: str = "mixer"
    patch_size: int = 4
    num_blocks: int = 8
    hidden_dim: int = 192
    tokens_mlp_dim: int = 96
    channels_mlp_dim: int = 768
    gelu: str = "tanh"               # tanh | exact (timm's checkpoints)
    layer_norm_eps: float = 1e-6
    loads_pretrained: ClassVar[bool] = True

    def check(self) -> None:
        super().check()
        _all_positive(self, "patch_size", "hidden_dim", "num_blocks", "tokens_mlp_dim", "channels_mlp_dim",
                      "layer_norm_eps")
        check_choice("model.gelu", self.gelu, GELU)


@dataclass
class ViTConfig(_Patches, ModelConfig):
    arch: str = "vit"
    patch_size: int = 4
    hidden_size: int = 128
    num_layers: int = 6
    num_heads: int = 8
    mlp_dim: int = 256
    classifier: str = "token"        # token | gap
    dropout: float = 0.1
    attention_dropout: float = 0.0
    stochastic_depth: float = 0.0    # drop rate of the last block; grows linearly from 0
    pad_tokens_to_multiple: int = 1  # e.g. 8: 65 tokens -> 72 (masked), for fused attention kernels
    # auto: cuDNN's fused attention on a GPU in bfloat16/float16 where it applies (head dim <= 128, a multiple
    # of 8; a class-token sequence is padded to a multiple of 8 for it), XLA elsewhere | xla | cudnn
    attention: str = "auto"
    # What pretrained checkpoints need (the defaults compute what seed 004 did):
    gelu: str = "tanh"               # tanh | exact (timm's checkpoints; big_vision's use tanh)
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-6
    fc_norm: bool = False            # the final LayerNorm after pooling, not before (timm's global_pool='avg')
    representation_size: Optional[int] = None  # a Dense+tanh before the head (big_vision's pre_logits)
    loads_pretrained: ClassVar[bool] = True

    def check(self) -> None:
        super().check()
        _all_positive(self, "patch_size", "hidden_size", "num_layers", "num_heads", "mlp_dim", "layer_norm_eps")
        check_choice("model.classifier", self.classifier, ("token", "gap"))
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


# The registry: architecture name (``model.arch``, and the module ``vision_train.models.<arch>``) -> its schema.
ARCHITECTURES: dict[str, type[ModelConfig]] = {schema.arch: schema for schema in
                                                (MLPConfig, CNNConfig, MixerConfig, ViTConfig)}


# ------------------------------------------------------------------------------------------- models
def create(arch: str | ModelConfig, input_shape, num_classes: int, *, rngs, **kwargs):
    """``arch``'s ``Model``: ``arch`` a name (keys not given take the schema's defaults) or a model config
    (its keys; ``kwargs`` override them, e.g. ``dtype``)."""
    schema = arch if isinstance(arch, ModelConfig) else ARCHITECTURES.get(arch)
    if schema is None:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {tuple(ARCHITECTURES)}")
    if not isinstance(schema, ModelConfig):
        schema = schema()
    module = importlib.import_module(f"{__name__}.{schema.arch}")  # (JAX: only when a model is built)
    return module.Model(tuple(input_shape), num_classes, rngs=rngs, **{**schema.kwargs(), **kwargs})


def build(cfg: ModelConfig, input_shape, data_classes: int, *, rngs, dtype, data: str = "the data"):
    """The model ``cfg`` describes, for images of ``input_shape`` from a data set (named ``data``) of
    ``data_classes`` classes. A config that cannot fit that data is a ``ConfigError`` naming the key."""
    num_classes = cfg.num_classes or data_classes
    if num_classes < data_classes:
        raise ConfigError("model.num_classes", cfg.num_classes,
                          f"{data} has {data_classes} classes; set model.num_classes={data_classes} "
                          f"or leave it unset (null) to follow the data")
    cfg.check_input(tuple(input_shape), data)
    try:
        return create(cfg, input_shape, num_classes, rngs=rngs, dtype=dtype)
    except ValueError as e:  # (e.g. a CNN halving a too small image too often)
        raise ConfigError(f"model={cfg.arch}", data, str(e)) from None
