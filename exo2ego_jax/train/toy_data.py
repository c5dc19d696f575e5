"""The `toy` data source: a tiny deterministic in-memory clip-text set, and a resumable batch iterator.

Stand-in source for the `tiny` presets and the tests (not the rendered synthetic ego-exo dataset of
`exo2ego_jax.data.synthetic`, which goes through the real record builders): each example shows one of K colour
patterns in both views (the exo view a shifted, fixed-camera version of the ego view); its text asks about the clip and the
answer token depends on the pattern, so the VTG loss can fall. The iterator defines the contract every
loader of this project follows: `next()` gives this process's rows of the next global batch as numpy,
`get_state()` / `set_state()` make it resume exactly (the order is a function of (seed, epoch) only).
"""
from __future__ import annotations

import numpy as np

from exo2ego_jax.constants import IGNORE_INDEX, VIDEO_TOKEN_INDEX
from exo2ego_jax.errors import ConfigError


def toy_examples(num_examples: int, *, frames: int, image_size: int, vocab_size: int, seq_len: int,
                       seed: int = 0, num_patterns: int = 4) -> list[dict]:
    """Deterministic examples: uint8 frames of both views plus a tokenised prompt/answer with labels."""
    rng = np.random.default_rng(seed)
    palette = rng.integers(0, 256, size=(num_patterns, 3))
    if vocab_size < num_patterns + 8:
        raise ConfigError(f"vocab_size {vocab_size} is too small for {num_patterns} answer tokens")
    examples = []
    for i in range(num_examples):
        k = int(rng.integers(num_patterns))
        yy, xx = np.mgrid[0:image_size, 0:image_size]
        ego = np.zeros((frames, image_size, image_size, 3), np.uint8)
        exo = np.zeros_like(ego)
        for t in range(frames):
            stripe = ((xx + 3 * t + i) // 4) % 2
            ego[t] = np.where(stripe[..., None], palette[k], 255 - palette[k])
            exo[t] = np.roll(ego[t], image_size // 4, axis=0) // 2 + 64
        prompt_len = int(rng.integers(2, max(3, seq_len // 2)))
        prompt = rng.integers(8, vocab_size, size=prompt_len)
        answer = [num_patterns + 3 + k, 2]  # pattern token, then EOS (2)
        ids = [1, VIDEO_TOKEN_INDEX] + prompt.tolist() + answer
        ids = ids[:seq_len]
        labels = [IGNORE_INDEX] * (len(ids) - len(answer)) + answer
        labels = labels[:seq_len]
        pad = seq_len - len(ids)
        examples.append(dict(
            input_ids=np.asarray(ids + [0] * pad, np.int32),
            labels=np.asarray(labels + [IGNORE_INDEX] * pad, np.int32),
            attention_mask=np.asarray([1] * len(ids) + [0] * pad, bool),
            ego_frames=ego, exo_frames=exo, pattern=np.int32(k)))
    return examples


class BatchIterator:
    """Global batches over a fixed example list: epoch-wise shuffled by (seed, epoch), this process's slice."""

    def __init__(self, examples: list, global_batch: int, *, seed: int = 0, shuffle: bool = True,
                 process_index: int = 0, process_count: int = 1, drop_remainder: bool = True):
        if global_batch % process_count:
            raise ConfigError(f"global batch {global_batch} is not divisible by the {process_count} processes")
        if not examples:
            raise ConfigError("config field 'data.num_examples': the toy dataset is empty; set it > 0")
        self.examples = examples
        self.global_batch = global_batch
        self.local_batch = global_batch // process_count
        self.seed, self.shuffle = seed, shuffle
        self.process_index, self.process_count = process_index, process_count
        self._position = 0  # global example position (across epochs) of the next batch

    def __len__(self) -> int:
        return len(self.examples)

    def _order(self, epoch: int) -> np.ndarray:
        n = len(self.examples)
        return np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)

    def _indices(self, start: int, count: int) -> list[int]:
        n = len(self.examples)
        out = []
        while len(out) < count:
            epoch, offset = divmod(start + len(out), n)
            out.extend(self._order(epoch)[offset:offset + count - len(out)].tolist())
        return out

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        rows = self._indices(self._position, self.global_batch)
        lo = self.process_index * self.local_batch
        mine = rows[lo:lo + self.local_batch]
        self._position += self.global_batch
        batch = {k: np.stack([self.examples[i][k] for i in mine]) for k in self.examples[0]}
        batch["_global_rows"] = np.asarray(rows, np.int64)
        return batch

    def reset(self) -> None:
        self._position = 0

    def get_state(self) -> dict:
        return {"position": int(self._position), "seed": self.seed, "global_batch": self.global_batch}

    def set_state(self, state: dict) -> None:
        if state.get("global_batch", self.global_batch) != self.global_batch:
            raise ConfigError(f"checkpointed iterator used global batch {state['global_batch']}, this run "
                             f"uses {self.global_batch}: resume with the same batch_size")
        self._position = int(state["position"])
