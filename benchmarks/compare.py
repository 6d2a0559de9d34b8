#!/usr/bin/env python
"""vision_train against PyTorch, side by side: the same architectures, the same random CIFAR-shaped data, one GPU.

For each model and batch size, four rows, each timed in a process of its own (JAX and PyTorch never share
one; a row that crashes or runs out of memory is reported in the table and the others go on):

  recipe  the seed notebooks' recipe: a torch DataLoader (PIL images, ToTensor + Normalize, --workers worker
          processes) over random uint8 32x32x3 images, each batch copied to the device (numpy -> jax) and
          fed to vision_train's jitted update (``steps.make_update``);
  step    vision_train's train step alone, data on the device: ``steps.make_train_step`` over a
          ``feeds.DeviceFeed`` (the batch gathered from the device-resident set inside jit), as a run builds it;
  loop    vision_train's whole loop: ``train.loop.train`` with a Config built here (synthetic data split
          45,000 / 5,000 / 10,000 as CIFAR-10, evaluation and a checkpoint every epoch, metrics every 50 steps,
          W&B off), timed around the call less its start-up (``time/startup_s``: imports, data, compilation,
          the first step), so every later step, evaluation, checkpoint and the final test count; an untimed
          first run fills a persistent compilation cache the timed run reads;
  torch   PyTorch's best: timm's VisionTransformer / MlpMixer (or a torch CNN as vision_train's cnn) of the
          same sizes, torch.compile, bf16 autocast (--precision bf16; TF32 matmuls in fp32), data on the
          device, fused AdamW, channels_last for the CNN.

No augmentation in any row; the optimizer is AdamW (lr 1e-3, weight decay 0.05) everywhere; one device.
Timed windows exclude compilation and warm-up and end with a device sync (``jax.block_until_ready``,
``torch.cuda.synchronize``); each row reports the median of --repeats windows. MFU uses
``vision_train.perf``: analytic training FLOPs per example (3 x forward) over the device's peak.

    python benchmarks/compare.py                                   # on a GPU: every model, batch 128 and 1024
    python benchmarks/compare.py --models vit_b4 --batch-sizes 1024 --json out.json
    python benchmarks/compare.py --smoke                           # tiny models, a few steps: seconds a row, CPU

``--smoke`` checks that every row runs (tiny models, batch 16, torch eager): its numbers are not speeds.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

ROWS = ("recipe", "step", "loop", "torch")
ROW_NAMES = {"recipe": "seeds' recipe (DataLoader)", "step": "vision_train step", "loop": "vision_train loop",
             "torch": "PyTorch best"}
SHAPE, NUM_CLASSES = (32, 32, 3), 10
MEAN, STD = (0.49139968, 0.48215841, 0.44653091), (0.24703223, 0.24348513, 0.26158784)  # CIFAR-10's
LR, WEIGHT_DECAY = 1e-3, 0.05


def models_table(smoke: bool) -> dict:
    """name -> vision_train's model config (the ``model.*`` schema): the trainer's own presets (conf/model, read by
    ``vision_train.models.presets()``) and the seed ViT at the standard widths; --smoke: tiny sizes of the same
    shapes of model."""
    from dataclasses import replace

    from vision_train import models

    presets = models.presets()
    vit = presets["vit"]
    table = {
        "vit": vit,                                                                   # seed 004: 128 wide, 6 deep, 65 tokens
        "vit_s4": replace(vit, hidden_size=384, num_layers=12, num_heads=6, mlp_dim=1536, dropout=0.0),   # ViT-S/4
        "vit_b4": replace(vit, hidden_size=768, num_layers=12, num_heads=12, mlp_dim=3072, dropout=0.0),  # ViT-B/4
        "mixer": presets["mixer"],                                                    # seed 000
        "cnn": presets["cnn"],                                                        # seed 002
    }
    if smoke:
        tiny_vit = replace(vit, patch_size=8, hidden_size=16, num_layers=1, num_heads=2, mlp_dim=32)
        table = {"vit": tiny_vit,
                 "vit_s4": replace(tiny_vit, num_layers=2, dropout=0.0),
                 "vit_b4": replace(tiny_vit, hidden_size=32, num_heads=4, mlp_dim=64, dropout=0.0),
                 "mixer": replace(table["mixer"], patch_size=8, num_blocks=1, hidden_dim=16, tokens_mlp_dim=8,
                                  channels_mlp_dim=64),
                 "cnn": replace(table["cnn"], features=[4, 8], dense_dim=16)}
    return table


def model_config(name: str, smoke: bool):
    """vision_train's model config (the ``model.*`` schema) for ``name``."""
    return models_table(smoke)[name]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="vit,vit_s4,vit_b4,mixer,cnn", help="comma-separated, from vit, vit_s4, "
                   "vit_b4, mixer, cnn")
    p.add_argument("--batch-sizes", default=None, help="comma-separated (default 128,1024; --smoke: 16)")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, from {', '.join(ROWS)}")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                   help="compute dtype of every row (parameters and optimizer state stay float32)")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds of timed stepping per row (default 10; --smoke 0.5); the loop row runs at least "
                        "two epochs")
    p.add_argument("--repeats", type=int, default=None, help="timed windows per row, median reported (default 3; "
                                                             "--smoke 1)")
    p.add_argument("--workers", type=int, default=2, help="the recipe row's DataLoader worker processes (the seeds: 2)")
    p.add_argument("--torch-compile", choices=("auto", "on", "off"), default="auto",
                   help="torch.compile the PyTorch model (auto: on, off under --smoke: compiling on a CPU takes "
                        "minutes)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak dense TFLOP/s of the device for MFU (default: vision_train.perf's table)")
    p.add_argument("--row-timeout", type=float, default=None, help="seconds before a row's process is stopped "
                                                                   "(default 1200; --smoke 300)")
    p.add_argument("--smoke", action="store_true", help="tiny models, batch 16, a few steps: checks every row runs")
    p.add_argument("--json", default=None, help="write every number here")
    # One row in this process (the parent runs itself with these):
    p.add_argument("--row", choices=ROWS, default=None, help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    known = models_table(args.smoke)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    if unknown := [m for m in args.models if m not in known]:
        p.error(f"unknown model(s) {unknown}; choose from {', '.join(known)}")
    if unknown := [r for r in args.rows if r not in ROWS]:
        p.error(f"unknown row(s) {unknown}; choose from {', '.join(ROWS)}")
    batches = args.batch_sizes or ("16" if args.smoke else "128,1024")
    try:
        args.batch_sizes = [int(b) for b in batches.split(",") if b.strip()]
    except ValueError:
        p.error(f"--batch-sizes {batches!r}: give whole numbers, e.g. 128,1024")
    if not args.batch_sizes or min(args.batch_sizes) < 1:
        p.error("--batch-sizes: give one or more batch sizes >= 1")
    args.time_budget = args.time_budget if args.time_budget is not None else (0.5 if args.smoke else 10.0)
    args.repeats = args.repeats if args.repeats is not None else (1 if args.smoke else 3)
    args.row_timeout = args.row_timeout if args.row_timeout is not None else (300.0 if args.smoke else 1200.0)
    if args.time_budget <= 0 or args.repeats < 1 or args.workers < 0:
        p.error("--time-budget must be > 0, --repeats >= 1 and --workers >= 0")
    args.compile = args.torch_compile == "on" or (args.torch_compile == "auto" and not args.smoke)
    return args


# ============================================================================================ timing
def measure(run, args) -> dict:
    """``run(n)`` takes n steps and returns their seconds, ending with a device sync. Warm-up (compilation),
    a short probe to size the windows to --time-budget, then --repeats timed windows."""
    warmup, min_steps = (1, 2) if args.smoke else (5, 10)
    t0 = time.perf_counter()
    run(warmup)
    warmup_s = time.perf_counter() - t0
    probe = 2 if args.smoke else 5
    per_step = run(probe) / probe
    steps = int(max(min_steps, min(5000, args.time_budget / args.repeats / max(per_step, 1e-6))))
    times = [run(steps) for _ in range(args.repeats)]
    step_s = statistics.median(times) / steps
    return {"images_per_s": args.batch / step_s, "step_ms": step_s * 1e3, "timed_steps": steps,
            "repeats": args.repeats, "window_s": times, "warmup_s": warmup_s}


def _jax_setup(args):
    """Device, compute dtype and the analytic FLOPs / peak for MFU (vision_train.perf)."""
    import jax
    import jax.numpy as jnp

    from vision_train import perf

    dev = jax.devices()[0]
    precision = "bfloat16" if args.precision == "bf16" else "float32"
    info = {"device": f"{dev.device_kind} ({dev.platform})", "framework": f"jax {jax.__version__}",
            "flops_per_example": perf.train_flops(model_config(args.model, args.smoke), SHAPE, NUM_CLASSES),
            "peak_tflops": perf.peak_tflops(dev, precision, args.peak_tflops)}
    return dev, (jnp.bfloat16 if args.precision == "bf16" else jnp.float32), info


def _jax_model(args, dtype):
    """vision_train's model, optimizer and train state (no Hydra), built inside one jit as a run builds them
    (``train.assembly``: NNX's eager initialisation would compile op by op)."""
    import jax
    from flax import nnx

    from vision_train import config as config_lib
    from vision_train import models
    from vision_train.train import state as state_lib

    opt = config_lib.OptimizerConfig(name="adamw", lr=LR, weight_decay=WEIGHT_DECAY)
    tx = state_lib.make_optimizer(opt, lr_shape=state_lib.lr_schedule("constant", 1.0, 1, 0, 0.0))

    def init():
        model = models.create(model_config(args.model, args.smoke), SHAPE, NUM_CLASSES,
                              rngs=nnx.Rngs(params=0, dropout=1), dtype=dtype)
        return state_lib.create(model, tx, seed=0)

    graphdef, _ = nnx.eval_shape(init)
    state = jax.jit(lambda: init()[1])()
    return graphdef, tx, state, state_lib.param_count(state.params)


def row_recipe(args) -> dict:
    """The seeds' recipe: torch DataLoader + PIL transforms feeding the jitted update, one copy per step."""
    import numpy as np
    import torch

    from vision_train.data.sources import import_torchvision

    T = import_torchvision().transforms  # (torchvision needs the CPU-torch shim first)
    n = 4 * args.batch if args.smoke else 45_000  # CIFAR-10's training split
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, *SHAPE), dtype=np.uint8)
    labels = rng.integers(0, NUM_CLASSES, n).astype(np.int64)
    loader = torch.utils.data.DataLoader(
        PILImages(images, labels, T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)])), batch_size=args.batch,
        shuffle=True, num_workers=args.workers, drop_last=True, persistent_workers=args.workers > 0)

    def batches():
        while True:
            yield from loader  # a new epoch each time round (persistent workers are reused)

    stream = batches()
    first = next(stream)  # the workers start here, before JAX's threads exist (fork after them is unsafe)

    import jax

    from vision_train.train import steps as steps_lib

    dev, dtype, info = _jax_setup(args)
    graphdef, tx, state, n_params = _jax_model(args, dtype)
    update = jax.jit(steps_lib.make_update(graphdef, tx), donate_argnums=(0, 1))
    carry = [jax.device_put(state, dev), jax.device_put(steps_lib.new_train_sums(), dev)]
    pending = [first]

    def run(k):
        t0 = time.perf_counter()
        for _ in range(k):
            x, y = pending.pop() if pending else next(stream)
            x = jax.device_put(np.asarray(x.permute(0, 2, 3, 1)), dev)  # NCHW float32 -> NHWC, host -> device
            carry[:] = update(*carry, x, jax.device_put(np.asarray(y, np.int32), dev))
        jax.block_until_ready(carry)
        return time.perf_counter() - t0

    return {**info, "params": n_params, "setup": f"{args.workers} workers, PIL ToTensor + Normalize, fp32 batch "
            f"copied each step", **measure(run, args)}


