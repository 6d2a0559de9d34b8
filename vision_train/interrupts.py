"""Ctrl-C and SIGTERM stop a command-line run at any moment: one line, no traceback, exit status 130
(SIGINT) or 143 (SIGTERM).

From the first line of ``python -m vision_train`` the signals are caught: while the command line's own
modules are imported (a second or two), a signal is held and acted on as soon as they are (a second one
exits at once); from then until the training loop takes the signals over (it finishes its step and saves
a checkpoint first: ``train.loop._StopOnSignal``), either signal raises ``Interrupted``, a
``KeyboardInterrupt``, in the main thread. Python cannot raise it everywhere: one
raised inside a garbage-collection callback (JAX registers one, and it runs often during imports and
compilation) or a ``__del__`` method is printed as "Exception ignored in ..." and dropped, and the run
used to go on and train to the end. ``sys.unraisablehook`` sees such a dropped interrupt; it is said
nowhere and delivered again a moment later, outside that callback.

Importable without Hydra, W&B or JAX.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_state = {"exiting": False, "held": 0}


class Interrupted(KeyboardInterrupt):
    """SIGINT (Ctrl-C) or SIGTERM during start-up, raised in the main thread."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


def signum_of(e: BaseException | None) -> int:
    return int(getattr(e, "signum", signal.SIGINT))


def interrupt_behind(e: BaseException | None) -> KeyboardInterrupt | None:
    """The interrupt an exception stands for, if one does: an extension module whose initialisation a Ctrl-C
    interrupts (jaxlib's, while JAX is imported) raises ImportError "Encountered an error while
    initializing the extension" with the KeyboardInterrupt as its cause."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def exit_status(signum: int) -> int:
    """130 for SIGINT, 143 for SIGTERM (128 + the signal's number, as a shell reports a signalled process)."""
    return 130 if signum == signal.SIGINT else 143


def describe(signum: int) -> str:
    return "Ctrl-C (SIGINT)" if signum == signal.SIGINT else signal.Signals(signum).name


def _raise(signum, frame):
    raise Interrupted(signum)


def _hold(signum, frame):
    if _state["held"]:  # a second one while the first is held: exit now
        os.write(2, f"interrupted by {describe(signum)}\n".encode())
        os._exit(exit_status(signum))
    _state["held"] = signum


def hold() -> None:
    """From now on SIGINT and SIGTERM are held (the first one) until ``install`` (main thread only)."""
    if threading.current_thread() is threading.main_thread():
        for sig in SIGNALS:
            signal.signal(sig, _hold)


@contextlib.contextmanager
def held():
    """Within: SIGINT and SIGTERM held, then raised on leaving (main thread; elsewhere a plain block). For
    the C++ extensions' initialisation (JAX, XLA's MLIR bindings, TensorStore): an interrupt raised while
    they call back into Python aborts the process (SIGABRT) or becomes an ImportError."""
    if threading.current_thread() is not threading.main_thread() or _state["exiting"]:
        yield
        return
    before = {sig: signal.getsignal(sig) for sig in SIGNALS}
    hold()
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
        signum, _state["held"] = _state["held"], 0
        if signum:
            raise Interrupted(signum)


def install() -> None:
    """From now on SIGINT and SIGTERM raise ``Interrupted`` (main thread only; elsewhere a no-op); one held
    since ``hold`` is raised now."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in SIGNALS:
        signal.signal(sig, _raise)
    guard_unraisable()
    held, _state["held"] = _state["held"], 0
    if held:
        raise Interrupted(held)


def guard_unraisable() -> None:
    """Put (again) on top of ``sys.unraisablehook`` the hook that delivers a dropped interrupt again.
    Call it after anything else sets that hook (the CLI's background-error handling does)."""
    current = sys.unraisablehook
    if getattr(current, "_vt_interrupts", False):
        return

    def hook(u, _previous=current):
        if isinstance(u.exc_value, KeyboardInterrupt) or (u.exc_type is not None and
                                                          issubclass(u.exc_type, KeyboardInterrupt)):
            if not _state["exiting"]:
                _deliver_again(signum_of(u.exc_value))
            return
        _previous(u)

    hook._vt_interrupts = True
    sys.unraisablehook = hook


def _deliver_again(signum: int) -> None:
    # From another thread, a moment later: the main thread runs the handler once it is out of the callback
    # that dropped the first one (should it land in another such callback, this happens again).
    timer = threading.Timer(0.05, signal.pthread_kill, (threading.main_thread().ident, signum))
    timer.daemon = True
    timer.start()


def _forget_unhandled_interrupt() -> None:
    # CPython notes a KeyboardInterrupt that passed through C code running Python source (PyRun_*, which some
    # extensions use) and then ends the process by SIGINT whatever its exit status: a shell sees 130 either
    # way, a parent process -2 instead of 130. The interrupt has been handled here, so the note is cleared.
    try:
        import ctypes

        ctypes.c_int.in_dll(ctypes.pythonapi, "_Py_UnhandledKeyboardInterrupt").value = 0
    except Exception:  # noqa: BLE001 - another Python: at worst the parent sees -2 (killed by SIGINT)
        pass


def stop(signum: int, message: str | None = None) -> None:
    """End the process for ``signum``: ``message`` (one line) on stderr if given, exit status 130 or 143. A
    further SIGINT or SIGTERM while exiting (e.g. while W&B finishes) exits at once."""
    _state["exiting"] = True
    if threading.current_thread() is threading.main_thread():
        for sig in SIGNALS:
            signal.signal(sig, lambda s, f: os._exit(exit_status(s)))
    if message:
        print(message, file=sys.stderr, flush=True)
    _forget_unhandled_interrupt()
    sys.exit(exit_status(signum))
