#!/usr/bin/env python
"""Augmentation cost: each RandAugment op and each whole policy (data/augment.py), per batch, inside jit.

For each batch shape (``--shapes``, default 256 x 32x32 and 64 x 224x224, RGB, smooth random images as float32
0..255 on the device) it times:

  op      ``augment.apply_op(name, x, 9, sign)`` for each of timm's RandAugment ops (probability 1; the
          geometric ops with the interpolation given by ``--interpolation``, default bilinear);
  policy  the whole ``augment.policy(...)`` call as a train step makes it (random draws included):
          RandAugment 'rand-m9-n2' (timm's 'random' interpolation) grouped (``--groups``, default 8) and per
          image (``groups=None``: a vmapped switch, every op computed for every image), TrivialAugmentWide and
          3-Augment likewise, colour jitter alone (0.4, 0.4, 0.4; and with hue 0.1), random erasing
          (timm's, 'pixel', on every image).

Each row: compile time (lower + compile), then ``--repeats`` timed calls after one warm-up call, each synchronised
with ``block_until_ready``; the table shows the median ms per batch and images/s. Rows stop early once
``--time-budget`` seconds of timed calls are spent (at least 3 calls).

Measured (2 CPU cores, jax 0.10.2; about 1 min for 256x32 and 2 min for 64x224), ms per batch:
                               256 x 32x32    64 x 224x224
  rand-m9-n2, groups=8             13.8            325
  rand-m9-n2, per-image select    171             2178
  trivial, groups=8 / select      4.9 / 99        360 / 2070
  3a, groups=8 / select          14.8 / 10.0      380 / 644
  colour jitter 0.4 (no hue)       3.4             238
  random erasing ('pixel', p=1)   18.9             654
  single ops: 0.3 (Invert) .. 17.7 (Equalize)     18 (Brightness) .. 329 (Equalize)
The grouped policy costs about as much as two or three average ops; the per-image select, all fifteen.

No Hydra, no W&B:  python benchmarks/augment.py [--shapes 256x32,64x224] [--only policies] [--json out.json]
On a GPU:          python benchmarks/augment.py --platform gpu --shapes 256x32,256x224
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from throughput import table  # noqa: E402 (this folder's; it imports JAX only inside its functions)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="256x32,64x224", help="comma-separated BATCHxSIZE (square RGB images)")
    p.add_argument("--only", choices=("all", "ops", "policies"), default="all")
    p.add_argument("--groups", type=int, default=8, help="the grouped policies' groups")
    p.add_argument("--interpolation", default="bilinear", help="the geometric ops' rows (policies: timm's 'random')")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per row (at most: see --time-budget)")
    p.add_argument("--time-budget", type=float, default=3.0, help="seconds of timed calls per row")
    p.add_argument("--platform", choices=("auto", "cpu", "gpu", "tpu"), default="auto")
    p.add_argument("--json", default=None, help="write every row here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.platform != "auto":
        os.environ["JAX_PLATFORMS"] = args.platform if args.platform != "gpu" else "cuda"
    import jax
    import jax.numpy as jnp
    import numpy as np

    from vision_train.data import augment

    dev = jax.devices()[0]
    print(f"jax {jax.__version__} | {dev.device_kind} ({dev.platform}) | {os.cpu_count()} CPU cores")

    def time_row(fn, *inputs):
        fn = jax.jit(fn)
        t0 = time.perf_counter()
        compiled = fn.lower(*inputs).compile()
        compile_s = time.perf_counter() - t0
        jax.block_until_ready(compiled(*inputs))  # warm-up
        times, spent = [], 0.0
        while len(times) < args.repeats and (len(times) < 3 or spent < args.time_budget):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(*inputs))
            times.append(time.perf_counter() - t0)
            spent += times[-1]
        return compile_s, statistics.median(times)

    records = []
    for shape in args.shapes.split(","):
        batch, size = (int(v) for v in shape.split("x"))
        rng = np.random.default_rng(0)
        yy, xx = np.mgrid[0:size, 0:size] / size
        base = (rng.uniform(0, 255, (batch, 1, 1, 3)) * xx[None, ..., None]
                + rng.uniform(0, 255, (batch, 1, 1, 3)) * yy[None, ..., None]) / 2
        x = jnp.asarray(np.clip(base + rng.normal(0, 10, base.shape), 0, 255).round(), jnp.float32)
        key = jax.random.key(0)
        rows = []

        def add(kind, name, fn, *inputs):
            compile_s, s = time_row(fn, *inputs)
            rec = dict(shape=shape, kind=kind, name=name, ms=s * 1e3, images_per_s=batch / s, compile_s=compile_s)
            records.append(rec)
            rows.append([f"{kind} {name}", f"{rec['ms']:.2f}", f"{rec['images_per_s']:,.0f}", f"{compile_s:.1f}"])
            print(f"  {shape} {kind} {name}: {rec['ms']:.2f} ms", file=sys.stderr, flush=True)

        if args.only in ("all", "ops"):
            hp = augment.Hparams(interpolation=args.interpolation, translate_const=0.45 * size)
            signs = jnp.where(jnp.arange(batch) % 2 == 0, 1.0, -1.0)
            for name in augment.RAND_OPS:
                add("op", name, lambda x, k, name=name: augment.apply_op(name, x, 9.0, signs, hp, k), x, key)
        if args.only in ("all", "policies"):
            g = args.groups
            for spec in ("rand-m9-n2", "trivial", "3a"):
                add("policy", f"{spec} groups={g}", augment.policy(spec, groups=g), x, key)
                add("policy", f"{spec} per-image select", augment.policy(spec, groups=None), x, key)
            add("policy", "color_jitter 0.4", lambda x, k: augment.color_jitter(x, k, 0.4, 0.4, 0.4), x, key)
            add("policy", "color_jitter 0.4 hue 0.1", lambda x, k: augment.color_jitter(x, k, 0.4, 0.4, 0.4, 0.1),
                x, key)
            add("policy", "random_erasing pixel p=1", lambda x, k: augment.random_erasing(x, k, 1.0, "pixel"), x, key)
        print(f"\n{batch} x {size}x{size}x3 on {dev.device_kind}: ms per batch (median), images/s, compile s")
        table(["", "ms/batch", "images/s", "compile s"], rows)
        print()
    print("GPU: python benchmarks/augment.py --platform gpu --shapes 256x32,256x224")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(device=dev.device_kind, platform=dev.platform, rows=records),
                                              indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
