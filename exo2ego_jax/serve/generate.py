"""Batched decoding with a KV cache inside one jit-compiled `lax.while_loop`.

Greedy (temperature 0) or sampling (temperature, top-p), a stop at EOS per sequence, prefill over the
spliced visual tokens for the Exo2Ego model, and no host round trip per token. Prompts are right-padded
(the project's convention); each sequence continues from its own length.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from exo2ego_jax.models.exo2ego import Exo2Ego, splice_visual
from exo2ego_jax.models.mistral import MistralForCausalLM, init_cache


def sample_token(logits: jax.Array, rng, *, temperature: float, top_p: float) -> jax.Array:
    """Next token per row of float32 logits [B, V]: argmax when temperature == 0, else nucleus sampling."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # keep the smallest prefix whose mass reaches top_p (the top token always stays)
        keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p
        threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits >= threshold, logits, -jnp.inf)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _prefill_inputs(module, params, input_ids, attention_mask, pixels, fusion):
    """(llm module, llm params, prompt embeddings [B, L, D], prompt mask [B, L])."""
    if isinstance(module, Exo2Ego):
        def splice(m, ids, mask, px):
            visual = m.visual_tokens(px, fusion=fusion)
            safe = jnp.where(ids == m.config.video_token_index, 0, ids)
            embeds, spliced_mask, _ = splice_visual(m.llm.embed(safe), ids, visual, mask, None,
                                                    video_token_index=m.config.video_token_index,
                                                    ignore_index=m.config.ignore_index)
            return embeds, spliced_mask
        embeds, mask = module.apply({"params": params}, input_ids, attention_mask, pixels, method=splice)
        return MistralForCausalLM(module.config.llm), params["llm"], embeds, mask
    embeds = module.apply({"params": params}, input_ids, method="embed")
    return module, params, embeds, attention_mask.astype(bool)


@functools.partial(jax.jit, static_argnames=("module", "max_new_tokens", "eos_token_id", "pad_token_id",
                                             "temperature", "top_p", "fusion"))
def generate(module, params, input_ids, attention_mask=None, pixels=None, *, max_new_tokens: int,
             eos_token_id: int | None = 2, pad_token_id: int = 0, temperature: float = 0.0, top_p: float = 1.0,
             rng=None, fusion: str | None = None):
    """-> (tokens [B, max_new_tokens] int32, padded with `pad_token_id` after EOS; lengths [B] incl. EOS).

    module: a `MistralForCausalLM` or an `Exo2Ego` (then `pixels` [B, T, H, W, 3] fill the placeholder).
    """
    if attention_mask is None:
        attention_mask = jnp.ones(input_ids.shape, bool)
    if rng is None:
        rng = jax.random.key(0)
    llm, llm_params, embeds, mask = _prefill_inputs(module, params, input_ids, attention_mask, pixels, fusion)
    b, length = mask.shape
    cache = init_cache(llm.config, b, length + max_new_tokens, dtype=embeds.dtype)
    logits, cache = llm.apply({"params": llm_params}, inputs_embeds=embeds, attention_mask=mask, cache=cache)
    last = jnp.maximum(mask.sum(-1) - 1, 0)
    next_logits = jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]
    eos = -1 if eos_token_id is None else eos_token_id

    def cond(carry):
        step, _, _, done, _, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, cache, next_logits, done, tokens, rng = carry
        rng, sub = jax.random.split(rng)
        token = sample_token(next_logits, sub, temperature=temperature, top_p=top_p)
        token = jnp.where(done, pad_token_id, token)
        tokens = tokens.at[:, step].set(token)
        done = done | (token == eos)
        logits, cache = llm.apply({"params": llm_params}, token[:, None], attention_mask=(~done | (token == eos))[:, None],
                                  cache=cache)
        return step + 1, cache, logits[:, -1], done, tokens, rng

    tokens = jnp.full((b, max_new_tokens), pad_token_id, jnp.int32)
    done = jnp.zeros((b,), bool)
    _, _, _, done, tokens, _ = jax.lax.while_loop(cond, body, (jnp.int32(0), cache, next_logits, done, tokens, rng))
    is_eos = tokens == eos
    first_eos = jnp.where(is_eos.any(-1), jnp.argmax(is_eos, -1) + 1, max_new_tokens)
    return tokens, first_eos.astype(jnp.int32)
