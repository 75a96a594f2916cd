"""The one error type for a user's mistake, and its kinds.

Every command prints a `UserError` as one line, `error: <message>`, and exits with code 2
(`core.cli.run_cli`). The message names the problem and the fix; the kinds exist so callers and
tests can tell a config from a data or a model problem.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input or an unusable environment, told to the user in one line with the fix."""


class ConfigError(UserError, ValueError):
    """A config file, a config key or a command-line flag."""


class DataError(UserError, ValueError):
    """A data file or data folder."""


class ModelLoadError(UserError, ValueError):
    """A model path that cannot be used."""


class StorageError(UserError, RuntimeError):
    """A study storage that cannot be opened; the message hides any password."""


class OutputError(UserError, RuntimeError):
    """An output that could not be written (disk full, no permission); what was there is intact."""
