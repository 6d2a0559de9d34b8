"""The W&B sink. Imported only when logging to W&B is on; everything it writes stays under the run dir.

The server never slows or hangs the run:

- ``wandb.init`` is the only W&B call made on the caller's thread, once, at start-up, bounded by
  ``logger.init_timeout_s``. An unreachable server, refused credentials or a failed resume leave the
  run offline (one warning line), with the same run id, and no abandoned run directory.
- Every other call (history rows, media, summary, artifacts, the finish) goes to one background
  thread, in order. The caller only appends to a queue: history rows are never dropped; media
  (``log_eval``) are dropped, oldest first, when more than ``MEDIA_BACKLOG`` wait.
- ``finish`` waits at most ``logger.finish_timeout_s``; what was not uploaded by then stays in the
  run's W&B directory and the one line it prints gives the ``wandb sync`` command that uploads it.
"""

from __future__ import annotations

import collections
import io
import logging
import netrc
import os
import shutil
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

from ..errors import ConfigError
from .sinks import SinkResume

log = logging.getLogger("vision_train")

MEDIA_BACKLOG = 2  # eval media waiting for the W&B thread; an older one is dropped beyond this
NO_REWIND = ".no-rewind"  # in <run dir>/wandb: this run's server refused a rewind once; resume plainly


def _has_credentials() -> bool:
    """An API key in the environment, or in the netrc file (``$NETRC``) for the W&B host in use."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(_host()) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _base_url() -> str:
    return os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")


def _host() -> str:
    return urlparse(_base_url()).hostname or "api.wandb.ai"


def _isolate(run_dir: Path) -> None:
    """Keep W&B's files (runs, cache, artifact staging, settings) under ``<run dir>/wandb``, not $HOME.
    The user's W&B settings (e.g. the host chosen by ``wandb login --host``) are copied in, read-only use."""
    user_settings = Path(os.environ.get("WANDB_CONFIG_DIR", Path.home() / ".config" / "wandb")) / "settings"
    for var, sub in (("WANDB_DIR", ""), ("WANDB_CACHE_DIR", "wandb/.cache"), ("WANDB_DATA_DIR", "wandb/.data"),
                     ("WANDB_CONFIG_DIR", "wandb/.config"), ("WANDB_ARTIFACT_DIR", "wandb/.artifacts")):
        path = run_dir / sub
        path.mkdir(parents=True, exist_ok=True)
        os.environ[var] = str(path)
    if user_settings.is_file() and not (run_dir / "wandb/.config/settings").exists():
        shutil.copyfile(user_settings, run_dir / "wandb/.config/settings")


def _check_wandb_mode(wandb) -> None:
    """``$WANDB_MODE``, which W&B reads when a run starts: empty (``WANDB_MODE= python -m ...``) is unset; a value
    W&B would refuse (it dies with a 40-line validation traceback) is one line naming it. The run's own mode is
    logger.mode either way."""
    value = os.environ.get("WANDB_MODE")
    if value is None:
        return
    if not value.strip():
        del os.environ["WANDB_MODE"]
        return
    try:  # (W&B's own list: online, offline, shared, disabled, dryrun, run in wandb 0.31)
        import typing

        accepted = typing.get_args(wandb.Settings.model_fields["mode"].annotation)
    except Exception:  # noqa: BLE001
        accepted = ()
    if accepted and value not in accepted:
        raise ConfigError("WANDB_MODE", value, f"W&B accepts {', '.join(accepted)}; or unset it (this run's W&B mode "
                          f"is logger.mode: auto, online, offline or disabled)")


def _new_run_id() -> str:
    """A W&B run id as W&B makes them: 8 characters of [a-z0-9]."""
    import secrets
    import string

    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]


class _Item:
    __slots__ = ("kind", "fn", "rows", "what")

    def __init__(self, kind: str, fn, rows: int, what: str):
        self.kind, self.fn, self.rows, self.what = kind, fn, rows, what


