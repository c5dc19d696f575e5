"""Reading a Hugging Face checkpoint folder's `config.json`."""
from __future__ import annotations

import json
import os

from exo2ego_jax.errors import CheckpointError


def read_hf_config(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isdir(hf_dir):
        raise CheckpointError(f"--hf_dir {hf_dir!r} is not a directory")
    if not os.path.exists(path):
        raise CheckpointError(f"{path} is missing: --hf_dir must be a folder written by `save_pretrained` "
                              "(config.json plus *.safetensors)")
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from e
