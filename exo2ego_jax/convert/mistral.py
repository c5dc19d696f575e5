"""HF `MistralForCausalLM` (and the LLM inside a VideoLLaMA2 checkpoint) -> `MistralForCausalLM` params.

q/k weights load with a plain transpose: HF already permutes them for rotate-half RoPE, which we use.
"""
from __future__ import annotations

from exo2ego_jax.convert.engine import LINEAR, TensorRule, convert_checkpoint, detect_prefix, expand_rules
from exo2ego_jax.convert.hf_config import read_hf_config
from exo2ego_jax.convert.safetensors_reader import SafetensorsCheckpoint
from exo2ego_jax.errors import CheckpointError
from exo2ego_jax.models.mistral import MistralConfig
from exo2ego_jax.models.registry import abstract_params, build_module, flat_shapes

MISTRAL_MODEL_TYPES = ("mistral", "videollama2_mistral")

PREFIXES = ("",)
ANCHOR = "model.embed_tokens.weight"


def mistral_rules() -> list[TensorRule]:
    rules = [
        TensorRule("embed_tokens/embedding", "model.embed_tokens.weight"),
        TensorRule("norm/scale", "model.norm.weight"),
        TensorRule("lm_head/kernel", "lm_head.weight", LINEAR),
    ]
    layer = "model.layers.{i}."
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        rules.append(TensorRule(f"decoder/{{layer}}/self_attn/{proj}/kernel", f"{layer}self_attn.{proj}.weight", LINEAR))
    for proj in ("gate_proj", "up_proj", "down_proj"):
        rules.append(TensorRule(f"decoder/{{layer}}/mlp/{proj}/kernel", f"{layer}mlp.{proj}.weight", LINEAR))
    for norm in ("input_layernorm", "post_attention_layernorm"):
        rules.append(TensorRule(f"decoder/{{layer}}/{norm}/scale", f"{layer}{norm}.weight"))
    return rules


def mistral_unused() -> list[str]:
    return [r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq", r"model\.rotary_emb\.inv_freq"]


def convert_mistral(hf_dir: str, out_dir: str, *, dtype: str = "bfloat16", scan_layers: bool = True,
                    buffer_mb: float = 1024.0, show_progress: bool = True) -> dict:
    """Convert a HF `MistralForCausalLM` checkpoint (Mistral-7B-Instruct-v0.2 or a tiny one)."""
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
    prefix = detect_prefix(ckpt, ANCHOR, PREFIXES)
    plan = expand_rules(mistral_rules(), num_layers=config.num_layers, scan=scan_layers)
    expected = flat_shapes(abstract_params("mistral", build_module("mistral", config)))
    return convert_checkpoint(ckpt, plan, prefix=prefix, expected=expected, unused=mistral_unused(),
                              out_dir=out_dir, kind="mistral", config=config.to_dict(), dtype=dtype,
                              buffer_mb=buffer_mb, show_progress=show_progress)
