"""Exports to the formats users take a model to: PEFT adapters, transformers folders, the VideoLLaMA2 layout.

Each export walks the converters' tensor rules backwards (exo2ego_jax.convert: the same names, the inverse
layouts), reads one param at a time from the checkpoint and streams it into safetensors files, so host memory
holds one (layer-stacked) param plus the tensor being written. LoRA adapters are folded into their kernels in
float32 (W + A B * alpha / r) for the `hf` and `videollama2` layouts and written as they are for `peft`.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable

import numpy as np

from exo2ego_jax.checkpoints import copy_tokenizer_files
from exo2ego_jax.convert.clip import clip_rules
from exo2ego_jax.convert.engine import TensorRule
from exo2ego_jax.convert.mistral import mistral_rules
from exo2ego_jax.convert.stc import stc_rules
from exo2ego_jax.convert.videollama2 import PROJECTOR_PREFIX, PROJECTOR_TYPES, TOWER_PREFIX
from exo2ego_jax.data.template import write_chat_template
from exo2ego_jax.errors import CheckpointError
from exo2ego_jax.export import hf_configs
from exo2ego_jax.export.safetensors_writer import DTYPES, PendingTensor, write_file, write_sharded
from exo2ego_jax.export.stored import StoredCheckpoint

PEFT_PREFIX = "base_model.model."        # what PeftModel prepends to the wrapped model's names
CLIP_MODEL_PREFIX = "vision_model."      # CLIPVisionModel's names (transformers 4.x and 5.x both load them)
Hook = Callable[[str, "int | None"], np.ndarray]


# ------------------------------------------------------------------------------------------ tensor plans

def _param_path(ckpt: StoredCheckpoint, target: str, layer: int | None) -> tuple[str, int | None]:
    """The stored path of a rule target and the index into it (stacked layers) or None."""
    if layer is None:
        return target, None
    stacked = target.format(layer="layers")
    if ckpt.has(stacked):
        return stacked, layer
    return target.format(layer=f"layers_{layer}"), None


def _read(ckpt: StoredCheckpoint, path: str, index: int | None) -> np.ndarray:
    value = ckpt.read(path)
    return value[index] if index is not None else value


def rule_tensors(ckpt: StoredCheckpoint, rules: list[TensorRule], *, param_prefix: str, name_prefix: str,
                 num_layers: int, read: Hook | None = None) -> list[PendingTensor]:
    """PendingTensors named `name_prefix + rule.source` from the params at `param_prefix + rule.target`, in the
    PyTorch layout. `read(path, index)` replaces the plain read (LoRA merging)."""
    read = read or (lambda path, index: _read(ckpt, path, index))
    out = []
    for rule in rules:
        for layer in (range(num_layers) if "{layer}" in rule.target else [None]):
            path, index = _param_path(ckpt, param_prefix + rule.target, layer)
            if not ckpt.has(path):
                raise CheckpointError(f"{ckpt.path!r} has no param {path!r}: it is not the model this export expects")
            shape = ckpt.shape(path)[1:] if index is not None else ckpt.shape(path)
            name = name_prefix + (rule.source.format(i=layer) if layer is not None else rule.source)
            out.append(PendingTensor(name, rule.layout.invert_shape(shape),
                                     lambda p=path, i=index, lay=rule.layout: lay.invert(read(p, i))))
    return out


def _lora_paths(kernel_path: str) -> tuple[str, str]:
    base = kernel_path[: -len("kernel")]
    return base + "lora_a", base + "lora_b"


def _has_lora(ckpt: StoredCheckpoint) -> bool:
    return any(p.endswith("/lora_a") for p in ckpt.arrays)


def merging_reader(ckpt: StoredCheckpoint, scale: float) -> Hook:
    """Reads a kernel with its adapters folded in (float32), any other param as stored."""
    def read(path: str, index: int | None) -> np.ndarray:
        w = _read(ckpt, path, index)
        a_path, b_path = _lora_paths(path) if path.endswith("/kernel") else ("", "")
        if not ckpt.has(a_path):
            return w
        a, b = _read(ckpt, a_path, index), _read(ckpt, b_path, index)
        return w.astype(np.float32) + (a.astype(np.float32) @ b.astype(np.float32)) * np.float32(scale)
    return read


# ------------------------------------------------------------------------------------------------- parts

def _llm_parts(ckpt: StoredCheckpoint):
    """(Mistral config, param prefix) of the checkpoint's LLM."""
    if ckpt.kind == "exo2ego":
        return ckpt.config.llm, "llm/"
    if ckpt.kind == "mistral":
        return ckpt.config, ""
    raise CheckpointError(f"{ckpt.path!r} holds a {ckpt.kind!r} model, which has no LLM to export")


