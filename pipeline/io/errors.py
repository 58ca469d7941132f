"""Errors of reading input data. Stages exit with code 2 on them (pipeline.runtime.cli.run)."""


class DataError(Exception):
    """The dataset could not be found or read."""


class NonFiniteError(DataError):
    """A model holds NaN or infinite values (training diverged): it is never saved, merged or
    registered."""
