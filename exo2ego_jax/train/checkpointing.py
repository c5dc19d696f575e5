"""Orbax `CheckpointManager` for the train state plus the data iterator state, and the serving export.

One checkpoint = {step, trainable params, optimizer state, RNG} (`state`) + the iterator's position
(`data`, JSON). Saves are asynchronous; `keep_checkpoints` are kept; only complete checkpoints are listed,
so a run killed mid-save resumes from the last complete one.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import jax
import orbax.checkpoint as ocp

from exo2ego_jax.convert.engine import CONFIG_FILE, FORMAT_NAME, FORMAT_VERSION, PARAMS_DIR


class TrainCheckpointer:
    def __init__(self, directory: str, *, keep: int, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               create=True, cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(os.path.abspath(directory), options=options,
                                             item_names=("state", "data"))

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        data=ocp.args.JsonSave(data_state)), force=True)

    def restore(self, step: int, abstract_state):
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        return restored["state"], restored["data"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def export_params(directory: str, params, config_dict: dict, *, dtype: str, extra: Optional[dict] = None) -> str:
    """Write `params` as a checkpoint that `exo2ego_jax.load_pretrained` opens (model_config.json + params/)."""
    import orbax.checkpoint.experimental.v1 as ocp_v1
    os.makedirs(directory, exist_ok=True)
    params = jax.tree.map(lambda x: x.astype(dtype), params)
    target = os.path.join(directory, PARAMS_DIR)
    save = getattr(ocp_v1, "save", None) or ocp_v1.save_pytree  # `save_pytree`: the older (0.12.4) name
    save(target, params)
    if jax.process_index() == 0:
        meta = dict(format=FORMAT_NAME, format_version=FORMAT_VERSION, kind="exo2ego", config=config_dict,
                    dtype=dtype, **(extra or {}))
        with open(os.path.join(directory, CONFIG_FILE), "w") as f:
            json.dump(meta, f, indent=2, default=str)
    return directory
