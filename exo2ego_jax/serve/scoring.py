"""Log-likelihood option scoring: the option whose tokens have the lowest mean loss after the prompt wins.

Every (question, option) pair is one right-padded row `prompt + option`, tokenised exactly as training
tokenises "[INST] question [/INST] option </s>", with the prompt's labels ignored; rows are scored in
fixed-size chunks by one jitted function (VideoLLaMA2's EgoPlan-style protocol).
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import numpy as np

from exo2ego_jax.constants import IGNORE_INDEX, VIDEO_TOKEN
from exo2ego_jax.data import template
from exo2ego_jax.losses import vtg_loss
from exo2ego_jax.models.exo2ego import Exo2Ego


def option_rows(tokenizer, question: str, options: Sequence[str], *, system: str | None = template.SYSTEM_PROMPT
                ) -> tuple[list[int], list[list[int]]]:
    """(prompt ids, [option ids]) exactly as training tokenises "[INST] q [/INST] option </s>"."""
    prompt = template.prompt_ids(tokenizer, question, system=system)
    out = []
    for option in options:
        tok = template.tokenize_conversation(tokenizer, [{"from": "human", "value": f"{VIDEO_TOKEN}\n{question}"},
                                                         {"from": "gpt", "value": option}], system=system)
        ids = tok.input_ids.tolist()
        if ids[:len(prompt)] != prompt:
            raise ValueError(f"the prompt tokenises differently with the answer appended: {question!r}")
        out.append(ids[len(prompt):])
    return prompt, out


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


def option_losses(module, params, prompts, options, *, pixels=None, fusion: str | None = None,
                  pad_id: int = 0, chunk: int = 16) -> list[np.ndarray]:
    """Per question, the mean token loss of each option (lower = more likely).

    pixels [Q, T, H, W, 3] (Exo2Ego): question q's clip is repeated for each of its options.
    """
    ids, mask, labels, owners = build_option_rows(prompts, options, pad_id=pad_id)
    losses = []
    for start in range(0, len(ids), chunk):
        rows = np.minimum(np.arange(start, start + chunk), len(ids) - 1)  # a short last chunk repeats its last row,
        n = min(chunk, len(ids) - start)                                 # so every chunk has one compiled shape
        px = None if pixels is None else np.asarray(pixels)[owners[rows]]
        out = _row_losses(module, params, ids[rows], mask[rows], labels[rows], px, fusion)
        losses.append(np.asarray(out)[:n])
    flat = np.concatenate(losses)
    return [flat[owners == q] for q in range(len(prompts))]
