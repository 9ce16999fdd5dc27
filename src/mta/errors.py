"""Errors a user can fix. The CLI prints these as one line and exits with code 2."""


class MtaError(Exception):
    """A problem with the user's input or environment, phrased as one actionable line."""


class DataError(MtaError):
    """Malformed or inconsistent data; the message names the file, record and field."""


class ModelNotFoundError(MtaError):
    """A registry model that has not been fetched, or a path that is not a model."""
