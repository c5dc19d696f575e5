"""Exo2Ego throughput at real shapes (random weights, one device), one table of tokens/s, TFLOP/s, MFU, memory.

  python launch/bench.py                       # GPU, full size (the 7b model)
  python launch/bench.py --size tiny           # CPU smoke test (same code, toy shapes)
  python launch/bench.py --only stage3,lora_a,decode_a --json bench.jsonl

Parts (--only, comma-separated; full-size shapes):
  stage3    ego CLIP-L (trained) + F (trained) + STC on x and F(x) joined along tokens (trained) + Mistral-7B
            with LoRA r=128; 2 clips x 16 frames, 256 text tokens
  baseline  the VideoLLaMA2 path: frozen CLIP, trained STC, LoRA; 4 clips, 512 text tokens
  lora_a    the LLM alone with LoRA, batch 4 x 2048 tokens      lora_b   batch 2 x 3584 tokens
  clip      CLIP-L trainable on 64 frames
  decode_a  greedy decoding, batch 1, prompt 2048, 128 new tokens   decode_b   the same at batch 16

Useful FLOPs (launch/BENCHMARKS.md): a frozen weight costs 4 FLOPs per token (forward + the gradient of its
input), a trained one 6, causal attention half of its S^2 score matrices; recomputation never counts. MFU is
useful FLOP/s over the GPU's dense bf16 datasheet peak (989 TFLOP/s for H100 and H200 SXM).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax
import jax.numpy as jnp
import numpy as np
import optax
import flax.linen as nn

from exo2ego_jax.bench.estimate import estimate
from exo2ego_jax.bench.timing import (datasheet_peak_flops, device_kind, emit, print_table, this_device_target,
                                      time_step)
from exo2ego_jax.models.lora import LoRAConfig
from exo2ego_jax.models.mistral import MistralConfig, MistralForCausalLM
from exo2ego_jax.models.params import combine_params, path_matcher, split_params
from exo2ego_jax.serve.generate import generate
from exo2ego_jax.train.batches import global_batch, to_model_batch
from exo2ego_jax.configfile import load_config_file
from exo2ego_jax.train.config import resolve
from exo2ego_jax.train.loop import prepare
from exo2ego_jax.paths import absolute


PARTS = ("stage3", "baseline", "lora_a", "lora_b", "clip", "decode_a", "decode_b")
SIZES = {
    "full": dict(preset="7b", stage3=dict(batch=2, text=256), baseline=dict(batch=4, text=512),
                 lora=((4, 2048), (2, 3584)), clip_frames=64, decode=dict(prompt=2048, new=128, batches=(1, 16))),
    "tiny": dict(preset="tiny", stage3=dict(batch=2, text=16), baseline=dict(batch=2, text=16),
                 lora=((2, 64), (1, 96)), clip_frames=4, decode=dict(prompt=32, new=8, batches=(1, 4))),
}


def stage_config(stage: str, preset: str, **overrides):
    """A stage config on random weights and in-memory data, on one device (the bench's setting)."""
    base = {"init.checkpoint": "", "init.from_workdir": "", "init.allow_random": True, "data.source": "toy",
            "mesh.shape": (1, 1, 1), "mesh.num_devices": 1, "export.enabled": False}
    return load_config_file(os.path.join(ROOT, "configs", f"{stage}.py"), preset, {**base, **overrides})


def llm_useful_flops(cfg, lora_rank: int, tokens: int, seq: int, batch: int) -> float:
    """4 N_base T + 6 N_lora T + causal attention (forward and activation gradients: 3x forward)."""
    d, f, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    per_layer = d * q + 2 * d * kv + q * d + 3 * d * f
    n_base = layers * per_layer + d * cfg.vocab_size  # lm_head; the embedding lookup is free
    n_lora = layers * lora_rank * ((d + q) + 2 * (d + kv) + (q + d) + 2 * (d + f) + (f + d)) if lora_rank else 0
    attention_fwd = 2 * 2 * batch * layers * cfg.num_heads * cfg.head_dim * seq * seq / 2
    return 4 * n_base * tokens + 6 * n_lora * tokens + 3 * attention_fwd


def forward_flops(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0)) if cost else 0.0


