"""Backbone presets as ml_collections configs: `--config=configs/models.py:<7b|tiny>`.

The stage configs (configs/stage*.py) embed these as their `model.clip` / `model.llm` sections.
"""
import ml_collections


def clip_config(preset: str) -> ml_collections.ConfigDict:
    if preset == "7b":  # openai/clip-vit-large-patch14-336, penultimate layer as VideoLLaMA2 uses it
        values = dict(hidden_size=1024, intermediate_size=4096, num_layers=24, num_heads=16, patch_size=14,
                      image_size=336, select_layer=-2)
    elif preset == "tiny":
        values = dict(hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4, patch_size=8,
                      image_size=32, select_layer=-2)
    else:
        raise ValueError(f"unknown preset {preset!r}; choose 7b or tiny")
    return ml_collections.ConfigDict(dict(values, dtype="bfloat16" if preset == "7b" else "float32",
                                          scan_layers=False, remat_policy="none", attention_impl="xla"))


def mistral_config(preset: str) -> ml_collections.ConfigDict:
    if preset == "7b":  # mistralai/Mistral-7B-Instruct-v0.2
        values = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                      num_kv_heads=8, head_dim=128, rope_theta=1e6, sliding_window=None)
    elif preset == "tiny":
        values = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=16, rope_theta=1e6, sliding_window=None)
    else:
        raise ValueError(f"unknown preset {preset!r}; choose 7b or tiny")
    return ml_collections.ConfigDict(dict(values, dtype="bfloat16" if preset == "7b" else "float32",
                                          scan_layers=False, remat_policy="none", attention_impl="xla"))


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(clip=clip_config(arg), llm=mistral_config(arg)))
