"""vision_train: image classification in JAX/Flax, composed by Hydra, tracked in W&B.

The Python API (``vision_train.api``): ``compose(overrides) -> Config``, ``train(cfg, run_dir, hooks=[...]) ->
summary``, ``Hook(name, every=N, run=fn)``. The package imports nothing heavy at the top level: ``python -m
vision_train`` must be able to set ``XLA_FLAGS`` (simulated CPU devices) before JAX initialises, so these
names are imported when first used.
"""

import time as _time

__version__ = "0.1.0"

# When this process imported the package, and how many jobs it has run: a job's start-up is timed from
# here for the process's first job, from the job's own start for later ones. (Read as an attribute of
# this module: a launcher that ships the task function to a worker by value must not copy it.)
PROCESS = {"started": _time.time(), "jobs": 0}


def __getattr__(name: str):
    if name == "compose":
        from .api import compose

        return compose
    if name == "Hook":
        from .train.hooks import Hook

        return Hook
    if name == "train":  # (the subpackage, callable: vision_train.train(cfg, run_dir, hooks=[...]))
        import importlib

        return importlib.import_module(".train", __name__)
    raise AttributeError(f"module 'vision_train' has no attribute {name!r}")
