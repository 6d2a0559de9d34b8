#!/usr/bin/env python
"""Feeds: device-resident against streamed on the same data, for the seed ViT and CNN, in one run.

The data: N CIFAR-sized images (32x32 RGB; smooth random colour fields plus noise, 10 classes), held two ways:

  (a) png   a folder of PNG files (``<dir>/train/<class>/<i>.png``, a few in ``test/``) written with PIL, read
            through ``vision_train.data.load.load_data`` exactly as ``data=image_folder`` reads it: decoded
            once into the uint8 cache for the device-resident feed (``data.stream=false``), or ``Records``
            decoded on demand in the Grain workers for the streamed one (``data.stream=true``);
  (b) npy   raw uint8 records, the same decoded array in the same order saved as one ``.npy`` file: held in
            memory for the device-resident feed, read through ``stream.NpyImages`` (memory-mapped in each
            worker) for the streamed one.

Before timing: the PNGs decode to exactly the bytes they were written from, and step 0's streamed batch is
the same from every source and worker count (the order is a function of the seed only).

For each model (presets read from ``conf/model/{vit,cnn}.yaml``) and batch (``--batch-size``, 128):

  step alone       ``steps.make_update``: forward/backward/update on one prepared batch already on the device;
  device-resident  ``feeds.DeviceFeed``: the run's train step (``steps.make_train_step``: gather, augment,
                   normalise inside jit), called with ``feed.train_args(step)`` as the loop calls it;
  streamed         ``feeds.StreamFeed`` with 0, 1, 2 and N (``os.cpu_count()``) workers (``--workers``): the
                   same step on the batch the pipeline read, a fresh pipeline for every row.

Each row: ``--warmup`` untimed steps (compilation is done before; worker start-up falls here), block, then the
timed steps (``--time-budget`` seconds' worth from the step-alone time, between ``--min-steps`` and
``--steps``; the same count for every row of a model), blocking at the end of the timed window. Feed alone:
host batches/s of ``train_args`` with no step (the streamed pipeline read and put on the device; for the
device-resident feed, its jitted gather + augment + normalise). Decode alone: the images/s of one worker
(``stream.TrainBatches`` in this process, nothing else of the run running): what bounds the streamed feed per core.

No Hydra, no W&B:  python benchmarks/feeds.py [--images 5000] [--models vit,cnn] [--json out.json] [--smoke]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

MODELS = ("vit", "cnn")
# --smoke: each architecture's code path with few parameters (seconds to compile on a CPU).
TINY = {
    "vit": {"patch_size": 8, "hidden_size": 16, "num_layers": 1, "num_heads": 2, "mlp_dim": 32},
    "cnn": {"features": (8, 16), "dense_dim": 32},
}
SHAPE, NUM_CLASSES = (32, 32, 3), 10
MEAN, STD = (0.49139968, 0.48215841, 0.44653091), (0.24703223, 0.24348513, 0.26158784)  # CIFAR-10's


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated, from vit, cnn")
    p.add_argument("--images", type=int, default=5000, help="training images written (and a tenth more for test/)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", default="0,1,2,N", help="streamed rows' worker counts; N: os.cpu_count()")
    p.add_argument("--prefetch", type=int, default=4, help="streamed: batches read ahead (data.prefetch)")
    p.add_argument("--steps", type=int, default=200, help="timed steps per row (at most; see --time-budget)")
    p.add_argument("--min-steps", type=int, default=8, help="timed steps per row (at least)")
    p.add_argument("--time-budget", type=float, default=8.0,
                   help="about this many seconds of timed steps per row, sized from the step-alone time; "
                        "0: exactly --steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per row (worker start-up included)")
    p.add_argument("--feed-batches", type=int, default=40, help="timed batches of each feed-alone figure (at least)")
    p.add_argument("--feed-seconds", type=float, default=3.0, help="timed seconds of each feed-alone figure (at least)")
    p.add_argument("--data-dir", default=None,
                   help="the PNG folder: written there if it has no train/ yet, else reused (default: a temporary "
                        "folder, removed at the end)")
    p.add_argument("--platform", choices=("auto", "cpu", "gpu", "tpu"), default="auto")
    p.add_argument("--smoke", action="store_true",
                   help="tiny models, 320 images, batch 32, workers 0,1, a few steps per row, XLA's quickest compile: "
                        "checks the script")
    p.add_argument("--json", default=None, help="write every figure here")
    args = p.parse_args(argv)
    if args.smoke:
        args.images, args.batch_size, args.workers = 320, 32, "0,1"
        args.steps, args.min_steps, args.warmup, args.feed_batches, args.time_budget = 3, 3, 2, 4, 0.0
        args.feed_seconds = 0.0
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not args.models or any(m not in MODELS for m in args.models):
        p.error(f"--models: choose from {', '.join(MODELS)}")
    try:
        counts = [os.cpu_count() if w.strip().upper() == "N" else int(w) for w in args.workers.split(",")]
    except ValueError:
        p.error(f"--workers {args.workers!r}: comma-separated counts or N, e.g. 0,1,2,N")
    args.worker_counts = sorted(set(counts))
    if min(args.worker_counts) < 0:
        p.error("--workers: counts must be >= 0")
    if min(args.batch_size, args.steps, args.min_steps, args.warmup, args.feed_batches, args.prefetch) < 1:
        p.error("--batch-size, --steps, --min-steps, --warmup, --feed-batches and --prefetch must be >= 1")
    if args.images < 2 * args.batch_size:
        p.error(f"--images must be at least two batches ({2 * args.batch_size})")
    return args


def preset(name: str, smoke: bool) -> dict:
    """The model's keys as ``conf/model/<name>.yaml`` sets them (tiny ones with --smoke)."""
    import yaml

    if smoke:
        return dict(TINY[name])
    keys = yaml.safe_load((REPO / "conf" / "model" / f"{name}.yaml").read_text())
    keys.pop("defaults", None)
    return {k: tuple(v) if isinstance(v, list) else v for k, v in keys.items()}


