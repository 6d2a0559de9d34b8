"""Start-up cost of sweep jobs, with and without JAX's persistent compilation cache, side by side.

Runs the same 4-job sweep (``python -m vision_train -m ...``, one process, Hydra's basic launcher) in
three modes, alternating over ``--repeats``:

- ``no cache``: ``hardware.compilation_cache=null``; every job compiles every program;
- ``cold cache``: an empty cache directory; the first job fills it, the others read it;
- ``warm cache``: the same sweep again over a filled cache (a re-run, another sweep of the same model,
  the other jobs of a SLURM/joblib sweep whose processes start after the first has compiled);

and with ``--process-per-job`` also one process per job (what the joblib and SLURM launchers do: every
job pays Python and JAX imports too). Prints per-job start-up (import or job start to the first
finished train step, ``time/startup_s`` of each job's summary.json), each job's time from that same
start to its end, and the sweep's wall time with its ratio to the first mode.

    python benchmarks/sweep_startup.py                        # cnn on digits, 4 seeds, 2 epochs
    python benchmarks/sweep_startup.py --sweep optimizer.lr=1e-3,2e-3,3e-3,5e-3 --model vit
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_sweep(work: Path, tag: str, args, cache: str | None, process_per_job: bool) -> dict:
    sweep_dir = work / tag
    shutil.rmtree(sweep_dir, ignore_errors=True)
    common = [f"model={args.model}", f"data={args.data}", f"trainer.epochs={args.epochs}",
              f"trainer.batch_size={args.batch_size}", "logger.mode=disabled", "logger.media=false",
              "trainer.progress_bar=false", "trainer.checkpoint=false", f"hardware={args.hardware}",
              f"hardware.compilation_cache={cache if cache else 'null'}"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    t0 = time.time()
    if process_per_job:
        key, values = args.sweep.split("=", 1)
        for v in values.split(","):
            cmd = [sys.executable, "-m", "vision_train", *common, f"{key}={v}", f"hydra.run.dir={sweep_dir / v}"]
            subprocess.run(cmd, cwd=work, env=env, check=True, capture_output=True)
    else:
        cmd = [sys.executable, "-m", "vision_train", "-m", *common, args.sweep, f"hydra.sweep.dir={sweep_dir}"]
        subprocess.run(cmd, cwd=work, env=env, check=True, capture_output=True)
    total = time.time() - t0
    jobs = sorted(((json.loads(p.read_text()), json.loads((p.parent / "summary.json").read_text()))
                   for p in sweep_dir.rglob("job.json")), key=lambda job: job[0]["started_ts"])
    # A job's time: from its clock start (the process's import for a process's first job, else the job's
    # own start) to its end, the time a sweep spends on it.
    return {"total_s": total, "startup_s": [summary["time/startup_s"] for _, summary in jobs],
            "wall_s": [record["ended_ts"] - record["clock_start_ts"] for record, _ in jobs]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="cnn")
    p.add_argument("--data", default="digits")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--sweep", default="trainer.seed=0,1,2,3", help="the swept override (4 values: 4 jobs)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--process-per-job", action="store_true", help="also time one process per job")
    p.add_argument("--hardware", default="cpu", help="hardware preset (cpu, gpu, auto)")
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="sweep_startup_"))
    modes = [("no cache", False), ("cold cache", False), ("warm cache", False)]
    if args.process_per_job:
        modes += [("per process, no cache", True), ("per process, warm cache", True)]
    results: dict[str, list[dict]] = {m: [] for m, _ in modes}
    for r in range(args.repeats):
        cache = work / f"cache{r}"
        for mode, ppj in modes:  # alternating, in one run: ratios hold on a noisy machine
            use = None if "no cache" in mode else str(cache)
            if mode == "cold cache":
                shutil.rmtree(cache, ignore_errors=True)
            results[mode].append(run_sweep(work, f"{mode.replace(' ', '_').replace(',', '')}_{r}", args, use, ppj))
            print(f"repeat {r + 1}/{args.repeats} {mode}: {results[mode][-1]['total_s']:.1f}s", file=sys.stderr)

    med = lambda xs: statistics.median(xs)  # noqa: E731
    print(f"\n4-job sweep `{args.sweep}`, model={args.model} data={args.data} epochs={args.epochs} "
          f"batch={args.batch_size}; medians of {args.repeats} alternating repeats\n")
    print("| mode | sweep wall s | start-up s per job (job 1, 2, 3, 4) | job s, start-up included (1, 2, 3, 4) | mean job s |")
    print("|---|---|---|---|---|")
    base = None
    for mode, _ in modes:
        rs = results[mode]
        st = [med([r["startup_s"][i] for r in rs]) for i in range(4)]
        wl = [med([r["wall_s"][i] for r in rs]) for i in range(4)]
        total = med([r["total_s"] for r in rs])
        base = base or total
        print(f"| {mode} | {total:.1f} ({total / base:.2f}x) | {', '.join(f'{x:.1f}' for x in st)} | "
              f"{', '.join(f'{x:.1f}' for x in wl)} | {statistics.mean(wl):.1f} |")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
