"""Grain pipeline from clip records to training batches: `make_iterator(c, model_cfg, ...)`.

records (tfds.data_source) -> per-process shard -> shuffle (seeded, per epoch) -> CLIP preprocessing of the
stored uint8 frames (resize + centre crop, or pad-to-square) -> tokenisation (AutoTokenizer from the checkpoint
folder, VideoLLaMA2 v1 chat template for conversations, `<video> caption` for clip-text) with text truncated to
`data.seq_len` before the visual tokens are spliced -> batches padded to the smallest `data.text_buckets` entry
that fits (fewer distinct shapes, fewer recompiles).

The iterator keeps the contract of `train.synthetic.BatchIterator`: `next()` gives this process's rows of the
next global batch as numpy, `get_state()` / `set_state()` (JSON-serialisable, saved with the train state)
resume exactly, `len()` is the number of records, `reset()` restarts from the first batch.
"""
from __future__ import annotations

import json
import logging
import os
import zlib
from collections.abc import Sequence

import grain.python as grain
import numpy as np

from exo2ego_jax.constants import IGNORE_INDEX
from exo2ego_jax.data import template
from exo2ego_jax.data.preprocess import clip_frames
from exo2ego_jax.data.records import decode_text, open_records
from exo2ego_jax.data.tokenizer import load_tokenizer
from exo2ego_jax.errors import ConfigError, DataError, Exo2EgoError

log = logging.getLogger(__name__)
DATASET_NAMES = {"ego_exo_clip": "ego_exo_clip", "ego_it": "ego_it", "records": ""}


def dataset_root(root: str, source: str) -> str:
    """`data.root` is the records folder of `build --out`; the source picks the dataset inside it."""
    if not root:
        raise ConfigError(f"config field 'data.root' is empty; set it to the folder given to "
                          f"`python -m exo2ego_jax.data.build ... --out` (data.source={source!r})")
    name = DATASET_NAMES[source]
    path = os.path.join(root, name) if name and os.path.isdir(os.path.join(root, name)) else root
    if not os.path.isdir(path):
        raise ConfigError(f"config field 'data.root': {path!r} does not exist; build the records first "
                          f"(python -m exo2ego_jax.data.build {source} --out {root})")
    return path


class ToExample:
    """Record -> model example (uint8 frames at the model's size, ids, labels). Tokenizer loaded lazily per
    process (Grain workers unpickle this object; tokenizers are not shipped between processes)."""

    def __init__(self, tokenizer_dir: str, *, seq_len: int, image_size: int, num_frames: int, aspect: str,
                 views: Sequence[str], system_prompt: str | None = template.SYSTEM_PROMPT, swap_views: bool = False,
                 exo_fraction: float = 0.0):
        self.tokenizer_dir, self.seq_len, self.image_size = tokenizer_dir, seq_len, image_size
        self.num_frames, self.aspect, self.views, self.system_prompt = num_frames, aspect, tuple(views), system_prompt
        self.swap_views, self.exo_fraction = swap_views, exo_fraction
        self._tokenizer = None
        self._empty = 0  # samples whose answer truncation removed (counted per process)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_tokenizer"] = None
        return state

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_dir)
        return self._tokenizer

    def _warn_empty(self, uid: str) -> None:
        """A sample whose answer was cut by truncation trains nothing: say so (first few per process)."""
        self._empty += 1
        if self._empty <= 5 or self._empty % 1000 == 0:
            log.warning("record %s has no answer tokens left after truncation to data.seq_len=%d (%d such records "
                        "so far in this process); raise data.seq_len", uid, self.seq_len, self._empty)

    def __call__(self, record: dict) -> dict:
        uid = decode_text(record["uid"])
        conversations = decode_text(record["conversations"])
        if conversations:
            tok = template.tokenize_conversation(self.tokenizer, json.loads(conversations), system=self.system_prompt,
                                                 max_len=self.seq_len, source=uid)
        else:
            tok = template.tokenize_caption(self.tokenizer, decode_text(record["text"]), max_len=self.seq_len)
        if not (tok.labels != IGNORE_INDEX).any():
            self._warn_empty(uid)
        out = {"input_ids": tok.input_ids, "labels": tok.labels}
        swap = self.swap_views != shows_other_view(uid, self.exo_fraction)
        for view in self.views:
            stored = {"ego": "exo", "exo": "ego"}[view] if swap else view
            frames = record[f"{stored}_frames"]
            if frames.shape[0] == 0:
                raise DataError(f"record {uid!r} has no {stored} frames but this stage needs them for its {view} "
                                f"input; train it on synchronised ego-exo records (data.source='ego_exo_clip', or "
                                "EgoIT built from items with an `exo_video`)")
            if frames.shape[0] != self.num_frames:
                raise DataError(f"record {uid!r} has {frames.shape[0]} frames, the model takes {self.num_frames}; "
                                 f"rebuild the records with --num_frames {self.num_frames}")
            out[f"{view}_frames"] = clip_frames(frames, self.image_size, self.aspect)
        return out


