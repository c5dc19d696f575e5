"""Errors and annotation-file reading shared by the data builders and the benchmark loaders."""
from __future__ import annotations

import json
import os


class DataError(ValueError):
    """A data problem in a named input (file, record, field) with what to do about it.

    `reason` is a short category ("missing video", "corrupt video", ...) that build summaries count skips by.
    """

    def __init__(self, message: str, reason: str = "bad input"):
        super().__init__(message)
        self.reason = reason


def read_text(path: str, what: str) -> str:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist; check --src / the data root")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{what} {path!r} is not UTF-8 (byte {e.start}, line {line}); re-encode it as UTF-8 "
                        f"(e.g. iconv -f latin1 -t utf-8)", "not UTF-8") from e


def read_json(path: str, what: str):
    try:
        return json.loads(read_text(path, what))
    except json.JSONDecodeError as e:
        raise DataError(f"{what} {path!r} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}",
                        "invalid JSON") from e
