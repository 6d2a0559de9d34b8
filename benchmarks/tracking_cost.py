"""What tracking costs: training throughput with W&B offline vs disabled, and eval media vs the eval itself.

    python benchmarks/tracking_cost.py [--model cnn] [--epochs 3] [--repeats 2]

A CIFAR-sized synthetic set (32x32x3, 10 classes: 10,000 train, 5,000 val, 5,000 test), batch 128,
log_every_steps=50. Runs alternate (disabled, offline, disabled, offline, ...) so machine noise hits both.
Throughput is the median of the logged images_per_sec (compilation excluded); media cost is the time
spent making tables, images and plots after each eval, against the time of the eval itself.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile

from vision_train.config import (CNNConfig, Config, DataConfig, HardwareConfig, LoggerConfig, MixerConfig,
                                 OptimizerConfig, TrainerConfig, ViTConfig, to_run_config)

MODELS = {"cnn": CNNConfig(), "vit": ViTConfig(), "mixer": MixerConfig()}


def run(model: str, mode: str, epochs: int, tmp: str, tag: str, **trainer) -> dict:
    from vision_train.train.loop import train

    cfg = to_run_config(Config(
        model=MODELS[model],
        data=DataConfig(name="synthetic", num_examples=20000, image_shape=[32, 32, 3], num_classes=10,
                        test_fraction=0.25, val_size=5000),
        optimizer=OptimizerConfig(), hardware=HardwareConfig(),
        trainer=TrainerConfig(epochs=epochs, batch_size=128, log_every_steps=50, progress_bar=False, **trainer),
        logger=LoggerConfig(mode=mode)))
    run_dir = os.path.join(tmp, tag)
    summary = train(cfg, run_dir)
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    ips = [r["images_per_sec"] for r in rows if "images_per_sec" in r]
    return {"images_per_sec": statistics.median(ips), **summary}


def parse_args(doc: str) -> argparse.Namespace:
    """The cost benchmarks' shared command line (this one and checkpoint_cost.py)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="cnn", choices=list(MODELS))
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    return args


def main() -> None:
    args = parse_args(__doc__)
    os.environ.setdefault("WANDB_SILENT", "true")
    res = {"disabled": [], "offline": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for mode in ("disabled", "offline"):
                res[mode].append(run(args.model, mode, args.epochs, tmp, f"{mode}{r}"))
    ips = {m: statistics.median(x["images_per_sec"] for x in v) for m, v in res.items()}
    print(f"\n{args.model}, batch 128, log_every_steps=50, {args.epochs} epochs x {args.repeats} runs per mode")
    print(f"{'tracking':<10} {'img/s (median)':>15} {'eval s':>8} {'media s':>8} {'media/eval':>11}")
    for mode, runs in res.items():
        ev = sum(x["time/eval_s"] for x in runs)
        me = sum(x["time/media_s"] for x in runs)
        print(f"{mode:<10} {ips[mode]:>15,.0f} {ev:>8.2f} {me:>8.2f} {me / ev if ev else 0:>11.2f}")
    print(f"offline / disabled throughput: {ips['offline'] / ips['disabled']:.3f}")


if __name__ == "__main__":
    main()
