"""Shared test helpers (no fixtures): tiny model sizes, config loading, the composite's VTG loss."""
from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np

from exo2ego_jax.losses import vtg_loss
from exo2ego_jax.models.params import flatten
from exo2ego_jax.serve.scoring import option_losses
from exo2ego_jax.configfile import load_config_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                 patch_size=4, image_size=16, num_channels=3)
TINY_MISTRAL = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                    rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)


def stage_config(stage_file, preset="tiny", **overrides):
    """configs/<stage_file>.py:<preset> with dotted-key overrides."""
    return load_config_file(os.path.join(ROOT, "configs", f"{stage_file}.py"), preset, overrides)


def read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def flat(params):
    return flatten(params)


def composite_logits_and_loss(module, params, ids, pixels, *, mask=None, labels=None, fusion=None):
    """An Exo2Ego model's logits on (ids, clip) and the VTG loss of `labels` spliced like the inputs."""
    def forward(m, ids, pixels, mask, labels):
        visual = m.visual_tokens(pixels, fusion=fusion)
        return m.language_model(ids, visual, mask, labels)

    logits, spliced = module.apply({"params": params}, jnp.asarray(ids), jnp.asarray(pixels),
                                   None if mask is None else jnp.asarray(mask),
                                   None if labels is None else jnp.asarray(labels), method=forward)
    loss = None if labels is None else vtg_loss(logits, spliced)[0]
    return logits, loss


def choose_by_likelihood(module, params, prompts, options, **kwargs) -> list[int]:
    """Index of the lowest-loss option per question."""
    return [int(np.argmin(l)) for l in option_losses(module, params, prompts, options, **kwargs)]
