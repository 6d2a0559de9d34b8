"""The pieces the published from-scratch recipes add (issue 19): LAMB, LayerScale, the Mixer's stochastic depth,
big_vision's sin-cos position embeddings, and the experiment presets that put them together."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from vision_train import models
from vision_train.config import ConfigError, OptimizerConfig
from vision_train.models.vit import posemb_sincos_2d
from vision_train.train import state as state_lib

from .helpers import compose

pytestmark = pytest.mark.fast

VIT = dict(patch_size=2, hidden_size=16, num_layers=3, num_heads=2, mlp_dim=32)
MIXER = dict(patch_size=2, num_blocks=3, hidden_dim=16, tokens_mlp_dim=8, channels_mlp_dim=32)


def build(arch, **kw):
    return models.create(arch, (8, 8, 3), 10, rngs=nnx.Rngs(0), **{**(VIT if arch == "vit" else MIXER), **kw})


def nudged(model):
    """Every parameter moved off its initial value (the Mixer's head starts at zero)."""
    params = nnx.state(model, nnx.Param)
    keys = iter(jax.random.split(jax.random.key(7), len(jax.tree.leaves(params))))
    nnx.update(model, jax.tree.map(lambda p: p + 0.1 * jax.random.normal(next(keys), p.shape), params))


def params_of(model) -> dict:
    return state_lib.param_paths(nnx.state(model, nnx.Param))


# ---------------------------------------------------------------------------------------------------- LAMB
def run_updates(tx, params, steps=5, seed=0):
    rng = np.random.default_rng(seed)
    state = tx.init(params)
    update = jax.jit(tx.update)
    for _ in range(steps):
        grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
        u, state = update(grads, state, params)
        params = optax.apply_updates(params, u)
    return params, state


@pytest.mark.parametrize("clip", [0.0, 1.0])
def test_lamb_takes_optax_lambs_steps(clip):
    """optimizer.name=lamb is optax.lamb (Adam's direction + decoupled decay, times each array's trust ratio), the
    learning rate, weight decay and clip norm read from the optimizer state as for the other optimizers."""
    o = OptimizerConfig(name="lamb", lr=4e-3, weight_decay=0.05, eps=1e-6, grad_clip_norm=clip)
    tx = state_lib.make_optimizer(o, lr_shape=optax.constant_schedule(1.0))
    ref = optax.lamb(o.lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)
    if clip:
        ref = optax.chain(optax.clip_by_global_norm(clip), ref)
    rng = np.random.default_rng(1)
    params = {"w": jnp.asarray(rng.normal(size=(6, 4)), jnp.float32), "b": jnp.zeros(4),
              "s": jnp.ones(4)}  # (a zero array: trust ratio 1 at first)
    got, state = run_updates(tx, params)
    want, _ = run_updates(ref, params)
    for k in params:
        np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), rtol=1e-6, atol=1e-7, err_msg=k)
    assert float(state.hyperparams["learning_rate"]) == pytest.approx(o.lr)
    assert float(state.hyperparams["weight_decay"]) == pytest.approx(o.weight_decay)


def test_lamb_with_layer_decay_scales_each_arrays_lamb_step():
    """lr_mults / layer_decay scale LAMB's update after the trust ratio: block i's step is decay ** (L - i) times
    the one it takes at the base rate (every array's trust ratio is its own, so a partition changes nothing else)."""
    params = nnx.state(build("vit", num_layers=2), nnx.Param)
    base = OptimizerConfig(name="lamb", lr=1e-2, weight_decay=0.02, eps=1e-6)
    decayed = OptimizerConfig(name="lamb", lr=1e-2, weight_decay=0.02, eps=1e-6, layer_decay=0.5)
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(3), p.shape), params)

    def update(o):
        tx = state_lib.make_optimizer(o, lr_shape=optax.constant_schedule(1.0), params=params)
        return state_lib.param_paths(jax.jit(tx.update)(grads, tx.init(params), params)[0])

    a, b = update(base), update(decayed)
    for path, u in b.items():
        k = 2 - int(path.split(".")[1]) if path.startswith("blocks.") else (0 if path.startswith(("head.", "norm.")) else 3)
        np.testing.assert_allclose(np.asarray(u), 0.5 ** k * np.asarray(a[path]), rtol=1e-5, atol=1e-9, err_msg=path)


def test_the_lamb_preset_has_timms_lamb_defaults():
    o = compose(["optimizer=lamb"]).optimizer
    assert (o.name, o.b1, o.b2, o.eps, o.weight_decay, o.grad_clip_norm, o.schedule) == \
        ("lamb", 0.9, 0.999, 1e-6, 0.01, 1.0, "cosine")
    with pytest.raises(ConfigError) as e:
        compose(["optimizer.name=lars"])
    assert e.value.key == "optimizer.name" and "lamb" in str(e.value)


