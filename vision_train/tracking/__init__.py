"""Tracking: one tracker, several sinks (DESIGN.md, decision 5).

``Tracker`` hands every logged scalar, evaluation, checkpoint and summary to the sinks the logger config
turns on (``SINKS``): the local record (``metrics.jsonl``, ``summary.json``; always, even with W&B
disabled) and, on process 0, Weights & Biases. Values are plain Python floats fetched by the caller on
log steps only, so every sink receives identical numbers. What a sink needs to resume it returns from
``resume_state``; the tracker's ``resume_state()`` goes into each checkpoint, ``resume_from_meta`` reads it
back.
"""

from __future__ import annotations

import importlib.metadata
import logging
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

from ..records import read_rows
from . import media
from .sinks import LocalSink, Sink, SinkResume
from .wandb_sink import WandbSink  # (imports wandb itself only when a W&B run starts)

__all__ = ["SINKS", "LocalSink", "Sink", "SinkResume", "Tracker", "WandbSink", "default_run_name", "run_metadata"]

log = logging.getLogger("vision_train")

# The sinks of a run, in order: name (its key in a checkpoint's "sinks") -> (its class, whether this logger
# config turns it on). The local record comes first, always: a resuming sink replays the rows it kept. A new
# sink is one class implementing ``Sink`` and one line here.
SINKS: dict[str, tuple[Callable[..., Sink], Callable[[Any], bool]]] = {
    "local": (LocalSink, lambda lc: True),
    "wandb": (WandbSink, lambda lc: lc.mode != "disabled"),
}

# curves.png mid-run: redrawn after an evaluation at most this often (each drawing is ~0.3 s of CPU on the media
# thread, beside the loop); the run's end always draws it.
CURVES_EVERY_S = 60.0