def _lora_scale(llm) -> float:
    return llm.lora.scale if llm.lora is not None else 0.0


def llm_tensors(ckpt: StoredCheckpoint, *, name_prefix: str = "") -> list[PendingTensor]:
    llm, prefix = _llm_parts(ckpt)
    return rule_tensors(ckpt, mistral_rules(), param_prefix=prefix, name_prefix=name_prefix,
                        num_layers=llm.num_layers, read=merging_reader(ckpt, _lora_scale(llm)))


def clip_tensors(ckpt: StoredCheckpoint, clip_cfg, *, param_prefix: str, name_prefix: str) -> list[PendingTensor]:
    return rule_tensors(ckpt, clip_rules(), param_prefix=param_prefix, name_prefix=name_prefix,
                        num_layers=clip_cfg.num_built_layers)


def identity_post_layernorm(clip_cfg, name_prefix: str) -> list[PendingTensor]:
    """Our encoder stops at the selected layer and has no final LayerNorm; CLIPVisionModel needs one (it only
    touches `pooler_output`): ones and zeros, so the exported tower computes exactly what ours does."""
    d = clip_cfg.hidden_size
    return [PendingTensor(f"{name_prefix}post_layernorm.weight", (d,), lambda: np.ones(d, np.float32)),
            PendingTensor(f"{name_prefix}post_layernorm.bias", (d,), lambda: np.zeros(d, np.float32))]


def connector_tensors(ckpt: StoredCheckpoint, *, name_prefix: str) -> list[PendingTensor]:
    return rule_tensors(ckpt, stc_rules(ckpt.config.stc), param_prefix="connector/", name_prefix=name_prefix,
                        num_layers=0)


def flax_tensors(ckpt: StoredCheckpoint, module: str, *, name_prefix: str) -> list[PendingTensor]:
    """A module with no PyTorch counterpart (F, G): its params under dotted Flax paths, in the Flax layout."""
    return [PendingTensor(name_prefix + p[len(module) + 1:].replace("/", "."), ckpt.shape(p),
                          lambda p=p: ckpt.read(p)) for p in ckpt.paths(module + "/")]


# ------------------------------------------------------------------------------------------ the exports

def _new_out(out: str) -> None:
    if os.path.exists(out):
        raise CheckpointError(f"--out {out!r} already exists; an export never overwrites: choose a new folder")
    os.makedirs(out)


def _dump(path: str, value: dict) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=2)
        f.write("\n")


def _tokenizer(ckpt: StoredCheckpoint, directory: str) -> list[str]:
    found = copy_tokenizer_files(ckpt.path, directory)
    if any(name in found for name in ("tokenizer.json", "tokenizer.model")):
        write_chat_template(directory)
        found.append("chat_template.jinja")
    return found


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise CheckpointError(f"--dtype {dtype!r} is not supported; choose one of {sorted(DTYPES)}")


def _guarded(out: str, write: Callable[[], dict]) -> dict:
    """Run `write` into the new folder `out`; a failure removes the partial folder (no half export left)."""
    _new_out(out)
    try:
        return write()
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise


