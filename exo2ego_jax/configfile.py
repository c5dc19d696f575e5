"""Config files on the command line: `--config FILE.py:PRESET` and `--config.FIELD=VALUE` overrides.

A config file defines `get_config(preset) -> ml_collections.ConfigDict`. Overrides are typed by the field they
set: booleans take true/false/1/0, numbers parse as numbers, tuples and lists as Python literals
(`--config.mesh.shape='(1,8,1)'`), strings as given. A missing file, an unknown preset, a misspelled field or a
value of the wrong type is a `ConfigError` naming it and the fix.
"""
from __future__ import annotations

import ast
import difflib
import importlib.util
import os
from collections.abc import Sequence

import ml_collections

from exo2ego_jax.errors import ConfigError


def load_config_file(path: str, preset: str, overrides: dict | None = None) -> ml_collections.ConfigDict:
    """`get_config(preset)` of a config file, with dotted-key overrides ({"optim.learning_rate": 1e-4}); string
    values are parsed by the type of the field they set."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist; pass --config FILE.py:PRESET (e.g. "
                          "configs/stage3.py:tiny)")
    name = "config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ConfigError:
        raise
    except Exception as e:  # the user's file: name it and its error, not our stack
        raise ConfigError(f"config file {path!r} raised {type(e).__name__} while loading ({_where(e, path)}{e}); "
                          "fix the file") from e
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path!r} defines no get_config(preset)")
    try:
        c = module.get_config(preset)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"config file {path!r}: get_config({preset!r}) raised {type(e).__name__} "
                          f"({_where(e, path)}{e}); fix the file") from e
    apply_overrides(c, overrides or {})
    return c


def _where(e: BaseException, path: str) -> str:
    """'line N: ' of the innermost frame in the config file, when the traceback passes through it."""
    line = None
    if isinstance(e, SyntaxError) and e.lineno:
        return f"line {e.lineno}: "
    tb = e.__traceback__
    while tb is not None:
        if os.path.abspath(tb.tb_frame.f_code.co_filename) == os.path.abspath(path):
            line = tb.tb_lineno
        tb = tb.tb_next
    return f"line {line}: " if line else ""


def apply_overrides(c: ml_collections.ConfigDict, overrides: dict) -> None:
    """Set dotted keys; an unknown key is a ConfigError with the closest existing names."""
    for key, value in overrides.items():
        parts = key.split(".")
        node = c
        for i, part in enumerate(parts):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                raise ConfigError(unknown_field_message(key, node, parts[:i], part))
            if i < len(parts) - 1:
                node = node[part]
        current = node[parts[-1]]
        if isinstance(value, str) and not isinstance(current, str):
            value = parse_value(key, value, current)
        try:
            node[parts[-1]] = value
        except TypeError as e:
            raise ConfigError(f"config field {key!r}: {value!r} does not fit its type "
                              f"{type(current).__name__} ({e})") from e


def parse_value(key: str, text: str, current):
    """A command-line string as the type of the field it sets."""
    if isinstance(current, bool):
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ConfigError(f"config field {key!r} takes True or False, got {text!r}")
    if isinstance(current, (int, float)):
        try:
            number = float(text) if isinstance(current, float) or any(ch in text for ch in ".eE") else int(text)
        except ValueError:
            raise ConfigError(f"config field {key!r} takes a number, got {text!r}") from None
        return float(number) if isinstance(current, float) else number
    if isinstance(current, (tuple, list)) or current is None:
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            if current is None:
                return text
            raise ConfigError(f"config field {key!r} takes a Python literal such as (1, 8, 1) or ('a', 'b'), "
                              f"got {text!r}") from None
        if isinstance(current, (tuple, list)):
            if isinstance(value, (str, int, float)):  # a one-element sequence written bare
                value = (value,)
            if not isinstance(value, (tuple, list)):
                raise ConfigError(f"config field {key!r} takes a tuple, got {text!r}")
            return tuple(value) if isinstance(current, tuple) else list(value)
        return value
    return text


def unknown_field_message(key: str, node, parents: list[str], part: str) -> str:
    """'config has no field X; did you mean Y?' for a misspelled dotted key."""
    where = ".".join(parents)
    options = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
    close = [".".join(parents + [m]) for m in difflib.get_close_matches(part, options, n=3)]
    if close:
        return f"config has no field {key!r}; did you mean {' or '.join(repr(m) for m in close)}?"
    return f"config has no field {key!r}; the fields of {where or 'the config'} are {options}"


def split_config_args(argv: Sequence[str], *, default: str | None = None) -> tuple[str, str, dict, list[str]]:
    """(file, preset, {field: value string}, other arguments) from a command line with `--config FILE:PRESET`
    and `--config.FIELD=VALUE` / `--config.FIELD VALUE` arguments."""
    spec, overrides, rest = default, {}, []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--config" or arg.startswith("--config="):
            if arg == "--config":
                if i + 1 >= len(args):
                    raise ConfigError("--config needs FILE.py:PRESET")
                spec, i = args[i + 1], i + 2
            else:
                spec, i = arg.split("=", 1)[1], i + 1
            continue
        if arg.startswith("--config."):
            key, eq, value = arg[len("--config."):].partition("=")
            if not eq:
                if i + 1 >= len(args):
                    raise ConfigError(f"{arg} needs a value: {arg}=VALUE")
                value, i = args[i + 1], i + 1
            overrides[key] = value
            i += 1
            continue
        rest.append(arg)
        i += 1
    if not spec:
        raise ConfigError("--config FILE.py:PRESET is required (e.g. configs/stage3.py:tiny)")
    path, _, preset = spec.partition(":")
    return path, preset, overrides, rest
