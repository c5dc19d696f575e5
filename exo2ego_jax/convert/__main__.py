"""CLI: python -m exo2ego_jax.convert {clip,mistral} --hf_dir SRC --out DST [--dtype bfloat16|float32]."""
from __future__ import annotations

import argparse
import logging
import sys

# Conversion is host work: never grab an accelerator for it.
import os
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from exo2ego_jax.convert import CONVERTERS, CheckpointError  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m exo2ego_jax.convert",
                                     description="Convert a HF safetensors checkpoint into an exo2ego_jax Orbax checkpoint.")
    parser.add_argument("kind", choices=sorted(CONVERTERS), help="which model the checkpoint holds")
    parser.add_argument("--hf_dir", required=True, help="folder with config.json and *.safetensors")
    parser.add_argument("--out", required=True, help="new output folder (params/ + model_config.json)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                        help="storage dtype of the converted params (load_pretrained can cast again)")
    parser.add_argument("--no_scan", dest="scan_layers", action="store_false",
                        help="store one param set per layer (layers_0 ...) instead of stacked for nn.scan")
    parser.add_argument("--buffer_mb", type=float, default=1024.0,
                        help="host memory for batching writes; peak RAM is about this plus one stacked tensor")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        summary = CONVERTERS[args.kind](args.hf_dir, args.out, dtype=args.dtype, scan_layers=args.scan_layers,
                                        buffer_mb=args.buffer_mb)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {summary['converted_tensors']} tensors converted, "
          f"{summary['skipped_tensors']} known-unused tensors skipped, tokenizer files: "
          f"{summary['tokenizer_files'] or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
