"""The library's errors. Messages speak of the library's own terms (config fields, files,
users); only the CLI turns a field into a flag name.

- ``MtaError``: something the user can fix (input, configuration, files). The CLI prints
  one line and exits with code 2.
- ``ResourceError``: the environment stopped the work (out of device memory, disk full,
  permissions, a lock held by another process). One line, exit code 3.
- Anything else is a bug (a broken invariant): the CLI shows the traceback and exits 1.
"""

from __future__ import annotations


class MtaError(Exception):
    """A problem with the user's input or configuration, phrased as one actionable line.

    ``fields`` names the config fields the message is about, qualified by their class
    (``"AdaptConfig.stack_lr"``), so that a front end can say which of its knobs to change.
    """

    exit_code = 2

    def __init__(self, message: str, fields: tuple[str, ...] = ()):
        super().__init__(message)
        self.fields = tuple(fields)


class ConfigError(MtaError):
    """An invalid configuration value; ``fields`` lists every offending field."""


class DataError(MtaError):
    """Malformed or inconsistent data; the message names the file, record and field."""


class ModelNotFoundError(MtaError):
    """A registry model that has not been fetched, or a path that is not a model."""


class ResourceError(MtaError):
    """The machine, not the input: out of memory, disk full, permissions, a busy lock."""

    exit_code = 3
