"""Round trip of the foundation on tiny random models, the same code path as for the real 7B checkpoints:

  1. build a tiny random HF `CLIPVisionModel` and `MistralForCausalLM` locally (no hub) and `save_pretrained`;
  2. convert both with `python -m exo2ego_jax.convert {clip,mistral}`;
  3. `exo2ego_jax.load_pretrained` each, compare features / logits with transformers;
  4. greedy-decode 16 tokens with the KV cache and compare with HF `generate`.

  python launch/quickstart.py --workdir /tmp/exo2ego_quickstart
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import numpy as np

from exo2ego_jax.checkpoints import load_pretrained
from exo2ego_jax.models.mistral import init_cache
from exo2ego_jax.paths import absolute


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=absolute, default="/tmp/exo2ego_quickstart")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import torch  # the PyTorch references come with the `test` extra
    import transformers

    torch.manual_seed(args.seed)
    os.makedirs(args.workdir, exist_ok=True)
    hf_clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, patch_size=14,
        image_size=56)).eval()
    hf_llm = transformers.MistralForCausalLM(transformers.MistralConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, rope_theta=1e6)).eval()
    for name, model in (("clip", hf_clip), ("mistral", hf_llm)):
        src, dst = os.path.join(args.workdir, f"hf_{name}"), os.path.join(args.workdir, f"jax_{name}")
        model.save_pretrained(src)
        if not os.path.exists(dst):
            subprocess.run([sys.executable, "-m", "exo2ego_jax.convert", name, "--hf_dir", src, "--out", dst,
                            "--dtype", "float32"], check=True)

    clip, clip_params = load_pretrained(os.path.join(args.workdir, "jax_clip"))
    pixels = np.random.default_rng(args.seed).normal(size=(2, 56, 56, 3)).astype(np.float32)
    feats = np.asarray(jax.jit(clip.apply)({"params": clip_params}, pixels))
    with torch.no_grad():
        ref = hf_clip(torch.from_numpy(pixels.transpose(0, 3, 1, 2)), output_hidden_states=True).hidden_states[-2][:, 1:]
    print(f"CLIP features {feats.shape}: max |jax - transformers| = {np.abs(feats - ref.numpy()).max():.2e}")

    llm, llm_params = load_pretrained(os.path.join(args.workdir, "jax_mistral"))
    prompt = np.random.default_rng(args.seed).integers(3, 128, size=(1, 8))
    logits = np.asarray(llm.apply({"params": llm_params}, prompt))
    with torch.no_grad():
        ref_logits = hf_llm(torch.from_numpy(prompt)).logits.numpy()
        ref_tokens = hf_llm.generate(torch.from_numpy(prompt), max_new_tokens=16, min_new_tokens=16,
                                     do_sample=False, pad_token_id=0, eos_token_id=None)[0, 8:].numpy()
    print(f"Mistral logits {logits.shape}: max |jax - transformers| = {np.abs(logits - ref_logits).max():.2e}")

    step = jax.jit(lambda p, ids, c: llm.apply({"params": p}, ids, cache=c))
    cache = init_cache(llm.config, 1, 8 + 16)
    out, cache = step(llm_params, prompt, cache)
    tokens = []
    for _ in range(16):
        nxt = np.asarray(out[:, -1].argmax(-1))[:, None]
        tokens.append(int(nxt[0, 0]))
        out, cache = step(llm_params, nxt, cache)
    same = tokens == ref_tokens.tolist()
    print(f"greedy KV-cache decoding of 16 tokens {'matches' if same else 'DIFFERS FROM'} HF generate: {tokens}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
