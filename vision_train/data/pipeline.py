"""The input pipeline as pure JAX functions, run inside the jitted steps.

The whole data set lives on the device (uint8); a step receives the epoch's permutation and its own
index, gathers its batch, augments and normalises it. The example order is a pure function of
(seed, epoch), so there is no iterator state to lose and resume is exact.

Augmentation is one separable bilinear resampling per example: two 2-tap gathers along rows, then
two along columns. Random-resized-crop, horizontal flip and pad-and-crop are all choices of the
sampling grid, so together they cost what any one of them costs (a flip alone takes a cheaper path).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..rng import stream
from . import augment as augment_ops


@dataclass(frozen=True)
class Augment:
    """A training batch's augmentation (static: part of the compiled step). The crop and flip are one resampling
    (``augment``); ``policy`` (``data.augment.Policy``: RandAugment, TrivialAugment, 3-Augment and/or colour
    jitter, on 0..255 pixel values) follows it, then normalisation, then random erasing (``erasing``: timm's
    probability, per-pixel noise): ``train_images`` does all of it."""
    flip: bool = False
    random_resized_crop: bool = False
    crop_scale: tuple[float, float] = (0.8, 1.0)
    crop_ratio: tuple[float, float] = (0.9, 1.1)
    pad_crop: int = 0
    policy: Any = None
    erasing: float = 0.0

    @property
    def enabled(self) -> bool:
        return self.geometric or self.policy is not None or self.erasing > 0

    @property
    def geometric(self) -> bool:
        return self.flip or self.random_resized_crop or self.pad_crop > 0


def train_images(images: jax.Array, key: jax.Array, aug: Augment, normalize, size: tuple[int, int] | None = None):
    """A training batch as the model sees it: cropped and flipped (``augment``, with ``key`` itself, so runs
    without the later stages keep their numbers), the policy's ops (``fold_in(key, 1)``), ``normalize``d, and
    randomly erased (``fold_in(key, 2)``)."""
    x = augment(images, key, aug, size)
    if aug.policy is not None:
        x = aug.policy(x, jax.random.fold_in(key, 1))
    x = normalize(x)
    if aug.erasing > 0:
        x = augment_ops.random_erasing(x, jax.random.fold_in(key, 2), aug.erasing, mode="pixel")
    return x


def epoch_permutation(seed: int, epoch, n: int) -> jax.Array:
    """The training order of epoch ``epoch``: a pure function of (seed, epoch)."""
    key = jax.random.fold_in(stream(seed, "data_order"), epoch)
    return jax.random.permutation(key, n).astype(jnp.int32)


def eval_batches(n: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (num_batches, batch_size) covering 0..n-1 exactly once, and a mask for the padding."""
    nb = max(1, math.ceil(n / batch_size))
    idx = np.arange(nb * batch_size, dtype=np.int32)
    mask = idx < n
    return np.where(mask, idx, 0).reshape(nb, batch_size), mask.reshape(nb, batch_size)


def _resample(x: jax.Array, src: jax.Array, axis: int) -> jax.Array:
    """Linear interpolation of (B, H, W, C) ``x`` along ``axis`` (1 or 2) at source coordinates ``src``
    (B, out); zero outside the image. Two gathers and a weighted sum: O(B*H*W*C), not a dense matmul."""
    size = x.shape[axis]
    i0 = jnp.floor(src)
    frac = src - i0
    i0 = i0.astype(jnp.int32)
    b = jnp.arange(x.shape[0])[:, None]
    out = 0.0
    for i, w in ((i0, 1.0 - frac), (i0 + 1, frac)):
        w = jnp.where((i >= 0) & (i < size), w, 0.0)
        i = jnp.clip(i, 0, size - 1)
        if axis == 1:
            out = out + x[b, i] * w[:, :, None, None]
        else:
            out = out + x[b, :, i].transpose(0, 2, 1, 3) * w[:, None, :, None]
    return out


def resize(images: jax.Array, size: tuple[int, int] | None) -> jax.Array:
    """A (B, H, W, C) batch brought to ``size`` (H', W') by bilinear resampling (antialiased when shrinking);
    float32 in the input's units. ``None`` or the same size: unchanged (as float32)."""
    x = images.astype(jnp.float32)
    if size is None or tuple(size) == x.shape[1:3]:
        return x
    return jax.image.resize(x, (x.shape[0], *size, x.shape[3]), method="bilinear", antialias=True)


def augment(images: jax.Array, key: jax.Array, aug: Augment, size: tuple[int, int] | None = None) -> jax.Array:
    """Random augmentation of a (B, H, W, C) batch, sampled at ``size`` (H', W'; default the input's: the
    crop is resampled to it, e.g. CIFAR-10's 32x32 at 224x224 for a pretrained model); float32 in the input's
    units."""
    x = images.astype(jnp.float32)
    b, h, w, _ = x.shape
    out_h, out_w = size or (h, w)
    if not aug.geometric:
        return resize(x, size)
    if aug.flip and not (aug.random_resized_crop or aug.pad_crop) and (out_h, out_w) == (h, w):
        flip = jax.random.bernoulli(key, 0.5, (b, 1, 1, 1))
        return jnp.where(flip, x[:, :, ::-1], x)
    k_area, k_ratio, k_y, k_x, k_flip, k_shift = jax.random.split(key, 6)
    if aug.random_resized_crop:
        # Like torchvision's RandomResizedCrop: area fraction and log-aspect uniform; clipped to the image.
        area = jax.random.uniform(k_area, (b,), minval=aug.crop_scale[0], maxval=aug.crop_scale[1]) * h * w
        log_r = jax.random.uniform(k_ratio, (b,), minval=math.log(aug.crop_ratio[0]), maxval=math.log(aug.crop_ratio[1]))
        cw = jnp.clip(jnp.sqrt(area * jnp.exp(log_r)), 1.0, w)
        ch = jnp.clip(jnp.sqrt(area / jnp.exp(log_r)), 1.0, h)
        y0 = jax.random.uniform(k_y, (b,)) * (h - ch)
        x0 = jax.random.uniform(k_x, (b,)) * (w - cw)
    else:
        ch, cw = jnp.full((b,), float(h)), jnp.full((b,), float(w))
        y0 = x0 = jnp.zeros((b,))
    oy = jnp.arange(out_h, dtype=jnp.float32)[None]
    ox = jnp.arange(out_w, dtype=jnp.float32)[None]
    if aug.flip:
        flip = jax.random.bernoulli(k_flip, 0.5, (b, 1))
        ox = jnp.where(flip, out_w - 1 - ox, ox)
    sy = jnp.clip(y0[:, None] + (oy + 0.5) * ch[:, None] / out_h - 0.5, 0, h - 1)
    sx = jnp.clip(x0[:, None] + (ox + 0.5) * cw[:, None] / out_w - 0.5, 0, w - 1)
    if aug.pad_crop:
        # Zero-pad by p and crop back at a random offset == shift by an integer in [-p, p], zeros outside.
        shift = jax.random.randint(k_shift, (b, 2, 1), -aug.pad_crop, aug.pad_crop + 1).astype(jnp.float32)
        sy, sx = sy + shift[:, 0], sx + shift[:, 1]
    return _resample(_resample(x, sy, axis=1), sx, axis=2)


def normalize(x: jax.Array, scale: float, mean, std, dtype) -> jax.Array:
    mean = jnp.asarray(mean, jnp.float32)
    std = jnp.asarray(std, jnp.float32)
    return ((x.astype(jnp.float32) * scale - mean) / std).astype(dtype)
