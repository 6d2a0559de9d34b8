"""The config schema (dataclasses), its registration with Hydra, and validation.

Hydra composes YAML presets from ``conf/`` on top of these dataclasses, so every override is
type-checked against them. ``to_run_config`` converts the composed config once into these
dataclasses, validates it and freezes it: nothing downstream sees OmegaConf.

The model schemas are the model registry's (``vision_train.models``): this module adds none of its own.
This module never imports JAX (the CLI must set ``XLA_FLAGS`` before JAX starts); Hydra and OmegaConf
when they are installed (the package is usable from Python without them).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from .errors import ConfigError, UserError
from .errors import check_choice as _choice
from .errors import check_positive as _positive
from .host_devices import distributed_setting

# The model schemas are part of the schema (their home is the model registry).
from .models import ARCHITECTURES, MISSING, CNNConfig, MixerConfig, MLPConfig, ModelConfig, ViTConfig  # noqa: F401
from .models import Freezable as _Freezable

try:  # the command lines compose configs with Hydra; from Python the package works without it
    from hydra.core.config_store import ConfigStore
    from omegaconf import DictConfig, OmegaConf
except ImportError:  # pragma: no cover
    ConfigStore = DictConfig = OmegaConf = None


def _freeze(obj):
    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if isinstance(value, list):
                object.__setattr__(obj, f.name, tuple(_freeze(v) for v in value))
            else:
                _freeze(value)
        object.__setattr__(obj, "_frozen", True)
    return obj


_UNSAFE = re.compile(r"[^A-Za-z0-9._,=+-]")


def override_items(override_dirname: str) -> list[str]:
    """Hydra's ``override_dirname`` (``key=value`` items joined by ``,``) split into its items: a comma
    inside brackets or quotes, or after a backslash, belongs to its value (``model.features=[32,64]``)."""
    items, start, depth, quote, i = [], 0, 0, None, 0
    while i < len(override_dirname):
        c = override_dirname[i]
        if c == "\\":
            i += 1
        elif quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c in "[{(":
            depth += 1
        elif c in "]})":
            depth = max(depth - 1, 0)
        elif c == "," and not depth:
            items.append(override_dirname[start:i])
            start = i + 1
        i += 1
    items.append(override_dirname[start:])
    return [item for item in items if item]


def override_key(item: str) -> str:
    """``+optimizer.lr=0.1`` -> ``optimizer.lr``; ``model@x=cnn`` -> ``model`` (as Hydra's ``key_or_group``)."""
    return item.split("=", 1)[0].lstrip("+~").split("@", 1)[0]


def job_dir_name(override_dirname: str, swept: Any = None, sweep_dir: Any = None, max_len: int = 150) -> str:
    """A sweep job's directory name: its overrides (Hydra's ``override_dirname``, sorted by key), those of
    the ``swept`` keys first (the keys whose values differ between the sweep's jobs, e.g. ``model`` and
    ``optimizer.lr`` of ``-m model=cnn,mlp optimizer.lr=1e-3,3e-4 data=digits``, as
    ``sweep.swept_keys`` finds them): ``model=cnn,optimizer.lr=0.001,data=digits``. Made safe for every
    file system and for checkpoint paths (Orbax's TensorStore cannot restore from a path holding ``[`` or
    ``]``): characters other than letters, digits and ``._,=+-`` become ``_``; a name over ``max_len``
    characters is cut and ends with a hash of the whole (the same for every order of the overrides).

    The same overrides and swept keys always give the same name, so re-running a sweep finds each job's
    directory. With ``sweep_dir``, a job whose name does not exist there yet takes the directory holding
    the same overrides in another order, if there is one: a grid grown along a key it did not sweep before
    (which moves that key forward), or a sweep named before the swept keys led, finds its earlier jobs."""
    items = override_items(override_dirname)
    if isinstance(swept, str):
        swept = swept.split(",")
    keys = {str(k).strip() for k in (swept or ())}
    items = [x for x in items if override_key(x) in keys] + [x for x in items if override_key(x) not in keys]
    parts = [_UNSAFE.sub("_", x) for x in items]
    name = ",".join(parts) or "default"
    digest = None
    if len(name) > max_len:
        digest = hashlib.sha1(override_dirname.encode()).hexdigest()[:12]
        name = f"{name[:max_len - 13]}-{digest}"
    if sweep_dir and parts:
        name = _earlier_job_dir(name, Path(str(sweep_dir)), parts, digest)
    return name


def _earlier_job_dir(name: str, sweep_dir: Path, parts: list[str], digest: str | None) -> str:
    """``name``, or the directory of ``sweep_dir`` named by the same overrides in another order (the first
    in sorted order, should there be several)."""
    if (sweep_dir / name).is_dir() or not sweep_dir.is_dir():
        return name
    length = len(",".join(parts))

    def same(candidate: str, rest: list[str]) -> bool:  # candidate == ",".join(some order of rest)?
        if len(rest) == 1:
            return candidate == rest[0]
        return any(candidate.startswith(p + ",") and same(candidate[len(p) + 1:], rest[:i] + rest[i + 1:])
                   for i, p in enumerate(rest))

    try:
        found = sorted(p.name for p in sweep_dir.iterdir() if p.is_dir() and (
            p.name.endswith(f"-{digest}") if digest else len(p.name) == length and same(p.name, parts)))
    except OSError:
        return name
    return found[0] if found else name


# conf/config.yaml names sweep jobs' directories ${vt_job_dir:...}. Registered at import, because a launcher's
# worker process (joblib, submitit) imports this module when it receives the job, before it resolves the
# job's directory.
if OmegaConf is not None and not OmegaConf.has_resolver("vt_job_dir"):
    OmegaConf.register_new_resolver("vt_job_dir", job_dir_name)


# ---------------------------------------------------------------------------------------- data
@dataclass
class AugmentConfig(_Freezable):
    flip: bool = False                 # random horizontal flip
    random_resized_crop: bool = False  # a random crop of crop_scale x crop_ratio, resized back
    crop_scale: List[float] = field(default_factory=lambda: [0.8, 1.0])   # fraction of the image area
    crop_ratio: List[float] = field(default_factory=lambda: [0.9, 1.1])   # width / height
    pad_crop: int = 0                  # pixels of zero padding before a random crop back to size; 0 = off
    # After the crop and flip, inside the jitted step (vision_train.data.augment; PIL's arithmetic, timm's semantics):
    policy: str = "none"               # none | randaugment | trivialaugment | 3augment (DeiT III)
    num_ops: int = 2                   # randaugment: ops per image (timm's n)
    magnitude: float = 9.0             # randaugment: timm's m, 0..10 (trivialaugment draws its own)
    magnitude_std: float = 0.0         # randaugment: per-image noise on the magnitude (timm's mstd; DeiT: 0.5)
    color_jitter: float = 0.0          # brightness, contrast and saturation factor range (timm's color_jitter; 0 = off)
    random_erasing: float = 0.0        # probability of erasing a box with per-pixel noise (timm's reprob, mode pixel)
    # Mixup / CutMix on the global batch (timm's Mixup: soft targets, optimizer.label_smoothing folded in; 0 = off)
    mixup_alpha: float = 0.0           # lambda ~ Beta(alpha, alpha)
    cutmix_alpha: float = 0.0          # CutMix: lambda ~ Beta(alpha, alpha), a box of 1 - lambda pasted
    mix_prob: float = 1.0              # probability of mixing a batch at all
    switch_prob: float = 0.5           # both on: probability of CutMix rather than mixup
    mix_mode: str = "batch"            # batch | pair | elem: one draw per batch, per pair of images or per image


@dataclass
class DataConfig(_Freezable):
    # builtin: name picks one of DATASETS | image_folder: your images under root (<root>/train/<class>/*) |
    # hf: a Hugging Face dataset, name = its id (from the cache when offline) or a local path
    kind: str = "builtin"
    name: str = "digits"               # builtin: cifar10 cifar100 mnist fashion_mnist svhn digits toy synthetic
    root: str = "data"                 # where torchvision data sets live (downloaded there if absent); image_folder: the folder
    download: bool = True              # torchvision sets: download into root when absent; false: read only
    val_size: int = 0                  # examples held out of the training split for validation; 0 = none
    test_fraction: float = 0.2         # for data sets without a test split of their own (digits, toy)
    split_seed: int = 42               # train/val(/test) split, as torch.utils.data.random_split
    mean: Optional[List[float]] = None  # per channel, in [0, 1] units; None: the data set's statistics
    std: Optional[List[float]] = None  # per channel, as mean; None: the data set's statistics
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # Repeated augmentation (DeiT's RASampler): each image k times per epoch's order, augmented independently; an
    # epoch stays about len(train) examples (each image shows k times in about a k-th of the epochs' worth). 1 = off
    repeated_aug: int = 1
    # image_folder and hf: your own images (vision_train.data.files)
    # Images are brought to image_size x image_size: your own (image_folder, hf; their presets: 224) by resize +
    # center crop when decoded; built-in sets, when set, by bilinear resampling inside the jitted step (e.g. CIFAR-10
    # at 224 for a pretrained ViT-B/16; the data stay 32x32 in memory). null: the built-in set's own size.
    image_size: Optional[int] = None
    # 3: RGB (grayscale repeated; RGBA, CMYK, palette converted); 1: grayscale (RGB by ITU-R 601-2 luma, as PIL).
    # null: as stored, resolved when validated (built-in sets: 1 for digits, mnist, fashion_mnist, 3 for the others;
    # your own images: 3). The toy set's 2-D points have none.
    channels: Optional[int] = None
    test_size: int = 0                 # a set without a test split: examples held out for test; 0: test_fraction
    image_key: str = "image"           # hf: the column holding the image
    label_key: str = "label"           # hf: the column holding the class (ClassLabel or int)
    train_split: str = "train"         # hf: split names; a missing val/test split is held out of train
    val_split: str = "validation"      # hf: the validation split's name
    test_split: str = "test"           # hf: the test split's name
    max_bad_fraction: float = 0.01     # unreadable images are skipped and listed; past this fraction the run stops
    # How batches reach the step: device-resident (decoded once into a uint8 cache) or streamed with Grain.
    cache: str = "auto"                # auto: cache when the decoded set is under cache_max_gb | true | false
    cache_max_gb: float = 4.0          # the decoded size (uint8) under which data.cache=auto caches
    cache_dir: Optional[str] = None    # where the decoded cache goes; null: beside the data (<root>/.vision_train_cache)
    stream: str = "auto"               # auto: stream when not cached | true | false (refuse to stream)
    workers: int = 2                   # streamed: decode/resize worker processes (0: in the training process)
    prefetch: int = 4                  # streamed: batches decoded ahead of the step, per host
    # synthetic and toy only
    num_examples: int = 1000
    image_shape: List[int] = field(default_factory=lambda: [32, 32, 3])   # synthetic: H, W, C
    num_classes: int = 10                                                 # synthetic


# ----------------------------------------------------------------------------------- optimizer
@dataclass
class OptimizerConfig(_Freezable):
    name: str = "adam"                 # adam | adamw | sgd | lamb (optax.lamb: adamw's update times each array's trust ratio)
    lr: float = 1e-3                   # peak learning rate, for trainer.batch_size as given
    schedule: str = "constant"         # constant | cosine (linear warmup, then cosine decay)
    warmup_epochs: float = 0.0         # linear warmup from 0 to lr over these epochs (fractions too)
    min_lr: float = 0.0                # cosine: the final learning rate
    weight_decay: float = 0.0          # adamw, lamb: decoupled; adam/sgd: L2 added to the gradient
    # false: no weight decay on 1-D parameters (biases, norms' scales, LayerScale), nor LAMB's trust ratio on them
    # (timm's filter_bias_and_bn, DeiT III, RSB; big_vision decays kernels only); true: every parameter, as before
    weight_decay_1d: bool = True
    b1: float = 0.9                    # adam, adamw, lamb: the first moment's decay
    b2: float = 0.999                  # adam, adamw, lamb: the second moment's decay
    eps: float = 1e-8                  # adam, adamw, lamb: added to the second moment's root
    momentum: float = 0.9              # sgd
    nesterov: bool = False             # sgd
    grad_clip_norm: float = 0.0        # clip by global norm; 0 = off
    label_smoothing: float = 0.0       # in [0, 1): mass spread over all classes (val/test loss too)
    # Per-parameter learning-rate multipliers: {regex over parameter paths: multiplier}. Paths are dotted, as
    # blocks.3.attn.qkv.kernel, head.kernel, embed.proj.kernel, pos_embed (the module attribute names; a pattern
    # matching none is refused with some of the model's paths, and the run logs how many arrays each multiplier
    # got). The first pattern matching the whole path wins; unmatched: 1; 0 freezes (no optimizer state). Weight
    # decay follows the multiplier. On the command line (+: the schema's dict is empty; \ escapes [ ] ( ) { }):
    #   '+optimizer.lr_mults={head\..*:1,.*:0}'   (train only the head)
    lr_mults: Dict[str, float] = field(default_factory=dict)
    # Layer-wise lr decay (BEiT, timm): the embedding is layer 0, blocks.<i> layer i + 1, the final norm and
    # head layer L + 1; layer l gets layer_decay ** (L + 1 - l), times its lr_mults. 1 = off
    layer_decay: float = 1.0


# ------------------------------------------------------------------------------------ hardware
@dataclass
class HardwareConfig(_Freezable):
    platform: str = "auto"             # auto | cpu | gpu | tpu
    num_devices: int = 0               # 0: all; on cpu, simulates this many devices
    precision: str = "float32"         # compute dtype: float32 | bfloat16 (params stay float32)
    # Several processes, one run (jax.distributed; docs/launchers.md): auto joins one where SLURM (a job step of more
    # than one task), Open MPI, a TPU pod or JAX_COORDINATOR_ADDRESS says there are several processes:
    distributed: str = "auto"          # auto | true (insist: fail if none is found) | false (never)
    # FSDP (docs/launchers.md): the devices form a data x fsdp mesh (fsdp must divide their count); the batch is split
    # over all of them, and every parameter, its moving average and optimizer-state array of 4096 elements or more
    # is split over fsdp along its largest dimension fsdp divides (big_vision's rule); smaller ones are replicated.
    # 1: plain data parallelism. A checkpoint restores onto any fsdp and device count.
    fsdp: int = 1
    # Overrides of that rule: {regex over parameter paths (blocks.0.attn.qkv.kernel, head.kernel): fsdp (its largest
    # dimension fsdp divides, whatever its size) | replicate | [one entry per dimension: data, fsdp or null]}; the
    # first pattern matching the whole path wins; the optimizer state and moving average follow their parameter.
    #   '+hardware.sharding_rules={pos_embed:replicate,head\..*:[null,fsdp]}'
    sharding_rules: Dict[str, Any] = field(default_factory=dict)
    # JAX's persistent compilation cache, shared by every run and sweep job on this machine: a job whose
    # programs were compiled before (same model, shapes, devices, flags, versions) skips XLA compilation.
    # auto: $JAX_COMPILATION_CACHE_DIR if set, else ~/.cache/vision_train/jax; null: off; or a directory.
    compilation_cache: Optional[str] = "auto"
    # Peak dense TFLOP/s of one device in the compute dtype, for perf/mfu; null: the device kind's from a table
    # (vision_train.perf.PEAK_TFLOPS), or no MFU where the kind is unknown (e.g. CPUs).
    peak_tflops: Optional[float] = None


# ------------------------------------------------------------------------------------- trainer
@dataclass
class TrainerConfig(_Freezable):
    epochs: int = 10                   # passes over the training split: the run's length
    batch_size: int = 128              # global, split across devices
    seed: int = 42                     # init, data order, dropout
    log_every_steps: int = 50          # train metrics (loss, acc, lr, images/s); also at each epoch's end
    eval_every_epochs: int = 1         # 0: only at the end
    eval_every_steps: int = 0          # 0: off; either cadence may be used, or both
    ema_decay: float = 0.0             # 0: off; else an exponential moving average of the parameters, evaluated as val_ema/*
    grad_accum_steps: int = 1          # the global batch is split into this many micro-batches per step (memory / k)
    loss: str = "ce"                   # ce: softmax cross-entropy | bce: binary cross-entropy on (mixed) targets (DeiT III, RSB)
    progress_bar: bool = True          # a bar per epoch on the console (process 0)
    checkpoint_every_epochs: int = 1   # 0: off (still saved at the end and on SIGTERM/SIGINT)
    checkpoint_every_steps: int = 0    # 0: off; either cadence may be used, or both
    keep_checkpoints: int = 3          # the last K, plus the best by best_metric
    # The epoch line's metric that picks the best checkpoint (METRICS): auto is val/acc, or none (null)
    # without a validation split; null: no best, only the last K.
    best_metric: Optional[str] = "auto"
    best_mode: str = "auto"            # auto (the metric's direction) | max | min
    checkpoint: bool = True            # false: no checkpoints at all
    resume: str = "auto"               # auto (latest in this run dir) | never | <run dir or checkpoint dir>
    objective: str = "auto"            # what a run returns to a sweep (Optuna optimises it): auto or OBJECTIVES
    # [first, last] (1-based steps, inclusive): a JAX profiler trace of those steps in <run dir>/profile
    # (Perfetto / TensorBoard), uploaded to W&B as an artifact; null: off
    profile_steps: Optional[List[int]] = None


# -------------------------------------------------------------------------------------- logger
@dataclass
class LoggerConfig(_Freezable):
    mode: str = "offline"              # auto | online | offline | disabled
    project: str = "vision_train"      # the W&B project
    entity: Optional[str] = None       # the W&B team or user; null: the account's default
    name: Optional[str] = None         # the W&B run's name; null: model, data set, overrides
    group: Optional[str] = None        # the W&B group; null: none, a sweep's jobs its directory
    tags: List[str] = field(default_factory=list)  # W&B tags; []: none, a sweep job its overrides
    notes: Optional[str] = None        # the W&B run's notes (description)
    init_timeout_s: float = 30.0       # online: give up on an unreachable server after this, go on offline
    finish_timeout_s: float = 60.0     # online: the most the end of a run waits for uploads (then: `wandb sync`)
    log_checkpoints: bool = False      # upload the best and latest checkpoints as W&B artifacts
    media: bool = True                 # confusion matrices, prediction tables/grids, calibration at each eval
    num_samples: int = 32              # the fixed validation/test images shown in prediction tables


@dataclass
class Config(_Freezable):
    model: Any = MISSING
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


RunConfig = Config  # after validation: frozen


_REGISTERED: list = []  # what register_configs last stored: (group, name, schema) triples


def register_configs() -> None:
    """Register the schema with Hydra's ConfigStore (YAML presets in conf/ extend these). Storing converts every
    dataclass to an OmegaConf node (25 ms): a call that would store what is stored already does nothing, so
    ``vision_train.compose`` may be called in a loop; an architecture registered since is stored."""
    cs = ConfigStore.instance()
    wanted = [(None, "config_schema", Config)]
    wanted += [("schema/model", arch, schema) for arch, schema in ARCHITECTURES.items()]
    wanted += [(f"schema/{group}", "base", schema) for group, schema in (
        ("data", DataConfig), ("optimizer", OptimizerConfig), ("hardware", HardwareConfig),
        ("trainer", TrainerConfig), ("logger", LoggerConfig))]
    if wanted == _REGISTERED and "config_schema.yaml" in cs.repo:  # (a cleared store is filled again)
        return
    for group, name, schema in wanted:
        cs.store(group=group, name=name, node=schema)
    _REGISTERED[:] = wanted


# ---------------------------------------------------------------------------------- validation
@dataclass(frozen=True)
class Metric:
    """A metric a run reports (``METRICS``): which way is better, and where it appears."""
    better: str             # max | min
    needs_val: bool         # only with a validation split (data.val_size > 0)
    epoch_line: bool        # in each epoch's line, which a checkpoint's best is chosen by (trainer.best_metric)
    summary: bool           # in summary.json, which a run returns to a sweep (trainer.objective)
    needs_ema: bool = False  # only with trainer.ema_decay > 0


# The one list of metrics that config keys may name (trainer.best_metric, trainer.objective; a sweep's
# direction and ranking follow it).
METRICS = {
    "train/loss": Metric("min", needs_val=False, epoch_line=True, summary=False),
    "train/acc": Metric("max", needs_val=False, epoch_line=True, summary=False),
    "val/loss": Metric("min", needs_val=True, epoch_line=True, summary=True),
    "val/acc": Metric("max", needs_val=True, epoch_line=True, summary=True),
    "best/val/acc": Metric("max", needs_val=True, epoch_line=False, summary=True),
    "test/loss": Metric("min", needs_val=False, epoch_line=False, summary=True),
    "test/acc": Metric("max", needs_val=False, epoch_line=False, summary=True),
    "test/ece": Metric("min", needs_val=False, epoch_line=False, summary=True),
    "val_ema/loss": Metric("min", needs_val=True, epoch_line=True, summary=True, needs_ema=True),
    "val_ema/acc": Metric("max", needs_val=True, epoch_line=True, summary=True, needs_ema=True),
    "test_ema/loss": Metric("min", needs_val=False, epoch_line=False, summary=True, needs_ema=True),
    "test_ema/acc": Metric("max", needs_val=False, epoch_line=False, summary=True, needs_ema=True),
}
# Summary values a run can return to a sweep, and whether larger is better.
OBJECTIVES = {k: "maximize" if m.better == "max" else "minimize" for k, m in METRICS.items() if m.summary}
BEST_METRICS = tuple(k for k, m in METRICS.items() if m.epoch_line)


# Validation folders of an image folder (``data.files``): their presence is a validation split.
VAL_DIRS = ("val", "valid", "validation")


def has_validation(d) -> bool | None:
    """Whether the data config ``d`` gives a validation split, without opening the data: held out
    (``data.val_size``), an image folder's ``val/`` folder; None where only opening the data tells (a Hugging
    Face set's own validation split)."""
    if d.val_size > 0:
        return True
    if d.kind == "image_folder":
        root = os.path.expanduser(str(d.root))
        return os.path.isdir(os.path.join(root, "train")) and any(os.path.isdir(os.path.join(root, v)) for v in VAL_DIRS)
    if d.kind == "hf":
        return None
    return False


def resolve_objective(objective: str, has_val: bool | None) -> str:
    """``trainer.objective`` resolved: auto is best/val/acc with a validation split, else none (no objective;
    never a test metric unless the user names one); stays auto where the data are still to tell."""
    if objective != "auto" or has_val is None:
        return objective
    return "best/val/acc" if has_val else "none"


def objective_line(cfg: Config) -> str | None:
    """The one line a run says about its objective when it is not the validation metric: none (no validation
    split), or a test metric the user named."""
    objective, name = cfg.trainer.objective, cfg.data.name
    if objective == "none":
        return ("trainer.objective: none; this run reports no objective to a sweep: " +
                (f"{name} has no validation split (test metrics never pick a checkpoint or a job unless named); "
                 f"hold one out with data.val_size=N, or name trainer.objective=test/acc" if not cfg.data.val_size
                 else "as set"))
    if objective in METRICS and objective.startswith("test"):
        return (f"trainer.objective={objective}: sweeps rank jobs (and Optuna optimises) on the test split, as "
                f"asked; its score then overestimates what a new test set would give")
    return None


DATASETS = ("cifar10", "cifar100", "mnist", "fashion_mnist", "svhn", "digits", "toy", "synthetic")
# The built-in image sets' channels as stored (data.channels unset); the toy set has none, synthetic its image_shape's.
STORED_CHANNELS = {"cifar10": 3, "cifar100": 3, "svhn": 3, "mnist": 1, "fashion_mnist": 1, "digits": 1}
DATA_KINDS = ("builtin", "image_folder", "hf")
AUGMENT_POLICIES = ("none", "randaugment", "trivialaugment", "3augment")
MIX_MODES = ("batch", "pair", "elem")
LOSSES = ("ce", "bce")


def _check_finite(obj: Any, prefix: str = "") -> None:
    """Every float in the config (a key's value, a list's items, a dict's values; every group, the model's
    included) is a finite number: ``optimizer.lr=inf`` or ``nan`` would pass the range checks below
    (nan compares false) and stop the run after compiling."""
    for f in dataclasses.fields(obj):
        key, value = f"{prefix}{f.name}", getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _check_finite(value, f"{key}.")
        elif isinstance(value, dict):
            for k, v in value.items():
                if isinstance(v, float) and not math.isfinite(v):
                    raise ConfigError(f"{key}[{k!r}]", v, "must be a finite number")
        elif isinstance(value, (list, tuple)):
            if any(isinstance(v, float) and not math.isfinite(v) for v in value):
                raise ConfigError(key, list(value), "must be a finite number")
        elif isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(key, value, "must be a finite number")


def validate(cfg: Config) -> Config:
    """Checks that need no data and no devices; raises ConfigError naming key, value and fix."""
    m, d, o, h, t, lg = cfg.model, cfg.data, cfg.optimizer, cfg.hardware, cfg.trainer, cfg.logger
    if not isinstance(m, ModelConfig):
        raise ConfigError("model", m, "pick a model preset, e.g. model=vit (see conf/model/)")
    _check_finite(cfg)
    _choice("model.arch", m.arch, tuple(ARCHITECTURES))
    m.check()  # the architecture's own checks (vision_train.models)

    _choice("data.kind", d.kind, DATA_KINDS)
    if d.kind == "builtin":
        _choice("data.name", d.name, DATASETS)
    _positive("data.val_size", d.val_size, allow_zero=True)
    if not 0.0 < d.test_fraction < 1.0:
        raise ConfigError("data.test_fraction", d.test_fraction, "must be in (0, 1)")
    for key, pair in (("data.augment.crop_scale", d.augment.crop_scale), ("data.augment.crop_ratio", d.augment.crop_ratio)):
        if len(pair) != 2 or not 0 < pair[0] <= pair[1] or (key.endswith("scale") and pair[1] > 1):
            raise ConfigError(key, list(pair), "give [low, high] with 0 < low <= high" +
                              (" <= 1" if key.endswith("scale") else ""))
    _positive("data.augment.pad_crop", d.augment.pad_crop, allow_zero=True)
    a = d.augment
    _choice("data.augment.policy", a.policy, AUGMENT_POLICIES)
    _positive("data.augment.num_ops", a.num_ops)
    if not 0.0 <= a.magnitude <= 30.0:
        raise ConfigError("data.augment.magnitude", a.magnitude, "must be in [0, 30] (timm's scale: 10 is each op's full range)")
    for key in ("magnitude_std", "color_jitter", "mixup_alpha", "cutmix_alpha"):
        if getattr(a, key) < 0:
            raise ConfigError(f"data.augment.{key}", getattr(a, key), "must be >= 0 (0 = off)")
    for key in ("random_erasing", "mix_prob", "switch_prob"):
        if not 0.0 <= getattr(a, key) <= 1.0:
            raise ConfigError(f"data.augment.{key}", getattr(a, key), "is a probability: give a value in [0, 1]")
    _choice("data.augment.mix_mode", a.mix_mode, MIX_MODES)
    _positive("data.repeated_aug", d.repeated_aug)
    if (d.mean is None) != (d.std is None):
        raise ConfigError("data.mean" if d.mean is None else "data.std", None, "set both data.mean and data.std, or neither")
    if d.std is not None and any(s <= 0 for s in d.std):
        raise ConfigError("data.std", list(d.std), "every std must be > 0")
    if d.kind == "builtin" and d.name == "synthetic":
        if len(d.image_shape) != 3 or any(s <= 0 for s in d.image_shape):
            raise ConfigError("data.image_shape", list(d.image_shape), "give [height, width, channels], all > 0")
        _positive("data.num_classes", d.num_classes)
    if d.kind == "builtin" and d.name in ("synthetic", "toy") and d.num_examples < 10:
        raise ConfigError("data.num_examples", d.num_examples, "must be >= 10 (train and test splits need examples)")
    # (data.root / an hf data.name left empty by the presets is said when the data are opened: the presets
    # compose without them)
    if d.kind == "image_folder" and not str(d.name).strip() and str(d.root).strip():  # the root folder's own name
        parts = [p for p in str(d.root).replace("\\", "/").split("/") if p not in ("", ".", "~")]
        d.name = parts[-1] if parts else "images"
    if d.image_size is not None:
        _positive("data.image_size", d.image_size)
    elif d.kind != "builtin":
        raise ConfigError("data.image_size", None, f"data={d.kind} needs the size its images are brought to, e.g. "
                          f"data.image_size=224")
    if d.kind == "builtin" and d.name == "toy" and d.image_size is not None:
        raise ConfigError("data.image_size", d.image_size, "the toy set is 2-D points, not images; leave it unset (null)")
    if d.channels is None:  # as stored: the resolved config says what the model sees (and equals earlier runs' 3)
        d.channels = (3 if d.kind != "builtin" else STORED_CHANNELS.get(d.name) if d.name != "synthetic" else
                      d.image_shape[2] if d.image_shape[2] in (1, 3) else None)
    if d.channels is not None:
        _choice("data.channels", d.channels, (1, 3))
        if d.kind == "builtin" and d.name == "toy":
            raise ConfigError("data.channels", d.channels, "the toy set is 2-D points, not images; leave it unset (null)")
        if d.kind == "builtin" and d.name == "synthetic" and len(d.image_shape) == 3 and d.image_shape[2] not in (1, 3):
            raise ConfigError("data.channels", d.channels, f"data.image_shape has {d.image_shape[2]} channels; "
                              f"data.channels converts 1- and 3-channel images: leave it unset (null)")
    _positive("data.test_size", d.test_size, allow_zero=True)
    if not 0.0 <= d.max_bad_fraction <= 1.0:
        raise ConfigError("data.max_bad_fraction", d.max_bad_fraction, "must be in [0, 1] (0: any unreadable image "
                          "stops the run; 0.01: up to 1% are left out)")
    for key in ("cache", "stream"):
        value = getattr(d, key)
        if str(value).strip().lower() not in ("auto", "true", "false"):
            raise ConfigError(f"data.{key}", value, "choose one of auto, true, false")
    cache, stream = str(d.cache).strip().lower(), str(d.stream).strip().lower()
    if cache == stream != "auto":
        raise ConfigError("data.stream", d.stream, f"data.cache={cache} together with data.stream={stream} "
                          f"{'asks for both' if cache == 'true' else 'refuses both'} ways of feeding the data: keep "
                          f"one of them auto")
    _positive("data.cache_max_gb", d.cache_max_gb, allow_zero=True)
    _positive("data.workers", d.workers, allow_zero=True)
    _positive("data.prefetch", d.prefetch)
    for key in ("image_key", "label_key", "train_split"):
        if d.kind == "hf" and not str(getattr(d, key)).strip():
            raise ConfigError(f"data.{key}", getattr(d, key), "must name a column (a split for train_split)")

    _choice("optimizer.name", o.name, ("adam", "adamw", "sgd", "lamb"))
    _choice("optimizer.schedule", o.schedule, ("constant", "cosine"))
    _positive("optimizer.lr", o.lr)
    for name in ("warmup_epochs", "min_lr", "weight_decay", "grad_clip_norm"):
        _positive(f"optimizer.{name}", getattr(o, name), allow_zero=True)
    _positive("optimizer.eps", o.eps)
    for name in ("b1", "b2"):
        if not 0.0 <= getattr(o, name) < 1.0:
            raise ConfigError(f"optimizer.{name}", getattr(o, name), "must be in [0, 1), e.g. b1=0.9 b2=0.999")
    if o.min_lr > o.lr:
        raise ConfigError("optimizer.min_lr", o.min_lr, f"must be <= optimizer.lr={o.lr:g}")
    if o.name == "sgd" and o.nesterov and o.momentum == 0:
        raise ConfigError("optimizer.nesterov", True, "needs optimizer.momentum > 0 (e.g. 0.9)")
    if not 0.0 <= o.label_smoothing < 1.0:
        raise ConfigError("optimizer.label_smoothing", o.label_smoothing, "must be in [0, 1)")
    if not 0.0 <= o.momentum < 1.0:
        raise ConfigError("optimizer.momentum", o.momentum, "must be in [0, 1)")
    for pattern, mult in o.lr_mults.items():
        try:
            re.compile(pattern)
        except re.error as e:
            raise ConfigError("optimizer.lr_mults", pattern, f"is not a regular expression ({e}); on the command "
                              "line escape [ ] ( ) { } with \\, e.g. '+optimizer.lr_mults={blocks\\.\\[01\\]\\..*:0}'"
                              ) from None
        if not (isinstance(mult, (int, float)) and mult >= 0):
            raise ConfigError(f"optimizer.lr_mults[{pattern!r}]", mult, "must be >= 0 (0 freezes, 1 is the base rate)")
    if not 0.0 < o.layer_decay <= 1.0:
        raise ConfigError("optimizer.layer_decay", o.layer_decay, "must be in (0, 1]: 1 is off; 0.65-0.75 are usual")

    _choice("hardware.platform", h.platform, ("auto", "cpu", "gpu", "tpu"))
    _choice("hardware.precision", h.precision, ("float32", "bfloat16"))
    _positive("hardware.num_devices", h.num_devices, allow_zero=True)
    h.distributed = distributed_setting(h.distributed)  # (true/false given as booleans, too)
    _positive("hardware.fsdp", h.fsdp)
    for pattern, spec in h.sharding_rules.items():
        try:
            re.compile(pattern)
        except re.error as e:
            raise ConfigError("hardware.sharding_rules", pattern, f"is not a regular expression ({e}); on the command "
                              "line escape [ ] ( ) { } with \\") from None
        entries = spec if isinstance(spec, (list, tuple)) else None
        if not (spec is None or isinstance(spec, str) or
                (entries is not None and all(e is None or isinstance(e, (str, list, tuple)) for e in entries))):
            raise ConfigError(f"hardware.sharding_rules[{pattern!r}]", spec,
                              "give fsdp, replicate, or one entry per dimension, e.g. [null, fsdp]")
    if h.peak_tflops is not None:
        _positive("hardware.peak_tflops", h.peak_tflops)

    if not -2**31 <= t.seed < 2**31:
        raise ConfigError("trainer.seed", t.seed, "must fit in 32 bits: use a value in [-2147483648, 2147483647]")
    _positive("trainer.epochs", t.epochs)
    _positive("trainer.batch_size", t.batch_size)
    _positive("trainer.log_every_steps", t.log_every_steps)
    _positive("trainer.eval_every_epochs", t.eval_every_epochs, allow_zero=True)
    _positive("trainer.checkpoint_every_epochs", t.checkpoint_every_epochs, allow_zero=True)
    _positive("trainer.eval_every_steps", t.eval_every_steps, allow_zero=True)
    _positive("trainer.grad_accum_steps", t.grad_accum_steps)
    _choice("trainer.loss", t.loss, LOSSES)
    if not 0.0 <= t.ema_decay < 1.0:
        raise ConfigError("trainer.ema_decay", t.ema_decay, "must be in [0, 1): 0 turns the average off; "
                          "0.999 or 0.9999 are usual")
    if t.batch_size % t.grad_accum_steps:
        raise ConfigError("trainer.grad_accum_steps", t.grad_accum_steps,
                          f"must divide trainer.batch_size={t.batch_size} (each micro-batch is batch_size / "
                          f"grad_accum_steps examples)")
    _positive("trainer.checkpoint_every_steps", t.checkpoint_every_steps, allow_zero=True)
    _positive("trainer.keep_checkpoints", t.keep_checkpoints)
    if t.best_metric is not None and t.best_metric not in ("auto", *BEST_METRICS):
        raise ConfigError("trainer.best_metric", t.best_metric, f"choose one of auto, {', '.join(BEST_METRICS)} (the "
                          f"metrics of the epoch line) or null (no best checkpoint)")
    _choice("trainer.best_mode", t.best_mode, ("auto", "max", "min"))
    _choice("trainer.objective", t.objective, ("auto", "none", *OBJECTIVES))
    if t.profile_steps is not None:
        steps = list(t.profile_steps)
        if len(steps) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) for s in steps) \
                or not 1 <= steps[0] <= steps[1]:
            raise ConfigError("trainer.profile_steps", steps, "give [first, last]: two steps (1-based, inclusive) with "
                              "1 <= first <= last, e.g. [10,20]; null turns profiling off")
    if o.warmup_epochs > t.epochs:
        raise ConfigError("optimizer.warmup_epochs", o.warmup_epochs, f"must be <= trainer.epochs={t.epochs}")

    _choice("logger.mode", lg.mode, ("auto", "online", "offline", "disabled"))
    _positive("logger.num_samples", lg.num_samples, allow_zero=True)
    _positive("logger.init_timeout_s", lg.init_timeout_s)
    _positive("logger.finish_timeout_s", lg.finish_timeout_s)
    return cfg


