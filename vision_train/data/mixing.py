"""Mixup, CutMix, soft-target losses and repeated augmentation, as pure functions for the jitted train step.

What timm's training recipes (DeiT, "ResNet strikes back") add to the input pipeline, with timm's semantics
and JAX randomness, so they run inside the jitted step for every feed (DESIGN.md, decision 12):

- ``mix(key, x, labels, cfg, num_classes)``: timm's ``Mixup`` (modes 'batch', 'pair', 'elem'). Every image
  is mixed with its mirror in the batch (``x[::-1]``, timm's ``x.flip(0)``) and the targets are timm's
  ``mixup_target``: label-smoothed one-hot vectors mixed with the same weights. The random numbers
  (``sample``: lambda from ``jax.random.beta``, the mix and switch choices from ``jax.random.uniform``, the box
  from ``jax.random.randint``) are the ones timm draws from ``np.random`` (``Draws``); ``apply`` takes them.
- ``soft_target_cross_entropy`` and ``binary_cross_entropy``: timm's ``SoftTargetCrossEntropy`` and
  ``BinaryCrossEntropy``, per example (their batch mean is timm's loss).
- ``repeated_order``: DeiT's repeated augmentation (timm's ``RepeatAugSampler``) as an epoch order of the
  global batch, a pure function of (seed, epoch).

Given the same draws, the images and targets equal timm's bit for bit (tests/test_mixing.py, on CPU): the box
side, ``int(h * sqrt(1 - lam))`` (float64 in 'batch' mode, float32 in 'pair'/'elem' mode, as timm computes it),
comes from exact per-size thresholds on lambda, and the weights from an exact integer division (``_ratio``), so
neither depends on how a backend rounds a square root or divides.

The mixing is one fused elementwise pass over the batch (it reads the batch and its mirror, writes the result)
plus (B, H, W) comparisons for the CutMix boxes; all three modes take that path (per-example weights and
boxes); a ``lax.cond`` on the batch's choice would save only arithmetic in a memory-bound pass. Its cost next
to a ViT step: ``benchmarks/mixing.py``. Mixing, like normalisation, is affine with weights summing to 1, so it
can run before or after ``pipeline.normalize`` (the results differ only by rounding); it needs float images.

In the train step (``train.steps``), on the global batch before any split into micro-batches (so the result
does not depend on the accumulation steps nor on the device count)::

    k_mix = jax.random.fold_in(step_key(state), 2)  # its own stream: runs without mixing keep their numbers
    x, targets = mixing.mix(k_mix, x, y, cfg, num_classes, label_smoothing=label_smoothing)
    loss = mixing.soft_target_cross_entropy(logits, targets).mean()  # or binary_cross_entropy(logits, targets)

and in a feed, repeated augmentation: the epoch's order ``repeated_order(n, R, seed, epoch)`` in place of
``pipeline.epoch_permutation(seed, epoch, n)`` (``repeat_order(data.stream.epoch_order(...), R, length)`` on
the host), ``steps_per_epoch = repeated_epoch_length(n, R) // batch_size``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import pipeline
from .stream import repeat_order, repeated_epoch_length  # noqa: F401 (host and jit alike)

MODES = ("batch", "pair", "elem")


# ------------------------------------------------------------------------------------------ mixup / cutmix
@dataclass(frozen=True)
class Mixing:
    """timm's ``Mixup`` arguments (same names and meanings; static: part of the compiled step).

    ``mixup_alpha`` > 0: mixup with lambda ~ Beta(alpha, alpha). ``cutmix_alpha`` > 0: CutMix with lambda ~
    Beta(alpha, alpha), a box of area (1 - lambda) clipped to the image. ``cutmix_minmax`` (lo, hi): CutMix with
    a box whose sides are uniform in [lo, hi) of the image's (timm then uses alpha 1 and always corrects lambda).
    Both on: CutMix with probability ``switch_prob``, else mixup. ``prob``: the probability of mixing at all
    (per batch, pair or example, as ``mode``). ``correct_lam``: lambda from the clipped box's actual area.
    Label smoothing is the step's (``mix``'s ``label_smoothing``), not a field here."""
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    cutmix_minmax: tuple[float, float] | None = None
    prob: float = 1.0
    switch_prob: float = 0.5
    mode: str = "batch"
    correct_lam: bool = True

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mixing mode must be one of {MODES}, got {self.mode!r}")
        if self.mixup_alpha < 0 or self.cutmix_alpha < 0:
            raise ValueError(f"mixup_alpha and cutmix_alpha must be >= 0, got {self.mixup_alpha}, {self.cutmix_alpha}")
        for name in ("prob", "switch_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.cutmix_minmax is not None:
            lo, hi = self.cutmix_minmax
            if not 0.0 <= lo < hi <= 1.0:
                raise ValueError(f"cutmix_minmax must be (lo, hi) with 0 <= lo < hi <= 1, got {self.cutmix_minmax}")
            object.__setattr__(self, "cutmix_minmax", (float(lo), float(hi)))

    @property
    def cutmix_beta(self) -> float:
        """The alpha of CutMix's lambda (timm forces 1.0 when ``cutmix_minmax`` is given)."""
        return 1.0 if self.cutmix_minmax is not None else self.cutmix_alpha

    @property
    def enabled(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_beta > 0

    def units(self, batch_size: int) -> int:
        """How many independent draws a batch takes: 1 ('batch'), B/2 ('pair'), B ('elem')."""
        return {"batch": 1, "pair": batch_size // 2, "elem": batch_size}[self.mode]


class Draws(NamedTuple):
    """The random numbers timm's ``Mixup`` draws for one batch, one row per unit (``Mixing.units``)."""
    u_prob: jax.Array      # (n,) uniform [0, 1): mix when < prob
    u_switch: jax.Array    # (n,) uniform: CutMix when < switch_prob (both on)
    lam_mixup: jax.Array   # (n,) Beta(mixup_alpha, mixup_alpha); 1 when mixup is off
    lam_cutmix: jax.Array  # (n,) Beta(cutmix_alpha, cutmix_alpha); 1 when CutMix is off
    box: jax.Array         # (n, 4) int32: rand_bbox's (cy, cx, 0, 0); with cutmix_minmax (cut_h, cut_w, y0, x0)


class Params(NamedTuple):
    """What a batch's mixing does, per unit (``decide``) or per example (``per_example``)."""
    weight: jax.Array        # (n,) float32: of the example's own image and label (timm's lambda, corrected)
    weight_other: jax.Array  # (n,) float32: of its mirror's, rounded as timm rounds it (1 - lambda)
    cutmix: jax.Array        # (n,) bool: paste the mirror's box (else: blend with the weights)
    box: jax.Array           # (n, 4) int32: (y0, y1, x0, x1), half-open; empty unless CutMix


def _f32_threshold(p: float) -> np.float32:
    """The float32 t with ``u < t`` == ``u < p`` (p in float64, as timm compares) for every float32 u."""
    t = np.float32(p)
    return np.nextafter(t, np.float32(np.inf)) if float(t) < p else t


@functools.cache
def _cut_thresholds(size: int, dtype: str) -> np.ndarray:
    """T (size,) float32: T[k-1] is the largest float32 lambda in [0, 1] for which timm's rand_bbox cuts at
    least k of ``size`` pixels, ``int(size * np.sqrt(1 - lam))`` evaluated in ``dtype`` ('float64': timm's
    batch mode, lambda a Python float; 'float32': pair/elem, lambda a np.float32). The cut is then
    ``sum(lam <= T)`` for every float32 lambda, exactly and on any backend. Found by bisection over float32
    bit patterns (the cut does not grow with lambda)."""
    ft = np.dtype(dtype).type

    def cut(bits):
        lam = bits.astype(np.uint32).view(np.float32).astype(dtype)
        return (ft(size) * np.sqrt(ft(1) - lam)).astype(np.int64)

    k = np.arange(1, size + 1)
    lo = np.zeros(size, np.int64)  # cut(lo) >= k holds (lambda 0 cuts the whole side)
    hi = np.full(size, np.float32(1).view(np.uint32).astype(np.int64) + 1)  # cut(hi) >= k fails or past 1
    while np.any(hi - lo > 1):
        mid = (lo + hi) // 2
        ok = cut(mid) >= k
        lo, hi = np.where(ok, mid, lo), np.where(ok, hi, mid)
    return lo.astype(np.uint32).view(np.float32)


def _ratio(n: jax.Array, d: int) -> jax.Array:
    """float32 ``n / d`` correctly rounded (to nearest, ties to even), for integers 0 <= n <= d < 2**24, on any
    backend: XLA may divide by a constant or a broadcast scalar as a multiplication by its reciprocal, which
    rounds differently. Integer long division: n doubled s times into [d/2, d), 24 quotient bits, rounded by the
    remainder, times 2**-(24 + s). About 50 integer operations per element."""
    if not 0 < d < 2**24:
        raise ValueError(f"images of {d} pixels are beyond the box arithmetic's 2**24")
    n = n.astype(jnp.int32)
    num, shift = jnp.maximum(n, 1), jnp.zeros_like(n)
    for _ in range(24):
        up = 2 * num < d
        num, shift = jnp.where(up, 2 * num, num), shift + up
    q, r = jnp.zeros_like(n), num
    for _ in range(24):
        r = 2 * r
        bit = r >= d
        q, r = 2 * q + bit, jnp.where(bit, r - d, r)
    q = q + ((2 * r > d) | ((2 * r == d) & (q % 2 == 1)))
    scale = jax.lax.bitcast_convert_type((127 - 24 - shift) << 23, jnp.float32)  # 2**-(24 + s), exactly
    return jnp.where(n == 0, 0.0, jnp.where(n >= d, 1.0, q.astype(jnp.float32) * scale))


def sample(key: jax.Array, cfg: Mixing, batch_size: int, image_hw: tuple[int, int]) -> Draws:
    """The batch's random draws (the only randomness of ``mix``): a pure function of ``key``."""
    n, (h, w) = cfg.units(batch_size), image_hw
    k_prob, k_switch, k_lam, k_box = jax.random.split(key, 4)
    # Both lambdas from one Beta call (row 0 mixup's alpha, row 1 CutMix's): each call compiles a gamma sampler.
    alphas = jnp.array([[cfg.mixup_alpha or 1.0], [cfg.cutmix_beta or 1.0]], jnp.float32)
    lam = jax.random.beta(k_lam, alphas, alphas, (2, n), jnp.float32)
    ones = jnp.ones((n,), jnp.float32)
    if cfg.cutmix_minmax is None:  # rand_bbox's centre: randint(0, h), randint(0, w)
        kh, kw = jax.random.split(k_box)
        box = jnp.stack([jax.random.randint(kh, (n,), 0, h), jax.random.randint(kw, (n,), 0, w),
                         jnp.zeros((n,), jnp.int32), jnp.zeros((n,), jnp.int32)], axis=1)
    else:  # rand_bbox_minmax: sides randint(int(h * lo), int(h * hi)), then corners randint(0, h - cut + 1)
        lo, hi = cfg.cutmix_minmax
        k1, k2, k3, k4 = jax.random.split(k_box, 4)
        cut_h = jax.random.randint(k1, (n,), int(h * lo), max(int(h * hi), int(h * lo) + 1))
        cut_w = jax.random.randint(k2, (n,), int(w * lo), max(int(w * hi), int(w * lo) + 1))
        box = jnp.stack([cut_h, cut_w, jax.random.randint(k3, (n,), 0, h - cut_h + 1),
                         jax.random.randint(k4, (n,), 0, w - cut_w + 1)], axis=1)
    return Draws(jax.random.uniform(k_prob, (n,)), jax.random.uniform(k_switch, (n,)),
                 lam[0] if cfg.mixup_alpha > 0 else ones, lam[1] if cfg.cutmix_beta > 0 else ones,
                 box.astype(jnp.int32))


def decide(draws: Draws, cfg: Mixing, image_hw: tuple[int, int]) -> Params:
    """timm's decisions from the draws, per unit: mix or not (``prob``), CutMix or mixup (``switch_prob``),
    lambda, the box, and lambda corrected by the box's area."""
    h, w = image_hw
    if cfg.cutmix_minmax is not None:
        lo, hi = cfg.cutmix_minmax
        if int(h * lo) >= int(h * hi) or int(w * lo) >= int(w * hi):
            raise ValueError(f"cutmix_minmax {cfg.cutmix_minmax} leaves no box side to draw on {h}x{w} images "
                             f"(timm's randint(int(h * lo), int(h * hi)) needs lo < hi after truncation)")
    mixup_on, cutmix_on = cfg.mixup_alpha > 0, cfg.cutmix_beta > 0
    if mixup_on and cutmix_on:
        use_cut = draws.u_switch < _f32_threshold(cfg.switch_prob)
        lam = jnp.where(use_cut, draws.lam_cutmix, draws.lam_mixup)
    else:
        use_cut = jnp.full(draws.u_prob.shape, cutmix_on)
        lam = draws.lam_cutmix if cutmix_on else draws.lam_mixup
    lam = jnp.where(draws.u_prob < _f32_threshold(cfg.prob), lam, 1.0).astype(jnp.float32)
    cut = use_cut & (lam != 1.0)  # timm: lambda == 1 changes nothing (no box is drawn)

    a, b, c, d = (draws.box[:, i] for i in range(4))
    if cfg.cutmix_minmax is None:
        f = "float64" if cfg.mode == "batch" else "float32"  # as timm's rand_bbox computes int(h * sqrt(1 - lam))
        cut_h = jnp.sum(lam[:, None] <= _cut_thresholds(h, f), axis=1, dtype=jnp.int32)
        cut_w = jnp.sum(lam[:, None] <= _cut_thresholds(w, f), axis=1, dtype=jnp.int32)
        y0, y1 = jnp.clip(a - cut_h // 2, 0, h), jnp.clip(a + (cut_h + 1) // 2, 0, h)
        x0, x1 = jnp.clip(b - cut_w // 2, 0, w), jnp.clip(b + (cut_w + 1) // 2, 0, w)
    else:
        y0, y1, x0, x1 = c, c + a, d, d + b
    box = jnp.where(cut[:, None], jnp.stack([y0, y1, x0, x1], axis=1), 0).astype(jnp.int32)

    # Weights, rounded to float32 as timm's arithmetic rounds them: in batch mode lambda is a Python float and
    # the target's (1 - lambda) is taken in float64 (for a corrected lambda: area / (h w)); in pair/elem mode
    # lambda is stored float32 and (1 - lambda) is taken in float32. A float64 ratio of integers this small,
    # rounded to float32, is the exact ratio rounded once (``_ratio``).
    area = (box[:, 1] - box[:, 0]) * (box[:, 3] - box[:, 2])
    corrected = cut & (cfg.correct_lam or cfg.cutmix_minmax is not None)
    weight = jnp.where(corrected, _ratio(h * w - area, h * w), lam)
    if cfg.mode == "batch":
        weight_other = jnp.where(corrected, _ratio(area, h * w), 1.0 - lam)
    else:
        weight_other = 1.0 - weight
    return Params(weight.astype(jnp.float32), weight_other.astype(jnp.float32), cut, box)


def per_example(params: Params, mode: str, batch_size: int) -> Params:
    """Unit parameters spread over the batch's examples: 'batch' one for all, 'pair' example i and its
    mirror B-1-i share theirs (timm's ``concatenate((lam, lam[::-1]))``), 'elem' one each."""
    if mode == "batch":
        return jax.tree.map(lambda a: jnp.broadcast_to(a, (batch_size, *a.shape[1:])), params)
    if mode == "pair":
        return jax.tree.map(lambda a: jnp.concatenate([a, a[::-1]]), params)
    return params


def mix_images(x: jax.Array, p: Params) -> jax.Array:
    """(B, H, W, C) float images mixed with their mirrors ``x[::-1]`` by per-example ``p``: the mirror's box
    pasted (CutMix) or ``x * weight + mirror * weight_other`` (mixup; computed in float32, returned in x's
    dtype); examples with weight 1 unchanged."""
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"mix_images takes float images (after augment/normalize), got {x.dtype}")
    h, w = x.shape[1:3]
    other = x[::-1]
    rows = jnp.arange(h, dtype=jnp.int32)[None, :, None]
    cols = jnp.arange(w, dtype=jnp.int32)[None, None, :]
    y0, y1, x0, x1 = (p.box[:, i, None, None] for i in range(4))
    inside = ((rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1) & p.cutmix[:, None, None])[..., None]
    wa, wb = p.weight[:, None, None, None], p.weight_other[:, None, None, None]
    blended = (x.astype(jnp.float32) * wa + other.astype(jnp.float32) * wb).astype(x.dtype)
    keep = p.cutmix[:, None, None, None] | (wa == 1.0)
    return jnp.where(inside, other, jnp.where(keep, x, blended))


def smooth_one_hot(labels: jax.Array, num_classes: int, label_smoothing: float = 0.0) -> jax.Array:
    """timm's ``one_hot`` targets: ``smoothing / C`` off the label, ``1 - smoothing + smoothing / C`` on it
    (constants taken in float64, then float32, as timm's ``torch.full``/``scatter_`` round them)."""
    off = label_smoothing / num_classes
    on = 1.0 - label_smoothing + off
    hot = labels.astype(jnp.int32)[:, None] == jnp.arange(num_classes, dtype=jnp.int32)[None, :]
    return jnp.where(hot, np.float32(on), np.float32(off))


def mix_targets(labels: jax.Array, num_classes: int, p: Params, label_smoothing: float = 0.0) -> jax.Array:
    """timm's ``mixup_target``: smoothed one-hot targets mixed with their mirrors' by per-example ``p``."""
    y = smooth_one_hot(labels, num_classes, label_smoothing)
    return y * p.weight[:, None] + y[::-1] * p.weight_other[:, None]


def apply(draws: Draws, x: jax.Array, labels: jax.Array, cfg: Mixing, num_classes: int, *,
          label_smoothing: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """``mix`` given its random draws (``sample``'s, or any others: e.g. the numbers timm drew)."""
    b, h, w = x.shape[:3]
    p = per_example(decide(draws, cfg, (h, w)), cfg.mode, b)
    return mix_images(x, p), mix_targets(labels, num_classes, p, label_smoothing)


def mix(key: jax.Array, x: jax.Array, labels: jax.Array, cfg: Mixing, num_classes: int, *,
        label_smoothing: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """timm's ``Mixup(**cfg, label_smoothing=label_smoothing, num_classes=num_classes)(x, labels)`` on a
    (B, H, W, C) float batch and its (B,) integer labels: ``(mixed images, (B, num_classes) float32 targets)``.
    ``cfg`` off (both alphas 0): the images unchanged and the smoothed one-hot targets. B must be even."""
    b, h, w = x.shape[:3]
    if b % 2:
        raise ValueError(f"mixing needs an even batch (each image is mixed with its mirror), got {b}")
    if not cfg.enabled:
        return x, smooth_one_hot(labels, num_classes, label_smoothing)
    return apply(sample(key, cfg, b, (h, w)), x, labels, cfg, num_classes, label_smoothing=label_smoothing)


# ------------------------------------------------------------------------------------------ losses
def soft_target_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per example ``sum_c -targets * log_softmax(logits)`` (B,); its mean is timm's SoftTargetCrossEntropy."""
    return -jnp.sum(targets * jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), axis=-1)


def binary_cross_entropy(logits: jax.Array, targets: jax.Array, *, label_smoothing: float = 0.0,
                         target_threshold: float | None = None, sum_classes: bool = False) -> jax.Array:
    """Per-example sigmoid cross-entropy (B,); its mean is timm's ``BinaryCrossEntropy(smoothing=label_smoothing,
    target_threshold=..., sum_classes=...)``. ``targets``: (B,) integer labels (one-hot with timm's smoothing)
    or (B, C) soft targets (e.g. ``mix``'s, used as they are, as timm does). ``target_threshold``: targets
    above it become 1, the rest 0. Per example the mean over classes (timm's default reduction: the mean over
    every (example, class)), or the sum with ``sum_classes``."""
    x = logits.astype(jnp.float32)
    if targets.ndim == 1:
        targets = smooth_one_hot(targets, x.shape[-1], label_smoothing)
    t = targets.astype(jnp.float32)
    if target_threshold is not None:
        t = (t > target_threshold).astype(jnp.float32)
    # torch's binary_cross_entropy_with_logits: (1 - t) x + log(1 + exp(-x)), stable for both signs
    loss = jnp.maximum(x, 0.0) - x * t + jnp.log1p(jnp.exp(-jnp.abs(x)))
    return jnp.sum(loss, axis=-1) if sum_classes else jnp.mean(loss, axis=-1)


# ------------------------------------------------------------------------------------------ repeated augmentation
def repeated_order(n: int, num_repeats: float, seed: int, epoch, *, selected_round: int = 256) -> jax.Array:
    """Epoch ``epoch``'s training order under repeated augmentation (DeiT, timm's RepeatAugSampler), as the
    global batches read it: ``repeated_epoch_length(n, ...)`` indices, the epoch's permutation
    (``pipeline.epoch_permutation(seed, epoch, n)``) with each index ``num_repeats`` times in a row. A batch of
    B (B a multiple of ``num_repeats``) holds B / num_repeats images, each ``num_repeats`` times (augmented
    independently: the augmentation draws per position); an epoch sees ``ceil(length / num_repeats)`` distinct
    images. This is timm's order over P processes read rank-interleaved (global position i is process i % P's
    (i // P)-th sample), with the permutation keyed by (seed, epoch) instead of torch's ``manual_seed(epoch)``.
    A pure function of (n, num_repeats, seed, epoch); jit it with n static."""
    length = repeated_epoch_length(n, num_repeats, selected_round)
    return repeat_order(pipeline.epoch_permutation(seed, epoch, n), num_repeats, length)
