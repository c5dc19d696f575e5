"""config.json contents for the exported folders: transformers' Mistral and CLIP vision configs, VideoLLaMA2's
`videollama2_mistral` config, PEFT's adapter config, and CLIP's image processor (VideoLLaMA2 reads it from the
tower folder)."""
from __future__ import annotations

from exo2ego_jax.models.clip import CLIPVisionConfig
from exo2ego_jax.models.mistral import MistralConfig

# LoRA target short names (exo2ego_jax.models.lora) -> the Mistral module names PEFT matches
LORA_MODULES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
                "down": "down_proj"}

# openai/clip-vit-large-patch14-336's preprocessing (CLIPImageProcessor)
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def mistral_config(cfg: MistralConfig, dtype: str) -> dict:
    return {
        "architectures": ["MistralForCausalLM"], "model_type": "mistral", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.rms_norm_eps,
        # transformers 4.x reads rope_theta, 5.x rope_parameters
        "rope_theta": cfg.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "sliding_window": cfg.sliding_window, "tie_word_embeddings": False, "attention_dropout": 0.0,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id,
        "use_cache": True, "torch_dtype": dtype, "dtype": dtype,
    }


def clip_vision_config(cfg: CLIPVisionConfig, *, num_hidden_layers: int, dtype: str) -> dict:
    return {
        "architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model", "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": cfg.num_heads, "patch_size": cfg.patch_size, "image_size": cfg.image_size,
        "num_channels": cfg.num_channels, "layer_norm_eps": cfg.layer_norm_eps, "hidden_act": "quick_gelu",
        "attention_dropout": 0.0, "projection_dim": 768, "torch_dtype": dtype, "dtype": dtype,
    }


def clip_image_processor(cfg: CLIPVisionConfig) -> dict:
    return {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": cfg.image_size},
            "do_center_crop": True, "crop_size": {"height": cfg.image_size, "width": cfg.image_size},
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": CLIP_MEAN,
            "image_std": CLIP_STD, "do_convert_rgb": True, "resample": 3}


def videollama2_config(llm: MistralConfig, clip: CLIPVisionConfig, *, projector_type: str, num_frames: int,
                       tower: str, dtype: str) -> dict:
    return {
        **mistral_config(llm, dtype), "architectures": ["Videollama2MistralForCausalLM"],
        "model_type": "videollama2_mistral", "mm_projector_type": projector_type, "mm_hidden_size": clip.hidden_size,
        "mm_vision_tower": tower, "mm_vision_select_layer": clip.select_layer,
        "mm_vision_select_feature": clip.select_feature, "num_frames": num_frames, "image_aspect_ratio": "pad",
        "tune_mm_mlp_adapter": False, "freeze_mm_mlp_adapter": False, "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
    }


def peft_adapter_config(*, rank: int, alpha: float, dropout: float, targets, base_model: str) -> dict:
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha, "lora_dropout": dropout,
        "target_modules": sorted(LORA_MODULES[t] for t in targets), "bias": "none", "fan_in_fan_out": False,
        "base_model_name_or_path": base_model, "inference_mode": True, "init_lora_weights": True,
        "modules_to_save": None, "use_rslora": False, "use_dora": False,
    }
