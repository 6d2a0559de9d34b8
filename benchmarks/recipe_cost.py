#!/usr/bin/env python
"""What each augmentation of the recipes costs next to the train step it feeds (issue 19), side by side.

For each case (``--cases BATCHxSIDE``: 32 trains the cifar10_vit preset's ViT, patch 4, 192 wide, 9 layers, 10
classes; 224 trains ViT-S/16, conf/model/vit_s.yaml, 1000 classes) on one device, with uint8 images on the device
as the device-resident feed holds them:

  step          the train step after its input pipeline (``steps.make_update``: forward, backward, LAMB update;
                soft targets where the step takes them) on a normalised batch: the reference;
  each stage    alone, jitted: the batch from uint8 through the stage to normalised images (and soft targets):
                crop + flip (random-resized-crop 8-100%, flip), RandAugment (timm's rand-m9-n2-mstd0.5, grouped
                choice), TrivialAugmentWide, 3-Augment + colour jitter 0.3 (DeiT III), colour jitter 0.4 alone,
                random erasing 0.25 (pixel), mixup 0.8 + CutMix 1.0 (switch 0.5, label smoothing 0.1), and the
                repeated-augmentation order (x3: computed once an epoch; shown per step of a 50,000-image epoch);
  in the step   the same jitted step with the stage in front of it, for ``--fused`` (default: normalising only,
                mixup + CutMix, and two whole recipes: DeiT III's crop + flip + 3-Augment + jitter + mix, and
                crop + flip + RandAugment + erasing + mix as DeiT / RSB): the stage's cost where it runs.

Timed with ``block_until_ready`` over ``--steps`` calls per repeat (stages alone: 5x as many), repeats alternating
between the fused steps, medians of wall and CPU (this process's threads) seconds. On a CPU shared with other
jobs the CPU seconds are the steadier measure; on an accelerator only wall time counts. The table: ms per batch
and images/s alone, the stage's share of the step (its time over the step's, same batch), and the fused step's ms
and its ratio to the plain one. The last line says whether mixup + CutMix is within 5% of the step (fused ratio).

    python benchmarks/recipe_cost.py                            # CPU: 128 x 32x32 and 16 x 224x224 (48 min, 2 busy cores)
    python benchmarks/recipe_cost.py --cases 128x32 --steps 3   # the small case only
    python benchmarks/recipe_cost.py --platform gpu --cases 256x32,128x224 --precision bfloat16 --steps 20
No Hydra, no W&B.

Measured 2026-12-03, the first command, 2 CPU cores shared with other jobs (load average 12-18; 48 min): the step
took 12.6 s (128 x 32x32) and 19.0 s (16 x 224x224) of wall time. Alone, by CPU time, each stage is under 0.5% of
the step (mixup + CutMix 0.02% and 0.04%; RandAugment 0.09% and 0.34%; random erasing 0.15% and 0.46%), the whole
crop + RandAugment + erasing + mix chain 0.7% and 2.8%. Inside the step, mixup + CutMix gave 1.007x and 0.867x the
step's CPU time: within 5%, and within this machine's noise (single repeats 0.78-1.21). docs/speed.md has the
tables. Not yet measured on a GPU.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from throughput import table  # noqa: E402 (this folder's; it imports JAX only inside its functions)

VIT = {"dropout": 0.0, "attention_dropout": 0.0, "stochastic_depth": 0.0, "pad_tokens_to_multiple": 1,
       "gelu": "exact", "qkv_bias": True, "layer_norm_eps": 1e-6}
# image side: (name, model keys, classes), as conf/experiment/cifar10_vit.yaml and conf/model/vit_s.yaml
MODELS = {
    32: ("ViT patch 4, 192 wide, 9 layers (cifar10_vit)", {**VIT, "patch_size": 4, "hidden_size": 192,
         "num_layers": 9, "num_heads": 3, "mlp_dim": 768, "classifier": "gap"}, 10),
    224: ("ViT-S/16 (vit_s)", {**VIT, "patch_size": 16, "hidden_size": 384, "num_layers": 12, "num_heads": 6,
          "mlp_dim": 1536, "classifier": "token"}, 1000),
}
STAGES = ("normalise only", "crop + flip", "randaugment m9 n2", "trivialaugment", "3augment + jitter 0.3",
          "colour jitter 0.4", "random erasing 0.25", "mixup + cutmix", "repeated aug x3 order",
          "recipe: deit3", "recipe: randaug + erasing + mix")
FUSED = ("normalise only", "mixup + cutmix", "recipe: deit3", "recipe: randaug + erasing + mix")
MIX = "mixup + cutmix"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="128x32,16x224", help="comma-separated BATCHxSIDE; SIDE 32 or 224")
    p.add_argument("--fused", default=",".join(FUSED), help=f"stages also timed inside the step (of {STAGES})")
    p.add_argument("--precision", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--steps", type=int, default=2, help="timed steps per repeat (stages alone: 5x)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--platform", choices=("auto", "cpu", "gpu", "tpu"), default="auto")
    p.add_argument("--json", default=None, help="write every number here")
    args = p.parse_args(argv)
    args.cases = [tuple(int(v) for v in c.lower().split("x")) for c in args.cases.split(",") if c]
    args.fused = [s.strip() for s in args.fused.split(",") if s.strip()]
    for side in {s for _, s in args.cases} - set(MODELS):
        p.error(f"--cases: side {side} has no model (32 or 224)")
    for s in set(args.fused) - set(STAGES):
        p.error(f"--fused: unknown stage {s!r}")
    if "normalise only" not in args.fused:
        args.fused.insert(0, "normalise only")
    return args


def timed(fn, calls: int) -> tuple[float, float]:
    """(wall, CPU) seconds per call of ``fn(i)`` (which returns what to wait for) over ``calls`` calls."""
    import jax

    t0, c0 = time.perf_counter(), time.process_time()
    out = None
    for i in range(calls):
        out = fn(i)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / calls, (time.process_time() - c0) / calls


def stages(side: int, num_classes: int, dtype):
    """Each stage as ``prepare(images uint8, labels, key) -> (normalised images, (B, classes) targets)``."""
    import jax
    import jax.numpy as jnp

    from vision_train.data import augment, mixing, pipeline

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    crop = pipeline.Augment(flip=True, random_resized_crop=True, crop_scale=(0.08, 1.0), crop_ratio=(0.75, 4 / 3))
    rand = augment.policy("rand-m9-n2-mstd0.5")
    trivial = augment.policy("trivial")
    three = augment.policy("3a", color_jitter=0.3)
    mix_cfg = mixing.Mixing(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, prob=1.0)

    def norm(x):
        return pipeline.normalize(x, 1.0 / 255.0, mean, std, dtype)

    def targets(y):
        return mixing.smooth_one_hot(y, num_classes, 0.1)

    def mix(x, y, key):
        x, t = mixing.mix(jax.random.fold_in(key, 3), x, y, mix_cfg, num_classes, label_smoothing=0.1)
        return x, t

    def only(f):  # an image stage, then normalised
        return lambda u8, y, key: (norm(f(u8.astype(jnp.float32), key)), targets(y))

    return {
        "normalise only": lambda u8, y, key: (norm(u8), targets(y)),
        "crop + flip": only(lambda x, key: pipeline.augment(x, key, crop)),
        "randaugment m9 n2": only(lambda x, key: rand(x, jax.random.fold_in(key, 1))),
        "trivialaugment": only(lambda x, key: trivial(x, jax.random.fold_in(key, 1))),
        "3augment + jitter 0.3": only(lambda x, key: three(x, jax.random.fold_in(key, 1))),
        "colour jitter 0.4": only(lambda x, key: augment.color_jitter(x, jax.random.fold_in(key, 1), 0.4, 0.4, 0.4)),
        "random erasing 0.25": lambda u8, y, key: (
            augment.random_erasing(norm(u8), jax.random.fold_in(key, 2), 0.25, mode="pixel"), targets(y)),
        MIX: lambda u8, y, key: mix(norm(u8), y, key),
        "recipe: deit3": lambda u8, y, key: mix(norm(three(pipeline.augment(u8, key, crop),
                                                           jax.random.fold_in(key, 1))), y, key),
        "recipe: randaug + erasing + mix": lambda u8, y, key: mix(augment.random_erasing(
            norm(rand(pipeline.augment(u8, key, crop), jax.random.fold_in(key, 1))), jax.random.fold_in(key, 2),
            0.25, mode="pixel"), y, key),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.platform != "auto":
        os.environ["JAX_PLATFORMS"] = args.platform if args.platform != "gpu" else "cuda"
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from vision_train import config as config_lib
    from vision_train import models
    from vision_train.data import mixing
    from vision_train.train import state as state_lib
    from vision_train.train import steps as steps_lib

    dev = jax.devices()[0]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"jax {jax.__version__} | {dev.device_kind} ({dev.platform}) | {os.cpu_count()} CPU cores | load average "
          f"{load:.1f} | {args.precision} | {args.steps} steps x {args.repeats} repeats", flush=True)
    dtype = jnp.bfloat16 if args.precision == "bfloat16" else jnp.float32
    key0 = jax.random.key(0)
    record = {"meta": {"jax": jax.__version__, "platform": dev.platform, "device_kind": dev.device_kind,
                       "cpu_count": os.cpu_count(), "load_average": load, "args": vars(args)}, "cases": {}}
    verdicts = []
    for batch, side in args.cases:
        name, kwargs, num_classes = MODELS[side]
        rng = np.random.default_rng(0)
        yy, xx = np.mgrid[0:side, 0:side] / side
        base = (rng.uniform(0, 255, (batch, 1, 1, 3)) * xx[None, ..., None]
                + rng.uniform(0, 255, (batch, 1, 1, 3)) * yy[None, ..., None]) / 2
        u8 = jnp.asarray(np.clip(base + rng.normal(0, 10, base.shape), 0, 255).round(), jnp.uint8)
        y = jnp.asarray(rng.integers(0, num_classes, batch), jnp.int32)
        prepare = stages(side, num_classes, dtype)

        # ---------------------------------------------------------------- each stage alone
        alone = {}
        for stage, fn in prepare.items():
            f = jax.jit(fn)
            jax.block_until_ready(f(u8, y, key0))
            runs = [timed(lambda i: f(u8, y, jax.random.fold_in(key0, i)), 5 * args.steps) for _ in range(args.repeats)]
            alone[stage] = (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs))
            print(f"  {batch}x{side} alone {stage}: {1e3 * alone[stage][0]:.2f} ms", file=sys.stderr, flush=True)
        n_epoch = 50_000  # (CIFAR's: the order is computed once an epoch, n // batch steps)
        order = jax.jit(lambda epoch: mixing.repeated_order(n_epoch, 3, 0, epoch))
        jax.block_until_ready(order(0))
        runs = [timed(lambda i: order(i + 1), 3) for _ in range(args.repeats)]
        per_step = n_epoch // batch
        alone["repeated aug x3 order"] = (statistics.median(r[0] for r in runs) / per_step,
                                          statistics.median(r[1] for r in runs) / per_step)

        # ---------------------------------------------------------------- the step, plain and with stages in it
        opt = config_lib.OptimizerConfig(name="lamb", lr=4e-3, weight_decay=0.05, eps=1e-6, grad_clip_norm=1.0)
        tx = state_lib.make_optimizer(opt, lr_shape=state_lib.lr_schedule("constant", 1.0, 1000, 0, 0.0))
        model = models.create("vit", (side, side, 3), num_classes, rngs=nnx.Rngs(params=0, dropout=1), dtype=dtype,
                              **kwargs)
        graphdef, state0 = state_lib.create(model, tx, seed=0)
        del model
        n_params = state_lib.param_count(state0.params)
        update = steps_lib.make_update(graphdef, tx)
        soft = "targets" in inspect.signature(update).parameters  # (a step that trains on soft targets)

        def fused(fn):
            def step(state, sums, u8, y):
                x, t = fn(u8, y, jax.random.fold_in(steps_lib.step_key(state), 11))
                return update(state, sums, x, y, t) if soft else update(state, sums, x, y)
            return jax.jit(step, donate_argnums=(0, 1))

        print(f"{batch} x {side}x{side}: {name}, {n_params / 1e6:.1f}M parameters; compiling the steps ...",
              file=sys.stderr, flush=True)
        steps = {s: fused(prepare[s]) for s in args.fused}
        live = {}
        for s, f in steps.items():  # compile and warm up
            live[s] = jax.block_until_ready(f(jax.tree.map(jnp.copy, state0), steps_lib.new_train_sums(), u8, y))
        del state0
        times = {s: [] for s in steps}
        for r in range(args.repeats):
            for s in (list(steps) if r % 2 == 0 else list(steps)[::-1]):
                st, sums = live[s]

                def call(i):
                    nonlocal st, sums
                    st, sums = steps[s](st, sums, u8, y)
                    return st, sums

                times[s].append(timed(call, args.steps))
                live[s] = (st, sums)
        in_step = {s: (statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts))
                   for s, ts in times.items()}
        del live
        step = in_step["normalise only"]
        judge = 1 if dev.platform == "cpu" else 0  # CPU seconds on a (shared) CPU; wall time on an accelerator

        # ---------------------------------------------------------------- the table
        rows = [["train step (normalised batch in)", f"{1e3 * step[0]:.1f}", f"{batch / step[0]:,.1f}", "100%",
                 f"{1e3 * step[0]:.1f}", "1.000", "1.000"]]
        for s in STAGES:
            wall, cpu = alone[s]
            share = 100 * (cpu if judge else wall) / step[judge]
            row = [s, f"{1e3 * wall:.2f}", f"{batch / wall:,.0f}", f"{share:.2f}%"]
            if s in in_step and s != "normalise only":
                row += [f"{1e3 * in_step[s][0]:.1f}", f"{in_step[s][0] / step[0]:.3f}", f"{in_step[s][1] / step[1]:.3f}"]
            else:
                row += ["-", "-", "-"]
            rows.append(row)
        print(f"\n{batch} x {side}x{side}x3, {name}, {n_params / 1e6:.1f}M parameters, LAMB, {args.precision}, on "
              f"{dev.device_kind}: stages alone (ms per batch, images/s, share of the step by "
              f"{('wall', 'CPU')[judge]} time) and inside the step (ms, ratio to the plain step by wall | CPU time)")
        table(["stage", "ms alone", "img/s alone", "of step", "step+stage ms", "ratio wall", "ratio CPU"], rows)
        if MIX in in_step:
            ratio = in_step[MIX][judge] / step[judge]
            # each repeat's pair (timed back to back): how far the noise of this machine moves the ratio
            pairs = sorted(m[judge] / p[judge] for m, p in zip(times[MIX], times["normalise only"]))
            ok = ratio <= 1.05
            verdicts.append(f"{batch}x{side}: mixup + CutMix in the step {ratio:.3f}x the step by "
                            f"{('wall', 'CPU')[judge]} time ({'within' if ok else 'NOT within'} 5%; repeats "
                            f"{pairs[0]:.3f}..{pairs[-1]:.3f}); alone {100 * alone[MIX][judge] / step[judge]:.2f}% "
                            f"of the step")
        print(flush=True)
        record["cases"][f"{batch}x{side}"] = {"model": name, "params": n_params, "step": step, "alone": alone,
                                              "in_step": in_step, "soft_targets": soft}
    for v in verdicts:
        print(v)
    print("GPU: python benchmarks/recipe_cost.py --platform gpu --cases 256x32,128x224 --precision bfloat16 --steps 20")
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
