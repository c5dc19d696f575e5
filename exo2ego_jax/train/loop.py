"""The training loop every stage runs: `train(config, workdir)`.

  init/restore (sharded) -> compile the stage's step (memory and cost analysis printed) -> loop:
  batch -> step -> metrics (stdout bar, metrics.jsonl, TensorBoard) -> checkpoint every N steps
  -> export a serving checkpoint at the end.
A restarted run resumes from the latest complete checkpoint with nothing repeated and nothing skipped.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from exo2ego_jax.models.exo2ego import Exo2Ego
from exo2ego_jax.models.lora import combine_params, merge_lora
from exo2ego_jax.sharding import create_mesh
from exo2ego_jax.train import config as config_lib
from exo2ego_jax.train import state as state_lib
from exo2ego_jax.data.preprocess import normalize
from exo2ego_jax.data.template import IGNORE_INDEX
from exo2ego_jax.train.config import EXPORT_DIR, tokenizer_dir
from exo2ego_jax.train.checkpointing import TrainCheckpointer, export_params
from exo2ego_jax.train.metrics import MetricsLogger
from exo2ego_jax.train.optim import make_optimizer
from exo2ego_jax.train.step import jit_eval_step, jit_train_step, make_eval_step, make_train_step
from exo2ego_jax.train.synthetic import batch_fingerprint

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm became NaN/inf; the last good checkpoint is left untouched."""


@dataclasses.dataclass
class TrainResult:
    workdir: str
    last_step: int
    metrics: list
    export_dir: Optional[str]


def resolve_init(c) -> Optional[str]:
    if c.init.checkpoint:
        path = c.init.checkpoint
        if not os.path.exists(os.path.join(path, "model_config.json")):
            raise FileNotFoundError(f"init.checkpoint {path!r} is not a converted checkpoint (no model_config.json); "
                                    "convert one with `python -m exo2ego_jax.convert videollama2 ...`")
        return path
    if c.init.from_workdir:
        path = os.path.join(c.init.from_workdir, EXPORT_DIR)
        if not os.path.exists(os.path.join(path, "model_config.json")):
            raise FileNotFoundError(f"init.from_workdir {c.init.from_workdir!r} has no finished export ({path}); run "
                                    "the previous stage to the end, or set init.checkpoint to a converted checkpoint")
        return path
    if not c.init.allow_random:
        raise ValueError("config field 'init.checkpoint': no init checkpoint or previous-stage workdir is set and "
                         "init.allow_random is False; point init.checkpoint at a converted checkpoint")
    return None


def make_data(c, model_cfg, *, process_index: int, process_count: int, split: str = "train"):
    """The batch iterator named by `data.source` (synthetic in-memory here; Grain loaders for real data)."""
    from exo2ego_jax.train.synthetic import BatchIterator, synthetic_examples
    if c.data.source != "synthetic":
        from exo2ego_jax.data.loader import make_iterator  # the Grain pipeline (data issue)
        return make_iterator(c, model_cfg, process_index=process_index, process_count=process_count, split=split)
    seed = c.seed if split == "train" else c.seed + 1000
    examples = synthetic_examples(c.data.num_examples, frames=model_cfg.num_frames, image_size=model_cfg.clip.image_size,
                                  vocab_size=model_cfg.llm.vocab_size, seq_len=c.data.seq_len, seed=seed)
    return BatchIterator(examples, c.batch_size, seed=c.seed, shuffle=c.data.shuffle, process_index=process_index,
                         process_count=process_count)




def to_model_batch(local: dict, compute_dtype) -> dict:
    """uint8 frames -> CLIP-normalised pixels; keeps the token arrays."""
    out = {k: local[k] for k in ("input_ids", "attention_mask", "labels")}
    for src, dst in (("ego_frames", "ego_pixels"), ("exo_frames", "exo_pixels")):
        if src in local:
            out[dst] = normalize(local[src], compute_dtype)
    return out


