"""HF CLIP vision tower -> `CLIPVisionEncoder` params.

Accepts a `CLIPVisionModel` saved by transformers 5.x (no prefix), 4.x (`vision_model.`), a full `CLIPModel`
(`vision_model.` plus a text tower, which is skipped) and the tower inside a VideoLLaMA2 checkpoint
(`model.vision_tower.vision_tower.vision_model.`).
"""
from __future__ import annotations

from exo2ego_jax.convert.engine import CONV, LINEAR, TensorRule

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