# ---------------------------------------------------------------------------------------------- data
def make_images(n: int, seed: int = 0):
    """``n`` smooth random 32x32 RGB images (an 8x8 colour field resized bilinearly, plus noise: PNGs of
    about CIFAR's size) and labels."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    noise = rng.normal(0, 6, (n, *SHAPE))
    smooth = np.stack([np.asarray(Image.fromarray(a).resize(SHAPE[:2], Image.Resampling.BILINEAR)) for a in low])
    images = np.clip(smooth + noise, 0, 255).astype(np.uint8)
    return images, rng.integers(0, NUM_CLASSES, n).astype(np.int32)


def write_pngs(root: Path, n_train: int, n_test: int) -> dict:
    """The PNG folder, written with PIL: ``{path: image}`` of what was written, to check the decode against."""
    from PIL import Image

    images, labels = make_images(n_train + n_test)
    written = {}
    for i, (a, y) in enumerate(zip(images, labels)):
        d = root / ("train" if i < n_train else "test") / f"class_{y}"
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"{i:06d}.png"
        Image.fromarray(a).save(path)
        written[str(path.resolve())] = a
    return written


def data_config(root: Path, **keys):
    """``data=image_folder data.root=<root> data.image_size=32`` with CIFAR-10's statistics given (so opening
    the set computes none) and the preset's CIFAR augmentation."""
    from vision_train import config as config_lib

    return config_lib.DataConfig(kind="image_folder", name="pngs", root=str(root), image_size=SHAPE[0],
                                 channels=SHAPE[2], mean=list(MEAN), std=list(STD), **keys)


def open_sources(root: Path, npy: Path, written: dict) -> dict:
    """{source: (device-resident Dataset, streamed Dataset)} for png and npy, through the trainer's own
    load_data; the .npy file holds the decoded train split in the Records' order."""
    import numpy as np

    from vision_train.data import files, sources
    from vision_train.data import stream as host
    from vision_train.data.load import load_data

    t0 = time.perf_counter()
    cached, cached_streams = load_data(data_config(root, stream="false"))
    decode_s = time.perf_counter() - t0
    lazy, lazy_streams = load_data(data_config(root, stream="true"))
    if cached_streams or not lazy_streams or not isinstance(lazy.train.images, host.LazyImages):
        raise SystemExit("load_data did not give the cached and the streamed path this benchmark compares")
    records: files.Records = lazy.train.images.records
    train = np.asarray(cached.train.images)
    if written:  # PNG is lossless: the cache the device-resident feed holds is what was written
        expected = np.stack([written[p] for p in records.paths])
        if not np.array_equal(train, expected):
            raise SystemExit("the decoded PNGs differ from the images written: the comparison would be unfair")
    np.save(npy, train)
    npy_split = sources.Split(host.NpyImages(npy), cached.train.labels)
    in_memory = sources.Split(np.load(npy), cached.train.labels)
    npy_ds = [sources.Dataset("npy", split, None, cached.test, cached.class_names, cached.mean, cached.std,
                              cached.scale) for split in (in_memory, npy_split)]
    return {"png": (cached, lazy), "npy": tuple(npy_ds),
            "_meta": {"decode_into_cache_s": decode_s, "train_images": len(train)}}


