"""The on-disk checkpoint format, in one place: what converters, stage exports and `load_pretrained` share.

A checkpoint folder holds

    model_config.json   {"format": "exo2ego_jax", "format_version": 1, "kind": clip|mistral|exo2ego,
                         "config": the model config, "dtype": storage dtype, ...provenance}
    params/             an Orbax checkpoint of the param tree ('/'-paths as in the Flax modules)
    tokenizer files     copied from the source (converted LLMs) or the previous stage (exports)

`load_pretrained` restores params straight into their final dtype and, when a mesh is given, into their
sharded layout (each device reads only its shard), so a full copy never sits on one device.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec

from exo2ego_jax.errors import CheckpointError
from exo2ego_jax.models import registry
from exo2ego_jax.models.lora import is_lora_path, peft_kaiming_uniform
from exo2ego_jax.sharding import logical_shardings

FORMAT_NAME = "exo2ego_jax"
FORMAT_VERSION = 1
CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json",
                   "preprocessor_config.json")


def read_model_config(path: str) -> dict:
    """The checkpoint's `model_config.json`, checked: format, version, kind."""
    config_path = os.path.join(path, CONFIG_FILE)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint folder {path!r} does not exist")
    if not os.path.isdir(path):
        raise CheckpointError(f"{path!r} is a file, not a checkpoint folder; pass the folder that holds "
                              f"{CONFIG_FILE} and {PARAMS_DIR}/")
    if not os.path.exists(config_path):
        raise CheckpointError(f"{config_path} is missing: {path!r} is not an exo2ego_jax checkpoint (convert HF "
                              "weights with `python -m exo2ego_jax.convert KIND --hf_dir SRC --out DST`)")
    try:
        with open(config_path) as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{config_path} is not valid JSON ({e}); the checkpoint was not written completely or "
                              "was edited: restore it or convert/export again") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{config_path} has format {meta.get('format') if isinstance(meta, dict) else meta!r}, "
                              f"expected {FORMAT_NAME!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{config_path} has format_version {meta.get('format_version')!r}; this version of "
                              f"exo2ego_jax reads format_version {FORMAT_VERSION}: use the matching exo2ego_jax or "
                              "convert/export again")
    if meta.get("kind") not in registry.MODEL_KINDS:
        raise CheckpointError(f"{config_path} has kind {meta.get('kind')!r}; known kinds: {sorted(registry.MODEL_KINDS)}")
    return meta


def stored_model_config(path: str, meta: dict | None = None):
    """The model config a checkpoint's model_config.json describes; one that cannot describe a model (edited by
    hand, written by another version) is a CheckpointError naming the file."""
    meta = meta or read_model_config(path)
    try:
        return registry.config_from_dict(meta["kind"], meta["config"])
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{os.path.join(path, CONFIG_FILE)} does not describe a valid {meta['kind']} model "
                              f"({e}); it was edited or written by another version: restore it, or convert/export "
                              "the checkpoint again") from e


def write_model_config(directory: str, *, kind: str, config: dict, dtype: str, **extra) -> dict:
    """Write `model_config.json` (process 0 only in multi-host runs); returns what was written."""
    meta = dict(format=FORMAT_NAME, format_version=FORMAT_VERSION, kind=kind, config=config, dtype=dtype, **extra)
    if jax.process_index() == 0:
        tmp = os.path.join(directory, CONFIG_FILE + ".tmp")
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=2, default=str)
        os.replace(tmp, os.path.join(directory, CONFIG_FILE))  # the file exists only when complete
    return meta


def save_params(directory: str, params) -> None:
    """Write a whole param tree as `directory/params/` (Orbax; sharded arrays are written by their owners)."""
    import orbax.checkpoint.experimental.v1 as ocp
    save = getattr(ocp, "save", None) or ocp.save_pytree  # `save_pytree`: the older (0.12.4) name
    save(os.path.join(directory, PARAMS_DIR), params)


def write_checkpoint(directory: str, params, *, kind: str, config: dict, dtype: str, **extra) -> str:
    """Params cast to `dtype` plus `model_config.json`: a folder `load_pretrained` opens."""
    os.makedirs(directory, exist_ok=True)
    save_params(directory, jax.tree.map(lambda x: x.astype(dtype), params))
    write_model_config(directory, kind=kind, config=config, dtype=dtype, **extra)
    return directory


def copy_tokenizer_files(source: str, target: str) -> list[str]:
    """Copy the tokenizer files found in `source` next to the weights in `target` (process 0)."""
    if not source or not os.path.isdir(source):
        return []
    found = [name for name in TOKENIZER_FILES if os.path.exists(os.path.join(source, name))]
    if jax.process_index() == 0:
        for name in found:
            shutil.copy2(os.path.join(source, name), os.path.join(target, name))
    return found


