"""The model's parts as the compiled program names them.

Every HLO instruction carries `op_name` metadata: the JAX name stack of the op that made it. It holds the Flax
module path (`ego_encoder`, `mapper_f`, `connector`, `llm`, ...) and the named scopes the train step sets
(`losses`, `optimizer`); the backward pass wraps the forward names in `transpose(...)`. One table maps them to
parts, for the trace-based profile (bench/profile.py) and the per-op estimate (bench/estimate.py) alike.
"""
from __future__ import annotations

import re

# (part, label, regex on "/" + op_name + "/"); first match wins
PARTS = (
    ("ego_encoder", "CLIP ego encoder", r"/ego_encoder/"),
    ("exo_encoder", "CLIP exo encoder", r"/exo_encoder/"),
    ("mapper_f", "mapper F", r"/mapper_f/"),
    ("mapper_g", "mapper G", r"/mapper_g/"),
    ("losses", "cycle/KL/VTG losses", r"[/(]losses[/)]"),
    ("connector", "STC connector", r"/connector/"),
    ("llm", "LLM", r"/llm/"),
    ("optimizer", "optimizer", r"/optimizer/"),
)
OTHER = "other"
LABELS = {part: label for part, label, _ in PARTS} | {OTHER: "other (glue, copies, host)"}
_COMPILED = [(part, re.compile(pattern)) for part, _, pattern in PARTS]


def part_of(op_name: str) -> str:
    text = "/" + op_name + "/"
    return next((part for part, pattern in _COMPILED if pattern.search(text)), OTHER)


def phase_of(op_name: str) -> str:
    """forward, backward (the transposed pass, rematerialised forward ops included: JAX names them alike) or
    update (the optimizer)."""
    if re.search(r"(^|/)optimizer/", op_name):
        return "update"
    return "backward" if "transpose(" in op_name else "forward"
