"""Compose the real Hydra config in-process (as the CLI does), and the small configurations tests run."""

from __future__ import annotations

import copy
import functools
import os

from hydra import compose as hydra_compose
from hydra import initialize_config_dir

from vision_train.config import register_configs, to_run_config
from vision_train.train.hooks import Hook

CONF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")


def compose(overrides=(), validate=True):
    """The config the command line composes for ``overrides``, validated as it validates (``validate``); Hydra's
    composition (0.2 s: the suite composes hundreds) is done once per distinct list of overrides, validation
    every time."""
    cfg = copy.deepcopy(_composed(tuple(overrides)))
    return to_run_config(cfg) if validate else cfg


@functools.lru_cache(maxsize=None)
def _composed(overrides: tuple):
    register_configs()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


# No W&B, no media, no progress bar, on the CPU: every test run, unless it tests one of these.
FAST = ["logger.mode=disabled", "logger.media=false", "trainer.progress_bar=false", "hardware=cpu"]

# Tiny models: each architecture's code paths with few parameters (a few seconds to compile on a CPU).
TINY = {
    "cnn": ["model=cnn", "model.features=[8,16]", "model.dense_dim=32"],
    "cnn_wide": ["model=cnn", "model.features=[16,32]", "model.dense_dim=32"],  # slower steps (runs killed mid-way)
    "vit": ["model=vit", "model.patch_size=2", "model.hidden_size=16", "model.num_layers=1", "model.num_heads=2",
            "model.mlp_dim=32", "model.dropout=0.1", "model.stochastic_depth=0.1"],
    "mlp": ["model=mlp"],  # the preset is tiny: one hidden layer of 10 units (seed 003)
}

# The tiny CNN on scikit-learn's digits: 1,257 training images of 8x8, 19 steps an epoch at batch 64; it
# learns in seconds. Most tests train this.
DIGITS = [*TINY["cnn"], "data=digits", "trainer.batch_size=64"]
DIGITS_STEPS_PER_EPOCH = 1257 // 64

# A run to stop between checkpoints (kill -9, signals, re-runs of a command line): the wider CNN on 32x32
# synthetic images, 700 training images at batch 32 (21 steps an epoch), a checkpoint every 10 steps.
KILLABLE = [*TINY["cnn_wide"], "data=synthetic", "data.num_examples=1000", "trainer.batch_size=32",
            "trainer.log_every_steps=3", "trainer.checkpoint_every_steps=10"]


class Stopped(Exception):
    pass


def stop_at(step: int) -> Hook:
    """A user hook that ends a run with an error after ``step`` (and its checkpoint): a run to resume."""
    def stop(s, run, results):
        raise Stopped(f"stopped after step {s}")

    return Hook("stop", every=step, run=stop)