def load_pretrained(path: str, *, dtype: Any | None = None, mesh: jax.sharding.Mesh | None = None,
                    rules=None, lora_seed: int = 0, **config_overrides):
    """Return `(module, params)` for the checkpoint in `path`.

    dtype: cast every param on load (e.g. jnp.float32 for training master weights); default: as stored.
    mesh/rules: restore into the shardings that the params' logical axis names map to on `mesh`.
    config_overrides: model config fields to change (`scan_layers`, `remat_policy`, `attention_impl`,
    `dtype` for compute, `lora=LoRAConfig(...)`). A changed `scan_layers` re-stacks the layers; adapters
    that the checkpoint lacks are initialised fresh (A kaiming-uniform from `lora_seed`, B = 0).
    """
    meta = read_model_config(path)
    kind = meta["kind"]
    stored_config = stored_model_config(path, meta)
    config = registry.config_from_dict(kind, meta["config"], **config_overrides)
    module = registry.build_module(kind, config)
    store_dtype = jnp.dtype(dtype) if dtype is not None else None

    stored_abstract = registry.abstract_params(kind, registry.build_module(kind, stored_config))
    target_abstract = registry.abstract_params(kind, module)
    shardings = _shardings(target_abstract, mesh, rules) if mesh is not None else None

    stored_flat = registry.flat_shapes(stored_abstract)
    target_flat = registry.flat_shapes(target_abstract)
    params_dir = os.path.join(path, PARAMS_DIR)
    _check_stored_shapes(params_dir, stored_flat)
    # Layer stacking (scan) differs when the non-adapter param paths differ.
    same_layout = ({p for p in stored_flat if not is_lora_path(p)} == {p for p in target_flat if not is_lora_path(p)})
    sharding_flat = traverse_util.flatten_dict(shardings, sep="/") if shardings is not None else {}
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if sharding_flat and not same_layout:  # restore each stored array already spread like its target
        read_sharding = _relayout_shardings(sharding_flat, stored_flat, to_scan=config.scan_layers)
    else:
        read_sharding = sharding_flat

    def restore_spec(p, s):
        want_dtype = store_dtype or _stored_dtype(meta, s.dtype)
        return jax.ShapeDtypeStruct(s.shape, want_dtype, sharding=read_sharding.get(p, default))

    abstract = traverse_util.unflatten_dict({p: restore_spec(p, s) for p, s in stored_flat.items()}, sep="/")
    params = _load_tree(params_dir, abstract)
    flat = traverse_util.flatten_dict(params, sep="/")
    if not same_layout:
        flat = _relayout(flat, to_scan=config.scan_layers)
        if sharding_flat:
            flat = {p: jax.device_put(v, sharding_flat[p]) for p, v in flat.items()}

    # Fresh adapters for LoRA targets the checkpoint does not carry.
    key = jax.random.key(lora_seed)
    for p, s in sorted(target_flat.items()):
        if p in flat:
            continue
        if not is_lora_path(p):
            raise CheckpointError(f"param {p!r} is required by the requested config but missing from {path!r}")
        key, sub = jax.random.split(key)
        want_dtype = store_dtype or jnp.float32
        value = _per_layer_init(sub, s.shape) if p.endswith("lora_a") else jnp.zeros(s.shape, jnp.float32)
        flat[p] = jax.device_put(value.astype(want_dtype), sharding_flat.get(p, default))
    extra = sorted(set(flat) - set(target_flat))
    if extra:
        raise CheckpointError(f"checkpoint {path!r} has params the requested config does not use: {extra[:5]}")
    return module, traverse_util.unflatten_dict(flat, sep="/")


def _per_layer_init(key, shape):
    """lora_a init for a possibly layer-stacked [.., in, rank] shape, independent per layer."""
    if len(shape) == 2:
        return peft_kaiming_uniform(key, shape)
    keys = jax.random.split(key, shape[0])
    return jnp.stack([peft_kaiming_uniform(k, shape[1:]) for k in keys])


def _stored_dtype(meta: dict, fallback):
    return jnp.dtype(meta.get("dtype", fallback))


def _shardings(boxed_abstract, mesh, rules):
    return logical_shardings(boxed_abstract, mesh, rules)


