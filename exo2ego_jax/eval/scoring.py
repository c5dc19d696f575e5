"""Log-likelihood option scoring: the option whose tokens have the lowest mean loss after the prompt wins.

Every (question, option) pair is one right-padded row `prompt + option`, with the prompt's labels ignored;
rows are scored in fixed-size chunks by one jitted function (VideoLLaMA2's EgoPlan-style protocol).
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import numpy as np

from exo2ego_jax.losses import vtg_loss
from exo2ego_jax.models.exo2ego import Exo2Ego

IGNORE_INDEX = -100


def build_option_rows(prompts: Sequence[Sequence[int]], options: Sequence[Sequence[Sequence[int]]], *,
                      pad_id: int = 0):
    """-> (input_ids [R, L], attention_mask [R, L], labels [R, L], question index of each row [R])."""
    rows, owners = [], []
    for q, (prompt, opts) in enumerate(zip(prompts, options)):
        if not opts:
            raise ValueError(f"question {q} has no options")
        for option in opts:
            if not option:
                raise ValueError(f"question {q} has an empty option: nothing to score")
            rows.append((list(prompt), list(option)))
            owners.append(q)
    width = max(len(p) + len(o) for p, o in rows)
    ids = np.full((len(rows), width), pad_id, np.int32)
    labels = np.full((len(rows), width), IGNORE_INDEX, np.int32)
    mask = np.zeros((len(rows), width), bool)
    for r, (prompt, option) in enumerate(rows):
        n = len(prompt) + len(option)
        ids[r, :n] = prompt + option
        labels[r, len(prompt):n] = option
        mask[r, :n] = True
    return ids, mask, labels, np.asarray(owners)


@functools.partial(jax.jit, static_argnames=("module", "fusion"))
def _row_losses(module, params, ids, mask, labels, pixels, fusion):
    """Mean target-token loss of each row [R]."""
    if isinstance(module, Exo2Ego):
        visual = module.apply({"params": params}, pixels, method="visual_tokens", fusion=fusion)
        logits, labels = module.apply({"params": params}, ids, visual, mask, labels, method="language_model")
    else:
        logits = module.apply({"params": params}, ids, attention_mask=mask)
    return jax.vmap(lambda lg, lb: vtg_loss(lg[None], lb[None])[0])(logits, labels)


def option_losses(module, params, prompts, options, *, pixels=None, fusion: Optional[str] = None,
                  pad_id: int = 0, chunk: int = 16) -> list[np.ndarray]:
    """Per question, the mean token loss of each option (lower = more likely).

    pixels [Q, T, H, W, 3] (Exo2Ego): question q's clip is repeated for each of its options.
    """
    ids, mask, labels, owners = build_option_rows(prompts, options, pad_id=pad_id)
    losses = []
    for start in range(0, len(ids), chunk):
        sl = slice(start, start + chunk)
        n = len(ids[sl])
        pad = chunk - n  # fixed chunk shape: one compilation for all chunks
        take = lambda a: np.concatenate([a[sl], np.repeat(a[sl][-1:], pad, axis=0)]) if pad else a[sl]
        px = None if pixels is None else np.asarray(pixels)[take(owners)]
        out = _row_losses(module, params, take(ids), take(mask), take(labels), px, fusion)
        losses.append(np.asarray(out)[:n])
    flat = np.concatenate(losses)
    return [flat[owners == q] for q in range(len(prompts))]


def choose_by_likelihood(module, params, prompts, options, **kwargs) -> list[int]:
    """Index of the lowest-loss option per question."""
    return [int(np.argmin(l)) for l in option_losses(module, params, prompts, options, **kwargs)]