def bench_video_step(size: str, part: str, reps: int, text: int | None = None) -> dict:
    """The full stage-3 step (or the VideoLLaMA2 baseline path) through the training code."""
    spec = SIZES[size]
    shape = dict(spec["stage3" if part == "stage3" else "baseline"])
    if text:
        shape["text"] = text
    overrides = {"batch_size": shape["batch"], "microbatches": 1, "data.num_examples": shape["batch"],
                 "data.seq_len": shape["text"]}
    if part == "baseline":  # VideoLLaMA2's LoRA fine-tune: frozen tower, trained connector, x only
        overrides.update({"fusion": "none", "trainable": (r"llm/.*/lora_[ab]", r"connector/.*")})
    c = stage_config("stage3", spec["preset"], **overrides)
    setup = prepare(resolve(c))
    batch = global_batch(to_model_batch(next(setup.data), jnp.dtype(c.compute_dtype)), setup.layout.batch)
    with jax.set_mesh(setup.mesh):
        timing, _ = time_step(setup.step_fn, setup.state, setup.frozen, batch, reps=reps, donate_first=True)
    mc, fusion = setup.run.model, setup.run.stage.fusion
    n_visual = mc.num_visual_tokens(fusion)
    seq = shape["text"] - 1 + n_visual
    tokens = shape["batch"] * seq
    useful = llm_useful_flops(mc.llm, mc.llm.lora.rank, tokens, seq, shape["batch"])
    # vision side: exact forward FLOPs from XLA, x3 when trained (forward + both gradients)
    dtype = jnp.dtype(c.compute_dtype)
    frames = jnp.zeros((shape["batch"], mc.num_frames, mc.clip.image_size, mc.clip.image_size, 3), dtype)
    all_params = combine_params(jax.tree.map(lambda x: x.astype(dtype), setup.state["trainable"]), setup.frozen)
    vision = forward_flops(lambda p, x: setup.module.apply({"params": p}, x, method="visual_tokens",
                                                           fusion=fusion), all_params, frames)
    useful += 3 * vision if part == "stage3" else vision + 2 * forward_flops(
        lambda p, x: setup.module.apply({"params": p}, x, method="connect"),
        all_params, jnp.zeros((shape["batch"], mc.num_frames, mc.grid ** 2, mc.clip.hidden_size), dtype))
    return _row(part, timing, useful, tokens=tokens, items=shape["batch"], item_name="clips")


def bench_lora(size: str, batch: int, seq: int, reps: int, remat: str, attention: str) -> dict:
    preset = SIZES[size]["preset"]
    m = stage_config("stage3", preset).model.llm.to_dict()
    rank = 128 if size == "full" else 4
    cfg = MistralConfig(**m, dtype="bfloat16", remat_policy=remat, attention_impl=attention,
                        lora=LoRAConfig(rank=rank, alpha=2.0 * rank, dropout=0.1))
    model = MistralForCausalLM(cfg)
    ids = jnp.asarray(np.random.default_rng(0).integers(3, cfg.vocab_size, size=(batch, seq)), jnp.int32)
    params = jax.jit(lambda k: nn.meta.unbox(model.init(k, ids[:, :8])["params"]))(jax.random.key(0))
    trainable, frozen = split_params(params, path_matcher([r".*/lora_[ab]"]))
    frozen = jax.tree.map(lambda x: x.astype(jnp.bfloat16), frozen)
    tx = optax.adamw(2e-5)
    state = (trainable, tx.init(trainable))

    def step(state, frozen, ids, rng):
        trainable, opt = state

        def loss(t):
            logits = model.apply({"params": combine_params(jax.tree.map(lambda x: x.astype(jnp.bfloat16), t), frozen)},
                                 ids, deterministic=False, rngs={"dropout": rng})
            return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()
        value, grads = jax.value_and_grad(loss)(trainable)
        updates, opt = tx.update(grads, opt, trainable)
        return (optax.apply_updates(trainable, updates), opt), value

    timing, _ = time_step(jax.jit(step, donate_argnums=0), state, frozen, ids, jax.random.key(1), reps=reps,
                          donate_first=True)
    useful = llm_useful_flops(cfg, rank, batch * seq, seq, batch)
    return _row(f"lora_B{batch}_S{seq}", timing, useful, tokens=batch * seq)


