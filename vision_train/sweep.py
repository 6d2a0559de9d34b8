"""Sweeps: one record per job, skipping finished jobs on a re-run, the sweep's summary table.

Every run writes ``<run dir>/job.json`` (status running -> finished | failed | interrupted, the error,
the objective and its value). A sweep (``python -m vision_train -m ...``) gives each job the directory
``<sweep dir>/<its overrides>``, so re-running the same command with the same ``hydra.sweep.dir`` finds
each job's earlier attempt: finished jobs are skipped, interrupted ones resume from their checkpoints,
failed ones run again. At the end ``SweepSummary`` (a Hydra callback) writes ``sweep_summary.csv`` and
``sweep_summary.md`` to the sweep directory and prints the table; ``python -m vision_train.sweep <dir>``
prints it for any sweep directory at any time (a sweep still running included).

Importable without Hydra: only ``SweepSummary`` uses it, and only when Hydra calls it.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from .config import OBJECTIVES, check_keys, has_validation, resolve_objective
from .errors import ConfigError, DiskFull, UserError, write_text, writing

try:  # the callback's base class; the rest of this module needs no Hydra
    from hydra.experimental.callback import Callback as _Callback
except ImportError:  # pragma: no cover
    _Callback = object

log = logging.getLogger("vision_train")

RECORD = "job.json"
# Environment a job's record keeps (where it ran, how JAX was told to use memory).
_ENV = ("XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_PYTHON_CLIENT_MEM_FRACTION", "CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID",
        "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "WANDB_SWEEP_ID")


# ------------------------------------------------------------------------------------------- records
def read_record(run_dir: str | Path) -> dict | None:
    try:
        return json.loads((Path(run_dir) / RECORD).read_text())
    except (OSError, ValueError):
        return None


def write_record(run_dir: str | Path, **values: Any) -> dict:
    """Update ``job.json`` (written aside, then renamed: a reader never sees half a file)."""
    path = Path(run_dir) / RECORD
    record = {**(read_record(run_dir) or {}), **values}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{RECORD}.{os.getpid()}.tmp")
    text = json.dumps(record, indent=2, default=str)
    try:
        with writing(path, "the job record", tmp=tmp):  # a full disk: one line, and no temporary file left
            tmp.write_text(text)
            tmp.replace(path)
    except DiskFull:
        # A full disk has no room for a second copy; the record's own blocks (a few KB, the file is
        # smaller) take the final status in place when it fits in them. A crash mid-write leaves a torn record,
        # which readers treat as absent; not writing it would leave the job "running" for good.
        if not path.exists() or len(text.encode()) > path.stat().st_blocks * 512:
            raise  # (it would need new blocks: the last complete record stays)
        with writing(path, "the job record"), open(path, "r+") as f:
            f.write(text)
            f.truncate()
    return record


def start_record(run_dir: str | Path, overrides: list[str], objective: str, clock_start: float | None = None) -> dict:
    """``clock_start``: what the job's start-up is timed from (the process's import for its first job)."""
    now = time.time()
    return write_record(run_dir, status="running", overrides=overrides, objective=objective, value=None,
                        error=None, conflict=None, started=_iso(now), started_ts=now, clock_start_ts=clock_start or now,
                        ended=None, ended_ts=None, host=socket.gethostname(),
                        pid=os.getpid(), attempts=(read_record(run_dir) or {}).get("attempts", 0) + 1,
                        env={k: os.environ[k] for k in _ENV if k in os.environ})


def end_record(run_dir: str | Path, status: str, *, value: float | None = None, error: str | None = None,
               objective: str | None = None) -> dict:
    """``objective``: as the run resolved it (auto becomes best/val/acc or none once the data are open)."""
    now = time.time()
    started = (read_record(run_dir) or {}).get("started_ts", now)
    return write_record(run_dir, status=status, value=value, error=error, ended=_iso(now), ended_ts=now,
                        wall_time_s=round(now - started, 2), **({"objective": objective} if objective else {}))


def record_unstarted(run_dir: str | Path, overrides: list[str], objective: str, status: str, **kw) -> dict:
    """A job that stopped before training started (bad config, Ctrl-C). A finished job's record stays as
    it is, the attempt noted beside it: its results are still the directory's."""
    earlier = read_record(run_dir)
    if earlier and earlier.get("status") == "finished":
        return write_record(run_dir, last_attempt={"status": status, "at": _iso(time.time()), **kw})
    start_record(run_dir, overrides, objective)
    return end_record(run_dir, status, **kw)


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(ts))


