"""Every model: logits of the right shape for every data shape, in both modes and precisions."""

import dataclasses
import functools
import importlib
import inspect
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vision_train import models
from vision_train.errors import ConfigError
from vision_train.models import CNNConfig, MixerConfig, MLPConfig, ViTConfig

from .helpers import CONF, compose

# Tiny variants (used for testing only): same code paths, few parameters.
TINY = {
    "mlp": MLPConfig(hidden_layers=2, hidden_dim=16),
    "cnn": CNNConfig(features=[4, 8], dense_dim=16),
    "mixer": MixerConfig(patch_size=2, num_blocks=2, hidden_dim=16, tokens_mlp_dim=8, channels_mlp_dim=32),
    "vit": ViTConfig(patch_size=2, hidden_size=16, num_layers=2, num_heads=2, mlp_dim=32, stochastic_depth=0.1),
    "vit_gap_padded": ViTConfig(patch_size=2, hidden_size=16, num_layers=2, num_heads=2, mlp_dim=32,
                                classifier="gap", pad_tokens_to_multiple=8, attention_dropout=0.1),
    # The options pretrained checkpoints need (models/pretrained.py): exact GELU, no qkv bias, the norm after
    # pooling, a pre-logits layer, another epsilon.
    "vit_checkpoint_options": ViTConfig(patch_size=2, hidden_size=16, num_layers=1, num_heads=2, mlp_dim=32,
                                        classifier="gap", gelu="exact", qkv_bias=False, fc_norm=True,
                                        representation_size=8, layer_norm_eps=1e-5),
    "mixer_exact_gelu": MixerConfig(patch_size=2, num_blocks=1, hidden_dim=16, tokens_mlp_dim=8, channels_mlp_dim=32,
                                    gelu="exact"),
}
SHAPES = {"cifar": (32, 32, 3), "mnist": (28, 28, 1), "digits": (8, 8, 1), "wide": (16, 24, 3)}


def build(cfg, shape, num_classes=10, dtype=jnp.float32, seed=0):
    return models.create(cfg, shape, num_classes, rngs=nnx.Rngs(params=seed, dropout=seed + 1), dtype=dtype)


def abstract_forward(cfg, shape, num_classes, train):
    """Output shape/dtype without running anything (eager NNX on CPU runs op by op: slow)."""
    model = nnx.eval_shape(lambda: build(cfg, shape, num_classes))
    graphdef, state = nnx.split(model)
    x = jax.ShapeDtypeStruct((3, *shape), jnp.float32)
    return jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x, train=train), state, x)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("name", TINY)
def test_logits_shape_for_every_data_shape(name, shape):
    for train in (False, True):
        y = abstract_forward(TINY[name], shape, 7, train)
        assert y.shape == (3, 7) and y.dtype == jnp.float32


@pytest.mark.parametrize("name", TINY)
def test_forward_is_finite_and_jits(name):
    model = build(TINY[name], (8, 8, 1), num_classes=7)
    graphdef, state = nnx.split(model)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 8, 8, 1)), jnp.float32)
    f = jax.jit(lambda s, x, train: nnx.merge(graphdef, s)(x, train=train), static_argnums=2)
    for train in (False, True):
        y = f(state, x, train)
        assert y.shape == (3, 7) and bool(jnp.all(jnp.isfinite(y)))


@pytest.mark.parametrize("name", ["mlp", "cnn", "mixer", "vit"])
def test_bfloat16_compute_keeps_float32_params(name):
    model = nnx.eval_shape(lambda: build(TINY[name], (8, 8, 1), dtype=jnp.bfloat16))
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert all(p.dtype == jnp.float32 for p in params)
    graphdef, state = nnx.split(model)
    y = jax.eval_shape(lambda s: nnx.merge(graphdef, s)(jnp.ones((2, 8, 8, 1)), train=False), state)
    assert y.dtype == jnp.bfloat16


def test_dropout_active_only_in_training():
    graphdef, state = nnx.split(build(TINY["vit"], (8, 8, 1)))

    @functools.partial(jax.jit, static_argnums=2)
    def f(state, key, train):
        model = nnx.merge(graphdef, state)
        nnx.reseed(model, dropout=key)
        return model(x, train=train)

    x = jnp.ones((4, 8, 8, 1))
    k1, k2 = jax.random.key(1), jax.random.key(2)
    np.testing.assert_array_equal(f(state, k1, False), f(state, k2, False))
    np.testing.assert_array_equal(f(state, k1, True), f(state, k1, True))
    assert not np.allclose(f(state, k1, True), f(state, k2, True))


def test_patch_size_that_does_not_divide_says_which_do():
    with pytest.raises(ValueError, match=r"patch_size 5 does not divide the 32x32 image; use one of \[1, 2, 4, 8, 16, 32\]"):
        build(ViTConfig(patch_size=5), (32, 32, 3))
    with pytest.raises(ValueError, match="patch_size 3 does not divide"):
        build(MixerConfig(patch_size=3), (28, 28, 1))


