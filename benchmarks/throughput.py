#!/usr/bin/env python
"""Training throughput: the full device-resident pipeline against the bare optimizer step, side by side.

For each model preset, on a CIFAR-sized synthetic data set (32x32x3 uint8, 10 classes, on the device):

  (a) pipeline   the real train step as the run assembles it (``vision_train.train.assembly``):
                 ``steps.make_train_step`` over a ``feeds.DeviceFeed``'s ``train_batch``, jitted donating
                 state and running sums, called with ``feed.train_args(step)``: gather the batch from the
                 device-resident set by permutation + step index, augment (flip + random-resized-crop, as
                 the CIFAR presets), normalise, forward/backward/update;
  (b) step alone ``steps.make_update``, the train step's own forward/backward/update, on the *same*
                 batches (the feed's ``train_batch`` with the step's key), gathered, augmented and
                 normalised once beforehand (outside the timed region) and already on the device.

Before timing, one step of (a) and one of (b) from the same initial state must give the same loss and
gradient norm, so (b) really is (a) minus the input pipeline. Each side then runs ``--steps`` timed steps per
repeat, synchronised with ``block_until_ready`` at the end of each timed loop; the repeats alternate the
order (a b | b a | a b ...) so drift and noise on a shared machine hit both sides alike, and the table
reports medians. The train step must be traced once (a warning says so otherwise). ``--time-budget`` shrinks steps, repeats and warm-up for slow models (a CPU run of the five
seed presets takes about four minutes on 2 cores). FLOPs per step come from XLA's cost analysis of the compiled
step alone; MFU divides the achieved FLOP/s by a peak (``--peak-tflops``, or ``vision_train.perf.peak_tflops``'
figure for the device kind and precision, as a run's perf/mfu; n/a on CPU unless given).

The models are the trainer's presets, ``conf/model/<name>.yaml`` (``vision_train.models.presets()``: read without
Hydra): any of them by name.

No Hydra, no W&B:  python benchmarks/throughput.py [--models mlp,cnn] [--steps 20] [--json out.json]
(``benchmarks/compare_trees.py`` runs this against another checkout's own copy, interleaved.)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from vision_train import models  # noqa: E402 (no JAX: the registry and its presets)

# The seeds' presets (the standard sizes, vit_b and the like, take minutes a step on a CPU: name them).
DEFAULT_MODELS = "mlp,cnn,mixer,mixer_small,vit"


def parse_args(argv=None):
    known = models.presets()  # (conf/model/*.yaml)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=DEFAULT_MODELS, help=f"comma-separated, from {', '.join(known)}")
    p.add_argument("--batch-size", type=int, default=128, help="global batch (split across devices)")
    p.add_argument("--steps", type=int, default=30, help="timed steps per repeat and side (at most; see --time-budget)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per side after compilation")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per side (alternating); medians reported")
    p.add_argument("--time-budget", type=float, default=30.0,
                   help="about this many seconds of timed stepping per model (all sides and repeats): slow models "
                        "get fewer steps (down to --min-steps), then fewer repeats (down to 3) and warm-up steps; "
                        "0 = exactly --steps, --repeats and --warmup")
    p.add_argument("--min-steps", type=int, default=2, help="fewest timed steps per repeat under --time-budget "
                                                             "(repeats then drop to no fewer than 3)")
    p.add_argument("--precision", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--platform", choices=("auto", "cpu", "gpu", "tpu"), default="auto")
    p.add_argument("--num-devices", type=int, default=0, help="0: all (on cpu: simulate this many)")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak TFLOP/s per device for MFU (default: "
                                                                       "vision_train.perf's for the device kind)")
    p.add_argument("--optimizer", choices=("adam", "adamw", "sgd"), default="adam")
    p.add_argument("--grad-accum-steps", type=int, default=1,
                   help="micro-batches per step, as trainer.grad_accum_steps (1: off)")
    p.add_argument("--ema-decay", type=float, default=0.0,
                   help="moving average of the parameters, as trainer.ema_decay (0: off)")
    p.add_argument("--num-examples", type=int, default=45000, help="size of the device-resident training set "
                                                                    "(45,000: CIFAR-10's train split)")
    p.add_argument("--no-augment-column", action="store_true",
                   help="also time the pipeline with augmentation off (gather + normalise only), to attribute "
                        "the pipeline's cost")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in known]
    if unknown:
        p.error(f"unknown model(s) {unknown}; choose from {', '.join(known)}")
    if args.steps < 1 or args.repeats < 1 or args.warmup < 1 or args.batch_size < 1:
        p.error("--steps, --repeats, --warmup and --batch-size must be >= 1")
    if args.grad_accum_steps < 1 or args.batch_size % args.grad_accum_steps:
        p.error(f"--grad-accum-steps must be >= 1 and divide --batch-size {args.batch_size}")
    if not 0.0 <= args.ema_decay < 1.0:
        p.error("--ema-decay must be in [0, 1)")
    return args


def flops_of(compiled) -> float:
    """'flops' from XLA's cost analysis (a dict in jax 0.10; a list of per-module dicts in older versions).
    For a partitioned (multi-device) program this is the per-device module's count."""
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else {}
    return float((ca or {}).get("flops", float("nan")))



