#!/usr/bin/env python
"""Two checkouts side by side: each tree's own ``benchmarks/throughput.py`` (and, with ``--run-cost``, a tiny
``python -m vision_train`` run), in subprocesses, interleaved so that load on a shared machine hits both.

Every case runs ``--repeats`` times per tree; within a repetition the order of the trees alternates
(old new | new old | ...). Each subprocess imports the package of its own tree (PYTHONPATH and the script's
own path insert; checked before anything is timed). The throughput script runs with a fixed number of steps
(``--time-budget 0``) so both trees time the same work. The table gives medians over repetitions, with the
range, of each tree's pipeline/step ratio and images/s, and the new/old ratio of the medians.

    python benchmarks/compare_trees.py --old /tmp/oldtree                       # mlp:40 and cnn:6, 3 repetitions
    python benchmarks/compare_trees.py --old /tmp/oldtree --cases vit:4 --run-cost --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from throughput import table  # (this folder's; it imports JAX only inside its functions)

HERE = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old", required=True, help="the other checkout (read only: nothing is written into it)")
    p.add_argument("--new", default=str(HERE), help="this checkout (default)")
    p.add_argument("--cases", default="mlp:40,cnn:6",
                   help="MODEL:STEPS, comma-separated: throughput.py presets and timed steps per repeat and side")
    p.add_argument("--repeats", type=int, default=3, help="repetitions per tree and case (interleaved)")
    p.add_argument("--inner-repeats", type=int, default=3, help="throughput.py's own --repeats")
    p.add_argument("--warmup", type=int, default=2, help="throughput.py's --warmup")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--num-examples", type=int, default=10_000, help="throughput.py's --num-examples")
    p.add_argument("--run-cost", action="store_true",
                   help="also time a tiny `python -m vision_train` run of each tree (wall time, time/train_s)")
    p.add_argument("--run-args", default="model=cnn model.features=[8,16] model.dense_dim=32 data=digits "
                                         "trainer.batch_size=64 trainer.epochs=3",
                   help="overrides of the --run-cost run (besides logging, checkpoints and cache turned off)")
    p.add_argument("--json", default=None, help="write every number here")
    args = p.parse_args(argv)
    args.cases = [(c.split(":")[0], int(c.split(":")[1])) for c in args.cases.split(",") if c.strip()]
    return args


def env_for(tree: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(tree) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("XLA_FLAGS", None)
    return env


def check_imports(tree: Path) -> None:
    """The subprocess for ``tree`` must import ``tree``'s package, not the installed (editable) one."""
    code = f"import sys; sys.path.insert(0, {str(tree)!r}); import vision_train; print(vision_train.__file__)"
    out = subprocess.run([sys.executable, "-c", code], env=env_for(tree), capture_output=True, text=True,
                         check=True).stdout.strip()
    if Path(out).resolve().parent != (tree / "vision_train").resolve():
        raise SystemExit(f"{tree}: the subprocess imports vision_train from {out}, not from this tree")