def check_metrics(cfg: Config, has_val: bool | None = None) -> Config:
    """Keys that name a metric must name one this run reports (``METRICS``: a validation metric needs a
    validation split), the best checkpoint's direction must be the metric's; ``trainer.best_metric``,
    ``trainer.best_mode`` and ``trainer.objective`` are resolved in place (auto: the validation metric with a
    validation split, else none). ``has_val``: whether the data have a validation split; None: as far as the
    config tells (``has_validation``); where only the data can tell (a Hugging Face set), auto stays auto and
    the run resolves it once the data are open (``with_data``).
    A run's own check, before it starts: not applied to a config read back from a checkpoint (``from_dict``),
    which evaluation may combine with other data."""
    d, t = cfg.data, cfg.trainer
    if has_val is None:
        has_val = has_validation(d)
    no_val = f"{d.name} has no validation split; "
    hold_out = ", or hold out examples for validation with data.val_size"

    for key, name in (("trainer.best_metric", t.best_metric), ("trainer.objective", t.objective)):
        if name in METRICS and METRICS[name].needs_ema and not t.ema_decay:
            raise ConfigError(key, name, "needs the parameters' moving average: set trainer.ema_decay (e.g. 0.999)")
    metric = t.best_metric
    if metric == "auto":
        metric = "auto" if has_val is None else "val/acc" if has_val else None
    elif metric is not None and METRICS[metric].needs_val and has_val is False:
        usable = [k for k in BEST_METRICS if not METRICS[k].needs_val]
        raise ConfigError("trainer.best_metric", metric, f"{no_val}use trainer.best_metric={', '.join(usable)} or null "
                          f"(no best checkpoint, only the last trainer.keep_checkpoints){hold_out}")
    mode = t.best_mode
    if metric not in (None, "auto"):
        better = METRICS[metric].better
        if mode not in ("auto", better):
            raise ConfigError("trainer.best_mode", mode, f"trainer.best_metric={metric} is better when "
                              f"{'larger' if better == 'max' else 'smaller'}; set trainer.best_mode={better} "
                              f"(or auto)")
        mode = better
    t.best_metric, t.best_mode = metric, mode

    if t.objective in METRICS and METRICS[t.objective].needs_val and has_val is False:
        usable = [k for k in OBJECTIVES if not METRICS[k].needs_val]
        raise ConfigError("trainer.objective", t.objective, f"{no_val}use trainer.objective={', '.join(usable)} "
                          f"(or auto, or none){hold_out}")
    t.objective = resolve_objective(t.objective, has_val)
    return cfg


