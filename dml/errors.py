"""User-facing errors: anything raised as `DMLError` is printed by the CLI as one line."""

from __future__ import annotations


class DMLError(Exception):
    """A problem with the user's input (config, paths, data) that deserves a one-line message."""


class ConfigError(DMLError, ValueError):
    """A config file or override that does not fit the typed config."""


class DataError(DMLError):
    """A data source or shard directory that cannot be used as asked."""
