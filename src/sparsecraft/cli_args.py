"""Argument helpers shared by the ``sparsecraft`` command line and the command modules.

Light on imports: ``cli.py`` and every module in ``cli.COMMAND_MODULES`` import this while
the parser is built. A bad value raises ``argparse.ArgumentTypeError``, which the parser
reports in one line before exiting with code 2. The output-path checks
(:mod:`sparsecraft.outputs`) are re-exported here, so a command module needs one import.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Callable


def number_arg(what: str, *, minimum: float | None = None, exclusive: bool = False,
               below: float | None = None) -> Callable[[str], float]:
    """A ``type=`` for a number called ``what`` in messages ("sparsity must be a number, got 'x'").

    With ``minimum`` (``exclusive``: strictly above it) or ``below`` (strictly below it) the
    number must also be finite and in that range.
    """

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be a number, got '{text}'") from None
        if minimum is None and below is None:
            return value
        above_min = minimum is None or value > minimum or (value == minimum and not exclusive)
        if not (math.isfinite(value) and above_min and (below is None or value < below)):
            low = "" if minimum is None else f"{'>' if exclusive else '>='} {minimum:g}"
            high = "" if below is None else f"< {below:g}"
            raise argparse.ArgumentTypeError(f"{what} must be {' and '.join(filter(None, (low, high)))}, got '{text}'")
        return value

    parse.__name__ = what
    return parse


def int_arg(what: str, minimum: int = 1) -> Callable[[str], int]:
    """A ``type=`` for an integer ``>= minimum`` called ``what`` in messages."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be an integer, got '{text}'") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{what} must be an integer >= {minimum}, got '{text}'")
        return value

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


def fraction_arg(what: str) -> Callable[[str], float]:
    """A ``type=`` for a fraction in [0, 1) called ``what`` in messages."""
    return number_arg(what, minimum=0.0, below=1.0)


def shape_arg(text: str) -> tuple[int, ...]:
    """A ``type=`` for a shape written ``1,512`` or ``1x512``."""
    try:
        shape = tuple(int(x) for x in text.replace("x", ",").split(",") if x)
    except ValueError:
        raise argparse.ArgumentTypeError(f"input shape must look like 1,512, got '{text}'") from None
    if not shape or any(d < 1 for d in shape):
        raise argparse.ArgumentTypeError(f"input shape needs positive sizes, got '{text}'")
    return shape


shape_arg.__name__ = "shape"


def assignment_arg(text: str) -> tuple[str, str]:
    """A ``type=`` for ``KEY=VALUE`` (``--set``); the value is parsed later as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"--set needs KEY=VALUE, got '{text}'")
    return key.strip(), value


assignment_arg.__name__ = "KEY=VALUE"


def write_line(text: str) -> None:
    """A result line on standard output (diagnostics go through ``logging``)."""
    sys.stdout.write(text + "\n")


def add_format(parser) -> None:
    """The ``--format`` of commands that write a model (see ``sparsecraft.checkpoint.save``)."""
    parser.add_argument("--format", default="sparsecraft", choices=("sparsecraft", "dense-hf"),
                        help="sparsecraft: compressed checkpoint (default); dense-hf: a folder of plain dense "
                             "safetensors shards + config.json that transformers' from_pretrained loads")


def add_overwrite(parser) -> None:
    """The ``--overwrite`` flag every writing command takes (see :mod:`sparsecraft.outputs`)."""
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing outputs (only ones sparsecraft wrote)")


# The output-path policy, importable from here with the argument helpers.
from .outputs import MARKER, check_output, check_train_out, write_marker  # noqa: E402,F401
