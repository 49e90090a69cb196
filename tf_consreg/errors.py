"""Errors that the binaries report as one clear line before doing any work."""


class ConfigError(ValueError):
    """A flag, config field or input file is invalid.

    The message names the flag, field or file and says what to do; binaries
    print it as a single line and exit with status 2.
    """


def check(condition: bool, message: str) -> None:
    """Raises `ConfigError(message)` unless `condition` holds.

    Configs validate their fields with it in `__post_init__`, so each check
    is one line: the condition and the message that names the flag.

    Raises:
      ConfigError: `condition` is false.
    """
    if not condition:
        raise ConfigError(message)
