"""A run directory's records: reading JSON-lines files that a crash may have torn, and setting a run's
files aside (never overwriting or deleting them) when it starts over or resumes from an earlier step.

Importable without Hydra, W&B or JAX.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

log = logging.getLogger("vision_train")

# What a run writes into its directory (Hydra's own .hydra/ and the console log train.log stay: Hydra
# writes them before the run starts).
RUN_FILES = ("metrics.jsonl", "summary.json", "config.yaml", "media", "checkpoints", "wandb", "eval.json")
EARLIER = "earlier"  # <run dir>/earlier/<time>/: what an earlier attempt wrote, set aside


def read_rows(path: str | Path) -> list[dict]:
    """The rows of a JSON-lines file. A line that does not parse (a write torn by a crash: only ever the
    last) is skipped, so a damaged tail never blocks a resume."""
    rows = []
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return rows
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            log.warning("%s: skipped a torn line (a write cut short by a crash)", path)
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def aside_dir(run_dir: str | Path) -> Path:
    """A new, unique ``<run dir>/earlier/<time>`` directory name (not created)."""
    base = Path(run_dir) / EARLIER / time.strftime("%Y%m%d-%H%M%S")
    dest, n = base, 1
    while dest.exists():
        n += 1
        dest = base.with_name(f"{base.name}-{n}")
    return dest


def set_aside_run(run_dir: str | Path, include_job_record: bool = False) -> Path | None:
    """``trainer.resume=never``: move everything an earlier run wrote into ``<run dir>/earlier/<time>/``
    (``job.json`` too when asked: the command line does that before it records the new attempt).
    Returns that directory, or None when there was nothing to move."""
    run_dir = Path(run_dir)
    names = RUN_FILES + (("job.json",) if include_job_record else ())
    present = [run_dir / n for n in names if (run_dir / n).exists() and
               not (n in ("checkpoints", "media", "wandb") and not any((run_dir / n).iterdir()))]
    if not present:
        return None
    dest = aside_dir(run_dir)
    dest.mkdir(parents=True)
    for p in present:
        shutil.move(str(p), dest / p.name)
    return dest
