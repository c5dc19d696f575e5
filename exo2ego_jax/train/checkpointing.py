"""Orbax `CheckpointManager` for the train state plus the data iterator state.

One checkpoint = {step, trainable params, optimizer state, RNG} (`state`) + the iterator's position
(`data`, JSON). Saves are asynchronous; `keep_checkpoints` are kept; only complete checkpoints are listed, so a
run killed mid-save resumes from the last complete one. A checkpoint that is listed but cannot be restored
(truncated or corrupted files) is reported in one line, moved aside to `checkpoints/corrupt/` (never deleted),
and the previous one is used.
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
import time

import jax
import orbax.checkpoint as ocp

from exo2ego_jax.errors import storage_problem

log = logging.getLogger(__name__)


class TrainCheckpointer:
    def __init__(self, directory: str, *, keep: int, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        self._options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                                     create=True, cleanup_tmp_directories=True)
        self.manager = self._open()

    def _open(self):
        return ocp.CheckpointManager(self.directory, options=self._options, item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        data=ocp.args.JsonSave(data_state)), force=True)

    def restore(self, step: int, abstract_state):
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        return restored["state"], restored["data"]

    def restore_latest(self, abstract_state):
        """(step, state, data state) of the newest checkpoint that restores, or None when there is none.

        A newer one that fails is moved to `checkpoints/corrupt/<step>-<time>` with a one-line report.
        """
        while (step := self.latest_step()) is not None:
            try:
                return (step,) + self.restore(step, abstract_state)
            except Exception as e:
                reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
                aside = os.path.join(self.directory, "corrupt", f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
                print(f"checkpoint step {step} in {self.directory} cannot be restored ({type(e).__name__}: {reason}); "
                      f"moved it to {aside} and going back to the previous one", flush=True)
                if jax.process_index() == 0:
                    os.makedirs(os.path.dirname(aside), exist_ok=True)
                    shutil.move(os.path.join(self.directory, str(step)), aside)
                self.manager.close()
                self.manager = self._open()
        return None

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def complete_steps(directory: str) -> list[int]:
    """The steps of the complete checkpoints in `directory` (Orbax writes into a temporary name first)."""
    if not os.path.isdir(directory):
        return []
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def last_checkpoint_note(workdir: str) -> str:
    """' (step N in WORKDIR/checkpoints)', or ' (none was written yet)'."""
    directory = os.path.join(workdir, "checkpoints")
    steps = complete_steps(directory)
    return f" (step {steps[-1]} in {directory})" if steps else " (none was written yet: it starts over)"


class WorkerErrorFilter(logging.Filter):
    """Drops the tracebacks Orbax (and asyncio under it) log when a writer thread fails: the same exception is
    raised again in the thread that waits for the write, where the training CLI reports it in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        message = record.getMessage()
        if "raised an exception" in message and "Thread" in message:
            return False
        failure = record.exc_info[1] if record.exc_info else None
        return storage_problem(failure) is None and storage_problem(Exception(message)) is None


def drop_closed_loop_callbacks() -> None:
    """Silence TensorStore's reports of a write finishing after Orbax closed its event loop.

    When one checkpoint write fails (a full disk), Orbax stops its asyncio loop while the other TensorStore
    writes are still running; each one that finishes later tries `loop.call_soon_threadsafe`, and TensorStore's
    C++ thread reports the resulting `RuntimeError('Event loop is closed')` through `sys.unraisablehook`. The
    default hook prints a traceback from that thread at any moment, even in the middle of the one-line error the
    CLI prints. The failure itself is raised (and reported) in the thread that waits for the save.
    """
    default = sys.unraisablehook

    def hook(unraisable):
        value = unraisable.exc_value
        if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
            log.debug("a checkpoint write finished after its event loop closed (ignored)")
            return
        default(unraisable)

    sys.unraisablehook = hook
