"""Fine-tuning: per-parameter learning rates (optimizer.lr_mults, optimizer.layer_decay), runs that start from a
pretrained file (model.init_from) and resume exactly, and predict weights= on a pretrained classifier."""

import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from vision_train import checkpoint as ckpt_lib
from vision_train import models
from vision_train.config import ConfigError, OptimizerConfig
from vision_train.records import read_rows
from vision_train.train import assembly
from vision_train.train import state as state_lib
from vision_train.fate import Fate
from vision_train.train.loop import Loop, train

from .conftest import FAST_COMPILE, REPO
from .helpers import FAST, TINY, compose

# A tiny ViT (two blocks) on scikit-learn's digits (8x8x1): 19 steps an epoch at batch 64.
VIT2 = [*TINY["vit"], "model.num_layers=2", "model.dropout=0.0", "model.stochastic_depth=0.0"]
DIGITS_VIT = [*FAST, *VIT2, "data=digits", "trainer.batch_size=64"]
HEAD_ONLY = r"+optimizer.lr_mults={head\..*:1,.*:0}"


def tiny_vit(num_layers=2):
    return models.create("vit", (8, 8, 1), 10, rngs=nnx.Rngs(0), patch_size=2, hidden_size=16, num_layers=num_layers,
                         num_heads=2, mlp_dim=32)


def initial_state(cfg, run_dir):
    """The train state a run of ``cfg`` starts from (assembled, not trained)."""
    run = assembly.assemble(cfg, run_dir, time.time(), Fate("new", run_dir))
    state = jax.device_get(run.state)
    Loop(run, []).close(0)
    return state


def records(run_dir):
    return [{k: v for k, v in r.items() if not k.startswith(("images_per_sec", "perf/"))}
            for r in read_rows(run_dir / "metrics.jsonl")]


# ------------------------------------------------------------------------------------------ lr_mults
def test_frozen_parameters_stay_bit_identical_have_no_optimizer_state_and_the_head_learns(tmp_path, caplog):
    cfg = compose([*DIGITS_VIT, "optimizer=adamw", "optimizer.lr=0.02", "optimizer.weight_decay=0.1",
                   "optimizer.grad_clip_norm=1.0", "trainer.epochs=2", HEAD_ONLY])
    start = initial_state(cfg, tmp_path / "start")
    with caplog.at_level("INFO", logger="vision_train"):
        summary = train(cfg, tmp_path / "run")
    assert "optimizer.lr_mults: 30 arrays frozen (" in caplog.text and "2 arrays at x1 (170 params)" in caplog.text
    before = state_lib.param_paths(start.params)
    after = state_lib.param_paths(ckpt_lib.load_for_inference(tmp_path / "run")["params"])
    assert set(before) == set(after)
    for path, value in after.items():
        if path.startswith("head."):
            assert not np.array_equal(np.asarray(value), np.asarray(before[path])), path
        else:  # trained for 38 steps with weight decay and clipping: not one bit moved
            np.testing.assert_array_equal(np.asarray(value), np.asarray(before[path]), err_msg=path)
    assert summary["test/acc"] > 0.3  # a linear probe on random features still learns something (chance: 0.1)

    # The optimizer state: Adam's two moments of the head, and scalars (step counts, hyper-parameters).
    arrays = {p: a for p, a in state_lib.param_paths(start.opt_state).items() if np.ndim(a)}
    assert arrays and all(p.endswith(("head.kernel", "head.bias")) for p in arrays), sorted(arrays)
    assert sum(np.size(a) for a in arrays.values()) == 2 * (16 * 10 + 10)


def test_frozen_gradients_are_left_out_of_the_clipping_norm():
    params = nnx.state(tiny_vit(), nnx.Param)
    o = OptimizerConfig(name="sgd", lr=0.1, momentum=0.0, grad_clip_norm=1.0, lr_mults={r"head\..*": 1.0, ".*": 0.0})
    tx = state_lib.make_optimizer(o, lr_shape=optax.constant_schedule(1.0), params=params)
    grads = jax.tree_util.tree_map_with_path(
        lambda kp, p: jnp.full(p.shape, 0.01 if "head" in state_lib._path(kp) else 100.0), params)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    for path, u in state_lib.param_paths(updates).items():  # the head's norm is < 1: not clipped
        np.testing.assert_allclose(np.asarray(u), -0.1 * (0.01 if path.startswith("head.") else 0.0), rtol=1e-6)


