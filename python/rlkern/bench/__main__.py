"""``python -m rlkern.bench``: the same as ``rlkern bench`` (the CLI re-runs itself this way)."""

from __future__ import annotations

import argparse
import sys

from rlkern.bench import cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="rlkern bench", description=cli.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cli.add_arguments(parser)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
