"""The training stages of Exo2Ego: what each trains, what it feeds the LLM, and its loss.

  init    VideoLLaMA2-style connector initialisation: clip-text VTG, connector only.
  stage1  Demonstrator self-preparation: exo clip-text VTG; the exo encoder (LLM and connector frozen;
          `train_connector=True` trains the connector too).
  stage2  Demonstrator-learner guidance: cycle L1 (both directions) + KL(y || F(x)) + VTG on synchronized
          ego-exo clips; ego encoder, F and G (exo encoder and LLM frozen).
  stage3  Learner self-practice: EgoIT instruction tuning on x together with F(x); LoRA + ego encoder + F
          (+ the connector, as VideoLLaMA2's LoRA recipe retrains its projector).

Trainable sets are regex tables over '/'-joined param paths (big_vision style); configs may replace them.
The stage loss applies `stop_gradient` to every frozen param, so `jax.grad` of it is exactly zero there and
XLA never computes frozen weight gradients.
"""
from __future__ import annotations

import dataclasses

import jax

from exo2ego_jax.errors import check_choice
from exo2ego_jax.losses import LossConfig, feature_kl, kl_target_stats, l1, vtg_loss
from exo2ego_jax.models.exo2ego import guidance_forward
from exo2ego_jax.models.params import path_matcher


@dataclasses.dataclass(frozen=True)
class StageSpec:
    name: str
    trainable: tuple[str, ...]
    view: str = "ego"            # which encoder feeds the LLM (VTG)
    fusion: str = "none"         # how x and F(x) reach the LLM
    guidance: bool = False       # stage 2's cycle + KL terms (needs exo_pixels)


# The one table of what each stage trains (configs/stageN.py reference it; `trainable` overrides it).
STAGES: dict[str, StageSpec] = {
    "init": StageSpec("init", (r"connector/.*",), view="ego", fusion="none"),
    "stage1": StageSpec("stage1", (r"exo_encoder/.*",), view="exo", fusion="none"),
    "stage2": StageSpec("stage2", (r"ego_encoder/.*", r"mapper_f/.*", r"mapper_g/.*"), view="ego", fusion="tokens",
                        guidance=True),
    "stage3": StageSpec("stage3", (r"llm/.*/lora_[ab]", r"ego_encoder/.*", r"mapper_f/.*", r"connector/.*"),
                        view="ego", fusion="tokens"),
}

# The demo's tiny LLM learns only captions before stage 3 (it has no instruction-tuned ancestor), so the token
# embeddings and output rows of the chat and answer tokens are untrained and LoRA alone cannot move its loss
# (measured: 2.1 after 300 steps with rank 48 vs 0.4 when these train too). The demo's stage 3 trains them as
# well, for every variant alike; our choice for the demo, the 7b recipe stays LoRA-only.
DEMO_STAGE3_EXTRA = (r"llm/embed_tokens/.*", r"llm/lm_head/.*")


def get_stage(name: str, *, trainable: tuple[str, ...] | None = None, fusion: str | None = None,
              loss: LossConfig | None = None, lora: bool = True, train_connector: bool = False) -> StageSpec:
    """The stage spec, with config overrides; adds the connector when `train_connector`; drops G from stage 2's
    set when the cycle loss is off, and the adapters when LoRA is off (the "w/o LoRA" ablation)."""
    check_choice("stage", name, STAGES)
    spec = STAGES[name]
    if trainable is not None:
        spec = dataclasses.replace(spec, trainable=tuple(trainable))
    if train_connector and r"connector/.*" not in spec.trainable:
        spec = dataclasses.replace(spec, trainable=spec.trainable + (r"connector/.*",))
    if fusion is not None:
        spec = dataclasses.replace(spec, fusion=fusion)
    if not lora:
        spec = dataclasses.replace(spec, trainable=tuple(p for p in spec.trainable if "lora" not in p))
    if spec.guidance and loss is not None and loss.cycle == "none":
        spec = dataclasses.replace(spec, trainable=tuple(p for p in spec.trainable if not p.startswith("mapper_g")))
    return spec


