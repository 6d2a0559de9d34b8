"""The device-side input pipeline: example order, eval batching, augmentation and normalisation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vision_train.data.pipeline import Augment, augment, epoch_permutation, eval_batches, normalize, resize


# The trainer runs augment inside its jitted step; jitting here too tests that path and keeps the file fast
# (op-by-op eager execution compiles every primitive separately).
_augment = jax.jit(augment, static_argnums=2)


def _images(b=16, h=8, w=8, c=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(b, h, w, c), dtype=np.uint8)


# -------------------------------------------------------------------------------------- example order
@pytest.mark.fast
def test_epoch_permutation_is_a_pure_function_of_seed_and_epoch():
    n = 100
    p = np.asarray(epoch_permutation(0, 0, n))
    assert p.dtype == np.int32 and sorted(p.tolist()) == list(range(n))
    np.testing.assert_array_equal(p, np.asarray(epoch_permutation(0, 0, n)))  # resume gets the same order
    np.testing.assert_array_equal(p, np.asarray(epoch_permutation(0, jnp.int32(0), n)))  # epoch given as a JAX array
    others = [np.asarray(epoch_permutation(s, e, n)) for s, e in ((0, 1), (0, 2), (1, 0), (2, 5))]
    for q in others:
        assert sorted(q.tolist()) == list(range(n))
        assert not np.array_equal(p, q)
    assert not np.array_equal(others[0], others[1])  # consecutive epochs differ from each other too


def test_epoch_permutation_under_jit_matches_eager():
    f = jax.jit(lambda e: epoch_permutation(3, e, 100))  # the training step traces the epoch
    np.testing.assert_array_equal(np.asarray(f(4)), np.asarray(epoch_permutation(3, 4, 100)))


@pytest.mark.fast
@pytest.mark.parametrize("n,b", [(100, 10), (100, 7), (100, 33), (100, 100)])
def test_one_epoch_of_steps_sees_each_example_at_most_once(n, b):
    perm = np.asarray(epoch_permutation(11, 2, n))
    steps = n // b
    seen = np.concatenate([perm[i * b:(i + 1) * b] for i in range(steps)])
    assert all(len(perm[i * b:(i + 1) * b]) == b for i in range(steps))  # every step gets a full batch
    assert len(set(seen.tolist())) == len(seen) == steps * b


@pytest.mark.fast
def test_dropped_remainder_differs_between_epochs():
    """With n % B != 0 the examples an epoch leaves out change with the epoch, so none is left out for good."""
    n, b = 100, 30
    left = [set(np.asarray(epoch_permutation(0, epoch, n))[n // b * b:].tolist()) for epoch in range(30)]
    assert all(len(s) == n - n // b * b for s in left)
    assert left[0] != left[1]
    assert len(set().union(*left)) > 90  # 30 epochs x 10 left out: nearly everyone sits out at least once


# ---------------------------------------------------------------------------------------- eval batches
@pytest.mark.fast
@pytest.mark.parametrize("n,b", [(12, 4), (13, 4), (3, 8), (1, 1), (8, 8), (9, 8)])
def test_eval_batches_cover_every_example_exactly_once(n, b):
    idx, mask = eval_batches(n, b)
    assert idx.shape == mask.shape and idx.shape[1] == b
    assert idx.shape[0] == -(-n // b)  # no batch made only of padding
    assert mask.dtype == bool and idx.dtype == np.int32
    assert sorted(idx[mask].tolist()) == list(range(n))
    assert idx.min() >= 0 and idx.max() < n  # padding indices still gather a valid example


# --------------------------------------------------------------------------------------- augmentation
@pytest.mark.fast
def test_augment_off_is_identity_as_float32():
    x = _images()
    out = augment(jnp.asarray(x), jax.random.key(0), Augment())
    assert out.dtype == jnp.float32 and out.shape == x.shape
    np.testing.assert_array_equal(np.asarray(out), x.astype(np.float32))


@pytest.mark.fast
def test_flip_only_mirrors_exactly():
    x = _images(b=32)
    out = np.asarray(_augment(jnp.asarray(x), jax.random.key(1), Augment(flip=True)))
    flipped = []
    for i in range(len(x)):
        same, mirrored = np.array_equal(out[i], x[i]), np.array_equal(out[i], x[i, :, ::-1])
        assert same or mirrored, f"example {i} is neither the image nor its mirror image"
        flipped.append(mirrored)
    assert 0 < sum(flipped) < len(x)  # a coin per example, not one for the whole batch


def _shift(img, dy, dx):
    """img shifted so that out[y, x] = img[y + dy, x + dx], zeros where that falls outside."""
    h, w = img.shape[:2]
    out = np.zeros_like(img)
    ys, xs = slice(max(0, -dy), min(h, h - dy)), slice(max(0, -dx), min(w, w - dx))
    yi, xi = slice(max(0, dy), min(h, h + dy)), slice(max(0, dx), min(w, w + dx))
    out[ys, xs] = img[yi, xi]
    return out


@pytest.mark.fast
def test_pad_crop_is_an_integer_shift_with_zeros_entering():
    """The CIFAR recipe (flip + pad 2 and crop): each output is the image or its mirror image, shifted by whole
    pixels (at most the padding) with zeros -- not blurred or edge-replicated values -- filling the gap."""
    p = 2
    x = _images(b=24).clip(1, 255)  # no zero pixels, so every zero in the output came from padding
    out = np.asarray(_augment(jnp.asarray(x), jax.random.key(2), Augment(flip=True, pad_crop=p)))
    shifts = []
    for i in range(len(x)):
        match = [(dy, dx) for src in (x[i], x[i, :, ::-1]) for dy in range(-p, p + 1) for dx in range(-p, p + 1)
                 if np.array_equal(out[i], _shift(src, dy, dx).astype(np.float32))]
        assert match, f"example {i} is not an integer shift of its input (or mirror) by at most {p} pixels"
        shifts.append(match[0])
    assert len(set(shifts)) > 3  # offsets are drawn per example
    assert any(dy or dx for dy, dx in shifts) and (out == 0).any()


def test_random_resized_crop_of_whole_image_is_identity():
    x = _images(b=8, h=16, w=16)
    aug = Augment(random_resized_crop=True, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))
    out = np.asarray(_augment(jnp.asarray(x), jax.random.key(4), aug))
    np.testing.assert_allclose(out, x.astype(np.float32), atol=1e-3)


def test_random_resized_crop_zooms_in_and_stays_inside_the_image():
    """A crop of a quarter of the area, resized back, is a 2x magnified window of the image. On linear ramps
    (channel 0 along x, channel 1 along y) the slope doubles, and the window's centre -- read off the ramp --
    lies where a window of half the width fits: never past an edge, and over many draws reaching both."""
    h = w = 16
    n = 1024
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    ramp = np.broadcast_to(np.stack([xx, yy], -1).astype(np.uint8)[None] * 16, (n, h, w, 2))
    aug = Augment(random_resized_crop=True, crop_scale=(0.25, 0.25), crop_ratio=(1.0, 1.0))
    out = np.asarray(_augment(jnp.asarray(ramp), jax.random.key(5), aug)) / 16  # back to pixel coordinates
    along_x, along_y = out[:, h // 2, :, 0], out[:, :, w // 2, 1]
    for line in (along_x, along_y):
        np.testing.assert_allclose(np.diff(line[:, 2:-2], axis=1), 0.5, atol=1e-4)  # half-size crop: 2x zoom
        centre = (line[:, 2] + line[:, -3]) / 2  # symmetric pair of samples, away from the border clamp
        lo, hi = 8 / 2 - 0.5, w - 8 / 2 - 0.5  # centres of 8-pixel windows that fit in 16 pixels
        assert centre.min() >= lo - 1e-3 and centre.max() <= hi + 1e-3
        assert centre.min() < lo + 0.1 and centre.max() > hi - 0.1


ALL_ON = Augment(flip=True, random_resized_crop=True, crop_scale=(0.3, 1.0), crop_ratio=(0.75, 1.33), pad_crop=3)


@pytest.mark.parametrize("shape", [(16, 8, 8, 3), (3, 12, 7, 1)])
def test_augment_shapes_dtype_and_range(shape):
    x = np.random.default_rng(6).integers(0, 256, size=shape, dtype=np.uint8)
    x[0] = 255  # a saturated image: interpolation must not overshoot
    out = np.asarray(_augment(jnp.asarray(x), jax.random.key(7), ALL_ON))
    assert out.shape == shape and out.dtype == np.float32
    assert np.isfinite(out).all()
    assert out.min() >= 0.0 and out.max() <= 255.0


def test_augment_depends_on_key_only():
    x = jnp.asarray(_images())
    a = np.asarray(_augment(x, jax.random.key(8), ALL_ON))
    b = np.asarray(_augment(x, jax.random.key(8), ALL_ON))
    c = np.asarray(_augment(x, jax.random.key(9), ALL_ON))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


# -------------------------------------------------------------------------------------- normalisation
def test_normalize_image_equal_to_mean_is_zero():
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    scale = 1.0 / 255
    img = jnp.broadcast_to(jnp.asarray(mean, jnp.float32) / scale, (2, 4, 4, 3))
    out = normalize(img, scale, mean, std, jnp.float32)
    assert out.dtype == jnp.float32 and out.shape == img.shape
    np.testing.assert_allclose(np.asarray(out), 0.0, atol=1e-5)

    one_std_up = img + jnp.asarray(std, jnp.float32) / scale
    np.testing.assert_allclose(np.asarray(normalize(one_std_up, scale, mean, std, jnp.float32)), 1.0, atol=1e-5)


def test_normalize_uses_per_channel_stats_and_dtype():
    x = jnp.asarray(np.full((1, 2, 2, 2), 255, np.uint8))
    out = normalize(x, 1.0 / 255, (0.5, 0.0), (0.5, 2.0), jnp.bfloat16)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32)[..., 0], 1.0)
    np.testing.assert_allclose(np.asarray(out, np.float32)[..., 1], 0.5)


def test_resampling_to_another_size_keeps_the_picture():
    """data.image_size on a built-in set: batches are resampled inside the step (e.g. 32x32 CIFAR at 224 for a
    pretrained model). Up-sampling a two-colour image keeps the colours on their halves; a crop of the whole
    image at twice the size equals plain resizing; the same size leaves the batch unchanged."""
    img = np.zeros((1, 8, 8, 1), np.uint8)
    img[:, :, 4:] = 200
    up = np.asarray(resize(jnp.asarray(img), (16, 16)))
    assert up.shape == (1, 16, 16, 1)
    assert np.allclose(up[0, :, :6], 0) and np.allclose(up[0, :, 10:], 200)
    assert np.array_equal(np.asarray(resize(jnp.asarray(img), (8, 8))), img.astype(np.float32))
    whole = Augment(random_resized_crop=True, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))
    crop = np.asarray(augment(jnp.asarray(img), jax.random.key(0), whole, size=(16, 16)))
    assert crop.shape == (1, 16, 16, 1)
    assert np.allclose(crop, up, atol=1e-3)
    flipped = np.asarray(augment(jnp.asarray(img), jax.random.key(3), Augment(flip=True), size=(12, 12)))
    assert flipped.shape == (1, 12, 12, 1)
