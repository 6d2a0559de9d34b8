"""The model registry: every architecture, found here, one module each.

An architecture is one module ``vision_train/models/<arch>.py`` and its presets ``conf/model/<name>.yaml``
(``defaults: [/schema/model/<arch>@_here_, _self_]``). The module holds everything about it and declares it as
``ARCHITECTURE = Architecture(...)``:
- its schema: a ``ModelConfig`` dataclass of the ``model.*`` keys with their defaults and checks;
- its network: ``Model(input_shape, num_classes, *, <the keys of its schema>, dtype, rngs)`` with
  ``__call__(x, *, train)`` on NHWC images of any size and channel count;
- its analytic FLOPs: ``forward_flops(cfg, input_shape, num_classes, dtype)`` (``vision_train.perf``'s rules);
- its pretrained-weight mapping, if it loads any (``Weights``: the file layouts and what they say about the
  model; ``models/pretrained.py`` reads, checks and fits the files).
This module finds the architecture modules (every module here but the shared ones) when it is imported, so
adding a model is its module and its YAML. No file of the package outside ``models/`` names an architecture: the
config (Hydra's schema, validation, unknown keys, the config a checkpoint carries), training, FLOPs, the
pretrained-weight loader, evaluation and prediction ask the registry (``REGISTRY``, ``architecture(name)``), and
scripts read the presets through ``presets()``.

Neither this module nor an architecture module's top level imports JAX or Hydra (DESIGN.md, decision 10; the
config reads the schemas before the command line sets ``JAX_PLATFORMS`` and ``XLA_FLAGS``): an architecture's
network is defined by its ``network()``, which imports JAX, when a model is first built.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import re
from dataclasses import dataclass
from typing import Any, Callable, Optional

from ..errors import ConfigError, check_choice, check_positive

MISSING = "???"  # OmegaConf's marker for a value that must be given
SHARED = ("layers", "pretrained")  # the modules here that are not architectures (they import JAX)


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

    def check(self) -> None:
        """Impossible values, each a ``ConfigError`` naming the key, the value and the fix."""
        if self.num_classes is not None:
            check_positive("model.num_classes", self.num_classes)
        check_choice("model.reset_head", str(self.reset_head).lower(), RESET_HEAD)
        if self.init_from is not None and not loads_weights(self.arch):
            raise ConfigError("model.init_from", self.init_from, cannot_load(self.arch))

    def check_input(self, shape: tuple[int, int, int], data: str) -> None:
        """Values impossible for images of ``shape`` (H, W, C) of the data set named ``data``."""

    def kwargs(self) -> dict:
        """The architecture's keys as ``Model``'s keyword arguments (lists as tuples)."""
        common = {f.name for f in dataclasses.fields(ModelConfig)}
        kw = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in common}
        return {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in kw.items()}


class Patches:
    """For schemas with ``patch_size``: it must tile the images exactly."""

    def check_input(self, shape, data: str) -> None:
        h, w = shape[:2]
        if self.patch_size not in valid_patch_sizes(h, w):
            raise ConfigError("model.patch_size", self.patch_size,
                              f"does not divide the {h}x{w} {data} images; use one of {valid_patch_sizes(h, w)}")


def all_positive(schema: ModelConfig, *names: str) -> None:
    for name in names:
        check_positive(f"model.{name}", getattr(schema, name))


# ------------------------------------------------------------------------------- pretrained weights
@dataclass(frozen=True)
class WeightFormat:
    """One file layout an architecture's pretrained weights come in (``models/pretrained.py`` reads the file:
    .safetensors, PyTorch .bin/.pth or .npz; a training state's ``params/`` or ``opt/target/`` prefix and
    ``module.`` are taken off first)."""
    name: str                          # what the file is, as the run's metadata says it, e.g. "timm ViT"
    marker: str                        # an array name only this layout has: it tells the layout
    to_ours: Callable[[dict], dict]    # the file's arrays by name -> ours by dotted path (blocks.0.attn.qkv.kernel)
    gelu: str = "exact"                # the GELU the code that wrote it computes: exact (PyTorch) | tanh (Flax)
    pytorch: bool = False              # PyTorch layouts (OIHW, (out, in), LayerNorm weight): made Flax's first
    matches: Optional[Callable[[dict], bool]] = None  # a finer test than the marker, for layouts sharing one


class Weights:
    """An architecture's pretrained-weight mapping. ``models/pretrained.py`` reads the file, finds its layout
    among every architecture's ``formats``, checks names and shapes against the model, handles the head and
    says what fits; what only this architecture knows is here. Subclass it in the architecture's module."""
    formats: tuple[WeightFormat, ...] = ()
    input_kernel: str = ""  # our path of the first layer's HWIO kernel: the patch size and the image channels
    stats: bool = False     # the files hold the model's running statistics too (BatchNorm: its nnx.BatchStat)
    # The input normalisation, per RGB channel in [0, 1] units, that this architecture's pretrained classifiers were
    # trained with: the default of ``predict weights=`` (0.5 / 0.5, pixels in [-1, 1]: big_vision's and timm's ViT
    # and Mixer checkpoints). A checkpoint that differs (its card says) is predicted with mean= and std=.
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)

    def file_keys(self, ours: dict) -> dict:
        """The ``model.*`` keys the file's arrays (by our paths) determine, e.g. {"patch_size": 16, ...}."""
        raise NotImplementedError

    def check(self, ours: dict, keys: dict, cfg: ModelConfig, source: str) -> tuple[dict, Optional[str]]:
        """Before names and shapes are compared: the arrays as the model ``cfg`` names them, and why the file
        cannot fit ``cfg`` where its names and shapes would not say it (None: they will)."""
        return ours, None

    def fit(self, ours: dict, cfg: ModelConfig, input_shape, source: str) -> str:
        """Fit the arrays to images of ``input_shape`` in place (e.g. resample position embeddings); returns
        what was done, for the run's metadata."""
        return "as saved"

    def mismatch(self, wrong: list[str], ours: dict, want: dict, keys: dict) -> Optional[str]:
        """A clearer line than the list of names whose shapes differ (``wrong``), or None."""
        return None