class PILImages:
    """uint8 HWC images served as PIL images through torchvision transforms, as torchvision's CIFAR10 does."""

    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def row_step(args) -> dict:
    """vision_train's jitted train step over a device-resident feed (the batch gathered inside jit)."""
    import jax
    import jax.numpy as jnp

    from vision_train import parallel
    from vision_train.data import sources
    from vision_train.train import steps as steps_lib
    from vision_train.train.feeds import DeviceFeed, Normalize

    dev, dtype, info = _jax_setup(args)
    mesh = parallel.make_mesh([dev])
    n = 4 * args.batch if args.smoke else 45_000
    split = sources.make_synthetic(n, SHAPE, NUM_CLASSES, seed=0)
    ds = sources.Dataset(name="synthetic", train=split, val=None, test=split, class_names=tuple(map(str, range(10))),
                         mean=MEAN, std=STD)
    feed = DeviceFeed(ds, batch_size=args.batch, normalize=Normalize(ds.scale, MEAN, STD, dtype), mesh=mesh,
                      eval_splits=())
    graphdef, tx, state, n_params = _jax_model(args, dtype)
    step = jax.jit(steps_lib.make_train_step(graphdef, tx, feed.train_batch), donate_argnums=(0, 1))
    replicated = parallel.replicated(mesh)
    carry = [jax.device_put(state, replicated), jax.device_put(steps_lib.new_train_sums(), replicated)]
    taken = [0]

    def run(k):
        t0 = time.perf_counter()
        for _ in range(k):
            carry[:] = step(*carry, *feed.train_args(taken[0]))
            taken[0] += 1
        jax.block_until_ready(carry)
        return time.perf_counter() - t0

    out = measure(run, args)
    if int(jax.device_get(carry[1]["nan_step"])) >= 0 or not bool(jnp.isfinite(carry[1]["loss"])):
        out["note"] = "loss went NaN/inf (random data; the timing stands)"
    return {**info, "params": n_params, "setup": f"DeviceFeed ({n:,} images on the device), gather + normalise in "
            f"jit", **out}