def decode_alone(images, labels, batch_size: int, seconds: float, min_batches: int) -> dict:
    """One worker's work (``stream.TrainBatches``: the step's rows read, decoded, gathered) in this process:
    images/s on one core."""
    from vision_train.data import stream as host

    batches = host.TrainBatches(images, labels, seed=0, batch_size=batch_size,
                                steps_per_epoch=len(labels) // batch_size, rows=(0, batch_size))
    batches(0)  # (the epoch's order, the first file reads)
    t0, n = time.perf_counter(), 0
    while n < min_batches or time.perf_counter() - t0 < seconds:
        batches(1 + n)
        n += 1
    dt = time.perf_counter() - t0
    return {"batches": n, "s": dt, "images_per_s": n * batch_size / dt}


# ---------------------------------------------------------------------------------------------- timing
def main(argv=None) -> int:
    args = parse_args(argv)
    from vision_train.host_devices import configure_host_devices

    if args.platform == "cpu":  # (before JAX starts)
        configure_host_devices("cpu", 1)
    if args.smoke:  # checks the script, not its speed: XLA's quickest compile (as the tests compile, conftest.py)
        fast_compile = ["--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false"]
        os.environ["XLA_FLAGS"] = " ".join([*os.environ.get("XLA_FLAGS", "").split(), *fast_compile])

    import flax
    import jax
    import numpy as np

    import vision_train
    from vision_train import parallel
    from vision_train.train import feeds

    t_run = time.perf_counter()
    load_start = os.getloadavg()
    devices = parallel.select_devices(args.platform, 0)
    parallel.check_batch_divisible(args.batch_size, len(devices))
    mesh = parallel.make_mesh(devices)
    dev = devices[0]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"jax {jax.__version__}, flax {flax.__version__} | {len(devices)} x {dev.device_kind} ({dev.platform}) | "
          f"{cores} CPU cores | load average {load_start[0]:.1f} | vision_train from "
          f"{Path(vision_train.__file__).parent}")
    print(f"batch {args.batch_size} | workers {','.join(map(str, args.worker_counts))} | prefetch {args.prefetch} "
          f"| warmup {args.warmup} | steps {args.min_steps}-{args.steps} (time budget {args.time_budget:g} s/row)"
          f"{' | SMOKE' if args.smoke else ''}", flush=True)

    with tempfile.TemporaryDirectory(prefix="feeds-bench-") as tmp:
        # ------------------------------------------------------------------ data
        root = Path(args.data_dir).expanduser().absolute() if args.data_dir else Path(tmp) / "pngs"
        written = {}
        t0 = time.perf_counter()
        if not (root / "train").is_dir():
            written = write_pngs(root, args.images, max(NUM_CLASSES, args.images // 10))
            print(f"wrote {len(written):,} PNGs under {root} ({time.perf_counter() - t0:.1f} s)", flush=True)
        png_bytes = [p.stat().st_size for p in (root / "train").rglob("*.png")]
        src = open_sources(root, Path(tmp) / "train.npy", written)
        meta_data = src.pop("_meta")
        n = meta_data["train_images"]
        print(f"data: {n:,} x {'x'.join(map(str, SHAPE))} train images, PNGs {np.mean(png_bytes) / 1e3:.1f} kB on "
              f"average; decoded into the cache in {meta_data['decode_into_cache_s']:.1f} s; the decode "
              f"{'equals the images written' if written else 'not checked (--data-dir reused)'}", flush=True)

        # ------------------------------------------------------------------ decode alone, one core
        decode = {}
        for name, (_, streamed_ds) in src.items():
            decode[name] = decode_alone(streamed_ds.train.images, streamed_ds.train.labels, args.batch_size,
                                        seconds=0.5 if args.smoke else 3.0, min_batches=2)
            print(f"decode alone ({name}, one worker's work in this process): "
                  f"{decode[name]['images_per_s']:,.0f} images/s", flush=True)

        # ------------------------------------------------------------------ the feeds
        from vision_train.data import pipeline

        aug = pipeline.Augment(flip=True, random_resized_crop=True, crop_scale=(0.8, 1.0), crop_ratio=(0.9, 1.1))
        common = {"batch_size": args.batch_size, "normalize": feeds.Normalize(1 / 255, MEAN, STD), "mesh": mesh,
                  "seed": 0, "aug": aug, "eval_splits": ()}
        device_feeds = {name: feeds.DeviceFeed(ds, **common) for name, (ds, _) in src.items()}
        stream_feeds = {(name, w): feeds.StreamFeed(ds, workers=w, prefetch=args.prefetch, **common)
                        for name, (_, ds) in src.items() for w in args.worker_counts}  # (no worker starts yet)
        feed_alone, first = {}, {}
        for name, feed in device_feeds.items():
            feed_alone[(name, "device")] = time_device_feed(feed, args)
        for key, feed in stream_feeds.items():
            feed_alone[key], first[key] = time_stream_feed(feed, args)
        if len(set(first.values())) != 1:  # the order is the seed's: every source and worker count reads the same
            raise SystemExit(f"step 0's streamed batch differs between sources or worker counts: {first}")
        for key, r in feed_alone.items():
            print(f"feed alone {key[0]} {key[1] if key[1] == 'device' else f'{key[1]} workers'}: "
                  f"{r['batches_per_s']:,.1f} batches/s", flush=True)

        # ------------------------------------------------------------------ per model
        rows, failed = [], []
        for model in args.models:
            try:
                rows += bench_model(model, args, mesh, device_feeds, stream_feeds, feed_alone, decode, cores)
            except Exception as e:  # noqa: BLE001 (one broken model must not hide the other's numbers)
                first = (str(e).strip().splitlines() or [""])[0][:240]
                print(f"  {model}: FAILED  {type(e).__name__}: {first}", flush=True)
                failed.append({"model": model, "error": f"{type(e).__name__}: {first}"})
        for feed in stream_feeds.values():
            feed.close()

    # ---------------------------------------------------------------------- report
    load_end = os.getloadavg()
    total = time.perf_counter() - t_run
    print()
    print(table(rows))
    print()
    print(f"{dev.device_kind} ({dev.platform}), {cores} CPU cores, batch {args.batch_size}, {n:,} images. img/s: the "
          f"whole step (feed + train step), timed steps / time to the last step's end; vs dev: over the same model "
          f"and data's device-resident row; vs step: over the step alone (one batch already on the device); feed "
          f"batch/s: the feed with no step (streamed: read + put on the device; device-resident: its jitted gather + "
          f"augment + normalise); CPU est.: the bound the workers' decode sets (on a CPU device, sharing the cores "
          f"with the step; benchmarks/README.md).")
    print("decode alone, images/s of one worker on one core: "
          + ", ".join(f"{k} {v['images_per_s']:,.0f}" for k, v in decode.items()))
    print(f"load average {load_start[0]:.1f} at the start, {load_end[0]:.1f} at the end | total {total:.0f} s")
    for f in failed:
        print(f"{f['model']} FAILED: {f['error']}")
    if args.json:
        meta = {"jax": jax.__version__, "backend": jax.default_backend(), "device_kind": dev.device_kind,
                "num_devices": len(devices), "cpu_cores": cores, "batch_size": args.batch_size, "images": n,
                "png_kb_mean": float(np.mean(png_bytes) / 1e3), "workers": args.worker_counts,
                "prefetch": args.prefetch, "warmup": args.warmup, "smoke": args.smoke,
                "load_average_start": load_start, "load_average_end": load_end, "total_s": total,
                "argv": sys.argv[1:] if argv is None else list(argv), **meta_data}
        out = {"meta": meta, "decode_alone": decode,
               "feed_alone": [{"data": k[0], "feed": "device" if k[1] == "device" else "streamed",
                               "workers": None if k[1] == "device" else k[1], **v} for k, v in feed_alone.items()],
               "rows": rows, "failed": failed}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}")
    return 1 if failed else 0


def time_device_feed(feed, args) -> dict:
    """The device-resident feed alone: its jitted gather + augment + normalise, per batch."""
    import jax

    batch = jax.jit(feed.train_batch)
    keys = jax.block_until_ready(list(jax.random.split(jax.random.key(0), args.feed_batches)))
    jax.block_until_ready(batch(feed.train_args(0), keys[0]))  # (compiles)
    for i in range(args.warmup):
        batch(feed.train_args(i), keys[i % len(keys)])
    jax.block_until_ready(batch(feed.train_args(0), keys[0]))
    t0, n = time.perf_counter(), 0
    while n < args.feed_batches or time.perf_counter() - t0 < args.feed_seconds:  # (rounds of feed_batches)
        jax.block_until_ready([batch(feed.train_args(n + i), keys[i]) for i in range(args.feed_batches)])
        n += args.feed_batches
    dt = time.perf_counter() - t0
    return {"batches": n, "s": dt, "batches_per_s": n / dt}


def time_stream_feed(feed, args) -> dict:
    """The streamed feed alone: a fresh pipeline's batches read and put on the device, with no step. Also the
    digest of step 0's images (every source and worker count must read the same batch)."""
    import jax
    import numpy as np

    feed.close()
    images, _ = jax.block_until_ready(feed.train_args(0))
    digest = hashlib.sha256(np.ascontiguousarray(np.asarray(images)).tobytes()).hexdigest()[:16]
    for i in range(1, args.warmup):  # (worker start-up)
        jax.block_until_ready(feed.train_args(i))
    t0, n = time.perf_counter(), 0
    while n < args.feed_batches or time.perf_counter() - t0 < args.feed_seconds:
        jax.block_until_ready(feed.train_args(args.warmup + n))
        n += 1
    dt = time.perf_counter() - t0
    feed.close()
    return {"batches": n, "s": dt, "batches_per_s": n / dt}, digest


def bench_model(name, args, mesh, device_feeds, stream_feeds, feed_alone, decode, cores) -> list[dict]:
    """Step alone, then every feed's whole step, for one model: one row each."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from vision_train import config as config_lib
    from vision_train import models, parallel
    from vision_train.train import state as state_lib
    from vision_train.train import steps as steps_lib

    t_model = time.perf_counter()
    shared_cpu = mesh.devices.flat[0].platform == "cpu"
    replicated, batch_sharding = parallel.replicated(mesh), parallel.batch_sharded(mesh)
    kwargs = preset(name, args.smoke)
    opt_cfg = config_lib.OptimizerConfig(name="adam")
    tx = state_lib.make_optimizer(opt_cfg, lr_shape=state_lib.lr_schedule(opt_cfg.schedule, 1.0, 10_000, 0, 0.0))
    model = models.create(name, SHAPE, NUM_CLASSES, rngs=nnx.Rngs(params=0, dropout=1), **kwargs)
    graphdef, state0 = state_lib.create(model, tx, seed=0, ema=False)
    del model
    n_params = state_lib.param_count(state0.params)

    # One jitted step per feed kind, built from one feed of that kind: every DeviceFeed (StreamFeed) here has
    # the same batch, augmentation and shardings, so the others' train_args run the same program (no retrace).
    dev0, stream0 = next(iter(device_feeds.values())), next(iter(stream_feeds.values()))
    dev_step = jax.jit(steps_lib.make_train_step(graphdef, tx, dev0.train_batch), donate_argnums=(0, 1))
    stream_step = jax.jit(steps_lib.make_train_step(graphdef, tx, stream0.train_batch), donate_argnums=(0, 1))
    alone_step = jax.jit(steps_lib.make_update(graphdef, tx), donate_argnums=(0, 1))

    def fresh():  # own buffers: the steps donate them
        return (jax.device_put(jax.tree.map(jnp.copy, state0), replicated),
                jax.device_put(steps_lib.new_train_sums(), replicated))

    # ---- compile all three outside any timing; the step alone's batch: the device feed's step 0
    traces = steps_lib.TRACES["train_step"]
    x0, y0 = jax.jit(dev0.train_batch)(dev0.train_args(0), jax.random.key(0))
    x0, y0 = jax.device_put(x0, batch_sharding), jax.device_put(y0, batch_sharding)
    t0 = time.perf_counter()
    jax.block_until_ready(alone_step(*fresh(), x0, y0))
    jax.block_until_ready(dev_step(*fresh(), *dev0.train_args(0)))
    B = args.batch_size
    zeros = (jax.make_array_from_process_local_data(batch_sharding, np.zeros((B, *SHAPE), np.uint8)),
             jax.make_array_from_process_local_data(batch_sharding, np.zeros((B,), np.int32)))
    jax.block_until_ready(stream_step(*fresh(), *zeros))
    compile_s = time.perf_counter() - t0

    # ---- size the rows from the step alone's time
    st = fresh()
    t0 = time.perf_counter()
    for _ in range(2):
        st = alone_step(*st, x0, y0)
    jax.block_until_ready(st)
    est = (time.perf_counter() - t0) / 2
    steps = args.steps
    if args.time_budget > 0:
        steps = max(args.min_steps, min(args.steps, int(args.time_budget / est)))
    print(f"  {name}: {n_params:,} params | compile {compile_s:.0f} s | step alone ~{est * 1e3:.0f} ms | {steps} timed "
          f"steps per row", flush=True)
    warm = args.warmup

    def window(step_fn, args_at) -> float:
        """``warm`` untimed steps, block, then ``steps`` timed ones (the feed's host side each step, as the
        run's loop calls it), blocking at the end of the window."""
        st, sums = fresh()
        for i in range(warm):
            st, sums = step_fn(st, sums, *args_at(i))
        jax.block_until_ready((st, sums))
        t0 = time.perf_counter()
        for i in range(warm, warm + steps):
            st, sums = step_fn(st, sums, *args_at(i))
        jax.block_until_ready((st, sums))
        return time.perf_counter() - t0

    def row(data, feed, workers, dt, **extra):
        print(f"    {name} {data or ''} {feed} {'' if workers is None else f'{workers} workers'}: "
              f"{steps * B / dt:,.0f} img/s", flush=True)
        return {"model": name, "params": n_params, "data": data, "feed": feed, "workers": workers, "batch": B,
                "steps": steps, "s": dt, "images_per_s": steps * B / dt, **extra}

    out = [row(None, "step alone", None, window(alone_step, lambda i: (x0, y0)))]
    step_ips = out[0]["images_per_s"]
    for data in device_feeds:
        feed = device_feeds[data]
        r = row(data, "device-resident", None, window(dev_step, feed.train_args))
        r["feed_batches_per_s"] = feed_alone[(data, "device")]["batches_per_s"]
        out.append(r)
        dev_ips = r["images_per_s"]
        for w in args.worker_counts:
            feed = stream_feeds[(data, w)]
            feed.close()  # a fresh pipeline: the row's warm-up starts its workers
            dt = window(stream_step, feed.train_args)
            feed.close()
            r = row(data, "streamed", w, dt, feed_batches_per_s=feed_alone[(data, w)]["batches_per_s"])
            # The bound the CPU sets: w workers decode on at most w cores (0: a thread of this process, one core
            # at most). On a CPU device the step runs on the same cores: the step's core-seconds per image (all
            # cores) and the decode's (one core) add up.
            per_core = decode[data]["images_per_s"]
            bound = max(w, 1) * per_core
            if shared_cpu:
                bound = min(bound, 1 / (1 / dev_ips + 1 / (cores * per_core)))
            r["cpu_bound_images_per_s"] = bound
            out.append(r)
    for r in out:
        r["vs_step_alone"] = r["images_per_s"] / step_ips
        if r["feed"] == "streamed":
            dev = next(d for d in out if d["feed"] == "device-resident" and d["data"] == r["data"])
            r["vs_device_resident"] = r["images_per_s"] / dev["images_per_s"]
    traced = steps_lib.TRACES["train_step"] - traces
    if traced != 2:
        print(f"  WARNING {name}: the train step was traced {traced} times, not 2 (one per feed kind)", flush=True)
    print(f"  {name}: {time.perf_counter() - t_model:.0f} s", flush=True)
    return out


def table(rows: list[dict]) -> str:
    """The rows as a markdown table."""
    cols = ["model", "data", "feed", "workers", "img/s", "vs dev", "vs step", "feed batch/s", "CPU est. img/s"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" if i < 3 else "---:" for i in range(len(cols))) + "|"]
    for r in rows:
        cells = [r["model"], r["data"] or "", r["feed"], "" if r["workers"] is None else str(r["workers"]),
                 f"{r['images_per_s']:,.0f}",
                 f"{r['vs_device_resident']:.2f}" if "vs_device_resident" in r else "",
                 f"{r['vs_step_alone']:.2f}",
                 f"{r['feed_batches_per_s']:,.1f}" if "feed_batches_per_s" in r else "",
                 f"{r['cpu_bound_images_per_s']:,.0f}" if "cpu_bound_images_per_s" in r else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":  # (guarded: Grain's workers start with spawn and import this file)
    raise SystemExit(main())
