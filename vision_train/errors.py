"""Errors a user can fix. The CLI prints them as one line and exits non-zero; anything else is a bug.

Also the command lines' handling of what goes wrong off the main thread (``install_background_error_handling``):
Orbax writes and reads checkpoints on background threads and event loops, and their failures are
reported again on the main thread, where the CLI says them in one line; their tracebacks go to the run's
log file, never to the console.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import errno
import io
import logging
import math
import os
import shutil
import sys
import threading
import warnings
from pathlib import Path


class UserError(Exception):
    """Base class: the message alone tells the user what to change."""


class ConfigError(UserError):
    """A config value is impossible. Names the key, the value and a fix."""

    def __init__(self, key: str, value, fix: str):
        self.key, self.value, self.fix = key, value, fix
        super().__init__(f"{key}={value!r}: {fix}")


def check_choice(key: str, value, options) -> None:
    """A ``ConfigError`` unless ``value`` is one of ``options``."""
    if value not in options:
        raise ConfigError(key, value, f"choose one of {', '.join(map(str, options))}")


def check_positive(key: str, value, *, allow_zero: bool = False) -> None:
    """A ``ConfigError`` unless ``value`` is > 0 (``allow_zero``: >= 0)."""
    if value is None or (value < 0 if allow_zero else value <= 0) or (isinstance(value, float) and math.isnan(value)):
        raise ConfigError(key, value, f"must be {'>= 0' if allow_zero else '> 0'}")


class DataError(UserError):
    """A data set is absent, corrupt or cannot be downloaded."""


class TrainingError(UserError):
    """Training cannot go on (e.g. the loss became NaN)."""


@contextlib.contextmanager
def exit_on_user_error(log):
    """A command-line tool's body (evaluate, predict): a UserError is one line and exit status 2, Ctrl-C is
    exit status 130. (Training's own CLI records more, for sweeps: vision_train/__main__.py.)"""
    try:
        yield
    except UserError as e:
        log.error("error: %s", e)
        sys.exit(2)
    except KeyboardInterrupt:
        log.error("interrupted")
        sys.exit(130)


# ------------------------------------------------------------------------------------- a full disk
class DiskFull(UserError):
    """Something could not be written: no space left on the device (or the disk quota is used up).

    ``what``: what was being written ("metrics", "the checkpoint at step 38", "the job record", ...);
    ``path``: where; ``note``: what is still there (e.g. the earlier checkpoints)."""

    def __init__(self, path, what: str, reason: str = "no space left on device", note: str = ""):
        self.path, self.what, self.reason, self.note = str(path), what, reason, note
        super().__init__(f"{reason}: could not write {what} to {path}" + (f"; {note}" if note else "") +
                         "; free space on that disk (or choose another directory) and run the same command again"
                         " (a training run resumes from its last checkpoint)")


_FULL_TEXT = {"No space left on device": "no space left on device", "os_error_code='28'": "no space left on device",
              "Disk quota exceeded": "disk quota exceeded", "os_error_code='122'": "disk quota exceeded"}


def disk_full_reason(e: BaseException | None) -> str | None:
    """"no space left on device" / "disk quota exceeded" when ``e`` (or an exception it was raised from or
    during, or one of an exception group's) is one, else None. TensorStore (Orbax) reports it in the text
    of a ValueError, Python as an OSError."""
    seen, todo = set(), [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, DiskFull):
            return x.reason
        if isinstance(x, OSError) and x.errno in (errno.ENOSPC, errno.EDQUOT):
            return "no space left on device" if x.errno == errno.ENOSPC else "disk quota exceeded"
        text = str(x)
        for needle, reason in _FULL_TEXT.items():
            if needle in text:
                return reason
        todo += [x.__cause__, x.__context__, *getattr(x, "exceptions", ())]
    return None


def disk_full_error(e: BaseException, what: str = "the run's files") -> DiskFull | None:
    """``e`` as a ``DiskFull`` naming the file it could not write (e.g. Hydra's own writes), or None when
    ``e`` is not a full disk."""
    reason = disk_full_reason(e)
    if not reason:
        return None
    if isinstance(e, DiskFull):
        return e
    seen, todo, path = set(), [e], None
    while todo and path is None:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError):
            path = x.filename or _file_written_in(x.__traceback__)
        todo += [x.__cause__, x.__context__]
    return DiskFull(path or "its directory", what, reason)


def _file_written_in(tb) -> str | None:
    """The file open for writing in the innermost frame of ``tb`` that has one (``with open(p, "w") as f:
    f.write(...)`` raises an OSError that does not name ``p``)."""
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        for value in frame.f_locals.values():
            if isinstance(value, io.IOBase) and isinstance(getattr(value, "name", None), str) and \
                    any(c in str(getattr(value, "mode", "")) for c in "wax+"):
                return value.name
    return None


