"""ResNet v1.5 (He et al. 2016; the stride in the 3x3 convolution, as torchvision's and timm's ``resnet18`` ...
``resnet152``): its ``model.*`` keys, the network, its FLOPs and its pretrained weights (timm's and torchvision's
state dicts, which share their names).

A stem (7x7 convolution, stride 2, BatchNorm, ReLU, 3x3 max pooling, stride 2), four stages of basic blocks
(depth 18, 34) or bottleneck blocks (50, 101, 152), global average pooling and a linear head. Padding is
PyTorch's (symmetric, the max pooling's with -inf), so a timm file computes timm's logits on images of any size.
BatchNorm as PyTorch's ``BatchNorm2d`` (momentum 0.1 there, 0.9 in Flax's convention; epsilon 1e-5): training
normalises with the batch's statistics (under data parallelism the global batch's: the mean inside jit is over the
whole sharded batch) and moves the running ones, which are the model's ``nnx.BatchStat`` variables (the train
state's ``other``, saved in checkpoints); evaluation (``train=False``) normalises with the running statistics.
One difference from PyTorch: the running variance moves towards the batch's biased variance (Flax's), where
PyTorch uses the unbiased one (a factor n/(n-1): 1.0002 for 64 images of 8x8 positions).

Initialisation as timm's: convolutions He-normal over fan-out, BatchNorm 1 and 0, the head as PyTorch's
``nn.Linear``, and the last BatchNorm scale of each residual branch 0 (``model.zero_init_last``, timm's
``zero_init_last=True``). ``model.stochastic_depth`` is timm's ``drop_path_rate``: block i of N drops its branch
for an example with probability rate * i / (N - 1).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional

from ..errors import ConfigError, check_choice
from . import Architecture, ModelConfig, WeightFormat, Weights

# depth -> (bottleneck blocks?, blocks per stage), as timm's and torchvision's resnet<depth>
DEPTHS = {18: (False, (2, 2, 2, 2)), 34: (False, (3, 4, 6, 3)), 50: (True, (3, 4, 6, 3)),
          101: (True, (3, 4, 23, 3)), 152: (True, (3, 8, 36, 3))}
WIDTHS = (64, 128, 256, 512)  # each stage's width (a bottleneck block's output is 4x it)
STEM = 64


# ------------------------------------------------------------------------------------------- schema
@dataclass
class ResNetConfig(ModelConfig):
    arch: str = "resnet"
    depth: int = 50                  # 18 | 34 (basic blocks) | 50 | 101 | 152 (bottleneck blocks)
    stochastic_depth: float = 0.0    # drop-path rate of the last block (timm's drop_path_rate); linear from 0
    zero_init_last: bool = True      # each residual branch's last BatchNorm scale starts at 0 (timm's default)

    def check(self) -> None:
        super().check()
        check_choice("model.depth", self.depth, tuple(DEPTHS))
        if not 0.0 <= self.stochastic_depth < 1.0:
            raise ConfigError("model.stochastic_depth", self.stochastic_depth, "must be in [0, 1)")


def stages(depth: int) -> tuple[bool, tuple[int, ...]]:
    if depth not in DEPTHS:
        raise ValueError(f"ResNet depth {depth} is not one of {tuple(DEPTHS)} (model.depth)")
    return DEPTHS[depth]


# ------------------------------------------------------------------------------------------ network
@functools.cache
def network() -> SimpleNamespace:
    """The network's classes (``.Model``, ``.BasicBlock``, ``.Bottleneck``), defined on the first call: JAX is
    imported here, when a model is built, never when the schema is read."""
    import math

    import jax
    import jax.numpy as jnp
    from flax import nnx

    he = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")  # kaiming_normal_(fan_out, relu): untruncated

    def conv(cin, cout, k, stride=1, *, dtype, rngs):
        p = (k - 1) // 2  # PyTorch's symmetric padding (not SAME's, which pads a stride-2 layer on one side)
        return nnx.Conv(cin, cout, kernel_size=(k, k), strides=(stride, stride), padding=((p, p), (p, p)),
                        use_bias=False, kernel_init=he, dtype=dtype, rngs=rngs)

    def norm(c, *, zero=False, dtype, rngs):
        # momentum 0.9: PyTorch's 0.1; the variance in two passes (mean first), as exact as PyTorch's
        return nnx.BatchNorm(c, momentum=0.9, epsilon=1e-5, use_fast_variance=False, dtype=dtype,
                             scale_init=nnx.initializers.zeros_init() if zero else nnx.initializers.ones_init(),
                             rngs=rngs)

    class Stem(nnx.Module):
        def __init__(self, cin: int, *, dtype, rngs: nnx.Rngs):
            self.conv = conv(cin, STEM, 7, 2, dtype=dtype, rngs=rngs)
            self.bn = norm(STEM, dtype=dtype, rngs=rngs)

        def __call__(self, x, *, train: bool):
            x = jax.nn.relu(self.bn(self.conv(x), use_running_average=not train))
            return nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))  # (pads with -inf)

    class Downsample(nnx.Module):
        def __init__(self, cin: int, cout: int, stride: int, *, dtype, rngs: nnx.Rngs):
            self.conv = conv(cin, cout, 1, stride, dtype=dtype, rngs=rngs)
            self.bn = norm(cout, dtype=dtype, rngs=rngs)

        def __call__(self, x, *, train: bool):
            return self.bn(self.conv(x), use_running_average=not train)

    class Block(nnx.Module):
        """The residual branch's convolutions are ``conv1``, ``conv2`` (, ``conv3``), each with its BatchNorm."""
        kernels: tuple[int, ...] = ()

        def __init__(self, cin: int, width: int, stride: int, *, drop_path: float, zero_init_last: bool, dtype,
                     rngs: nnx.Rngs):
            cout = width * self.expansion
            chans = [cin, *[width] * (len(self.kernels) - 1), cout]
            n = len(self.kernels)
            strided = self.kernels.index(3)  # the stride in the (first) 3x3 convolution (v1.5)
            for i, k in enumerate(self.kernels):
                setattr(self, f"conv{i + 1}", conv(chans[i], chans[i + 1], k, stride if i == strided else 1,
                                                   dtype=dtype, rngs=rngs))
                setattr(self, f"bn{i + 1}", norm(chans[i + 1], zero=zero_init_last and i == n - 1, dtype=dtype,
                                                 rngs=rngs))
            self.downsample = Downsample(cin, cout, stride, dtype=dtype, rngs=rngs) \
                if stride != 1 or cin != cout else None
            # Stochastic depth: dropout whose mask is shared over positions and channels = drop whole examples
            self.drop_path = nnx.Dropout(drop_path, broadcast_dims=(1, 2, 3), rngs=rngs)

        def __call__(self, x, *, train: bool):
            shortcut = x
            n = len(self.kernels)
            for i in range(1, n + 1):
                x = getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(x), use_running_average=not train)
                if i < n:
                    x = jax.nn.relu(x)
            x = self.drop_path(x, deterministic=not train)
            if self.downsample is not None:
                shortcut = self.downsample(shortcut, train=train)
            return jax.nn.relu(x + shortcut)

    class BasicBlock(Block):
        kernels, expansion = (3, 3), 1

    class Bottleneck(Block):
        kernels, expansion = (1, 3, 1), 4

    class Model(nnx.Module):
        def __init__(self, input_shape: tuple[int, int, int], num_classes: int, *, depth: int,
                     stochastic_depth: float = 0.0, zero_init_last: bool = True, dtype=jnp.float32,
                     rngs: nnx.Rngs):
            bottleneck, layers = stages(depth)
            block = Bottleneck if bottleneck else BasicBlock
            self.stem = Stem(input_shape[-1], dtype=dtype, rngs=rngs)
            total, blocks, cin = sum(layers), [], STEM
            for s, (n, width) in enumerate(zip(layers, WIDTHS)):
                for j in range(n):
                    i = len(blocks)
                    blocks.append(block(cin, width, 2 if s > 0 and j == 0 else 1,
                                        drop_path=stochastic_depth * i / max(total - 1, 1),
                                        zero_init_last=zero_init_last, dtype=dtype, rngs=rngs))
                    cin = width * block.expansion
            self.blocks = nnx.List(blocks)
            bound = 1 / math.sqrt(cin)  # PyTorch's nn.Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for both
            self.head = nnx.Linear(cin, num_classes, dtype=dtype, rngs=rngs,
                                   kernel_init=nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
                                   bias_init=lambda key, shape, dt=jnp.float32:
                                   jax.random.uniform(key, shape, dt, -bound, bound))
            self.dtype = dtype

        def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
            x = self.stem(x.astype(self.dtype), train=train)
            for b in self.blocks:
                x = b(x, train=train)
            return self.head(jnp.mean(x, axis=(1, 2)))

    return SimpleNamespace(Model=Model, BasicBlock=BasicBlock, Bottleneck=Bottleneck)


