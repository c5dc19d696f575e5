"""A stage's ml_collections config, checked field by field and resolved once into a `Run`.

`resolve(c)` validates every field (a bad value raises `ConfigError` naming the field and what is allowed),
finds the init checkpoint, reconciles the config's model section with that checkpoint's architecture, and
builds the model / loss / stage objects. Everything downstream (state, step, data, export) takes the `Run`.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import ml_collections

from exo2ego_jax.checkpoints import CONFIG_FILE, TOKENIZER_FILES, read_model_config, stored_model_config
from exo2ego_jax.errors import ConfigError
from exo2ego_jax.locks import FolderLock
from exo2ego_jax.losses import LossConfig
from exo2ego_jax.models.clip import CLIPVisionConfig
from exo2ego_jax.models.exo2ego import SUBMODULES, Exo2EgoConfig
from exo2ego_jax.models.lora import LoRAConfig
from exo2ego_jax.models.mapper import MapperConfig
from exo2ego_jax.models.mistral import MistralConfig
from exo2ego_jax.models.stc import STCConfig
from exo2ego_jax.paths import absolute
from exo2ego_jax.sharding import FROZEN_LAYOUTS
from exo2ego_jax.train.hardware import ATTENTION_BY_PLATFORM, Hardware, apply_hardware, current_hardware
from exo2ego_jax.train.stages import STAGES, StageSpec, get_stage

DTYPES = ("float32", "bfloat16", "float16")
SCHEDULES = ("cosine", "linear", "constant")
DATA_SOURCES = ("toy", "ego_exo_clip", "ego_it", "records")
EXPORT_DIR = "export"  # a finished stage's load_pretrained checkpoint inside its workdir

# Model-config fields a run may set on top of a checkpoint's architecture (no param changes shape).
RUNTIME_FIELDS = {
    "clip": ("dtype", "param_dtype", "scan_layers", "remat_policy", "attention_impl"),
    "llm": ("dtype", "param_dtype", "scan_layers", "remat_policy", "attention_impl", "lora"),
    "stc": ("dtype", "param_dtype"),
    "mapper": ("dtype", "param_dtype", "dropout"),
}
SECTION_MODULES = {"clip": ("ego_encoder", "exo_encoder"), "llm": ("llm",), "stc": ("connector",),
                   "mapper": ("mapper_f", "mapper_g")}


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _require(cond: bool, field: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"config field {field!r}: {message}")


def validate(c) -> None:
    """Check every field of a stage config; raise ConfigError naming the first bad one."""
    _require(c.stage in STAGES, "stage", f"{c.stage!r} is not one of {sorted(STAGES)}")
    for field in ("compute_dtype", "frozen_dtype"):
        _require(c[field] in DTYPES, field, f"{c[field]!r} is not one of {DTYPES}")
    _require(c.batch_size > 0, "batch_size", f"must be positive, got {c.batch_size}")
    _require(c.per_device_batch >= 0, "per_device_batch", f"must be >= 0 (0: use microbatches), got {c.per_device_batch}")
    _require(c.microbatches > 0 and c.batch_size % c.microbatches == 0, "microbatches",
             f"{c.microbatches} must be positive and divide batch_size {c.batch_size}")
    _require(_finite(c.optim.learning_rate) and c.optim.learning_rate > 0, "optim.learning_rate",
             f"must be a finite number > 0, got {c.optim.learning_rate}")
    for weight in ("vtg_weight", "cycle_weight", "kl_weight"):
        value = c.loss[weight]
        _require(_finite(value) and value >= 0, f"loss.{weight}", f"must be a finite number >= 0, got {value}")
    _require(_finite(c.loss.kl_temperature) and c.loss.kl_temperature > 0, "loss.kl_temperature",
             f"must be a finite number > 0, got {c.loss.kl_temperature}")
    _require(0 <= c.optim.warmup_ratio < 1, "optim.warmup_ratio", f"must be in [0, 1), got {c.optim.warmup_ratio}")
    _require(c.optim.schedule in SCHEDULES, "optim.schedule", f"{c.optim.schedule!r} is not one of {SCHEDULES}")
    _require(c.optim.grad_clip >= 0, "optim.grad_clip", f"must be >= 0, got {c.optim.grad_clip}")
    _require(c.num_train_steps > 0 or c.num_epochs > 0, "num_epochs", "set num_epochs > 0 or num_train_steps > 0")
    _require(c.data.source in DATA_SOURCES, "data.source", f"{c.data.source!r} is not one of {DATA_SOURCES}" +
             (" (the in-memory set formerly called 'synthetic' is 'toy'; the rendered synthetic ego-exo dataset "
              "is read through 'ego_exo_clip' / 'ego_it' records)" if c.data.source == "synthetic" else ""))
    _require(c.log_every > 0, "log_every", f"must be positive, got {c.log_every}")
    _require(c.checkpoint_every > 0, "checkpoint_every", f"must be positive, got {c.checkpoint_every}")
    _require(c.keep_checkpoints > 0, "keep_checkpoints", f"must be positive, got {c.keep_checkpoints}")
    _require(c.sharding.frozen in FROZEN_LAYOUTS, "sharding.frozen", f"{c.sharding.frozen!r} is not one of {FROZEN_LAYOUTS}")
    _require(len(tuple(c.mesh.shape)) == 3, "mesh.shape", f"needs 3 entries (data, fsdp, tensor), got {c.mesh.shape}")
    _require(not (c.init.checkpoint and c.init.from_workdir), "init.checkpoint",
             "set init.checkpoint or init.from_workdir, not both")
    unknown = sorted(set(c.init.reinit) - set(SUBMODULES))
    _require(not unknown, "init.reinit", f"unknown modules {unknown}; choose among {sorted(SUBMODULES)}")
    _require(c.data.seq_len > 0, "data.seq_len", f"must be positive, got {c.data.seq_len}")
    _require(c.data.worker_count >= 0, "data.worker_count", f"must be >= 0, got {c.data.worker_count}")
    _require(c.data.aspect in ("crop", "pad"), "data.aspect", f"{c.data.aspect!r} is not 'crop' or 'pad'")
    _require(all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in c.data.text_buckets),
             "data.text_buckets", f"must be positive integer lengths, e.g. (256, 512), got {tuple(c.data.text_buckets)}")
    if c.data.source != "toy":
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
    """The model the config's `model` section describes (before any init checkpoint is consulted)."""
    m = c.model
    compute = c.compute_dtype
    attention = m.attention_impl
    if attention == "auto":  # not resolved for a target yet (resolve() does): this process's platform
        attention = ATTENTION_BY_PLATFORM[current_hardware().platform]
    clip = CLIPVisionConfig(**dict(m.clip), dtype=compute, scan_layers=m.scan_layers,
                            remat_policy=m.clip_remat_policy, attention_impl=attention)
    lora = None
    if c.lora.enabled:
        lora = LoRAConfig(rank=c.lora.rank, alpha=c.lora.alpha, dropout=c.lora.dropout, targets=tuple(c.lora.targets))
    llm = MistralConfig(**dict(m.llm), dtype=compute, scan_layers=m.scan_layers, remat_policy=m.remat_policy,
                        attention_impl=attention, lora=lora)
    stc = STCConfig(encoder_hidden_size=clip.hidden_size, hidden_size=llm.hidden_size, dtype=compute, **dict(m.stc))
    mapper = MapperConfig(channels=clip.hidden_size, dtype=compute, **dict(m.mapper))
    return Exo2EgoConfig(clip=clip, llm=llm, stc=stc, mapper=mapper, num_frames=m.num_frames, fusion=m.fusion,
                         length_buckets=tuple(m.length_buckets))


