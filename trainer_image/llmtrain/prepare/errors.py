"""The one error type of the stage that a user fixes in the configuration."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration that validated but cannot be carried out; names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