def throughput(tree: Path, model: str, steps: int, args, work: Path) -> dict:
    out = work / f"tp_{tree.name}_{model}_{time.monotonic_ns()}.json"
    cmd = [sys.executable, str(tree / "benchmarks" / "throughput.py"), "--models", model, "--steps", str(steps),
           "--repeats", str(args.inner_repeats), "--warmup", str(args.warmup), "--time-budget", "0",
           "--batch-size", str(args.batch_size), "--num-examples", str(args.num_examples), "--platform", "cpu",
           "--json", str(out)]
    proc = subprocess.run(cmd, env=env_for(tree), cwd=work, capture_output=True, text=True)
    if proc.returncode or not out.exists():
        raise RuntimeError(f"{tree}: {' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    r = json.loads(out.read_text())["results"][0]
    warned = [ln.strip() for ln in proc.stdout.splitlines() if "WARNING" in ln]
    return {"ratio": r["ratio"], "ips_pipeline": r["images_per_s_pipeline"], "ips_step": r["images_per_s_step"],
            "step_ms": r["step_ms"], "check": r["check"], "warnings": warned}


def run_cost(tree: Path, args, work: Path) -> dict:
    run_dir = work / f"run_{tree.name}_{time.monotonic_ns()}"
    cmd = [sys.executable, "-m", "vision_train", *args.run_args.split(), "logger.mode=disabled", "logger.media=false",
           "trainer.progress_bar=false", "trainer.checkpoint=false", "hardware=cpu",
           "hardware.compilation_cache=null", f"hydra.run.dir={run_dir}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env_for(tree), cwd=work, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode or not (run_dir / "summary.json").exists():
        raise RuntimeError(f"{tree}: {' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    flat = summary.get("summary", summary)
    return {"wall_s": wall, "train_s": flat.get("time/train_s"), "startup_s": flat.get("time/startup_s"),
            "test_acc": flat.get("test/acc")}


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else float("nan")


def span(values, fmt):
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    return f"{fmt.format(med(values))} [{fmt.format(min(values))}-{fmt.format(max(values))}]"


def main(argv=None) -> int:
    args = parse_args(argv)
    trees = {"old": Path(args.old).resolve(), "new": Path(args.new).resolve()}
    for tree in trees.values():
        check_imports(tree)
    print(f"old {trees['old']} | new {trees['new']} | {os.cpu_count()} CPU cores | batch {args.batch_size} | "
          f"{args.repeats} repetitions x {args.inner_repeats} inner repeats, interleaved", flush=True)
    t_all = time.perf_counter()
    res = {name: {} for name in trees}
    with tempfile.TemporaryDirectory(prefix="compare_trees_") as tmp:
        work = Path(tmp)
        jobs = [(f"{m} ({s} steps)", lambda tree, m=m, s=s: throughput(tree, m, s, args, work)) for m, s in args.cases]
        if args.run_cost:
            jobs.append(("run", lambda tree: run_cost(tree, args, work)))
        for rep in range(args.repeats):
            for j, (case, job) in enumerate(jobs):
                order = ["old", "new"] if (rep + j) % 2 == 0 else ["new", "old"]
                for name in order:
                    t0 = time.perf_counter()
                    r = job(trees[name])
                    res[name].setdefault(case, []).append(r)
                    brief = (f"pipe/step {r['ratio']:.3f}, step {r['step_ms']:.1f} ms" if "ratio" in r else
                             f"wall {r['wall_s']:.1f}s, train {r['train_s']:.2f}s")
                    print(f"  rep {rep + 1} {case:<16} {name}: {brief} ({time.perf_counter() - t0:.0f}s)", flush=True)
                    for w in r.get("warnings", []):
                        print(f"    {name}: {w}", flush=True)

    print()
    cols = ["case", "old pipe/step", "new pipe/step", "old img/s pipe", "new img/s pipe", "new/old pipe",
            "old img/s step", "new img/s step", "new/old step"]
    rows = []
    for case, _ in jobs:
        if case == "run":
            continue
        o, n = res["old"][case], res["new"][case]
        get = lambda rs, k: [r[k] for r in rs]  # noqa: E731
        rows.append([case, span(get(o, "ratio"), "{:.3f}"), span(get(n, "ratio"), "{:.3f}"),
                     span(get(o, "ips_pipeline"), "{:,.0f}"), span(get(n, "ips_pipeline"), "{:,.0f}"),
                     f"{med(get(n, 'ips_pipeline')) / med(get(o, 'ips_pipeline')):.3f}",
                     span(get(o, "ips_step"), "{:,.0f}"), span(get(n, "ips_step"), "{:,.0f}"),
                     f"{med(get(n, 'ips_step')) / med(get(o, 'ips_step')):.3f}"])
    table(cols, rows)
    print("medians over repetitions [min-max]; pipe/step: throughput.py's pipeline img/s over step-alone img/s")
    if args.run_cost:
        print()
        o, n = res["old"]["run"], res["new"]["run"]
        get = lambda rs, k: [r[k] for r in rs]  # noqa: E731
        rows = [[k, span(get(o, k), "{:.2f}"), span(get(n, k), "{:.2f}"),
                 f"{med(get(n, k)) / med(get(o, k)):.3f}"] for k in ("wall_s", "startup_s", "train_s")]
        rows.append(["test_acc", span(get(o, "test_acc"), "{:.4f}"), span(get(n, "test_acc"), "{:.4f}"), ""])
        print(f"python -m vision_train {args.run_args} (no logging, checkpoints or compilation cache):")
        table(["", "old", "new", "new/old"], rows)
    print(f"total {time.perf_counter() - t_all:.0f}s")
    if args.json:
        Path(args.json).write_text(json.dumps({"trees": {k: str(v) for k, v in trees.items()},
                                               "argv": sys.argv[1:] if argv is None else list(argv),
                                               "results": res}, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
