"""The first GPU's check: measure what the estimates predict, in one run of about 8 minutes on one H100/H200.

  python launch/gpu_check.py --out DIR              # on the GPU machine (pip install -e '.[gpu,aot]')
  python launch/gpu_check.py --out DIR --size tiny  # the same path on a CPU at toy sizes (the tests run it)

Each part runs in its own process (a failure or an out-of-memory leaves the others standing, and each frees the
GPU when it ends), and each measurement is printed beside the per-kernel estimate of the same program
(exo2ego_jax/bench/estimate.py):

  stage3    the stage-3 step at the anchor's shape (2 clips x 16 frames; 256 text tokens + 3,042 visual tokens,
            about 3,300 per sequence, padded to the 4,096 length bucket): steps/s, clips/s, TFLOP/s, MFU, peak
            memory (launch/bench.py --only stage3);
  lora      Mistral-7B with LoRA r=128 alone at the same sequence (the part the PyTorch anchor also runs);
  cycle     launch/profile_cycle.py on a stage-2 step that fits one GPU (2 clips): the trace's time per part
            beside the estimate's;
  decode    generation at batch 1 (launch/bench.py --only decode_a) beside the decode program's estimate
            (launch/aot_compile.py --program decode, compiled for this GPU without running);
  torch     when torch, transformers and peft import: the PyTorch stack the paper used (transformers' Mistral,
            peft LoRA r=128 / alpha 256 / dropout 0.1 on q,k,v,o,gate,up,down, gradient checkpointing, AdamW) at
            the lora part's shape, in this process after the JAX parts.

Writes DIR/gpu_check.json (every part's record, with the commit and machine) and prints one table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from exo2ego_jax.paths import absolute
from exo2ego_jax.provenance import commit, machine

SIZES = {  # stage-3 text tokens, lora BATCHxSEQ, stage-2 preset, torch Mistral size
    "full": dict(preset="7b", text=256, lora="2x3297", target="h100", torch_config="7b"),
    "tiny": dict(preset="tiny", text=16, lora="2x96", target="cpu", torch_config="tiny"),
}
PARTS = ("stage3", "lora", "cycle", "decode", "torch")


def run_part(name: str, cmd: list[str], out: str, timeout: int, env=None) -> dict:
    """Run one part's command; its log goes to OUT/<name>.log."""
    started = time.time()
    with open(os.path.join(out, f"{name}.log"), "w") as log:
        try:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout,
                                  env={**os.environ, **(env or {})})
            status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
        except subprocess.TimeoutExpired:
            status = f"timed out after {timeout} s"
    return dict(status=status, wall_s=time.time() - started, log=os.path.join(out, f"{name}.log"))


