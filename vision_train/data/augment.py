"""RandAugment, TrivialAugment, 3-Augment, colour jitter and random erasing as pure JAX, inside the jitted step.

timm's recipes run these on PIL images in data-loader workers; here they run on the device, on a batch of
uint8-valued images (NHWC, float32 0..255 or uint8), each image with its own PRNG key, so they hold for every
feed and keep resume and 8-devices-equal-1 exact (DESIGN.md, decisions 3 and 12). Each op reproduces PIL's
arithmetic, so the outputs are PIL's pixels, not an approximation of them:

- ``policy(name, num_ops, magnitude, ...)``: a ``Policy``, ``(images[B, H, W, C], key) -> images``, to call
  after crop/flip and before normalisation. ``name``: 'rand' (timm's ``rand_augment_transform``; a timm
  string such as 'rand-m9-n2-mstd0.5-inc1' works too), 'trivial' (torchvision's ``TrivialAugmentWide``:
  timm has no TrivialAugment) or '3a' (timm's AutoAugment '3a', DeiT III's 3-Augment, plus colour jitter).
- ``color_jitter(images, key, brightness, contrast, saturation, hue)``: torchvision's ``ColorJitter`` on
  PIL images (a random order per image; ImageEnhance blends; hue through PIL's 8-bit HSV).
- ``random_erasing(images, key, prob, mode, ...)``: timm's ``RandomErasing``, after normalisation.
- ``apply_op(name, images, magnitude, sign)`` and ``apply_trivial_op(name, images, value)``: one op with
  given arguments (tests, benchmarks).

Inputs are rounded to integers first (PIL's images are uint8: a bilinear crop's fractions would be lost there
too) and every output is integer-valued float32 in 0..255.

Agreement with PIL (tests/test_augment.py: 100 structured 40x48 images per op, magnitudes 0..10, both signs;
mean |JAX - PIL| over all pixels in grey levels, i.e. 1/255 units; the requirement is <= 2 per image):
  bit-exact (0): Invert, Posterize*, Solarize*, SolarizeAdd, Equalize, Brightness*, GaussianBlur, TranslateX/Y
    (every interpolation), every geometric op with nearest (PIL's 16.16 fixed point is reproduced), and
    TrivialAugmentWide's ops but the four below.
  < 0.001: Color*, Contrast*, Sharpness*, Desaturate, Rotate (bilinear, bicubic), ShearX/Y (bicubic), and
    ColorJitter's contrast and saturation. A few pixels are off by one where XLA fuses a blend's multiply-add
    into an FMA (PIL rounds the product first; XLA's CPU and GPU backends both contract, and an optimisation
    barrier does not survive fusion).
  ShearX/Y (bilinear) 0.0007; TranslateXRel/YRel 0.005 / 0.009 (bilinear), 0.0003 / 0.0006 (bicubic): PIL
    computes coordinates in float64 (a shift of 12.6 is 12.5999999999999996) and truncates the sample; where
    the exact sample is an integer, the last bit decides the side, and float32's last bit is another.
  AutoContrast 0.014: PIL's LUT is ``int(ix * scale + offset)`` in float64, one below the exact value for 0.4%
    of (lo, hi, ix) triples; this computes the exact ``(ix - lo) * 255 // (hi - lo)``.
  Hue (colour jitter) 0.004: PIL's 8-bit HSV conversion mixes float and double; float32 here.
Not like PIL by design: Posterize to 0 bits (timm's 'Posterize' at M < 2.5, 'PosterizeIncreasing' at M 10) is
black here, as Pillow < 13 gave; Pillow 13 raises ValueError there, so timm itself fails on those magnitudes.
GaussianBlurRand's radius is drawn here (uniform, as timm's) and cannot be compared draw for draw;
GaussianBlur at the same radius is bit-exact.

Choosing ops per image. A vmapped ``lax.switch`` is a select: every branch runs for every image, so
RandAugment's 15 ops would cost about 15x one op. ``groups=G`` (default 8) instead splits the batch into G
groups (image i in group i % G: strided, so a batch sharded in blocks has every group on every device); each
group draws its own op sequence and a ``lax.map`` over the groups runs ``lax.switch`` on a scalar, so one
branch runs per group and layer (the geometric ops share one branch: one resampler). Magnitude noise, signs,
the per-op probability and the interpolation stay per image. Each image's ops are still uniform draws (timm's
marginal); images of one group share them within a step. ``groups=None`` is the per-image select (timm's joint
distribution, every op computed). benchmarks/augment.py, 2 CPU cores, ms per batch, grouped (G=8) vs select:
  rand-m9-n2   256 x 32x32:  13.8 vs 171      64 x 224x224:  325 vs 2178
  trivial      256 x 32x32:   4.9 vs  99      64 x 224x224:  360 vs 2070
  3a           256 x 32x32:  14.8 vs  10.0    64 x 224x224:  380 vs  644  (three ops, only the blur costly)
(G = 4..64 cost the same within 15% on a CPU; on a GPU each group is a few more kernel launches.) All of a
batch's random draws come from one threefry call (each call is ~0.5 s of compilation on a CPU); the rand
policy compiles in ~4 s on 2 cores.

Cost of 'random' interpolation (timm's default: bilinear or bicubic per call): both samplers run for the
geometric ops and a select keeps one (bicubic is 16 gathers per pixel, bilinear 4). Colour jitter's random
order is a select too: each of its 4 slots computes every enabled adjustment (elementwise; hue is ~20 ops a
pixel: 77 ms against 3.4 ms without hue for 256 x 32x32 on 2 CPU cores).
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

F32 = jnp.float32
LEVEL_DENOM = 10.0  # timm's _LEVEL_DENOM: magnitude M is level M / 10 of each op's range

# timm's RandAugment op lists (timm/data/auto_augment.py), in timm's order.
RAND_TRANSFORMS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd",
                   "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel",
                   "TranslateYRel")
RAND_INCREASING_TRANSFORMS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
                              "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
                              "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel",
                              "TranslateYRel")
RAND_3A = ("SolarizeIncreasing", "Desaturate", "GaussianBlur")
RAND_WEIGHTED_3A = {"SolarizeIncreasing": 6, "Desaturate": 6, "GaussianBlur": 6, "Rotate": 3, "ShearX": 2,
                    "ShearY": 2, "PosterizeIncreasing": 1, "AutoContrast": 1, "ColorIncreasing": 1,
                    "SharpnessIncreasing": 1, "ContrastIncreasing": 1, "BrightnessIncreasing": 1, "Equalize": 1,
                    "Invert": 1}
RAND_WEIGHTED_0 = {"Rotate": 3, "ShearX": 2, "ShearY": 2, "TranslateXRel": 1, "TranslateYRel": 1,
                   "ColorIncreasing": .25, "SharpnessIncreasing": 0.25, "AutoContrast": 0.25,
                   "SolarizeIncreasing": .05, "SolarizeAdd": .05, "ContrastIncreasing": .05,
                   "BrightnessIncreasing": .05, "Equalize": .05, "PosterizeIncreasing": 0.05, "Invert": 0.05}
# timm's AutoAugment '3a' (DeiT III's 3-Augment): one of three sub-policies per image, each op with prob 1.
AUTO_3A = (("Solarize", 5.0), ("Desaturate", 10.0), ("GaussianBlurRand", 10.0))
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "random")


@dataclass(frozen=True)
class Hparams:
    """timm's RandAugment ``hparams`` (static). ``fill``: the colour outside a rotated/sheared/translated image
    (timm's ``img_mean``; ``create_transform`` passes round(255 * mean), e.g. (124, 116, 104) for ImageNet's;
    timm's bare default is (128, 128, 128); torchvision's TrivialAugmentWide fills 0). ``interpolation``:
    'nearest', 'bilinear', 'bicubic', or 'random' (bilinear or bicubic per image: timm's default).
    ``translate_const``: pixels at level 1 for TranslateX/Y (timm: 250, or 0.45 x the image size through
    ``create_transform``); ``translate_pct``: fraction of the side at level 1 for TranslateXRel/YRel."""
    fill: tuple[float, ...] = (128.0, 128.0, 128.0)
    interpolation: str = "random"
    translate_const: float = 250.0
    translate_pct: float = 0.45

    def __post_init__(self):
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation={self.interpolation!r}: expected one of {', '.join(INTERPOLATIONS)}")


# ============================================================================ PIL's pixel operations
# Each works on one image (H, W, C) of integer-valued float32 and returns the same; vmap makes it a batch op.

def quantize(images: jax.Array) -> jax.Array:
    """float32 integers in 0..255 (what PIL's uint8 image would hold)."""
    return jnp.clip(jnp.round(images.astype(F32)), 0.0, 255.0)


def _luma(img: jax.Array) -> jax.Array:
    """PIL's ``convert("L")``: (19595 R + 38470 G + 7471 B + 32768) >> 16 (exact in float32: all < 2**24)."""
    c = img.shape[-1]
    if c == 1:
        return img[..., 0]
    if c != 3:
        raise ValueError(f"colour operations take 1 or 3 channels, not {c}")
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    return jnp.floor((r * 19595.0 + g * 38470.0 + b * 7471.0 + 32768.0) / 65536.0)


def _blend(degenerate: jax.Array, img: jax.Array, factor) -> jax.Array:
    """PIL's ``Image.blend`` (ImageEnhance's ``enhance``): in1 + alpha (in2 - in1) in float32, clipped, truncated."""
    v = degenerate + jnp.asarray(factor, F32) * (img - degenerate)
    return jnp.floor(jnp.clip(v, 0.0, 255.0))


def enhance_brightness(img, factor):
    return _blend(jnp.zeros_like(img), img, factor)


def enhance_color(img, factor):
    return _blend(jnp.broadcast_to(_luma(img)[..., None], img.shape), img, factor)


def enhance_contrast(img, factor):
    """Blend with the mean of the luma image, rounded as PIL does: int(mean + 0.5), in exact integers."""
    luma = _luma(img).astype(jnp.int32)
    n = luma.size
    mean = (2 * jnp.sum(luma) + n) // (2 * n)
    return _blend(jnp.full_like(img, mean.astype(F32)), img, factor)


def _smooth(img):
    """PIL's ImageFilter.SMOOTH ([[1,1,1],[1,5,1],[1,1,1]] / 13, rounded; the one-pixel border kept).
    PIL adds 0.5 and truncates a float32 sum; with integer inputs that sum is never within 0.03 of a
    rounding edge, so the exact integer rounding below is PIL's result."""
    h, w, _ = img.shape
    if h < 3 or w < 3:
        return img  # PIL returns a copy when the image is smaller than the kernel
    p = img
    s = (p[:-2, :-2] + p[:-2, 1:-1] + p[:-2, 2:] + p[1:-1, :-2] + 5.0 * p[1:-1, 1:-1] + p[1:-1, 2:]
         + p[2:, :-2] + p[2:, 1:-1] + p[2:, 2:])
    inner = jnp.floor((2.0 * s + 13.0) / 26.0)
    return img.at[1:-1, 1:-1].set(inner)


def enhance_sharpness(img, factor):
    return _blend(_smooth(img), img, factor)


def invert(img):
    return 255.0 - img


def posterize(img, bits):
    """Keep the top ``bits`` bits (0..8; 0 gives black, as Pillow < 13 did)."""
    q = jnp.exp2(8.0 - jnp.clip(jnp.asarray(bits, F32), 0.0, 8.0))
    return jnp.floor(img / q) * q


def solarize(img, threshold):
    return jnp.where(img < threshold, img, 255.0 - img)


def solarize_add(img, add, threshold=128.0):
    return jnp.where(img < threshold, jnp.minimum(255.0, img + add), img)


def auto_contrast(img):
    """Per channel: lo -> 0, hi -> 255 (``ImageOps.autocontrast``); unchanged where hi <= lo."""
    lo = jnp.min(img, axis=(0, 1))
    hi = jnp.max(img, axis=(0, 1))
    span = jnp.maximum(hi - lo, 1.0)
    # (x - lo) * 255 <= 65025 and span <= 255: the float32 quotient floors exactly.
    out = jnp.floor((img - lo) * 255.0 / span)
    return jnp.where(hi > lo, out, img)


def _histograms(img):
    """(C, 256) pixel counts per channel (int32), by scatter-add."""
    c = img.shape[-1]
    v = img.reshape(-1, c).astype(jnp.int32)
    return jnp.zeros((c, 256), jnp.int32).at[jnp.arange(c)[None, :], v].add(1), v


def equalize(img):
    """``ImageOps.equalize`` per channel: step = (n - count of the last used level) // 255 and
    lut[i] = (step // 2 + pixels below i) // step (clipped to 255, as PIL's point() clips)."""
    h, w, c = img.shape
    hist, v = _histograms(img)
    used = hist > 0
    last = 255 - jnp.argmax(used[:, ::-1], axis=1)
    step = (h * w - jnp.take_along_axis(hist, last[:, None], axis=1)[:, 0]) // 255
    below = jnp.cumsum(hist, axis=1) - hist
    lut = jnp.minimum((step[:, None] // 2 + below) // jnp.maximum(step, 1)[:, None], 255)
    keep = (jnp.sum(used, axis=1) <= 1) | (step == 0)
    lut = jnp.where(keep[:, None], jnp.arange(256, dtype=jnp.int32)[None, :], lut)
    out = jnp.take_along_axis(lut, v.T, axis=1).T
    return out.reshape(h, w, c).astype(F32)


# ----------------------------------------------------------------------------------------- Gaussian blur
def _box_radius(radius):
    """PIL's ``_gaussian_blur_radius`` for 3 passes (an extended box whose 3-fold variance is radius**2)."""
    sigma2 = _div(radius * radius, 3.0)
    big_l = jnp.sqrt(12.0 * sigma2 + 1.0)
    l = jnp.floor((big_l - 1.0) / 2.0)
    a = (2.0 * l + 1.0) * (l * (l + 1.0) - 3.0 * sigma2)
    a = _div(a, 6.0 * (sigma2 - (l + 1.0) * (l + 1.0)))
    return l + a


def _max_box_taps(max_radius: float) -> int:
    sigma2 = max_radius * max_radius / 3.0
    return int(math.floor((math.sqrt(12.0 * sigma2 + 1.0) - 1.0) / 2.0)) + 1


def gaussian_blur(img, radius, max_radius: float = 2.0):
    """PIL's ``ImageFilter.GaussianBlur(radius)``: three passes of an extended box blur along each axis with
    PIL's 8.24 fixed-point weights, rounded to uint8 after every pass, edges clamped. ``radius`` may vary per
    image up to the static ``max_radius``."""
    radius = jnp.asarray(radius, F32)
    box = _box_radius(radius)
    r = jnp.floor(box).astype(jnp.uint32)
    ww = ((2.0 ** 24) / (box * 2.0 + 1.0)).astype(jnp.uint32)
    fw = (jnp.uint32(1 << 24) - (r * 2 + 1) * ww) // 2
    taps = _max_box_taps(max_radius)
    offsets = range(-taps, taps + 1)
    weights = [jnp.where(abs(k) <= r, ww, jnp.where(abs(k) == r + 1, fw, jnp.uint32(0))) for k in offsets]

    def one_pass(x, axis):
        n = x.shape[axis]
        pad = [(0, 0)] * x.ndim
        pad[axis] = (taps, taps)
        xp = jnp.pad(x, pad, mode="edge")
        acc = jnp.zeros(x.shape, jnp.uint32)
        for k, wk in zip(offsets, weights):
            acc = acc + wk * jax.lax.slice_in_dim(xp, taps + k, taps + k + n, axis=axis)
        return (acc + jnp.uint32(1 << 23)) >> 24

    x = img.astype(jnp.uint32)
    for axis in (1, 0):
        # A loop, not three inlined passes: XLA would fuse them and recompute each pass once per tap of the
        # next (10x the run time, 4x the compile time on a CPU).
        x = jax.lax.fori_loop(0, 3, lambda _, v: one_pass(v, axis), x)
    return jnp.where(radius > 0, x.astype(F32), img)


# -------------------------------------------------------------------------------------------- hue (HSV)
def _rgb_to_hsv(img):
    """PIL's RGB -> HSV (8-bit H, S, V), in float32 where PIL mixes float and double."""
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    maxc = jnp.maximum(r, jnp.maximum(g, b))
    minc = jnp.minimum(r, jnp.minimum(g, b))
    grey = maxc == minc
    cr = jnp.where(grey, 1.0, maxc - minc)
    s = cr / jnp.maximum(maxc, 1.0)
    rc, gc, bc = (maxc - r) / cr, (maxc - g) / cr, (maxc - b) / cr
    h = jnp.where(r == maxc, bc - gc, jnp.where(g == maxc, 2.0 + rc - bc, 4.0 + gc - rc))
    h = jnp.mod(_div(h, 6.0) + 1.0, 1.0)
    uh = jnp.where(grey, 0.0, jnp.clip(jnp.trunc(h * 255.0), 0, 255))
    us = jnp.where(grey, 0.0, jnp.clip(jnp.trunc(s * 255.0), 0, 255))
    return uh, us, maxc


def _hsv_to_rgb(h, s, v):
    h6 = _div(h * 6.0, 255.0)
    i = jnp.floor(h6)
    f = h6 - i
    fs = _div(s, 255.0)
    p = jnp.clip(jnp.floor(v * (1.0 - fs) + 0.5), 0, 255)
    q = jnp.clip(jnp.floor(v * (1.0 - fs * f) + 0.5), 0, 255)
    t = jnp.clip(jnp.floor(v * (1.0 - fs * (1.0 - f)) + 0.5), 0, 255)
    i = jnp.mod(i, 6).astype(jnp.int32)
    r = jnp.select([i == 0, i == 1, i == 2, i == 3, i == 4], [v, q, p, p, t], v)
    g = jnp.select([i == 0, i == 1, i == 2, i == 3, i == 4], [t, v, v, q, p], p)
    b = jnp.select([i == 0, i == 1, i == 2, i == 3, i == 4], [p, p, t, v, v], q)
    rgb = jnp.stack([r, g, b], axis=-1)
    return jnp.where((s == 0)[..., None], v[..., None], rgb)


def adjust_hue(img, hue_factor):
    """torchvision's ``adjust_hue`` on a PIL image: H (8-bit) += int(hue_factor * 255), wrapping."""
    if img.shape[-1] == 1:
        return img
    h, s, v = _rgb_to_hsv(img)
    shift = jnp.trunc(jnp.asarray(hue_factor, F32) * 255.0)
    return _hsv_to_rgb(jnp.mod(h + shift, 256.0), s, v)


# ------------------------------------------------------------------------------------------- geometry
def _fill(fill, c):
    f = jnp.asarray(fill, F32).reshape(-1)
    return jnp.broadcast_to(f[:1], (c,)) if f.shape[0] == 1 or c == 1 else f[:c]


def _affine(img, coeffs, hp: Hparams, u_interp=0.0):
    """PIL's ``Image.transform(size, AFFINE, coeffs, resample, fillcolor)``: output pixel (x, y) samples the
    input at (a x' + b y' + c, d x' + e y' + f), x' = x + 0.5, y' = y + 0.5; outside the input: the fill.
    'random' interpolation: bilinear where the uniform ``u_interp`` < 0.5, else bicubic."""
    fill = _fill(hp.fill, img.shape[-1])
    if hp.interpolation == "nearest":
        return _nearest(img, coeffs, fill)
    if hp.interpolation == "bilinear":
        return _interpolated(img, coeffs, fill, cubic=False)
    if hp.interpolation == "bicubic":
        return _interpolated(img, coeffs, fill, cubic=True)
    # timm's default: random.choice((BILINEAR, BICUBIC)) per call. Both run; a select keeps one.
    return jnp.where(u_interp < 0.5, _interpolated(img, coeffs, fill, cubic=False),
                     _interpolated(img, coeffs, fill, cubic=True))


def _nearest(img, coeffs, fill):
    """PIL's nearest affine: 16.16 fixed point for a general map (``affine_fixed``), floats for a pure
    translation (``ImagingScaleAffine``)."""
    a, b, c, d, e, f = coeffs
    h, w, _ = img.shape
    x = jnp.arange(w, dtype=jnp.int32)[None, :]
    y = jnp.arange(h, dtype=jnp.int32)[:, None]

    def fix(v):
        return jnp.floor(v * 65536.0 + 0.5).astype(jnp.int32)

    xi = (fix(c + a * 0.5 + b * 0.5) + x * fix(a) + y * fix(b)) >> 16
    yi = (fix(f + d * 0.5 + e * 0.5) + x * fix(d) + y * fix(e)) >> 16
    scale_only = (b == 0) & (d == 0)
    xs = jnp.floor(c + a * 0.5 + x.astype(F32) * a).astype(jnp.int32)
    ys = jnp.floor(f + e * 0.5 + y.astype(F32) * e).astype(jnp.int32)
    xi = jnp.where(scale_only, jnp.broadcast_to(xs, (h, w)), xi)
    yi = jnp.where(scale_only, jnp.broadcast_to(ys, (h, w)), yi)
    valid = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
    out = img[jnp.clip(yi, 0, h - 1), jnp.clip(xi, 0, w - 1)]
    return jnp.where(valid[..., None], out, fill)


def _interpolated(img, coeffs, fill, *, cubic):
    """PIL's bilinear / bicubic filters (Geometry.c): sample at (X - 0.5, Y - 0.5) with clamped neighbours,
    truncate (bicubic: clip first; PIL's bicubic is the a = -1 cubic)."""
    a, b, c, d, e, f = coeffs
    h, w, _ = img.shape
    xo = jnp.arange(w, dtype=F32)[None, :] + 0.5
    yo = jnp.arange(h, dtype=F32)[:, None] + 0.5
    sx = a * xo + b * yo + c
    sy = d * xo + e * yo + f
    valid = (sx >= 0) & (sx < w) & (sy >= 0) & (sy < h)
    sx, sy = sx - 0.5, sy - 0.5
    x0, y0 = jnp.floor(sx), jnp.floor(sy)
    dx, dy = (sx - x0)[..., None], (sy - y0)[..., None]
    x0, y0 = x0.astype(jnp.int32), y0.astype(jnp.int32)
    flat = img.reshape(h * w, -1)

    def px(j, i):  # rows y0 + j, columns x0 + i, clamped
        return flat[jnp.clip(y0 + j, 0, h - 1) * w + jnp.clip(x0 + i, 0, w - 1)]

    if not cubic:
        def lerp(p, q, t):
            return p + (q - p) * t
        v = lerp(lerp(px(0, 0), px(0, 1), dx), lerp(px(1, 0), px(1, 1), dx), dy)
        v = jnp.floor(v)
    else:
        def cub(v1, v2, v3, v4, t):
            p2, p3, p4 = -v1 + v3, 2.0 * (v1 - v2) + v3 - v4, -v1 + v2 - v3 + v4
            return v2 + t * (p2 + t * (p3 + t * p4))
        rows = [cub(px(j, -1), px(j, 0), px(j, 1), px(j, 2), dx) for j in (-1, 0, 1, 2)]
        v = jnp.floor(jnp.clip(cub(*rows, dy), 0.0, 255.0))
    return jnp.where(valid[..., None], v, fill)


def _rotation(shape, degrees):
    """PIL's ``Image.rotate(degrees)`` coefficients about (w/2, h/2). PIL rounds cos/sin to 15 decimals, so
    right angles are exact there; float32's near-zeros are snapped to 0 for the same reason."""
    h, w = shape[0], shape[1]
    t = -jnp.asarray(degrees, F32) * (math.pi / 180.0)
    cos, sin = jnp.cos(t), jnp.sin(t)
    cos = jnp.where(jnp.abs(cos) < 1e-6, 0.0, cos)
    sin = jnp.where(jnp.abs(sin) < 1e-6, 0.0, sin)
    cx, cy = w / 2.0, h / 2.0
    return (cos, sin, cos * -cx + sin * -cy + cx, -sin, cos, -sin * -cx + cos * -cy + cy)


def _shear_x(f):
    return (1.0, f, 0.0, 0.0, 1.0, 0.0)


def _shear_y(f):
    return (1.0, 0.0, 0.0, f, 1.0, 0.0)


def _translate_x(pixels):  # output x shows input x + pixels (timm's sign)
    return (1.0, 0.0, pixels, 0.0, 1.0, 0.0)


def _translate_y(pixels):
    return (1.0, 0.0, 0.0, 0.0, 1.0, pixels)


def _coeffs(t):
    return tuple(jnp.asarray(v, F32) for v in t)


# ============================================================================ timm's ops: level -> argument
# timm computes each argument in float64 from M / 10; these are the same values rounded once (to float32),
# so that e.g. Brightness at M 5 is a factor of exactly 1.0, as in timm, not 0.99999994.
def _div(a, b):
    """a / b rounded once. XLA rewrites division by a constant (or a broadcast scalar) as multiplication by its
    reciprocal, which is off by an ulp for b = 10 or 100; a divisor that depends on ``a`` stays a division."""
    a = jnp.asarray(a, F32)
    return a / (b + 0.0 * a)


def _m(m):
    return jnp.asarray(m, F32)


def _lv(m):  # level: M / 10
    return _div(_m(m), LEVEL_DENOM)


def _enhance(m, s):  # timm: [0.1, 1.9]
    return _div(_m(m) * 18.0 + 10.0, 100.0)


def _enhance_inc(m, s):  # timm: 1 +- 0.9 level, at least 0.1
    return jnp.maximum(0.1, _div(100.0 + s * _m(m) * 9.0, 100.0))


def _minmax(m, lo, hi):
    return jnp.clip(lo + _div((hi - lo) * _m(m), LEVEL_DENOM), lo, hi)


def _posterize_bits(m):
    return jnp.floor(_div(_m(m) * 4.0, LEVEL_DENOM))


def _solarize_thresh(m):
    return jnp.minimum(256.0, jnp.floor(_div(_m(m) * 256.0, LEVEL_DENOM)))


def _blur_rand(img, m, s, hp, r):
    # timm: radius ~ uniform(0.1, 2.0 * level), level = clip(M / 10, 0, 1) (random.uniform allows hi < lo)
    hi = 2.0 * _minmax(m, 0.0, 1.0)
    return gaussian_blur(img, 0.1 + (hi - 0.1) * r[_U_BLUR])


# Geometric ops: name -> fn(shape (H, W, C), magnitude, sign, hp) -> PIL's affine coefficients. A policy runs
# them through one shared branch (one resampler to compile and run, whichever of them was drawn).
RAND_GEOMETRY: dict[str, Callable] = {
    "Rotate": lambda sh, m, s, hp: _rotation(sh, s * _m(m) * 3.0),  # timm: +-30 degrees at M 10
    "ShearX": lambda sh, m, s, hp: _shear_x(s * _div(_m(m) * 3.0, 100.0)),  # timm: +-0.3 at M 10
    "ShearY": lambda sh, m, s, hp: _shear_y(s * _div(_m(m) * 3.0, 100.0)),
    # M x const / 10 rounded once (whole pixels where timm's shift is whole), not (M / 10) x const: that product's
    # 1e-7 past the pixel reaches the sampling position unrounded wherever the compiler fuses it into a multiply-add.
    "TranslateX": lambda sh, m, s, hp: _translate_x(s * _div(_m(m) * hp.translate_const, LEVEL_DENOM)),
    "TranslateY": lambda sh, m, s, hp: _translate_y(s * _div(_m(m) * hp.translate_const, LEVEL_DENOM)),
    "TranslateXRel": lambda sh, m, s, hp: _translate_x(s * _div(_m(m) * (hp.translate_pct * sh[1]), LEVEL_DENOM)),
    "TranslateYRel": lambda sh, m, s, hp: _translate_y(s * _div(_m(m) * (hp.translate_pct * sh[0]), LEVEL_DENOM)),
}
# Pixel ops: name -> fn(img, magnitude, sign, hp, r) -> img (r: the image's uniform draws, see _draws).
RAND_PIXEL: dict[str, Callable] = {
    "AutoContrast": lambda x, m, s, hp, r: auto_contrast(x),
    "Equalize": lambda x, m, s, hp, r: equalize(x),
    "Invert": lambda x, m, s, hp, r: invert(x),
    "Posterize": lambda x, m, s, hp, r: posterize(x, _posterize_bits(m)),
    "PosterizeIncreasing": lambda x, m, s, hp, r: posterize(x, 4.0 - _posterize_bits(m)),
    "PosterizeOriginal": lambda x, m, s, hp, r: posterize(x, _posterize_bits(m) + 4.0),
    "Solarize": lambda x, m, s, hp, r: solarize(x, _solarize_thresh(m)),
    "SolarizeIncreasing": lambda x, m, s, hp, r: solarize(x, 256.0 - _solarize_thresh(m)),
    "SolarizeAdd": lambda x, m, s, hp, r: solarize_add(x, jnp.minimum(128.0, jnp.floor(_div(_m(m) * 110.0, 10.0)))),
    "Color": lambda x, m, s, hp, r: enhance_color(x, _enhance(m, s)),
    "ColorIncreasing": lambda x, m, s, hp, r: enhance_color(x, _enhance_inc(m, s)),
    "Contrast": lambda x, m, s, hp, r: enhance_contrast(x, _enhance(m, s)),
    "ContrastIncreasing": lambda x, m, s, hp, r: enhance_contrast(x, _enhance_inc(m, s)),
    "Brightness": lambda x, m, s, hp, r: enhance_brightness(x, _enhance(m, s)),
    "BrightnessIncreasing": lambda x, m, s, hp, r: enhance_brightness(x, _enhance_inc(m, s)),
    "Sharpness": lambda x, m, s, hp, r: enhance_sharpness(x, _enhance(m, s)),
    "SharpnessIncreasing": lambda x, m, s, hp, r: enhance_sharpness(x, _enhance_inc(m, s)),
    # timm: factor = 1 - level, level in [0.5, 1]: at M 10 a grey image (DeiT III's grayscale)
    "Desaturate": lambda x, m, s, hp, r: enhance_color(x, jnp.clip(1.0 - _minmax(m, 0.5, 1.0), 0.0, 1.0)),
    "GaussianBlur": lambda x, m, s, hp, r: gaussian_blur(x, _minmax(m, 0.1, 2.0)),
    "GaussianBlurRand": _blur_rand,
}


def _geometric(table, name):
    return lambda x, m, s, hp, r: _affine(x, _coeffs(table[name](x.shape, m, s, hp)), hp, r[_U_INTERP])


# Every timm op name: fn(img, magnitude, sign, hp, r) -> img.
RAND_OPS: dict[str, Callable] = {**RAND_PIXEL, **{n: _geometric(RAND_GEOMETRY, n) for n in RAND_GEOMETRY}}


def apply_op(name: str, images: jax.Array, magnitude, sign=1.0, hparams: Hparams = Hparams(), key=None,
             magnitude_max: float = LEVEL_DENOM) -> jax.Array:
    """timm's ``AugmentOp(name, prob=1.0, magnitude)`` on a batch: ``magnitude`` (clipped to [0, magnitude_max]
    as timm does) and ``sign`` (+1 or -1, the negation timm draws) scalars or one per image. ``key``: for
    'random' interpolation and GaussianBlurRand's radius."""
    fn = RAND_OPS[name]
    x = quantize(images)
    b = x.shape[0]
    m = jnp.clip(jnp.broadcast_to(jnp.asarray(magnitude, F32), (b,)), 0.0, magnitude_max)
    s = jnp.broadcast_to(jnp.asarray(sign, F32), (b,))
    r = _draws(jax.random.key(0) if key is None else key, (b,))
    return jax.vmap(lambda xi, mi, si, ri: fn(xi, mi, si, hparams, ri))(x, m, s, r)


# ============================================================== torchvision's TrivialAugmentWide (PIL path)
TRIVIAL_BINS = 31


def _torch_linspace(start: float, end: float, steps: int) -> np.ndarray:
    """torch.linspace in float32 as its CPU kernel computes it (a float32 step; the first half start + step * i,
    the second half end - step * (steps - 1 - i), each one fused multiply-add), so that int() of a translation
    lands where torchvision's does (15.9999990 -> 15, where 32 * 15 / 30 = 16)."""
    step = np.float64(np.float32((np.float32(end) - np.float32(start)) / np.float32(steps - 1)))
    i = np.arange(steps, dtype=np.float64)
    lo = np.float64(np.float32(start)) + step * i  # exact in float64, then rounded once: an FMA
    hi = np.float64(np.float32(end)) - step * (steps - 1 - i)
    return np.where(i < steps // 2, lo, hi).astype(np.float32)


def _trivial_space(bins: int = TRIVIAL_BINS):
    """torchvision's ``TrivialAugmentWide._augmentation_space``: name -> (values or None, signed)."""
    unit = _torch_linspace(0.0, 0.99, bins)
    return {
        "Identity": (None, False), "ShearX": (unit, True), "ShearY": (unit, True),
        "TranslateX": (_torch_linspace(0.0, 32.0, bins), True), "TranslateY": (_torch_linspace(0.0, 32.0, bins), True),
        "Rotate": (_torch_linspace(0.0, 135.0, bins), True), "Brightness": (unit, True), "Color": (unit, True),
        "Contrast": (unit, True), "Sharpness": (unit, True),
        "Posterize": ((8 - np.round(np.arange(bins) / ((bins - 1) / 6))).astype(np.float32), False),
        "Solarize": (_torch_linspace(255.0, 0.0, bins), False), "AutoContrast": (None, False),
        "Equalize": (None, False),
    }


# torchvision's _apply_op on PIL images, from the signed value v.
TRIVIAL_GEOMETRY: dict[str, Callable] = {  # fn(shape, v) -> coefficients
    "ShearX": lambda sh, v: _shear_x(v),  # a shear angle of atan(v) is PIL coefficient v
    "ShearY": lambda sh, v: _shear_y(v),
    "TranslateX": lambda sh, v: _translate_x(-jnp.trunc(v)),  # int(v) pixels; output x shows input x - v
    "TranslateY": lambda sh, v: _translate_y(-jnp.trunc(v)),
    "Rotate": lambda sh, v: _rotation(sh, v),
}
TRIVIAL_PIXEL: dict[str, Callable] = {  # fn(img, v) -> img
    "Identity": lambda x, v: x,
    "Brightness": lambda x, v: enhance_brightness(x, 1.0 + v),
    "Color": lambda x, v: enhance_color(x, 1.0 + v),
    "Contrast": lambda x, v: enhance_contrast(x, 1.0 + v),
    "Sharpness": lambda x, v: enhance_sharpness(x, 1.0 + v),
    "Posterize": lambda x, v: posterize(x, jnp.trunc(v)),
    "Solarize": lambda x, v: solarize(x, v),
    "AutoContrast": lambda x, v: auto_contrast(x),
    "Equalize": lambda x, v: equalize(x),
}
TRIVIAL_HPARAMS = Hparams(fill=(0.0,), interpolation="nearest")  # torchvision's defaults: fill None -> 0


def apply_trivial_op(name: str, images: jax.Array, value, hparams: Hparams = TRIVIAL_HPARAMS, key=None) -> jax.Array:
    """torchvision's ``_apply_op(img, name, value)`` (TrivialAugmentWide's ops, PIL path) on a batch; ``value``
    the signed magnitude (scalar or one per image)."""
    x = quantize(images)
    v = jnp.broadcast_to(jnp.asarray(value, F32), (x.shape[0],))
    r = _draws(jax.random.key(0) if key is None else key, (x.shape[0],))
    if name in TRIVIAL_GEOMETRY:
        fn = lambda xi, vi, ri: _affine(xi, _coeffs(TRIVIAL_GEOMETRY[name](xi.shape, vi)), hparams, ri[_U_INTERP])
    else:
        fn = lambda xi, vi, ri: TRIVIAL_PIXEL[name](xi, vi)
    return jax.vmap(fn)(x, v, r)


# ============================================================================================ per-image ops
# A policy's ops become branches fn(img, r, sub) -> img. ``r``: the image's random draws for this layer, made
# once outside the branches (a threefry call per branch would cost each ~1 s of compilation on a CPU). All
# geometric ops share one branch; ``sub`` says which of them.
_U_APPLY, _U_MAGNITUDE, _U_SIGN, _U_INTERP, _U_BLUR, _U_BIN, _Z_MAGNITUDE = range(7)


def _draws(key, shape):
    return _as_draws(jax.random.uniform(key, (*shape, 7), F32))


def _as_draws(u):
    """(..., 7) uniforms in [0, 1) -> six uniforms and a standard normal (magnitude noise; as jax.random.normal
    makes one from a uniform). One threefry call for all of a batch's randomness: each call costs ~0.5 s of
    compilation on a CPU."""
    lo = np.nextafter(np.float32(-1.0), np.float32(0.0))
    z = np.sqrt(2.0).astype(np.float32) * jax.lax.erf_inv(jnp.clip(2.0 * u[..., 6:] - 1.0, lo, 1.0))
    return jnp.concatenate([u[..., :6], z], axis=-1)


def _rand_branch(ops, std, mmax, prob, hp, geometric):
    """timm's AugmentOp for ``ops`` [(name, magnitude)] (several only when ``geometric``)."""
    upper = LEVEL_DENOM if mmax is None else float(mmax)
    mags = jnp.asarray([m for _, m in ops], F32)

    def branch(img, r, sub):
        m = mags[sub] if len(ops) > 1 else mags[0]
        if std == math.inf:  # timm: uniform in [0, M]
            m = r[_U_MAGNITUDE] * m
        elif std > 0:  # timm: gauss(M, std)
            m = m + std * r[_Z_MAGNITUDE]
        m = jnp.clip(m, 0.0, upper)
        sign = jnp.where(r[_U_SIGN] < 0.5, -1.0, 1.0)  # timm's _randomly_negate
        if geometric:
            fns = [lambda mm, ss, n=n: _coeffs(RAND_GEOMETRY[n](img.shape, mm, ss, hp)) for n, _ in ops]
            out = _affine(img, jax.lax.switch(sub, fns, m, sign), hp, r[_U_INTERP])
        else:
            out = RAND_PIXEL[ops[0][0]](img, m, sign, hp, r)
        if prob < 1.0:
            out = jnp.where(r[_U_APPLY] < prob, out, img)
        return out
    return branch


def _trivial_branch(names, hp, bins, geometric):
    space = _trivial_space(bins)
    table = jnp.asarray(np.stack([space[n][0] if space[n][0] is not None else np.zeros(bins, np.float32)
                                  for n in names]))
    signed = jnp.asarray([space[n][1] for n in names])

    def branch(img, r, sub):
        v = table[sub, jnp.minimum(jnp.floor(r[_U_BIN] * bins).astype(jnp.int32), bins - 1)]
        v = jnp.where(signed[sub] & (r[_U_SIGN] < 0.5), -v, v)
        if geometric:
            fns = [lambda vv, n=n: _coeffs(TRIVIAL_GEOMETRY[n](img.shape, vv)) for n in names]
            return _affine(img, jax.lax.switch(sub, fns, v), hp, r[_U_INTERP])
        return TRIVIAL_PIXEL[names[0]](img, v)
    return branch


def _routes(names, geometry):
    """Branch groups: each pixel op alone, the geometric ops together. -> (groups of op indices, route table
    (branch, sub) per op)."""
    geo = [i for i, n in enumerate(names) if n in geometry]
    groups = [[i] for i, n in enumerate(names) if n not in geometry] + ([geo] if geo else [])
    route = np.zeros((len(names), 2), np.int32)
    for b, grp in enumerate(groups):
        for sub, i in enumerate(grp):
            route[i] = (b, sub)
    return groups, route


# ============================================================================================== the policy
@dataclass(frozen=True)
class Policy:
    """A configured augmentation (static; build it with ``policy``). ``ops``: (name, magnitude) per choice;
    ``num_ops`` drawn per image (with replacement, or without when ``weights`` are given, as timm);
    ``kind``: 'rand' (timm's AugmentOp per choice; also AutoAugment '3a', whose magnitudes are fixed per op)
    or 'trivial' (torchvision's ops and magnitude bins). ``color_jitter``: (brightness, contrast, saturation,
    hue) after the ops, or None."""
    kind: str
    ops: tuple[tuple[str, float], ...]
    num_ops: int = 2
    magnitude_std: float = 0.0
    magnitude_max: float | None = None
    prob: float = 0.5
    weights: tuple[float, ...] | None = None
    hparams: Hparams = Hparams()
    groups: int | None = 8
    color_jitter: tuple[float, float, float, float] | None = None
    trivial_bins: int = TRIVIAL_BINS

    def branches(self) -> tuple[list[Callable], np.ndarray]:
        """(branches fn(img, r, sub) -> img, route: (branch, sub) per op)."""
        names = [n for n, _ in self.ops]
        if self.kind == "trivial":
            groups, route = _routes(names, TRIVIAL_GEOMETRY)
            return [_trivial_branch([names[i] for i in g], self.hparams, self.trivial_bins,
                                    names[g[0]] in TRIVIAL_GEOMETRY) for g in groups], route
        groups, route = _routes(names, RAND_GEOMETRY)
        return [_rand_branch([self.ops[i] for i in g], self.magnitude_std, self.magnitude_max, self.prob,
                             self.hparams, names[g[0]] in RAND_GEOMETRY) for g in groups], route

    def __call__(self, images: jax.Array, key: jax.Array) -> jax.Array:
        """(B, H, W, C) float32 0..255 or uint8 -> float32 integers 0..255, same shape."""
        x = quantize(images)
        choice, draws, u_jitter = self._draw(x.shape[0], key)
        if self.ops and self.num_ops > 0:
            branches, route = self.branches()
            x = _apply_chosen(x, branches, jnp.asarray(route)[choice], draws, self.groups)
        if self.color_jitter is not None:
            x = _color_jitter(x, u_jitter, *self.color_jitter)
        return x

    def _draw(self, b: int, key):
        """(op choice (groups or b, num_ops), per-image draws (b, num_ops, 7), colour-jitter uniforms (b, 5))."""
        if self.groups is not None and b % self.groups:
            raise ValueError(f"augment groups={self.groups} does not divide the batch of {b} images: choose a "
                             f"divisor of the per-step batch (or groups=None for a per-image choice)")
        n, choosers = len(self.ops), self.groups or b
        sizes = (choosers * (n if self.weights else self.num_ops), b * self.num_ops * 7, b * 5)
        u = jax.random.uniform(key, (sum(sizes),), F32)  # every draw of the batch from one threefry call
        u_choice, u_images, u_jitter = jnp.split(u, np.cumsum(sizes)[:-1])
        choice = _choose_ops(u_choice.reshape(choosers, -1), n, self.num_ops, self.weights)
        return choice, _as_draws(u_images.reshape(b, self.num_ops, 7)), u_jitter.reshape(b, 5)

    def plan(self, batch_size: int, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        """What ``self(images, key)`` draws for a batch of ``batch_size``: (op indices into ``self.ops`` per image
        and layer (B, num_ops); with groups, image i has group i % groups's), (the image's draws (B, num_ops, 7):
        uniforms for apply, magnitude, sign, interpolation, blur radius and magnitude bin, then a normal))."""
        choice, draws, _ = self._draw(batch_size, key)
        return choice[jnp.arange(batch_size) % choice.shape[0]], draws


def _choose_ops(u, n_ops, num_ops, weights):
    """(choosers, num_ops) op indices from uniforms: uniform with replacement (timm's np.random.choice(ops, n)),
    or, with ``weights``, weighted without replacement (Gumbel top-k; u has n_ops columns then)."""
    if weights is None:
        return jnp.minimum(jnp.floor(u * n_ops).astype(jnp.int32), n_ops - 1)
    gumbel = -jnp.log(-jnp.log(jnp.clip(u, 1e-12, 1.0 - 1e-7)))
    scores = jnp.log(jnp.asarray(weights, F32) / sum(weights)) + gumbel
    return jnp.argsort(-scores, axis=-1)[:, :num_ops].astype(jnp.int32)


def _apply_chosen(x, branches, choice, draws, groups):
    """choice: (choosers, num_ops, 2) (branch, sub); draws: (b, num_ops, 7), image i's for layer l."""
    b, num_ops = draws.shape[:2]

    if groups is None:  # per image: a vmapped switch, i.e. every branch for every image and a select
        def per_image(img, r, ops):
            def layer(im, inp):
                br, sub, ri = inp
                return jax.lax.switch(br, branches, im, ri, sub), None
            return jax.lax.scan(layer, img, (ops[:, 0], ops[:, 1], r))[0]
        return jax.vmap(per_image)(x, draws, choice)

    g = groups
    # image i -> group i % g: (b/g, g, ...) then groups first; a batch sharded in contiguous blocks stays local.
    xg = jnp.swapaxes(x.reshape(b // g, g, *x.shape[1:]), 0, 1)
    rg = jnp.swapaxes(draws.reshape(b // g, g, num_ops, -1), 0, 1).swapaxes(1, 2)  # (g, num_ops, b/g, 7)
    vbranches = [jax.vmap(br, in_axes=(0, 0, None)) for br in branches]

    def per_group(args):
        xs, rs, ops = args

        def layer(im, inp):
            br, sub, r = inp
            return jax.lax.switch(br, vbranches, im, r, sub), None  # a scalar index: one branch runs
        return jax.lax.scan(layer, xs, (ops[:, 0], ops[:, 1], rs))[0]
    out = jax.lax.map(per_group, (xg, rg, choice))
    return jnp.swapaxes(out, 0, 1).reshape(x.shape)


def _parse_timm(spec: str) -> dict:
    """timm's ``rand_augment_transform`` string: 'rand-m9-n2-mstd0.5-mmax10-inc1-p0.5-t<set>'."""
    parts = spec.split("-")
    if parts[0] != "rand":
        raise ValueError(f"augment policy {spec!r}: a timm RandAugment string starts with 'rand-'")
    out: dict = {}
    for c in parts[1:]:
        if c.startswith("t"):
            out["transforms"] = c[1:]
            continue
        cs = re.split(r"(\d.*)", c)
        if len(cs) < 2:
            continue
        k, v = cs[:2]
        if k == "mstd":
            out["magnitude_std"] = math.inf if float(v) > 100 else float(v)
        elif k == "mmax":
            out["magnitude_max"] = int(v)
        elif k == "inc":
            out["increasing"] = bool(int(v))
        elif k == "m":
            out["magnitude"] = int(v)
        elif k == "n":
            out["num_ops"] = int(v)
        elif k == "p":
            out["prob"] = float(v)
        else:
            raise ValueError(f"augment policy {spec!r}: unknown section {c!r} (known: m, n, mstd, mmax, inc, p, t)")
    return out


def policy(name: str, num_ops: int | None = None, magnitude: float | None = None, *,
           magnitude_std: float | None = None, magnitude_max: float | None = None, prob: float | None = None,
           increasing: bool | None = None, transforms: str | tuple[str, ...] | None = None,
           fill: tuple[float, ...] | None = None, interpolation: str | None = None,
           translate_const: float = 250.0, translate_pct: float = 0.45, groups: int | None = 8,
           color_jitter: float | tuple[float, ...] | None = None) -> Policy:
    """An augmentation policy: ``policy(...)(images, key) -> images``.

    ``name``:
      'rand' or a timm string ('rand-m9-n2-mstd0.5-inc1'): RandAugment as timm's ``rand_augment_transform``:
        ``num_ops`` (2) ops per image, uniform with replacement from timm's list (``increasing``: the
        '*Increasing' list; ``transforms``: a tuple of op names, or 'weights' / '3a' / '3aw' for timm's sets),
        each applied with probability ``prob`` (0.5) at ``magnitude`` (10 of 10; noise std
        ``magnitude_std``, inf = uniform in [0, M]; clipped to [0, ``magnitude_max`` or 10]). Keyword
        arguments override the string's values.
      'trivial': torchvision's TrivialAugmentWide (one of 14 ops per image, a magnitude bin of 31, a random
        sign; nearest, fill 0). ``num_ops`` > 1 chains ops (TrivialAugment is 1).
      '3a': timm's AutoAugment '3a' = DeiT III's 3-Augment: Solarize(128), grayscale or a Gaussian blur of
        radius ~ U(0.1, 2), one per image, then colour jitter ``color_jitter`` (default 0.3, DeiT III's; timm's
        train script passes its --color-jitter, 0.4; 0 or None turns it off).
    ``fill``: colour outside geometric ops (timm: its hparams' img_mean; pass round(255 * mean) as timm's
    ``create_transform`` does). ``interpolation``: 'random' (timm's default), 'bilinear', 'bicubic', 'nearest'.
    ``groups``: see the module docstring: G groups, or None for a per-image choice (every op computed)."""
    kind = name.split("-")[0]
    opts = _parse_timm(name) if kind == "rand" else {}
    if kind == "rand":
        num_ops = opts.get("num_ops", 2) if num_ops is None else num_ops
        magnitude = opts.get("magnitude", LEVEL_DENOM) if magnitude is None else magnitude
        magnitude_std = opts.get("magnitude_std", 0.0) if magnitude_std is None else magnitude_std
        magnitude_max = opts.get("magnitude_max") if magnitude_max is None else magnitude_max
        prob = opts.get("prob", 0.5) if prob is None else prob
        increasing = opts.get("increasing", False) if increasing is None else increasing
        transforms = opts.get("transforms") if transforms is None else transforms
        weights = None
        if transforms is None or isinstance(transforms, str) and transforms not in ("weights", "3a", "3aw"):
            names = RAND_INCREASING_TRANSFORMS if increasing else RAND_TRANSFORMS
        elif transforms == "3a":
            names = RAND_3A
        elif isinstance(transforms, str):
            table = RAND_WEIGHTED_0 if transforms == "weights" else RAND_WEIGHTED_3A
            names, weights = tuple(table), tuple(float(v) for v in table.values())
        else:
            names = tuple(transforms)
        unknown = [n for n in names if n not in RAND_OPS]
        if unknown:
            raise ValueError(f"augment ops {unknown}: unknown (known: {', '.join(RAND_OPS)})")
        if weights is not None and num_ops > len(names):
            raise ValueError(f"num_ops={num_ops}: weighted choice is without replacement, at most {len(names)}")
        hp = Hparams(fill=tuple(fill or (128.0, 128.0, 128.0)), interpolation=interpolation or "random",
                     translate_const=translate_const, translate_pct=translate_pct)
        jitter = _jitter_tuple(color_jitter)
        return Policy("rand", tuple((n, float(magnitude)) for n in names), num_ops, float(magnitude_std),
                      magnitude_max, float(prob), weights, hp, groups, jitter)
    if name in ("trivial", "trivialaugment", "ta_wide"):
        hp = Hparams(fill=tuple(fill or (0.0,)), interpolation=interpolation or "nearest",
                     translate_const=translate_const, translate_pct=translate_pct)
        return Policy("trivial", tuple((n, 0.0) for n in _trivial_space()), 1 if num_ops is None else num_ops,
                      prob=1.0, hparams=hp, groups=groups, color_jitter=_jitter_tuple(color_jitter))
    if name == "3a":
        hp = Hparams(fill=tuple(fill or (128.0, 128.0, 128.0)), interpolation=interpolation or "random")
        return Policy("rand", AUTO_3A, 1 if num_ops is None else num_ops, prob=1.0, hparams=hp, groups=groups,
                      color_jitter=_jitter_tuple(0.3 if color_jitter is None else color_jitter))
    raise ValueError(f"augment policy {name!r}: expected 'rand' (or a timm 'rand-m9-n2-...' string), 'trivial' or '3a'")


def _jitter_tuple(cj):
    if cj is None:
        return None
    if isinstance(cj, (int, float)):
        return None if cj <= 0 else (float(cj),) * 3 + (0.0,)
    cj = tuple(float(v) for v in cj)
    if len(cj) not in (3, 4):
        raise ValueError(f"color_jitter={cj}: a number, or (brightness, contrast, saturation[, hue])")
    return cj + (0.0,) * (4 - len(cj))


# =========================================================================================== colour jitter
_PERMUTATIONS = np.asarray(list(itertools.permutations(range(4))), np.int32)  # (a table: permutation() is a
# sort, 2.4 s of compilation on a CPU for 4 numbers)

def color_jitter(images: jax.Array, key: jax.Array, brightness: float = 0.4, contrast: float = 0.4,
                 saturation: float = 0.4, hue: float = 0.0) -> jax.Array:
    """torchvision's ``ColorJitter(brightness, contrast, saturation, hue)`` on PIL images, per image: factors
    uniform in [max(0, 1 - v), 1 + v] (hue in [-hue, hue]), applied in a random order (``randperm(4)``); a
    zero turns that adjustment off. (B, H, W, C) integer-valued -> the same. Cost: the random order is a
    select, so each of the 4 slots computes every enabled adjustment (elementwise, but hue is ~20 ops a pixel)."""
    x = quantize(images)
    return _color_jitter(x, jax.random.uniform(key, (x.shape[0], 5), F32), brightness, contrast, saturation, hue)


def _color_jitter(x, u, brightness, contrast, saturation, hue):
    enabled = [op for op, v in enumerate((brightness, contrast, saturation, hue)) if v > 0]
    if not enabled:
        return x
    if not 0 <= hue <= 0.5:
        raise ValueError(f"hue={hue}: expected 0..0.5")
    lo = jnp.asarray([max(0.0, 1.0 - v) for v in (brightness, contrast, saturation)] + [-hue], F32)
    hi = jnp.asarray([1.0 + v for v in (brightness, contrast, saturation)] + [hue], F32)
    factors = lo + (hi - lo) * u[:, :4]
    orders = jnp.asarray(_PERMUTATIONS)[jnp.minimum(jnp.floor(u[:, 4] * 24).astype(jnp.int32), 23)]

    def one(img, f, order):
        adjust = (lambda im: enhance_brightness(im, f[0]), lambda im: enhance_contrast(im, f[1]),
                  lambda im: enhance_color(im, f[2]), lambda im: adjust_hue(im, f[3]))

        def slot(im, op_drawn):  # every enabled adjustment, keeping the one drawn for this slot
            out = im
            for op in enabled:
                out = jnp.where(op_drawn == op, adjust[op](im), out)
            return out, None
        # A scan, not four inlined slots: XLA would fuse them and recompute each slot once per adjustment of
        # the next.
        return jax.lax.scan(slot, img, order)[0]

    return jax.vmap(one)(x, factors, orders)


# ========================================================================================== random erasing
ERASE_MODES = ("const", "rand", "pixel")


def random_erasing(images: jax.Array, key: jax.Array, prob: float = 0.5, mode: str = "const",
                   min_area: float = 0.02, max_area: float = 1 / 3, min_aspect: float = 0.3,
                   max_aspect: float | None = None, min_count: int = 1, max_count: int | None = None,
                   attempts: int = 10) -> jax.Array:
    """timm's ``RandomErasing`` on a normalised batch (B, H, W, C), per image: with probability ``prob``, ``count``
    (uniform in [min_count, max_count]) boxes, each of area U(min_area, max_area) * H * W / count and aspect
    h / w log-uniform in [min_aspect, max_aspect or 1 / min_aspect]; h, w rounded; the first of ``attempts``
    draws with h < H and w < W is used (none: no box), at a uniform top-left. The box holds N(0, 1) per pixel
    ('pixel'), per channel ('rand') or 0 ('const'): zero is the data mean after normalisation. timm's class
    defaults; DeiT's recipe is prob 0.25, mode 'pixel'. Keeps the dtype."""
    if mode not in ERASE_MODES:
        raise ValueError(f"random erasing mode={mode!r}: expected one of {', '.join(ERASE_MODES)}")
    b, h, w, c = images.shape
    max_count = max_count or min_count
    log_lo, log_hi = math.log(min_aspect), math.log(max_aspect or 1 / min_aspect)
    k_u, k_fill = jax.random.split(key)
    u = jax.random.uniform(k_u, (b, 2 + max_count * (2 * attempts + 2)), F32)
    span = max_count - min_count + 1
    count = min_count + jnp.minimum(jnp.floor(u[:, 1] * span).astype(jnp.int32), span - 1)  # randint(lo, hi)
    if mode == "pixel":
        fill = jax.random.normal(k_fill, images.shape, images.dtype)
    elif mode == "rand":
        fill = jnp.broadcast_to(jax.random.normal(k_fill, (b, 1, 1, c), images.dtype), images.shape)
    else:
        fill = jnp.zeros_like(images)
    rows = jnp.arange(h)[:, None]
    cols = jnp.arange(w)[None, :]

    def mask(u_img, n):
        erase = u_img[0] < prob
        boxes = u_img[2:].reshape(max_count, 2 * attempts + 2)
        out = jnp.zeros((h, w), bool)
        for i in range(max_count):
            ua, ur, ut, ul = (boxes[i, :attempts], boxes[i, attempts:2 * attempts], boxes[i, -2], boxes[i, -1])
            area = (min_area + (max_area - min_area) * ua) * (h * w) / n
            aspect = jnp.exp(log_lo + (log_hi - log_lo) * ur)
            bh = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)  # Python's round: half to even, as jnp's
            bw = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
            fits = (bw < w) & (bh < h)
            first = jnp.argmax(fits)
            bh, bw = bh[first], bw[first]
            top = jnp.minimum(jnp.floor(ut * (h - bh + 1)).astype(jnp.int32), h - bh)  # randint(0, h - bh)
            left = jnp.minimum(jnp.floor(ul * (w - bw + 1)).astype(jnp.int32), w - bw)
            box = (rows >= top) & (rows < top + bh) & (cols >= left) & (cols < left + bw)
            out = out | (box & fits[first] & (i < n))
        return out & erase

    m = jax.vmap(mask)(u, count)
    return jnp.where(m[..., None], fill, images)


__all__ = ["Hparams", "Policy", "policy", "apply_op", "apply_trivial_op", "color_jitter", "random_erasing",
           "RAND_OPS", "RAND_GEOMETRY", "RAND_PIXEL", "TRIVIAL_GEOMETRY", "TRIVIAL_PIXEL", "RAND_TRANSFORMS",
           "RAND_INCREASING_TRANSFORMS", "quantize", "gaussian_blur", "adjust_hue"]