def row_loop(args) -> dict:
    """vision_train's whole training loop, timed around ``train`` less its start-up."""
    import math

    from vision_train import config as C
    from vision_train.train import loop

    _, _, info = _jax_setup(args)
    B = args.batch
    # As CIFAR-10: 50,000 training images (5,000 held out for validation), 10,000 test. --smoke: validation and
    # test splits of one size (one eval program to compile).
    n, val, test_fraction = (10 * B, 2 * B, 0.2) if args.smoke else (60_000, 5_000, 1 / 6)

    def config(epochs: int, cache: str):
        cfg = C.Config(
            model=model_config(args.model, args.smoke),
            data=C.DataConfig(name="synthetic", num_examples=n, test_fraction=test_fraction, val_size=val,
                              image_shape=list(SHAPE), num_classes=NUM_CLASSES, mean=list(MEAN), std=list(STD)),
            optimizer=C.OptimizerConfig(name="adamw", lr=LR, weight_decay=WEIGHT_DECAY),
            hardware=C.HardwareConfig(num_devices=1, compilation_cache=cache,
                                      precision="bfloat16" if args.precision == "bf16" else "float32"),
            trainer=C.TrainerConfig(epochs=epochs, batch_size=B, log_every_steps=50, eval_every_epochs=1,
                                    checkpoint_every_epochs=1, progress_bar=False),
            logger=C.LoggerConfig(mode="disabled", media=not args.smoke))  # (--smoke: no matplotlib figures)
        return C.to_run_config(cfg)

    with tempfile.TemporaryDirectory(prefix="compare-loop-") as tmp:
        cache = str(Path(tmp) / "jax-cache")
        epochs, warm_wall = 2, 0.0
        if not args.smoke:
            # Untimed: one epoch compiles every program (train, eval, predict) into the cache the timed run
            # reads, and sizes the timed run to --time-budget (at least two epochs).
            t0 = time.time()
            warm = loop.train(config(1, cache), Path(tmp) / "warm", started_at=t0)
            warm_wall = time.time() - t0
            per_step = max(warm_wall - warm["time/startup_s"], 1e-6) / max(warm["step"] - 1, 1)
            epochs = max(2, min(100, math.ceil(args.time_budget / (per_step * warm["step"]))))
        t0 = time.time()
        summary = loop.train(config(epochs, cache), Path(tmp) / "timed", started_at=t0)
        wall = time.time() - t0
    timed_s = wall - summary["time/startup_s"]  # every step after the first, evaluations, checkpoints, the test
    steps, steps_per_epoch = summary["step"] - 1, summary["step"] // epochs
    return {**info, "params": summary["parameters"], "images_per_s": steps * B / timed_s, "step_ms": timed_s / steps * 1e3,
            "timed_steps": steps, "repeats": 1, "window_s": [timed_s], "warmup_s": warm_wall + summary["time/startup_s"],
            "epochs": epochs, "steps_per_epoch": steps_per_epoch,
            "summary_time": {k: v for k, v in summary.items() if k.startswith("time/") or k == "wall_time_s"},
            "setup": f"train.loop.train, {epochs} epochs of {steps_per_epoch} steps, eval + checkpoint each epoch, "
                     f"log every 50 steps, W&B off{', no media, no warm-up run' if args.smoke else ''}; timed: the "
                     f"call less time/startup_s"}