def _write_clip_folder(ckpt: StoredCheckpoint, clip_cfg, param_prefix: str, directory: str, dtype: str, *,
                       num_hidden_layers: int) -> None:
    os.makedirs(directory)
    _dump(os.path.join(directory, "config.json"),
          hf_configs.clip_vision_config(clip_cfg, num_hidden_layers=num_hidden_layers, dtype=dtype))
    _dump(os.path.join(directory, "preprocessor_config.json"), hf_configs.clip_image_processor(clip_cfg))
    tensors = (clip_tensors(ckpt, clip_cfg, param_prefix=param_prefix, name_prefix=CLIP_MODEL_PREFIX)
               + identity_post_layernorm(clip_cfg, CLIP_MODEL_PREFIX))
    write_sharded(directory, tensors, dtype)


def export_hf(checkpoint: str, out: str, *, dtype: str = "bfloat16", **_) -> dict:
    """OUT/llm (MistralForCausalLM, LoRA merged), OUT/ego_encoder and OUT/exo_encoder (CLIPVisionModel, the
    layers up to the selected one: `last_hidden_state[:, 1:]` are the features the connector reads)."""
    _check_dtype(dtype)
    ckpt = StoredCheckpoint(checkpoint)
    if ckpt.kind not in ("exo2ego", "mistral", "clip"):
        raise CheckpointError(f"{checkpoint!r} holds a {ckpt.kind!r} model; `export hf` takes exo2ego, mistral or clip")

    def write():
        parts = []
        if ckpt.kind in ("exo2ego", "mistral"):
            llm, _ = _llm_parts(ckpt)
            directory = os.path.join(out, "llm")
            os.makedirs(directory)
            _dump(os.path.join(directory, "config.json"), hf_configs.mistral_config(llm, dtype))
            _dump(os.path.join(directory, "generation_config.json"),
                  {"bos_token_id": llm.bos_token_id, "eos_token_id": llm.eos_token_id})
            write_sharded(directory, llm_tensors(ckpt), dtype)
            _tokenizer(ckpt, directory)
            parts.append("llm")
        towers = {"ego_encoder": "ego_encoder/", "exo_encoder": "exo_encoder/"} if ckpt.kind == "exo2ego" else (
            {"encoder": ""} if ckpt.kind == "clip" else {})
        for name, prefix in towers.items():
            clip_cfg = ckpt.config.clip if ckpt.kind == "exo2ego" else ckpt.config
            _write_clip_folder(ckpt, clip_cfg, prefix, os.path.join(out, name), dtype,
                               num_hidden_layers=clip_cfg.num_built_layers)
            parts.append(name)
        return {"format": "hf", "parts": parts}

    return _guarded(out, write)