# -------------------------------------------------------------------------------------------- FLOPs
def _out(n: int, k: int, stride: int, pad: int) -> int:
    return (n + 2 * pad - k) // stride + 1


def _taps(n: int, k: int, stride: int, pad: int) -> int:
    """Kernel positions that land on the input, summed over one dimension's outputs (zero padding excluded)."""
    return sum(min(i * stride - pad + k, n) - max(i * stride - pad, 0) for i in range(_out(n, k, stride, pad)))


def forward_flops(m: ResNetConfig, input_shape, num_classes: int, dtype=None) -> float:
    """One example's forward (vision_train.perf's rules): every convolution's taps that land on the image (not
    its zero padding) and the head; BatchNorm, ReLU, pooling and the residual adds are left out. ResNet-50 on
    224x224 images is 7.90 GFLOP (3.95 G multiply-adds; the 4.1 GMACs usually quoted count the padding's taps)."""
    h, w, c = input_shape
    bottleneck, layers = stages(m.depth)
    expansion, kernels = (4, (1, 3, 1)) if bottleneck else (1, (3, 3))
    total = 0

    def conv(h, w, cin, cout, k, stride):
        nonlocal total
        p = (k - 1) // 2
        total += 2 * _taps(h, k, stride, p) * _taps(w, k, stride, p) * cin * cout
        return _out(h, k, stride, p), _out(w, k, stride, p)

    h, w = conv(h, w, c, STEM, 7, 2)
    h, w = _out(h, 3, 2, 1), _out(w, 3, 2, 1)  # max pooling
    cin = STEM
    for s, (n, width) in enumerate(zip(layers, WIDTHS)):
        for j in range(n):
            stride = 2 if s > 0 and j == 0 else 1
            cout = width * expansion
            chans = [cin, *[width] * (len(kernels) - 1), cout]
            bh, bw = h, w
            for i, k in enumerate(kernels):
                bh, bw = conv(bh, bw, chans[i], chans[i + 1], k, stride if i == kernels.index(3) else 1)
            if stride != 1 or cin != cout:
                conv(h, w, cin, cout, 1, stride)
            h, w, cin = bh, bw, cout
    return total + 2 * cin * num_classes