def test_mixer_mixes_tokens():
    """Seed 001's bug: its 'token mixing' never mixed tokens. Here changing one patch changes every token's output."""
    model = build(TINY["mixer"], (8, 8, 1))
    x = jnp.zeros((2, 8, 8, 1)).at[1, 0, 0, 0].set(5.0)  # example 1 differs in the first patch only
    out = nnx.jit(lambda m, z: m.blocks[0](m.stem(z), train=False))(model, x)
    changed = jnp.any(jnp.abs(out[1] - out[0]) > 1e-6, axis=-1)
    assert bool(jnp.all(changed)), "a change in one patch must reach every token after one block"


@pytest.mark.parametrize("preset,params", [("vit", 811_146), ("mixer", 2_484_426), ("cnn", 1_070_794),
                                           ("mixer_small", None), ("vit_ti", None), ("vit_s", None), ("vit_b", None),
                                           ("mixer_b", None)])
def test_presets_build_on_cifar(preset, params):
    """The seed sizes give the seeds' parameter counts on CIFAR-10; the standard sizes build with patch 4."""
    cfg = compose([f"model={preset}", "model.patch_size=4"] if preset not in ("cnn",) else [f"model={preset}"]).model
    model = nnx.eval_shape(lambda: build(cfg, (32, 32, 3)))
    n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    if params:
        assert n == params
    assert n > 0


def test_every_registered_architecture_has_a_model_taking_exactly_its_config_keys_and_a_preset():
    """The registry is the one list: each schema's keys are its Model's keyword arguments (none ignored,
    none missing), and each architecture has a preset in conf/model that composes to its schema (and that
    ``models.presets()``, which scripts read without Hydra, reads as Hydra composes it)."""
    presets, read = {}, models.presets()
    assert set(read) == {f[:-5] for f in os.listdir(os.path.join(CONF, "model")) if f.endswith(".yaml")}
    for name in sorted(read):
        cfg = compose([f"model={name}"]).model
        assert type(cfg) is models.ARCHITECTURES[cfg.arch] is type(read[name])
        assert cfg.kwargs() == read[name].kwargs(), name
        presets.setdefault(cfg.arch, name)
    assert set(presets) == set(models.ARCHITECTURES)
    for arch, schema in models.ARCHITECTURES.items():
        params = inspect.signature(models.architecture(arch).network().Model.__init__).parameters
        keyword = {n for n, p in params.items() if p.kind is p.KEYWORD_ONLY} - {"dtype", "rngs"}
        assert keyword == set(schema().kwargs()), arch


@pytest.mark.fast
def test_an_architecture_is_its_module_and_its_presets_and_nothing_else_names_it():
    """Adding a model is models/<arch>.py and conf/model/<name>.yaml: the module declares its schema, network,
    FLOPs (and pretrained mapping) and the registry finds it; no file of the package outside models/ names an
    architecture in a string (the FLOPs, the loader, training, the config all ask the registry)."""
    import ast

    from vision_train import perf

    assert list(models.REGISTRY) == sorted(models.ARCHITECTURES) and len(models.REGISTRY) >= 4
    presets = {cfg.arch for cfg in models.presets().values()}
    for name, a in models.REGISTRY.items():
        module = importlib.import_module(f"vision_train.models.{name}")
        assert module.ARCHITECTURE is a and a.name == a.schema.arch == name
        assert dataclasses.is_dataclass(a.schema) and issubclass(a.schema, models.ModelConfig)
        assert getattr(models, a.schema.__name__) is a.schema  # (models.ViTConfig, ... as before)
        assert issubclass(a.network().Model, nnx.Module)
        flops = a.forward_flops(a.schema(), (32, 32, 3), 10, None)
        assert flops > 0 and perf.forward_flops(a.schema(), (32, 32, 3), 10) == flops
        assert a.weights is None or (a.weights.formats and a.weights.input_kernel), name
        assert name in presets, f"no conf/model/*.yaml preset of model.arch={name}"
    assert {f.name for a in models.REGISTRY.values() if a.weights for f in a.weights.formats} >= {
        "timm ViT", "big_vision ViT", "vision_transformer ViT", "timm Mixer", "big_vision Mixer"}

    package = os.path.dirname(os.path.dirname(models.__file__))
    named = []
    for folder, _, files in os.walk(package):
        if os.path.samefile(folder, os.path.dirname(models.__file__)) or "__pycache__" in folder:
            continue
        for f in [f for f in files if f.endswith(".py")]:
            path = os.path.join(folder, f)
            with open(path) as source:
                tree = ast.parse(source.read(), path)
            named += [f"{os.path.relpath(path, package)}:{node.lineno} {node.value!r}" for node in ast.walk(tree)
                      if isinstance(node, ast.Constant) and node.value in models.REGISTRY]
    assert not named, f"architecture names outside vision_train/models/ (ask the registry instead): {named}"