def loss_config(c) -> LossConfig:
    return LossConfig(**dict(c.loss))


def stage_spec(c) -> StageSpec:
    return get_stage(c.stage, trainable=tuple(c.trainable) or None, fusion=c.fusion or None, loss=loss_config(c),
                     lora=bool(c.lora.enabled), train_connector=bool(c.train_connector))


def tokenizer_dir(c) -> str:
    """Where this run's tokenizer lives: data.tokenizer, else the init checkpoint, else the previous stage's
    export (exports carry the tokenizer files along). Empty when none of them has one."""
    candidates = [c.data.tokenizer, c.init.checkpoint]
    if c.init.from_workdir:
        candidates.append(os.path.join(c.init.from_workdir, EXPORT_DIR))
    for path in candidates:
        if path and any(os.path.exists(os.path.join(path, f)) for f in TOKENIZER_FILES[:2]):
            return path
    return c.data.tokenizer or c.init.checkpoint or ""


STAGE_ORDER = ("init", "stage1", "stage2", "stage3")


def check_stage_order(c, source_stage: str | None, path: str) -> None:
    """A stage starts from an earlier stage's export (or its own, to continue it); a later stage's export is
    refused unless `init.allow_later_stage` says it is intended."""
    if source_stage not in STAGE_ORDER or c.stage not in STAGE_ORDER or c.init.get("allow_later_stage", False):
        return
    index = STAGE_ORDER.index(c.stage)
    if STAGE_ORDER.index(source_stage) > index:
        previous = f"the workdir of {STAGE_ORDER[index - 1]}" if index else "a converted checkpoint"
        raise ConfigError(f"config field 'init.from_workdir': {path} is the export of {source_stage}, which comes "
                          f"after {c.stage}; start {c.stage} from {previous}, or set "
                          "--config.init.allow_later_stage=True if this is intended")


