"""The ``mediar-ray`` command line.

Each sub-command lives in its own module under :mod:`mediar_ray.commands` and exposes
``add_parser(subparsers)``, which registers the sub-command and sets ``func`` (a callable
taking the parsed ``argparse.Namespace`` and returning an exit code). Heavy imports
(torch, ray) happen inside ``func`` so that ``mediar-ray --help`` stays fast.

Exit codes of every command: 0 done; 1 some items failed (each listed with its reason,
the others done); 2 a usage error found before the work (an option out of range, a
missing or unreadable input, output, checkpoint or config, missing credentials), told in
one line naming the file or option and the fix; 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Sequence

from mediar_ray import __version__

# Sub-command modules, in the order ``--help`` lists them. A module that is not there yet
# (an issue still in progress) is skipped, so the CLI never breaks on a partial checkout.
COMMAND_MODULES = (
    "segment",
    "evaluate",
    "segment_slides",
    "cells",
    "report",
    "map_dataset",
    "discover_modalities",
    "train",
    "to_spatialdata",
)


def build_parser() -> argparse.ArgumentParser:
    """Build the ``mediar-ray`` parser with every sub-command of :data:`COMMAND_MODULES`
    that this checkout has.

    Returns
    -------
    argparse.ArgumentParser
        The top-level parser; each sub-command sets ``func`` on the parsed namespace.
    """
    parser = argparse.ArgumentParser(
        prog="mediar-ray",
        description="MEDIAR cell instance segmentation, on one machine or a Ray cluster.",
    )
    parser.add_argument("--version", action="version", version=f"mediar_ray {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"mediar_ray.commands.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"mediar_ray.commands.{name}":
                continue
            raise
        module.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``mediar-ray``: parse ``argv``, set up logging and call the sub-command.

    A user error (see :func:`is_user_error`) is logged as one line and gives exit code 2;
    any other exception propagates with its traceback.

    Parameters
    ----------
    argv : sequence of str, optional
        The arguments after the program name (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        The exit code: the sub-command's, 2 for a user error or no sub-command, 130
        when interrupted.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        logging.getLogger("mediar_ray").error("interrupted")
        return 130
    except Exception as err:
        if not is_user_error(err):
            raise  # a bug: keep its traceback
        from mediar_ray.io import describe_error

        text = str(err) if isinstance(err, ValueError) else describe_error(err)
        logging.getLogger("mediar_ray").error(
            "%s", text.splitlines()[0] if text else type(err).__name__
        )
        logging.getLogger("mediar_ray").debug("traceback:", exc_info=True)
        return 2


#: Errors from outside the project that also mean "the user must fix an input or the
#: environment" (matched by class name so that checking costs no imports of botocore).
USER_OS_ERRORS = frozenset(
    {
        "FileNotFoundError",
        "PermissionError",
        "NotADirectoryError",
        "IsADirectoryError",
        "NoCredentialsError",
        "PartialCredentialsError",
    }
)


def is_user_error(err: BaseException) -> bool:
    """True for the errors that end in one line and exit code 2 instead of a traceback:
    every :class:`~mediar_ray.errors.UserError`, and the OS and credential errors above."""
    from mediar_ray.errors import UserError

    if isinstance(err, UserError):
        return True
    return any(cls.__name__ in USER_OS_ERRORS for cls in type(err).__mro__)


if __name__ == "__main__":
    sys.exit(main())
