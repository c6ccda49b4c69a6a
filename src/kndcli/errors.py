"""Errors a user can act on: the CLI prints them as one line, without a traceback."""


class KndError(Exception):
    """An error caused by input or environment, not by a bug in knd."""

    exit_code = 1


class ConfigError(KndError):
    """A configuration file, key or value is wrong."""

    exit_code = 2