def agree_on_text_width(local: dict) -> dict:
    """Length-bucketed loaders pick a width per process; every process must feed the same global shape, so
    rows are right-padded to the widest process's width (one tiny all-gather per step, multi-host only)."""
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils
    width = int(np.max(multihost_utils.process_allgather(np.int32(local["input_ids"].shape[1]))))
    pad = width - local["input_ids"].shape[1]
    if pad == 0:
        return local
    fill = {"input_ids": 0, "labels": IGNORE_INDEX, "attention_mask": False}
    out = dict(local)
    for key, value in fill.items():
        out[key] = np.pad(local[key], ((0, 0), (0, pad)), constant_values=value)
    return out


def global_batch(local: dict, sharding) -> dict:
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def total_steps(c, num_examples: int) -> int:
    if c.num_train_steps > 0:
        return int(c.num_train_steps)
    return max(1, int(math.ceil(c.num_epochs * num_examples / c.batch_size)))


def check_batch_divisibility(c, mesh) -> None:
    data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
    per_micro = c.batch_size // c.microbatches
    if per_micro % data_parallel:
        raise ValueError(f"config field 'batch_size': {c.batch_size} / microbatches {c.microbatches} = {per_micro} rows "
                         f"per microbatch is not divisible by the data-parallel size {data_parallel} (mesh data x "
                         f"fsdp); choose batch_size = k * {data_parallel * c.microbatches}")
    if c.batch_size % jax.process_count():
        raise ValueError(f"config field 'batch_size': {c.batch_size} is not divisible by {jax.process_count()} processes")


@dataclasses.dataclass
class Setup:
    """Everything a stage's step needs, built from a config (shared by `train` and the profiler)."""
    mesh: Any
    module: Exo2Ego
    model_cfg: Any
    spec: Any
    loss_cfg: Any
    data: Any
    steps: int
    tx: Any
    schedule: Any
    layout: Any
    state: dict
    frozen: dict
    step_fn: Any
    n_trainable: int
    n_frozen: int


def prepare(c) -> Setup:
    """Validate `c`, build the mesh, model, data, optimizer and the sharded initial state, jit the step."""
    config_lib.validate(c)
    devices = jax.devices() if c.mesh.num_devices < 0 else jax.devices()[:c.mesh.num_devices]
    mesh = create_mesh(tuple(c.mesh.shape), devices)
    check_batch_divisibility(c, mesh)
    init_path = resolve_init(c)
    model_cfg = config_lib.model_config(c)
    if init_path is not None:
        model_cfg = state_lib.checkpoint_model_config(init_path, model_cfg)
    module = Exo2Ego(model_cfg)
    spec = config_lib.stage_spec(c)
    loss_cfg = config_lib.loss_config(c)
    data = make_data(c, model_cfg, process_index=jax.process_index(), process_count=jax.process_count())
    steps = total_steps(c, len(data))
    tx, schedule = make_optimizer(c.optim, steps)
    layout = state_lib.build_layout(module, mesh, spec, tx)
    trainable, frozen = state_lib.init_params(module, mesh, layout, spec, seed=c.seed, frozen_dtype=c.frozen_dtype,
                                              checkpoint=init_path)
    n_trainable = sum(x.size for x in jax.tree.leaves(trainable))
    n_frozen = sum(x.size for x in jax.tree.leaves(frozen))
    state = state_lib.new_state(trainable, tx, layout, mesh, c.seed)
    step_fn = jit_train_step(make_train_step(module, spec, loss_cfg, tx, schedule, microbatches=c.microbatches,
                                             compute_dtype=jnp.dtype(c.compute_dtype)), layout)
    return Setup(mesh, module, model_cfg, spec, loss_cfg, data, steps, tx, schedule, layout, state, frozen, step_fn,
                 n_trainable, n_frozen)