# ---------------------------------------------------------------------------------- LayerScale, drop-path
@pytest.mark.parametrize("arch", ["vit", "mixer"])
def test_layer_scale_off_is_the_old_parameter_tree_and_on_adds_gammas_at_the_init_value(arch):
    off, on = build(arch), build(arch, layer_scale=1e-4)
    p_off, p_on = params_of(off), params_of(on)
    assert not any("ls1" in k or "ls2" in k for k in p_off)
    added = sorted(set(p_on) - set(p_off))
    assert added == sorted(f"blocks.{i}.ls{j}.gamma" for i in range(3) for j in (1, 2))
    for k in added:
        assert p_on[k].shape == (16,) and p_on[k].dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(p_on[k]), np.float32(1e-4))
    for k in p_off:  # the same initial values for every other parameter
        np.testing.assert_array_equal(np.asarray(p_on[k]), np.asarray(p_off[k]), err_msg=k)
    # Off: the other state (RNG streams) is the one earlier checkpoints hold, too.
    assert jax.tree.structure(nnx.state(off, nnx.Not(nnx.Param))) == \
        jax.tree.structure(nnx.state(build(arch, layer_scale=0.0), nnx.Not(nnx.Param)))


@pytest.mark.parametrize("arch", ["vit", "mixer"])
def test_layer_scale_scales_each_branch(arch):
    """With every gamma at 0 each block is the identity: its other weights no longer change the logits."""
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    model = build(arch, layer_scale=1e-4)
    nudged(model)
    before = np.asarray(model(x, train=False))

    def changed(keep_gamma, scale):
        return jax.tree_util.tree_map_with_path(
            lambda kp, p: (p if keep_gamma else jnp.zeros_like(p)) if "gamma" in state_lib._path(kp)
            else p * scale if state_lib._path(kp).startswith("blocks.") else p, nnx.state(model, nnx.Param))

    nnx.update(model, changed(False, 1.0))
    zero = np.asarray(model(x, train=False))
    nnx.update(model, changed(False, 3.0))
    np.testing.assert_allclose(np.asarray(model(x, train=False)), zero, rtol=1e-5, atol=1e-6)
    assert not np.allclose(before, zero)


def test_mixer_stochastic_depth_drops_whole_examples_growing_with_depth():
    model = build("mixer", stochastic_depth=0.3)
    rates = [None if b.drop_path is None else b.drop_path.rate for b in model.blocks]
    assert rates == [None, pytest.approx(0.15), pytest.approx(0.3)]
    assert build("mixer").blocks[1].drop_path is None  # off: no module, no RNG state
    x = jax.random.normal(jax.random.key(0), (64, 8, 8, 3))
    nudged(model)
    train_a, train_b = model(x, train=True), model(x, train=True)
    assert not np.allclose(np.asarray(train_a), np.asarray(train_b))  # a new draw each call
    np.testing.assert_array_equal(np.asarray(model(x, train=False)), np.asarray(model(x, train=False)))
    # Per example: the last block's token-mixing branch (its channel-mixing branch zeroed) is either dropped or
    # kept whole, scaled by 1 / (1 - 0.3).
    block = model.blocks[2]
    for layer in (block.channel_mixing.fc2.kernel, block.channel_mixing.fc2.bias):
        layer.value = jnp.zeros_like(layer.value)
    tokens = jax.random.normal(jax.random.key(1), (256, 16, 16))
    branch = np.asarray(block(tokens, train=False) - tokens)
    got = np.asarray(block(tokens, train=True) - tokens)
    dropped = np.all(got == 0, axis=(1, 2))
    np.testing.assert_allclose(got[~dropped], branch[~dropped] / 0.7, rtol=1e-5, atol=1e-5)
    assert 0.2 < dropped.mean() < 0.4


def test_stochastic_depth_and_layer_scale_are_checked():
    for overrides, key in ((["model=mixer", "model.stochastic_depth=1"], "model.stochastic_depth"),
                           (["model=mixer", "model.layer_scale=-1"], "model.layer_scale"),
                           (["model=vit", "model.layer_scale=-0.1"], "model.layer_scale"),
                           (["model=vit", "model.posemb=rope"], "model.posemb"),
                           (["model=vit", "model.posemb=sincos2d", "model.hidden_size=18", "model.num_heads=2"],
                            "model.posemb")):
        with pytest.raises(ConfigError) as e:
            compose(overrides)
        assert e.value.key == key, overrides


