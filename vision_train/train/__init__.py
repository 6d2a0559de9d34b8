"""Training: ``assembly`` (a run, built), ``loop`` (its steps), ``hooks`` (its periodic work), ``state``
(TrainState, optimizer), ``steps`` (pure jitted steps), ``feeds`` (batches on the device).

This package is also ``vision_train.train(cfg, run_dir, hooks=[...])`` (``loop.train``), the Python API's
entry point beside ``vision_train.compose``: calling the module calls the loop.
"""

import sys as _sys
import types as _types


class _Train(_types.ModuleType):
    def __call__(self, cfg, run_dir, **kwargs):
        """``vision_train.train(cfg, run_dir, hooks=[...])``: see ``vision_train.train.loop.train``."""
        from .loop import train

        return train(cfg, run_dir, **kwargs)


_sys.modules[__name__].__class__ = _Train
