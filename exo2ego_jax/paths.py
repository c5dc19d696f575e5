"""Paths a user gives, resolved once at start-up: `~` expanded and made absolute against the current directory.

Every command-line path (workdirs, outputs, checkpoints, data roots) and every path field of a stage config
goes through `absolute`, so a run behaves the same from any directory, and libraries that need absolute paths
(Orbax) never see a relative one.
"""
from __future__ import annotations

import os


def absolute(path: str) -> str:
    """`path` with `~` expanded, made absolute and normalised; an empty path stays empty (an unset option)."""
    return os.path.abspath(os.path.expanduser(path)) if path else path