# ------------------------------------------------------------------------------------- sin-cos position embeddings
def test_sincos2d_is_big_visions_fixed_embedding_and_has_no_parameter():
    pe = posemb_sincos_2d(2, 3, 8)  # width 8: 2 frequencies (1 and 1/10000) for each of sin x, cos x, sin y, cos y
    assert pe.shape == (1, 6, 8) and pe.dtype == np.float32
    x, y = np.tile(np.arange(3), 2), np.repeat(np.arange(2), 3)  # row-major grid
    omega = np.array([1.0, 1e-4])
    want = np.concatenate([np.sin(x[:, None] * omega), np.cos(x[:, None] * omega),
                           np.sin(y[:, None] * omega), np.cos(y[:, None] * omega)], axis=1)
    np.testing.assert_allclose(pe[0], want, rtol=1e-6, atol=1e-7)
    model = build("vit", posemb="sincos2d", classifier="gap")
    assert "pos_embed" not in params_of(model)
    learned = build("vit", classifier="gap")
    assert len(params_of(learned)) == len(params_of(model)) + 1
    # The embedding is added to the patches: the model computes the learned one's function with pos_embed = sincos.
    nnx.update(learned, nnx.state(model, nnx.Param))
    learned.pos_embed.value = jnp.asarray(posemb_sincos_2d(4, 4, 16))
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    np.testing.assert_allclose(np.asarray(model(x, train=False)), np.asarray(learned(x, train=False)),
                               rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ presets
RECIPES = ["bv_vit_s16_i1k", "deit3_s16_in1k", "rsb_a3_resnet50", "cifar10_vit"]


@pytest.mark.parametrize("name", RECIPES)
def test_the_recipe_presets_compose_and_validate(name):
    cfg = compose([f"experiment={name}", "data.root=/imagenet"])
    a = cfg.data.augment
    # What the run checks once it has the data: each batch holds every repeat of its images, an even batch for
    # mixing; and 8 devices (a GPU node) split it evenly.
    assert cfg.trainer.batch_size % (cfg.data.repeated_aug * 8) == 0 and cfg.trainer.batch_size % 2 == 0
    if name == "bv_vit_s16_i1k":
        assert (cfg.model.arch, cfg.model.hidden_size, cfg.model.classifier, cfg.model.posemb,
                cfg.model.representation_size, cfg.model.gelu) == ("vit", 384, "gap", "sincos2d", 384, "tanh")
        assert (a.policy, a.num_ops, a.magnitude, a.mixup_alpha, a.cutmix_alpha) == ("randaugment", 2, 10, 0.2, 0)
        assert list(a.crop_scale) == [0.08, 1.0] and a.flip and a.random_resized_crop
        o = cfg.optimizer
        assert (o.name, o.lr, o.weight_decay, o.grad_clip_norm, o.schedule) == ("adamw", 1e-3, 0.1, 1.0, "cosine")
        assert (cfg.trainer.epochs, cfg.trainer.batch_size, cfg.data.image_size) == (90, 1024, 224)
    elif name == "deit3_s16_in1k":
        assert (cfg.model.hidden_size, cfg.model.layer_scale, cfg.model.stochastic_depth) == (384, 1e-4, 0.05)
        assert (a.policy, a.color_jitter, a.mixup_alpha, a.cutmix_alpha) == ("3augment", 0.3, 0.8, 1.0)
        assert (cfg.trainer.loss, cfg.data.repeated_aug, cfg.optimizer.name, cfg.optimizer.lr) == ("bce", 3, "lamb", 4e-3)
        assert (cfg.optimizer.weight_decay, cfg.trainer.batch_size) == (0.05, 2040)
    elif name == "rsb_a3_resnet50":
        assert cfg.model.arch == "resnet" and cfg.data.image_size == 160
        assert (a.policy, a.num_ops, a.magnitude, a.magnitude_std, a.mixup_alpha, a.cutmix_alpha) == \
            ("randaugment", 2, 6, 0.5, 0.1, 1.0)
        assert (cfg.trainer.loss, cfg.optimizer.name, cfg.optimizer.lr, cfg.trainer.epochs) == ("bce", "lamb", 8e-3, 100)
    else:
        assert cfg.data.name == "cifar10" and cfg.model.arch == "vit"
        assert a.policy == "randaugment" and a.mixup_alpha > 0 and a.cutmix_alpha > 0
        assert cfg.optimizer.name == "adamw" and cfg.optimizer.label_smoothing == 0.1


@pytest.mark.fast
@pytest.mark.parametrize("name", ["adamw", "lamb", "sgd"])
def test_weight_decay_1d_false_leaves_biases_and_norms_undecayed_and_unadapted(name):
    """optimizer.weight_decay_1d=false (timm's filter_bias_and_bn): with zero gradients, only arrays of 2+
    dimensions shrink; 1-D arrays do not move at all (no decay, and LAMB's trust ratio is not applied to them)."""
    params = {"kernel": jnp.ones((3, 4)), "bias": jnp.ones((4,)), "scale": jnp.full((4,), 2.0)}
    grads = jax.tree.map(jnp.zeros_like, params)
    moved = {}
    for flag in (True, False):
        o = OptimizerConfig(name=name, lr=0.1, weight_decay=0.5, weight_decay_1d=flag)
        tx = state_lib.make_optimizer(o, lr_shape=optax.constant_schedule(1.0))
        updates, _ = tx.update(grads, tx.init(params), params)
        moved[flag] = {k: float(jnp.abs(v).max()) for k, v in updates.items()}
    assert moved[True]["bias"] > 0 and moved[True]["scale"] > 0 and moved[True]["kernel"] > 0
    assert moved[False]["bias"] == 0 and moved[False]["scale"] == 0
    assert moved[False]["kernel"] == pytest.approx(moved[True]["kernel"])
