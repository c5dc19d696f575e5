"""Forward+backward throughput of the two backbones, at the shapes of `../shared/bench/torch_anchor.py`.

  python launch/bench_backbones.py                 # full size (GPU): CLIP-L/14-336 on 64 frames, one Mistral-7B layer
  python launch/bench_backbones.py --size tiny     # CPU smoke test at the anchor's --tiny shapes
  python launch/bench_backbones.py --attention_impl cudnn --json $OUT/backbones.jsonl

CLIP: the trainable ego encoder of stages 2-3: selected-layer features (23 of 24 layers), loss mean(f^2),
fwd+bwd + AdamW, bf16 compute on float32 master weights. Mistral layer: fwd+bwd w.r.t. the input and all
weights, bf16, B=4, S=2048, FLOPs counted as the anchor does (causal attention = half the S^2 terms).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
import optax
import flax.linen as nn

from exo2ego_jax.bench.timing import device_kind, emit, print_table, time_step
from exo2ego_jax.models.clip import CLIPVisionConfig, CLIPVisionEncoder
from exo2ego_jax.models.mistral import MistralConfig, MistralDecoderLayer, rope_cos_sin
from exo2ego_jax.paths import absolute

SIZES = {
    "full": dict(clip=dict(hidden_size=1024, intermediate_size=4096, num_layers=24, num_heads=16, patch_size=14,
                           image_size=336), frames=64,
                 layer=dict(B=4, S=2048, D=4096, H=32, KV=8, F=14336)),
    "tiny": dict(clip=dict(hidden_size=64, intermediate_size=256, num_layers=2, num_heads=4, patch_size=14,
                           image_size=56), frames=4,
                 layer=dict(B=2, S=128, D=128, H=4, KV=2, F=448)),
}


def bench_clip(size: str, args) -> dict:
    spec = SIZES[size]
    cfg = CLIPVisionConfig(**spec["clip"], dtype=args.dtype, attention_impl=args.attention_impl,
                           remat_policy=args.clip_remat, scan_layers=args.scan)
    model = CLIPVisionEncoder(cfg)
    pixels = jnp.asarray(np.random.default_rng(0).normal(size=(spec["frames"], cfg.image_size, cfg.image_size, 3)),
                         jnp.dtype(args.dtype))
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), pixels)["params"])
    tx = optax.adamw(2e-5)
    state = (params, tx.init(params))

    @jax.jit
    def step(state, pixels):
        params, opt_state = state
        loss_fn = lambda p: jnp.mean(jnp.square(model.apply({"params": p}, pixels).astype(jnp.float32)))
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    step = jax.jit(step.__wrapped__, donate_argnums=0)
    timing, _ = time_step(step, state, pixels, reps=args.reps, donate_first=True)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    tokens = spec["frames"] * (cfg.num_patches + 1)
    flops = 6 * n_params * tokens  # the anchor's convention (attention excluded)
    return dict(part="jax_clip_video", frames=spec["frames"], step_s=timing.step_s,
                frames_per_s=spec["frames"] / timing.step_s, model_tflops_per_s=flops / timing.step_s / 1e12,
                xla_tflops_per_s=(timing.flops_xla or 0) / timing.step_s / 1e12, compile_s=timing.compile_s,
                peak_gb=(timing.peak_bytes or 0) / 1e9 or None, params=n_params)


def layer_flops(d) -> float:
    B, S, D, H, KV, FF = d["B"], d["S"], d["D"], d["H"], d["KV"], d["F"]
    hd = D // H
    mats = 2 * B * S * (D * H * hd + 2 * D * KV * hd + H * hd * D + 3 * D * FF)
    attn = 2 * 2 * B * H * S * S * hd / 2
    return 3 * (mats + attn)


def bench_layer(size: str, args) -> dict:
    d = SIZES[size]["layer"]
    cfg = MistralConfig(vocab_size=32, hidden_size=d["D"], intermediate_size=d["F"], num_layers=1,
                        num_heads=d["H"], num_kv_heads=d["KV"], head_dim=d["D"] // d["H"], dtype=args.dtype,
                        param_dtype=args.dtype, attention_impl=args.attention_impl)
    layer = MistralDecoderLayer(cfg)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(d["B"], d["S"], d["D"])) * 0.02, jnp.dtype(args.dtype))
    pos = jnp.broadcast_to(jnp.arange(d["S"]), (d["B"], d["S"]))
    cos, sin = rope_cos_sin(pos, cfg.head_dim, cfg.rope_theta)
    if args.attention_impl == "cudnn":
        attn = dict(kv_lengths=jnp.full((d["B"],), d["S"], jnp.int32))
    else:
        attn = dict(mask=jnp.tril(jnp.ones((d["S"], d["S"]), bool))[None, None])
    params = nn.meta.unbox(jax.jit(layer.init)(jax.random.key(0), x, cos, sin, attn, None)["params"])

    @jax.jit
    def step(params, x):
        loss = lambda p, x: jnp.mean(jnp.square(layer.apply({"params": p}, x, cos, sin, attn, None)[0].astype(jnp.float32)))
        return jax.grad(loss, argnums=(0, 1))(params, x)

    timing, _ = time_step(step, params, x, reps=args.reps)
    flops = layer_flops(d)
    return dict(part="jax_mistral_layer", attention=args.attention_impl, **d, step_ms=timing.step_s * 1e3,
                tflops=flops / timing.step_s / 1e12, xla_tflops_per_s=(timing.flops_xla or 0) / timing.step_s / 1e12,
                compile_s=timing.compile_s, peak_gb=(timing.peak_bytes or 0) / 1e9 or None)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="full")
    p.add_argument("--only", default="clip,layer", help="comma list of: clip, layer")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--attention_impl", default="cudnn" if jax.default_backend() == "gpu" else "xla",
                   choices=["xla", "cudnn"])
    p.add_argument("--clip_remat", default="none", help="remat policy for the CLIP layers")
    p.add_argument("--scan", action="store_true", help="scan the CLIP layers (default: unrolled, faster on GPU)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--json", type=absolute, default=None, help="append JSON lines here")
    args = p.parse_args(argv)
    print(f"# device {device_kind()}, jax {jax.__version__}, size {args.size}, dtype {args.dtype}")
    rows = []
    for part in args.only.split(","):
        rec = {"clip": bench_clip, "layer": bench_layer}[part](args.size, args)
        rec["device"] = device_kind()
        emit(rec, args.json)
        rows.append(rec)
    print_table(rows, [("part", "part", ""), ("step_s", "step s", ".4f"), ("step_ms", "step ms", ".2f"),
                       ("frames_per_s", "frames/s", ".1f"), ("model_tflops_per_s", "model TFLOP/s", ".2f"),
                       ("tflops", "layer TFLOP/s", ".2f"), ("xla_tflops_per_s", "XLA-counted TFLOP/s", ".2f"),
                       ("compile_s", "compile s", ".1f"), ("peak_gb", "peak GB", ".1f")])


if __name__ == "__main__":
    main()
