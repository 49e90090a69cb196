"""Errors that the binaries report as one clear line before doing any work."""


class ConfigError(ValueError):
    """A flag, config field or input file is invalid.

    The message names the flag, field or file and says what to do; binaries
    print it as a single line and exit with status 2.
    """
