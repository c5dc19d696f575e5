"""Turn a stage's ml_collections config into model / loss / stage objects, validating every field on the way.

A bad value raises `ConfigError` naming the field and what is allowed, before anything is compiled.
"""
from __future__ import annotations

from typing import Any

from exo2ego_jax.losses import LossConfig
from exo2ego_jax.models.clip import CLIPVisionConfig
from exo2ego_jax.models.exo2ego import Exo2EgoConfig
from exo2ego_jax.models.lora import LoRAConfig
from exo2ego_jax.models.mapper import MapperConfig
from exo2ego_jax.models.mistral import MistralConfig
from exo2ego_jax.models.stc import STCConfig
from exo2ego_jax.stages import STAGES, StageSpec, get_stage

DTYPES = ("float32", "bfloat16", "float16")
SCHEDULES = ("cosine", "linear", "constant")
DATA_SOURCES = ("synthetic", "ego_exo_clip", "ego_it", "records")


class ConfigError(ValueError):
    """A config field holds a value that cannot work; the message names the field."""


def _require(cond: bool, field: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"config field {field!r}: {message}")


def validate(c) -> None:
    _require(c.stage in STAGES, "stage", f"{c.stage!r} is not one of {sorted(STAGES)}")
    for field in ("compute_dtype", "frozen_dtype"):
        _require(c[field] in DTYPES, field, f"{c[field]!r} is not one of {DTYPES}")
    _require(c.batch_size > 0, "batch_size", f"must be positive, got {c.batch_size}")
    _require(c.microbatches > 0 and c.batch_size % c.microbatches == 0, "microbatches",
             f"{c.microbatches} must be positive and divide batch_size {c.batch_size}")
    _require(c.optim.learning_rate > 0, "optim.learning_rate", f"must be > 0, got {c.optim.learning_rate}")
    _require(0 <= c.optim.warmup_ratio < 1, "optim.warmup_ratio", f"must be in [0, 1), got {c.optim.warmup_ratio}")
    _require(c.optim.schedule in SCHEDULES, "optim.schedule", f"{c.optim.schedule!r} is not one of {SCHEDULES}")
    _require(c.optim.grad_clip >= 0, "optim.grad_clip", f"must be >= 0, got {c.optim.grad_clip}")
    _require(c.num_train_steps > 0 or c.num_epochs > 0, "num_epochs",
             "set num_epochs > 0 or num_train_steps > 0")
    _require(c.data.source in DATA_SOURCES, "data.source", f"{c.data.source!r} is not one of {DATA_SOURCES}")
    _require(c.log_every > 0, "log_every", f"must be positive, got {c.log_every}")
    _require(c.checkpoint_every > 0, "checkpoint_every", f"must be positive, got {c.checkpoint_every}")
    _require(c.keep_checkpoints > 0, "keep_checkpoints", f"must be positive, got {c.keep_checkpoints}")
    _require(len(tuple(c.mesh.shape)) == 3, "mesh.shape", f"needs 3 entries (data, fsdp, tensor), got {c.mesh.shape}")
    _require(not (c.init.checkpoint and c.init.from_workdir), "init.checkpoint",
             "set init.checkpoint or init.from_workdir, not both")
    _require(c.data.seq_len > 0, "data.seq_len", f"must be positive, got {c.data.seq_len}")
    _require(c.data.worker_count >= 0, "data.worker_count", f"must be >= 0, got {c.data.worker_count}")
    _require(c.data.aspect in ("crop", "pad"), "data.aspect", f"{c.data.aspect!r} is not 'crop' or 'pad'")
    _require(all(int(b) > 0 for b in c.data.text_buckets), "data.text_buckets",
             f"must be positive lengths, got {tuple(c.data.text_buckets)}")
    if c.data.source != "synthetic":
        _require(bool(c.data.root), "data.root", f"is empty; data.source={c.data.source!r} reads records built by "
                 "`python -m exo2ego_jax.data.build ... --out DIR`: set data.root=DIR")
        _require(bool(c.data.tokenizer or c.init.checkpoint or c.init.from_workdir), "data.tokenizer",
                 "is empty and no init checkpoint holds a tokenizer; set data.tokenizer to a folder with tokenizer.json")
    # Constructing the dataclasses runs their own checks; re-raise them as ConfigErrors with the section.
    for section, build in (("model", lambda: model_config(c)), ("loss", lambda: loss_config(c)),
                           ("trainable", lambda: stage_spec(c))):
        try:
            build()
        except ConfigError:
            raise
        except (ValueError, TypeError) as e:
            raise ConfigError(f"config section {section!r}: {e}") from e


def model_config(c) -> Exo2EgoConfig:
    m = c.model
    compute = c.compute_dtype
    clip = CLIPVisionConfig(**dict(m.clip), dtype=compute, scan_layers=m.scan_layers,
                            remat_policy=m.clip_remat_policy, attention_impl=m.attention_impl)
    lora = None
    if c.lora.enabled:
        lora = LoRAConfig(rank=c.lora.rank, alpha=c.lora.alpha, dropout=c.lora.dropout,
                          targets=tuple(c.lora.targets))
    llm = MistralConfig(**dict(m.llm), dtype=compute, scan_layers=m.scan_layers, remat_policy=m.remat_policy,
                        attention_impl=m.attention_impl, lora=lora)
    stc = STCConfig(encoder_hidden_size=clip.hidden_size, hidden_size=llm.hidden_size, dtype=compute, **dict(m.stc))
    mapper = MapperConfig(channels=clip.hidden_size, dtype=compute, **dict(m.mapper))
    return Exo2EgoConfig(clip=clip, llm=llm, stc=stc, mapper=mapper, num_frames=m.num_frames, fusion=m.fusion,
                         length_buckets=tuple(m.length_buckets))


def loss_config(c) -> LossConfig:
    return LossConfig(**dict(c.loss))


EXPORT_DIR = "export"  # a finished stage's load_pretrained checkpoint inside its workdir


def tokenizer_dir(c) -> str:
    """Where this run's tokenizer lives: data.tokenizer, else the init checkpoint, else the previous stage's
    export (exports carry the tokenizer files along). Empty when none of them has one."""
    import os
    candidates = [c.data.tokenizer, c.init.checkpoint]
    if c.init.from_workdir:
        candidates.append(os.path.join(c.init.from_workdir, EXPORT_DIR))
    for path in candidates:
        if path and any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer.model")):
            return path
    return c.data.tokenizer or c.init.checkpoint or ""


def stage_spec(c) -> StageSpec:
    return get_stage(c.stage, trainable=tuple(c.trainable) or None, fusion=c.fusion or None, loss=loss_config(c),
                     lora=bool(c.lora.enabled))


def as_plain(value: Any):
    """ConfigDict -> plain dict/list values (for JSON and logging)."""
    if hasattr(value, "to_dict"):
        return value.to_dict()
    return value


def load_config_file(path: str, preset: str, overrides: dict | None = None):
    """`get_config(preset)` of a config file, with dotted-key overrides ({"optim.learning_rate": 1e-4})."""
    import importlib.util
    import os
    name = "config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or not os.path.exists(path):
        raise ConfigError(f"config file {path!r} does not exist")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config(preset)
    for key, value in (overrides or {}).items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c
