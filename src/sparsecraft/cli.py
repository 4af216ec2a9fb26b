"""The ``sparsecraft`` command line: the top parser, dispatch and error handling.

The commands live in the ``commands.py`` of their subpackage (:data:`COMMAND_MODULES`);
each has ``register(subparsers) -> {command: handler}``. Under a parallel launcher
(``WORLD_SIZE`` > 1, e.g. ``torchrun``) only handlers marked ``handler.distributed = True``
run; any other command refuses, since every process would write the same output. Results go to standard output;
diagnostics go through ``logging`` to standard error.

Exit codes: 0 done; 2 bad arguments or bad input (a :class:`SparsecraftError`, or an
``OSError`` such as a full disk or a permission refused), with one line on standard error;
1 an unexpected error (one line; the traceback with ``-v``); 130 / 143 interrupted by
Ctrl-C / SIGTERM (both run the same clean-up: staging folders and spilled originals are
removed, except a streamed prune's ``.OUT.partial``, kept so that the same command resumes); 141 standard output closed early (``sparsecraft info ... | head``), silently.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading
import traceback

from .errors import SparsecraftError

log = logging.getLogger("sparsecraft.cli")

# Sub-packages add their own commands: each module has ``register(subparsers)`` returning
# {command: handler}. Keep these modules light: heavy imports belong inside the handlers.
COMMAND_MODULES: list[str] = [
    "sparsecraft.oneshot.commands", "sparsecraft.commands", "sparsecraft.train.commands",
    "sparsecraft.structured.commands", "sparsecraft.runtime.commands", "sparsecraft.recovery.commands",
    "sparsecraft.select.commands",
]


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line and exits 2."""

    def error(self, message):  # noqa: D401 - argparse API
        sys.stderr.write(f"{self.prog}: error: {' '.join(message.split())} (see --help)\n")
        raise SystemExit(2)


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    """The parser and the {command: handler} table of every registered command."""
    from . import __version__

    parser = _Parser(
        prog="sparsecraft",
        description="Make neural networks sparse, keep them good, and ship them small.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details (and tracebacks)")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings only, no progress bars")
    parser.add_argument("--version", action="version", version=f"sparsecraft {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands: dict = {}
    for module_name in COMMAND_MODULES:
        commands.update(importlib.import_module(module_name).register(sub))
    return parser, commands


def _configure_logging(args) -> None:
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args.quiet:  # transformers' and the hub's own progress bars too
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        if "transformers" in sys.modules:
            sys.modules["transformers"].utils.logging.disable_progress_bar()


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised as a KeyboardInterrupt so every Ctrl-C clean-up runs for it too."""


def _on_sigterm(signum, frame):
    raise _Terminated()


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _os_error(exc: OSError) -> str:
    what = exc.strerror or str(exc) or type(exc).__name__
    names = [n for n in (exc.filename, exc.filename2) if n is not None]
    return f"{what}: " + " -> ".join(f"'{os.fsdecode(n)}'" for n in names) if names else what


def _stdout_closed() -> None:
    """Standard output was closed by the reader: point it at /dev/null so the final flush
    at exit does not fail again (what the Python docs advise for SIGPIPE)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout without a file descriptor (captured in tests)
        pass


def main(argv=None) -> int:
    parser, commands = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    _configure_logging(args)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main_thread else None
    try:
        code = _dispatch(commands[args.command], args)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
    try:
        sys.stdout.flush()
    except BrokenPipeError:  # the last buffered lines found the pipe closed
        _stdout_closed()
        return 141
    return code


def _launched_in_parallel() -> bool:
    """Whether a launcher such as torchrun started several processes of this command."""
    return os.environ.get("WORLD_SIZE", "1").strip() not in ("", "0", "1")


def _dispatch(handler, args) -> int:
    name = f"sparsecraft {args.command}"
    if _launched_in_parallel() and not getattr(handler, "distributed", False):
        # every process would do the whole work and write the same output
        sys.stderr.write(f"{name}: error: {args.command} does not split its work over processes "
                         f"(WORLD_SIZE={os.environ['WORLD_SIZE']}); run it in one process (prune and run "
                         f"take torchrun)\n")
        return 2
    try:
        return handler(args)
    except SparsecraftError as exc:
        sys.stderr.write(f"{name}: error: {_one_line(exc)}\n")
        return 2
    except BrokenPipeError:
        _stdout_closed()
        return 141
    except _Terminated:
        sys.stderr.write(f"{name}: interrupted (SIGTERM)\n")
        return 143
    except KeyboardInterrupt:
        sys.stderr.write(f"{name}: interrupted (Ctrl-C)\n")
        return 130
    except OSError as exc:  # permission refused, disk full, ...
        if args.verbose:
            traceback.print_exc()
        sys.stderr.write(f"{name}: error: {_one_line(_os_error(exc))}\n")
        return 2
    except Exception as exc:  # a bug: one line, the traceback only when asked for
        if args.verbose:
            traceback.print_exc()
        sys.stderr.write(f"{name}: internal error: {type(exc).__name__}: {_one_line(exc)}"
                         f"{'' if args.verbose else ' (run with -v for the traceback)'}\n")
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
