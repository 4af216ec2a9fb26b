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


def config_fields(cls, data, what: str, unknown: str) -> dict:
    """``data`` as keyword arguments for the dataclass ``cls``, checked first.

    A non-mapping is an error naming ``what``; keys that are not fields of ``cls`` are an
    error starting with ``unknown`` (e.g. "unknown prune config keys") and listing the
    allowed ones. Every config built from YAML or a dict goes through here.
    """
    import dataclasses
    from collections.abc import Mapping

    if not isinstance(data, Mapping):
        raise ConfigError(f"{what} must be a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    extra = set(data) - names
    if extra:
        raise ConfigError(f"{unknown} {sorted(extra)}; allowed: {sorted(names)}")
    return dict(data)
