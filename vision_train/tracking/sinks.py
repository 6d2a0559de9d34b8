"""Where a run's records go: one protocol every sink implements, and the local record (DESIGN.md, decision 5).

A sink receives what the ``Tracker`` hands it, in the loop's order: scalar rows, each evaluation's report
(its PNGs already drawn under ``<run dir>/media``), the checkpoints worth keeping, the summary, the end.
What it needs to continue after a restart (a remote run's id, its own counters) it returns from
``resume_state``; the tracker stores that in each checkpoint and gives it back, as ``SinkResume.state``,
to the sink built when the run resumes from that checkpoint.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..errors import writing
from ..records import read_rows


@dataclass(frozen=True)
class SinkResume:
    """What a sink built for a resumed run is told about the checkpoint it resumes from."""

    step: int                            # the checkpoint's step
    rows: int | None                     # rows metrics.jsonl had at the checkpoint (None: older checkpoints)
    state: dict | None                   # this sink's ``resume_state()`` at the checkpoint (None: start anew)
    history: Callable[[], list[dict]]    # the rows of metrics.jsonl up to the checkpoint (for a sink to replay)


class Sink(Protocol):
    """One destination of a run's records. Built as ``cls(run_dir, config, logger_cfg, *, name, job_type,
    resume)`` on process 0 when its line in ``tracking.SINKS`` says the logger config wants it.

    Every method is called on the loop's thread (``log_eval``: on the media thread) and must return at
    once: a sink that talks to a network hands the work to its own thread (see ``WandbSink``)."""

    run_id: str | None  # this sink's own run id, if it has one (a child run names it as its parent)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """One row of scalars (plain floats; NaN/inf as they came) for ``step``."""

    def log_eval(self, split: str, step: int, report: dict, **arrays) -> None:
        """One evaluation's media: ``report`` from ``media.eval_report`` (its ``files``: the PNGs drawn);
        ``arrays``: labels, preds, confidence, class_names, images. Media, never scalars."""

    def log_checkpoints(self, ckpt_dir: Path, aliases: dict[str, int | None]) -> None:
        """The checkpoints worth keeping, by alias (``{"best": step, "latest": step}``; None: none)."""

    def log_profile(self, trace_dir: Path, steps: tuple[int, int]) -> None:
        """A JAX profiler trace of steps ``steps`` (first, last; 1-based, inclusive) in ``trace_dir``."""

    def summary(self, values: dict[str, Any]) -> None:
        """The run's final numbers (the last word: every earlier media job has been handed over)."""

    def finish(self, exit_code: int = 0) -> None:
        """The end of the run (0: finished); flush and close."""

    def resume_state(self) -> dict:
        """JSON-able: what this sink needs to continue the same run after a restart ({} for nothing)."""


class LocalSink:
    """``metrics.jsonl`` (one JSON object per (step, logging call), written on the loop's thread in the
    loop's order, so two identical runs write identical files but for timings) and ``summary.json``.
    The PNGs of each evaluation are the report's own files: nothing more to write for them here."""

    run_id = None

    def __init__(self, run_dir: Path, config: dict | None = None, logger_cfg=None, *, name: str | None = None,
                 job_type: str | None = None, resume: SinkResume | None = None):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.rows = 0
        if self.path.exists():
            # Resuming: the rows written after the checkpoint (``resume.rows`` of them were there when it was
            # saved; older checkpoints: the rows up to its step; no checkpoint: none) come again now, with the
            # same values. The file is cut to the checkpoint's rows (written aside first, then renamed); a
            # line torn by the crash is dropped.
            rows = read_rows(self.path)
            keep_rows, keep_until = (resume.rows, resume.step) if resume else (None, 0)
            rows = rows[:keep_rows] if keep_rows is not None else [r for r in rows if r.get("step", 0) <= keep_until]
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            with writing(self.path, "metrics", tmp=tmp):  # (a full disk: one line; the temporary file goes)
                tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
                tmp.replace(self.path)
            self.rows = len(rows)
        self._f = open(self.path, "a", buffering=1)  # line-buffered: a crash keeps every line written

    def log(self, metrics: dict, step: int) -> None:
        row = {"step": step, **{k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                                for k, v in metrics.items()}}
        with writing(self.path, f"metrics at step {step}"):
            self._f.write(json.dumps(row) + "\n")
        self.rows += 1

    def flush(self) -> None:
        self._f.flush()

    def log_eval(self, split: str, step: int, report: dict, **arrays) -> None:
        pass  # (the report drew its PNGs under <run dir>/media)

    def log_checkpoints(self, ckpt_dir: Path, aliases: dict[str, int | None]) -> None:
        pass  # (they are in <run dir>/checkpoints already)

    def log_profile(self, trace_dir: Path, steps: tuple[int, int]) -> None:
        pass  # (it is in <run dir>/profile already)

    def summary(self, values: dict[str, Any]) -> None:
        path = self.run_dir / "summary.json"
        with writing(path, "the summary"), open(path, "w") as f:
            json.dump(values, f, indent=2)

    def finish(self, exit_code: int = 0) -> None:
        with writing(self.path, "metrics"):
            self._f.close()

    def resume_state(self) -> dict:
        return {}  # (its rows count is the loop's: ``Tracker.rows``, stored with the loop state)
