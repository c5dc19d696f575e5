"""The training loop every stage runs: `train(config, workdir)`.

  resolve the config -> mesh -> build the stage's state and jitted step (`build_step`, also what the
  ahead-of-time compiler uses) -> init/restore (sharded) -> loop: batch -> step -> metrics (progress bar,
  metrics.jsonl, TensorBoard) -> checkpoint every N steps -> export a serving checkpoint at the end.
A restarted run resumes from the latest complete checkpoint with nothing repeated and nothing skipped.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import time
from typing import Any
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from tqdm import tqdm

from exo2ego_jax.checkpoints import copy_tokenizer_files, write_checkpoint
from exo2ego_jax.data.loader import make_iterator
from exo2ego_jax.data.template import write_chat_template
from exo2ego_jax.errors import Exo2EgoError, StorageError, storage_problem
from exo2ego_jax.locks import FolderLock
from exo2ego_jax.models.exo2ego import Exo2Ego
from exo2ego_jax.models.lora import merge_lora
from exo2ego_jax.models.params import combine_params
from exo2ego_jax.paths import absolute
from exo2ego_jax.sharding import create_mesh, rules_for
from exo2ego_jax.train import config as config_lib
from exo2ego_jax.train import state as state_lib
from exo2ego_jax.train.batches import agree_on_text_width, batch_fingerprint, global_batch, to_model_batch
from exo2ego_jax.train.checkpointing import TrainCheckpointer, last_checkpoint_note
from exo2ego_jax.train.config import EXPORT_DIR, Run
from exo2ego_jax.train.metrics import MetricsLogger
from exo2ego_jax.train.optim import make_optimizer
from exo2ego_jax.train.step import jit_eval_step, jit_train_step, make_eval_step, make_train_step
from exo2ego_jax.train.toy_data import BatchIterator, toy_examples
from exo2ego_jax.train.workdir import record_config

log = logging.getLogger(__name__)


class TrainingDiverged(Exo2EgoError, RuntimeError):
    """The loss or gradient norm became NaN/inf; the last good checkpoint is left untouched."""


@dataclasses.dataclass
class TrainResult:
    workdir: str
    last_step: int
    metrics: list
    export_dir: str | None


def make_mesh(c, devices: Sequence | None = None):
    """The ('data', 'fsdp', 'tensor') mesh of `mesh.shape` over `devices` (default: this job's devices)."""
    if devices is None:
        devices = jax.devices() if c.mesh.num_devices < 0 else jax.devices()[:c.mesh.num_devices]
    return create_mesh(tuple(c.mesh.shape), devices)


def make_data(run: Run, *, split: str = "train", process_index: int, process_count: int):
    """The batch iterator named by `data.source`: the in-memory toy set, or the Grain pipeline over records."""
    c, model = run.config, run.model
    if c.data.source == "toy":
        seed = c.seed if split == "train" else c.seed + 1000
        examples = toy_examples(c.data.num_examples, frames=model.num_frames, image_size=model.clip.image_size,
                                vocab_size=model.llm.vocab_size, seq_len=c.data.seq_len, seed=seed)
        return BatchIterator(examples, c.batch_size, seed=c.seed, shuffle=c.data.shuffle,
                             process_index=process_index, process_count=process_count)
    return make_iterator(c.data, split=split, tokenizer_dir=run.tokenizer_dir, views=run.views,
                         image_size=model.clip.image_size, num_frames=model.num_frames, global_batch=c.batch_size,
                         seed=c.seed, process_index=process_index, process_count=process_count)


def total_steps(c, num_examples: int) -> int:
    if c.num_train_steps > 0:
        return int(c.num_train_steps)
    return max(1, int(math.ceil(c.num_epochs * num_examples / c.batch_size)))


def data_parallel_size(mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


@dataclasses.dataclass
class StepBuild:
    """A stage's model, optimizer, shardings and jitted step, built without allocating any params."""
    module: Exo2Ego
    microbatches: int
    tx: Any
    schedule: Any
    layout: state_lib.StateLayout
    step_fn: Any
    rules: tuple


def build_step(run: Run, mesh, steps: int, *, process_count: int = 1) -> StepBuild:
    """Everything the jitted train step needs, from the run and the mesh only (shared by `train` and
    `launch/aot_compile.py`, which compiles it for a pod it does not have)."""
    c = run.config
    if c.batch_size % process_count:
        raise config_lib.ConfigError(f"config field 'batch_size': {c.batch_size} is not divisible by "
                                     f"{process_count} processes")
    microbatches = run.microbatches(data_parallel_size(mesh))
    module = Exo2Ego(run.model)
    tx, schedule = make_optimizer(c.optim, steps)
    layout = state_lib.build_layout(module, mesh, run.stage, tx, frozen_layout=c.sharding.frozen)
    rules = rules_for(mesh)
    step_fn = jit_train_step(make_train_step(module, run.stage, run.loss, tx, schedule, microbatches=microbatches,
                                             compute_dtype=jnp.dtype(c.compute_dtype), rules=rules), layout)
    return StepBuild(module, microbatches, tx, schedule, layout, step_fn, rules)


@dataclasses.dataclass
class Setup:
    """A built step plus its data and initial state (shared by `train` and the profiler)."""
    run: Run
    mesh: Any
    build: StepBuild
    data: Any
    steps: int
    state: dict
    frozen: dict
    n_trainable: int
    n_frozen: int

    @property
    def module(self):
        return self.build.module

    @property
    def layout(self):
        return self.build.layout

    @property
    def step_fn(self):
        return self.build.step_fn


def prepare(run: Run, mesh=None) -> Setup:
    """Mesh, data, the built step and the sharded initial state for a resolved run."""
    c = run.config
    mesh = mesh if mesh is not None else make_mesh(c)
    data = make_data(run, process_index=jax.process_index(), process_count=jax.process_count())
    steps = total_steps(c, len(data))
    build = build_step(run, mesh, steps, process_count=jax.process_count())
    trainable, frozen = state_lib.init_params(run, build.module, mesh, build.layout, seed=c.seed,
                                              frozen_dtype=c.frozen_dtype)
    n_trainable, n_frozen = state_lib.param_count(trainable), state_lib.param_count(frozen)
    state = state_lib.new_state(trainable, build.tx, build.layout, mesh, c.seed)
    return Setup(run, mesh, build, data, steps, state, frozen, n_trainable, n_frozen)


def train(c, workdir: str, *, show_progress: bool = True, explicit=None) -> TrainResult:
    """Train the stage `c` describes in `workdir` (resuming what is there), under the workdir's lock.
    `explicit`: the config fields the command line set (the others follow the init checkpoint's architecture)."""
    workdir = absolute(workdir)
    run = config_lib.resolve(c, explicit)
    try:
        os.makedirs(workdir, exist_ok=True)
        if jax.process_index() != 0:
            return _train(run, workdir, show_progress=show_progress)
        with FolderLock(workdir, what="workdir"):
            record_config(workdir, c.to_dict(), force=bool(c.force_new_config))
            return _train(run, workdir, show_progress=show_progress)
    except Exo2EgoError:
        raise
    except Exception as e:
        problem = storage_problem(e)
        if problem is None:
            raise
        raise StorageError(f"writing to the workdir {workdir!r} failed: {problem}. Free space or point --workdir at "
                           f"writable storage, then relaunch the same command: it resumes from the last complete "
                           f"checkpoint{last_checkpoint_note(workdir)}") from e


def _train(run: Run, workdir: str, *, show_progress: bool) -> TrainResult:
    c = run.config
    is_main = jax.process_index() == 0
    setup = prepare(run)
    mesh, build, data, steps = setup.mesh, setup.build, setup.data, setup.steps
    module, layout, spec = build.module, build.layout, run.stage
    state, frozen = setup.state, setup.frozen

    checkpointer = TrainCheckpointer(os.path.join(workdir, "checkpoints"), keep=c.keep_checkpoints,
                                     async_save=c.async_checkpointing)
    restored = checkpointer.restore_latest(state_lib.abstract_state(state, layout))
    start = 0
    if restored is not None:
        start, state, data_state = restored
        data.set_state(data_state)
        _print(is_main, f"resumed from {workdir}/checkpoints step {start}")

    compute_dtype = jnp.dtype(c.compute_dtype)
    eval_fn = eval_data = None
    if c.eval_every > 0:
        eval_data = make_data(run, split="eval", process_index=jax.process_index(),
                              process_count=jax.process_count())
        eval_fn = jit_eval_step(make_eval_step(module, spec, run.loss, compute_dtype=compute_dtype,
                                               rules=build.rules), layout)
    logger = MetricsLogger(workdir, enabled=is_main, resume_step=start)
    history = []
    _print(is_main, config_lib.describe_init(run.init_path))
    for line in run.notes:
        _print(is_main, line)
    _print(is_main, f"{c.stage}: {setup.n_trainable / 1e6:.2f}M trainable / {setup.n_frozen / 1e6:.2f}M frozen "
                    f"params, mesh {dict(mesh.shape)}, {steps} steps of {c.batch_size} "
                    f"(x{build.microbatches} microbatches)")

    # One executable per batch shape: length-bucketed data gives a few text widths (data.text_buckets).
    executables: dict = {}
    last_good = start if start else None
    t_last = time.perf_counter()
    bar = tqdm(total=steps, initial=start, desc=c.stage, disable=not (show_progress and is_main), unit="step")
    try:
        for step in range(start + 1, steps + 1):
            local = agree_on_text_width(next(data))
            fingerprint = batch_fingerprint(local)
            batch = global_batch(to_model_batch(local, compute_dtype), layout.batch)
            shape_key = tuple(sorted((k, v.shape) for k, v in batch.items()))
            if shape_key not in executables:
                with jax.set_mesh(mesh):
                    compiled = build.step_fn.lower(state, frozen, batch).compile()
                executables[shape_key] = (compiled, _flops(compiled))
                mem = compiled.memory_analysis()
                if mem is not None and is_main:
                    log.info("compiled %s step for text width %d: temp %.1f MB, args %.1f MB", c.stage,
                             batch["input_ids"].shape[1], getattr(mem, "temp_size_in_bytes", 0) / 1e6,
                             getattr(mem, "argument_size_in_bytes", 0) / 1e6)
                t_last = time.perf_counter()  # compile time is not step time
            compiled, flops = executables[shape_key]
            with jax.set_mesh(mesh):
                state, metrics = compiled(state, frozen, batch)
            is_log = step % c.log_every == 0 or step == steps
            is_ckpt = step % c.checkpoint_every == 0 or step == steps
            if is_log or is_ckpt:
                values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                now = time.perf_counter()
                dt = (now - t_last) / (c.log_every if is_log else 1)
                t_last = now
                if not values.pop("finite"):
                    kept = (f"The last good checkpoint (step {last_good}) in {workdir}/checkpoints is untouched"
                            if last_good else "No checkpoint was written yet")
                    raise TrainingDiverged(
                        f"{c.stage} step {step}: loss {values['loss']} / grad norm {values['grad_norm']} is not "
                        f"finite. {kept}; lower optim.learning_rate or check the data, then rerun"
                        + (" to resume from it" if last_good else ""))
                tokens = c.batch_size * (batch["input_ids"].shape[1] - 1 + run.model.num_visual_tokens(spec.fusion))
                record = dict(values, batch_hash=fingerprint, step_time_s=dt, tokens_per_s=tokens / dt,
                              tflops_per_s=(flops or 0) / dt / 1e12)
                history.append(dict(step=step, **record))
                if is_log:
                    logger.log(step, record)
                    bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['learning_rate']:.2e}")
            if eval_fn is not None and (step % c.eval_every == 0 or step == steps):
                record = evaluate(eval_fn, eval_data, state["trainable"], frozen, layout, mesh, c, compute_dtype)
                logger.log(step, record)
                history.append(dict(step=step, **record))
            if is_ckpt:
                checkpointer.save(step, state, data.get_state())
                last_good = step
                if step == c.hold_after_step:
                    checkpointer.wait()
                    print(f"HOLDING after checkpoint {step}", flush=True)
                    while True:  # test hook: wait to be killed
                        time.sleep(1)
            bar.update(1)
        checkpointer.wait()
        export_dir = None
        if c.export.enabled:
            export_dir = export(run, workdir, module, state["trainable"], frozen, step=steps)
            _print(is_main, f"exported {export_dir}")
        return TrainResult(workdir, steps, history, export_dir)
    finally:
        bar.close()
        checkpointer.close()
        logger.close()


def evaluate(eval_fn, eval_data, trainable, frozen, layout, mesh, c, compute_dtype) -> dict:
    """Mean eval metrics over the first `eval_batches` batches of the eval split (the same ones each time)."""
    eval_data.reset()
    totals: dict = {}
    for _ in range(c.eval_batches):
        batch = global_batch(to_model_batch(agree_on_text_width(next(eval_data)), compute_dtype), layout.batch)
        with jax.set_mesh(mesh):
            values = jax.device_get(eval_fn(trainable, frozen, batch))
        for k, v in values.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    return {f"eval_{k}": v / c.eval_batches for k, v in totals.items() if k != "num_targets"}


def export(run: Run, workdir: str, module, trainable, frozen, *, step: int | None = None) -> str:
    """Full params (trainable + frozen) as a load_pretrained checkpoint; LoRA merged when configured.

    The exported model config carries the fusion this stage trained with, so evaluation and inference feed
    the LLM what it was trained on (a fusion-none stage is served without F).
    """
    c = run.config
    params = combine_params(trainable, frozen)
    cfg = dataclasses.replace(module.config, fusion=run.stage.fusion)
    if cfg.llm.lora is not None and c.export.merge_lora:
        params = dict(params, llm=merge_lora(params["llm"], cfg.llm.lora.scale))
        cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, lora=None))
    target = os.path.join(workdir, EXPORT_DIR)
    if jax.process_index() == 0 and os.path.exists(target):  # a resumed, already-finished run exports again
        shutil.rmtree(target)
    write_checkpoint(target, params, kind="exo2ego", config=cfg.to_dict(), dtype=c.frozen_dtype, stage=c.stage,
                     view=run.stage.view, step=step)
    copied = copy_tokenizer_files(run.tokenizer_dir, target)
    if jax.process_index() == 0 and copied:  # the prompts this model was trained on, for apply_chat_template
        write_chat_template(target)
    return target


def _flops(compiled) -> float | None:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


def _print(is_main: bool, message: str) -> None:
    if is_main:
        print(message, flush=True)