class Tracker:
    def __init__(self, run_dir: Path, config: dict, logger_cfg, *, is_main: bool = True, name: str | None = None,
                 job_type: str = "train", resume: dict | None = None):
        """``resume``: None (a new run) or the checkpoint resumed from: ``{"step": int, "rows": int | None,
        "sinks": dict | None}``: its step, how many rows metrics.jsonl had when it was saved (None: a checkpoint
        that did not record it, or another run's; the rows up to its step are kept), and the sinks' resume
        states (``resume_from_meta``; None: this run's sinks start new runs, e.g. from another run's checkpoint).
        Sinks exist on process 0 only."""
        self.run_dir = Path(run_dir)
        self.versions = config.get("meta", {}).get("versions", {})
        self._lock = threading.Lock()  # the media thread reads metrics.jsonl (curves)
        # Eval media (figures, tables) are made on one background thread, in order, so an eval costs
        # the training loop only the fetch of its predictions.
        self._media = ThreadPoolExecutor(max_workers=1, thread_name_prefix="media") if is_main else None
        self._queued: dict[str, Any] = {}  # kind of media job -> the latest one submitted
        self._curves_at = time.monotonic()  # when curves.png was last asked for (mid-run: at most every CURVES_EVERY_S)
        self.sinks: dict[str, Sink] = {}
        states = (resume or {}).get("sinks") or {}
        for key, (make, wanted) in SINKS.items():
            if not is_main or not wanted(logger_cfg):
                continue
            sink_resume = None if resume is None else SinkResume(
                step=resume.get("step", 0), rows=resume.get("rows"), state=states.get(key),
                history=lambda: read_rows(self.run_dir / "metrics.jsonl"))
            self.sinks[key] = make(self.run_dir, config, logger_cfg, name=name, job_type=job_type, resume=sink_resume)
        self.record: LocalSink | None = next((s for s in self.sinks.values() if isinstance(s, LocalSink)), None)

    # ---------------------------------------------------------------------------------- resuming
    def resume_state(self) -> dict:
        """What the sinks need to resume, for a checkpoint's metadata: ``{"sinks": {name: state}}``."""
        return {"sinks": {key: state for key, sink in self.sinks.items() if (state := sink.resume_state())}}

    @staticmethod
    def resume_from_meta(meta: dict) -> dict:
        """The sinks' resume states in a checkpoint's metadata, for ``Tracker(resume={"sinks": ...})``.
        Checkpoints from before the sinks had their own key hold W&B's as ``wandb_run_id``/``wandb_step``."""
        if "sinks" in meta:
            return dict(meta["sinks"] or {})
        if meta.get("wandb_run_id"):
            return {"wandb": {"run_id": meta["wandb_run_id"], "step": meta.get("wandb_step")}}
        return {}

    @staticmethod
    def run_ids_from_meta(meta: dict) -> dict[str, str]:
        """The tracking runs a checkpoint belongs to: sink name -> run id (``{"wandb": "a1b2c3d4"}``)."""
        return {key: s["run_id"] for key, s in Tracker.resume_from_meta(meta).items()
                if isinstance(s, dict) and s.get("run_id")}

    @staticmethod
    def parent_ids(meta: dict) -> dict[str, str]:
        """A child run's link to the runs of the checkpoint it starts from: ``{"wandb_run_id": ...}``."""
        return {f"{key}_run_id": run_id for key, run_id in Tracker.run_ids_from_meta(meta).items()}

    def run_ids(self) -> dict[str, str]:
        """This run's tracking runs: sink name -> run id."""
        return {key: sink.run_id for key, sink in self.sinks.items() if getattr(sink, "run_id", None)}

    @property
    def rows(self) -> int:
        """Rows in metrics.jsonl so far (a checkpoint records it: a resume cuts the file back to it)."""
        return self.record.rows if self.record else 0

    # ----------------------------------------------------------------------------------- logging
    def log(self, metrics: dict[str, Any], step: int) -> None:
        with self._lock:
            for sink in self.sinks.values():
                sink.log(metrics, step)

    def _submit(self, key: str, job):
        """Run ``job`` on the media thread. When work comes faster than it can be drawn (tiny data sets),
        a newer job replaces the one of the same kind still waiting: the backlog stays at one per kind."""
        waiting = self._queued.get(key)
        if waiting is not None:
            waiting.cancel()
        self._queued[key] = self._media.submit(job)
        return self._queued[key]

    def log_eval(self, split: str, step: int, *, labels, preds, confidence, class_names, confusion, cal: dict,
                 images=None, sample: dict | None = None, boundary: dict | None = None):
        """Figures for one evaluation: PNGs under ``<run dir>/media``, then to every sink (W&B: tables and
        plots). Its scalars (loss, accuracy, per-class accuracy, ECE) are logged by the caller with the eval,
        never here: media may be skipped under backlog, scalars never. ``confusion``/``cal``: the eval step's
        counts. ``boundary``: 2-D data's predicted classes over a grid (``_boundary_grid``). Runs on the media
        thread; returns its future (None off process 0); ``finish`` waits for it."""
        if not self.sinks:
            return None

        def job():
            try:
                report = media.eval_report(split, labels=labels, preds=preds, confidence=confidence,
                                           class_names=class_names, images=images, sample=sample,
                                           out_dir=self.run_dir / "media", confusion=confusion, cal=cal)
                if boundary is not None:
                    report["files"]["decision_boundary"] = media.plot_decision_boundary(
                        boundary["points"], labels, boundary["grid"], boundary["grid_pred"],
                        self.run_dir / "media" / f"{split}_boundary.png", f"{split} decision boundary")
            except Exception:  # media must never cost the run
                log.exception("making the %s media at step %d failed", split, step)
                return None
            for key, sink in self.sinks.items():  # (each returns at once: no lock is held over a network)
                try:
                    sink.log_eval(split, step, report, labels=labels, preds=preds, confidence=confidence,
                                  class_names=class_names, images=images)
                except Exception:  # noqa: BLE001
                    log.exception("the %s media of step %d not handed to the %s sink", split, step, key)
            return report

        return self._submit(f"eval/{split}", job)

    def log_curves(self, final: bool = False) -> None:
        """Loss/accuracy curves as a PNG, from metrics.jsonl (the local mirror of the W&B charts). Mid-run (after
        an evaluation) redrawn at most every ``CURVES_EVERY_S`` seconds of the run, so a run of many quick
        evaluations does not spend its CPU drawing a picture nobody looks at between two of them; ``final`` (the
        run's end) always draws."""
        if not self.record:
            return
        now = time.monotonic()
        if not final and now - self._curves_at < CURVES_EVERY_S:
            return
        self._curves_at = now

        def job():
            with self._lock:  # (the loop appends under it: no half-written line is read)
                self.record.flush()
                rows = read_rows(self.record.path)
            (self.run_dir / "media").mkdir(exist_ok=True)
            media.plot_curves(rows, self.run_dir / "media" / "curves.png")

        self._submit("curves", job)

    def log_checkpoints(self, ckpt_dir: Path, aliases: dict[str, int | None]) -> None:
        """The checkpoints worth keeping (``{"best": step, "latest": step}``), to the sinks that keep them
        (W&B: model artifacts, when ``logger.log_checkpoints``)."""
        for sink in self.sinks.values():
            sink.log_checkpoints(Path(ckpt_dir), dict(aliases))

    def log_profile(self, trace_dir: Path, steps: tuple[int, int]) -> None:
        """A profiler trace of ``steps`` (first, last) in ``trace_dir``, to the sinks that keep it (W&B: an
        artifact of type "profile"). Sinks written before profiles existed (no ``log_profile``) are skipped."""
        for sink in self.sinks.values():
            if hasattr(sink, "log_profile"):
                sink.log_profile(Path(trace_dir), tuple(steps))

    def config(self, values: dict[str, Any]) -> None:
        """Numbers known once the run has started (the memory per device, from the compiled step), added to the
        run's config where a sink keeps one (W&B). Sinks without a config (``config``) are skipped."""
        for sink in self.sinks.values():
            if hasattr(sink, "config"):
                sink.config(dict(values))

    def log_image(self, key: str, path: Path, step: int) -> None:
        """One picture already written under the run directory (e.g. ``train/batch_preview``), to the sinks that
        keep pictures (W&B); the others have the file."""
        for name, sink in self.sinks.items():
            if hasattr(sink, "log_image"):
                try:
                    sink.log_image(key, Path(path), step)
                except Exception:  # noqa: BLE001
                    log.exception("%s not handed to the %s sink", key, name)

    def summary(self, values: dict[str, Any]) -> None:
        if self._media:
            self._media.submit(lambda: None).result()  # pending media first: the summary is the last word
        for sink in self.sinks.values():
            sink.summary(values)

    def finish(self, exit_code: int = 0) -> None:
        """Every sink finishes, even after another's failure (a full disk: DiskFull, raised once all have)."""
        if self._media:
            self._media.shutdown(wait=True)
        error: BaseException | None = None
        for sink in self.sinks.values():
            try:
                sink.finish(exit_code)
            except BaseException as e:
                error = error or e
        if error is not None:
            raise error


