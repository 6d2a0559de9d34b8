"""Mixup/CutMix, soft-target losses and repeated augmentation (data/mixing.py) against timm's own code: the same
random draws give timm's images and targets bit for bit, the draws have timm's distributions, the losses are
timm's, and the repeated-augmentation order is timm's RepeatAugSampler read across processes."""

import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from scipy import stats

from vision_train.data import mixing, pipeline
from vision_train.data.sources import import_torchvision

import_torchvision()  # (before timm: PyPI torchvision beside CPU torch)
from timm.data import distributed_sampler as timm_sampler
from timm.data import mixup as timm_mixup
from timm.loss import BinaryCrossEntropy, SoftTargetCrossEntropy

NUM_CLASSES, SMOOTHING = 10, 0.1


class _Random:
    """Stands in for ``np.random`` inside timm's mixup module: returns given draws, in the order timm asks."""

    def __init__(self, rand, beta, randint):
        self._rand, self._beta, self._randint = list(rand), dict(beta), list(randint)

    def rand(self, *size):
        return self._rand.pop(0)

    def beta(self, a, b, size=None):
        assert a == b
        return self._beta[a]

    def randint(self, low, high, size=None):
        v = self._randint.pop(0)
        assert low <= v < high, (low, v, high)
        return v


def _patch_random(monkeypatch, random):
    """timm's mixup module sees ``random`` as ``np.random`` (numpy itself is left alone)."""
    names = {k: getattr(np, k) for k in dir(np) if not k.startswith("__")}
    monkeypatch.setattr(timm_mixup, "np", types.SimpleNamespace(**{**names, "random": random}))


def timm_mix(monkeypatch, cfg: mixing.Mixing, draws: mixing.Draws, x, labels, cut_units):
    """timm's ``Mixup(...)(x, labels)`` on NHWC numpy ``x``, its np.random replaced by ``draws``."""
    d = jax.tree.map(np.asarray, draws)
    as_float = (lambda a: float(a[0])) if cfg.mode == "batch" else (lambda a: a.astype(np.float64))
    both = cfg.mixup_alpha > 0 and cfg.cutmix_beta > 0
    if cfg.mode == "batch":  # rand(): prob, then switch
        rand = [as_float(d.u_prob), as_float(d.u_switch)]
    else:  # rand(n): switch (when both are on), then prob
        rand = ([as_float(d.u_switch)] if both else []) + [as_float(d.u_prob)]
    assert not both or cfg.mixup_alpha != cfg.cutmix_beta  # (the stand-in tells the two betas by alpha)
    beta = {cfg.mixup_alpha: as_float(d.lam_mixup), cfg.cutmix_beta: as_float(d.lam_cutmix)}
    per_box = 2 if cfg.cutmix_minmax is None else 4  # rand_bbox: cy, cx | rand_bbox_minmax: cut_h, cut_w, y0, x0
    randint = [int(v) for i in np.flatnonzero(cut_units) for v in d.box[i, :per_box]]
    fake = _Random(rand, beta, randint)
    _patch_random(monkeypatch, fake)
    m = timm_mixup.Mixup(mixup_alpha=cfg.mixup_alpha, cutmix_alpha=cfg.cutmix_alpha, cutmix_minmax=cfg.cutmix_minmax,
                         prob=cfg.prob, switch_prob=cfg.switch_prob, mode=cfg.mode, correct_lam=cfg.correct_lam,
                         label_smoothing=SMOOTHING, num_classes=NUM_CLASSES)
    xt, yt = m(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(labels.astype(np.int64)))
    assert not fake._randint, "timm drew fewer boxes than we cut"
    return xt.numpy().transpose(0, 2, 3, 1), yt.numpy()


