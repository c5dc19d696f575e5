"""Param trees addressed by '/'-joined paths: regex matching, splitting into (trainable, frozen), joining back.

Trainable sets, sharding overrides and export name maps are all written as regexes over these paths
(`llm/decoder/layers/self_attn/q_proj/lora_a`), big_vision style.
"""
from __future__ import annotations

import re
from typing import Any
from collections.abc import Callable, Iterable

from flax import traverse_util
from flax.core import unfreeze


def as_dict(tree) -> dict:
    """A plain nested dict (Flax may hand back FrozenDicts)."""
    return tree if isinstance(tree, dict) else unfreeze(tree)


def flatten(tree) -> dict[str, Any]:
    """{'/'-joined path: leaf}."""
    return traverse_util.flatten_dict(as_dict(tree), sep="/")


def unflatten(flat: dict[str, Any]) -> dict:
    return traverse_util.unflatten_dict(flat, sep="/")


def path_matcher(patterns: Iterable[str]) -> Callable[[str], bool]:
    """A predicate on '/'-joined param paths: True when any regex fully matches."""
    compiled = [re.compile(p) for p in patterns]
    return lambda path: any(p.fullmatch(path) for p in compiled)


def split_params(params: dict, is_selected: Callable[[str], bool]) -> tuple[dict, dict]:
    """Split a param tree into (selected, rest) trees by a predicate on '/'-joined paths."""
    flat = flatten(params)
    return (unflatten({k: v for k, v in flat.items() if is_selected(k)}),
            unflatten({k: v for k, v in flat.items() if not is_selected(k)}))


def combine_params(*trees: dict) -> dict:
    """Inverse of `split_params`: union of disjoint trees (raises on an overlapping path)."""
    merged: dict[str, Any] = {}
    for tree in trees:
        for k, v in flatten(tree).items():
            if k in merged:
                raise ValueError(f"param {k!r} appears in more than one tree")
            merged[k] = v
    return unflatten(merged)