def table(cols, rows) -> None:
    """A plain-text table: the first column left-aligned, the others right-aligned."""
    widths = [max(len(c), *(len(row[i]) for row in rows)) if rows else len(c) for i, c in enumerate(cols)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    print(line(cols))
    print(line(["-" * w for w in widths]))
    for row in rows:
        print(line(row))

def main(argv=None) -> int:
    args = parse_args(argv)
    from vision_train import parallel

    if args.platform == "cpu":
        parallel.configure_host_devices("cpu", args.num_devices)
    elif args.platform == "auto" and args.num_devices > 1:  # only affects the CPU backend, if that is the one
        flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
        os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={args.num_devices}"])

    import jax
    import flax
    import jax.numpy as jnp
    import optax

    import vision_train
    from vision_train import perf
    from vision_train.data import pipeline, sources
    from vision_train.train.feeds import DeviceFeed, Normalize

    t_run = time.perf_counter()
    devices = parallel.select_devices(args.platform, args.num_devices)
    nd = len(devices)
    parallel.check_batch_divisible(args.batch_size, nd)
    mesh = parallel.make_mesh(devices)
    replicated = parallel.replicated(mesh)
    dev = devices[0]
    peak = perf.peak_tflops(dev, args.precision, args.peak_tflops or None)  # (as a run's perf/mfu)
    peak_src = "--peak-tflops" if args.peak_tflops else ("vision_train.perf.PEAK_TFLOPS" if peak else None)

    print(f"jax {jax.__version__}, flax {flax.__version__}, optax {optax.__version__} "
          f"| backend {jax.default_backend()} | {nd} x {dev.device_kind} ({dev.platform}) "
          f"| vision_train from {Path(vision_train.__file__).parent}")
    print(f"precision {args.precision} | batch {args.batch_size} | optimizer {args.optimizer} | "
          f"grad accum {args.grad_accum_steps} | ema decay {args.ema_decay:g} | "
          f"warmup {args.warmup} | repeats {args.repeats} | steps <= {args.steps} "
          f"(time budget {args.time_budget:g}s/model) | CPU cores {os.cpu_count()}")
    print("MFU peak: " + (f"{peak:g} TFLOP/s per device ({peak_src})" if peak else
                          "unknown for this device -> MFU n/a (give --peak-tflops)"))

    # ------------------------------------------------------------------ data, as the trainer holds it
    shape, num_classes, B = (32, 32, 3), 10, args.batch_size
    if args.num_examples < B:
        raise SystemExit(f"--batch-size {B} is larger than --num-examples {args.num_examples}")
    split = sources.make_synthetic(args.num_examples, shape, num_classes, seed=0)
    mean, std = sources.STATS["cifar10"]
    scale = 1.0 / 255
    aug = pipeline.Augment(flip=True, random_resized_crop=True, crop_scale=(0.8, 1.0), crop_ratio=(0.9, 1.1))
    dtype = jnp.bfloat16 if args.precision == "bfloat16" else jnp.float32
    ds = sources.Dataset(name="synthetic", train=split, val=None, test=split,
                         class_names=tuple(str(i) for i in range(num_classes)), mean=mean, std=std, scale=scale)
    # The run's feed (assembly.assemble builds the same): the training set on every device, batches gathered
    # by the epoch's permutation inside the train step. No evaluation splits: nothing here evaluates.
    feed = DeviceFeed(ds, batch_size=B, normalize=Normalize(scale, mean, std, dtype), mesh=mesh, seed=0, aug=aug,
                      eval_splits=())
    print(f"data: synthetic {len(split.labels):,} x {'x'.join(map(str, shape))} uint8, {num_classes} classes, "
          f"device-resident; augment flip + random-resized-crop (0.8-1.0, 0.9-1.1)")

    ctx = dict(args=args, shape=shape, num_classes=num_classes, B=B, dtype=dtype, feed=feed,
               n_examples=len(split.labels), replicated=replicated, batch_sharding=parallel.batch_sharded(mesh),
               peak=peak, presets=models.presets())
    results, failed = [], []
    for name in args.models:
        try:
            results.append(bench_model(name, ctx))
        except Exception as e:  # one broken model must not hide the others' numbers
            first = (str(e).strip().splitlines() or [""])[0][:240]
            print(f"  {name}: FAILED  {type(e).__name__}: {first}", flush=True)
            failed.append({"model": name, "error": f"{type(e).__name__}: {first}"})

    # ------------------------------------------------------------------ table
    print()
    cols = ["model", "params", "batch", "steps", "img/s pipeline", "img/s step", "pipe/step", "step ms",
            "GFLOP/step", "TFLOP/s", "MFU"]
    if args.no_augment_column:
        cols.insert(6, "img/s no-aug")
    rows = []
    for r in results:
        row = [r["model"], f"{r['params']:,}", str(r["batch"]), str(r["steps"]),
               f"{r['images_per_s_pipeline']:,.0f}", f"{r['images_per_s_step']:,.0f}", f"{r['ratio']:.3f}",
               f"{r['step_ms']:.2f}", f"{r['flops_per_step_per_device'] * nd / 1e9:.3g}",
               f"{r['achieved_tflops_per_device'] * nd:.3f}",
               "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"]
        if args.no_augment_column:
            row.insert(6, f"{r['images_per_s_pipeline_no_augment']:,.0f}")
        rows.append(row)
    for f in failed:
        rows.append([f["model"], "FAILED"] + [""] * (len(cols) - 2))
    table(cols, rows)
    print()
    print("img/s: medians over repeats; steps: timed steps per repeat and side; pipe/step: pipeline img/s over "
          "step-alone img/s.")
    print("GFLOP/step, TFLOP/s: XLA cost analysis of the compiled step alone (all devices), at the step-alone "
          "rate; MFU: per device, against " + (f"{peak:g} TFLOP/s." if peak else "an unknown peak (n/a; give --peak-tflops)."))
    below = [r["model"] for r in results if r["ratio"] < 0.9]
    if below:
        print(f"pipeline below 90% of the step alone: {', '.join(below)}")
    for f in failed:
        print(f"{f['model']} FAILED: {f['error']}")
    if any(r["nan"] for r in results):
        print("note: the loss went NaN/inf in some timed run (timings still valid; values are random data)")
    total = time.perf_counter() - t_run
    print(f"total {total:.0f}s")

    if args.json:
        meta = {"jax": jax.__version__, "backend": jax.default_backend(), "device_kind": dev.device_kind,
                "num_devices": nd, "precision": args.precision, "batch_size": B, "optimizer": args.optimizer,
                "grad_accum_steps": args.grad_accum_steps, "ema_decay": args.ema_decay,
                "vision_train": str(Path(vision_train.__file__).parent),
                "warmup": args.warmup, "repeats": args.repeats, "max_steps": args.steps,
                "time_budget_s": args.time_budget, "peak_tflops_per_device": peak, "peak_source": peak_src,
                "cpu_count": os.cpu_count(), "argv": sys.argv[1:] if argv is None else list(argv),
                "total_s": total}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results, "failed": failed}, indent=2))
        print(f"wrote {args.json}")
    return 1 if failed else 0