class WandbSink:
    """One W&B run, a ``tracking.Sink``. Public: ``run`` (the wandb Run), ``run_id``, ``mode``
    (online/offline), ``rewound`` (a resume that W&B rewound to the checkpoint), ``step`` (W&B's history
    counter once everything queued is logged), and ``log``, ``log_eval``, ``log_checkpoints``, ``replay``,
    ``summary``, ``finish``: each returns at once; the W&B thread does the work in the order of the calls.

    ``resume``: the checkpoint a resumed run starts from; its ``state`` (this sink's ``resume_state()``
    then: the run id and W&B's history counter) continues that W&B run, rewound to the checkpoint where the
    server can, else with the rows up to it logged again (``replay``). ``job_type``: W&B's job type."""

    def __init__(self, run_dir: Path, config: dict, lc, *, name: str | None = None, job_type: str | None = None,
                 resume: SinkResume | None = None):
        self.run_dir = Path(run_dir)
        _isolate(self.run_dir)
        import wandb  # (an optional heavy import: only runs that log to W&B pay for it)

        _check_wandb_mode(wandb)
        self._wandb = wandb
        self.finish_timeout_s = float(getattr(lc, "finish_timeout_s", 60.0))
        self._log_checkpoints = bool(getattr(lc, "log_checkpoints", False))
        mode = lc.mode
        if mode == "auto":
            mode = "online" if _has_credentials() else "offline"
        state = (resume.state if resume is not None else None) or {}
        run_id, rewind_to = state.get("run_id"), state.get("step")
        self.resumed = run_id is not None
        # Our own id from the start: an offline fallback keeps the id the online run would have had, so
        # `wandb sync` later uploads it as that run.
        run_id = run_id or _new_run_id()
        kwargs = dict(project=lc.project, entity=lc.entity, name=lc.name or name, group=lc.group,
                      tags=list(lc.tags) or None, notes=lc.notes, config=config, dir=str(self.run_dir),
                      job_type=job_type, reinit="finish_previous", id=run_id,
                      resume="allow" if self.resumed else None)
        self.rewound = False
        self._kwargs = kwargs
        self._summary: dict = {}
        self.run, self.mode = self._init(mode, kwargs, lc.init_timeout_s, rewind_to)
        self._sync_dir = str(Path(self.run.dir).parent)
        self._service = self._service_process()
        self._logged = self.run.step  # W&B's history counter: one per run.log call (we never pass step=)
        self._queue: collections.deque[_Item] = collections.deque()
        self._cond = threading.Condition()
        self._current: _Item | None = None
        self._closed = False
        self._done = threading.Event()
        self._dropped_media = 0
        self._failures: dict[str, int] = {}
        self._wandb_timed_out = False
        self._tables = True  # tables (and W&B's confusion-matrix panel) can be logged
        self._abandoned = False  # finish gave up waiting: the W&B thread says nothing more
        self._exit_code = 0
        self.profiles: list[tuple[int, int]] = []  # the profiler traces handed to W&B as artifacts (first, last)
        self._thread = threading.Thread(target=self._work, name="wandb-sink", daemon=True)
        self._thread.start()
        self._put("define", self._define_metrics, 0, "metric definitions")
        if self.mode == "online":
            self._put("prepare", self._prepare_artifacts, 0, "the artifact client")
        if self.resumed and self.mode == "offline":
            self._replace_offline_attempts(resume.history)
        elif self.resumed and not self.rewound:  # online, a server without rewind: see replay
            self.replay(resume.history())

    @property
    def run_id(self) -> str:
        return self.run.id

    def resume_state(self) -> dict:
        """The run id and W&B's history counter (the point a rewind goes back to)."""
        return {"run_id": self.run.id, "step": self.step}

    def _replace_offline_attempts(self, history) -> None:
        """Resuming offline: an offline run cannot be rewound, so the earlier attempts' files (which hold
        the steps logged after the checkpoint) are moved to ``wandb/superseded/`` and the scalars up to
        the checkpoint (``history()``: metrics.jsonl's rows) are logged again: the new file alone is the whole
        run, each step once. (Media of the evaluations before the checkpoint stay in the superseded files
        and in ``media/``.)"""
        current = Path(self.run.dir).parent
        old = [d for d in (self.run_dir / "wandb").glob(f"offline-run-*-{self.run.id}") if d != current]
        if not old:
            return
        (self.run_dir / "wandb" / "superseded").mkdir(exist_ok=True)
        for d in old:
            shutil.move(str(d), self.run_dir / "wandb" / "superseded" / d.name)
        for row in history():
            self.log({k: v for k, v in row.items() if k != "step" and v is not None}, row["step"])
        log.info("W&B offline run %s resumed: %d earlier attempt(s) moved to wandb/superseded/", self.run.id, len(old))

    # ------------------------------------------------------------------------------------ start-up
    def _settings(self, **extra):
        """A fresh ``wandb.Settings`` for each ``wandb.init``: init fills in the object it is given, and a
        second init with the same one is refused. ``quiet``: no account look-up before the run starts (it
        costs 10 s more on an unreachable server) and no history sparklines at the end."""
        # W&B's own finish gives up a little before ours, so its end of run (and how far it got) is
        # known within logger.finish_timeout_s.
        wandb_finish = self.finish_timeout_s - min(5.0, 0.2 * self.finish_timeout_s)
        return self._wandb.Settings(console="off", quiet=True, finish_timeout=wandb_finish, **extra)

    def _init(self, mode: str, kwargs: dict, init_timeout_s: float, rewind_to: int | None):
        wandb = self._wandb
        if mode != "online":  # (silent: W&B's own offline notes; the end of the run says where it is, and how to sync)
            return wandb.init(mode=mode, settings=self._settings(silent=True), **kwargs), mode
        deadline = time.monotonic() + init_timeout_s  # all online attempts together
        error = None
        marker = self.run_dir / "wandb" / NO_REWIND
        if self.resumed and rewind_to is not None and not marker.exists():
            # Resuming after a crash: rewind the W&B run to the checkpoint, so the steps the dead attempt
            # logged after it are replaced, not duplicated. Needs a server with run rewind (a preview on
            # W&B's cloud, absent from self-hosted servers): tried once per run, then remembered.
            rewind = {k: v for k, v in kwargs.items() if k not in ("id", "resume")}
            try:
                run = self._attempt(mode="online", settings=self._settings(init_timeout=init_timeout_s),
                                    resume_from=f"{kwargs['id']}?_step={rewind_to}", **rewind)
                self.rewound = True
                return run, "online"
            except Exception as e:  # noqa: BLE001
                error = e
        remaining = deadline - time.monotonic()
        if remaining >= 1.0:
            try:
                run = self._attempt(mode="online", settings=self._settings(init_timeout=remaining), **kwargs)
                if error is not None:  # the server answered but cannot rewind: do not ask again
                    marker.write_text(f"{_base_url()}: {_first_line(error)}\n")
                return run, "online"
            except Exception as e:  # noqa: BLE001
                error = e
        run = self._attempt(mode="offline", settings=self._settings(silent=True), **kwargs)
        sync_dir = Path(run.dir).parent
        log.warning("W&B: no online run at %s (%s); logging offline, upload later with: wandb sync %s",
                    _base_url(), _first_line(error) if error else f"timed out after {init_timeout_s:g}s", sync_dir)
        return run, "offline"

    def _attempt(self, **init_kwargs):
        """``wandb.init``; after a failure: W&B's service process is torn down (a failed init can keep the
        run id claimed there, and the next init would be refused with "run ID ... is in use") and the run
        directory the failed init made is removed."""
        wandb_dir = self.run_dir / "wandb"
        before = set(wandb_dir.glob("*run-*"))
        try:
            return self._wandb.init(**init_kwargs)
        except BaseException:
            try:
                self._wandb.teardown()
            except BaseException:  # noqa: BLE001  (incl. the SystemExit it raises for a service that failed)
                pass
            for d in set(wandb_dir.glob("*run-*")) - before:
                if d.is_dir() and not d.is_symlink():
                    shutil.rmtree(d, ignore_errors=True)
            raise

    def _prepare_artifacts(self) -> None:
        """Every table (and checkpoint) is logged as an artifact, and W&B makes two synchronous network
        calls for each: (1) whether an artifact of that name exists with another type (~19 s when the
        server is down, during which nothing else reaches W&B); (2) the first one builds W&B's public API
        client, which verifies the credentials with the server (as long again). (1) only catches a type
        mismatch early, and our artifacts' names carry the run id and a fixed type (``run_table``,
        ``model``): skipped for this run. (2) is made now, on this thread, while the server was just
        reached; if it fails, this run's media go without tables rather than stall."""
        run = self.run
        if hasattr(run, "_assert_can_log_artifact"):
            run._assert_can_log_artifact = lambda artifact: None
        if hasattr(run, "_public_api"):
            try:
                run._public_api()
            except Exception as e:  # noqa: BLE001
                self._tables = False
                log.info("W&B: this run's media are logged without tables (%s)", _first_line(e))

    @staticmethod
    def _service_process():
        """W&B's service process (``wandb-core``), when this process started it (None otherwise)."""
        try:
            from wandb.sdk import wandb_setup

            return wandb_setup.singleton()._connection._proc._process
        except Exception:  # noqa: BLE001
            return None

    def _abandon(self) -> Path | None:
        """``finish`` gave up: W&B's service process is stopped, so that it cannot hold the exit of this
        process (it retries a stuck artifact upload for ever, its own finish timeout queued behind it, and
        W&B's exit hook waits for it without limit). Its transaction log then lacks its last block, so the
        run's scalars and summary are saved again, complete, as an offline run of the same id, which
        ``wandb sync`` uploads. W&B's own messages about the broken connection are muted (the next
        ``wandb.init`` sets them up again). Returns the offline run's directory (None if that failed)."""
        self._abandoned = True
        try:
            from wandb.errors import term

            term._silent = True
        except Exception:  # noqa: BLE001
            pass
        if self._service is not None and self._service.poll() is None:
            self._service.kill()
            self._service.wait()
            self._thread.join(timeout=5)  # its W&B call fails now (quietly): then W&B is ours again
        try:
            try:
                self._wandb.teardown()  # (the connection to the stopped process; it may complain)
            except BaseException:  # noqa: BLE001  (incl. the SystemExit it raises for the killed process)
                pass
            from ..records import read_rows

            run = self._wandb.init(mode="offline", settings=self._settings(silent=True),
                                   **{**self._kwargs, "resume": "allow"})
            run.define_metric("step")
            run.define_metric("*", step_metric="step")
            for row in read_rows(self.run_dir / "metrics.jsonl"):
                run.log({"step": row["step"], **{k: v for k, v in row.items() if k != "step" and v is not None}})
            for k, v in self._summary.items():
                run.summary[k] = v
            run.finish(exit_code=self._exit_code)
            return Path(run.dir).parent
        except Exception:  # noqa: BLE001
            return None

    def _define_metrics(self) -> None:
        # Our own "step" is the x-axis; W&B's internal _step just counts log calls, so media logged later
        # for an earlier step (they come from the media thread) are not dropped as out of order.
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    # ------------------------------------------------------------------------------- the W&B thread
    def _put(self, kind: str, fn, rows: int, what: str, droppable: bool = False) -> None:
        with self._cond:
            if self._closed:
                return
            if droppable:
                waiting = [it for it in self._queue if it.kind == "media"]
                for it in waiting[: max(0, len(waiting) - MEDIA_BACKLOG + 1)]:
                    self._queue.remove(it)
                    self._logged -= it.rows
                    self._dropped_media += 1
            self._queue.append(_Item(kind, fn, rows, what))
            self._logged += rows
            self._cond.notify_all()

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    self._cond.wait()
                item = self._current = self._queue.popleft()
            try:
                if not self._abandoned:
                    item.fn()
            except Exception as e:  # noqa: BLE001  (W&B must never cost the run; one line per kind of call)
                self._failures[item.kind] = self._failures.get(item.kind, 0) + 1
                if self._failures[item.kind] == 1 and not self._abandoned:
                    log.warning("W&B: %s not logged (%s)", item.what, _first_line(e))
            finally:
                with self._cond:
                    self._current = None
                    self._cond.notify_all()
            if item.kind == "finish":
                self._done.set()
                return

    @property
    def step(self) -> int:
        """W&B's history counter once every row queued so far is logged (what a rewind goes back to)."""
        with self._cond:
            return self._logged

    # ------------------------------------------------------------------------------------- logging
    def log(self, metrics: dict, step: int) -> None:
        row = {"step": step, **metrics}
        self._put("row", lambda: self.run.log(row), 1, f"the row of step {step}")

    def replay(self, rows) -> None:
        """A resume that could not rewind: the rows up to the checkpoint are logged again (identical values,
        as resume is exact), so the W&B run holds each of them even when the attempt that died was killed
        before W&B had uploaded them (it sends every ~15 s)."""
        n = 0
        for row in rows:
            self.log({k: v for k, v in row.items() if k != "step" and v is not None}, row["step"])
            n += 1
        marker = self.run_dir / "wandb" / NO_REWIND
        why = marker.read_text().strip() if marker.exists() else "no rewind step in the checkpoint"
        log.info("W&B run %s resumed without rewind (%s); the %d rows up to the checkpoint logged again",
                 self.run.id, why, n)

    def log_eval(self, split: str, step: int, report: dict, *, labels, preds, class_names, images=None,
                 **_) -> None:
        """Confusion matrix, figures and predictions table of one evaluation. The PNGs are read now (the
        next eval overwrites them); the W&B objects are built and logged on the W&B thread. Media, not
        scalars: dropped (oldest first) when more than ``MEDIA_BACKLOG`` wait."""
        files = {}
        for name, path in report["files"].items():
            try:
                files[name] = Path(path).read_bytes()
            except OSError:
                pass
        sample = report.get("sample")
        names = list(class_names)

        def job():
            from PIL import Image

            wandb = self._wandb
            payload = {}
            if self._tables:
                payload[f"{split}/confusion_matrix"] = wandb.plot.confusion_matrix(
                    y_true=labels.tolist(), preds=preds.tolist(), class_names=names, title=f"{split} confusion matrix")
            for name, data in files.items():
                payload[f"{split}/{name}"] = wandb.Image(Image.open(io.BytesIO(data)))
            if sample is not None and self._tables:
                per_class = len(names) <= 20
                cols = ["index", "image", "true", "pred", "confidence"] + ([f"p/{n}" for n in names] if per_class
                                                                         else ["probabilities"])
                table = wandb.Table(columns=cols)
                for i, probs in zip(sample["index"], sample["probs"]):
                    img = images[i] if images is not None and images.dtype.name == "uint8" else None
                    row = [int(i), wandb.Image(img[..., 0] if img is not None and img.shape[-1] == 1 else img)
                           if img is not None else None, names[labels[i]], names[int(probs.argmax())],
                           float(probs.max())]
                    row += [float(p) for p in probs] if per_class else [[float(p) for p in probs]]
                    table.add_data(*row)
                payload[f"{split}/predictions_table"] = table
            self.run.log({"step": step, **payload})

        self._put("media", job, 1, f"the {split} media of step {step}", droppable=True)

    def log_image(self, key: str, path: Path, step: int) -> None:
        """A picture file (read now) logged as ``key`` at ``step``, on the W&B thread."""
        data = Path(path).read_bytes()

        def job():
            from PIL import Image

            self.run.log({"step": step, key: self._wandb.Image(Image.open(io.BytesIO(data)))})

        self._put("media", job, 1, f"{key} of step {step}", droppable=True)

    def log_checkpoints(self, directory: Path, steps: dict[str, int | None]) -> None:
        """Checkpoint directories as model artifacts (when ``logger.log_checkpoints``): one per step,
        aliased "best" and/or "latest"."""
        if not self._log_checkpoints:
            return
        by_step: dict[int, list[str]] = {}
        for alias, step in steps.items():
            if step is not None:
                by_step.setdefault(step, []).append(alias)

        def job():
            for step, aliases in sorted(by_step.items()):
                art = self._wandb.Artifact(f"model-{self.run.id}", type="model", metadata={"step": step})
                art.add_dir(str(Path(directory) / str(step)))
                self.run.log_artifact(art, aliases=aliases + [f"step-{step}"])

        self._put("artifact", job, 0, "the checkpoint artifacts")

    def log_profile(self, trace_dir: Path, steps: tuple[int, int]) -> None:
        """The profiler trace directory as an artifact of type "profile", aliased ``steps-<first>-<last>``.
        Its files are copied to W&B's staging area on the W&B thread (the loop goes on meanwhile)."""
        first, last = steps

        def job():
            art = self._wandb.Artifact(f"profile-{self.run.id}", type="profile",
                                       metadata={"first_step": first, "last_step": last})
            art.add_dir(str(trace_dir))
            self.run.log_artifact(art, aliases=[f"steps-{first}-{last}"])
            self.profiles.append((first, last))

        self._put("profile", job, 0, "the profiler trace artifact")

    def config(self, values: dict) -> None:
        """Keys added to the run's config after its start (an offline fallback's re-created run gets them too)."""
        values = dict(values)
        self._kwargs["config"] = {**(self._kwargs.get("config") or {}), **values}

        def job():
            self.run.config.update(values, allow_val_change=True)

        self._put("config", job, 0, "the config")

    def summary(self, values: dict) -> None:
        values = dict(values)
        self._summary.update(values)

        def job():
            for k, v in values.items():
                self.run.summary[k] = v

        self._put("summary", job, 0, "the summary")

    # ---------------------------------------------------------------------------------------- end
    def _finish_run(self, exit_code: int) -> None:
        self.run.finish(exit_code=exit_code)
        self._wandb_timed_out = bool(getattr(self.run, "_finish_timed_out", False))

    def _pending(self) -> str:
        """What the W&B thread has not handed to W&B yet, in words."""
        with self._cond:
            items = ([self._current] if self._current else []) + list(self._queue)
        counts = collections.Counter(it.kind for it in items if it.kind not in ("define", "prepare", "finish"))
        words = {"row": "history rows", "media": "eval media", "summary": "the summary", "config": "the config",
                 "artifact": "checkpoint artifacts", "profile": "the profiler trace"}
        return ", ".join(f"{n} {words[k]}" if k in ("row", "media") else words[k] for k, n in counts.items())

    def finish(self, exit_code: int = 0) -> None:
        """Hand W&B the end of the run and wait for the upload, at most ``logger.finish_timeout_s``; then
        say in one line what is not uploaded and the ``wandb sync`` command that uploads it, and return."""
        self._exit_code = exit_code
        self._put("finish", lambda: self._finish_run(exit_code), 0, "the end of the run")
        with self._cond:
            self._closed = True
        if self._done.wait(self.finish_timeout_s):
            if self._dropped_media:
                log.info("W&B: %d eval media skipped (they came faster than W&B took them; PNGs in %s)",
                         self._dropped_media, self.run_dir / "media")
            if self.mode == "offline":
                log.info("W&B run saved offline; upload it with: wandb sync %s", self._sync_dir)
            elif self._wandb_timed_out:
                log.warning("W&B: %s did not take all of run %s within logger.finish_timeout_s=%gs; the rest is "
                            "in %s, upload it with: wandb sync --include-online %s", _base_url(), self.run.id,
                            self.finish_timeout_s, self._sync_dir, self._sync_dir)
            return
        pending = self._pending()
        saved = self._abandon()
        if saved is not None:
            log.warning("W&B: %s did not take all of run %s within logger.finish_timeout_s=%gs%s; its history and "
                        "summary are saved offline (media: PNGs in %s), upload them with: wandb sync %s",
                        _base_url(), self.run.id, self.finish_timeout_s,
                        f" ({pending} not yet handed to W&B)" if pending else "", self.run_dir / "media", saved)
        else:
            log.warning("W&B: %s did not take all of run %s within logger.finish_timeout_s=%gs; what W&B has is in "
                        "%s, upload it with: wandb sync --include-online %s", _base_url(), self.run.id,
                        self.finish_timeout_s, self._sync_dir, self._sync_dir)
