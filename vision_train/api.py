"""The Python API, for notebooks and scripts: the same runs as the command line, without it.

    import vision_train
    cfg = vision_train.compose(["model=vit", "data=digits", "trainer.epochs=3"])
    summary = vision_train.train(cfg, "runs/vit", hooks=[vision_train.Hook("probe", every=100, run=fn)])

``compose`` builds the config from conf/ as the command line does (presets, overrides, the schema's types) and
validates it exactly as the command line validates it; ``train`` decides the run's fate (new, resume, finished,
refused) and trains; a ``Hook``'s ``fn(step, run, results)`` runs after every ``every``-th step (``train.hooks``).
JAX starts with the first ``train``: set ``XLA_FLAGS`` (simulated CPU devices) before it, if at all.
"""

from __future__ import annotations

import os

CONF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")


def compose(overrides=(), config_name: str = "config"):
    """The validated, frozen ``Config`` of a command line's overrides (``["model=vit", "trainer.epochs=3"]``)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from .config import register_configs, to_run_config

    register_configs()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = hydra_compose(config_name=config_name, overrides=list(overrides))
    return to_run_config(cfg)
