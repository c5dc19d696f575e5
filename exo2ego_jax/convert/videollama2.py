"""VideoLLaMA2 checkpoint -> Exo2Ego composite checkpoint.

Both encoders start from the checkpoint's CLIP tower (`model.vision_tower.vision_tower.vision_model.`), the
connector from `model.mm_projector.` (or a separate `mm_projector` file, as Base checkpoints ship it), the LLM
from the Mistral keys; F and G get a seeded fresh init. A tower missing from the checkpoint (Base releases
keep only the projector) can come from a separate CLIP folder (`--clip_dir`).
"""
from __future__ import annotations

import json
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from exo2ego_jax.convert import clip as _clip
from exo2ego_jax.convert import mistral as _mistral
from exo2ego_jax.convert.engine import TensorRule, convert_checkpoint, detect_prefix, expand_rules
from exo2ego_jax.convert.hf_config import read_hf_config
from exo2ego_jax.convert.safetensors_reader import SafetensorsCheckpoint
from exo2ego_jax.convert.stc import params_from_state_dict, stc_rules
from exo2ego_jax.errors import CheckpointError
from exo2ego_jax.models.clip import CLIPVisionConfig
from exo2ego_jax.models.exo2ego import Exo2EgoConfig
from exo2ego_jax.models.mapper import RECOMMENDED, MapperConfig, build_mapper
from exo2ego_jax.models.mistral import MistralConfig
from exo2ego_jax.models.params import flatten
from exo2ego_jax.models.registry import abstract_params, build_module, flat_shapes
from exo2ego_jax.models.stc import STCConfig

PROJECTOR_TYPES = {"stc_connector": "stc", "stc_connector_v35": "stc_v35"}
TOWER_PREFIX = "model.vision_tower.vision_tower.vision_model."
PROJECTOR_PREFIX = "model.mm_projector."


class MultiCheckpoint:
    """Several safetensors folders seen as one, the second and later ones under a `name::` namespace."""

    def __init__(self, primary: SafetensorsCheckpoint, **others: SafetensorsCheckpoint):
        self.hf_dir = primary.hf_dir
        self._parts = {"": primary, **{f"{k}::": v for k, v in others.items()}}

    def _split(self, key):
        for ns, ckpt in self._parts.items():
            if ns and key.startswith(ns):
                return ckpt, key[len(ns):]
        return self._parts[""], key

    def keys(self):
        return sorted(ns + k for ns, c in self._parts.items() for k in c.keys())  # noqa: SIM118

    def __contains__(self, key):
        ckpt, k = self._split(key)
        return k in ckpt

    def shape(self, key):
        ckpt, k = self._split(key)
        return ckpt.shape(k)

    def view(self, key):
        ckpt, k = self._split(key)
        return ckpt.view(k)


def _prefixed(rules, target_prefix: str, source_prefix: str):
    return [TensorRule(target_prefix + r.target, source_prefix + r.source, r.layout) for r in rules]


def local_tower(hf: dict, hf_dir: str) -> str | None:
    """The folder `mm_vision_tower` names, when it is a local one with a config.json (VideoLLaMA2's training code
    records the path it loaded the tower from): as given, or relative to the checkpoint folder."""
    name = hf.get("mm_vision_tower")
    if not isinstance(name, str) or not name:
        return None
    for candidate in (name, os.path.join(hf_dir, name)):
        if os.path.isfile(os.path.join(candidate, "config.json")):
            return candidate
    return None


def _read_tower_config(folder: str, why: str) -> dict:
    try:
        with open(os.path.join(folder, "config.json")) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"the CLIP config of {why} ({folder}/config.json) cannot be read: {e}") from e


