"""A run's fate, decided once, before anything is built or written (DESIGN decision 11).

``decide(cfg, run_dir)`` reads only what earlier attempts left in the run directory (``config.yaml``,
``summary.json``, the step directories under ``checkpoints/``) and returns one of

- ``new``: nothing to go on from (or ``trainer.resume=never``: the earlier files are set aside first);
- ``resume``: this directory's own run, same computation, from its latest checkpoint or from the step
  ``trainer.resume`` names inside it;
- ``branch``: ``trainer.resume=<another run>`` into this (empty) directory: a new run that starts from that
  run's checkpoint and records it as its parent; its config may differ (more epochs, EMA on, ...);
- ``finished``: this directory holds the same run, finished: nothing to do, nothing is touched;

or raises ``Refused``: the directory holds a run whose computation differs from this config's. Keys that change
what is computed must be equal to resume a run or to re-run a finished one; keys that only change how a run
is watched or laid out (``WATCH_KEYS``) may differ.

Importable without Hydra, W&B or JAX: the command line decides before JAX starts and before it writes a file.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError

# Keys (dotted prefixes) that do not change what a run computes, only how it is watched, laid out or fed: a
# resumed or re-run run may differ in them. Every other key is part of the computation.
WATCH_KEYS = (
    "logger.",
    "trainer.progress_bar", "trainer.resume", "trainer.log_every_steps", "trainer.eval_every_epochs",
    "trainer.eval_every_steps", "trainer.checkpoint_every_epochs", "trainer.checkpoint_every_steps",
    "trainer.keep_checkpoints", "trainer.best_metric", "trainer.best_mode", "trainer.objective",
    "trainer.profile_steps",
    "hardware.num_devices", "hardware.platform", "hardware.distributed", "hardware.compilation_cache",
    "hardware.peak_tflops", "hardware.fsdp", "hardware.sharding_rules",
    "data.workers", "data.prefetch", "data.download", "data.cache_dir",
)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and not k.endswith(("lr_mults", "sharding_rules")):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _default(key: str, arch: str | None) -> Any:
    """The schema's default of a dotted key, or a sentinel where it has none (a key an older version lacked
    compares equal to its default)."""
    from .config import schema_at  # (config imports the models; this module stays light for sweep.py)

    parent, _, name = key.rpartition(".")
    schema = schema_at(parent, arch)
    fields = {f.name: f for f in dataclasses.fields(schema)} if schema is not None else {}
    f = fields.get(name)
    if f is None:
        return _NONE
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    return _NONE


_NONE = object()


def differences(saved: dict, current: dict) -> list[str]:
    """Dotted keys whose values differ between two resolved configs and that change what is computed. A key
    one of them lacks (a config written by another version) counts as its schema default."""
    a, b = _flatten(saved), _flatten(current)
    arch = b.get("model.arch") or a.get("model.arch")
    diff = []
    for k in sorted(set(a) | set(b)):
        if k.startswith(WATCH_KEYS):
            continue
        x, y = a.get(k, _NONE), b.get(k, _NONE)
        if isinstance(x, tuple):
            x = list(x)
        if isinstance(y, tuple):
            y = list(y)
        if x == y:
            continue
        if x is _NONE or y is _NONE:
            default = _default(k, arch)
            if (y if x is _NONE else x) == default:
                continue
        diff.append(k)
    return diff


def describe(saved: dict, current: dict, keys: list[str], limit: int = 4) -> str:
    before, now = _flatten(saved), _flatten(current)
    shown = ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


class Refused(UserError):
    """The run directory holds a run whose computation differs from this config's; nothing was touched."""

    def __init__(self, message: str, keys: list[str]):
        super().__init__(message)
        self.keys = keys


