"""The project's error types: each names the thing that is wrong and what to do about it.

Every command-line entry point prints an `Exo2EgoError` as one line (`error: ...`) and exits with status 2;
anything else is a bug and keeps its traceback. `EXO2EGO_DEBUG=1` (or `--debug`) shows the traceback of a
user error too.
"""
from __future__ import annotations

import errno
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


class StorageError(Exo2EgoError, OSError):
    """Writing to disk failed for a reason the user fixes (no space, a size limit, a read-only folder)."""


# errno values and the texts C++ writers (Orbax's TensorStore) put in their messages for them
_STORAGE = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is exceeded",
            errno.EFBIG: "a file size limit was hit (ulimit -f, or the filesystem's)",
            errno.EROFS: "the folder is on a read-only filesystem", errno.EACCES: "the folder is not writable"}
_STORAGE_TEXTS = {"No space left": errno.ENOSPC, "Disk quota exceeded": errno.EDQUOT, "File too large": errno.EFBIG,
                  "Read-only file system": errno.EROFS, "Permission denied": errno.EACCES}


def storage_problem(e: BaseException) -> str | None:
    """What went wrong with the disk, when `e` (or an exception it was raised from) is a storage fault."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _STORAGE:
            return _STORAGE[e.errno]
        for text, code in _STORAGE_TEXTS.items():
            if text in str(e):
                return _STORAGE[code]
        e = e.__cause__ or e.__context__
    return None


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
