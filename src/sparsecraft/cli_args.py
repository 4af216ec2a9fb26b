"""Argument types shared by the ``sparsecraft`` command line and the command modules.

Only ``argparse`` here: ``cli.py`` and every module in ``cli.COMMAND_MODULES`` import this
while the parser is built. A bad value raises ``argparse.ArgumentTypeError``, which the
parser reports in one line before exiting with code 2.
"""

from __future__ import annotations

import argparse
from typing import Callable


def number_arg(what: str) -> Callable[[str], float]:
    """A ``type=`` for a number called ``what`` in messages ("sparsity must be a number, got 'x'")."""

    def parse(text: str) -> float:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be a number, got '{text}'") from None

    parse.__name__ = what
    return parse


def override_arg(what: str) -> Callable[[str], tuple[str, float]]:
    """A ``type=`` for ``RULE=VALUE`` (split at the last ``=``); the value is a number called ``what``."""

    def parse(text: str) -> tuple[str, float]:
        rule, sep, value = text.rpartition("=")
        if not sep or not rule:
            raise argparse.ArgumentTypeError(f"override must look like RULE={what.upper()}, got '{text}'")
        try:
            return rule, float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"override {what} must be a number in '{text}'") from None

    parse.__name__ = f"{what} override"
    return parse
