"""HF `MistralForCausalLM` (and the LLM inside a VideoLLaMA2 checkpoint) -> `MistralForCausalLM` params.

q/k weights load with a plain transpose: HF already permutes them for rotate-half RoPE, which we use.
"""
from __future__ import annotations

from exo2ego_jax.convert.engine import LINEAR, TensorRule

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
