"""Errors a user can act on: the CLI prints them as one line, without a traceback.

Exit codes are the same for every command (README, "Exit codes"): 0 ok, 1 the command's
own negative verdict (drift, failed files, a speaker in two splits), 2 a usage or
configuration error, 3 a runtime failure. The classes carry the code, so the core
decides what kind of failure it is and the CLI only prints it.
"""

EXIT_OK = 0
EXIT_VERDICT = 1
EXIT_USAGE = 2
EXIT_RUNTIME = 3


class KndError(Exception):
    """A failure caused by input or environment, not by a bug in knd (exit 3)."""

    exit_code = EXIT_RUNTIME


class UsageError(KndError):
    """A flag, argument or path the user gave is wrong or names nothing (exit 2)."""

    exit_code = EXIT_USAGE


class ConfigError(UsageError):
    """A configuration file, key or value is wrong (exit 2)."""
