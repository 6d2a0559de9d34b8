"""ResNets (models/resnet.py): timm's names, shapes and logits, BatchNorm's statistics (batch ones in training,
running ones in evaluation, timm's updates), stochastic depth and zero-init as timm's, FLOPs, and timm files
through model.init_from and predict weights=. timm's models are built here with pretrained=False: nothing
downloads."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import save_file

from vision_train import models, perf
from vision_train.data.sources import import_torchvision
from vision_train.errors import ConfigError
from vision_train.models import ResNetConfig, pretrained

from .conftest import FAST_COMPILE, REPO
from .helpers import FAST, compose

import_torchvision()  # (before timm: PyPI torchvision beside CPU torch)
import timm  # noqa: E402

PARAMS = {"resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032, "resnet101": 44_549_160}


def timm_resnet(name: str, *, num_classes=10, in_chans=3, size=32, seed=0, **kw) -> torch.nn.Module:
    """timm's ``name`` with every parameter moved off its initial value (the zero-initialised last BatchNorm
    scales too) and running statistics that are not trivial: one batch's, then perturbed. In eval mode."""
    module = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kw)
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g)).add_(0.05 * torch.randn(p.shape, generator=g))
        for bn in bns:  # the statistics of one batch (momentum None: a cumulative average, here of one)
            bn.reset_running_stats()
            bn.momentum = None
        module.train()(torch.randn(8, in_chans, size, size, generator=g))
        for bn in bns:
            bn.momentum = 0.1
            bn.running_mean.add_(0.1 * torch.randn(bn.running_mean.shape, generator=g) * bn.running_var.sqrt())
            bn.running_var.mul_(torch.exp(0.3 * torch.randn(bn.running_var.shape, generator=g)))
    return module.eval()


def save(module, path) -> str:
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(path))
    return str(path)


def batch(n=4, size=32, channels=3, seed=1):
    """Normalised images, NHWC for us and NCHW for timm (the same numbers)."""
    x = np.random.default_rng(seed).normal(size=(n, size, size, channels)).astype(np.float32)
    return x, torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


def loaded(cfg, path, shape, num_classes=10):
    """Our model with the file's parameters and running statistics: (graphdef, params, other)."""
    pre = pretrained.load(path, cfg, input_shape=shape, num_classes=num_classes)
    model = models.create(cfg, shape, num_classes, rngs=nnx.Rngs(0))
    graphdef, params, other = nnx.split(model, nnx.Param, ...)
    return graphdef, pretrained.merge(params, pre), pretrained.merge_stats(other, pre), pre


def stats_of(other) -> dict:
    return {k: np.asarray(v) for k, v in pretrained._flatten(nnx.split_state(other, nnx.BatchStat, ...)[0]
                                                             .to_pure_dict()).items()}


# ----------------------------------------------------------------------------------------- names, shapes
@pytest.mark.parametrize("preset", [pytest.param(p, marks=pytest.mark.fast) if p in ("resnet18", "resnet50") else p
                                    for p in PARAMS])  # (the deeper ones: ~10 s each to trace on 2 cores)
def test_presets_have_timms_names_shapes_and_parameter_counts(preset):
    """model=<preset> holds exactly what timm's model of that name holds (parameters and running statistics,
    after the mapping; num_batches_tracked is PyTorch's alone), and as many parameters."""
    with torch.device("meta"):  # (shapes only: nothing allocated)
        module = timm.create_model(preset, pretrained=False)
    sd = module.state_dict()
    mapped, arch, fmt = pretrained._to_ours({k: np.broadcast_to(np.float32(0), v.shape) for k, v in sd.items()},
                                            "torch", preset)
    cfg = compose([f"model={preset}"]).model
    want = {**pretrained.expected_params(cfg, (224, 224, 3), 1000),
            **pretrained.expected_params(cfg, (224, 224, 3), 1000, nnx.BatchStat)}
    assert {k: tuple(v.shape) for k, v in mapped.items()} == {k: tuple(v.shape) for k, v in want.items()}
    assert arch == "resnet" and fmt == "timm ResNet (torch)" and cfg.depth == int(preset[6:])
    params = pretrained.expected_params(cfg, (224, 224, 3), 1000)
    assert sum(int(np.prod(v.shape)) for v in params.values()) == PARAMS[preset] \
        == sum(p.numel() for p in module.parameters())


