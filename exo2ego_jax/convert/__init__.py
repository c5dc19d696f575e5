"""HF checkpoint -> exo2ego_jax checkpoint converters: `python -m exo2ego_jax.convert {clip,mistral,videollama2}`."""
from __future__ import annotations

from exo2ego_jax.convert.clip import convert_clip
from exo2ego_jax.convert.mistral import convert_mistral
from exo2ego_jax.convert.videollama2 import convert_videollama2
from exo2ego_jax.errors import CheckpointError

__all__ = ["convert_clip", "convert_mistral", "convert_videollama2", "CheckpointError", "CONVERTERS"]

CONVERTERS = {"clip": convert_clip, "mistral": convert_mistral, "videollama2": convert_videollama2}