def tower_config(hf: dict, hf_dir: str, *, clip_dir: str | None, scan_layers: bool) -> tuple[CLIPVisionConfig, str]:
    """The tower's architecture and where it came from: --clip_dir, the checkpoint's `vision_config`, the local
    `mm_vision_tower` folder, or CLIP ViT-L/14-336 (what VideoLLaMA2 releases name on the hub)."""
    select = hf.get("mm_vision_select_layer", -2)
    if clip_dir:
        source, hf_clip = f"--clip_dir {clip_dir}", _read_tower_config(clip_dir, "--clip_dir")
    elif "vision_config" in hf:
        source, hf_clip = "config.json's vision_config", hf["vision_config"]
    elif local_tower(hf, hf_dir):
        folder = local_tower(hf, hf_dir)
        source, hf_clip = f"mm_vision_tower {folder}", _read_tower_config(folder, "mm_vision_tower")
    else:
        return CLIPVisionConfig(select_layer=select, scan_layers=scan_layers), "CLIP ViT-L/14-336 (the default)"
    try:
        return CLIPVisionConfig.from_hf(hf_clip, select_layer=select, scan_layers=scan_layers), source
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"the tower config from {source} cannot be used: {e}") from e


def exo2ego_config_from_hf(hf: dict, hf_dir: str = "", *, clip_dir: str | None = None, mapper_width: int = 256,
                           mapper_blocks: int = 9, scan_layers: bool = True, fusion: str = "none"):
    """The composite for a VideoLLaMA2 checkpoint. Its fusion is "none": until stage 3 trains F, the model is
    VideoLLaMA2 (F and G are fresh)."""
    projector = hf.get("mm_projector_type", "stc_connector")
    if projector not in PROJECTOR_TYPES:
        raise CheckpointError(f"mm_projector_type {projector!r} is not supported; known: {sorted(PROJECTOR_TYPES)}")
    clip, source = tower_config(hf, hf_dir, clip_dir=clip_dir, scan_layers=scan_layers)
    if hf.get("mm_hidden_size", clip.hidden_size) != clip.hidden_size:
        raise CheckpointError(f"mm_hidden_size {hf['mm_hidden_size']} does not match the width {clip.hidden_size} of "
                              f"the tower from {source}; pass the tower's folder with --clip_dir")
    llm = MistralConfig.from_hf(hf, scan_layers=scan_layers)
    stc = STCConfig(encoder_hidden_size=clip.hidden_size, hidden_size=llm.hidden_size,
                    variant=PROJECTOR_TYPES[projector])
    # F and G as the presets build them (a residual generator that starts as the identity: mapper.py)
    mapper = MapperConfig(channels=clip.hidden_size, width=mapper_width, num_blocks=mapper_blocks, **RECOMMENDED)
    return Exo2EgoConfig(clip=clip, llm=llm, stc=stc, mapper=mapper, num_frames=hf.get("num_frames", 16),
                         fusion=fusion)


def read_projector_file(path: str) -> dict:
    """`mm_projector` weights from safetensors, or a torch file loaded with weights_only=True (no pickled code)."""
    if not os.path.exists(path):
        raise CheckpointError(f"--mm_projector {path!r} does not exist")
    if path.endswith(".safetensors"):
        ckpt = SafetensorsCheckpoint(path)
        state = {k: ckpt.read(k) for k in ckpt.keys()}  # noqa: SIM118
    else:
        import torch
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"--mm_projector {path!r} could not be read as a weights-only torch file ({e})") from e
        state = {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy() for k, v in raw.items()}
    out = {}
    for k, v in state.items():
        if "mm_projector." not in k:
            raise CheckpointError(f"tensor {k!r} in {path!r} is not an mm_projector weight")
        out[k.split("mm_projector.", 1)[1]] = np.asarray(v)
    return out