@pytest.mark.fast
def test_a_depth_resnets_do_not_have_is_one_line_naming_the_key():
    with pytest.raises(ConfigError, match="model.depth") as e:
        compose(["model=resnet50", "model.depth=20"])
    assert "18" in str(e.value) and "101" in str(e.value)
    with pytest.raises(ConfigError, match="model.stochastic_depth"):
        compose(["model=resnet18", "model.stochastic_depth=1.0"])


@pytest.mark.fast
def test_stochastic_depth_is_timms_drop_path_rate_and_the_last_norm_of_each_branch_starts_at_zero():
    cfg = ResNetConfig(depth=50, stochastic_depth=0.2)
    model = nnx.eval_shape(lambda: models.create(cfg, (32, 32, 3), 10, rngs=nnx.Rngs(0)))
    with torch.device("meta"):
        theirs = timm.create_model("resnet50", pretrained=False, drop_path_rate=0.2)
    want = [float(b.drop_path.drop_prob) if b.drop_path is not None else 0.0
            for stage in (theirs.layer1, theirs.layer2, theirs.layer3, theirs.layer4) for b in stage]
    assert [b.drop_path.rate for b in model.blocks] == pytest.approx(want) and want[-1] == pytest.approx(0.2)
    net = models.REGISTRY["resnet"].network()
    for zero in (True, False):
        bottleneck = net.Bottleneck(256, 64, 1, drop_path=0.0, zero_init_last=zero, dtype=jnp.float32,
                                    rngs=nnx.Rngs(0))
        assert np.all(bottleneck.bn3.scale.value == (0 if zero else 1)) and np.all(bottleneck.bn2.scale.value == 1)
    basic = net.BasicBlock(64, 64, 1, drop_path=0.0, zero_init_last=True, dtype=jnp.float32, rngs=nnx.Rngs(0))
    assert np.all(basic.bn2.scale.value == 0) and np.all(basic.bn1.scale.value == 1)
    # He-normal over fan-out (timm's kaiming_normal_(mode='fan_out')): 3x3x64 -> 64
    assert np.std(np.asarray(basic.conv1.kernel.value)) == pytest.approx(np.sqrt(2 / (3 * 3 * 64)), rel=0.05)


def test_a_resnet_starts_with_the_last_norm_of_each_residual_branch_at_zero_and_he_normal_kernels():
    make = lambda: models.create(ResNetConfig(depth=18), (32, 32, 3), 10, rngs=nnx.Rngs(0))  # noqa: E731
    graphdef, _ = nnx.split(nnx.eval_shape(make))
    model = nnx.merge(graphdef, jax.jit(lambda: nnx.split(make())[1])())  # (eagerly, op by op: 3x longer)
    assert all(np.all(b.bn2.scale.value == 0) and np.all(b.bn1.scale.value == 1) for b in model.blocks)
    assert np.std(np.asarray(model.stem.conv.kernel.value)) == pytest.approx(np.sqrt(2 / (7 * 7 * 64)), rel=0.05)
    head = np.asarray(model.head.kernel.value)  # PyTorch's nn.Linear: U(-1/sqrt(512), 1/sqrt(512))
    assert 0.9 / np.sqrt(512) < np.abs(head).max() <= 1 / np.sqrt(512)


# ------------------------------------------------------------------------------------------------ logits
@pytest.mark.parametrize("name,size,container", [("resnet18", 64, "safetensors"), ("resnet50", 64, "bin"),
                                                 ("resnet18", 37, "safetensors")])