# ============================================================================================ PyTorch
def torch_model(name: str, smoke: bool):
    """PyTorch's model for ``name``: timm's VisionTransformer / MlpMixer with vision_train's sizes and options
    (GELU approximation, LayerNorm eps, dropout, pooling), or ``torch_cnn``."""
    import functools

    from vision_train.data.sources import import_torchvision

    import_torchvision()  # (timm imports torchvision, which needs the CPU-torch shim first)
    from timm.models.mlp_mixer import MlpMixer
    from timm.models.vision_transformer import VisionTransformer
    from torch import nn

    cfg = model_config(name, smoke)
    arch = cfg.arch
    if arch == "cnn":
        return torch_cnn(SHAPE, NUM_CLASSES, list(cfg.features), cfg.dense_dim)
    act = functools.partial(nn.GELU, approximate="tanh" if cfg.gelu == "tanh" else "none")
    norm = functools.partial(nn.LayerNorm, eps=cfg.layer_norm_eps)
    if arch == "mixer":
        return MlpMixer(num_classes=NUM_CLASSES, img_size=SHAPE[0], in_chans=SHAPE[2], patch_size=cfg.patch_size,
                        num_blocks=cfg.num_blocks, embed_dim=cfg.hidden_dim,
                        mlp_ratio=(cfg.tokens_mlp_dim / cfg.hidden_dim, cfg.channels_mlp_dim / cfg.hidden_dim),
                        act_layer=act, norm_layer=norm)
    token = cfg.classifier == "token"
    return VisionTransformer(img_size=SHAPE[0], patch_size=cfg.patch_size, in_chans=SHAPE[2], num_classes=NUM_CLASSES,
                             global_pool="token" if token else "avg", class_token=token, fc_norm=cfg.fc_norm,
                             embed_dim=cfg.hidden_size, depth=cfg.num_layers, num_heads=cfg.num_heads,
                             mlp_ratio=cfg.mlp_dim / cfg.hidden_size, qkv_bias=cfg.qkv_bias,
                             pos_drop_rate=cfg.dropout, proj_drop_rate=cfg.dropout,
                             attn_drop_rate=cfg.attention_dropout, drop_path_rate=cfg.stochastic_depth,
                             act_layer=act, norm_layer=norm)