CONFIGS = {
    "both": {"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "prob": 0.8},  # DeiT's, with some batches not mixed
    "minmax": {"mixup_alpha": 0.2, "cutmix_minmax": (0.3, 0.8), "switch_prob": 0.7},
    "mixup": {"mixup_alpha": 0.8},
    "cutmix": {"cutmix_alpha": 1.0},
    "uncorrected": {"cutmix_alpha": 0.5, "correct_lam": False, "prob": 0.7},
}
CASES = [(name, mode) for name in ("both", "minmax") for mode in mixing.MODES] + [
    ("mixup", "elem"), ("cutmix", "batch"), ("uncorrected", "pair")]


def numpy_draws(cfg: mixing.Mixing, batches: int, b: int, hw, seed=0) -> mixing.Draws:
    """``batches`` stacked Draws of ``cfg``'s kinds, from numpy (lambdas as float32, as ``sample`` gives them)."""
    rng = np.random.default_rng(seed)
    n, (h, w), shape = cfg.units(b), hw, (batches, cfg.units(b))
    beta = lambda a: rng.beta(a, a, shape).astype(np.float32) if a > 0 else np.ones(shape, np.float32)
    if cfg.cutmix_minmax is None:
        box = np.stack([rng.integers(0, h, shape), rng.integers(0, w, shape), np.zeros(shape), np.zeros(shape)], -1)
    else:
        lo, hi = cfg.cutmix_minmax
        ch, cw = rng.integers(int(h * lo), int(h * hi), shape), rng.integers(int(w * lo), int(w * hi), shape)
        box = np.stack([ch, cw, rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)], -1)
    assert box.shape == (batches, n, 4)
    return mixing.Draws(rng.random(shape, np.float32), rng.random(shape, np.float32), beta(cfg.mixup_alpha),
                        beta(cfg.cutmix_beta), box.astype(np.int32))


@pytest.mark.parametrize("name,mode", CASES)
def test_mix_equals_timm_given_the_same_draws(monkeypatch, name, mode):
    """Images and targets bitwise equal to timm's Mixup for the same random numbers (prob, switch, lambda, box),
    on non-square images (boxes clipped at the borders, lambda corrected by the clipped area)."""
    cfg = mixing.Mixing(**CONFIGS[name], mode=mode)
    batches, b, h, w = 12, 8, 13, 20
    rng = np.random.default_rng(0)
    x = rng.normal(size=(b, h, w, 3)).astype(np.float32)
    labels = rng.integers(0, NUM_CLASSES, b).astype(np.int32)

    def ours(draws):
        return mixing.decide(draws, cfg, (h, w)), *mixing.apply(draws, jnp.asarray(x), jnp.asarray(labels), cfg,
                                                                 NUM_CLASSES, label_smoothing=SMOOTHING)

    all_draws = numpy_draws(cfg, batches, b, (h, w))
    out = jax.device_get(jax.jit(jax.vmap(ours))(all_draws))
    seen = {"cut": 0, "blend": 0, "none": 0}
    for i in range(batches):
        draws, (p, xm, ym) = jax.tree.map(lambda a, i=i: a[i], (all_draws, out))
        seen["cut"] += int(np.sum(p.cutmix))
        seen["blend"] += int(np.sum(~p.cutmix & (p.weight != 1)))
        seen["none"] += int(np.sum(p.weight == 1))
        xt, yt = timm_mix(monkeypatch, cfg, draws, x.copy(), labels, p.cutmix)
        np.testing.assert_array_equal(xm, xt, err_msg=f"images, batch {i}")
        np.testing.assert_array_equal(ym, yt, err_msg=f"targets, batch {i}")
    kinds = {"mixup": ("blend",), "cutmix": ("cut",), "both": ("cut", "blend", "none"),
             "minmax": ("cut", "blend"), "uncorrected": ("cut", "none")}[name]
    assert all(seen[k] for k in kinds), seen  # the comparison covered what the config does


