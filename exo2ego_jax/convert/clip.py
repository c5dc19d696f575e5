"""HF CLIP vision tower -> `CLIPVisionEncoder` params.

Accepts a `CLIPVisionModel` saved by transformers 5.x (no prefix), 4.x (`vision_model.`), a full `CLIPModel`
(`vision_model.` plus a text tower, which is skipped) and the tower inside a VideoLLaMA2 checkpoint
(`model.vision_tower.vision_tower.vision_model.`).
"""
from __future__ import annotations

from exo2ego_jax.convert.engine import CONV, LINEAR, TensorRule, convert_checkpoint, detect_prefix, expand_rules
from exo2ego_jax.convert.hf_config import read_hf_config
from exo2ego_jax.convert.safetensors_reader import SafetensorsCheckpoint
from exo2ego_jax.errors import CheckpointError
from exo2ego_jax.models.clip import CLIPVisionConfig
from exo2ego_jax.models.registry import abstract_params, build_module, flat_shapes

PREFIXES = ("", "vision_model.", "model.vision_tower.vision_tower.vision_model.")
ANCHOR = "embeddings.patch_embedding.weight"


def clip_rules() -> list[TensorRule]:
    rules = [
        TensorRule("patch_embedding/kernel", "embeddings.patch_embedding.weight", CONV),
        TensorRule("class_embedding", "embeddings.class_embedding"),
        TensorRule("position_embedding", "embeddings.position_embedding.weight"),
        TensorRule("pre_layrnorm/scale", "pre_layrnorm.weight"),
        TensorRule("pre_layrnorm/bias", "pre_layrnorm.bias"),
    ]
    layer = "encoder.layers.{i}."
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        rules += [TensorRule(f"{{layer}}/self_attn/{proj}/kernel", f"{layer}self_attn.{proj}.weight", LINEAR),
                  TensorRule(f"{{layer}}/self_attn/{proj}/bias", f"{layer}self_attn.{proj}.bias")]
    for norm in ("layer_norm1", "layer_norm2"):
        rules += [TensorRule(f"{{layer}}/{norm}/scale", f"{layer}{norm}.weight"),
                  TensorRule(f"{{layer}}/{norm}/bias", f"{layer}{norm}.bias")]
    for fc in ("fc1", "fc2"):
        rules += [TensorRule(f"{{layer}}/{fc}/kernel", f"{layer}mlp.{fc}.weight", LINEAR),
                  TensorRule(f"{{layer}}/{fc}/bias", f"{layer}mlp.{fc}.bias")]
    return rules


def clip_unused(num_built_layers: int, num_layers: int) -> list[str]:
    """Tensors that exist in CLIP checkpoints but are never used by the selected-layer encoder."""
    skipped_layers = "|".join(str(i) for i in range(num_built_layers, num_layers)) or "(?!)"
    return [rf"encoder\.layers\.({skipped_layers})\..*", r"post_layernorm\..*", r"embeddings\.position_ids",
            # a full CLIPModel's text tower and projection heads (before the prefix is stripped)
            r"text_model\..*", r"visual_projection\.weight", r"text_projection\.weight", r"logit_scale"]


def clip_config_from_hf(hf: dict, **overrides):
    if "mm_vision_tower" in hf:  # a VideoLLaMA2 config: the tower is CLIP-L/14-336, only the layer is stored
        overrides.setdefault("select_layer", hf.get("mm_vision_select_layer", -2))
        return CLIPVisionConfig(**overrides)
    if "vision_config" not in hf and "patch_size" not in hf:
        raise CheckpointError("config.json is not a CLIP (vision) config: no `vision_config` or `patch_size`")
    return CLIPVisionConfig.from_hf(hf, **overrides)


def convert_clip(hf_dir: str, out_dir: str, *, dtype: str = "bfloat16", scan_layers: bool = True,
                 select_layer: int = -2, buffer_mb: float = 1024.0, show_progress: bool = True) -> dict:
    """Convert a HF CLIP vision tower; only layers up to `select_layer` are written."""
    hf = read_hf_config(hf_dir)
    ckpt = SafetensorsCheckpoint(hf_dir)
    try:
        config = clip_config_from_hf(hf, select_layer=select_layer, scan_layers=scan_layers)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"config.json in {hf_dir!r} cannot be used: {e}") from e
    prefix = detect_prefix(ckpt, ANCHOR, PREFIXES)
    plan = expand_rules(clip_rules(), num_layers=config.num_built_layers, scan=scan_layers)
    expected = flat_shapes(abstract_params("clip", build_module("clip", config)))
    return convert_checkpoint(ckpt, plan, prefix=prefix, expected=expected,
                              unused=clip_unused(config.num_built_layers, config.num_layers),
                              out_dir=out_dir, kind="clip", config=config.to_dict(), dtype=dtype,
                              buffer_mb=buffer_mb, show_progress=show_progress)