def bench_decode(size: str, batch: int, reps: int, attention: str) -> dict:
    d = SIZES[size]["decode"]
    m = stage_config("stage3", SIZES[size]["preset"]).model.llm.to_dict()
    cfg = MistralConfig(**m, dtype="bfloat16", param_dtype="bfloat16", attention_impl="xla")
    model = MistralForCausalLM(cfg)
    ids = jnp.asarray(np.random.default_rng(0).integers(3, cfg.vocab_size, size=(batch, d["prompt"])), jnp.int32)
    params = jax.jit(lambda k: nn.meta.unbox(model.init(k, ids[:, :8])["params"]))(jax.random.key(0))

    def run(new):
        t = time.perf_counter()
        out = generate(model, params, ids, max_new_tokens=new, eos_token_id=None)
        jax.block_until_ready(out)
        return time.perf_counter() - t

    compile_t = run(d["new"]) + run(1)  # both programs compiled (first calls)
    total = min(run(d["new"]) for _ in range(max(1, reps // 2)))
    prefill = min(run(1) for _ in range(max(1, reps // 2)))
    per_token = max(total - prefill, 1e-9) / max(d["new"] - 1, 1)
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    return dict(part=f"decode_B{batch}", new_tokens_per_s=batch * d["new"] / total, ms_per_token=per_token * 1e3,
                prefill_s=prefill, step_s=total, weight_stream_gb_per_s=weight_bytes / per_token / 1e9,
                compile_s=compile_t, device=device_kind())


def _row(part, timing, useful, *, tokens, items=None, item_name=None) -> dict:
    tflops = useful / timing.step_s / 1e12
    row = dict(part=part, step_s=timing.step_s, tokens_per_s=tokens / timing.step_s, useful_tflops=tflops,
               xla_tflops=(timing.flops_xla or 0) / timing.step_s / 1e12, compile_s=timing.compile_s,
               peak_gb=(timing.peak_bytes or 0) / 1e9 or None, device=device_kind())
    peak = datasheet_peak_flops()
    if peak:
        row["mfu"] = useful / timing.step_s / peak
    if timing.hlo_text:  # the per-kernel estimate of the same compiled program, beside the measurement
        target = this_device_target()
        est = estimate(timing.hlo_text, target, num_devices=1, useful_flops=useful)
        row.update(est_step_s=est["step_s"], est_mfu=est["mfu"], est_target=target.name,
                   est_by_part={k: v["est_s"] for k, v in est["by_part"].items() if v["est_s"]})
    if items:
        row[f"{item_name}_per_s"] = items / timing.step_s
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="full")
    p.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts of {PARTS}")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--stage3_text", type=int, help="text tokens per clip of the stage3 part (default: the size's; "
                                                     "launch/gpu_check.py sets the anchor's sequence with it)")
    p.add_argument("--lora_shape", help="BATCHxSEQ of lora_b (default: the size's)")
    p.add_argument("--remat", default="full", help="remat policy of the LLM-only LoRA steps")
    p.add_argument("--attention_impl", default="cudnn" if jax.default_backend() == "gpu" else "xla")
    p.add_argument("--json", type=absolute, default=None)
    args = p.parse_args(argv)
    unknown = [part for part in args.only.split(",") if part not in PARTS]
    if unknown:
        p.error(f"--only: unknown part(s) {unknown}; choose from {','.join(PARTS)}")
    spec = SIZES[args.size]
    print(f"# device {device_kind()}, jax {jax.__version__}, size {args.size}")
    rows = []
    for part in args.only.split(","):
        if part in ("stage3", "baseline"):
            rec = bench_video_step(args.size, part, args.reps, args.stage3_text if part == "stage3" else None)
        elif part in ("lora_a", "lora_b"):
            b, s = spec["lora"][0 if part == "lora_a" else 1]
            if part == "lora_b" and args.lora_shape:
                b, s = (int(v) for v in args.lora_shape.lower().split("x"))
            rec = bench_lora(args.size, b, s, args.reps, args.remat, args.attention_impl)
        elif part == "clip":
            sys.path.insert(0, os.path.join(ROOT, "launch"))
            import bench_backbones
            ns = argparse.Namespace(dtype="bfloat16", attention_impl=args.attention_impl, clip_remat="none",
                                    scan=False, reps=args.reps)
            rec = bench_backbones.bench_clip(args.size, ns)
            rec["device"] = device_kind()
        elif part in ("decode_a", "decode_b"):
            rec = bench_decode(args.size, spec["decode"]["batches"][0 if part == "decode_a" else 1], args.reps,
                               args.attention_impl)
        emit(rec, args.json)
        rows.append(rec)
    print_table(rows, [("part", "part", ""), ("step_s", "step s", ".4f"), ("tokens_per_s", "tokens/s", ".0f"),
                       ("clips_per_s", "clips/s", ".3f"), ("frames_per_s", "frames/s", ".1f"),
                       ("new_tokens_per_s", "new tok/s", ".1f"), ("useful_tflops", "useful TFLOP/s", ".3f"),
                       ("model_tflops_per_s", "model TFLOP/s", ".3f"), ("mfu", "MFU", ".2%"),
                       ("est_step_s", "estimated step s", ".4f"), ("est_mfu", "estimated MFU", ".2%"),
                       ("peak_gb", "peak GB", ".1f"), ("compile_s", "compile s", ".1f")])


if __name__ == "__main__":
    main()
