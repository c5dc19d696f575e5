"""Clip records: TFDS builders with `file_format="array_record"`, read back through `tfds.data_source`.

One record per training sample, for every source (Ego-ExoClip, EgoIT, the synthetic set):

    ego_frames   uint8 [T, H, W, 3]  (zlib)   the egocentric clip, T sampled frames, short side `store_size`
    exo_frames   uint8 [T, H, W, 3]  (zlib)   the synchronised exocentric clip; [0, 0, 0, 3] when there is none
    text         Text                          narration / caption (clip-text records)
    conversations Text                         LLaVA conversation JSON (instruction records); "" otherwise
    source, take_uid, exo_cam, uid  Text       metadata
    start, end   Scalar float32                window in seconds from the take's (video's) start
    is_best_exo  Scalar bool

Only uint8 tensors, text and scalars are used, which TFDS reads without TensorFlow (ENVIRONMENT.md). The
generator reads examples from the build's chunk cache (`build.py`), so writing is cheap and restartable.
"""
from __future__ import annotations

import functools
import os
import shutil
from collections.abc import Callable, Iterable

import numpy as np

from exo2ego_jax.errors import DataError

NO_FRAMES = np.zeros((0, 0, 0, 3), np.uint8)


def features():
    import tensorflow_datasets as tfds
    frames = tfds.features.Tensor(shape=(None, None, None, 3), dtype=np.uint8, encoding="zlib")
    text = tfds.features.Text()
    return tfds.features.FeaturesDict({
        "ego_frames": frames, "exo_frames": frames, "text": text, "conversations": text, "source": text,
        "take_uid": text, "exo_cam": text, "uid": text,
        "start": tfds.features.Scalar(np.float32), "end": tfds.features.Scalar(np.float32),
        "is_best_exo": tfds.features.Scalar(np.bool_)})


def make_record(*, ego_frames: np.ndarray, exo_frames: np.ndarray | None = None, text: str = "",
                conversations: str = "", source: str, take_uid: str = "", exo_cam: str = "", uid: str,
                start: float = 0.0, end: float = 0.0, is_best_exo: bool = False) -> dict:
    """A complete record dict (every field present, types as stored)."""
    return dict(ego_frames=np.ascontiguousarray(ego_frames, np.uint8),
                exo_frames=NO_FRAMES if exo_frames is None else np.ascontiguousarray(exo_frames, np.uint8),
                text=text, conversations=conversations, source=source, take_uid=take_uid, exo_cam=exo_cam,
                uid=uid, start=np.float32(start), end=np.float32(end), is_best_exo=bool(is_best_exo))


@functools.cache
def _builder_class():
    """Defined lazily so importing this module does not import TFDS (the GPU box may lack it)."""
    import tensorflow_datasets as tfds

    class ClipRecords(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """Clip records of one dataset; examples come from `split_generators` set before preparing."""
        VERSION = tfds.core.Version("1.0.0")
        RELEASE_NOTES = {"1.0.0": "ego/exo uint8 frames, text, conversation JSON, metadata"}

        def __init__(self, *, name: str, description: str = "", split_generators=None, **kwargs):
            self.name = name  # one folder per dataset name under data_dir
            self._description = description
            self._split_generators_fns = split_generators or {}
            super().__init__(file_format="array_record", **kwargs)

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, description=self._description, features=features())

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(fn) for split, fn in self._split_generators_fns.items()}

        def _generate_examples(self, fn):
            for record in fn():
                yield record["uid"], record

    return ClipRecords


def write_records(data_dir: str, name: str, split_generators: dict[str, Callable[[], Iterable[dict]]], *,
                  description: str = "") -> str:
    """Write `{split: () -> iterable of records}` as `data_dir/name/1.0.0/`; returns that folder."""
    import tensorflow_datasets as tfds
    builder = _builder_class()(name=name, description=description, split_generators=split_generators,
                               data_dir=data_dir)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        download_mode=tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS))
    downloads = os.path.join(data_dir, "downloads")  # TFDS leaves an empty download cache behind
    if os.path.isdir(downloads) and not any(files for _, _, files in os.walk(downloads)):
        shutil.rmtree(downloads)
    return builder.data_dir


def records_dir(root: str) -> str:
    """The versioned folder holding dataset_info.json, given it or any folder above it (one dataset)."""
    if os.path.exists(os.path.join(root, "dataset_info.json")):
        return root
    found = []
    for dirpath, _, files in os.walk(root):
        if "dataset_info.json" in files:
            found.append(dirpath)
    if not found:
        raise DataError(f"no TFDS records under {root!r} (no dataset_info.json); build them with "
                        "`python -m exo2ego_jax.data.build ... --out DIR` and set data.root to DIR")
    if len(found) > 1:
        raise DataError(f"several record datasets under {root!r}: {sorted(found)}; point data.root at one")
    return found[0]


def open_records(root: str, split: str):
    """A random-access source (`len`, `[i]` -> dict of numpy / bytes) over one split."""
    import tensorflow_datasets as tfds
    builder = tfds.builder_from_directory(records_dir(root))
    if split not in builder.info.splits:
        raise DataError(f"records at {root!r} have splits {sorted(builder.info.splits)}, not {split!r}; set "
                        "data.split / data.eval_split to one of them")
    try:
        source = builder.as_data_source(split=split)
    except Exception as e:  # a damaged shard can fail already here (array_record reads each file's footer)
        raise DataError(f"the {split!r} records at {root!r} cannot be opened ({type(e).__name__}: "
                        f"{_first_line(e)}); a record file is corrupt or truncated: rebuild them with "
                        "`python -m exo2ego_jax.data.build ... --restart`", "corrupt records") from e
    return CheckedSource(source, root, split)


class CheckedSource:
    """A record source whose read errors name the records folder, the split and the record, with the fix."""

    def __init__(self, source, root: str, split: str):
        self.source, self.root, self.split = source, root, split

    def __len__(self) -> int:
        return len(self.source)

    def __repr__(self) -> str:  # Grain checks a restored iterator's source by its repr: the records' own
        return repr(self.source)

    def __getitem__(self, index):
        try:
            return self.source[index]
        except Exception as e:
            raise DataError(f"record {index} of the {self.split!r} records at {self.root!r} cannot be read "
                            f"({type(e).__name__}: {_first_line(e)}); a record file is corrupt or truncated: rebuild "
                            "them with `python -m exo2ego_jax.data.build ... --restart`", "corrupt records") from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else ""


def split_sizes(root: str) -> dict[str, int]:
    import tensorflow_datasets as tfds
    info = tfds.builder_from_directory(records_dir(root)).info
    return {name: split.num_examples for name, split in info.splits.items()}


def decode_text(value) -> str:
    """TFDS `Text` reads back as bytes without TensorFlow."""
    return value.decode("utf-8") if isinstance(value, (bytes, np.bytes_)) else str(value)

