"""Test accuracy of each model on scikit-learn's 8x8 digits, beside scikit-learn's SVC on the same split.

    python benchmarks/digits_accuracy.py [--epochs 30] [--models mlp cnn mixer_small vit]

Same split for all: 80/20 train/test (seed 42), 180 training images held out for validation (the
networks use them for nothing but reporting; SVC trains on the same 1,257 images).
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time

import numpy as np

from vision_train.config import (CNNConfig, Config, DataConfig, HardwareConfig, LoggerConfig, MixerConfig, MLPConfig,
                                 OptimizerConfig, TrainerConfig, ViTConfig, to_run_config)
from vision_train.data import sources

MODELS = {
    "mlp": MLPConfig(hidden_layers=2, hidden_dim=256),
    "cnn": CNNConfig(),
    "mixer_small": MixerConfig(patch_size=2, num_blocks=2, hidden_dim=64, tokens_mlp_dim=32, channels_mlp_dim=256),
    "vit": ViTConfig(patch_size=2, hidden_size=128, num_layers=6, num_heads=8, mlp_dim=256),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    data = DataConfig(name="digits", val_size=180)
    ds = sources.load(data)
    from sklearn.svm import SVC

    t0 = time.time()
    flat = lambda s: s.images.reshape(len(s.labels), -1) / 255.0  # noqa: E731
    svc = SVC().fit(flat(ds.train), ds.train.labels)
    rows = [("SVC (scikit-learn, RBF)", float(np.mean(svc.predict(flat(ds.test)) == ds.test.labels)), time.time() - t0)]

    from vision_train.train.loop import train

    for name in args.models:
        cfg = to_run_config(Config(
            model=MODELS[name], data=data, optimizer=OptimizerConfig(name="adam", lr=args.lr),
            hardware=HardwareConfig(platform="cpu"), logger=LoggerConfig(mode="disabled"),
            trainer=TrainerConfig(epochs=args.epochs, batch_size=args.batch_size, progress_bar=False)))
        with tempfile.TemporaryDirectory() as d:
            s = train(cfg, os.path.join(d, name))
        rows.append((f"{name} ({s['parameters']:,} params, {args.epochs} epochs)", s["test/acc"], s["wall_time_s"]))

    print(f"\ndigits: train {len(ds.train.labels)}, val {len(ds.val.labels)}, test {len(ds.test.labels)}")
    print(f"{'model':<44} {'test acc':>9} {'wall s':>8}")
    for name, acc, wall in rows:
        print(f"{name:<44} {acc:>9.4f} {wall:>8.1f}")


if __name__ == "__main__":
    main()
