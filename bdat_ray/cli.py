"""What the command-line entry points share: bad input becomes one line on stderr and exit
code 2, before anything is trained."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from typing import NoReturn

from bdat_ray.config import ConfigError, describe_keys

EXIT_BAD_INPUT = 2


def fail(message: str) -> NoReturn:
    from bdat_ray.preflight import mask_secrets

    # One line, whatever the message quoted (a YAML error, an exception text), and never a
    # password from a URI in it.
    line = " ".join(mask_secrets(message).split())
    print(f"error: {line}", file=sys.stderr)
    raise SystemExit(EXIT_BAD_INPUT)


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line and exit 2, like every other bad input."""

    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see --help)")


def integer_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer ≥ ``low`` (argparse exits 2 with one line otherwise)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"takes an integer >= {low}; got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"takes an integer >= {low}; got {text}")
        return value

    return parse


positive = integer_at_least(1)


def keys_epilog() -> str:
    return (
        "configuration keys (KEY=VALUE; numbers may be fractions like 8/255):\n" + describe_keys()
    )


def config_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The parser every config-driven command starts from: positional ``KEY=VALUE``
    overrides, and --help listing every key with its default and unit."""
    parser = Parser(
        prog=prog,
        description=description,
        epilog=keys_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="configuration overrides")
    return parser


def main_guard(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """Wrap a CLI ``main``: `ConfigError` -> ``error: KEY: ...`` and exit 2."""

    def guarded(argv: list[str] | None = None) -> int:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
        try:
            return main(argv)
        except ConfigError as err:
            fail(str(err))

    return guarded
