"""The one exception type for user mistakes.

A :class:`ConfigError` carries a single-line message that says what was wrong and how to
fix it. The training entry point prints it and exits non-zero before any training starts.
"""


class ConfigError(ValueError):
    """A bad configuration or missing input, explained in one line."""
