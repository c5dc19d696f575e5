"""One run per workdir: the config it was started with (the lock is `exo2ego_jax.locks.FolderLock`, taken by
process 0 of a launch while it trains).

`WORKDIR/config.json` records the config a run started with. A relaunch that differs in anything but what a
resume may change (steps, logging, evaluation and checkpoint cadence, the mesh and microbatching) is refused
with the differing fields, unless `force_new_config` is set.
"""
from __future__ import annotations

import json
import logging
import os
import time

from exo2ego_jax.errors import ConfigError

log = logging.getLogger(__name__)
CONFIG_FILE = "config.json"
# Fields a resumed run may change without changing what it trains.
RESUMABLE = ("num_train_steps", "num_epochs", "log_every", "eval_every", "eval_batches", "checkpoint_every",
             "keep_checkpoints", "async_checkpointing", "hold_after_step", "export", "force_new_config", "mesh",
             "per_device_batch", "microbatches", "data.worker_count")


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(recorded: dict, current: dict) -> list[str]:
    """'field: old -> new' for every field that differs, but for the resumable ones."""
    old, new = _flat(recorded), _flat(current)
    keep = lambda k: not any(k == r or k.startswith(r + ".") for r in RESUMABLE)
    return [f"{k}: {old.get(k, '(absent)')!r} -> {new.get(k, '(absent)')!r}" for k in sorted(set(old) | set(new))
            if keep(k) and old.get(k) != new.get(k)]


def record_config(workdir: str, config_dict: dict, *, force: bool) -> None:
    """Write WORKDIR/config.json, refusing a config that differs from the one recorded there (unless forced)."""
    path = os.path.join(workdir, CONFIG_FILE)
    current = json.loads(json.dumps(config_dict, default=str))  # tuples as lists, as stored
    if os.path.exists(path):
        try:
            with open(path) as f:
                recorded = json.load(f)
        except ValueError:
            recorded = None
        changes = config_changes(recorded, current) if recorded is not None else []
        if changes and not force:
            shown = "; ".join(changes[:6]) + (f"; ... {len(changes) - 6} more" if len(changes) > 6 else "")
            raise ConfigError(f"workdir {workdir!r} holds a run with another config ({shown}); resume it with the "
                              "same config, use another --workdir, or pass --config.force_new_config=True to go on "
                              "from its checkpoints with the new one")
        if changes:
            os.replace(path, os.path.join(workdir, f"config.{time.strftime('%Y%m%d-%H%M%S')}.json"))
            log.warning("workdir %s: continuing with a changed config (%s); the old one is kept", workdir,
                        "; ".join(changes))
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(current, f, indent=2)
    os.replace(tmp, path)