def shows_other_view(uid: str, fraction: float) -> bool:
    """Whether record `uid` is among the `fraction` of records shown through their other view
    (`data.exo_fraction`): a fixed pseudo-random choice per record, the same in every epoch and process."""
    return fraction > 0 and zlib.crc32(uid.encode()) / 2 ** 32 < fraction


def bucket_length(length: int, buckets: Sequence[int], seq_len: int) -> int:
    for b in sorted(buckets):
        if b >= length:
            return min(b, seq_len)
    return seq_len


def collate(examples: Sequence[dict], *, buckets: Sequence[int], seq_len: int, pad_id: int) -> dict:
    """Right-pad ids/labels to one bucket length; stack frames."""
    width = bucket_length(max(len(e["input_ids"]) for e in examples), buckets, seq_len)
    n = len(examples)
    ids = np.full((n, width), pad_id, np.int32)
    labels = np.full((n, width), IGNORE_INDEX, np.int32)
    mask = np.zeros((n, width), bool)
    for i, e in enumerate(examples):
        k = len(e["input_ids"])
        ids[i, :k], labels[i, :k], mask[i, :k] = e["input_ids"], e["labels"], True
    out = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    for key in ("ego_frames", "exo_frames"):
        if key in examples[0]:
            out[key] = np.stack([e[key] for e in examples])
    return out


class _Collate:
    """Picklable batch function for Grain's Batch."""

    def __init__(self, buckets, seq_len, pad_id):
        self.buckets, self.seq_len, self.pad_id = tuple(buckets), seq_len, pad_id

    def __call__(self, examples):
        return collate(examples, buckets=self.buckets, seq_len=self.seq_len, pad_id=self.pad_id)


