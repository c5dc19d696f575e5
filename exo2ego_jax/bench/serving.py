"""Ahead-of-time compilation of the serving programs: what answering with a trained model costs.

The programs are the ones `exo2ego_jax.serve` runs, at a served model's shapes (LoRA merged into the weights,
as the export writes them; bf16 weights; only the parts inference reads: the ego encoder, F, the connector and
the LLM):

* prefill: one clip's visual tokens (x and F(x) under the `tokens` fusion: 16 frames x 2 views of STC tokens)
  spliced into a prompt, run through the LLM once, filling a KV cache with room for the answer;
* decode: one generation step, a token per sequence against that cache (the cache is updated in place);
* score: the option-scoring pass the multiple-choice evaluation uses, a chunk of (clip, prompt + option) rows
  and each row's mean option-token loss (exo2ego_jax/serve/scoring.py).
"""
from __future__ import annotations

import dataclasses
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from exo2ego_jax.bench import estimate as estimate_lib
from exo2ego_jax.bench import hlo
from exo2ego_jax.bench.aot import _forward_flops, _memory, out_of_memory, usable_bytes
from exo2ego_jax.models import registry
from exo2ego_jax.models.exo2ego import Exo2Ego
from exo2ego_jax.models.mistral import MistralForCausalLM, init_cache
from exo2ego_jax.serve.generate import _prefill_inputs
from exo2ego_jax.serve.scoring import _row_losses
from exo2ego_jax.sharding import logical_shardings
from exo2ego_jax.train.config import Run
from exo2ego_jax.train.loop import make_mesh

PROGRAMS = ("train", "prefill", "decode", "score")
SERVED_PARTS = ("ego_encoder", "mapper_f", "connector", "llm")


@dataclasses.dataclass(frozen=True)
class ServingShapes:
    batch: int = 1            # sequences (prefill, decode) or scored rows (score)
    prompt_tokens: int = 64   # text tokens around the clip's placeholder
    new_tokens: int = 256     # room left in the KV cache for the answer


@dataclasses.dataclass
class ServingProgram:
    name: str
    module: Exo2Ego
    mesh: object
    executable: object
    lowered_text_flops: float   # matrix FLOPs of the program as written (before XLA's optimizations)
    kv_cache_bytes: int         # per device
    weight_bytes: int           # per device
    tokens: int                 # tokens the program produces (decode) or reads (prefill, score) per run
    cache_length: int
    compile_s: float
    out_of_memory: dict | None = None


def served_module(run: Run, attention: str | None = None) -> Exo2Ego:
    """The model as an export serves it: LoRA merged (no adapter matmuls), weights in the compute dtype."""
    cfg = run.model
    over = {} if attention is None else dict(attention_impl=attention)
    llm = dataclasses.replace(cfg.llm, lora=None, remat_policy="none", **over)
    clip = dataclasses.replace(cfg.clip, remat_policy="none", **over)
    return Exo2Ego(dataclasses.replace(cfg, llm=llm, clip=clip))


def _prefill(module, weights, spec, s):
    def fn(params, input_ids, mask, pixels):
        llm, llm_params, embeds, spliced = _prefill_inputs(module, params, input_ids, mask, pixels, s["fusion"])
        empty = init_cache(llm.config, s["b"], s["cache_length"], dtype=embeds.dtype)
        with jax.named_scope("llm"):  # the LLM runs as its own module here: name it as the parts table does
            logits, cache = llm.apply({"params": llm_params}, inputs_embeds=embeds, attention_mask=spliced,
                                      cache=empty)
        return logits[:, -1], cache
    b, width = s["b"], s["ids_width"]
    args = (weights, spec((b, width), jnp.int32), spec((b, width), jnp.bool_), spec(s["frames"], s["dtype"]))
    return fn, args, (), b * s["length"]


def _decode(module, weights, spec, s):
    llm = MistralForCausalLM(module.config.llm)
    b = s["b"]

    def fn(llm_params, token, cache):
        with jax.named_scope("llm"):
            logits, cache = llm.apply({"params": llm_params}, token[:, None], attention_mask=jnp.ones((b, 1), bool),
                                      cache=cache)
        return logits[:, -1], cache
    return fn, (weights["llm"], spec((b,), jnp.int32), s["cache"]), (2,), b


def _score(module, weights, spec, s):
    def fn(params, ids, mask, labels, pixels):
        return _row_losses.__wrapped__(module, params, ids, mask, labels, pixels, s["fusion"])
    b, width = s["b"], s["prompt"] + 16  # prompt, placeholder and an option of up to 15 tokens
    args = (weights, spec((b, width), jnp.int32), spec((b, width), jnp.bool_), spec((b, width), jnp.int32),
            spec(s["frames"], s["dtype"]))
    return fn, args, (), b * (width - 1 + s["visual"])


_PROGRAMS = {"prefill": _prefill, "decode": _decode, "score": _score}


def _abstract_weights(module: Exo2Ego, mesh, dtype) -> dict:
    boxed = registry.abstract_params("exo2ego", module)
    boxed = {k: v for k, v in boxed.items() if k in SERVED_PARTS}
    shardings = logical_shardings(boxed, mesh)
    values = nn.meta.unbox(boxed)
    return jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, dtype, sharding=s), values, shardings)


def _nbytes(tree, devices: int) -> int:
    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape) if getattr(leaf, "sharding", None) else leaf.shape
        size = 1
        for d in shard:
            size *= d
        total += size * jnp.dtype(leaf.dtype).itemsize
    return total


