"""Tracking: one interface, two sinks (DESIGN.md, decision 5).

``Tracker`` writes every logged scalar to ``<run dir>/metrics.jsonl`` (always, even with W&B disabled)
and, on process 0, to Weights & Biases. Values are plain Python floats fetched by the caller on log
steps only, so both sinks receive identical numbers.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..errors import writing
from ..records import read_rows

log = logging.getLogger("vision_train")


class LocalSink:
    """``metrics.jsonl``: one JSON object per (step, logging call), written on the loop's thread in the
    loop's order, so two identical runs write identical files (but for timings)."""

    def __init__(self, run_dir: Path, keep_rows: int | None = None, keep_until_step: int = 0):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.rows = 0
        if self.path.exists():
            # Resuming: the rows written after the checkpoint (``keep_rows`` of them were there when it was
            # saved; older checkpoints: the rows up to its step) come again now, with the same values. The
            # file is cut to the checkpoint's rows (written aside first, then renamed); a line torn by the
            # crash is dropped.
            rows = read_rows(self.path)
            rows = rows[:keep_rows] if keep_rows is not None else [r for r in rows if r.get("step", 0) <= keep_until_step]
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

    def finish(self) -> None:
        with writing(self.path, "metrics"):
            self._f.close()


class Tracker:
    def __init__(self, run_dir: Path, config: dict, logger_cfg, *, is_main: bool = True, name: str | None = None,
                 resume_step: int = 0, resume_rows: int | None = None, run_id: str | None = None,
                 wandb_step: int | None = None):
        """``resume_step``/``resume_rows``: the checkpoint resumed from, and how many rows metrics.jsonl had
        when it was saved (None: a checkpoint that did not record it; the rows up to its step are kept)."""
        self.run_dir = Path(run_dir)
        self.local = LocalSink(self.run_dir, keep_rows=resume_rows, keep_until_step=resume_step) if is_main else None
        self.versions = config.get("meta", {}).get("versions", {})
        self._lock = threading.Lock()  # the media thread reads metrics.jsonl (curves)
        # Eval media (figures, tables) are made on one background thread, in order, so an eval costs
        # the training loop only the fetch of its predictions.
        self._media = ThreadPoolExecutor(max_workers=1, thread_name_prefix="media") if is_main else None
        self._queued: dict[str, Any] = {}  # kind of media job -> the latest one submitted
        self.wandb = None
        if is_main and logger_cfg.mode != "disabled":
            from .wandb_sink import WandbSink

            self.wandb = WandbSink(self.run_dir, config, logger_cfg, name=name, run_id=run_id, rewind_to=wandb_step)
            if run_id and self.wandb.mode == "offline":
                self._replace_offline_attempts(run_id)
            elif run_id and not self.wandb.rewound:  # online, a server without rewind: see WandbSink.replay
                self.wandb.replay(read_rows(self.local.path))

    def _replace_offline_attempts(self, run_id: str) -> None:
        """Resuming offline: an offline run cannot be rewound, so the earlier attempts' files (which hold
        the steps logged after the checkpoint) are moved to ``wandb/superseded/`` and the scalars up to
        the checkpoint are logged again from metrics.jsonl: the new file alone is the whole run, each
        step once. (Media of the evaluations before the checkpoint stay in the superseded files and in
        ``media/``.)"""
        import shutil

        current = Path(self.wandb.run.dir).parent
        old = [d for d in (self.run_dir / "wandb").glob(f"offline-run-*-{run_id}") if d != current]
        if not old:
            return
        (self.run_dir / "wandb" / "superseded").mkdir(exist_ok=True)
        for d in old:
            shutil.move(str(d), self.run_dir / "wandb" / "superseded" / d.name)
        for row in read_rows(self.local.path):
            self.wandb.log({k: v for k, v in row.items() if k != "step" and v is not None}, row["step"])
        log.info("W&B offline run %s resumed: %d earlier attempt(s) moved to wandb/superseded/", run_id, len(old))

    @property
    def wandb_step(self) -> int | None:
        """W&B's own history counter (to rewind to on resume)."""
        return self.wandb.step if self.wandb else None

    @property
    def run_id(self) -> str | None:
        """The W&B run id (a resumed run continues the same W&B run)."""
        return self.wandb.run.id if self.wandb else None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        with self._lock:
            if self.local:
                self.local.log(metrics, step)
            if self.wandb:
                self.wandb.log(metrics, step)

    def _submit(self, key: str, job):
        """Run ``job`` on the media thread. When work comes faster than it can be drawn (tiny data sets),
        a newer job replaces the one of the same kind still waiting: the backlog stays at one per kind."""
        waiting = self._queued.get(key)
        if waiting is not None:
            waiting.cancel()
        self._queued[key] = self._media.submit(job)
        return self._queued[key]

    @property
    def rows(self) -> int:
        """Rows in metrics.jsonl so far (a checkpoint records it: a resume cuts the file back to it)."""
        return self.local.rows if self.local else 0

    def log_eval(self, split: str, step: int, *, labels, preds, confidence, class_names, confusion, cal: dict,
                 images=None, sample: dict | None = None, boundary: dict | None = None):
        """Figures for one evaluation: PNGs under ``<run dir>/media``, tables and plots to W&B. Its scalars
        (loss, accuracy, per-class accuracy, ECE) are logged by the caller with the eval, never here: media
        may be skipped under backlog, scalars never. ``confusion``/``cal``: the eval step's counts.
        ``boundary``: 2-D data's predicted classes over a grid (``_boundary_grid``). Runs on the media
        thread; returns its future (None off process 0); ``finish`` waits for it."""
        if not self.local:
            return None

        def job():
            from . import media

            try:
                report = media.eval_report(split, labels=labels, preds=preds, confidence=confidence,
                                           class_names=class_names, images=images, sample=sample,
                                           out_dir=self.run_dir / "media", confusion=confusion, cal=cal)
                if boundary is not None:
                    report["files"]["decision_boundary"] = media.plot_decision_boundary(
                        boundary["points"], labels, boundary["grid"], boundary["grid_pred"],
                        self.run_dir / "media" / f"{split}_boundary.png", f"{split} decision boundary")
                if self.wandb:  # (the sink hands it to its own thread: no lock is held over the network)
                    self.wandb.log_eval(split, step, report, labels=labels, preds=preds,
                                        class_names=class_names, images=images)
                return report
            except Exception:  # media must never cost the run
                log.exception("making the %s media at step %d failed", split, step)

        return self._submit(f"eval/{split}", job)

    def log_curves(self) -> None:
        """Loss/accuracy curves as a PNG, from metrics.jsonl (the local mirror of the W&B charts)."""
        if not self.local:
            return
        from . import media

        def job():
            with self._lock:  # (the loop appends under it: no half-written line is read)
                self.local._f.flush()
                rows = read_rows(self.local.path)
            (self.run_dir / "media").mkdir(exist_ok=True)
            media.plot_curves(rows, self.run_dir / "media" / "curves.png")

        self._submit("curves", job)

    def summary(self, values: dict[str, Any]) -> None:
        if self._media:
            self._media.submit(lambda: None).result()  # pending media first: the summary is the last word
        if self.local:
            with writing(self.run_dir / "summary.json", "the summary"), open(self.run_dir / "summary.json", "w") as f:
                json.dump(values, f, indent=2)
        if self.wandb:
            self.wandb.summary(values)

    def finish(self, exit_code: int = 0) -> None:
        if self._media:
            self._media.shutdown(wait=True)
        try:
            if self.local:
                self.local.finish()  # (a full disk: DiskFull, once W&B has finished too)
        finally:
            if self.wandb:
                self.wandb.finish(exit_code)


def run_metadata(run_dir: Path, devices, n_params: int) -> dict:
    """What W&B's config holds besides the resolved config: overrides, code version, environment."""
    import importlib.metadata
    import subprocess

    meta: dict[str, Any] = {"parameters": n_params, "device_kind": devices[0].device_kind,
                            "device_count": len(devices), "platform": devices[0].platform}
    overrides = Path(run_dir) / ".hydra" / "overrides.yaml"
    if overrides.exists():
        import yaml

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
        import yaml

        noise = ("logger", "hydra", "model=", "data=", "trainer.progress_bar")
        extra = [o for o in (yaml.safe_load(overrides.read_text()) or []) if not o.lstrip("+~").startswith(noise)]
        if extra:
            name += " " + " ".join(extra)
    return name[:128]