def torch_cnn(shape, num_classes: int, features: list[int], dense_dim: int):
    """vision_train's cnn (seed 002) in PyTorch: 3x3 conv + ReLU + 2x2 average pool per stage, dense, head."""
    from torch import nn

    h, w, c = shape
    chans = [c, *features]
    stages = [m for a, b in itertools.pairwise(chans) for m in (nn.Conv2d(a, b, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2))]
    flat = (h >> len(features)) * (w >> len(features)) * features[-1]
    return nn.Sequential(*stages, nn.Flatten(), nn.Linear(flat, dense_dim), nn.ReLU(), nn.Linear(dense_dim, num_classes))


def row_torch(args) -> dict:
    """PyTorch's best for the same architecture: compiled, bf16 autocast, fused AdamW, data on the device."""
    import torch
    from torch.nn import functional as F

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # fp32: TF32, as XLA's default
    torch.backends.cudnn.benchmark = True
    model = torch_model(args.model, args.smoke).to(device).train()
    n_params = sum(p.numel() for p in model.parameters())
    arch = model_config(args.model, args.smoke).arch
    channels_last = arch == "cnn"  # convolutions throughout: NHWC kernels
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, fused=cuda)
    forward = torch.compile(model) if args.compile else model
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.batch, SHAPE[2], *SHAPE[:2]), generator=g, dtype=torch.uint8)
    mean, std = torch.tensor(MEAN).view(1, -1, 1, 1), torch.tensor(STD).view(1, -1, 1, 1)
    x = ((images.float() / 255 - mean) / std).to(device).contiguous(memory_format=fmt)  # one fixed device batch
    y = torch.randint(0, NUM_CLASSES, (args.batch,), generator=g).to(device)
    bf16 = args.precision == "bf16"

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(forward(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def run(k):
        t0 = time.perf_counter()
        for _ in range(k):
            step()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    name = torch.cuda.get_device_name(device) + " (cuda)" if cuda else "cpu"
    what = "timm VisionTransformer" if arch == "vit" else "timm MlpMixer" if arch == "mixer" else "torch CNN"
    setup = ", ".join([what, "torch.compile" if args.compile else "eager", "bf16 autocast" if bf16 else "fp32 (TF32)",
                       "fused AdamW" if cuda else "AdamW", "fixed device batch"]
                      + (["channels_last"] if channels_last else []))
    return {"device": name, "framework": f"torch {torch.__version__}", "params": n_params, "setup": setup,
            "compiled": args.compile, **measure(run, args)}


# ============================================================================================ parent
def child_env() -> dict:
    """The rows run on one device: simulated CPU devices (a test's XLA_FLAGS) are not passed on."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join(flags)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    return env


def run_row(args, model: str, batch: int, row: str) -> dict:
    """One row in a process of its own; its failure (an exception, a kill, a timeout) becomes the row's error."""
    base = {"model": model, "batch": batch, "row": row}
    with tempfile.TemporaryDirectory(prefix="compare-row-") as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--row", row, "--model", model, "--batch", str(batch),
               "--precision", args.precision, "--time-budget", str(args.time_budget), "--repeats", str(args.repeats),
               "--workers", str(args.workers), "--torch-compile", "on" if args.compile else "off", "--result",
               str(result)] + (["--smoke"] if args.smoke else []) + (
               ["--peak-tflops", str(args.peak_tflops)] if args.peak_tflops else [])
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, check=False, env=child_env(), capture_output=True, text=True, timeout=args.row_timeout)
        except subprocess.TimeoutExpired as e:
            tail = (e.stderr or b"")[-2000:]
            return {**base, "error": f"no result after {args.row_timeout:g}s (--row-timeout)",
                    "stderr_tail": tail.decode(errors="replace") if isinstance(tail, bytes) else tail}
        wall = time.perf_counter() - t0
        if proc.returncode == 0 and result.exists():
            return {**base, **json.loads(result.read_text()), "process_s": wall}
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    if proc.returncode < 0:
        why = f"killed by signal {-proc.returncode}" + (" (out of memory?)" if proc.returncode == -9 else "")
    else:
        why = (lines[-1].strip() if lines else f"exit status {proc.returncode}")[:300]
    return {**base, "error": why, "exit_status": proc.returncode, "stderr_tail": proc.stderr[-2000:],
            "process_s": wall}


