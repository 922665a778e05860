"""Command line: ``fluxvelo demo``, ``velocity``, ``compile``, ``benchmark`` and ``gen``."""

from __future__ import annotations

import argparse
import importlib
import sys


# Subcommands whose parsers import heavy modules (torch, the benchmark's peers): only the one that runs is built.
_LAZY_COMMANDS = {
    "benchmark": (
        "fluxvelo.benchmark._cli",
        "add_benchmark_parser",
        "fluxvelo against scVelo on the paper's datasets and on simulations with ground truth",
    ),
    "gen": ("fluxvelo.gen._cli", "add_gen_parser", "Generative models trained with Flux Matching."),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``fluxvelo`` parser.

    Parameters
    ----------
    command
        The subcommand about to run: only its parser among the heavy ones (``benchmark``, ``gen``) is built,
        the others appear in the help as one line. None builds them all.

    Returns
    -------
    The parser.
    """
    from . import __version__
    from ._cli import add_compile_parser, add_demo_parser, add_velocity_parser

    parser = argparse.ArgumentParser(prog="fluxvelo", description="RNA velocity with Flux Matching.")
    parser.add_argument("--version", action="version", version=f"fluxvelo {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    add_demo_parser(sub)
    add_velocity_parser(sub)
    add_compile_parser(sub)
    for name, (module, function, help_text) in _LAZY_COMMANDS.items():
        if command is not None and command != name:
            sub.add_parser(name, help=help_text, add_help=False)
            continue
        try:
            add = getattr(importlib.import_module(module), function)
        except ImportError:  # an optional dependency is missing
            continue
        add(sub)
    return parser


def _command(argv: list[str]) -> str:
    """The subcommand named in ``argv`` (its first word that is not an option), or ''."""
    return next((word for word in argv if not word.startswith("-")), "")


def main(argv: list[str] | None = None) -> int:
    """Run the command line; errors a user can fix print one line and return 1 (``--verbose``: the traceback)."""
    from ._cli import UsageError

    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(_command(argv)).parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UsageError as err:
        if getattr(args, "verbose", False):
            raise
        print(f"fluxvelo {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
