"""Errors a user can fix. The CLI prints them as one line and exits non-zero; anything else is a bug."""


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
