"""CLI: python -m exo2ego_jax.convert {clip,mistral,videollama2} --hf_dir SRC --out DST [--dtype bfloat16|float32]."""
from __future__ import annotations

import argparse
import logging
import sys

# Conversion is host work: never grab an accelerator for it.
import os
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from exo2ego_jax.convert import CONVERTERS
from exo2ego_jax.errors import run_cli
from exo2ego_jax.paths import absolute


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m exo2ego_jax.convert",
                                     description="Convert a HF safetensors checkpoint into an exo2ego_jax Orbax checkpoint.")
    parser.add_argument("kind", choices=sorted(CONVERTERS), help="which model the checkpoint holds")
    parser.add_argument("--hf_dir", type=absolute, required=True, help="folder with config.json and *.safetensors")
    parser.add_argument("--out", type=absolute, required=True, help="new output folder (params/ + model_config.json)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                        help="storage dtype of the converted params (load_pretrained can cast again)")
    parser.add_argument("--no_scan", dest="scan_layers", action="store_false",
                        help="store one param set per layer (layers_0 ...) instead of stacked for nn.scan")
    parser.add_argument("--buffer_mb", type=float, default=1024.0,
                        help="host memory for batching writes; peak RAM is about this plus one stacked tensor")
    parser.add_argument("--mm_projector", type=absolute, default=None,
                        help="videollama2: a separate mm_projector file (.safetensors, or a torch .bin read weights-only)")
    parser.add_argument("--clip_dir", type=absolute, default=None,
                        help="videollama2: a CLIP checkpoint folder, when the VideoLLaMA2 folder has no tower")
    parser.add_argument("--mapper_width", type=int, default=256, help="videollama2: width (ngf) of the fresh F and G")
    parser.add_argument("--mapper_blocks", type=int, default=9, help="videollama2: residual blocks of F and G")
    parser.add_argument("--seed", type=int, default=0, help="videollama2: seed of the fresh F/G init")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    extra = {}
    if args.kind == "videollama2":
        extra = dict(mm_projector=args.mm_projector, clip_dir=args.clip_dir, mapper_width=args.mapper_width,
                     mapper_blocks=args.mapper_blocks, seed=args.seed)
    elif args.mm_projector or args.clip_dir:
        parser.error("--mm_projector and --clip_dir apply to the videollama2 kind only")
    summary = CONVERTERS[args.kind](args.hf_dir, args.out, dtype=args.dtype, scan_layers=args.scan_layers,
                                    buffer_mb=args.buffer_mb, **extra)
    print(f"wrote {args.out}: {summary['converted_tensors']} tensors converted, "
          f"{summary['skipped_tensors']} known-unused tensors skipped, tokenizer files: "
          f"{summary['tokenizer_files'] or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