def read_json(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def torch_lora_step(size: str, batch: int, seq: int, reps: int = 3) -> dict:
    """transformers + peft: Mistral with LoRA at `batch` x `seq`, the step VideoLLaMA2's stage-3 recipe runs for
    its LLM (bf16 on a GPU, float32 on a CPU), tokens/s over `reps` steps after one warm-up."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import MistralConfig, MistralForCausalLM

    from exo2ego_jax.models.sizes import MISTRAL_7B
    cuda = torch.cuda.is_available()
    if size == "7b":
        hf = MistralConfig(vocab_size=MISTRAL_7B["vocab_size"], hidden_size=MISTRAL_7B["hidden_size"],
                           intermediate_size=MISTRAL_7B["intermediate_size"],
                           num_hidden_layers=MISTRAL_7B["num_layers"], num_attention_heads=MISTRAL_7B["num_heads"],
                           num_key_value_heads=MISTRAL_7B["num_kv_heads"], rope_theta=MISTRAL_7B["rope_theta"],
                           max_position_embeddings=32768, sliding_window=None, attn_implementation="sdpa")
        rank = 128
    else:
        hf = MistralConfig(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=12, sliding_window=None,
                           attn_implementation="sdpa")
        rank = 4
    dtype = torch.bfloat16 if cuda else torch.float32
    device = "cuda" if cuda else "cpu"
    model = MistralForCausalLM(hf).to(device=device, dtype=dtype)
    model.gradient_checkpointing_enable()
    model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.1,
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-5)
    ids = torch.randint(3, hf.vocab_size, (batch, seq), device=device)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()

    step()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    times.sort()
    step_s = times[len(times) // 2]
    peak = torch.cuda.max_memory_allocated() / 1e9 if cuda else None
    return dict(part="torch_lora", step_s=step_s, tokens_per_s=batch * seq / step_s, peak_gb=peak,
                device=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python launch/gpu_check.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=absolute, required=True, help="folder for the JSON, logs and profile")
    p.add_argument("--size", choices=sorted(SIZES), default="full")
    p.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts of {PARTS}")
    p.add_argument("--part_timeout", type=int, default=300, help="seconds before a part is stopped")
    a = p.parse_args(argv)
    parts = a.only.split(",")
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        p.error(f"--only: unknown parts {unknown}; choose from {','.join(PARTS)}")
    size = SIZES[a.size]
    os.makedirs(a.out, exist_ok=True)
    py = sys.executable
    launch = os.path.join(ROOT, "launch")
    record: dict = dict(size=a.size, commit=commit(), machine=machine(), parts={})
    bench_json = os.path.join(a.out, "bench.jsonl")
    if os.path.exists(bench_json):
        os.remove(bench_json)

    def bench(name, only, extra=()):
        status = run_part(name, [py, os.path.join(launch, "bench.py"), "--size", "full" if a.size == "full" else "tiny",
                                 "--only", only, "--reps", "3", "--json", bench_json, *extra], a.out, a.part_timeout)
        rows = [r for r in read_jsonl(bench_json) if r["part"].startswith(only.split("_")[0])]
        return dict(status, measured=rows[-1] if rows else None)

    if "stage3" in parts:
        record["parts"]["stage3"] = bench("stage3", "stage3", ("--stage3_text", str(size["text"])))
    if "lora" in parts:
        record["parts"]["lora"] = bench("lora", "lora_b", ("--lora_shape", size["lora"]))
    if "cycle" in parts:
        trace = os.path.join(a.out, "profile_stage2")
        overrides = ["--config.batch_size=2", "--config.per_device_batch=0", "--config.microbatches=1",
                     "--config.mesh.shape=(1,1,1)", "--config.mesh.num_devices=1", "--config.init.checkpoint=",
                     "--config.init.from_workdir=", "--config.init.allow_random=true", "--config.data.source=toy",
                     "--config.data.num_examples=2"]
        status = run_part("cycle", [py, os.path.join(launch, "profile_cycle.py"), "--config",
                                    os.path.join(ROOT, "configs", "stage2.py") + f":{size['preset']}", *overrides,
                                    "--trace_dir", trace, "--steps", "3", "--warmup", "1"], a.out, a.part_timeout)
        summary = os.path.join(trace, "summary.json")
        record["parts"]["cycle"] = dict(status, measured=read_json(summary))
    if "decode" in parts:
        decode = bench("decode", "decode_a")
        estimate_json = os.path.join(a.out, "decode_estimate.json")
        target = size["target"] if a.size == "tiny" else _gpu_target()
        est = run_part("decode_estimate", [py, os.path.join(launch, "aot_compile.py"), "--config",
                                           os.path.join(ROOT, "configs", "stage3.py") + f":{size['preset']}",
                                           "--program", "decode", "--target", target, "--topology", "1x1x1",
                                           "--json", estimate_json], a.out, a.part_timeout)
        decode["estimate"] = read_json(estimate_json)
        decode["estimate_status"] = est
        record["parts"]["decode"] = decode
    if "torch" in parts:
        try:
            import peft  # noqa: F401
            import torch  # noqa: F401
            import transformers  # noqa: F401
        except ImportError as e:
            record["parts"]["torch"] = dict(status=f"skipped: {e}")
        else:
            b, s = (int(v) for v in size["lora"].split("x"))
            try:
                record["parts"]["torch"] = dict(status="ok", measured=torch_lora_step(size["torch_config"], b, s))
            except Exception as e:  # an out-of-memory here must not lose the JAX parts' record
                record["parts"]["torch"] = dict(status=f"failed: {type(e).__name__}: {str(e)[:300]}")
    with open(os.path.join(a.out, "gpu_check.json"), "w") as f:
        json.dump(record, f, indent=1, default=str)
    print_summary(record)
    failed = [k for k, v in record["parts"].items() if not str(v.get("status", "")).startswith(("ok", "skipped"))]
    if failed:
        print(f"error: parts {failed} did not finish; see their logs in {a.out}", file=sys.stderr)
        return 1
    return 0


def _gpu_target() -> str:
    """h100 or h200 by the first GPU's name (nvidia-smi), h100 when it cannot tell."""
    try:
        name = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "h100"
    return "h200" if "H200" in name else "h100"


def print_summary(record: dict) -> None:
    print(f"gpu_check ({record['size']}) at {record['commit']} on {record['machine']}")
    print("| part | status | measured | estimate | measured / estimate |")
    print("|---|---|---|---|---|")
    for label, v, cells in summary_rows(record["parts"]):
        if v is None:  # not among the parts run
            continue
        print(f"| {label} | {v['status']} | " + (" | ".join(cells) if cells else "- | - | -") + " |")


def summary_rows(parts: dict):
    """(label, part record, [measured, estimate, ratio] or None when the part has no figures) per part run."""
    def measured(name):
        return (parts.get(name) or {}).get("measured") or {}

    for name in ("stage3", "lora"):
        m = measured(name)
        cells = None
        if m.get("step_s") and m.get("est_step_s"):
            extra = f", {m['clips_per_s']:.2f} clips/s" if "clips_per_s" in m else ""
            mfu = f", MFU {100 * m['mfu']:.1f}%" if m.get("mfu") else ""
            cells = [f"{m['step_s']:.3f} s/step{extra}{mfu}, peak {m.get('peak_gb') or 0:.1f} GB",
                     f"{m['est_step_s']:.3f} s/step ({m['est_target']})", f"{m['step_s'] / m['est_step_s']:.2f}"]
        yield name, parts.get(name), cells
    m = measured("cycle")
    est = (m.get("estimate") or {}).get("step_s")
    yield "cycle", parts.get("cycle"), ([f"{m['step_time_s']:.3f} s/step", f"{est:.3f} s/step",
                                         f"{m['step_time_s'] / est:.2f}"] if m.get("step_time_s") and est else None)
    m, e = measured("decode"), (((parts.get("decode") or {}).get("estimate") or {}).get("estimate") or {})
    yield "decode B1", parts.get("decode"), (
        [f"{1e3 / m['ms_per_token']:.0f} tokens/s", f"{1 / e['step_s']:.0f} tokens/s",
         f"{m['ms_per_token'] / 1e3 / e['step_s']:.2f}"] if m.get("ms_per_token") and e.get("step_s") else None)
    m, jax_lora = measured("torch"), measured("lora")
    ratio = (f"JAX / PyTorch tokens/s {jax_lora['tokens_per_s'] / m['tokens_per_s']:.2f}"
             if m.get("tokens_per_s") and jax_lora.get("tokens_per_s") else "-")
    yield "torch LoRA", parts.get("torch"), ([f"{m['tokens_per_s']:.0f} tokens/s (PyTorch {m.get('torch')})", "-",
                                              ratio] if m.get("tokens_per_s") else None)


if __name__ == "__main__":
    sys.exit(main())