def test_without_lr_mults_the_optimizer_state_is_the_one_earlier_checkpoints_hold():
    params = nnx.state(tiny_vit(), nnx.Param)
    shape = optax.constant_schedule(1.0)
    plain = state_lib.make_optimizer(OptimizerConfig(name="adamw", grad_clip_norm=1.0), lr_shape=shape)
    ones = state_lib.make_optimizer(OptimizerConfig(name="adamw", grad_clip_norm=1.0, lr_mults={".*": 1.0}),
                                    lr_shape=shape, params=params)
    expected = optax.inject_hyperparams(lambda learning_rate, weight_decay, grad_clip_norm: optax.chain(
        optax.clip_by_global_norm(grad_clip_norm), optax.scale_by_adam(), optax.add_decayed_weights(weight_decay),
        optax.scale_by_schedule(lambda c: -learning_rate * shape(c))))(learning_rate=1e-3, weight_decay=0.0,
                                                                         grad_clip_norm=1.0)
    structure = jax.tree.structure(expected.init(params))
    assert jax.tree.structure(plain.init(params)) == structure
    assert jax.tree.structure(ones.init(params)) == structure  # multipliers all 1: no partition either


# --------------------------------------------------------------------------------------- layer_decay
@pytest.mark.parametrize("arch", ["vit", "mixer"])
def test_layer_decay_scales_each_layers_update_by_decay_to_its_depth(arch):
    if arch == "vit":
        model, embedding = tiny_vit(num_layers=3), ("embed.", "cls", "pos_embed")
    else:
        model = models.create("mixer", (8, 8, 1), 10, rngs=nnx.Rngs(0), patch_size=2, num_blocks=3, hidden_dim=8,
                              tokens_mlp_dim=8, channels_mlp_dim=16)
        embedding = ("stem.",)
    params = nnx.state(model, nnx.Param)
    lr, decay = 0.1, 0.5
    o = OptimizerConfig(name="sgd", lr=lr, momentum=0.0, layer_decay=decay)
    tx = state_lib.make_optimizer(o, lr_shape=optax.constant_schedule(1.0), params=params)
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(1), p.shape), params)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    g = state_lib.param_paths(grads)
    seen = set()
    for path, u in state_lib.param_paths(updates).items():
        if path.startswith(embedding):
            k = 4                                   # layer 0 of L = 3 blocks: decay ** (L + 1)
        elif path.startswith("blocks."):
            k = 3 - int(path.split(".")[1])         # block i is layer i + 1: decay ** (L - i)
        else:
            assert path.startswith(("head.", "norm.")), path
            k = 0                                   # the final norm and the head: the base rate
        seen.add(k)
        np.testing.assert_allclose(np.asarray(u), -lr * decay ** k * np.asarray(g[path]), rtol=1e-6, err_msg=path)
    assert seen == {0, 1, 2, 3, 4}


def test_layer_decay_and_lr_mults_multiply():
    params = nnx.state(tiny_vit(), nnx.Param)
    o = OptimizerConfig(layer_decay=0.5, lr_mults={r"blocks\.1\..*": 0.1, r"pos_embed": 0.0})
    mults = state_lib.lr_multipliers(o, params)
    assert mults["head.kernel"] == 1.0 and mults["norm.scale"] == 1.0
    assert mults["blocks.1.mlp.fc1.kernel"] == pytest.approx(0.1 * 0.5)
    assert mults["blocks.0.attn.qkv.kernel"] == 0.25 and mults["embed.proj.kernel"] == 0.125
    assert mults["pos_embed"] == 0.0