def compile_program(run: Run, devices: list, program: str, shapes: ServingShapes) -> ServingProgram:
    """Lower and compile one serving program for `devices` (the batch over the mesh's data axes)."""
    c, cfg = run.config, run.model
    mesh = make_mesh(c, devices)
    module = served_module(run)
    dtype = jnp.dtype(c.compute_dtype)
    weights = _abstract_weights(module, mesh, dtype)
    b = shapes.batch
    rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp"))) if b % (mesh.shape["data"] * mesh.shape["fsdp"]) == 0 \
        else NamedSharding(mesh, PartitionSpec())
    spec = lambda shape, dt, sharding=rows: jax.ShapeDtypeStruct(shape, dt, sharding=sharding)
    fusion = c.fusion or cfg.fusion
    visual = cfg.num_visual_tokens(fusion)
    ids_width = shapes.prompt_tokens + 1  # the prompt and the clip's placeholder token
    length = ids_width - 1 + visual
    cache_length = length + shapes.new_tokens
    frames = (b, cfg.num_frames, cfg.clip.image_size, cfg.clip.image_size, 3)
    cache_like = jax.eval_shape(lambda: init_cache(module.config.llm, b, cache_length, dtype=dtype))
    cache = jax.tree.map(lambda s: spec(s.shape, s.dtype, rows if s.ndim and s.shape[0] == b else
                                        NamedSharding(mesh, PartitionSpec())), cache_like)
    # the cache's k/v are [layers, batch, ...]: the batch is their second dimension
    kv_sharding = NamedSharding(mesh, PartitionSpec(None, ("data", "fsdp"))) if rows.spec else rows
    cache["k"] = spec(cache_like["k"].shape, dtype, kv_sharding)
    cache["v"] = spec(cache_like["v"].shape, dtype, kv_sharding)

    make = _PROGRAMS.get(program)
    if make is None:
        raise ValueError(f"program {program!r}: one of {PROGRAMS[1:]} (train is the stage's step)")
    fn, args, donate, tokens = make(module, weights, spec, dict(b=b, ids_width=ids_width, cache_length=cache_length,
                                                                 fusion=fusion, frames=frames, dtype=dtype,
                                                                 cache=cache, visual=visual, length=length,
                                                                 prompt=shapes.prompt_tokens))
    jitted = jax.jit(fn, donate_argnums=donate)
    with jax.set_mesh(mesh):
        lowered = jitted.lower(*args)
        t = time.perf_counter()
        try:
            executable, oom = lowered.compile(), None
        except Exception as e:
            oom = out_of_memory(e)
            if oom is None:
                raise
            executable = None
        compile_s = time.perf_counter() - t
    # the program's matrix FLOPs as written, counted on a CPU lowering with XLA attention (every score computed)
    counting = served_module(run, attention="xla")
    plain_fn = make(counting, weights, spec, dict(b=b, ids_width=ids_width, cache_length=cache_length, fusion=fusion,
                                                   frames=frames, dtype=dtype, cache=cache, visual=visual,
                                                   length=length, prompt=shapes.prompt_tokens))[0]
    strip = lambda tree: jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), tree)
    plain = _forward_flops(plain_fn, *[strip(a) for a in args]) if executable is not None else 0.0
    n = mesh.devices.size
    kv_bytes = _nbytes(dict(k=cache["k"], v=cache["v"]), n) if program in ("prefill", "decode") else 0  # score: none
    return ServingProgram(program, module, mesh, executable, plain / n, kv_bytes,
                          _nbytes(weights["llm"] if program == "decode" else weights, n), tokens, cache_length,
                          compile_s, oom)


def report_program(p: ServingProgram, run: Run, target, topology, shapes: ServingShapes) -> dict:
    """The figures of a compiled serving program (per device), as `aot.report` gives them for a train step."""
    c = run.config
    n = p.mesh.devices.size
    usable = usable_bytes(target)
    head = dict(program=p.name, stage=c.stage, preset=c.preset, target=target.describe(), topology=str(topology),
                devices=n, batch=shapes.batch, prompt_tokens=shapes.prompt_tokens, new_tokens=shapes.new_tokens,
                cache_length=p.cache_length, tokens=p.tokens, attention=run.model.llm.attention_impl,
                hbm_bytes=target.hbm_bytes,
                usable_bytes=usable, kv_cache_bytes=p.kv_cache_bytes, weight_bytes=p.weight_bytes,
                compile_s=p.compile_s, jax=jax.__version__)
    if p.executable is None:
        return dict(head, fits=False, out_of_memory=p.out_of_memory)
    memory = _memory(p.executable)
    text = p.executable.as_text()
    analysis = hlo.analyze(text, num_devices=n)
    est = estimate_lib.estimate(text, target, num_devices=n, useful_flops=p.lowered_text_flops)
    step = est["step_s"]
    out = dict(head, fits=bool(memory["total"] <= usable), memory=memory, headroom=1.0 - memory["total"] / usable,
               flops=dict(executed=analysis.total_flops, model=p.lowered_text_flops, by_kind=analysis.flops),
               custom_calls=analysis.custom_calls, collectives=analysis.collectives,
               estimate=dict(step_s=step, mfu=est["mfu"], exposed_collectives_s=est["exposed_collectives_s"],
                             compute_s=est["compute_s"], memory_bound_s=est["memory_bound_s"],
                             launch_s=est["launch_s"], kernels=est["kernels"], kernel_runs=est["kernel_runs"],
                             tokens_per_s=p.tokens / step if step else None, by_part=est["by_part"],
                             assumptions=est["assumptions"]))
    if p.name == "decode":
        # every generated token reads every weight once: batch tokens per weight read at the HBM bandwidth
        read_s = p.weight_bytes / target.hbm_bytes_per_s
        out["weight_read_bound"] = dict(step_s=read_s, tokens_per_s=shapes.batch / read_s,
                                        estimate_share=read_s / step if step else None)
    return out