def export_peft(checkpoint: str, out: str, *, dtype: str = "bfloat16", base_model: str = "", **_) -> dict:
    """OUT/adapter_config.json + adapter_model.safetensors (PEFT LoRA on the Mistral base) and, for an Exo2Ego
    checkpoint, OUT/non_lora_trainables.safetensors: the ego encoder, connector and F under VideoLLaMA2-style
    names (`base_model.model.model.vision_tower...`, `...mm_projector...`, `...mapper_f...`)."""
    _check_dtype(dtype)
    ckpt = StoredCheckpoint(checkpoint)
    llm, prefix = _llm_parts(ckpt)
    if llm.lora is None or not _has_lora(ckpt):
        raise CheckpointError(f"{checkpoint!r} has no LoRA adapters (a merged export?); export a stage-3 run "
                              "trained with --config.export.merge_lora=False, or use `export hf` for merged weights")

    def write():
        adapters = []
        for rule in mistral_rules():
            if not rule.target.endswith("_proj/kernel"):
                continue
            a_rule = TensorRule(rule.target[: -len("kernel")] + "lora_a", rule.source.replace(".weight", ".lora_A.weight"),
                                rule.layout)
            b_rule = TensorRule(rule.target[: -len("kernel")] + "lora_b", rule.source.replace(".weight", ".lora_B.weight"),
                                rule.layout)
            path, _ = _param_path(ckpt, prefix + a_rule.target, 0)
            if ckpt.has(path):
                adapters += [a_rule, b_rule]
        tensors = rule_tensors(ckpt, adapters, param_prefix=prefix, name_prefix=PEFT_PREFIX, num_layers=llm.num_layers)
        write_sharded(out, tensors, dtype, stem="adapter_model", max_shard_bytes=2 ** 62)
        lora = llm.lora
        _dump(os.path.join(out, "adapter_config.json"),
              hf_configs.peft_adapter_config(rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout,
                                             targets=lora.targets, base_model=base_model))
        parts = ["adapter_model.safetensors"]
        if ckpt.kind == "exo2ego":
            inner = PEFT_PREFIX + "model."
            others = (clip_tensors(ckpt, ckpt.config.clip, param_prefix="ego_encoder/",
                                   name_prefix=PEFT_PREFIX + TOWER_PREFIX)
                      + connector_tensors(ckpt, name_prefix=PEFT_PREFIX + PROJECTOR_PREFIX))
            if ckpt.config.fusion != "none":
                others += flax_tensors(ckpt, "mapper_f", name_prefix=inner + "mapper_f.")
            write_file(os.path.join(out, "non_lora_trainables.safetensors"), others, dtype, {"format": "pt"})
            parts.append("non_lora_trainables.safetensors")
        _tokenizer(ckpt, out)
        return {"format": "peft", "parts": parts}

    return _guarded(out, write)


def export_videollama2(checkpoint: str, out: str, *, dtype: str = "bfloat16", **_) -> dict:
    """A VideoLLaMA2 checkpoint folder: LLM (LoRA merged), the ego encoder as the vision tower, the connector as
    `mm_projector`; OUT/vision_tower holds the tower's own folder, which `mm_vision_tower` names."""
    _check_dtype(dtype)
    ckpt = StoredCheckpoint(checkpoint)
    if ckpt.kind != "exo2ego":
        raise CheckpointError(f"{checkpoint!r} holds a {ckpt.kind!r} model; the VideoLLaMA2 layout needs an exo2ego one")
    cfg = ckpt.config
    if cfg.fusion != "none":
        raise CheckpointError(f"{checkpoint!r} feeds its LLM with F(x) (fusion {cfg.fusion!r}) and the VideoLLaMA2 "
                              "layout has no place for F: export a fusion-none model (stage 3 with "
                              "--config.fusion=none), or use `export hf` / `export peft`")
    projector = {v: k for k, v in PROJECTOR_TYPES.items()}[cfg.stc.variant]

    def write():
        tower_dir = os.path.abspath(os.path.join(out, "vision_tower"))
        # the tower folder keeps the full depth in its config, so mm_vision_select_layer picks the same layer
        _write_clip_folder(ckpt, cfg.clip, "ego_encoder/", tower_dir, dtype, num_hidden_layers=cfg.clip.num_layers)
        _dump(os.path.join(out, "config.json"),
              hf_configs.videollama2_config(cfg.llm, cfg.clip, projector_type=projector, num_frames=cfg.num_frames,
                                            tower=tower_dir, dtype=dtype))
        tensors = (llm_tensors(ckpt) + clip_tensors(ckpt, cfg.clip, param_prefix="ego_encoder/", name_prefix=TOWER_PREFIX)
                   + connector_tensors(ckpt, name_prefix=PROJECTOR_PREFIX))
        write_sharded(out, tensors, dtype)
        _tokenizer(ckpt, out)
        return {"format": "videollama2", "parts": ["model", "vision_tower"]}

    return _guarded(out, write)


EXPORTERS = {"hf": export_hf, "peft": export_peft, "videollama2": export_videollama2}