def test_weight_decay_follows_the_multiplier():
    """AdamW's decoupled decay is part of the update the multiplier scales: at x0.5 the whole step is half."""
    params = nnx.state(tiny_vit(), nnx.Param)
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(2), p.shape), params)

    def step(lr_mults):
        o = OptimizerConfig(name="adamw", lr=0.1, weight_decay=0.5, lr_mults=lr_mults)
        tx = state_lib.make_optimizer(o, lr_shape=optax.constant_schedule(1.0), params=params)
        return state_lib.param_paths(jax.jit(tx.update)(grads, tx.init(params), params)[0])

    base, half = step({}), step({r"blocks\.0\..*": 0.5})
    for path, u in half.items():
        np.testing.assert_allclose(np.asarray(u), np.asarray(base[path]) * (0.5 if path.startswith("blocks.0.") else 1),
                                   rtol=1e-6, err_msg=path)


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("override, key, fix", [
    (r"+optimizer.lr_mults={head\.\[:1}", "optimizer.lr_mults", "not a regular expression"),
    (r"+optimizer.lr_mults={head\..*:-1}", "optimizer.lr_mults['head\\\\..*']", "must be >= 0"),
    ("optimizer.layer_decay=0", "optimizer.layer_decay", "(0, 1]"),
    ("optimizer.layer_decay=1.5", "optimizer.layer_decay", "(0, 1]"),
])
def test_impossible_multipliers_are_refused_by_the_config(override, key, fix):
    with pytest.raises(ConfigError) as e:
        compose([*DIGITS_VIT, override])
    assert e.value.key == key and fix in e.value.fix


@pytest.mark.parametrize("overrides, key, says", [
    ([*VIT2, r"+optimizer.lr_mults={heads\..*:0}"], "optimizer.lr_mults", "blocks.0.attn.out.bias"),
    ([*TINY["cnn"], "optimizer.layer_decay=0.7"], "optimizer.layer_decay", "set optimizer.layer_decay=1"),
])
def test_multipliers_that_fit_no_parameter_are_one_line_before_compiling(tmp_path, overrides, key, says):
    with pytest.raises(ConfigError) as e:
        train(compose([*FAST, "data=digits", *overrides]), tmp_path / "run")
    assert e.value.key == key and says in str(e.value)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# ------------------------------------------------------------------------------------------ fine-tune
