"""Errors that raypfl reports to the user as one line (exit code 2)."""


class RaypflError(Exception):
    """Base class for user-facing errors: the message says what to change."""


class ConfigError(RaypflError):
    """A config value is invalid; the message names the key: `clients.per_round=120 > clients.num=100`."""


class DataError(RaypflError):
    """A dataset cannot be found or loaded; the message names the path tried and how to fix it."""


class RunStopped(RaypflError):
    """The federation could not go on (no quorum, no living actor); a checkpoint was written. Exit code 3."""
