"""Errors that mean 'bad input, nothing computed': stages exit with code 2 on them
(pipeline.runtime.cli.run). A dataset that cannot be read raises pipeline.io.errors.DataError."""


class ConfigError(Exception):
    """A bad configuration value, named with its key."""
