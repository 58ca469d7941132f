"""Errors that mean 'bad input, nothing computed': stages exit with code 2 on them."""


class ConfigError(Exception):
    """A bad configuration value, named with its key."""


class DataError(Exception):
    """The dataset could not be found or read."""
