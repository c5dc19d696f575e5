"""HF checkpoint -> Orbax converters: `python -m exo2ego_jax.convert {clip,mistral} --hf_dir SRC --out DST`."""
from __future__ import annotations

import json
import os

from exo2ego_jax.convert import clip as _clip
from exo2ego_jax.convert import mistral as _mistral
from exo2ego_jax.convert.engine import (CONFIG_FILE, PARAMS_DIR, convert_checkpoint, detect_prefix,
                                        expand_rules)
from exo2ego_jax.convert.safetensors_reader import CheckpointError, SafetensorsCheckpoint

__all__ = ["convert_clip", "convert_mistral", "convert_videollama2", "CheckpointError", "CONFIG_FILE", "PARAMS_DIR", "CONVERTERS"]


MISTRAL_MODEL_TYPES = ("mistral", "videollama2_mistral")


def read_hf_config(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isdir(hf_dir):
        raise CheckpointError(f"--hf_dir {hf_dir!r} is not a directory")
    if not os.path.exists(path):
        raise CheckpointError(f"{path} is missing: --hf_dir must be a folder written by `save_pretrained` "
                              "(config.json plus *.safetensors)")
    try:
        return json.load(open(path))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from e


def clip_config_from_hf(hf: dict, **overrides):
    from exo2ego_jax.models.clip import CLIPVisionConfig
    if "mm_vision_tower" in hf:  # a VideoLLaMA2 config: the tower is CLIP-L/14-336, only the layer is stored
        overrides.setdefault("select_layer", hf.get("mm_vision_select_layer", -2))
        return CLIPVisionConfig(**overrides)
    if "vision_config" not in hf and "patch_size" not in hf:
        raise CheckpointError("config.json is not a CLIP (vision) config: no `vision_config` or `patch_size`")
    return CLIPVisionConfig.from_hf(hf, **overrides)


def convert_clip(hf_dir: str, out_dir: str, *, dtype: str = "bfloat16", scan_layers: bool = True,
                 select_layer: int = -2, buffer_mb: float = 1024.0, show_progress: bool = True) -> dict:
    """Convert a HF CLIP vision tower; only layers up to `select_layer` are written."""
    from exo2ego_jax.models.registry import abstract_params, build_module, flat_shapes
    hf = read_hf_config(hf_dir)
    ckpt = SafetensorsCheckpoint(hf_dir)
    try:
        config = clip_config_from_hf(hf, select_layer=select_layer, scan_layers=scan_layers)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"config.json in {hf_dir!r} cannot be used: {e}") from e
    prefix = detect_prefix(ckpt, _clip.ANCHOR, _clip.PREFIXES)
    plan = expand_rules(_clip.clip_rules(), num_layers=config.num_built_layers, scan=scan_layers)
    expected = flat_shapes(abstract_params("clip", build_module("clip", config)))
    return convert_checkpoint(ckpt, plan, prefix=prefix, expected=expected,
                              unused=_clip.clip_unused(config.num_built_layers, config.num_layers),
                              out_dir=out_dir, kind="clip", config=config.to_dict(), dtype=dtype,
                              buffer_mb=buffer_mb, show_progress=show_progress)


def convert_mistral(hf_dir: str, out_dir: str, *, dtype: str = "bfloat16", scan_layers: bool = True,
                    buffer_mb: float = 1024.0, show_progress: bool = True) -> dict:
    """Convert a HF `MistralForCausalLM` checkpoint (Mistral-7B-Instruct-v0.2 or a tiny one)."""
    from exo2ego_jax.models.mistral import MistralConfig
    from exo2ego_jax.models.registry import abstract_params, build_module, flat_shapes
    hf = read_hf_config(hf_dir)
    model_type = hf.get("model_type", "mistral")
    if model_type not in MISTRAL_MODEL_TYPES or "num_attention_heads" not in hf:
        raise CheckpointError(f"config.json is not a Mistral config (model_type {model_type!r}; expected one of "
                              f"{list(MISTRAL_MODEL_TYPES)})")
    ckpt = SafetensorsCheckpoint(hf_dir)
    try:
        config = MistralConfig.from_hf(hf, scan_layers=scan_layers)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"config.json in {hf_dir!r} cannot be used: {e}") from e
    prefix = detect_prefix(ckpt, _mistral.ANCHOR, _mistral.PREFIXES)
    plan = expand_rules(_mistral.mistral_rules(), num_layers=config.num_layers, scan=scan_layers)
    expected = flat_shapes(abstract_params("mistral", build_module("mistral", config)))
    return convert_checkpoint(ckpt, plan, prefix=prefix, expected=expected, unused=_mistral.mistral_unused(),
                              out_dir=out_dir, kind="mistral", config=config.to_dict(), dtype=dtype,
                              buffer_mb=buffer_mb, show_progress=show_progress)


def convert_videollama2(*args, **kwargs) -> dict:
    """See `exo2ego_jax.convert.videollama2.convert_videollama2`."""
    from exo2ego_jax.convert.videollama2 import convert_videollama2 as _convert
    return _convert(*args, **kwargs)


CONVERTERS = {"clip": convert_clip, "mistral": convert_mistral, "videollama2": convert_videollama2}
