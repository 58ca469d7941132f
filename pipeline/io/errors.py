"""Errors of reading input data. Stages exit with code 2 on them (pipeline.runtime.cli.run)."""


class DataError(Exception):
    """The dataset could not be found or read."""


class NonFiniteError(DataError):
    """A model holds NaN or infinite values (training diverged): it is never saved, merged or
    registered."""


class TrackingUnavailable(Exception):
    """The MLflow tracking store cannot be reached or read. Stages stop at once with one line
    naming the store and exit 75 (EX_TEMPFAIL: try again when the store is back), which the
    flow's retries treat as a transient failure."""