# ----------------------------------------------------------------------------------------- re-runs
def _refusal_path(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    return run_dir.parent / f".{run_dir.name}.refused.json"


def mark_refused(run_dir: str | Path, message: str) -> None:
    """A sweep's job refused (its directory holds a run that computed something else): said beside the
    directory, for the sweep's table, since a refused attempt changes no file inside it."""
    path = _refusal_path(run_dir)
    try:
        write_text(path, json.dumps({"error": message, "at": _iso(time.time())}), "the sweep's note of a refused job")
    except (OSError, DiskFull):
        pass  # (the table then shows the directory's own record; the error was said on the console)


def clear_refused(run_dir: str | Path) -> None:
    _refusal_path(run_dir).unlink(missing_ok=True)


def _refusal(run_dir: Path) -> dict | None:
    try:
        return json.loads(_refusal_path(run_dir).read_text())
    except (OSError, ValueError):
        return None


class JobConflict(UserError):
    """Another live process is training in the run directory."""


def check_not_running(run_dir: str | Path, sweep: bool = False) -> None:
    """Refuse to start a job whose directory another live process on this host is training in (a sweep
    re-run while the first is still going, two launchers on one directory)."""
    record = read_record(run_dir)
    if (record and record.get("status") == "running" and record.get("host") == socket.gethostname()
            and record.get("pid") != os.getpid() and _alive(record)):
        raise JobConflict(f"{run_dir} is being trained by process {record['pid']} on this host (since "
                          f"{record.get('started')}); wait for it or stop it, or use another "
                          f"{'hydra.sweep.dir' if sweep else 'hydra.run.dir'}")


def finished_line(run_dir: str | Path, summary: dict, objective: str | None = None) -> str:
    """What re-running a finished run's command says (in one line): when it finished, its summary, and
    how to train it again."""
    record = read_record(run_dir) or {}
    keys = [k for k in dict.fromkeys([objective, "test/acc", "test/loss", "best/val/acc", "val/acc"])
            if k and isinstance(summary.get(k), (int, float))]
    shown = ", ".join(f"{k} {_fmt(float(summary[k]), k)}" for k in keys) or "see summary.json"
    return (f"{run_dir} finished at {record.get('ended') or '?'}; its summary: {shown} "
            f"({Path(run_dir) / 'summary.json'}); nothing was changed. To train it again from the start use "
            f"trainer.resume=never (the earlier files are set aside, not overwritten)")


def group_name(sweep_dir: str | Path, max_len: int = 128) -> str:
    """A sweep's W&B group (``logger.group`` of its jobs): the sweep directory relative to the working
    directory when it is under it (``multirun/2026-11-22/10-00-00``), else its last two components
    (``/scratch/me/sweeps/lr-grid`` -> ``sweeps/lr-grid``); never an absolute path, at most 128 characters
    (W&B's limit), keeping the end."""
    path = os.path.abspath(str(sweep_dir))
    cwd = os.path.abspath(os.getcwd())
    rel = os.path.relpath(path, cwd) if path == cwd or path.startswith(cwd.rstrip(os.sep) + os.sep) else None
    if rel in (None, "."):
        rel = "/".join(Path(path).parts[-2:]).lstrip("/") or "sweep"
    name = rel.replace(os.sep, "/")
    return name[-max_len:].lstrip("/")


# --------------------------------------------------------------------------------------- the table
COLUMNS = ["job", "overrides", "status", "best/val/acc", "test/acc", "objective", "value", "wall_time_s", "startup_s",
           "error"]


def _alive(record: dict) -> bool:
    """A job recorded as running: is its process still there? (Same host only; elsewhere assume it is.)"""
    if record.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(record.get("pid", -1)), 0)
        return True
    except (OSError, ValueError):
        return False


