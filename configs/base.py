"""Shared ml_collections config for every stage: `get_base_config(stage, preset)`.

Stage files (configs/stage0.py ... stage3.py) call this and set their own hyperparameters. Presets:
  tiny  CPU in about a minute: random init, the in-memory `toy` batches, float32.
  demo  the synthetic ego-exo dataset of the demo (a tiny model, CPU).
  7b    the paper's model (CLIP-L/14-336, STC, Mistral-7B) and hyperparameters, for GPU pods and TPU slices.
Fields are validated at start-up (`exo2ego_jax.train.config.validate`): a bad value names the field.
"""
import ml_collections

from exo2ego_jax.errors import ConfigError
from exo2ego_jax.models.mapper import RECOMMENDED
from exo2ego_jax.models.sizes import CLIP_L14_336, MISTRAL_7B
from exo2ego_jax.train.hardware import empty_hardware_section

PRESETS = ("tiny", "demo", "7b")


def model_config(preset: str) -> ml_collections.ConfigDict:
    if preset == "7b":
        return ml_collections.ConfigDict(dict(
            clip=dict(CLIP_L14_336, select_layer=-2), llm=dict(MISTRAL_7B),
            stc=dict(depth=4, variant="stc"),
            mapper=dict(kind="resnet", width=256, num_blocks=9, output_tanh=False, dropout=0.0, **RECOMMENDED),
            num_frames=16, fusion="tokens", length_buckets=(4096, 5120, 6144),
            scan_layers=False, remat_policy="dots_no_batch", clip_remat_policy="full", attention_impl="auto"))
    return ml_collections.ConfigDict(dict(
        clip=dict(hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4, patch_size=4, image_size=32,
                  select_layer=-2),
        llm=dict(vocab_size=64 if preset == "tiny" else 512, hidden_size=48, intermediate_size=96, num_layers=2,
                 num_heads=4, num_kv_heads=2, head_dim=12, rope_theta=1e6, sliding_window=None),
        stc=dict(depth=1, variant="stc"),
        mapper=dict(kind="resnet", width=8, num_blocks=2, output_tanh=False, dropout=0.0, **RECOMMENDED),
        num_frames=4, fusion="tokens", length_buckets=(),
        scan_layers=True, remat_policy="none", clip_remat_policy="none", attention_impl="xla"))


def check_preset(preset: str, what: str) -> str:
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r} for {what}; choose one of {PRESETS} (configs/FILE.py:PRESET)")
    return preset