def convert_videollama2(hf_dir: str, out_dir: str, *, dtype: str = "bfloat16", scan_layers: bool = True,
                        mm_projector: str | None = None, clip_dir: str | None = None, mapper_width: int = 256,
                        mapper_blocks: int = 9, seed: int = 0, buffer_mb: float = 1024.0,
                        show_progress: bool = True) -> dict:
    hf = read_hf_config(hf_dir)
    try:
        config = exo2ego_config_from_hf(hf, hf_dir, clip_dir=clip_dir, mapper_width=mapper_width,
                                        mapper_blocks=mapper_blocks, scan_layers=scan_layers)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"config.json in {hf_dir!r} cannot be used for a VideoLLaMA2 conversion: {e}") from e
    primary = SafetensorsCheckpoint(hf_dir)
    if not clip_dir and TOWER_PREFIX + _clip.ANCHOR not in primary and local_tower(hf, hf_dir):
        clip_dir = local_tower(hf, hf_dir)  # no tower in the checkpoint: the weights of the folder it names
    ckpt = MultiCheckpoint(primary, clip=SafetensorsCheckpoint(clip_dir)) if clip_dir else primary

    if clip_dir:
        tower = detect_prefix(ckpt, _clip.ANCHOR, ["clip::" + p for p in _clip.PREFIXES])
    elif TOWER_PREFIX + _clip.ANCHOR in ckpt:
        tower = TOWER_PREFIX
    else:
        raise CheckpointError(f"{hf_dir!r} holds no CLIP tower (no {TOWER_PREFIX}* tensors) and its mm_vision_tower "
                              f"{hf.get('mm_vision_tower')!r} is not a local folder: pass the tower's folder with "
                              "--clip_dir")
    clip_rules = _clip.clip_rules()
    rules = (_prefixed(clip_rules, "ego_encoder/", tower) + _prefixed(clip_rules, "exo_encoder/", tower)
             + _prefixed(_mistral.mistral_rules(), "llm/", ""))
    unused = [re.escape(tower) + u for u in _clip.clip_unused(config.clip.num_built_layers, config.clip.num_layers)]
    unused += _mistral.mistral_unused()
    extra = {}
    if mm_projector:
        state = read_projector_file(mm_projector)
        connector = params_from_state_dict(state, stc_rules(config.stc))
        extra.update({f"connector/{k}": v for k, v in flatten(connector).items()})
        unused.append(r"model\.mm_projector\..*")  # the separate file wins over any copy in the folder
    elif not any(name.startswith(PROJECTOR_PREFIX) for name in list(primary.keys())):
        raise CheckpointError(f"{hf_dir!r} holds no connector ({PROJECTOR_PREFIX}* tensors), as a language model with "
                              "a separate tower does not: pass VideoLLaMA2's projector file with --mm_projector "
                              "(mm_projector.bin of the Base release)")
    else:
        rules += _prefixed(stc_rules(config.stc), "connector/", PROJECTOR_PREFIX)
    # F and G: seeded fresh init (CycleGAN's N(0, 0.02)), different keys for the two.
    grid = config.grid
    dummy = jnp.zeros((1, grid, grid, config.clip.hidden_size), jnp.float32)
    for name, key in (("mapper_f", jax.random.key(seed)), ("mapper_g", jax.random.key(seed + 1))):
        params = nn.meta.unbox(build_mapper(config.mapper, name).init(key, dummy)["params"])
        extra.update({f"{name}/{k}": np.asarray(v) for k, v in flatten(params).items()})

    plan = _expand_composite(rules, config, scan_layers)
    expected = flat_shapes(abstract_params("exo2ego", build_module("exo2ego", config)))
    for k, v in extra.items():
        if k not in expected or tuple(expected[k].shape) != tuple(v.shape):
            want = expected[k].shape if k in expected else "no such param"
            raise CheckpointError(f"param {k!r} from the projector/mapper init has shape {v.shape}, needs {want}")
    return convert_checkpoint(ckpt, plan, prefix="", expected=expected, unused=unused, out_dir=out_dir,
                              kind="exo2ego", config=config.to_dict(), dtype=dtype, buffer_mb=buffer_mb,
                              extra_params=extra, show_progress=show_progress,
                              extra_metadata=dict(mapper_seed=seed))


def _expand_composite(rules, config, scan):
    """Per-layer rules of the encoders use the CLIP depth; the LLM's use the Mistral depth."""
    plan = []
    for rule in rules:
        layers = config.llm.num_layers if rule.target.startswith("llm/") else config.clip.num_built_layers
        plan += expand_rules([rule], num_layers=layers, scan=scan)
    return plan