def with_data(cfg: Config, has_val: bool) -> Config:
    """``cfg`` with what only the opened data could tell resolved (``check_metrics`` with ``has_val``): the
    same config when nothing was left to resolve."""
    if cfg.trainer.objective != "auto" and cfg.trainer.best_metric != "auto":
        return cfg
    thawed = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer))  # (copies: the given one stays)
    return _freeze(check_metrics(thawed, has_val))


def to_run_config(cfg: Any) -> Config:
    """OmegaConf (from Hydra) or a Config -> validated, frozen Config. The only place OmegaConf is read.
    Keys the schema does not have (``+trainer.epochz=3``) are refused, naming the keys of that group."""
    if not isinstance(cfg, Config):
        check_keys(cfg)
        cfg = OmegaConf.to_object(cfg)
    return _freeze(check_metrics(validate(cfg)))


# ------------------------------------------------------------------------------------ unknown keys
class UnknownKey(ConfigError):
    """A key the schema does not have (a typo, or ``+key`` adding one): names the valid keys of its group."""

    def __init__(self, full_key: str, schema: type, value: Any = MISSING):
        parent, _, leaf = full_key.rpartition(".")
        valid = [f.name for f in dataclasses.fields(schema)]
        close = difflib.get_close_matches(leaf, valid, n=1)
        group = parent or "the config"
        if parent == "model" and "arch" in valid:
            group = f"model (model.arch={getattr(schema, 'arch', '?')})"
        fix = f"no such key (Key {leaf!r} not in {schema.__name__!r}); "
        if close:
            fix += f"did you mean {parent + '.' if parent else ''}{close[0]}? "
        fix += f"{'T' if close else 't'}he keys of {group}: {', '.join(valid)}"
        self.key, self.value, self.fix, self.valid = full_key, value, fix, valid
        UserError.__init__(self, f"{full_key}: {fix}")


