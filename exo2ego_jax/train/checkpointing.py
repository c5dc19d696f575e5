"""Orbax `CheckpointManager` for the train state plus the data iterator state.

One checkpoint = {step, trainable params, optimizer state, RNG} (`state`) + the iterator's position
(`data`, JSON). Saves are asynchronous; `keep_checkpoints` are kept; only complete checkpoints are listed,
so a run killed mid-save resumes from the last complete one.
"""
from __future__ import annotations

import os

import orbax.checkpoint as ocp


class TrainCheckpointer:
    def __init__(self, directory: str, *, keep: int, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               create=True, cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(os.path.abspath(directory), options=options,
                                             item_names=("state", "data"))

    def latest_step(self) -> int | None:
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