def remove_quietly(path: str | Path) -> None:
    """Remove a temporary file or directory; what cannot be removed stays (nothing to do about it here)."""
    p = Path(path)
    with contextlib.suppress(OSError):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


@contextlib.contextmanager
def writing(path: str | Path, what: str, *, tmp: str | Path | None = None):
    """Around a write of ``what`` to ``path``: a full disk becomes one ``DiskFull`` naming both; ``tmp``
    (the temporary file written first, then renamed) is removed on any failure."""
    try:
        yield
    except BaseException as e:
        if tmp is not None:
            remove_quietly(tmp)
        reason = disk_full_reason(e) if isinstance(e, Exception) else None
        if reason and not isinstance(e, DiskFull):
            raise DiskFull(path, what, reason) from None
        raise


def write_text(path: str | Path, text: str, what: str) -> None:
    """Write ``text`` to ``path`` whole or not at all (a temporary file renamed; removed on failure); a full
    disk is a ``DiskFull`` naming ``what``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with writing(path, what, tmp=tmp):
        tmp.write_text(text)
        tmp.replace(path)


class Preempted(UserError):
    """SIGTERM/SIGINT/SIGUSR2: the step in progress finished, a checkpoint was saved, the run stops.
    ``requeue``: under submitit (SLURM), its checkpoint-and-requeue handler, for the caller to call once
    the run's records are written (it requeues the job, which resumes from the checkpoint, and exits)."""

    def __init__(self, message: str, signum: int = 0, requeue=None):
        super().__init__(message)
        self.signum, self.requeue = signum, requeue


# ------------------------------------------------------------------ errors off the main thread
def one_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300]}" if text else type(e).__name__


# Loggers of the libraries that report, with tracebacks, failures their caller gets as an exception
# anyway (Orbax logs through absl): their errors go to the log file only.
QUIET_LOGGERS = ("absl", "asyncio", "concurrent.futures", "orbax", "tensorstore")


def _log_files() -> list[logging.FileHandler]:
    return [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]


def log_file_name() -> str | None:
    files = _log_files()
    return files[0].baseFilename if files else None


def to_log_file(message: str, exc_info=None) -> bool:
    """Write ``message`` (and the traceback of ``exc_info``) to the log file(s) at DEBUG, whatever the
    loggers' levels, and not to the console. False when there is no log file."""
    files = _log_files()
    if not files:
        return False
    record = logging.LogRecord("vision_train.background", logging.DEBUG, __file__, 0, message, None, exc_info)
    for h in files:
        with contextlib.suppress(Exception):  # a log file that cannot be written (a full disk) loses the details
            h.handle(record)
    return True


def _thread_hook(args) -> None:
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "?"
    written = to_log_file(f"uncaught exception in background thread {name}",
                          (args.exc_type, args.exc_value, args.exc_traceback))
    if not written:
        _state["thread_hook"](args)
    elif not disk_full_reason(args.exc_value):  # a full disk is said in one line by the main thread
        logging.getLogger("vision_train").warning("warning: background thread %s failed: %s (details in %s)", name,
                                                  one_line(args.exc_value), log_file_name())


def _unraisable_hook(u) -> None:
    # E.g. after a failed Orbax restore, its reads still in flight finish onto a closed event loop or are
    # collected unfinished: the failure itself has been reported already.
    if u.exc_type is not None and issubclass(u.exc_type, KeyboardInterrupt):  # (vision_train.interrupts)
        return _state["unraisable_hook"](u)
    where = f" in {u.object!r}" if u.object is not None else ""
    if not to_log_file(f"{u.err_msg or 'exception ignored'}{where}", (u.exc_type, u.exc_value, u.exc_traceback)):
        _state["unraisable_hook"](u)


def _asyncio_handler(loop, context: dict) -> None:
    exc = context.get("exception")
    message = context.get("message", "unhandled exception in an event loop")
    if not to_log_file(f"event loop: {message}", (type(exc), exc, exc.__traceback__) if exc else None):
        loop.default_exception_handler(context)


class _ConsoleFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        name = record.name
        quiet = any(name == q or name.startswith(q + ".") for q in QUIET_LOGGERS)
        return not (quiet and (record.levelno >= logging.ERROR or record.exc_info))


def _exc_key(exc: BaseException) -> tuple[str, str]:
    """Exceptions that say the same thing: one full disk (Orbax reports it once per array), else type and text."""
    reason = disk_full_reason(exc)
    return ("disk full", reason) if reason else (type(exc).__name__, str(exc)[:500])


