"""What checkpointing costs: a checkpoint every epoch (async, Orbax) against checkpointing off.

    python benchmarks/checkpoint_cost.py [--model cnn] [--epochs 3] [--repeats 2]

Same CIFAR-sized synthetic set and settings as tracking_cost.py (W&B disabled). Reports the median
training images/s (between log steps; the background writes overlap these) and the time the loop spent
blocked in saves (the device->host copy) against the time it spent training.
"""

from __future__ import annotations

import os
import statistics
import tempfile

from tracking_cost import parse_args, run


def main() -> None:
    args = parse_args(__doc__)
    sides = {"off": dict(checkpoint=False), "every epoch": dict(checkpoint=True, checkpoint_every_epochs=1)}
    res = {k: [] for k in sides}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for name, kw in sides.items():
                res[name].append(run(args.model, "disabled", args.epochs, tmp, f"{name.replace(' ', '_')}{r}", **kw))
    print(f"\n{args.model}, batch 128, {args.epochs} epochs x {args.repeats} runs per side")
    print(f"{'checkpoints':<12} {'img/s (median)':>15} {'train s':>8} {'blocked in save s':>18}")
    ips = {}
    for name, runs in res.items():
        ips[name] = statistics.median(x["images_per_sec"] for x in runs)
        print(f"{name:<12} {ips[name]:>15,.0f} {sum(x['time/train_s'] for x in runs):>8.1f} "
              f"{sum(x['time/checkpoint_s'] for x in runs):>18.2f}")
    print(f"every epoch / off throughput: {ips['every epoch'] / ips['off']:.3f}")


if __name__ == "__main__":
    os.chdir(os.path.dirname(os.path.abspath(__file__)))
    main()