def collect(sweep_dir: str | Path) -> list[dict]:
    """One row per job under ``sweep_dir`` (each directory holding a ``job.json``), in job order."""
    sweep_dir = Path(sweep_dir)
    rows = []
    for path in sweep_dir.rglob(RECORD):
        if "wandb" in path.relative_to(sweep_dir).parts:
            continue
        run_dir = path.parent
        record = read_record(run_dir) or {}
        summary = {}
        if (run_dir / "summary.json").exists():
            try:
                summary = json.loads((run_dir / "summary.json").read_text())
            except ValueError:
                pass
        status = record.get("status", "unknown")
        if status == "running" and not _alive(record):
            status = "interrupted"  # killed without a word (kill -9, node failure): re-run to resume
        refused = _refusal(run_dir)
        if refused:  # its directory holds another config's run: not this job's result
            status, summary, record = "conflict", {}, {**record, "conflict": refused["error"]}
        hydra_num = _job_num(run_dir)
        rows.append({
            "job": str(run_dir.relative_to(sweep_dir)) or ".",
            "num": hydra_num,
            "overrides": " ".join(record.get("overrides") or []),
            "status": status,
            "best/val/acc": summary.get("best/val/acc"),
            "test/acc": summary.get("test/acc"),
            "objective": record.get("objective"),
            "value": record.get("value") if status != "conflict" else None,
            "wall_time_s": record.get("wall_time_s") if status != "running" else None,
            "startup_s": summary.get("time/startup_s"),
            "error": record.get("conflict") or record.get("error") or "",
        })
    rows.sort(key=lambda r: (r["num"] if r["num"] is not None else 1 << 30, r["job"]))
    return rows


def _job_num(run_dir: Path) -> int | None:
    try:
        return int(yaml.safe_load((run_dir / ".hydra" / "hydra.yaml").read_text())["hydra"]["job"]["num"])
    except Exception:  # noqa: BLE001 (no Hydra files: a run made from Python)
        return None


def best_row(rows: list[dict]) -> dict | None:
    """The finished job with the best objective value (its direction from ``config.OBJECTIVES``)."""
    done = [r for r in rows if r["status"] == "finished" and r["objective"] in OBJECTIVES and _finite(r["value"])]
    if not done:  # (none: jobs without an objective are not ranked)
        return None
    # Jobs of one sweep may report different objectives (auto: best/val/acc, or none where a job's data have
    # no validation split); only the most common one is ranked.
    objectives = [r["objective"] for r in done]
    objective = max(set(objectives), key=objectives.count)
    done = [r for r in done if r["objective"] == objective]
    sign = -1.0 if OBJECTIVES.get(objective, "maximize") == "minimize" else 1.0
    return max(done, key=lambda r: sign * float(r["value"]))


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _fmt(v, key: str) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if key.endswith("_s"):
            return f"{v:.1f}"
        return f"{v:.4f}" if key.endswith("acc") else f"{v:.4g}"  # a loss can be 4e-05
    return str(v)


def split_overrides(rows: list[dict]) -> tuple[list[str], list[str]]:
    """(overrides every job shares, keys that differ between jobs): the table shows only the latter."""
    parsed = [dict(o.split("=", 1) if "=" in o else (o, "") for o in r["overrides"].split()) for r in rows]
    keys = list(dict.fromkeys(k for p in parsed for k in p))
    varying = [k for k in keys if len({p.get(k) for p in parsed}) > 1]
    common = [f"{k}={parsed[0][k]}" if parsed[0][k] else k for k in keys if k not in varying] if parsed else []
    return common, varying