def get_base_config(stage: str, preset: str) -> ml_collections.ConfigDict:
    check_preset(preset, stage)
    c = ml_collections.ConfigDict()
    c.stage = stage
    c.preset = preset
    c.seed = 42  # VideoLLaMA2's set_seed(42)
    c.model = model_config(preset)

    # LoRA (stage 3): r=128, alpha=256, dropout 0.1 on q,k,v,o,gate,up,down.
    # (tiny: r=4; the demo's 48-wide LLM needs r=16 to learn its answers within a few hundred steps)
    rank = {"7b": 128, "demo": 16}.get(preset, 4)
    c.lora = ml_collections.ConfigDict(dict(enabled=False, rank=rank, alpha=2.0 * rank, dropout=0.1,
                                            targets=("q", "k", "v", "o", "gate", "up", "down")))
    c.loss = ml_collections.ConfigDict(dict(vtg_weight=1.0, cycle_weight=1.0, kl_weight=1.0, cycle="both",
                                            use_kl=True, kl_temperature=1.0, kl_direction="exo_to_mapped",
                                            kl_reduction="token_mean", kl_mode="tokens", detach_cycle_targets=False))
    # Trainable params: regexes over '/'-joined param paths; each stage file shows its table from
    # exo2ego_jax/train/stages.py (empty = that default). Everything else is frozen, kept in frozen_dtype,
    # gets no optimizer state and, through stop_gradient, no weight gradient.
    c.trainable = ()
    c.train_connector = False  # stage 1 only: also train the connector (our option; the paper trains the exo encoder)
    c.fusion = ""  # LLM input fusion for this stage; empty = the stage's default

    # Where the params start: a converted/exported checkpoint folder, the previous stage's workdir
    # (its `export/`), or nothing (random init; only sensible for tiny/demo).
    # `reinit`: modules that start from a fresh seeded init instead of the checkpoint (e.g. ("mapper_f",
    # "mapper_g") to train FC mappers from a checkpoint with ResNet ones; any of ego_encoder, exo_encoder,
    # mapper_f, mapper_g, connector, llm).
    # `shared_tower`: a random init copies the ego encoder into the exo encoder, so both towers start from the
    # same weights in every preset, as at 7b, where both are VideoLLaMA2's CLIP (our choice for the random
    # presets; without it stage 1 starts the exo path from features the connector never read).
    # `allow_later_stage`: from_workdir may name a later stage's export (refused by default: stage 2's export
    # as stage 1's init is almost always a wrong path).
    c.init = ml_collections.ConfigDict(dict(checkpoint="", from_workdir="", allow_random=preset != "7b",
                                            reinit=(), shared_tower=True, allow_later_stage=False))

    # Precision: trainable params keep float32 master weights; frozen params are stored in `frozen_dtype`;
    # compute runs in `compute_dtype`.
    c.compute_dtype = "bfloat16" if preset == "7b" else "float32"
    c.frozen_dtype = "bfloat16" if preset == "7b" else "float32"

    # Frozen params on every device whole ("replicated": no collectives for them, more memory) or sharded like
    # the trainable ones ("fsdp": gathered where used, once per microbatch). Trainable params and their
    # optimizer state are always sharded (exo2ego_jax/sharding.py). 7b: replicated; the frozen bf16 Mistral-7B
    # (13.5 GiB per GPU) saves the per-microbatch gathers (stage 3 on 8 H100s: 51 instead of
    # 249 GB of collectives per step, launch/BENCHMARKS.md).
    c.sharding = ml_collections.ConfigDict(dict(frozen="replicated" if preset == "7b" else "fsdp"))

    # Mesh ('data', 'fsdp', 'tensor'); -1 fills with the remaining devices.
    c.mesh = ml_collections.ConfigDict(dict(shape=(1, -1, 1) if preset == "7b" else (-1, 1, 1),
                                            num_devices=-1))  # use the first N devices; -1: all

    # Settings that depend on where the run executes, applied at start-up (exo2ego_jax/train/hardware.py): for
    # each platform (gpu, tpu, cpu) and TPU generation (v4, v5e, v5p, v6e), (dotted field, value) pairs; a field
    # set on the command line wins. `model.attention_impl="auto"` picks cuDNN on GPUs, splash on TPUs, xla on CPUs.
    c.hardware = empty_hardware_section()
    if preset == "7b":
        # TPUs: scanned layers (XLA's TPU compile of 32 unrolled Mistral layers passes 17 GB of host memory;
        # scanned, about 7 GB). v5e chips (15.75 GiB) and stage 3 on v6e chips (31.25 GiB): one clip's
        # activations do not fit beside the model at dots_no_batch remat (stage 3 needs 35 GiB of temporaries per
        # clip on v5p), and a stronger remat policy would recompute past 1.3x the useful FLOPs; 4-way tensor
        # parallelism over ICI splits them, with the frozen weights sharded too. Stages 0-2 on v6e fit one clip
        # per chip without it, and the estimate finds tensor parallelism's per-layer collectives and partial-sum
        # passes costly there (launch/BENCHMARKS.md, TPU tables).
        # v5e: 8-way (4-way leaves stage 3 at 15.4 of 15.75 GiB on v5e-256).
        tensor_parallel = (("mesh.shape", (1, -1, 4)), ("sharding.frozen", "fsdp"))
        c.hardware.tpu = (("model.scan_layers", True),)
        c.hardware.v5e = (("mesh.shape", (1, -1, 8)), ("sharding.frozen", "fsdp"))
        c.hardware.v6e = tensor_parallel if stage == "stage3" else (("per_device_batch", 1), ("sharding.frozen", "fsdp"))

    c.optim = ml_collections.ConfigDict(dict(learning_rate=1e-4, warmup_ratio=0.03, schedule="cosine",
                                             b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, grad_clip=1.0,
                                             no_decay=(r".*/bias", r".*/scale", r".*norm.*", r".*layrnorm.*")))
    c.batch_size = 8          # global batch per optimizer step (all processes)
    # Rows per data-parallel device per microbatch; the gradient-accumulation steps follow from it
    # (batch_size / (per_device_batch x data x fsdp)). 0: use `microbatches` as given.
    c.per_device_batch = 0
    c.microbatches = 1        # gradient accumulation steps inside one jitted step (when per_device_batch is 0)
    c.num_epochs = 1.0
    c.num_train_steps = -1    # > 0 overrides num_epochs

    # Data: `toy` is an in-memory toy set; ego_exo_clip / ego_it / records read TFDS records built by
    # `python -m exo2ego_jax.data.build` under `root` through the Grain pipeline (exo2ego_jax/data/loader.py).
    # seq_len caps the text ids before the visual tokens are spliced (VideoLLaMA2's model_max_length 2048);
    # batches are padded to the smallest of text_buckets that fits. The tokenizer defaults to init.checkpoint's.
    c.data = ml_collections.ConfigDict(dict(source="toy", root="", split="train", num_examples=16,
                                            seq_len=16, worker_count=0, shuffle=True, eval_split="",
                                            tokenizer="", aspect="crop", text_buckets=(), swap_views=False,
                                            exo_fraction=0.0))
    if preset == "7b":  # records built by exo2ego_jax.data.build; the tokenizer of the converted checkpoint
        c.data.update(dict(root="/data/records", tokenizer="/ckpt/jax/videollama2-7b-16f", seq_len=2048,
                           text_buckets=(256, 512, 1024, 2048), worker_count=8, eval_split="val"))
    if preset == "demo":  # launch/demo.py writes the synthetic records and tokenizer here (or overrides them)
        c.data.update(dict(root="/tmp/exo2ego_demo/data/records", tokenizer="/tmp/exo2ego_demo/data/tokenizer",
                           seq_len=128, text_buckets=(32, 64, 128), eval_split="val"))
    c.log_every = 1
    c.eval_every = 0          # 0: no periodic eval
    c.eval_batches = 2
    c.checkpoint_every = 10
    c.keep_checkpoints = 3
    c.async_checkpointing = True
    c.export = ml_collections.ConfigDict(dict(enabled=True, merge_lora=True))
    c.hold_after_step = -1    # test hook: after this step's checkpoint is written, wait to be killed
    # A relaunch whose config differs from the one recorded in the workdir (other than steps, logging,
    # evaluation and checkpoint cadence, the mesh and microbatching) is refused unless this is True.
    c.force_new_config = False
    return c