def run_metadata(run_dir: Path, devices, n_params: int) -> dict:
    """What W&B's config holds besides the resolved config: overrides, code version, environment."""
    meta: dict[str, Any] = {"parameters": n_params, "device_kind": devices[0].device_kind,
                            "device_count": len(devices), "platform": devices[0].platform}
    overrides = Path(run_dir) / ".hydra" / "overrides.yaml"
    if overrides.exists():
        meta["overrides"] = yaml.safe_load(overrides.read_text()) or []
    repo = Path(__file__).resolve().parents[2]
    try:
        git = lambda *a: subprocess.run(["git", *a], cwd=repo, capture_output=True, text=True, timeout=10)  # noqa: E731
        commit = git("rev-parse", "HEAD")
        if commit.returncode == 0:
            meta["git_commit"] = commit.stdout.strip()
            meta["git_dirty"] = bool(git("status", "--porcelain", "--untracked-files=no").stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    versions = {}
    for pkg in ("vision_train", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "hydra-core", "wandb", "torch",
                "torchvision", "numpy"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    meta["versions"] = versions
    return meta


def default_run_name(cfg, run_dir: Path) -> str:
    """What differs: model and data, then the command-line overrides (minus logger/hydra noise)."""
    name = f"{cfg.model.arch}-{cfg.data.name}"
    overrides = Path(run_dir) / ".hydra" / "overrides.yaml"
    if overrides.exists():
        noise = ("logger", "hydra", "model=", "data=", "trainer.progress_bar")
        extra = [o for o in (yaml.safe_load(overrides.read_text()) or []) if not o.lstrip("+~").startswith(noise)]
        if extra:
            name += " " + " ".join(extra)
    return name[:128]