@dataclass(frozen=True)
class Fate:
    kind: str                        # new | resume | branch | finished
    run_dir: Path
    source: Path | None = None       # resume / branch: the checkpoints directory restored from
    step: int | None = None          # its step (None: the latest)
    summary: dict | None = None      # finished: the run's summary
    start_over: bool = False         # new with trainer.resume=never: the earlier files are set aside first

    @property
    def resuming(self) -> bool:
        return self.kind in ("resume", "branch")


def checkpoint_steps(ckpt_dir: Path) -> list[int]:
    """The complete checkpoints' steps (Orbax writes a step into a temporary name and renames it when done)."""
    try:
        return sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit() and p.is_dir())
    except OSError:
        return []


def locate(path: str | Path) -> tuple[Path, int | None]:
    """``trainer.resume=<path>``: a run dir, its checkpoints dir, or one step's dir -> (checkpoints dir, step
    or None for the latest)."""
    p = Path(path).expanduser().resolve()
    if (p / "checkpoints").is_dir():
        return p / "checkpoints", None
    if p.name.isdigit() and p.parent.is_dir():
        return p.parent, int(p.name)
    if p.is_dir():
        return p, None
    from .checkpoint import CheckpointError  # (Orbax: only when the path is wrong)

    raise CheckpointError(f"no checkpoint at {p}: give a run directory, its checkpoints/ directory, or one "
                          f"step's directory inside it")


def _read_config(run_dir: Path) -> dict | None:
    try:
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None
    return saved if isinstance(saved, dict) else None


def _read_summary(run_dir: Path) -> dict | None:
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def _stored_channels(ckpt_dir: Path, step: int) -> int | None:
    """The channel count a checkpoint's run trained on, from its metadata's data facts (JSON beside the arrays)."""
    try:
        meta = json.loads((ckpt_dir / str(step) / "meta" / "metadata").read_text())
        return int(meta["data"]["shape"][-1])
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None


def decide(current: dict, resume: str, run_dir: str | Path, *, checkpoint: bool = True, sweep: bool = False) -> Fate:
    """The fate of a run of config ``current`` (``config.to_dict`` of a validated config) in ``run_dir``.
    ``sweep``: the job of a sweep (the refusal names ``hydra.sweep.dir``)."""
    run_dir = Path(run_dir)
    if resume == "never":
        return Fate("new", run_dir, start_over=True)
    ckpt_dir = run_dir / "checkpoints"
    steps = checkpoint_steps(ckpt_dir) if checkpoint or ckpt_dir.is_dir() else []
    summary = _read_summary(run_dir)
    saved = _read_config(run_dir)
    here = bool(steps) or summary is not None  # a run of this directory's own to go on from, or finished

    source = step = None
    if resume != "auto":
        source, step = locate(resume)
        if source.resolve() != ckpt_dir.resolve() and not here:
            return Fate("branch", run_dir, source=source, step=step)
        # (into a directory that already holds a run, e.g. the branch's own command again: that run's fate)
        if source.resolve() != ckpt_dir.resolve():
            source = step = None
    if not here or saved is None:
        if source is not None:  # trainer.resume=<this run's step> with nothing recorded beside it
            return Fate("resume", run_dir, source=ckpt_dir, step=step)
        return Fate("new", run_dir)

    keys = differences(saved, current)
    if "data.channels" in keys and steps and _stored_channels(ckpt_dir, steps[-1]) == current["data"]["channels"]:
        keys.remove("data.channels")  # (an earlier version wrote 3, its default, for sets it left as stored)
    if keys:
        state = "a finished run" if summary is not None else f"a run stopped at step {steps[-1]}"
        where = "hydra.sweep.dir" if sweep else "hydra.run.dir"
        raise Refused(
            f"{run_dir} holds {state} that computed something else ({describe(saved, current, keys)}); it is left "
            f"as it is. Train this config in a new directory ({where}=<new dir>), or branch from that run into a "
            f"new one: trainer.resume={run_dir} {where}=<new dir>", keys)
    if summary is not None and step is None:
        return Fate("finished", run_dir, summary=summary)
    return Fate("resume", run_dir, source=ckpt_dir, step=step)
