"""The run's log file (``<run dir>/train.log``, Hydra's job log), written only once the attempt is accepted.

Hydra opens its job log before the task function runs. A re-run that is refused (a bad override, a run
directory holding another computation) or finds its run finished must leave the run directory as it was,
so this handler holds the attempt's records in memory until ``accept()``: then the file is opened and they
are written, in order, before everything after. Records of an attempt never accepted reach the console only.
"""

from __future__ import annotations

import logging

HOLD_AT_MOST = 10_000  # records held before acceptance (start-up says far fewer)


class AttemptLog(logging.FileHandler):
    """``hydra.job_logging.handlers.file.class`` (conf/config.yaml): a FileHandler that opens its file at
    ``accept()``."""

    def __init__(self, filename, mode: str = "a", encoding=None, delay: bool = True, errors=None):
        super().__init__(filename, mode, encoding, delay=True, errors=errors)
        self.accepted = False
        self.held: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if self.accepted:
            super().emit(record)
        elif len(self.held) < HOLD_AT_MOST:
            self.held.append(record)

    def accept(self) -> None:
        self.accepted = True
        held, self.held = self.held, []
        for record in held:
            super().emit(record)


def accept() -> None:
    """The attempt is accepted: every ``AttemptLog`` of the root logger writes what it held, and from now on."""
    for h in logging.getLogger().handlers:
        if isinstance(h, AttemptLog) and not h.accepted:
            h.accept()