def stored_metadata(params_dir: str) -> dict:
    """'/'-path -> Orbax array metadata (shape, dtype) of the params on disk, without reading any array."""
    import orbax.checkpoint.experimental.v1 as ocp
    if not os.path.isdir(params_dir):
        raise CheckpointError(f"{params_dir} is missing: the checkpoint was not written completely")
    metadata = getattr(ocp, "metadata", None) or ocp.pytree_metadata  # `metadata` is the newer name
    try:
        return traverse_util.flatten_dict(metadata(params_dir).metadata, sep="/")
    except Exception as e:  # any unreadable metadata means a damaged checkpoint
        raise CheckpointError(f"{params_dir} cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:200]}); the "
                              "checkpoint is damaged: convert or export it again") from e


def read_params(params_dir: str, paths, metadata: dict) -> dict:
    """Only the params at `paths` ('/'-paths), as host numpy arrays in their stored dtype (Orbax partial load):
    the exporters' way of streaming a checkpoint without holding it whole."""
    import orbax.checkpoint.experimental.v1 as ocp
    cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
    abstract = traverse_util.unflatten_dict(
        {p: jax.ShapeDtypeStruct(metadata[p].shape, metadata[p].dtype, sharding=cpu) for p in paths}, sep="/")
    context = ocp.Context()
    context.pytree.loading.partial_load = True
    with context:
        tree = _load_tree(params_dir, abstract)
    return {p: np.asarray(v) for p, v in traverse_util.flatten_dict(tree, sep="/").items()}


def _check_stored_shapes(params_dir: str, expected: dict) -> None:
    """The arrays on disk must be the ones model_config.json describes (an edited config is caught here)."""
    stored = stored_metadata(params_dir)
    for p, s in sorted(expected.items()):
        got = tuple(getattr(stored.get(p), "shape", ()) or ())
        if p not in stored or got != tuple(s.shape):
            found = "missing" if p not in stored else f"{got}"
            raise CheckpointError(f"param {p!r} is {found} in {params_dir} but {CONFIG_FILE} describes "
                                  f"{tuple(s.shape)}: the config does not belong to these params (edited?); restore "
                                  "it or convert/export the checkpoint again")
    extra = sorted(set(stored) - set(expected))
    if extra:
        raise CheckpointError(f"{params_dir} holds params {extra[:3]} that {CONFIG_FILE} does not describe; restore it "
                              "or convert/export the checkpoint again")


def _load_tree(params_dir: str, abstract):
    import orbax.checkpoint.experimental.v1 as ocp
    load = getattr(ocp, "load", None) or ocp.load_pytree  # `load_pytree` is the older (0.12.4) name
    try:
        return load(params_dir, abstract)
    except Exception as e:  # a truncated or corrupted array store
        raise CheckpointError(f"the params in {params_dir} cannot be read ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}); the checkpoint is "
                              "damaged: convert or export it again") from e


def _relayout_shardings(target: dict, stored: dict, *, to_scan: bool) -> dict:
    """Shardings for the stored (other-layout) arrays that match their targets' (no whole array on one device)."""
    out = {}
    for p in stored:
        parts = p.split("/")
        if to_scan and any(x.startswith("layers_") for x in parts):  # per-layer stored -> stacked target
            stacked = "/".join("layers" if x.startswith("layers_") else x for x in parts)
            sh = target.get(stacked)
            if sh is not None:
                out[p] = NamedSharding(sh.mesh, PartitionSpec(*tuple(sh.spec)[1:]))
        elif not to_scan and "layers" in parts:  # stacked stored -> per-layer targets
            sh = target.get("/".join("layers_0" if x == "layers" else x for x in parts))
            if sh is not None:
                out[p] = NamedSharding(sh.mesh, PartitionSpec(None, *tuple(sh.spec)))
        elif p in target:
            out[p] = target[p]
    return out


def _relayout(flat: dict, *, to_scan: bool) -> dict:
    """Stack `layers_{i}/...` params into `layers/...` (to_scan) or split them back."""
    out = {}
    if to_scan:
        groups: dict[str, dict[int, Any]] = {}
        for p, v in flat.items():
            parts = p.split("/")
            idx = next((k for k, part in enumerate(parts) if part.startswith("layers_")), None)
            if idx is None:
                out[p] = v
                continue
            layer = int(parts[idx][len("layers_"):])
            stacked_path = "/".join(parts[:idx] + ["layers"] + parts[idx + 1:])
            groups.setdefault(stacked_path, {})[layer] = v
        for p, layers in groups.items():
            out[p] = jnp.stack([layers[i] for i in range(len(layers))])
        return out
    for p, v in flat.items():
        parts = p.split("/")
        if "layers" not in parts:
            out[p] = v
            continue
        idx = parts.index("layers")
        for i in range(v.shape[0]):
            out["/".join(parts[:idx] + [f"layers_{i}"] + parts[idx + 1:])] = v[i]
    return out
