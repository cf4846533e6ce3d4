"""The one exception type that turns into a one-line error message and a non-zero exit."""


class ConfigError(ValueError):
    """Bad input found before training: a config key, a value, a file or a combination.

    The message is printed as one line (``error: <message>``) and the process exits with
    status 2 before any MLflow run exists.
    """
