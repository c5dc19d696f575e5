"""Annotation-file reading shared by the data builders and the benchmark loaders: errors name the file."""
from __future__ import annotations

import json
import os

from exo2ego_jax.errors import DataError


def read_text(path: str, what: str) -> str:
    if not os.path.exists(path):
        raise DataError(f"{what} {path!r} does not exist; check --src / the data root", "missing file")
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