def ratios_of(rows: list[dict]) -> list[dict]:
    """Per model and batch: step / PyTorch best, loop / step, step / seeds' recipe (images/s over images/s)."""
    out = []
    keys = list(dict.fromkeys((r["model"], r["batch"]) for r in rows))
    for model, batch in keys:
        ips = {r["row"]: r.get("images_per_s") for r in rows if (r["model"], r["batch"]) == (model, batch)}
        out.append({"model": model, "batch": batch, "step_over_torch": _ratio(ips, "step", "torch"),
                    "loop_over_step": _ratio(ips, "loop", "step"), "step_over_recipe": _ratio(ips, "step", "recipe")})
    return out


def _ratio(ips: dict, a: str, b: str):
    return ips[a] / ips[b] if ips.get(a) and ips.get(b) else None


def add_mfu(rows: list[dict]) -> None:
    """MFU for every row of a model and batch from the JAX rows' analytic FLOPs and the device's peak (the
    PyTorch row runs the same architecture on the same device)."""
    for r in rows:
        same = [o for o in rows if (o["model"], o["batch"]) == (r["model"], r["batch"]) and o.get("flops_per_example")]
        flops = same[0]["flops_per_example"] if same else None
        peak = next((o["peak_tflops"] for o in same if o.get("peak_tflops")), None)
        r["mfu"] = (r["images_per_s"] * flops / (peak * 1e12)) if (r.get("images_per_s") and flops and peak) else None


