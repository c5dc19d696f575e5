"""The Exo2Ego composite: ego/exo CLIP encoders, mappers F/G, the STC connector and Mistral.

    ego pixels -> ego_encoder -> x ----------------------> connector --+
                                 +-> mapper_f -> F(x) -> connector --+--> spliced into the text -> llm
    exo pixels -> exo_encoder -> y        (stage 2: G = mapper_g maps y back; cycle + KL losses)

Entry points others rely on:
  module.apply({'params': p}, pixels, method='visual_tokens', fusion='none')   -> [B, N, D]
  module.apply({'params': p}, input_ids, pixels, fusion='none')                -> logits [B, S - 1 + N, V]
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from exo2ego_jax.models.clip import CLIPVisionConfig, CLIPVisionEncoder
from exo2ego_jax.models.layers import GRID, constrain
from exo2ego_jax.constants import IGNORE_INDEX, VIDEO_TOKEN_INDEX
from exo2ego_jax.errors import check_choice
from exo2ego_jax.models.lora import LoRAConfig
from exo2ego_jax.models.mapper import MLPMapper, MapperConfig, ResnetGenerator
from exo2ego_jax.models.mistral import MistralConfig, MistralForCausalLM
from exo2ego_jax.models.stc import STCConfig, STCConnector

# How the LLM reads the ego clip, the same in training, export and serving:
#   none    x only (VideoLLaMA2)               mapped  F(x) only
#   tokens  STC(x) then STC(F(x)), joined along the token axis
#   frames  x's frames then F(x)'s through one STC call whose temporal sampler treats them as two clips (no
#           window spans the last x frame and the first F(x) frame); STC's other stages work per frame, so this
#           gives the same tokens as "tokens", computed in one connector pass over 2T frames
FUSIONS = ("tokens", "frames", "none", "mapped")
VIEWS = ("ego", "exo")


@dataclasses.dataclass(frozen=True)
class Exo2EgoConfig:
    clip: CLIPVisionConfig = CLIPVisionConfig()
    llm: MistralConfig = MistralConfig()
    stc: STCConfig = STCConfig()
    mapper: MapperConfig = MapperConfig()
    num_frames: int = 16
    fusion: str = "tokens"            # how x and F(x) reach the LLM (FUSIONS)
    video_token_index: int = VIDEO_TOKEN_INDEX
    ignore_index: int = IGNORE_INDEX
    length_buckets: tuple[int, ...] = ()  # pad the spliced sequence up to the first bucket that fits

    def __post_init__(self):
        check_choice("fusion", self.fusion, FUSIONS)
        object.__setattr__(self, "length_buckets", tuple(sorted(self.length_buckets)))
        if self.stc.encoder_hidden_size != self.clip.hidden_size:
            raise ValueError(f"stc.encoder_hidden_size ({self.stc.encoder_hidden_size}) must equal clip.hidden_size "
                             f"({self.clip.hidden_size})")
        if self.stc.hidden_size != self.llm.hidden_size:
            raise ValueError(f"stc.hidden_size ({self.stc.hidden_size}) must equal llm.hidden_size "
                             f"({self.llm.hidden_size})")
        if self.mapper.channels != self.clip.hidden_size:
            raise ValueError(f"mapper.channels ({self.mapper.channels}) must equal clip.hidden_size "
                             f"({self.clip.hidden_size})")

    @property
    def grid(self) -> int:
        return self.clip.image_size // self.clip.patch_size

    def num_visual_tokens(self, fusion: str | None = None) -> int:
        fusion = fusion or self.fusion
        one = self.stc.num_tokens(self.num_frames, self.grid)
        return 2 * one if fusion in ("tokens", "frames") else one

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, **overrides) -> Exo2EgoConfig:
        d = _deep_merge(dict(d), overrides)  # {"llm": {"lora": ...}} changes one nested field
        llm = d.get("llm", {})
        if isinstance(llm, dict):
            lora = llm.get("lora")
            if isinstance(lora, dict):
                llm = {**llm, "lora": LoRAConfig(**{**lora, "targets": tuple(lora["targets"])})}
            llm = MistralConfig(**llm)
        sub = lambda key, klass: d[key] if not isinstance(d.get(key), dict) else klass(**d[key])
        return cls(clip=sub("clip", CLIPVisionConfig) if "clip" in d else CLIPVisionConfig(), llm=llm,
                   stc=sub("stc", STCConfig) if "stc" in d else STCConfig(),
                   mapper=sub("mapper", MapperConfig) if "mapper" in d else MapperConfig(),
                   **{k: v for k, v in d.items() if k not in ("clip", "llm", "stc", "mapper")})


def _deep_merge(base: dict, over: dict) -> dict:
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = _deep_merge(dict(base[key]), value)
        else:
            base[key] = value
    return base


def splice_visual(text_embeds, input_ids, visual, attention_mask, labels, *, video_token_index: int,
                  ignore_index: int):
    """Replace the placeholder in each row by that row's visual tokens (static output length S - 1 + N).

    text_embeds [B, S, D] (the placeholder row's embedding is ignored), visual [B, N, D]. Returns embeds,
    mask and labels of length S - 1 + N; visual positions get `ignore_index` labels. A row without a
    placeholder keeps its first S - 1 tokens and gets its visual tokens masked out at the end (VideoLLaMA2
    drops the features of text-only samples).
    """
    b, s, _ = text_embeds.shape
    n = visual.shape[1]
    is_video = input_ids == video_token_index
    has_video = is_video.any(axis=-1)
    p = jnp.where(has_video, jnp.argmax(is_video, axis=-1), s - 1)[:, None]
    j = jnp.arange(s - 1 + n)[None, :]
    in_visual = (j >= p) & (j < p + n)
    text_idx = jnp.clip(jnp.where(j < p, j, j - n + 1), 0, s - 1)
    vis_idx = jnp.clip(j - p, 0, n - 1)
    take = lambda a, idx: jnp.take_along_axis(a, idx.reshape(idx.shape + (1,) * (a.ndim - 2)), axis=1)
    embeds = jnp.where(in_visual[..., None], take(visual.astype(text_embeds.dtype), vis_idx), take(text_embeds, text_idx))
    mask = jnp.where(in_visual, has_video[:, None], take(attention_mask.astype(bool), text_idx))
    out_labels = None
    if labels is not None:
        out_labels = jnp.where(in_visual, ignore_index, take(labels, text_idx))
    return embeds, mask, out_labels


def check_placeholders(input_ids, video_token_index: int) -> None:
    """Eager check (skipped under jit): every row holds at most one placeholder."""
    try:
        ids = np.asarray(input_ids)
    except Exception:  # a tracer: shapes only
        return
    counts = (ids == video_token_index).sum(-1)
    if (counts > 1).any():
        raise ValueError(f"rows {np.nonzero(counts > 1)[0].tolist()} of input_ids hold more than one video "
                         f"placeholder ({video_token_index}); each sample takes exactly one clip")


class Exo2Ego(nn.Module):
    config: Exo2EgoConfig

    def setup(self):
        cfg = self.config
        self.ego_encoder = CLIPVisionEncoder(cfg.clip)
        self.exo_encoder = CLIPVisionEncoder(cfg.clip)
        mapper_cls = ResnetGenerator if cfg.mapper.kind == "resnet" else MLPMapper
        self.mapper_f = mapper_cls(cfg.mapper)
        self.mapper_g = mapper_cls(cfg.mapper)
        self.connector = STCConnector(cfg.stc)
        self.llm = MistralForCausalLM(cfg.llm)

    # -- vision side ----------------------------------------------------------------------------------------
    def encode(self, pixels: jax.Array, view: str = "ego") -> jax.Array:
        """pixels [B, T, H, W, 3] -> selected-layer CLIP features [B, T, P, C]."""
        check_choice("view", view, VIEWS)
        if pixels.ndim != 5:
            raise ValueError(f"pixels must be [B, T, H, W, 3]; got shape {tuple(pixels.shape)}")
        b, t = pixels.shape[:2]
        encoder = self.ego_encoder if view == "ego" else self.exo_encoder
        feats = encoder(pixels.reshape((b * t,) + pixels.shape[2:]))
        return feats.reshape((b, t) + feats.shape[1:])

    def _map(self, mapper, feats, deterministic):
        b, t, p, c = feats.shape
        g = self.config.grid
        out = mapper(constrain(feats.reshape(b * t, g, g, c), GRID), deterministic=deterministic)
        return out.reshape(b, t, p, c).astype(feats.dtype)

    def map_f(self, x, deterministic: bool = True):
        """F: ego features -> exo feature space, per frame on the patch grid."""
        return self._map(self.mapper_f, x, deterministic)

    def map_g(self, y, deterministic: bool = True):
        """G: exo features -> ego feature space."""
        return self._map(self.mapper_g, y, deterministic)

    def connect(self, x, fx=None, fusion: str = "none"):
        """LLM-space tokens from features by `fusion` (FUSIONS): x alone, F(x) alone, or both."""
        check_choice("fusion", fusion, FUSIONS)
        if fusion == "none":
            return self.connector(x)
        if fx is None:
            raise ValueError(f"fusion={fusion!r} needs F(x)")
        if fusion == "mapped":
            return self.connector(fx)
        if fusion == "tokens":
            b = x.shape[0]
            both = self.connector(jnp.concatenate([x, fx], axis=0))  # one connector call for both halves
            return jnp.concatenate([both[:b], both[b:]], axis=1)
        return self.connector(jnp.concatenate([x, fx], axis=1), segments=2)

    def visual_tokens(self, pixels, view: str = "ego", fusion: str | None = None, deterministic: bool = True):
        """pixels [B, T, H, W, 3] -> LLM-space tokens [B, N, D]; `view='exo'` runs the exo encoder alone."""
        fusion = self.config.fusion if fusion is None else fusion
        feats = self.encode(pixels, view)
        if view == "exo" or fusion == "none":
            return self.connect(feats, fusion="none")
        return self.connect(feats, self.map_f(feats, deterministic), fusion=fusion)

    # -- language side --------------------------------------------------------------------------------------
    def language_model(self, input_ids, visual, attention_mask=None, labels=None, deterministic: bool = True):
        """Splice `visual` [B, N, D] at the placeholder, run the LLM; returns (logits [B, S-1+N, V], labels)."""
        cfg = self.config
        check_placeholders(input_ids, cfg.video_token_index)
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, bool)
        safe_ids = jnp.where(input_ids == cfg.video_token_index, 0, input_ids)
        text = self.llm.embed(safe_ids)
        embeds, mask, spliced_labels = splice_visual(text, input_ids, visual, attention_mask, labels,
                                                     video_token_index=cfg.video_token_index,
                                                     ignore_index=cfg.ignore_index)
        embeds = constrain(embeds, ("activation_batch", "activation_length", "activation_embed"))
        length = embeds.shape[1]
        padded = _bucket(length, cfg.length_buckets)
        if padded > length:
            pad = padded - length
            embeds = jnp.pad(embeds, ((0, 0), (0, pad), (0, 0)))
            mask = jnp.pad(mask, ((0, 0), (0, pad)))
            if spliced_labels is not None:
                spliced_labels = jnp.pad(spliced_labels, ((0, 0), (0, pad)), constant_values=cfg.ignore_index)
        logits = self.llm(inputs_embeds=embeds, attention_mask=mask, deterministic=deterministic)
        return logits[:, :length], (None if spliced_labels is None else spliced_labels[:, :length])

    def __call__(self, input_ids, pixels, attention_mask=None, fusion: str | None = None, view: str = "ego",
                 deterministic: bool = True):
        """Logits [B, S - 1 + N, V] (float32) of the text with the clip's visual tokens spliced in."""
        visual = self.visual_tokens(pixels, view=view, fusion=fusion, deterministic=deterministic)
        return self.language_model(input_ids, visual, attention_mask, None, deterministic)[0]

    def init_all(self, input_ids, pixels):
        """Touch every submodule (both encoders, F and G) so `init` creates every param."""
        x = self.encode(pixels, "ego")
        y = self.encode(pixels, "exo")
        g = self.map_g(y)
        visual = self.connect(x, self.map_f(x), fusion=self.config.fusion)
        logits, _ = self.language_model(input_ids, visual)
        return logits, g


def _bucket(length: int, buckets: tuple[int, ...]) -> int:
    if not buckets:
        return length
    for b in buckets:
        if b >= length:
            return b
    raise ValueError(f"spliced sequence length {length} exceeds the largest of length_buckets {buckets}; add a "
                     "larger bucket or truncate the text")


# The composite's submodules and how to build each alone (its param tree equals the composite's subtree).
SUBMODULES = ("ego_encoder", "exo_encoder", "mapper_f", "mapper_g", "connector", "llm")


def init_submodule(config: Exo2EgoConfig, name: str, key) -> dict:
    """Fresh (boxed) params of one submodule, e.g. F and G re-initialised for another mapper kind."""
    check_choice("init.reinit", name, SUBMODULES)
    c, g = config.clip, config.grid
    if name in ("ego_encoder", "exo_encoder"):
        module, args = CLIPVisionEncoder(c), (jnp.zeros((1, c.image_size, c.image_size, c.num_channels)),)
    elif name in ("mapper_f", "mapper_g"):
        module = ResnetGenerator(config.mapper) if config.mapper.kind == "resnet" else MLPMapper(config.mapper)
        args = (jnp.zeros((1, g, g, c.hidden_size)),)
    elif name == "connector":
        module, args = STCConnector(config.stc), (jnp.zeros((1, config.num_frames, g * g, c.hidden_size)),)
    else:
        module, args = MistralForCausalLM(config.llm), (jnp.zeros((1, 1), jnp.int32),)
    return module.init(key, *args)["params"]


def example_inputs(config: Exo2EgoConfig):
    ids = jnp.array([[1, config.video_token_index, 5]], jnp.int32)
    c = config.clip
    return ids, jnp.zeros((1, config.num_frames, c.image_size, c.image_size, c.num_channels), jnp.float32)


def guidance_forward(module: Exo2Ego, ego_pixels, exo_pixels, input_ids, attention_mask, labels, *,
                     fusion: str, cycle: str, detach_cycle_targets: bool, deterministic: bool):
    """Stage 2 in one pass (call through `module.apply(..., method=guidance_forward)`).

    Returns the tensors the stage-2 losses need: x (ego features), y (exo features), F(x), G(F(x)),
    F(G(y)) (when the backward cycle is on), and the LLM logits on the fused ego input with their labels.
    """
    x = module.encode(ego_pixels, "ego")
    y = module.encode(exo_pixels, "exo")
    fx = module.map_f(x, deterministic)
    out = dict(x=x, y=y, fx=fx)
    if cycle != "none":
        out["gfx"] = module.map_g(fx, deterministic)
        out["x_target"] = jax.lax.stop_gradient(x) if detach_cycle_targets else x
    if cycle == "both":
        out["fgy"] = module.map_f(module.map_g(y, deterministic), deterministic)
    visual = module.connect(x, fx, fusion=fusion)  # the fusion means what it means at export and serving
    out["logits"], out["labels"] = module.language_model(input_ids, visual, attention_mask, labels, deterministic)
    return out