@pytest.mark.slow  # (60 s: three fine-tunes)
def test_fine_tune_from_a_timm_file_learns_and_resumes_exactly_after_a_crash(tmp_path, monkeypatch, caplog):
    """digits resampled to 16x16 (data.image_size) from a tiny timm ViT written in timm's format at 8x8 (its 2x2
    position embeddings resampled to 4x4; 5 classes: the head is re-initialised for 10), its patch embedding
    frozen, layer-wise decay on the rest; then the same run crashed after its step-10
    checkpoint and started again: it resumes (not from the file) and ends with the uninterrupted run's records."""
    module = timm_vit_file(tmp_path / "vit.safetensors", img=8, patch=4, in_chans=1, classes=5, scale=0.05)
    job = [*FAST, *TIMM_VIT, f"model.init_from={tmp_path / 'vit.safetensors'}", "data=digits", "data.image_size=16",
           "trainer.batch_size=64", "optimizer=adam", "optimizer.lr=1e-2", "optimizer.grad_clip_norm=1.0", "optimizer.layer_decay=0.75",
           r"+optimizer.lr_mults={embed\..*:0}", "trainer.epochs=6", "trainer.checkpoint_every_steps=10",
           "trainer.log_every_steps=5", "trainer.keep_checkpoints=10"]
    with caplog.at_level("INFO", logger="vision_train"):
        full = train(compose(job), tmp_path / "full")
    assert "head reset (5 -> 10 classes)" in caplog.text and "resampled" in caplog.text
    assert full["test/acc"] > 0.6, full  # chance: 0.1

    # The frozen patch embedding is the file's, bit for bit (timm's OIHW kernel as our HWIO).
    tuned = state_lib.param_paths(ckpt_lib.load_for_inference(tmp_path / "full")["params"])
    sd = {k: v.detach().numpy() for k, v in module.state_dict().items()}
    np.testing.assert_array_equal(np.asarray(tuned["embed.proj.kernel"]), sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(np.asarray(tuned["embed.proj.bias"]), sd["patch_embed.proj.bias"])
    assert not np.allclose(np.asarray(tuned["blocks.0.attn.qkv.kernel"]), sd["blocks.0.attn.qkv.weight"].T)

    after_step = Loop.after_step

    def crash_at_13(self, step):
        after_step(self, step)
        if step == 13:  # past the step-10 checkpoint
            raise RuntimeError("the machine went away")

    monkeypatch.setattr(Loop, "after_step", crash_at_13)
    with pytest.raises(RuntimeError, match="went away"):
        train(compose(job), tmp_path / "run")
    monkeypatch.setattr(Loop, "after_step", after_step)
    (tmp_path / "vit.safetensors").unlink()  # a resume reads its own checkpoint, not the file
    caplog.clear()
    with caplog.at_level("INFO", logger="vision_train"):
        resumed = train(compose(job), tmp_path / "run")
    assert "at step 10" in caplog.text and "model.init_from:" not in caplog.text
    assert records(tmp_path / "run") == records(tmp_path / "full")
    assert resumed["test/acc"] == full["test/acc"]
    a, b = (ckpt_lib.load_for_inference(tmp_path / d)["params"] for d in ("full", "run"))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ------------------------------------------------------------------------------------------ presets
@pytest.mark.parametrize("name, arch, size, lr", [("finetune_vit_b16_cifar10", "vit", 384, 0.01),
                                                  ("finetune_mixer_b16_cifar10", "mixer", 224, 0.03)])
def test_finetune_presets_follow_the_vision_transformer_recipe(name, arch, size, lr):
    cfg = compose([f"experiment={name}"])
    o, t, d = cfg.optimizer, cfg.trainer, cfg.data
    assert (cfg.model.arch, cfg.model.patch_size, d.image_size, cfg.model.init_from.startswith("hf-hub:timm/")) == \
        (arch, 16, size, True)
    assert (o.name, o.lr, o.momentum, o.nesterov, o.weight_decay, o.grad_clip_norm, o.schedule, o.min_lr) == \
        ("sgd", lr, 0.9, False, 0.0, 1.0, "cosine", 0.0)
    steps_per_epoch = (50_000 - d.val_size) // t.batch_size  # train[:98%]: 49,000 of CIFAR-10's 50,000
    assert t.batch_size == 512 and steps_per_epoch == 95
    assert round(o.warmup_epochs * steps_per_epoch) == 500                 # 500 warmup steps
    assert abs(t.epochs * steps_per_epoch - 10_000) < steps_per_epoch      # 10,000 steps
    assert list(d.mean) == list(d.std) == [0.5] * 3                        # (x - 127.5) / 127.5


# ------------------------------------------------------------------------------------------ predict weights=
def timm_vit_file(path, *, img=16, patch=4, in_chans=3, dim=16, depth=2, heads=2, classes=7, seed=0, scale=0.3):
    """A tiny timm ViT, every parameter perturbed (no output trivially uniform), saved in timm's own format."""
    from safetensors.torch import save_file

    from vision_train.data.sources import import_torchvision

    import_torchvision()  # (before timm: PyPI torchvision beside CPU torch)
    import torch
    from timm.models.vision_transformer import VisionTransformer

    module = VisionTransformer(img_size=img, patch_size=patch, in_chans=in_chans, embed_dim=dim, depth=depth,
                               num_heads=heads, num_classes=classes)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in module.parameters():
            t.add_(torch.randn(t.shape, generator=g) * scale)
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(path))
    return module.eval()


# Our config of timm's ViT above: exact GELU, qkv bias, LayerNorm eps 1e-6, class token.
TIMM_VIT = ["model=vit", "model.patch_size=4", "model.hidden_size=16", "model.num_layers=2", "model.num_heads=2",
            "model.mlp_dim=64", "model.dropout=0.0", "model.gelu=exact", "model.qkv_bias=true",
            "model.layer_norm_eps=1e-6", "model.classifier=token"]


