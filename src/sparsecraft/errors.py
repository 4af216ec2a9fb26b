"""Errors raised by sparsecraft.

Every error a user can cause derives from :class:`SparsecraftError`, which is also a
``ValueError`` so generic callers that catch bad values keep working.
"""


class SparsecraftError(ValueError):
    """Base class for errors caused by bad input (config, model, file)."""


class ConfigError(SparsecraftError):
    """A configuration value breaks a rule (range, name, pattern syntax)."""


class TargetError(SparsecraftError):
    """A target rule or a targeted layer breaks a rule (no match, bad shape, NaN)."""


class FormatError(SparsecraftError):
    """A saved file is missing, truncated, tampered with, or cannot be written."""