class _FileRepeats(logging.Filter):
    """In the log file an exception's traceback is written once; the same exception logged again (Orbax logs
    one failure from many threads and event loops) is one line, and after ``limit`` repeats nothing."""

    def __init__(self, limit: int = 10):
        super().__init__()
        self.limit, self.seen = limit, {}

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None:
            return True
        key = _exc_key(exc)
        n = self.seen[key] = self.seen.get(key, 0) + 1
        record.vt_repeat = n
        return n <= self.limit


class _Formatter(logging.Formatter):
    """On the console, a traceback logged from a background thread is one line (the whole is in the log
    file). In the log file, a repeated exception (``_FileRepeats``) is one line."""

    def __init__(self, inner: logging.Formatter | None, console: bool):
        super().__init__()
        self.inner, self.console = inner or logging.Formatter(), console

    def format(self, record: logging.LogRecord) -> str:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None:
            if self.console and record.thread != threading.main_thread().ident:
                return self._short(record, f"{one_line(exc)}; details in {log_file_name() or 'the log file'}")
            if not self.console and getattr(record, "vt_repeat", 1) > 1:
                return self._short(record, f"{one_line(exc)}; a traceback of it is above")
        return self.inner.format(record)

    def _short(self, record: logging.LogRecord, note: str) -> str:
        short = copy.copy(record)
        short.msg, short.args = f"{record.getMessage()} ({note})", None
        short.exc_info = short.exc_text = short.stack_info = None
        return self.inner.format(short)


def _show_warning(message, category, filename, lineno, file=None, line=None):
    # Orbax's writes cancelled by a failure leave coroutines never awaited; Python warns at exit.
    if issubclass(category, RuntimeWarning) and "never awaited" in str(message) and \
            to_log_file(f"{category.__name__}: {message} ({filename}:{lineno})"):
        return
    _state["showwarning"](message, category, filename, lineno, file, line)


def _handle_error(handler: logging.Handler, original):
    def handle_error(record):
        if disk_full_reason(sys.exc_info()[1]):
            return  # the log file's disk is full: what the run could not write is said in one line
        original(record)

    return handle_error


_state: dict = {}


def install_background_error_handling() -> None:
    """For the command lines (train, evaluate, predict), once logging is configured: exceptions of
    background threads, event loops and objects being collected (``threading.excepthook``, an asyncio
    exception handler on every new loop, ``sys.unraisablehook``) go to the log file at DEBUG, not to the
    console (a thread's failure other than a full disk is also one warning line), as do the warnings of
    coroutines never awaited; Orbax's and asyncio's error logs go to the log file only; a traceback logged
    from a background thread is one line on the console; in the log file each exception's traceback is
    written once (a full disk is one exception, however many arrays Orbax failed to write); a log file on a
    full disk is silently left behind. Exceptions on the main thread are untouched. Safe to call again
    (each job of a sweep: Hydra sets up logging per job)."""
    if not _state:
        _state.update(thread_hook=threading.excepthook, unraisable_hook=sys.unraisablehook,
                      policy=asyncio.get_event_loop_policy(), showwarning=warnings.showwarning)
        threading.excepthook = _thread_hook
        sys.unraisablehook = _unraisable_hook
        warnings.showwarning = _show_warning
        base = type(_state["policy"])

        class Policy(base):  # every new loop (Orbax makes one per background read/write) gets the handler
            def new_event_loop(self):
                loop = super().new_event_loop()
                loop.set_exception_handler(_asyncio_handler)
                return loop

        with contextlib.suppress(Exception):  # an exotic policy: asyncio's own logging is kept off the console below
            asyncio.set_event_loop_policy(Policy())
    for h in logging.getLogger().handlers:
        if getattr(h, "_vt_quiet", False):
            continue
        h._vt_quiet = True
        h.handleError = _handle_error(h, h.handleError)
        console = not isinstance(h, logging.FileHandler)
        h.addFilter(_ConsoleFilter() if console else _FileRepeats())
        h.setFormatter(_Formatter(h.formatter, console))


def uninstall_background_error_handling() -> None:
    """Undo ``install_background_error_handling`` (tests)."""
    if _state:
        threading.excepthook = _state["thread_hook"]
        sys.unraisablehook = _state["unraisable_hook"]
        warnings.showwarning = _state["showwarning"]
        asyncio.set_event_loop_policy(_state["policy"])
        _state.clear()
    for h in logging.getLogger().handlers:
        if getattr(h, "_vt_quiet", False):
            del h._vt_quiet, h.handleError
            for f in [f for f in h.filters if isinstance(f, (_ConsoleFilter, _FileRepeats))]:
                h.removeFilter(f)
            if isinstance(h.formatter, _Formatter):
                h.setFormatter(h.formatter.inner)
