"""Command line: ``fluxvelo demo``, ``fluxvelo velocity``, ``fluxvelo benchmark``, ``fluxvelo gen``."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from ._cli import add_demo_parser, add_velocity_parser

    parser = argparse.ArgumentParser(prog="fluxvelo", description="RNA velocity with Flux Matching.")
    parser.add_argument("--version", action="version", version=f"fluxvelo {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    add_demo_parser(sub)
    add_velocity_parser(sub)
    try:
        from .benchmark._cli import add_benchmark_parser
    except ImportError:  # the benchmark extra is optional
        pass
    else:
        add_benchmark_parser(sub)
    try:
        from .gen._cli import add_gen_parser
    except ImportError:
        pass
    else:
        add_gen_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
