"""The one exception type users see.

Anything the user can fix (a missing file, a wrong flag, a checkpoint we cannot read) is raised
as ``UserError`` with a single line that names the file or flag and says what to do. The CLI
entry points catch it and print only that line, so nobody has to read a traceback from deep
inside torch.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import NoReturn, TypeVar

T = TypeVar("T")


class UserError(Exception):
    """A problem with the user's input, explained in one line."""


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose own mistakes (an unknown option, a value of the wrong type or not
    among the choices) read like every other: one ``error:`` line, exit code 2.

    argparse prints the whole usage before its line, for the trainer well over a hundred lines of option
    names above the one that matters; here the line says where the list is instead.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} ({self.prog} --help lists the options)\n")


def one_line(exc: UserError) -> str:
    """The user's line, also when a DataLoader worker re-raised it wrapped in its traceback."""
    message = str(exc)
    if "Original Traceback" in message:
        last = [line for line in message.splitlines() if line.strip()][-1]
        message = last.split("UserError: ", 1)[-1]
    return message


def run_cli(main: Callable[[], T]) -> T:
    """Run a CLI ``main`` and turn a ``UserError`` into ``error: <message>`` and exit code 2."""
    try:
        return main()
    except UserError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
