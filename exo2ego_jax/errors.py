"""The project's error types: each names the thing that is wrong and what to do about it.

Every command-line entry point prints an `Exo2EgoError` as one line (`error: ...`) and exits with status 2;
anything else is a bug and keeps its traceback. `EXO2EGO_DEBUG=1` (or `--debug`) shows the traceback of a
user error too.
"""
from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable, Iterable
from typing import Any


class Exo2EgoError(Exception):
    """A user-facing problem (bad config, bad input file, unusable checkpoint) with its fix in the message."""


class ConfigError(Exo2EgoError, ValueError):
    """A config field holds a value that cannot work; the message names the field and what is allowed."""


class DataError(Exo2EgoError, ValueError):
    """A data problem in a named input (file, record, field) with what to do about it.

    `reason` is a short category ("missing video", "corrupt video", ...) that build summaries and evaluation
    count skips by.
    """

    def __init__(self, message: str, reason: str = "bad input"):
        super().__init__(message)
        self.reason = reason


class CheckpointError(Exo2EgoError, ValueError):
    """A checkpoint on disk does not match what is expected (names the folder, file or tensor)."""


DEBUG_ENV = "EXO2EGO_DEBUG"


def run_cli(main: Callable[[], int]) -> int:
    """Run a command-line entry point: a user error (`Exo2EgoError`) prints one line and returns 2; with
    EXO2EGO_DEBUG=1 its traceback too. Anything else is a bug and propagates with its traceback."""
    try:
        return main()
    except Exo2EgoError as e:
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return 2


def run_config_cli(parser: Callable[[], Any], main: Callable[[list], int]) -> None:
    """The entry point of a CLI that takes `--config FILE:PRESET --config.field=value` overrides: `--help` prints
    the parser's help (before any config is read), anything else runs `main(argv)` under `run_cli`."""
    argv = sys.argv[1:]
    if any(x in ("-h", "--help") for x in argv):
        parser().print_help()
        sys.exit(0)
    sys.exit(run_cli(lambda: main(argv)))


def check_choice(field: str, value: Any, allowed: Iterable) -> None:
    """Raise a ConfigError naming the config field and the allowed values."""
    allowed = list(allowed)
    if value not in allowed:
        raise ConfigError(f"config field {field!r} is {value!r}; allowed values: {sorted(map(str, allowed))}")