# ------------------------------------------------------------------------------ pretrained weights
_BLOCK = re.compile(r"layer(\d+)\.(\d+)\.(.+)$")
_STATS = {"running_mean": "mean", "running_var": "var"}


def from_timm(sd: dict) -> dict:
    """timm's (and torchvision's) ``ResNet`` state dict (its PyTorch layouts already made Flax's: BatchNorm's
    ``weight`` is ``scale``) -> our paths: ``conv1``/``bn1`` -> ``stem.conv``/``stem.bn``, ``layer<s>.<j>.*`` ->
    ``blocks.<i>.*`` (numbered through the stages), ``downsample.0``/``.1`` -> ``downsample.conv``/``.bn``,
    ``fc`` -> ``head``; ``running_mean``/``running_var`` -> ``mean``/``var`` (the model's BatchStat);
    ``num_batches_tracked`` (PyTorch's count, unused by momentum BatchNorm) is dropped."""
    order = sorted({(int(m.group(1)), int(m.group(2))) for m in map(_BLOCK.match, sd) if m})
    index = {sj: i for i, sj in enumerate(order)}
    out = {}
    for name, a in sd.items():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "num_batches_tracked":
            continue
        name = name[: -len(leaf)] + _STATS.get(leaf, leaf)
        m = _BLOCK.match(name)
        if m:
            rest = m.group(3).replace("downsample.0.", "downsample.conv.").replace("downsample.1.", "downsample.bn.")
            out[f"blocks.{index[int(m.group(1)), int(m.group(2))]}.{rest}"] = a
        elif name.startswith(("conv1.", "bn1.")):
            out[("stem.conv." if name.startswith("conv1.") else "stem.bn.") + name.split(".", 1)[1]] = a
        elif name.startswith("fc."):
            out["head." + name[3:]] = a
        else:
            out["?" + name] = a  # not part of this model (e.g. a deep stem's conv1.0): the file's extra names
    return out