def describe_init(path: str | None) -> str:
    """One line naming what a run starts from: the stage and step of an export, or a converted checkpoint."""
    if path is None:
        return "init: a seeded random init"
    meta = read_model_config(path)
    if meta.get("stage"):
        step = f" at step {meta['step']}" if meta.get("step") is not None else ""
        return f"init: {path}, the export of {meta['stage']}{step}"
    return f"init: {path} ({meta.get('kind', 'checkpoint')})"


def resolve_init(c) -> str | None:
    """The checkpoint the params start from (None: a seeded random init, tiny/demo only)."""
    if c.init.checkpoint:
        path = c.init.checkpoint
        if not os.path.exists(os.path.join(path, CONFIG_FILE)):
            raise ConfigError(f"config field 'init.checkpoint': {path!r} is not a converted checkpoint (no "
                              f"{CONFIG_FILE}); convert one with `python -m exo2ego_jax.convert videollama2 ...`")
        return path
    if c.init.from_workdir:
        holder = FolderLock(c.init.from_workdir).live_holder()
        if holder is not None:
            raise ConfigError(f"config field 'init.from_workdir': {c.init.from_workdir!r} is in use by a live run (pid "
                              f"{holder.get('pid')} on {holder.get('host')}, since {holder.get('started')}); its export "
                              "is from an earlier run or not written yet: wait for that run to finish")
        path = os.path.join(c.init.from_workdir, EXPORT_DIR)
        if not os.path.exists(os.path.join(path, CONFIG_FILE)):
            raise ConfigError(f"config field 'init.from_workdir': {c.init.from_workdir!r} has no finished export "
                              f"({path}); run the previous stage to the end, or set init.checkpoint to a converted "
                              "checkpoint")
        check_stage_order(c, read_model_config(path).get("stage"), path)
        return path
    if not c.init.allow_random:
        raise ConfigError("config field 'init.checkpoint': no init checkpoint or previous-stage workdir is set and "
                          "init.allow_random is False; point init.checkpoint at a converted checkpoint")
    return None


def checkpoint_model_config(path: str, c, run_cfg: Exo2EgoConfig, explicit=None) -> tuple[Exo2EgoConfig, list[str]]:
    """The init checkpoint's architecture with this run's runtime fields, and lines saying what was taken.

    A model field the config sets differently from the checkpoint is taken from the checkpoint when the command
    line did not set it (`explicit`: the dotted override keys; None counts every field as set, as for a config
    built in code), and noted. Fields set explicitly that the checkpoint cannot satisfy (another width, a mapper
    of another kind) are refused together in one message, unless the modules they belong to are listed in
    `init.reinit`: those take the config's architecture and start from a fresh seeded init.
    """
    meta = read_model_config(path)
    if meta["kind"] != "exo2ego":
        raise ConfigError(f"init checkpoint {path!r} holds a {meta['kind']!r} model; stages start from an exo2ego "
                          "checkpoint (python -m exo2ego_jax.convert videollama2 ...) or a previous stage's export")
    stored_model_config(path, meta)  # a model_config.json that describes no model is named here, not later
    stored = meta["config"]
    reinit = set(c.init.reinit)
    is_explicit = (lambda flag: True) if explicit is None else (lambda flag: flag in explicit)
    merged: dict[str, Any] = {}
    taken, conflicts = [], []
    for section, runtime in RUNTIME_FIELDS.items():
        ours = dataclasses.asdict(getattr(run_cfg, section))
        theirs = dict(stored.get(section, {}))
        if set(SECTION_MODULES[section]) <= reinit:
            merged[section] = ours  # re-initialised: the config's architecture wins
            continue
        for field in c.model[section]:
            if field in runtime or theirs.get(field, ours[field]) == ours[field]:
                continue
            flag = f"model.{section}.{field}"
            if is_explicit(flag):
                conflicts.append((flag, ours[field], theirs.get(field), SECTION_MODULES[section]))
            else:
                taken.append(f"{flag}={theirs[field]!r} (the preset says {ours[field]!r})")
        merged[section] = {**theirs, **{k: ours[k] for k in runtime}}
        if section == "mapper" and "channels" in merged[section]:
            merged[section]["channels"] = theirs.get("channels", ours["channels"])
    if conflicts:
        shown = "; ".join(f"--config.{flag}={mine!r} but the checkpoint has {theirs!r}" for flag, mine, theirs, _ in
                          conflicts)
        modules = sorted({m for *_, mods in conflicts for m in mods})
        raise ConfigError(f"the init checkpoint {path!r} was built with other sizes than the command line sets: "
                          f"{shown}. Drop these overrides to take the checkpoint's, or re-initialise "
                          f"{'/'.join(modules)} with --config.init.reinit='{tuple(modules)!r}'")
    num_frames = run_cfg.num_frames
    if stored.get("num_frames", num_frames) != num_frames and not is_explicit("model.num_frames"):
        taken.append(f"model.num_frames={stored['num_frames']} (the preset says {num_frames}; the data follows)")
        num_frames = stored["num_frames"]
    top = dict(fusion=run_cfg.fusion, length_buckets=run_cfg.length_buckets, num_frames=num_frames)
    notes = [f"architecture from the init checkpoint {path}: " + ", ".join(taken)] if taken else []
    return Exo2EgoConfig.from_dict({**stored, **merged, **top}), notes