def test_timm_resnet_files_compute_timms_logits_with_running_statistics(tmp_path, name, size, container):
    """Evaluation (train=False) normalises with the file's running statistics, as timm's eval mode; PyTorch's
    padding (an odd size, 37, strides unevenly) is matched exactly."""
    module = timm_resnet(name, size=size)
    path = tmp_path / f"{name}.{container}"
    if container == "bin":
        torch.save(module.state_dict(), path)
    else:
        save(module, path)
    cfg = ResNetConfig(depth=int(name[6:]))
    graphdef, params, other, pre = loaded(cfg, str(path), (size, size, 3))
    assert pre.info["format"] == f"timm ResNet ({'torch' if container == 'bin' else container})"
    assert pre.info["head"] == "loaded"
    np.testing.assert_array_equal(stats_of(other)["blocks.1.bn2.var"], module.layer1[1].bn2.running_var.numpy())
    x, xt = batch(size=size)
    with torch.no_grad():
        want = module(xt).numpy()
    got = np.asarray(jax.jit(lambda p, o, x: nnx.merge(graphdef, p, o)(x, train=False))(params, other, x))
    assert 1.0 < np.abs(want).max() < 1e3 and np.std(want, axis=0).mean() > 0.05  # (not trivially uniform)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_training_mode_normalises_with_the_batch_and_moves_the_running_statistics_as_timm_does(tmp_path):
    """train=True: timm's train-mode logits (the batch's statistics), and running statistics moved by momentum
    0.1 towards the batch's: the mean as timm's; the variance towards the biased one (Flax's), where PyTorch
    takes the unbiased one (n/(n-1)). The frozen model (train=False) leaves them as they were."""
    module = timm_resnet("resnet18", size=32, seed=3)
    graphdef, params, other, _ = loaded(ResNetConfig(depth=18), save(module, tmp_path / "r.safetensors"), (32, 32, 3))
    before = stats_of(other)
    x, xt = batch(n=8, size=32, seed=4)

    def forward(params, other, x, train):
        model = nnx.merge(graphdef, params, other)
        logits = model(x, train=train)
        return logits, nnx.state(model, nnx.BatchStat)

    got, stats = jax.jit(forward, static_argnums=3)(params, other, x, True)
    stats = {k: np.asarray(v) for k, v in pretrained._flatten(stats.to_pure_dict()).items()}
    old_var = module.layer2[0].bn1.running_var.clone()
    with torch.no_grad():
        want = module.train()(xt).numpy()
    module.eval()
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)
    np.testing.assert_allclose(stats["blocks.2.bn1.mean"], module.layer2[0].bn1.running_mean.numpy(), atol=1e-5)
    n = 8 * 4 * 4  # values per channel there: 8 images x 4x4 positions (32 -> 16 -> 8 in the stem, stage 2: 4)
    unbiased = module.layer2[0].bn1.running_var.numpy()
    batch_var_unbiased = (unbiased - 0.9 * old_var.numpy()) / 0.1
    biased = 0.9 * old_var.numpy() + 0.1 * batch_var_unbiased * (n - 1) / n
    np.testing.assert_allclose(stats["blocks.2.bn1.var"], biased, rtol=1e-4, atol=1e-6)
    assert not np.allclose(stats["blocks.2.bn1.var"], before["blocks.2.bn1.var"])
    _, frozen = jax.jit(forward, static_argnums=3)(params, other, x, False)
    frozen = {k: np.asarray(v) for k, v in pretrained._flatten(frozen.to_pure_dict()).items()}
    assert all(np.array_equal(frozen[k], before[k]) for k in before)


@pytest.mark.fast
def test_a_file_that_no_depth_builds_and_a_file_without_running_statistics_are_one_line(tmp_path):
    with torch.device("meta"):
        sd = timm.create_model("resnet26", pretrained=False).state_dict()  # bottleneck [2, 2, 2, 2]
    save_file({k: torch.zeros(v.shape) for k, v in sd.items()}, str(tmp_path / "r26.safetensors"))
    with pytest.raises(ConfigError, match=r"\[2, 2, 2, 2\] bottleneck blocks per stage, which no model.depth"):
        pretrained.load(str(tmp_path / "r26.safetensors"), ResNetConfig(depth=50), input_shape=(32, 32, 3),
                        num_classes=1000)
    with torch.device("meta"):
        sd = timm.create_model("resnet18", pretrained=False).state_dict()
    save_file({k: torch.zeros(v.shape) for k, v in sd.items() if "running_var" not in k},
              str(tmp_path / "r18.safetensors"))
    with pytest.raises(ConfigError, match="bn1.var missing from the file") as e:
        pretrained.load(str(tmp_path / "r18.safetensors"), ResNetConfig(depth=18), input_shape=(32, 32, 3),
                        num_classes=1000)
    assert e.value.key == "model.init_from"
    with pytest.raises(ConfigError, match="model=resnet18"):  # another architecture's preset names the fit
        pretrained.load(str(tmp_path / "r18.safetensors"), models.ViTConfig(), input_shape=(32, 32, 3),
                        num_classes=1000)