def file_layers(ours: dict) -> tuple[bool, tuple[int, ...]]:
    """(bottleneck blocks?, blocks per stage) of a file's arrays by our paths: a stage starts at a block with a
    strided shortcut (the first stage's first block of a bottleneck net has an unstrided one: stage 1 either way)."""
    ids = sorted({int(k.split(".")[1]) for k in ours if k.startswith("blocks.")})
    if ids != list(range(len(ids))) or not ids:
        raise ValueError(f"its residual blocks are numbered {ids[:8]}, not 0 to N-1")
    bottleneck = "blocks.0.conv3.kernel" in ours
    starts = [0] + [i for i in ids[1:] if f"blocks.{i}.downsample.conv.kernel" in ours]
    return bottleneck, tuple(b - a for a, b in zip(starts, [*starts[1:], len(ids)]))


class ResNetWeights(Weights):
    """timm's ``ResNet`` (``resnet18`` ... ``resnet152``; torchvision's ``resnet*`` have the same names): PyTorch
    names and layouts, ``conv1.weight`` OIHW, ``layer1.0.bn1.running_mean``, ``fc.weight`` (K, D). The running
    statistics go into the model's BatchStat (``Pretrained.stats``), the rest into its parameters."""
    formats = (WeightFormat("timm ResNet", "layer1.0.conv1.weight", from_timm, pytorch=True),)
    input_kernel = "stem.conv.kernel"
    stats = True
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's (timm's and torchvision's ResNets)

    def file_keys(self, ours: dict) -> dict:
        bottleneck, layers = file_layers(ours)
        return {"depth": (3 if bottleneck else 2) * sum(layers) + 2}

    def check(self, ours: dict, keys: dict, cfg: ResNetConfig, source: str) -> tuple[dict, Optional[str]]:
        bottleneck, layers = file_layers(ours)
        if DEPTHS.get(keys["depth"]) != (bottleneck, layers):
            offered = ", ".join(f"{d} ({'bottleneck' if b else 'basic'} {list(n)})" for d, (b, n) in DEPTHS.items())
            raise ConfigError("model.init_from", source, f"the file is a ResNet of {list(layers)} "
                              f"{'bottleneck' if bottleneck else 'basic'} blocks per stage, which no model.depth "
                              f"builds (it builds {offered})")
        return ours, None

    def fit(self, ours: dict, cfg: ResNetConfig, input_shape, source: str) -> str:
        return "not part of a ResNet"  # (any image size: convolutions and global pooling)


ARCHITECTURE = Architecture(schema=ResNetConfig, network=network, forward_flops=forward_flops,
                            weights=ResNetWeights())
