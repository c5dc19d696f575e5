"""CLI: python -m exo2ego_jax.export {peft,hf,videollama2} --checkpoint DIR --out OUT [--dtype bfloat16]
[--base_model NAME_OR_PATH]

DIR is any folder `load_pretrained` opens: a converted checkpoint or a stage's WORKDIR/export (stage 3 run with
--config.export.merge_lora=False keeps the adapters `peft` needs). OUT must not exist.
  peft         adapter_config.json + adapter_model.safetensors (+ non_lora_trainables.safetensors)
  hf           llm/ (MistralForCausalLM, LoRA merged), ego_encoder/ and exo_encoder/ (CLIPVisionModel)
  videollama2  a fusion-none model in the VideoLLaMA2 checkpoint layout (+ vision_tower/)
"""
from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # exporting is host work: never grab an accelerator for it

import argparse
import sys

from exo2ego_jax.errors import run_cli
from exo2ego_jax.export.exporters import EXPORTERS
from exo2ego_jax.export.safetensors_writer import DTYPES
from exo2ego_jax.paths import absolute


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m exo2ego_jax.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("format", choices=sorted(EXPORTERS))
    p.add_argument("--checkpoint", type=absolute, required=True, help="the exo2ego_jax checkpoint folder")
    p.add_argument("--out", type=absolute, required=True, help="a new folder for the export")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES), help="storage dtype of the tensors")
    p.add_argument("--base_model", default="", help="peft: base_model_name_or_path in adapter_config.json")
    return p


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    summary = EXPORTERS[a.format](a.checkpoint, a.out, dtype=a.dtype, base_model=a.base_model)
    print(f"wrote {a.out} ({summary['format']}: {', '.join(summary['parts'])})")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
