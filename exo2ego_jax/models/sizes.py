"""The released backbones' sizes, written once: the config dataclasses' defaults are CLIP ViT-L/14-336 and
Mistral-7B-Instruct-v0.2, and these dicts are their architecture fields (for ml_collections configs and the
benchmarks)."""
from __future__ import annotations

from exo2ego_jax.models.clip import CLIPVisionConfig
from exo2ego_jax.models.mistral import MistralConfig

CLIP_ARCHITECTURE = ("hidden_size", "intermediate_size", "num_layers", "num_heads", "patch_size", "image_size")
MISTRAL_ARCHITECTURE = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                        "head_dim", "rope_theta", "sliding_window")

CLIP_L14_336 = {k: getattr(CLIPVisionConfig(), k) for k in CLIP_ARCHITECTURE}   # openai/clip-vit-large-patch14-336
MISTRAL_7B = {k: getattr(MistralConfig(), k) for k in MISTRAL_ARCHITECTURE}     # mistralai/Mistral-7B-Instruct-v0.2