def render(rows: list[dict]) -> tuple[str, str]:
    """(CSV, Markdown) of the rows; the best job is marked (``best`` column, and bold in Markdown). The
    Markdown table shows each row's ``swept`` overrides (those that differ between jobs, ``write_summary``);
    the CSV has every job's full list."""
    best = best_row(rows)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(COLUMNS + ["best"])
    for r in rows:
        writer.writerow([r[c] if r[c] is not None else "" for c in COLUMNS] + ["*" if r is best else ""])
    objectives = {r["objective"] for r in rows if r["objective"]}
    mixed = len(objectives) > 1
    md_cols = ["swept"] + [c for c in COLUMNS if c not in ("job", "overrides") + (() if mixed else ("objective",))]
    objective = "" if mixed else next(iter(objectives), "")
    names = {"value": f"value ({objective})" if objective else "value", "swept": "overrides"}
    header = ["", *[names.get(c, c) for c in md_cols]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [_fmt(r[c], c).replace("|", "\\|").replace("\n", " ") for c in md_cols]
        if r is best:
            cells = [f"**{c}**" if c else c for c in cells]
        lines.append("| " + " | ".join(["best" if r is best else "", *cells]) + " |")
    return out.getvalue(), "\n".join(lines) + "\n"


# Overrides a job's directory is not named by (conf/config.yaml: hydra.job.config.override_dirname.exclude_keys)
_UNNAMED = ("trainer.resume", "trainer.progress_bar", "logger.", "hardware.compilation_cache")


def write_summary(sweep_dir: str | Path) -> tuple[list[dict], str]:
    """Write ``sweep_summary.csv`` and ``sweep_summary.md`` to the sweep directory; return rows and Markdown."""
    sweep_dir = Path(sweep_dir)
    rows = collect(sweep_dir)
    common, varying = split_overrides(rows)
    for r in rows:  # what the Markdown table and the messages name a job by
        mine = dict(o.split("=", 1) if "=" in o else (o, "") for o in r["overrides"].split())
        # (a job alone, or jobs that share every override: its own, those its directory is named by)
        r["swept"] = (" ".join(f"{k}={mine[k]}" for k in varying if k in mine)
                      or " ".join(o for o in r["overrides"].split() if not o.lstrip("+~").startswith(_UNNAMED))
                      or r["job"])
    csv_text, md = render(rows)
    counts = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    order = ["finished", "failed", "interrupted", "running"]
    tail = ", ".join(f"{n} {s}" for s, n in sorted(counts.items(), key=lambda kv: (order + [kv[0]]).index(kv[0])))
    best = best_row(rows)
    title = f"# Sweep {sweep_dir}\n\n{len(rows)} jobs: {tail}."
    if best is not None:
        title += f" Best: {best['swept']} ({best['objective']} {best['value']:.4g}, in {best['job']})."
    if common:
        title += f"\n\nEvery job: {' '.join(common)}"
    md = f"{title}\n\n{md}"
    for name, text in (("sweep_summary.csv", csv_text), ("sweep_summary.md", md)):
        tmp = sweep_dir / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(sweep_dir / name)
    return rows, md


def check_direction(objective: str, sweeper) -> None:
    """An Optuna sweeper (``hydra.sweeper`` config) must optimise ``objective`` the right way (accuracy up,
    loss down); other sweepers have no direction."""
    if "optuna" not in str(sweeper.get("_target_", "")) or objective not in OBJECTIVES:
        return
    direction, want = sweeper.get("direction"), OBJECTIVES[objective]
    if isinstance(direction, str) and direction != want:
        raise ConfigError("hydra.sweeper.direction", direction, f"trainer.objective={objective} is better when "
                          f"{'larger' if want == 'maximize' else 'smaller'}; set hydra.sweeper.direction={want}")


def swept_keys(task_overrides: list[str], sweeper_params: dict | None = None) -> list[str]:
    """The keys whose values differ between a sweep's jobs, sorted: those of the command line's sweep
    overrides (``model=cnn,mlp``, ``range(...)``, ``choice(...)``, ``interval(...)``, ``glob(...)``) and of
    the sweeper's ``params`` (an Optuna search space, ``hydra.sweeper.params``). Needs Hydra."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    keys = set()
    for line in [*task_overrides, *(f"{k}={v}" for k, v in (sweeper_params or {}).items())]:
        try:
            override = parser.parse_override(str(line))
        except Exception:  # noqa: BLE001 (Hydra says what is wrong with it when the sweeper parses it)
            continue
        if override.is_sweep_override():
            keys.add(override.key_or_group)
    return sorted(keys)


class SweepSummary(_Callback):
    """Hydra callback (conf/config.yaml, hydra.callbacks): the summary table when a sweep ends. A sweep
    with failed jobs exits with status 1 after writing it (every other job has run).

    Before the first job it also tells every job which keys the sweep varies (``swept_keys``): its config
    gets ``hydra.callbacks.sweep_summary.swept`` (an override added to the sweep's Hydra overrides, which
    every job's config is composed with), and ``hydra.sweep.subdir`` names the job's directory by those
    keys first (``config.job_dir_name``)."""

    def __init__(self, swept: Any = None):
        self.swept = swept  # (a job's copy of the callback config carries the sweep's swept keys)

    def on_multirun_start(self, config, **kwargs) -> None:
        """Checked once, before any job (each job checks again, for sweeps whose jobs differ in them): no key
        the schema does not have (``+trainer.epochz=3``), and an Optuna search optimises its objective the
        right way."""
        try:
            check_keys(config)
            check_direction(resolve_objective(config.trainer.objective, has_validation(config.data)), config.hydra.sweeper)
        except UserError as e:
            log.error("error: %s", e)
            sys.exit(2)
        from omegaconf import OmegaConf, open_dict, read_write

        task = OmegaConf.to_container(config.hydra.overrides.task, resolve=False)
        params = config.hydra.sweeper.get("params")
        params = OmegaConf.to_container(params, resolve=False) if params is not None else None
        swept = ",".join(f'"{k}"' for k in swept_keys(task, params))
        with read_write(config.hydra), open_dict(config.hydra):
            config.hydra.overrides.hydra.append(f"++hydra.callbacks.sweep_summary.swept=[{swept}]")

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.exists():
            return
        rows, md = write_summary(sweep_dir)
        log.info("\n%s\n(written to %s and %s)", md, sweep_dir / "sweep_summary.md", sweep_dir / "sweep_summary.csv")
        # Every job that is not finished now (all of this sweep's have run): failed, interrupted, refused (a
        # conflict, or a directory another live process is training in: still "running").
        failed = [r for r in rows if r["status"] != "finished"]
        if failed:
            def why(r):
                if r["status"] == "running":
                    return "running: refused, another live process is training in its directory"
                return f"{r['status']} {r['error']}".strip()

            log.error("%d of %d jobs did not finish: %s", len(failed), len(rows),
                      "; ".join(f"{r.get('swept') or r['job']}: {why(r)}" for r in failed[:5]))
            sys.exit(1)


def main(argv: list[str] | None = None) -> int:
    """``python -m vision_train.sweep <sweep dir>``: (re)write and print a sweep's summary table."""
    p = argparse.ArgumentParser(prog="python -m vision_train.sweep", description=main.__doc__)
    p.add_argument("sweep_dir")
    args = p.parse_args(argv)
    if not Path(args.sweep_dir).is_dir():
        print(f"error: {args.sweep_dir}: no such directory (give a sweep directory, e.g. multirun/<date>/<time>)",
              file=sys.stderr)
        return 2
    if not collect(args.sweep_dir):
        print(f"error: {args.sweep_dir}: no jobs found (no */{RECORD}); give a sweep directory", file=sys.stderr)
        return 2
    rows, md = write_summary(args.sweep_dir)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