def test_describe_and_the_head_reset_of_a_resnet_file(tmp_path):
    path = save(timm_resnet("resnet18", num_classes=7, in_chans=1), tmp_path / "r.safetensors")
    info = pretrained.describe(path)
    assert info["arch"] == "resnet" and info["num_classes"] == 7 and info["in_channels"] == 1
    assert info["keys"] == {"depth": 18}
    pre = pretrained.load(path, ResNetConfig(depth=18), input_shape=(16, 16, 1), num_classes=10)
    assert pre.info["head"] == "reset (7 -> 10 classes)" and "head" not in pre.params
    assert set(pre.stats["stem"]["bn"]) == {"mean", "var"}


# ------------------------------------------------------------------------------------------------- FLOPs
@pytest.mark.fast
def test_resnet50_at_224_is_7_90_gflop_and_each_depth_counts_more():
    flops = {d: perf.forward_flops(ResNetConfig(depth=d), (224, 224, 3), 1000) for d in (18, 34, 50, 101)}
    assert flops[50] / 1e9 == pytest.approx(7.90, abs=0.01)  # (4.1 GMACs with the padding's taps)
    assert flops[18] < flops[34] < flops[50] < flops[101]
    assert perf.train_flops(ResNetConfig(depth=50), (224, 224, 3), 1000) == 3 * flops[50]


@pytest.mark.parametrize("depth,size", [(18, 32), (50, 33)])
def test_analytic_flops_agree_with_xla_cost_analysis(depth, size):
    """As tests/test_perf.py checks the other architectures: XLA counts every tap counted here and the
    elementwise work (BatchNorm, ReLU, pooling, adds) on top."""
    from .test_perf import TOLERANCE, forward_xla_flops

    cfg, shape = ResNetConfig(depth=depth), (size, size, 3)
    ratio = forward_xla_flops(cfg, shape, batch=2) / perf.forward_flops(cfg, shape, 10)
    assert TOLERANCE[0] <= ratio <= TOLERANCE[1], ratio


# ----------------------------------------------------------------------------------------------- predict
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