@pytest.mark.parametrize("cfg,message", [
    (ViTConfig(patch_size=5), "model.patch_size=5: does not divide the 8x8 digits images; use one of [1, 2, 4, 8]"),
    (MixerConfig(patch_size=3), "model.patch_size=3: does not divide the 8x8 digits images"),
    (CNNConfig(num_classes=5), "model.num_classes=5: digits has 10 classes; set model.num_classes=10"),
    (CNNConfig(features=[4, 4, 4, 4]), ("model=cnn='digits': the cnn halves the image 4 times, so it needs images of "
                                       "at least 16x16, got 8x8")),
])
def test_a_config_that_cannot_fit_the_data_is_one_config_error_naming_the_key(cfg, message):
    with pytest.raises(ConfigError) as e:
        nnx.eval_shape(lambda: models.build(cfg, (8, 8, 1), 10, rngs=nnx.Rngs(0), dtype=jnp.float32, data="digits"))
    assert message in str(e.value)


def test_the_checkpoint_options_change_what_the_model_computes_as_their_names_say():
    """gelu=exact is erf GELU; qkv_bias=false drops the bias; fc_norm moves the final norm after pooling (for
    the class token the same numbers: LayerNorm is per token); representation_size adds a tanh layer."""
    base = ViTConfig(patch_size=2, hidden_size=16, num_layers=1, num_heads=2, mlp_dim=32, dropout=0.0)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 1)), jnp.float32)

    def run(cfg, params=None):
        model = build(cfg, (8, 8, 1))
        graphdef, state = nnx.split(model)
        if params is not None:
            state = nnx.State.merge(state, params)
        return np.asarray(nnx.merge(graphdef, state)(x, train=False)), nnx.state(model, nnx.Param)

    y, params = run(base)
    exact, _ = run(dataclasses.replace(base, gelu="exact"), params)
    assert 0 < np.abs(exact - y).max() < 1e-2  # a small, real difference
    token_fc, _ = run(dataclasses.replace(base, fc_norm=True), params)
    np.testing.assert_allclose(token_fc, y, atol=1e-6)
    gap, gap_params = run(dataclasses.replace(base, classifier="gap"))
    gap_fc, _ = run(dataclasses.replace(base, classifier="gap", fc_norm=True), gap_params)
    assert np.abs(gap_fc - gap).max() > 1e-3
    _, no_bias = run(dataclasses.replace(base, qkv_bias=False))
    assert "bias" not in no_bias["blocks"][0]["attn"]["qkv"]
    _, rep = run(dataclasses.replace(base, representation_size=8))
    assert rep["pre_logits"]["kernel"].value.shape == (16, 8) and rep["head"]["kernel"].value.shape == (8, 10)


def test_attention_equals_the_reference_formula_and_padding_changes_nothing():
    """Attention goes through jax.nn.dot_product_attention (XLA here; cuDNN's fused kernel on a GPU in
    bfloat16, model.attention=auto). It equals softmax(q k^T / sqrt(d)) v written out, and a class-token ViT
    padded to a multiple of 8 tokens (what the fused kernel needs: 17 -> 24 here) computes the same logits as
    the unpadded one, with the same parameters."""
    import math

    from vision_train.models import vit

    assert vit.attention_implementation("auto", 64, jnp.bfloat16) == "xla"  # (no GPU here)
    attn = vit.network().Attention(16, 2, dropout=0.0, dtype=jnp.float32, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (3, 7, 16))
    mask = (jnp.arange(7) < 5)[None, None, None, :]
    q, k, v = jnp.split(attn.qkv(x).reshape(3, 7, 6, 8), 3, axis=2)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(8)
    w = jax.nn.softmax(jnp.where(mask, logits, -jnp.inf), axis=-1)
    reference = attn.out(jnp.einsum("bhqk,bkhd->bqhd", w, v).reshape(3, 7, 16))
    assert np.allclose(attn(x, mask, train=False), reference, atol=1e-5)

    kw = dict(patch_size=2, hidden_size=16, num_layers=2, num_heads=2, mlp_dim=32, classifier="token", dropout=0.0)
    plain = models.create(ViTConfig(**kw), (8, 8, 3), 10, rngs=nnx.Rngs(0))
    padded = models.create(ViTConfig(**kw, pad_tokens_to_multiple=8), (8, 8, 3), 10, rngs=nnx.Rngs(0))
    assert (plain.seq_len, padded.seq_len) == (17, 24)
    images = jax.random.normal(jax.random.key(2), (4, 8, 8, 3))
    assert np.allclose(plain(images, train=False), padded(images, train=False), atol=1e-5)


def test_fused_attention_asked_for_where_it_cannot_run_is_one_line():
    cfg = ViTConfig(patch_size=2, hidden_size=16, num_layers=1, num_heads=2, mlp_dim=32, attention="cudnn")
    with pytest.raises(ConfigError, match="model.attention=cudnn needs a GPU"):
        models.build(cfg, (8, 8, 3), 10, rngs=nnx.Rngs(0), dtype=jnp.float32)
