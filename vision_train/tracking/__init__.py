"""Tracking: one interface, two sinks (DESIGN.md, decision 5).

``Tracker`` writes every logged scalar to ``<run dir>/metrics.jsonl`` (always, even with W&B disabled)
and, on process 0, to Weights & Biases. Values are plain Python floats fetched by the caller on log
steps only, so both sinks receive identical numbers.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

log = logging.getLogger("vision_train")


class LocalSink:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "metrics.jsonl"
        self._f = open(self.path, "a", buffering=1)  # line-buffered: a crash keeps every line written

    def log(self, metrics: dict, step: int) -> None:
        row = {"step": step, **{k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                                for k, v in metrics.items()}}
        self._f.write(json.dumps(row) + "\n")

    def finish(self) -> None:
        self._f.close()


class Tracker:
    def __init__(self, run_dir: Path, config: dict, logger_cfg, *, is_main: bool = True):
        self.run_dir = Path(run_dir)
        self.local = LocalSink(self.run_dir) if is_main else None
        self.wandb = None
        if is_main and logger_cfg.mode != "disabled":
            from .wandb_sink import WandbSink

            self.wandb = WandbSink(self.run_dir, config, logger_cfg)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self.local:
            self.local.log(metrics, step)
        if self.wandb:
            self.wandb.log(metrics, step)

    def summary(self, values: dict[str, Any]) -> None:
        if self.local:
            with open(self.run_dir / "summary.json", "w") as f:
                json.dump(values, f, indent=2)
        if self.wandb:
            self.wandb.summary(values)

    def finish(self, exit_code: int = 0) -> None:
        if self.local:
            self.local.finish()
        if self.wandb:
            self.wandb.finish(exit_code)