def test_predict_with_pretrained_weights_gives_timms_classes(tmp_path):
    from PIL import Image

    from vision_train.predict import read_image

    module = timm_vit_file(tmp_path / "vit.safetensors", seed=2)
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):  # noisy colours: the model's size, and larger ones (resized to image_size)
        size = 16 if i < 4 else 40
        img = np.clip(rng.integers(0, 256, 3) + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img, "RGB").save(folder / f"{i}.png")
    Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8), "L").save(folder / "gray.png")
    names = ["cat", "dog", "owl", "eel", "ant", "bee", "yak"]
    (tmp_path / "classes.txt").write_text("\n".join(names) + "\n")

    out = tmp_path / "p.json"
    env = {**os.environ, "PYTHONPATH": REPO, "HYDRA_FULL_ERROR": "0", "XLA_FLAGS": FAST_COMPILE}
    r = subprocess.run([sys.executable, "-m", "vision_train.predict", f"weights={tmp_path / 'vit.safetensors'}",
                        *TIMM_VIT, "image_size=16", f"class_names={tmp_path / 'classes.txt'}", f"inputs={folder}",
                        "top_k=2", f"json={out}", "hardware=cpu", f"hydra.run.dir={tmp_path / 'run'}"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert r.stderr.count("note: resizing images to 16x16") == 1

    # timm's own forward on the same preprocessed images: resized as predict reads them, (x / 255 - 0.5) / 0.5.
    import torch

    files = sorted(folder.iterdir())
    x = np.stack([read_image(f, 16, 16, 3)[0] for f in files]).astype(np.float32) / 255.0
    with torch.no_grad():
        logits = module(torch.from_numpy(((x - 0.5) / 0.5).transpose(0, 3, 1, 2).copy())).numpy()
    want = np.exp(logits - logits.max(-1, keepdims=True))
    want /= want.sum(-1, keepdims=True)
    assert len(set(want.argmax(-1))) > 1  # (not one class for every image)

    result = json.loads(out.read_text())
    assert result["format"] == "timm ViT (safetensors)" and result["class_names"] == names
    assert result["mean"] == result["std"] == [0.5, 0.5, 0.5]  # (the ViT checkpoints' convention, not given)
    got = {os.path.basename(p["file"]): p for p in result["predictions"]}
    for f, w in zip(files, want):
        top = got[f.name]["top_k"]
        assert [t["class"] for t in top] == [names[j] for j in np.argsort(-w)[:2]], f.name
        assert top[0]["prob"] == pytest.approx(float(w.max()), abs=1e-4)
        line = next(x for x in r.stdout.splitlines() if x.startswith(str(f)))
        assert f"{top[0]['class']} {top[0]['prob']:.3f}" in line  # the printed table says the same


@pytest.mark.fast
def test_predict_normalises_weights_as_their_architectures_checkpoints_unless_told():
    from vision_train.predict import PredictConfig, _normalisation

    imagenet = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    assert _normalisation(PredictConfig(inputs="a.png"), "resnet", 3)[0] == imagenet
    assert _normalisation(PredictConfig(inputs="a.png"), "vit", 3)[0] == {"mean": [0.5] * 3, "std": [0.5] * 3}
    # a 1-channel file (in_chans=1): the colours' average, not an error about a key the user never set
    one = _normalisation(PredictConfig(inputs="a.png"), "resnet", 1)[0]
    assert one == {"mean": [pytest.approx(sum(imagenet["mean"]) / 3)], "std": [pytest.approx(sum(imagenet["std"]) / 3)]}
    # given keys are used as given, and the line says which came from the convention
    norm, said = _normalisation(PredictConfig(inputs="a.png", mean=[0.4, 0.4, 0.4]), "resnet", 3)
    assert norm == {"mean": [0.4] * 3, "std": imagenet["std"]} and said.startswith("std: the resnet checkpoints'")
    assert _normalisation(PredictConfig(inputs="a.png", mean=[0.1], std=[0.2]), "vit", 1)[1] == "given"


def test_predict_takes_a_checkpoint_or_weights_not_both(tmp_path):
    from vision_train.predict import PredictConfig, predict

    with pytest.raises(ConfigError, match="not both"):
        predict(PredictConfig(checkpoint=str(tmp_path), weights="vit.safetensors", inputs="a.png"), tmp_path)
    with pytest.raises(ConfigError, match="or weights=<file> model=<preset>") as e:
        predict(PredictConfig(inputs="a.png"), tmp_path)
    assert e.value.key == "checkpoint"