@dataclasses.dataclass(frozen=True)
class Run:
    """A validated stage config and everything derived from it once."""
    config: ml_collections.ConfigDict
    model: Exo2EgoConfig
    loss: LossConfig
    stage: StageSpec
    init_path: str | None
    tokenizer_dir: str
    notes: tuple[str, ...] = ()   # what the run took from its init checkpoint (printed at start)

    @property
    def views(self) -> tuple[str, ...]:
        """The clip views this stage reads: ego and exo for the guidance stage, else the one feeding the LLM."""
        return ("ego", "exo") if self.stage.guidance else (self.stage.view,)

    def microbatches(self, data_parallel: int) -> int:
        """Gradient-accumulation steps for `data_parallel` devices (mesh data x fsdp).

        With `per_device_batch` set, the global batch is split into rows of that many clips per device
        (MaxText's per_device_batch_size): microbatches = batch_size / (per_device_batch x data_parallel).
        Otherwise `microbatches` is taken as given.
        """
        c = self.config
        if c.per_device_batch > 0:
            rows = c.per_device_batch * data_parallel
            if c.batch_size % rows:
                per_device = c.batch_size // data_parallel
                hint = (f"a per_device_batch dividing {per_device}" if c.batch_size % data_parallel == 0 else
                        f"a mesh whose data x fsdp divides {c.batch_size}")
                raise ConfigError(
                    f"config field 'batch_size': {c.batch_size} cannot be split into microbatches of per_device_batch "
                    f"{c.per_device_batch} x {data_parallel} data-parallel devices = {rows} rows; choose {hint}")
            return c.batch_size // rows
        per_micro = c.batch_size // c.microbatches
        if per_micro % data_parallel:
            raise ConfigError(
                f"config field 'batch_size': {c.batch_size} / microbatches {c.microbatches} = {per_micro} rows per "
                f"microbatch is not divisible by the data-parallel size {data_parallel} (mesh data x fsdp); set "
                f"per_device_batch instead, or choose batch_size = k * {data_parallel * c.microbatches}")
        return c.microbatches


def resolve_for_compile(c, hardware: Hardware, explicit=None) -> Run:
    """`c` resolved for `hardware` and validated, with the architecture of its model section and no init
    checkpoint read (ahead-of-time compilation needs shapes only; the 7b presets' model section is
    VideoLLaMA2-7B-16F's)."""
    notes = apply_hardware(c, hardware, explicit)
    validate(c)
    return Run(config=c, model=model_config(c), loss=loss_config(c), stage=stage_spec(c), init_path=None,
               tokenizer_dir="", notes=tuple(notes))


# Config fields holding paths: made absolute once, so the run (and its recorded config) means the same from any
# current directory.
PATH_FIELDS = (("init", "checkpoint"), ("init", "from_workdir"), ("data", "root"), ("data", "tokenizer"))


def absolute_paths(c) -> None:
    for section, field in PATH_FIELDS:
        c[section][field] = absolute(c[section][field])


def resolve(c, explicit=None, hardware: Hardware | None = None) -> Run:
    """Validate `c` (its path fields made absolute, its hardware choices resolved for `hardware`, by default
    this process's devices) and derive the model, loss and stage once. `explicit`: the config fields the
    command line set (see `checkpoint_model_config`)."""
    absolute_paths(c)
    notes = apply_hardware(c, hardware or current_hardware(), explicit)
    validate(c)
    init_path = resolve_init(c)
    model = model_config(c)
    if init_path is not None:
        model, from_checkpoint = checkpoint_model_config(init_path, c, model, explicit)
        notes += from_checkpoint
    return Run(config=c, model=model, loss=loss_config(c), stage=stage_spec(c), init_path=init_path,
               tokenizer_dir=tokenizer_dir(c), notes=tuple(notes))