def freeze(params, spec: StageSpec):
    """stop_gradient on every param outside the stage's trainable set."""
    is_trainable = path_matcher(spec.trainable)

    def visit(node, prefix):
        if isinstance(node, dict):
            return {k: visit(v, f"{prefix}{k}/") for k, v in node.items()}
        return node if is_trainable(prefix[:-1]) else jax.lax.stop_gradient(node)
    return visit(params, "")


def stage_loss(module, params, batch: dict, spec: StageSpec, loss_cfg: LossConfig, *, rng=None,
               deterministic: bool = True):
    """(total loss, metrics) for one batch.

    batch: input_ids, attention_mask, labels [B, S]; ego_pixels and/or exo_pixels [B, T, H, W, 3].
    """
    params = freeze(params, spec)
    rngs = {"dropout": rng} if rng is not None and not deterministic else {}
    variables = {"params": params}
    cfg = module.config
    if spec.guidance:
        out = module.apply(variables, batch["ego_pixels"], batch["exo_pixels"], batch["input_ids"],
                           batch["attention_mask"], batch["labels"], fusion=spec.fusion, cycle=loss_cfg.cycle,
                           detach_cycle_targets=loss_cfg.detach_cycle_targets, deterministic=deterministic,
                           method=guidance_forward, rngs=rngs)
        with jax.named_scope("losses"):  # the profiler attributes ops by these scopes
            total, metrics, count = _guidance_terms(out, loss_cfg, cfg.ignore_index)
    else:
        pixels = batch["exo_pixels"] if spec.view == "exo" else batch["ego_pixels"]
        logits, labels = module.apply(variables, batch["input_ids"], pixels, attention_mask=batch["attention_mask"],
                                      labels=batch["labels"], fusion=spec.fusion, view=spec.view,
                                      deterministic=deterministic, method=_logits_and_labels, rngs=rngs)
        with jax.named_scope("losses"):
            vtg, count = vtg_loss(logits, labels, cfg.ignore_index)
        metrics = dict(vtg=vtg)
        total = loss_cfg.vtg_weight * vtg
    metrics["loss"] = total
    metrics["num_targets"] = count
    return total, metrics


def _guidance_terms(out: dict, loss_cfg: LossConfig, ignore_index: int):
    """Stage 2's weighted VTG + cycle (forward/backward) + KL terms."""
    vtg, count = vtg_loss(out["logits"], out["labels"], ignore_index)
    metrics = dict(vtg=vtg)
    total = loss_cfg.vtg_weight * vtg
    if loss_cfg.cycle != "none":
        metrics["cycle_forward"] = l1(out["gfx"], out["x_target"])
        total += loss_cfg.cycle_weight * metrics["cycle_forward"]
    if loss_cfg.cycle == "both":
        metrics["cycle_backward"] = l1(out["fgy"], out["y"])
        total += loss_cfg.cycle_weight * metrics["cycle_backward"]
    if loss_cfg.use_kl:
        metrics["kl"] = feature_kl(out["y"], out["fx"], temperature=loss_cfg.kl_temperature,
                                   direction=loss_cfg.kl_direction, reduction=loss_cfg.kl_reduction,
                                   mode=loss_cfg.kl_mode)
        total += loss_cfg.kl_weight * metrics["kl"]
    # Logged in every stage-2 run, KL on or off: a near one-hot target shows in the first steps of a 7B run.
    y = jax.lax.stop_gradient(out["y"])
    metrics.update(kl_target_stats(y, temperature=loss_cfg.kl_temperature, mode=loss_cfg.kl_mode))
    return total, metrics, count


def _logits_and_labels(module, input_ids, pixels, attention_mask, labels, fusion, view, deterministic):
    visual = module.visual_tokens(pixels, view=view, fusion=fusion, deterministic=deterministic)
    return module.language_model(input_ids, visual, attention_mask, labels, deterministic)