class GrainBatchIterator:
    """Resumable batches of one process's shard of a record split."""

    def __init__(self, source, to_example: ToExample, *, global_batch: int, seed: int, shuffle: bool,
                 process_index: int, process_count: int, worker_count: int, buckets: Sequence[int], pad_id: int,
                 num_epochs: int | None = None):
        if global_batch % process_count:
            raise ConfigError(f"global batch {global_batch} is not divisible by the {process_count} processes")
        self.global_batch, self.local_batch = global_batch, global_batch // process_count
        self.seed, self.worker_count, self.num_records = seed, worker_count, len(source)
        shard = grain.ShardOptions(shard_index=process_index, shard_count=process_count, drop_remainder=True)
        if self.num_records // process_count < self.local_batch:
            raise ConfigError(f"{self.num_records} records split over {process_count} processes leave fewer than one "
                              f"batch of {self.local_batch} per process; lower batch_size or add data")
        sampler = grain.IndexSampler(num_records=self.num_records, shard_options=shard, shuffle=shuffle,
                                     num_epochs=num_epochs, seed=seed)
        if worker_count > 0:
            _mark_flags_parsed()
        self._loader = grain.DataLoader(
            data_source=source, sampler=sampler, worker_count=worker_count, shard_options=shard,
            operations=[_Map(to_example), grain.Batch(self.local_batch, drop_remainder=True,
                                                       batch_fn=_Collate(buckets, to_example.seq_len, pad_id))])
        self._iter = iter(self._loader)

    def __len__(self) -> int:
        return self.num_records

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        try:
            return next(self._iter)
        except (StopIteration, Exo2EgoError):
            raise
        except Exception as e:  # Grain re-raises a worker's error in its own type: find ours in the chain
            cause = e
            while cause is not None and not isinstance(cause, Exo2EgoError):
                cause = cause.__cause__ or cause.__context__
            if cause is not None:
                raise cause from e
            raise

    def reset(self) -> None:
        self._iter = iter(self._loader)

    def get_state(self) -> dict:
        state = self._iter.get_state()
        return {"grain": state.decode() if isinstance(state, bytes) else state, "global_batch": self.global_batch,
                "worker_count": self.worker_count, "seed": self.seed}

    def set_state(self, state: dict) -> None:
        if "grain" not in state:
            raise ConfigError("the checkpoint's data state is not a Grain loader state (was it written with "
                              "data.source='toy'?); resume with the same data.source")
        for key in ("global_batch", "worker_count"):
            if state.get(key, getattr(self, key)) != getattr(self, key):
                raise ConfigError(f"the checkpointed data iterator used {key}={state[key]}, this run uses "
                                  f"{getattr(self, key)}: Grain state only restores with the same value; set it back")
        self._iter.set_state(state["grain"].encode())


class _Map(grain.MapTransform):
    """A picklable Grain map step around one callable."""

    def __init__(self, fn):
        self.fn = fn

    def map(self, element):
        return self.fn(element)


def _mark_flags_parsed() -> None:
    """Grain 0.2.18 workers read absl flags; outside absl.app they are unparsed (ENVIRONMENT.md)."""
    from absl import flags
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_iterator(data, *, split: str, tokenizer_dir: str, views: Sequence[str], image_size: int,
                  num_frames: int, global_batch: int, seed: int, process_index: int = 0, process_count: int = 1):
    """The batch iterator over record split `split` ("train" or "eval") for the `data` config section
    (source, root, split, eval_split, seq_len, aspect, text_buckets, worker_count, shuffle, swap_views:
    the exo camera's frames where the model takes the ego view and the other way round, the exo_oracle
    diagnostic; exo_fraction: that swap for a fixed fraction of the records only, so a one-view stage trains
    on a mix of both views, as the init stage's exo-heavy clip-text).

    `views` ("ego", "exo" or both) are the frames each example carries; `tokenizer_dir` holds the tokenizer
    (the caller resolves it: data.tokenizer, the init checkpoint or the previous stage's export).
    """
    exo_fraction = float(data.get("exo_fraction", 0.0))
    if not 0.0 <= exo_fraction <= 1.0:
        raise ConfigError(f"config field 'data.exo_fraction' must be in [0, 1], got {exo_fraction}")
    if exo_fraction and len(views) > 1:
        raise ConfigError(f"config field 'data.exo_fraction' ({exo_fraction}) mixes the views of a one-view stage; "
                          "this stage reads both views (stage 2): set it to 0")
    record_split = data.split if split == "train" else (data.eval_split or "val")
    source = open_records(dataset_root(data.root, data.source), record_split)
    pad_id = load_tokenizer(tokenizer_dir).pad_token_id
    to_example = ToExample(tokenizer_dir, seq_len=data.seq_len, image_size=image_size, num_frames=num_frames,
                           aspect=data.aspect, views=views, swap_views=bool(data.swap_views),
                           exo_fraction=exo_fraction)
    return GrainBatchIterator(source, to_example, global_batch=global_batch, seed=seed,
                              shuffle=bool(data.shuffle) and split == "train", process_index=process_index,
                              process_count=process_count, worker_count=data.worker_count,
                              buckets=tuple(data.text_buckets), pad_id=pad_id)