def train(c, workdir: str, *, show_progress: bool = True) -> TrainResult:
    config_lib.validate(c)
    os.makedirs(workdir, exist_ok=True)
    is_main = jax.process_index() == 0
    if is_main:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(c.to_dict(), f, indent=2, default=str)
    setup = prepare(c)
    mesh, module, model_cfg, spec, loss_cfg = setup.mesh, setup.module, setup.model_cfg, setup.spec, setup.loss_cfg
    data, steps, layout, state, frozen = setup.data, setup.steps, setup.layout, setup.state, setup.frozen
    n_trainable, n_frozen = setup.n_trainable, setup.n_frozen

    checkpointer = TrainCheckpointer(os.path.join(workdir, "checkpoints"), keep=c.keep_checkpoints,
                                     async_save=c.async_checkpointing)
    start = checkpointer.latest_step()
    if start is not None:
        state, data_state = checkpointer.restore(start, state_lib.abstract_state(state, layout))
        data.set_state(data_state)
        _print(is_main, f"resumed from {workdir}/checkpoints step {start}")
    start = start or 0

    compute_dtype = jnp.dtype(c.compute_dtype)
    step_fn = setup.step_fn
    eval_fn = None
    if c.eval_every > 0:
        eval_data = make_data(c, model_cfg, process_index=jax.process_index(), process_count=jax.process_count(),
                              split="eval")
        eval_fn = jit_eval_step(make_eval_step(module, spec, loss_cfg, compute_dtype=compute_dtype), layout)
    logger = MetricsLogger(workdir, enabled=is_main)
    history = []
    _print(is_main, f"{c.stage}: {n_trainable / 1e6:.2f}M trainable / {n_frozen / 1e6:.2f}M frozen params, mesh "
                    f"{dict(mesh.shape)}, {steps} steps of {c.batch_size} (x{c.microbatches} microbatches)")

    # One executable per batch shape: length-bucketed data gives a few text widths (data.text_buckets).
    executables: dict = {}
    last_good = start if start else None
    bar = tqdm(total=steps, initial=start, desc=c.stage, disable=not (show_progress and is_main), unit="step")
    try:
        for step in range(start + 1, steps + 1):
            local = agree_on_text_width(next(data))
            fingerprint = batch_fingerprint(local)
            batch = global_batch(to_model_batch(local, compute_dtype), layout.batch)
            shape_key = tuple(sorted((k, v.shape) for k, v in batch.items()))
            if shape_key not in executables:
                with jax.set_mesh(mesh):
                    compiled = step_fn.lower(state, frozen, batch).compile()
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
                    raise TrainingDiverged(
                        f"{c.stage} step {step}: loss {values['loss']} / grad norm {values['grad_norm']} is not "
                        f"finite. The last good checkpoint (step {last_good}) in {workdir}/checkpoints is untouched; "
                        "lower optim.learning_rate or check the data, then rerun to resume from it")
                tokens = c.batch_size * (batch["input_ids"].shape[1] - 1 + model_cfg.num_visual_tokens(spec.fusion))
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
            export_dir = export(c, workdir, module, state["trainable"], frozen)
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


def export(c, workdir: str, module, trainable, frozen) -> str:
    """Full params (trainable + frozen) as a load_pretrained checkpoint; LoRA merged when configured."""
    params = combine_params(trainable, frozen)
    cfg = module.config
    if cfg.llm.lora is not None and c.export.merge_lora:
        params = dict(params, llm=merge_lora(params["llm"], cfg.llm.lora.scale))
        cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, lora=None))
    target = os.path.join(workdir, EXPORT_DIR)
    if jax.process_index() == 0 and os.path.exists(target):  # a resumed, already-finished run exports again
        import shutil
        shutil.rmtree(target)
    path = export_params(target, params, cfg.to_dict(), dtype=c.frozen_dtype, extra=dict(stage=c.stage))
    _copy_tokenizer(tokenizer_dir(c), path)
    return path


def _copy_tokenizer(source: str, target: str) -> None:
    """Exports carry the tokenizer so the next stage, evaluation and inference find it next to the weights."""
    from exo2ego_jax.convert.engine import TOKENIZER_FILES
    if jax.process_index() != 0 or not source or not os.path.isdir(source):
        return
    import shutil
    for name in TOKENIZER_FILES:
        if os.path.exists(os.path.join(source, name)):
            shutil.copy2(os.path.join(source, name), os.path.join(target, name))


def _flops(compiled) -> Optional[float]:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


def _print(is_main: bool, message: str) -> None:
    if is_main:
        print(message, flush=True)