def schema_at(path: str, arch: str | None = None) -> type | None:
    """The dataclass of the config group at ``path`` ("" the top, "trainer", "data.augment", "model": the
    schema of ``arch``), or None where the path leads to no group."""
    schema: Any = Config
    for part in [p for p in path.split(".") if p]:
        if schema is Config and part == "model":
            schema = ARCHITECTURES.get(arch or "", ModelConfig)
            continue
        hints = typing.get_type_hints(schema)
        schema = hints.get(part)
        if not (isinstance(schema, type) and dataclasses.is_dataclass(schema)):
            return None
    return schema


def check_keys(cfg: Any) -> None:
    """Every key of a composed config (OmegaConf) must be one of the schema's: Hydra type-checks an
    override, but an added one (``+trainer.epochz=3``) is kept and would be ignored."""
    def walk(node, schema, path):
        names = {f.name for f in dataclasses.fields(schema)}
        for key in node.keys():
            full = f"{path}{key}"
            if key not in names:
                if schema is Config and key == "hydra":  # (a sweep callback's config carries Hydra's own)
                    continue
                raise UnknownKey(full, schema)
            child = node._get_node(key)
            if not isinstance(child, DictConfig) or child._is_missing() or child._is_none():
                continue
            if schema is Config and key == "model":
                arch = child.get("arch")
                sub = ARCHITECTURES.get(arch) if isinstance(arch, str) else None
            else:
                sub = schema_at(full)
            if sub is not None:
                walk(child, sub, f"{full}.")

    walk(cfg, Config, "")