def bench_model(name: str, ctx: dict) -> dict:
    """Compile, check, warm up and time one model: (a) the pipeline step, (b) the step alone."""
    import copy

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from vision_train import config as config_lib
    from vision_train import models
    from vision_train.data import pipeline
    from vision_train.train import state as state_lib
    from vision_train.train import steps as steps_lib

    args = ctx["args"]
    B, dtype, feed = ctx["B"], ctx["dtype"], ctx["feed"]
    replicated, batch_sharding = ctx["replicated"], ctx["batch_sharding"]
    model_cfg = ctx["presets"][name]
    t_model = time.perf_counter()
    timings = {}

    opt_cfg = config_lib.OptimizerConfig(name=args.optimizer)
    tx = state_lib.make_optimizer(opt_cfg, lr_shape=state_lib.lr_schedule(opt_cfg.schedule, 1.0, 10_000, 0, 0.0))
    model = models.create(model_cfg, ctx["shape"], ctx["num_classes"], rngs=nnx.Rngs(params=0, dropout=1),
                          dtype=dtype)
    graphdef, state0 = state_lib.create(model, tx, seed=0, ema=args.ema_decay > 0)
    del model
    n_params = state_lib.param_count(state0.params)
    common = dict(label_smoothing=opt_cfg.label_smoothing, accum_steps=args.grad_accum_steps,
                  ema_decay=args.ema_decay)

    # (a) the real step, built and jitted as assembly.assemble does, fed by the feed's train_args(step).
    pipe_step = jax.jit(steps_lib.make_train_step(graphdef, tx, feed.train_batch, **common), donate_argnums=(0, 1))
    noaug_step = None
    if args.no_augment_column:  # the same step with augmentation off: gather + normalise + step
        noaug_feed = copy.copy(feed)  # (shares the device-resident data)
        noaug_feed.aug = pipeline.Augment()
        noaug_step = jax.jit(steps_lib.make_train_step(graphdef, tx, noaug_feed.train_batch, **common),
                             donate_argnums=(0, 1))
    # (b) the same forward/backward/update with the batch handed in.
    alone_step = jax.jit(steps_lib.make_update(graphdef, tx, **common), donate_argnums=(0, 1))

    @jax.jit
    def prepare(state, feed_args):
        """What the pipeline step computes before the model: the feed's batch under the step's key."""
        k_aug, _ = jax.random.split(steps_lib.step_key(state))
        x, y = feed.train_batch(feed_args, k_aug)
        return jax.lax.with_sharding_constraint(x, batch_sharding), jax.lax.with_sharding_constraint(y, batch_sharding)

    def fresh_state():
        return jax.device_put(jax.tree.map(jnp.copy, state0), replicated)  # own buffers (they get donated)

    def fresh_sums():
        return jax.device_put(steps_lib.new_train_sums(), replicated)

    def at_step(st, step):  # every repeat sees the same batches, augmentations and dropout masks
        return st.replace(step=jax.device_put(jnp.asarray(step, jnp.int32), replicated))

    # ---- compile outside any timing (jit's call reuses these executables); FLOPs from the step alone
    traces_before = steps_lib.TRACES["train_step"]
    x0, y0 = prepare(fresh_state(), feed.train_args(0))
    t0 = time.perf_counter()
    compiled_alone = alone_step.lower(fresh_state(), fresh_sums(), x0, y0).compile()
    timings["compile_step_alone_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled_pipe = pipe_step.lower(fresh_state(), fresh_sums(), *feed.train_args(0)).compile()
    timings["compile_pipeline_s"] = time.perf_counter() - t0
    flops_step, flops_pipe = flops_of(compiled_alone), flops_of(compiled_pipe)  # per device
    if noaug_step is not None:
        noaug_step.lower(fresh_state(), fresh_sums(), *feed.train_args(0)).compile()

    # ---- equivalence (and first warm-up call of each): one step from the same state agrees
    t0 = time.perf_counter()
    sa, aa = jax.block_until_ready(pipe_step(fresh_state(), fresh_sums(), *feed.train_args(0)))
    t1 = time.perf_counter()
    sb, ab = jax.block_until_ready(alone_step(fresh_state(), fresh_sums(), x0, y0))
    est = time.perf_counter() - t1  # rough step time, to size the timed loops
    est_pipe = t1 - t0
    aa, ab = jax.device_get((aa, ab))
    check = {k: abs(float(aa[k]) - float(ab[k])) / max(abs(float(aa[k])), 1e-30) for k in ("loss", "grad_norm")}
    check["max_abs_param_diff"] = max(
        float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
        for a, b in zip(jax.tree.leaves(sa.params), jax.tree.leaves(sb.params)))
    del sa, sb
    rtol = 1e-4 if args.precision == "float32" else 3e-2
    if not (check["loss"] <= rtol and check["grad_norm"] <= rtol):
        print(f"  WARNING {name}: after one step the pipeline and the step alone differ (loss rel "
              f"{check['loss']:.1e}, grad norm rel {check['grad_norm']:.1e}): the prepared batches do not match "
              f"what the train step builds", flush=True)

    # ---- size the run: --steps timed steps x --repeats per side, fewer for slow models (--time-budget)
    sides = 3 if noaug_step is not None else 2
    steps, repeats, warmup = args.steps, args.repeats, args.warmup
    if args.time_budget > 0:
        per_step = sides * (est + est_pipe) / 2
        steps = max(min(args.min_steps, args.steps), min(args.steps, int(args.time_budget / (repeats * per_step))))
        repeats = max(min(3, args.repeats), min(repeats, int(args.time_budget / (steps * per_step))))
        warmup = min(warmup, int(0.15 * args.time_budget / per_step))  # the check's call was one already
    if steps * B > ctx["n_examples"]:
        raise ValueError(f"steps x batch = {steps * B} exceeds the {ctx['n_examples']} examples (--num-examples)")

    # ---- warm up every side (beyond the check's first call)
    runs = {"pipeline": [fresh_state(), fresh_sums()], "alone": [fresh_state(), fresh_sums()]}
    if noaug_step is not None:
        runs["noaug"] = [fresh_state(), fresh_sums()]
    for i in range(max(warmup, 1 if noaug_step is not None else 0)):
        if i >= warmup:  # only the no-augment side still needs its first call
            runs["noaug"] = list(noaug_step(*runs["noaug"], *feed.train_args(i)))
            continue
        for side, fn in (("pipeline", pipe_step), ("noaug", noaug_step)):
            if side in runs:
                runs[side] = list(fn(*runs[side], *feed.train_args(i)))
        runs["alone"] = list(alone_step(*runs["alone"], x0, y0))
    jax.block_until_ready(runs)

    # ---- (b)'s batches: exactly what (a) gathers, augments and normalises at steps 0..steps-1
    batches = [prepare(at_step(state0, i), feed.train_args(i)) for i in range(steps)]
    jax.block_until_ready(batches)

    def timed(side):
        st, sums = runs[side]
        st = jax.block_until_ready(at_step(st, 0))
        t0 = time.perf_counter()
        if side == "alone":
            for x, y in batches:
                st, sums = alone_step(st, sums, x, y)
        else:
            fn = pipe_step if side == "pipeline" else noaug_step
            for i in range(steps):  # the feed's host side each step, as the run's loop calls it
                st, sums = fn(st, sums, *feed.train_args(i))
        jax.block_until_ready((st, sums))
        dt = time.perf_counter() - t0
        runs[side] = [st, sums]
        return dt

    times = {side: [] for side in runs}
    for r in range(repeats):  # alternate the order: a b | b a | a b ...
        order = ["pipeline", "alone"] if r % 2 == 0 else ["alone", "pipeline"]
        if noaug_step is not None:
            order.insert(1, "noaug")
        for side in order:
            times[side].append(timed(side))
    traced = steps_lib.TRACES["train_step"] - traces_before
    if traced != len(runs) - 1:  # the pipeline step once (and the no-augment step once), timing included
        print(f"  WARNING {name}: the train step was traced {traced} times, not {len(runs) - 1}", flush=True)
    nan = any(int(jax.device_get(runs[s][1]["nan_step"])) >= 0 for s in runs)
    del runs, batches

    med = {k: statistics.median(v) for k, v in times.items()}
    ips = {k: steps * B / v for k, v in med.items()}
    step_s = med["alone"] / steps
    achieved = flops_step / step_s  # per device
    peak = ctx["peak"]
    res = {
        "model": name, "arch": model_cfg.arch, "model_kwargs": model_cfg.kwargs(), "params": n_params, "batch": B,
        "steps": steps, "repeats": repeats, "warmup": warmup,
        "images_per_s_pipeline": ips["pipeline"], "images_per_s_step": ips["alone"],
        "ratio": ips["pipeline"] / ips["alone"],
        "ratio_per_repeat": [a / p for p, a in zip(times["pipeline"], times["alone"])],
        "step_ms": step_s * 1e3, "pipeline_step_ms": med["pipeline"] / steps * 1e3,
        "flops_per_step_per_device": flops_step, "flops_pipeline_step_per_device": flops_pipe,
        "achieved_tflops_per_device": achieved / 1e12, "mfu": achieved / (peak * 1e12) if peak else None,
        "times_s": times, "check": check, "nan": nan, "train_step_traces": traced, **timings,
    }
    if noaug_step is not None:
        res["images_per_s_pipeline_no_augment"] = ips["noaug"]
    res["model_wall_s"] = time.perf_counter() - t_model
    print(f"  {name}: {n_params:,} params | compile {timings['compile_step_alone_s']:.0f}s + "
          f"{timings['compile_pipeline_s']:.0f}s | check: loss rel {check['loss']:.0e}, grad norm rel "
          f"{check['grad_norm']:.0e} | {steps} steps x {repeats} repeats/side | step {step_s * 1e3:.1f} ms, "
          f"pipeline/step {res['ratio']:.3f} | {res['model_wall_s']:.0f}s", flush=True)
    return res


if __name__ == "__main__":
    raise SystemExit(main())