def layer_scale_mismatch(ours: dict, want: dict) -> Optional[str]:
    """One line where the file's blocks and the model's differ in LayerScale (``blocks.<i>.ls1.gamma``), else None."""
    def has(names) -> bool:
        return any(k.endswith((".ls1.gamma", ".ls2.gamma")) for k in names)

    if has(ours) and not has(want):
        return ("the file's blocks have LayerScale (blocks.<i>.ls1.gamma, ls2.gamma: timm's init_values) and the "
                "model has none (model.layer_scale=0); set model.layer_scale to any value > 0, e.g. 1e-5 (the file's "
                "gammas replace it)")
    if has(want) and not has(ours):
        return "the file's blocks have no LayerScale (blocks.<i>.ls1.gamma); set model.layer_scale=0"
    return None


# -------------------------------------------------------------------------------------- the registry
@dataclass(frozen=True)
class Architecture:
    """One architecture, as its module ``models/<name>.py`` declares it (``ARCHITECTURE = Architecture(...)``)."""
    schema: type[ModelConfig]             # its model.* keys; schema.arch is its name and its module's
    network: Callable[[], Any]            # -> its classes, ``.Model`` the nnx model (imports JAX: when one is built)
    forward_flops: Callable[..., float]   # (cfg, input_shape, num_classes, dtype) -> FLOPs of one example's forward
    weights: Optional[Weights] = None     # its pretrained-weight mapping; None: it loads none

    @property
    def name(self) -> str:
        return self.schema.arch


def _discover() -> dict[str, Architecture]:
    found = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name in SHARED or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        arch = getattr(module, "ARCHITECTURE", None)
        if not isinstance(arch, Architecture) or arch.name != info.name:
            raise TypeError(f"{module.__name__} must declare ARCHITECTURE = Architecture(schema=..., ...) with "
                            f"schema.arch == {info.name!r} (or be listed in models.SHARED)")
        found[arch.name] = arch
    return found


def architecture(name: str) -> Architecture:
    """The architecture ``model.arch=<name>`` selects."""
    found = REGISTRY.get(name)
    if found is None:
        raise ValueError(f"unknown architecture {name!r}; choose one of {tuple(REGISTRY)}")
    return found


def loads_weights(name: str) -> bool:
    return name in REGISTRY and REGISTRY[name].weights is not None


def cannot_load(name: str) -> str:
    """Why ``model.init_from`` is refused for ``model=<name>``, and which presets load weights."""
    loadable = [a for a in REGISTRY if loads_weights(a)]
    choices = [p for p, cfg in presets().items() if cfg.arch in loadable]
    return (f"model={name} cannot load pretrained weights; use a preset of {' or '.join(loadable)} "
            f"({', '.join(choices) or 'conf/model/'}) or leave model.init_from unset")


def presets() -> dict[str, ModelConfig]:
    """The model presets, ``conf/model/<name>.yaml``, read without Hydra: name -> its config (the schema's
    defaults under the file's keys), for scripts that compose no config (benchmarks). A run composes them with
    Hydra (tests/test_models.py checks that both give the same keys)."""
    from pathlib import Path

    import yaml  # (PyYAML: only here)

    from ..api import CONF

    out = {}
    for path in sorted(Path(CONF, "model").glob("*.yaml")):
        keys = yaml.safe_load(path.read_text()) or {}
        arch = None
        for entry in keys.pop("defaults", None) or []:
            m = re.fullmatch(r"/?schema/model/(\w+)@_here_", str(entry))
            arch = m.group(1) if m else arch
        if arch in REGISTRY:
            out[path.stem] = REGISTRY[arch].schema(**keys)
    return out


REGISTRY: dict[str, Architecture] = _discover()
# model.arch -> its schema (the config's view of the registry)
ARCHITECTURES: dict[str, type[ModelConfig]] = {name: a.schema for name, a in REGISTRY.items()}
globals().update({a.schema.__name__: a.schema for a in REGISTRY.values()})  # models.ViTConfig, ...: for importers


# ------------------------------------------------------------------------------------------- models
def create(arch: str | ModelConfig, input_shape, num_classes: int, *, rngs, **kwargs):
    """``arch``'s ``Model``: ``arch`` a name (keys not given take the schema's defaults) or a model config
    (its keys; ``kwargs`` override them, e.g. ``dtype``)."""
    schema = arch if isinstance(arch, ModelConfig) else architecture(arch).schema()
    model = architecture(schema.arch).network().Model  # (JAX: only when a model is built)
    return model(tuple(input_shape), num_classes, rngs=rngs, **{**schema.kwargs(), **kwargs})


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