def fmt(v, spec: str, none: str = "n/a") -> str:
    return none if v is None else format(v, spec)


def markdown(rows: list[dict], ratios: list[dict]) -> str:
    lines = ["| model | batch | row | images/s | step ms | MFU | device | setup |", "|---|---:|---|---:|---:|---:|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['batch']} | {ROW_NAMES[r['row']]} | FAILED | | | | {r['error']} |")
            continue
        lines.append(f"| {r['model']} | {r['batch']} | {ROW_NAMES[r['row']]} | {r['images_per_s']:,.0f} | "
                     f"{r['step_ms']:.2f} | {fmt(r['mfu'] and 100 * r['mfu'], '.1f')}{'%' if r['mfu'] else ''} | "
                     f"{r['device']} | {r['setup']} |")
    lines += ["", "| model | batch | step / PyTorch best | loop / step | step / seeds' recipe |", "|---|---:|---:|---:|---:|"]
    for q in ratios:
        lines.append(f"| {q['model']} | {q['batch']} | {fmt(q['step_over_torch'], '.2f')} | "
                     f"{fmt(q['loop_over_step'], '.2f')} | {fmt(q['step_over_recipe'], '.2f')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.row:  # one row, in its own process
        args.batch = args.batch or args.batch_sizes[0]
        fn = {"recipe": row_recipe, "step": row_step, "loop": row_loop, "torch": row_torch}[args.row]
        Path(args.result).write_text(json.dumps(fn(args)))
        return 0

    t_start = time.perf_counter()
    print(f"compare: models {','.join(args.models)} | batch {','.join(map(str, args.batch_sizes))} | {args.precision} "
          f"| {args.time_budget:g}s timed per row, {args.repeats} window(s) | torch "
          f"{'compiled' if args.compile else 'eager'}" + (" | SMOKE: tiny models, not speeds" if args.smoke else ""),
          flush=True)
    rows = []
    for model in args.models:
        for batch in args.batch_sizes:
            for row in args.rows:
                r = run_row(args, model, batch, row)
                rows.append(r)
                state = (f"FAILED: {r['error']}" if "error" in r else
                         f"{r['images_per_s']:,.0f} images/s, {r['step_ms']:.2f} ms/step")
                print(f"  {model} batch {batch} {ROW_NAMES[row]}: {state} ({r.get('process_s', 0):.0f}s)", flush=True)
    add_mfu(rows)
    ratios = ratios_of(rows)
    print()
    print(markdown(rows, ratios))
    print()
    print("images/s: median of the timed windows (compilation and warm-up excluded, each window ends with a device "
          "sync); ratios: images/s over images/s; MFU: vision_train.perf's FLOPs per example over the device's peak.")
    params = {}
    for r in rows:
        if r.get("params"):
            params.setdefault((r["model"], r["batch"]), {})[r["row"]] = r["params"]
    for (model, batch), counts in params.items():
        if len(set(counts.values())) > 1:
            print(f"note: {model}'s parameter counts differ between rows: {counts}")
    total = time.perf_counter() - t_start
    print(f"total {total:.0f}s")
    if args.json:
        meta = {"argv": sys.argv[1:] if argv is None else list(argv), "models": args.models,
                "batch_sizes": args.batch_sizes, "precision": args.precision, "time_budget_s": args.time_budget,
                "repeats": args.repeats, "workers": args.workers, "torch_compile": args.compile, "smoke": args.smoke,
                "cpu_count": os.cpu_count(), "total_s": total,
                "model_keys": {m: (cfg.arch, cfg.kwargs()) for m, cfg in models_table(args.smoke).items()
                               if m in args.models}}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows, "ratios": ratios}, indent=2))
        print(f"wrote {args.json}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