def test_mix_draws_with_sample_and_applies_them():
    """``mix(key)`` is ``apply(sample(key))``; the draws have the kinds and ranges timm's have."""
    cfg = mixing.Mixing(mixup_alpha=0.8, cutmix_minmax=(0.2, 0.6), mode="pair")
    x, labels = jax.random.normal(jax.random.key(0), (8, 10, 12, 3)), jnp.arange(8) % NUM_CLASSES

    def both(key):
        draws = mixing.sample(key, cfg, 8, (10, 12))
        return draws, mixing.mix(key, x, labels, cfg, NUM_CLASSES), mixing.apply(draws, x, labels, cfg, NUM_CLASSES)

    draws, mixed, applied = jax.device_get(jax.jit(jax.vmap(both))(jax.random.split(jax.random.key(4), 16)))
    assert jax.tree.map(np.shape, draws) == mixing.Draws((16, 4), (16, 4), (16, 4), (16, 4), (16, 4, 4))
    ch, cw, y0, x0 = np.moveaxis(draws.box, -1, 0)
    assert np.all((ch >= 2) & (ch < 6) & (cw >= 2) & (cw < 7))  # randint(int(10 * .2), int(10 * .6)), for 12: 7
    assert np.all((y0 >= 0) & (y0 + ch <= 10) & (x0 >= 0) & (x0 + cw <= 12))
    assert len(np.unique(ch)) == 4 and len(np.unique(y0)) > 4  # every side length drawn, corners spread
    for a, b in zip(mixed, applied):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("size", [7, 13, 32, 224])
