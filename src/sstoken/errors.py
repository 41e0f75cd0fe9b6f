"""Exceptions that the CLI turns into a one-line message instead of a traceback."""


class SSTokenError(Exception):
    """Base class: an error the user can fix (bad data, bad configuration, mismatched cache)."""


class DataError(SSTokenError):
    """A training file or row that cannot be used. The message names file, line and field."""


class ConfigError(SSTokenError):
    """A configuration value that cannot work, detected before training starts."""
