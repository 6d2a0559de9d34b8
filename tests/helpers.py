"""Compose the real Hydra config in-process (as the CLI does) and clamp it for tests."""

from __future__ import annotations

import os

from vision_train.config import register_configs, to_run_config

CONF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")


def compose(overrides=(), validate=True):
    from hydra import compose as hydra_compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=list(overrides))
    return to_run_config(cfg) if validate else cfg


FAST = ["logger.mode=disabled", "logger.media=false", "trainer.progress_bar=false", "hardware=cpu"]
