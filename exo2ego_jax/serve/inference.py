"""Serving a checkpoint: `load_model(dir)`, `answer_question(model, video, question)` (and `launch/infer.py`).

`load_model(checkpoint)` gives the module, params and the tokenizer stored next to them (converters and
stage exports copy the tokenizer files). Clips go through the training pipeline's steps: VideoLLaMA2's
uniform frame rule over [start, end], CLIP preprocessing, normalisation; the prompt is the v1 chat template
with the system prompt and `<video>` at the head of the question; decoding is greedy by default.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np

from exo2ego_jax.checkpoints import load_pretrained
from exo2ego_jax.data import template
from exo2ego_jax.data.preprocess import clip_frames, normalize
from exo2ego_jax.data.tokenizer import load_tokenizer
from exo2ego_jax.data.video import read_clip, read_frames_at
from exo2ego_jax.serve.generate import generate


@dataclasses.dataclass
class LoadedModel:
    module: object
    params: dict
    tokenizer: object
    path: str = ""

    @property
    def config(self):
        return self.module.config

    @property
    def num_frames(self) -> int:
        return self.config.num_frames

    @property
    def image_size(self) -> int:
        return self.config.clip.image_size


def load_model(checkpoint: str, *, dtype=None, fusion: str | None = None) -> LoadedModel:
    """The checkpoint's model, params and tokenizer. The model feeds its LLM with the fusion recorded in the
    checkpoint (the one it was trained with); `fusion` overrides it (models.exo2ego.FUSIONS: "none" x only,
    "mapped" F(x) only, "tokens" or "frames" both)."""
    overrides = {"fusion": fusion} if fusion else {}
    module, params = load_pretrained(checkpoint, dtype=dtype, **overrides)
    return LoadedModel(module, params, load_tokenizer(checkpoint), checkpoint)


def clip_pixels(video: str, num_frames: int, image_size: int, *, start: float | None = None,
                end: float | None = None, frame_indices: Sequence[int] | None = None, aspect: str = "crop",
                dtype=np.float32, strict_window: bool = False) -> np.ndarray:
    """Normalised pixels [T, S, S, 3] for a clip: a video file and window, or explicit frame indices.
    `strict_window` refuses a window past the video's end (a user's window) instead of clamping it."""
    if frame_indices is not None:
        frames = read_frames_at(video, frame_indices)
    else:
        frames, _ = read_clip(video, num_frames, start, end, strict_window=strict_window)
    return normalize(clip_frames(frames, image_size, aspect), dtype)


def answer_question(model: LoadedModel, video: str, question: str, *, start: float | None = None,
                    end: float | None = None, max_new_tokens: int = 128, temperature: float = 0.0,
                    top_p: float = 1.0, seed: int = 0, aspect: str = "crop") -> str:
    """The model's answer to `question` about `video` (optionally the window [start, end] s)."""
    return generate_answers(model, [clip_pixels(video, model.num_frames, model.image_size, start=start, end=end,
                                                aspect=aspect, strict_window=True)], [question],
                            max_new_tokens=max_new_tokens,
                            temperature=temperature, top_p=top_p, seed=seed)[0]


def generate_answers(model: LoadedModel, pixels: Sequence[np.ndarray], prompts: Sequence[str], *,
                     max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                     system: str | None = template.SYSTEM_PROMPT) -> list[str]:
    """Batched answers: one chat-template prompt and one clip per row, decoded in one jitted loop."""
    tok = model.tokenizer
    rows = [template.prompt_ids(tok, p, system=system) for p in prompts]
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), tok.pad_token_id, np.int32)
    mask = np.zeros((len(rows), width), bool)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = r, True
    tokens, lengths = generate(model.module, model.params, ids, mask, np.stack(pixels),
                               max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id, temperature=temperature, top_p=top_p,
                               rng=jax.random.key(seed))
    tokens, lengths = np.asarray(tokens), np.asarray(lengths)
    return [tok.decode(t[:n].tolist(), skip_special_tokens=True).strip() for t, n in zip(tokens, lengths)]
