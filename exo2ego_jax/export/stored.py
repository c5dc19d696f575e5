"""An exo2ego_jax checkpoint opened for streaming out: its config and array metadata up front, then one param
at a time (Orbax partial loads), so an export never holds the whole model in host memory."""
from __future__ import annotations

import collections
import os

import numpy as np

from exo2ego_jax.checkpoints import PARAMS_DIR, read_model_config, read_params, stored_metadata
from exo2ego_jax.models import registry


class StoredCheckpoint:
    def __init__(self, path: str, *, cache_size: int = 3):
        self.path = path
        self.meta = read_model_config(path)
        self.kind = self.meta["kind"]
        self.config = registry.config_from_dict(self.kind, self.meta["config"])
        self.params_dir = os.path.join(path, PARAMS_DIR)
        self.arrays = stored_metadata(self.params_dir)
        # A stacked (scanned) param serves every layer's tensor: keep the last few read.
        self._cache: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        self._cache_size = cache_size

    def has(self, path: str) -> bool:
        return path in self.arrays

    def shape(self, path: str) -> tuple[int, ...]:
        return tuple(self.arrays[path].shape)

    def read(self, path: str) -> np.ndarray:
        if path in self._cache:
            self._cache.move_to_end(path)
            return self._cache[path]
        value = read_params(self.params_dir, [path], self.arrays)[path]
        self._cache[path] = value
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return value

    def paths(self, prefix: str) -> list[str]:
        return sorted(p for p in self.arrays if p.startswith(prefix))
