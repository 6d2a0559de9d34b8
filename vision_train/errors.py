"""Errors a user can fix. The CLI prints them as one line and exits non-zero; anything else is a bug."""

import contextlib
import sys


class UserError(Exception):
    """Base class: the message alone tells the user what to change."""


class ConfigError(UserError):
    """A config value is impossible. Names the key, the value and a fix."""

    def __init__(self, key: str, value, fix: str):
        self.key, self.value, self.fix = key, value, fix
        super().__init__(f"{key}={value!r}: {fix}")


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