@pytest.mark.parametrize("mode", ["batch", "elem"])
def test_box_sizes_equal_timm_where_float32_rounding_would_not(monkeypatch, size, mode):
    """rand_bbox's side ``int(size * sqrt(1 - lam))`` (float64 in timm's batch mode, float32 per element) for
    every lambda next to a boundary k/size: equal to timm's, where the obvious float32 formula is not."""
    lams = []
    for k in range(size + 1):
        t = np.float32(1 - (k / size) ** 2)
        lams += [np.nextafter(t, np.float32(-1)), t, np.nextafter(t, np.float32(2))]
    lams = np.clip(np.array(lams, np.float32), 0, np.nextafter(np.float32(1), np.float32(0)))
    n = len(lams)
    centre = np.tile(np.array([[size // 2, size // 2, 0, 0]], np.int32), (n, 1))
    draws = mixing.Draws(jnp.zeros(n), jnp.zeros(n), jnp.ones(n), jnp.asarray(lams), jnp.asarray(centre))
    p = jax.jit(lambda d: mixing.decide(d, mixing.Mixing(cutmix_alpha=1.0, mode=mode), (size, size)))(draws)
    ours = np.asarray(p.box[:, 1] - p.box[:, 0])
    _patch_random(monkeypatch, types.SimpleNamespace(randint=lambda lo, hi, size=None: (lo + hi) // 2))
    as_lam = float if mode == "batch" else np.float32  # what timm hands rand_bbox in each mode
    theirs = []
    for lam in lams:
        y0, y1, _, _ = timm_mixup.rand_bbox((size, size), as_lam(lam))
        theirs.append(y1 - y0)
    np.testing.assert_array_equal(ours, theirs)
    naive = np.floor(np.float32(size) * np.sqrt(np.float32(1) - lams)).astype(int)
    if mode == "batch" and size >= 13:
        assert np.any(naive != theirs)  # the test is sharp: plain float32 arithmetic misses some of these


def test_mix_off_gives_smoothed_one_hot_and_odd_batches_are_refused():
    x = jnp.ones((4, 5, 5, 3))
    labels = jnp.array([0, 3, 9, 3])
    xm, y = mixing.mix(jax.random.key(0), x, labels, mixing.Mixing(), NUM_CLASSES, label_smoothing=SMOOTHING)
    assert xm is x
    ref = timm_mixup.mixup_target(torch.tensor([0, 3, 9, 3]), NUM_CLASSES, 1.0, SMOOTHING).numpy()
    np.testing.assert_array_equal(np.asarray(y), ref)
    with pytest.raises(ValueError, match="even batch"):
        mixing.mix(jax.random.key(0), x[:3], labels[:3], mixing.Mixing(mixup_alpha=1.0), NUM_CLASSES)
    with pytest.raises(ValueError, match="mode"):
        mixing.Mixing(mixup_alpha=1.0, mode="pairs")


def _weights(cfg, keys, b=2, hw=(16, 16)):
    """(len(keys), units) decisions of ``cfg`` over many batches."""
    return jax.jit(jax.vmap(lambda k: mixing.decide(mixing.sample(k, cfg, b, hw), cfg, hw)))(keys)


@pytest.mark.parametrize("mixup_alpha,cutmix_alpha", [(0.2, 1.0), (0.8, 0.5)])
def test_lambdas_are_beta_distributed(mixup_alpha, cutmix_alpha):
    """Mixup's and CutMix's lambdas (before the box correction) pass a KS test against Beta(alpha, alpha)."""
    cfg = mixing.Mixing(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, mode="elem")  # 4000 units, one call
    draws = mixing.sample(jax.random.key(1), cfg, 4000, (16, 16))
    for lam, alpha in ((draws.lam_mixup, mixup_alpha), (draws.lam_cutmix, cutmix_alpha)):
        lam = np.asarray(lam)
        assert stats.kstest(lam, stats.beta(alpha, alpha).cdf).pvalue > 0.01
        assert stats.kstest(lam, stats.beta(2 * alpha, 2 * alpha).cdf).pvalue < 1e-6  # (the test can fail)


@pytest.mark.parametrize("mode", ["batch", "elem"])
def test_mixing_and_switch_frequencies(mode):
    """Mixing happens with probability ``prob``; among mixed units, CutMix with probability ``switch_prob``."""
    prob, switch = 0.6, 0.3
    cfg = mixing.Mixing(mixup_alpha=0.8, cutmix_alpha=1.0, prob=prob, switch_prob=switch, mode=mode)
    p = _weights(cfg, jax.random.split(jax.random.key(3), 2000), b=4)
    cut = np.asarray(p.cutmix).reshape(-1)
    mixed = cut | (np.asarray(p.weight).reshape(-1) != 1)
    n = mixed.size
    assert abs(mixed.mean() - prob) < 4.5 * math.sqrt(prob * (1 - prob) / n), mixed.mean()
    m = mixed.sum()
    assert abs(cut.sum() / m - switch) < 4.5 * math.sqrt(switch * (1 - switch) / m), cut.sum() / m


def test_mix_is_the_same_sharded_over_8_devices_and_keeps_the_dtype():
    """Inside jit with the batch split over 8 devices (the mirror crosses devices) the result is the
    single-device one; bfloat16 images stay bfloat16."""
    cfg = mixing.Mixing(mixup_alpha=0.8, cutmix_alpha=1.0, mode="elem")
    x = jax.random.normal(jax.random.key(0), (16, 8, 8, 3))
    labels = jnp.arange(16) % NUM_CLASSES
    fn = jax.jit(lambda k, x, y: mixing.mix(k, x, y, cfg, NUM_CLASSES, label_smoothing=SMOOTHING))
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharded = NamedSharding(mesh, P("data"))
    one = fn(jax.random.key(5), x, labels)
    eight = fn(jax.random.key(5), jax.device_put(x, sharded), jax.device_put(labels, sharded))
    for a, b in zip(one, eight):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    xb, y = jax.eval_shape(fn, jax.random.key(5), x.astype(jnp.bfloat16), labels)
    assert xb.dtype == jnp.bfloat16 and y.dtype == jnp.float32


# ------------------------------------------------------------------------------------------ losses
@pytest.mark.parametrize("num_classes", [10, 1000])
def test_soft_target_cross_entropy_equals_timm(num_classes):
    rng = np.random.default_rng(0)
    logits = (3 * rng.normal(size=(32, num_classes))).astype(np.float32)
    targets = rng.dirichlet(np.full(num_classes, 0.1), 32).astype(np.float32)
    ours = float(jnp.mean(mixing.soft_target_cross_entropy(jnp.asarray(logits), jnp.asarray(targets))))
    theirs = float(SoftTargetCrossEntropy()(torch.from_numpy(logits), torch.from_numpy(targets)))
    assert abs(ours - theirs) <= 1e-6 * max(1.0, abs(theirs)), (ours, theirs)


@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("threshold", [None, 0.2])
@pytest.mark.parametrize("sum_classes", [False, True])
def test_binary_cross_entropy_equals_timm(dense, threshold, sum_classes):
    """timm's BinaryCrossEntropy: labels one-hot with its smoothing, or soft targets as given; the threshold;
    its default reduction (mean over examples and classes) and sum_classes."""
    rng = np.random.default_rng(1)
    logits = (4 * rng.normal(size=(32, 100))).astype(np.float32)
    labels = rng.integers(0, 100, 32)
    if dense:
        targets = rng.dirichlet(np.full(100, 0.1), 32).astype(np.float32)
        theirs_t = torch.from_numpy(targets)
    else:
        targets, theirs_t = labels, torch.from_numpy(labels)
    ours = float(jnp.mean(mixing.binary_cross_entropy(jnp.asarray(logits), jnp.asarray(targets), label_smoothing=0.1,
                                                      target_threshold=threshold, sum_classes=sum_classes)))
    loss = BinaryCrossEntropy(smoothing=0.1, target_threshold=threshold, sum_classes=sum_classes)
    theirs = float(loss(torch.from_numpy(logits), theirs_t))
    assert abs(ours - theirs) <= 1e-6 * max(1.0, abs(theirs)), (ours, theirs)


# ------------------------------------------------------------------------------------------ repeated augmentation
@pytest.mark.parametrize("n,repeats", [(1000, 3), (1000, 2.5), (200, 3), (4096, 4)])
@pytest.mark.parametrize("processes", [1, 2, 4, 8])
def test_repeated_order_is_timms_sampler_read_across_processes(monkeypatch, n, repeats, processes):
    """timm's RepeatAugSampler on P processes, given our epoch permutation, read rank-interleaved (global
    position i = process i % P's sample i // P), is our order: same indices, same length."""
    seed, epoch = 3, 7
    perm = torch.tensor(np.asarray(pipeline.epoch_permutation(seed, epoch, n)), dtype=torch.long)
    monkeypatch.setattr(timm_sampler.torch, "randperm", lambda m, generator=None: perm.clone())
    ranks = [list(timm_sampler.RepeatAugSampler(range(n), num_replicas=processes, rank=r, num_repeats=repeats))
             for r in range(processes)]
    assert len({len(r) for r in ranks}) == 1
    interleaved = np.array([ranks[i % processes][i // processes] for i in range(processes * len(ranks[0]))])
    ours = np.asarray(mixing.repeated_order(n, repeats, seed, epoch))
    np.testing.assert_array_equal(ours, interleaved)
    assert len(ours) == mixing.repeated_epoch_length(n, repeats)


def test_repeated_order_counts_batches_and_determinism():
    n, r, b = 1000, 3, 48
    order = np.asarray(mixing.repeated_order(n, r, seed=0, epoch=0))
    assert len(order) == 768  # 1000 rounded down to a multiple of 256: the epoch is ~n examples, not n * r
    ids, counts = np.unique(order, return_counts=True)
    assert len(ids) == 256 and np.all(counts == r) and ids.min() >= 0 and ids.max() < n
    for i in range(len(order) // b):  # every batch of a multiple of r holds each of its images r times
        _, c = np.unique(order[i * b:(i + 1) * b], return_counts=True)
        assert np.all(c == r) and len(c) == b // r
    again = jax.jit(mixing.repeated_order, static_argnums=(0, 1))(n, r, 0, 0)
    np.testing.assert_array_equal(np.asarray(again), order)  # a pure function of (seed, epoch), jitted or not
    assert not np.array_equal(np.asarray(mixing.repeated_order(n, r, seed=0, epoch=1)), order)
    assert not np.array_equal(np.asarray(mixing.repeated_order(n, r, seed=1, epoch=0)), order)
    # the host (numpy) form, e.g. over data.stream's order, repeats the same way
    perm = np.asarray(pipeline.epoch_permutation(0, 0, n))
    np.testing.assert_array_equal(mixing.repeat_order(perm, r, 768), order)
