#!/usr/bin/env python
"""Data parallelism against FSDP: step time and the memory each device holds, side by side, in one run.

For each model preset (``--models``, default ViT-S/16 and ViT-B/16) and each fsdp size (``--fsdp``, default 1 and
8; 1 is plain data parallelism) on the same devices, the train step's forward/backward/update
(``steps.make_update``) is jitted as a run jits it: the state created on the data x fsdp mesh with the run's
shardings (``parallel.state_shardings``: big_vision's rule), the step's outputs pinned to them, the batch split
over both axes. For each it reports

  params, opt state   MiB on the fullest device, from the arrays' addressable shards (as a run's memory/*)
  temp                the compiled step's temporaries per device, from XLA's ``memory_analysis`` (n/a where
                      the backend does not report it)
  step ms, img/s      median over ``--repeats`` timed loops of ``--steps`` steps (after one warm-up step),
                      synchronised with ``block_until_ready``

Images are random, on the device, ``--image-size`` square RGB (default 64: 16 patches of 16, so a CPU finishes;
memory for the parameters and optimizer state does not depend on it), ``--batch-size`` global (default 16).

Measured (2 CPU cores, 8 simulated CPU devices, jax 0.10.2): see docs/launchers.md, "FSDP".

    python benchmarks/fsdp.py                                   # 8 simulated CPU devices
    python benchmarks/fsdp.py --platform gpu --num-devices 0 --image-size 224 --batch-size 256 --fsdp 1,2,4,8  # GPUs
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from throughput import table  # noqa: E402 (this folder's; it imports JAX only inside its functions)

from vision_train import models  # noqa: E402 (no JAX: the registry and its presets)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="vit_s,vit_b", help="comma-separated presets (conf/model/)")
    p.add_argument("--fsdp", default="1,8", help="comma-separated fsdp sizes (1: data parallelism)")
    p.add_argument("--batch-size", type=int, default=16, help="global batch, split over every device")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--steps", type=int, default=3, help="timed steps per repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--precision", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--optimizer", choices=("adam", "adamw", "sgd"), default="adamw")
    p.add_argument("--platform", choices=("auto", "cpu", "gpu", "tpu"), default="cpu")
    p.add_argument("--num-devices", type=int, default=8, help="0: all (on cpu: simulate this many)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.fsdp = [int(f) for f in args.fsdp.split(",") if f.strip()]
    unknown = [m for m in args.models if m not in models.presets()]
    if unknown:
        p.error(f"unknown model(s) {unknown}; choose from {', '.join(models.presets())}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from vision_train import parallel

    if args.platform == "cpu":
        parallel.configure_host_devices("cpu", args.num_devices)
    import flax
    import jax

    devices = parallel.select_devices(args.platform, args.num_devices)
    parallel.check_batch_divisible(args.batch_size, len(devices))
    dev = devices[0]
    print(f"jax {jax.__version__}, flax {flax.__version__} | {len(devices)} x {dev.device_kind} ({dev.platform}) | "
          f"{os.cpu_count()} CPU cores | batch {args.batch_size} of {args.image_size}x{args.image_size}x3 | "
          f"{args.optimizer} | {args.precision}")
    results = []
    for name in args.models:
        for fsdp in args.fsdp:
            try:
                results.append(bench(name, fsdp, devices, args))
            except Exception as e:  # noqa: BLE001 (one layout that fails must not hide the others)
                first = (str(e).strip().splitlines() or [""])[0][:200]
                print(f"  {name} fsdp={fsdp}: FAILED {type(e).__name__}: {first}", flush=True)
                results.append({"model": name, "fsdp": fsdp, "error": f"{type(e).__name__}: {first}"})
    print()
    mib = lambda b: "n/a" if b is None else f"{b / 2**20:,.1f}"  # noqa: E731
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["model"], f"fsdp={r['fsdp']}", "FAILED", "", "", "", "", "", ""])
            continue
        rows.append([r["model"], r["mesh"], f"{r['params']:,}", mib(r["param_bytes"]), mib(r["opt_bytes"]),
                     mib(r["temp_bytes"]), f"{r['state_ratio']:.3f}", f"{r['step_ms']:,.0f}",
                     f"{r['images_per_s']:,.1f}"])
    table(["model", "mesh", "params", "params MiB/dev", "opt MiB/dev", "temp MiB/dev", "state vs DP", "step ms",
           "img/s"], rows)
    print("\nMiB/dev: on the fullest device (parameters and optimizer state from the arrays' shards; temp: XLA's "
          "memory_analysis of the compiled step). state vs DP: (params + opt) per device over data parallelism's.")
    if args.json:
        Path(args.json).write_text(json.dumps({"argv": sys.argv[1:] if argv is None else argv, "results": results},
                                              indent=2))
        print(f"wrote {args.json}")
    return 1 if any("error" in r for r in results) else 0


_DP_STATE: dict = {}


def bench(name: str, fsdp: int, devices, args) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from vision_train import config as config_lib
    from vision_train import parallel
    from vision_train.train import state as state_lib
    from vision_train.train import steps as steps_lib

    mesh = parallel.make_mesh(devices, fsdp)
    replicated = parallel.replicated(mesh)
    cfg = models.presets()[name]
    shape = (args.image_size, args.image_size, 3)
    dtype = jnp.bfloat16 if args.precision == "bfloat16" else jnp.float32
    o = config_lib.OptimizerConfig(name=args.optimizer, weight_decay=0.05 if args.optimizer == "adamw" else 0.0)
    lr_shape = state_lib.lr_schedule("constant", 1.0, 1000, 0, 0.0)

    def init():
        model = models.create(cfg, shape, args.num_classes, rngs=nnx.Rngs(params=0, dropout=1), dtype=dtype)
        tx = state_lib.make_optimizer(o, lr_shape=lr_shape)
        return state_lib.create(model, tx, 0)

    graphdef, abstract = nnx.eval_shape(init)
    shardings = parallel.state_shardings(abstract, abstract.params, mesh)
    state = jax.jit(lambda: init()[1], out_shardings=shardings)()
    tx = state_lib.make_optimizer(o, lr_shape=lr_shape)
    step = jax.jit(steps_lib.make_update(graphdef, tx, lr_shape=lr_shape), donate_argnums=(0, 1),
                   out_shardings=(shardings, replicated))
    sums = jax.device_put(steps_lib.new_train_sums(), replicated)
    B = args.batch_size
    batch = parallel.batch_sharded(mesh)
    x = jax.device_put(jax.random.normal(jax.random.key(0), (B, *shape), dtype), batch)
    y = jax.device_put(jax.random.randint(jax.random.key(1), (B,), 0, args.num_classes), batch)

    t0 = time.perf_counter()
    compiled = step.lower(state, sums, x, y).compile()
    compile_s = time.perf_counter() - t0
    stats = compiled.memory_analysis()
    temp = None if stats is None else int(stats.temp_size_in_bytes)
    param_bytes, opt_bytes = parallel.bytes_per_device(state.params), parallel.bytes_per_device(state.opt_state)
    n_params = state_lib.param_count(state.params)
    state, sums = jax.block_until_ready(step(state, sums, x, y))  # warm-up
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        for _ in range(args.steps):
            state, sums = step(state, sums, x, y)
        jax.block_until_ready((state, sums))
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times) / args.steps
    if fsdp == 1:
        _DP_STATE[name] = param_bytes + opt_bytes
    ratio = (param_bytes + opt_bytes) / _DP_STATE.get(name, param_bytes + opt_bytes)
    loss = float(jax.device_get(sums["loss"]) / max(float(jax.device_get(sums["count"])), 1))
    mesh_str = " x ".join(f"{k}={v}" for k, v in mesh.shape.items())
    print(f"  {name} {mesh_str}: {n_params:,} params | compile {compile_s:.0f}s | step {step_s * 1e3:,.0f} ms | "
          f"params {param_bytes / 2**20:,.1f} MiB + opt {opt_bytes / 2**20:,.1f} MiB per device | "
          f"mean loss {loss:.3f}", flush=True)
    del state, sums
    return {"model": name, "fsdp": fsdp, "mesh": mesh_str, "params": n_params, "param_bytes": param_bytes,
            "opt_bytes": opt_bytes, "temp_bytes": temp, "state_ratio": ratio, "step_ms": step_s * 1e3,
            "images_per_s": B / step_s, "compile_s": compile_s, "times_s": times}


if __name__ == "__main__":
    raise SystemExit(main())