# resnet50: 19 s, slow (the timm logit tests here compare resnet50 files with timm in the same process)
@pytest.mark.parametrize("name", ["resnet18", pytest.param("resnet50", marks=pytest.mark.slow)])
def test_predict_with_a_timm_resnet_file_gives_timms_classes_with_imagenets_normalisation(tmp_path, name):
    """Without mean= and std=, a ResNet file is predicted with ImageNet's normalisation, as timm's ResNets were
    trained (ViT and Mixer files: 0.5 / 0.5, test_finetune)."""
    from PIL import Image

    module = timm_resnet(name, num_classes=5, size=32, seed=5)
    path = save(module, tmp_path / f"{name}.safetensors")
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        img = np.clip(rng.integers(0, 256, 3) + rng.normal(0, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img, "RGB").save(folder / f"{i}.png")
    out = tmp_path / "p.json"
    env = {**os.environ, "PYTHONPATH": REPO, "HYDRA_FULL_ERROR": "0", "XLA_FLAGS": FAST_COMPILE}
    r = subprocess.run([sys.executable, "-m", "vision_train.predict", f"weights={path}", f"model={name}",
                        "image_size=32", f"inputs={folder}", "top_k=1", f"json={out}", "hardware=cpu",
                        f"hydra.run.dir={tmp_path / 'run'}"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    files = sorted(folder.iterdir())
    x = np.stack([np.asarray(Image.open(f).convert("RGB"), np.float32) / 255 for f in files])
    x = (x - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    with torch.no_grad():
        logits = module(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    want = np.exp(logits - logits.max(-1, keepdims=True))
    want /= want.sum(-1, keepdims=True)
    result = json.loads(out.read_text())
    assert result["format"] == "timm ResNet (safetensors)" and result["model"] == "resnet"
    assert (result["mean"], result["std"]) == (IMAGENET_MEAN, IMAGENET_STD)
    got = {os.path.basename(p["file"]): p["top_k"][0] for p in result["predictions"]}
    for f, w in zip(files, want):
        assert got[f.name]["class"] == str(int(w.argmax())) and got[f.name]["prob"] == pytest.approx(w.max(), abs=1e-4)


# ------------------------------------------------------------------------------------------------- a run
# ResNet-18 on scikit-learn's digits (8x8x1: 1x1 after the stem and stage 2): 4 steps an epoch at batch 256.
RUN = [*FAST, "data=digits", "model=resnet18", "trainer.batch_size=256", "trainer.log_every_steps=2",
       "hardware.num_devices=2"]


def plain(x):
    """An array as numpy (a PRNG key as its data)."""
    return np.asarray(jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x)


@pytest.mark.slow  # (three runs of ResNet-18, ~3 min on 2 idle cores: compiling its train and eval steps)
def test_a_resnet_run_moves_its_batch_statistics_keeps_them_in_checkpoints_and_resumes_bit_exact(tmp_path):
    """Training moves the running statistics (the train state's ``other``, written back by the step); the
    checkpoint holds them; a run stopped after its first epoch and resumed ends with the parameters, running
    statistics and records of the uninterrupted run, bit for bit; evaluation (running statistics) is what
    restore_model's model computes with train=False."""
    from vision_train import checkpoint as ckpt_lib
    from vision_train.train import build
    from vision_train.train.loop import train

    from .helpers import Stopped, stop_at
    from .test_checkpoint import rows

    job = [*RUN, "trainer.epochs=2"]
    full = train(compose(job), tmp_path / "full")
    with pytest.raises(Stopped):
        train(compose(job), tmp_path / "resumed", hooks=[stop_at(4)])
    resumed = train(compose(job), tmp_path / "resumed")
    assert full["step"] == resumed["step"] == 8

    a, b = (ckpt_lib.load_for_inference(tmp_path / r) for r in ("full", "resumed"))
    for part in ("params", "other"):
        for x, y in zip(jax.tree.leaves(a[part]), jax.tree.leaves(b[part]), strict=True):
            np.testing.assert_array_equal(plain(x), plain(y))  # bit for bit
    assert rows(tmp_path / "full") == rows(tmp_path / "resumed")

    stats = {k: np.asarray(v) for k, v in pretrained._flatten(ckpt_lib.pure(a["other"])).items()
             if k.endswith((".mean", ".var"))}
    assert len(stats) == 2 * 20  # the stem's BatchNorm, 2 in each of 8 blocks, 3 in their shortcuts: mean and var each
    assert all(not np.allclose(v, 0.0 if k.endswith(".mean") else 1.0) for k, v in stats.items())  # all moved

    restored = build.restore_model(build.read_checkpoint(tmp_path / "full"))
    x = np.random.default_rng(0).normal(size=(8, 8, 8, 1)).astype(np.float32)
    model = restored.model
    got = np.asarray(model(x, train=False))
    assert np.all(np.isfinite(got))
    after = {k: np.asarray(v) for k, v in pretrained._flatten(nnx.state(model, nnx.BatchStat).to_pure_dict()).items()}
    assert all(np.array_equal(after[k], stats[k]) for k in stats)  # (evaluation moves nothing)


@pytest.mark.slow  # (a ResNet-18 run: ~3 min on 2 loaded cores)
def test_a_run_from_a_timm_resnet_file_starts_from_its_running_statistics(tmp_path):
    """model.init_from puts the file's running statistics into the train state (its ``other``) as well as its
    parameters: after step 1 each is 0.9 x the file's + 0.1 x the first batch's (the momentum), i.e. follows the
    file's, not the initial 0 and 1."""
    from vision_train.train.hooks import Hook
    from vision_train.train.loop import train

    from .helpers import Stopped

    module = timm_resnet("resnet18", in_chans=1, size=8)
    path = save(module, tmp_path / "r18.safetensors")
    file_stats = {k: v.numpy() for k, v in module.state_dict().items() if k.endswith(("running_mean", "running_var"))}
    seen = {}

    def look(step, run, results):
        seen.update(stats_of(run.state.other))
        raise Stopped("looked")

    with pytest.raises(Stopped):
        train(compose([*RUN, "trainer.epochs=1", f"model.init_from={path}"]), tmp_path / "run",
              hooks=[Hook("look", every=1, run=look)])
    pairs = [(seen["stem.bn.var"], file_stats["bn1.running_var"]),
             (seen["blocks.7.bn2.mean"], file_stats["layer4.1.bn2.running_mean"]),
             (seen["blocks.2.downsample.bn.var"], file_stats["layer2.0.downsample.1.running_var"])]
    for got, theirs in pairs:
        assert np.corrcoef(got, theirs)[0, 1] > 0.9
        assert np.abs(got - 0.9 * theirs).max() < np.abs(theirs).max()