def to_dict(cfg: Config) -> dict:
    """Plain nested dict of built-in types (for config.yaml, metadata files, W&B config)."""

    def plain(v):
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(dataclasses.asdict(cfg))


def from_dict(d: dict) -> Config:
    """Inverse of ``to_dict`` (e.g. the config stored in a checkpoint): validated and frozen."""
    def build(cls, values):
        values = dict(values or {})
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name not in values:
                continue
            v = values[f.name]
            if dataclasses.is_dataclass(f.default_factory() if f.default_factory is not dataclasses.MISSING else None):
                v = build(type(f.default_factory()), v)
            kwargs[f.name] = v
        return cls(**kwargs)

    model = d.get("model", {})
    schema = ARCHITECTURES.get(model.get("arch"))
    if schema is None:
        raise ConfigError("model.arch", model.get("arch"), f"choose one of {', '.join(ARCHITECTURES)}")
    data = dict(d.get("data") or {})
    shape = list(data.get("image_shape") or [3])
    if data.get("channels") == 3 and data.get("kind", "builtin") == "builtin" and (
            data.get("name") == "toy" or (data.get("name") == "synthetic" and shape[-1] not in (1, 3))):
        data["channels"] = None  # (written when data.channels=3 was the default and left built-in sets as stored)
    cfg = Config(model=build(schema, model), data=build(DataConfig, data),
                 optimizer=build(OptimizerConfig, d.get("optimizer")), hardware=build(HardwareConfig, d.get("hardware")),
                 trainer=build(TrainerConfig, d.get("trainer")), logger=build(LoggerConfig, d.get("logger")))
    return _freeze(validate(cfg))
