"""The per-kernel estimate of a compiled program: a hand-written module whose FLOPs, bytes and overlap are known,
the attribution of a tiny stage-2 step to every part, the serving programs, profile_cycle without a device, and
the first-GPU script end to end at tiny sizes on the CPU."""
import json
import os
import subprocess
import sys

import pytest

from exo2ego_jax.bench import estimate
from exo2ego_jax.bench.targets import TARGETS
from tests.helpers import ROOT
from tests.xla_flags import cpu_devices

TOOL = os.path.join(ROOT, "launch", "aot_compile.py")

GPU_MODULE = """HloModule m, is_scheduled=true
%fused_slice (p0: bf16[32,64,64], p1: s32[]) -> bf16[64,64] {
  %p0 = bf16[32,64,64]{2,1,0} parameter(0)
  %p1 = s32[] parameter(1)
  %z = s32[] constant(0)
  %ds = bf16[1,64,64]{2,1,0} dynamic-slice(%p0, %p1, %z, %z), dynamic_slice_sizes={1,64,64}
  ROOT %r = bf16[64,64]{1,0} bitcast(%ds)
}
%fused_update (q0: bf16[1024,64], q1: bf16[8,64], q2: s32[]) -> bf16[1024,64] {
  %q0 = bf16[1024,64]{1,0} parameter(0)
  %q1 = bf16[8,64]{1,0} parameter(1)
  %q2 = s32[] parameter(2)
  %z = s32[] constant(0)
  ROOT %dus = bf16[1024,64]{1,0} dynamic-update-slice(%q0, %q1, %q2, %z)
}
ENTRY %main (w: bf16[32,64,64], x: bf16[128,64], cache: bf16[1024,64], row: bf16[8,64], i: s32[]) -> bf16[128,64] {
  %w = bf16[32,64,64]{2,1,0} parameter(0)
  %x = bf16[128,64]{1,0} parameter(1)
  %cache = bf16[1024,64]{1,0} parameter(2)
  %row = bf16[8,64]{1,0} parameter(3)
  %i = s32[] parameter(4)
  %ag = (bf16[128,64]{1,0}, bf16[1024,64]{1,0}) all-gather-start(%x), replica_groups=[1,8]<=[8], dimensions={0}, \
metadata={op_name="jit(step)/llm/all-gather"}
  %layer = bf16[64,64]{1,0} fusion(%w, %i), kind=kLoop, calls=%fused_slice, metadata={op_name="jit(step)/llm/layers/slice"}
  %mm = (bf16[128,64]{1,0}, s8[1024]{0}) custom-call(%x, %layer), custom_call_target="__cublas$lt$matmul", \
metadata={op_name="jit(step)/transpose(jvp(llm))/llm/q_proj/dot_general"}, \
backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"]}}}
  %agd = bf16[1024,64]{1,0} all-gather-done(%ag)
  %up = bf16[1024,64]{1,0} fusion(%cache, %row, %i), kind=kLoop, calls=%fused_update, \
metadata={op_name="jit(step)/optimizer/update"}
  ROOT %out = bf16[128,64]{1,0} get-tuple-element(%mm), index=0
}
"""


def test_per_kernel_estimate_on_a_hand_written_module():
    target = TARGETS["h100"]
    kernels = []
    e = estimate.estimate(GPU_MODULE, target, num_devices=8, useful_flops=2 * 128 * 64 * 64, kernels_out=kernels)
    by_name = {k.name: k for k in kernels}
    assert set(by_name) == {"ag", "layer", "mm", "up"}
    # the sliced operand reads one layer, not the 32 stacked: 64 x 64 bf16 in, 64 x 64 out
    assert by_name["layer"].bytes == 2 * 64 * 64 * 2 + 4  # and the s32 index
    # in place: the update read and written once, not the 1024-row buffer
    assert by_name["up"].bytes == 8 * 64 * 2 * 2 + 4
    gemm = by_name["mm"]
    assert gemm.flops == 2 * 128 * 64 * 64 and gemm.bytes == (128 * 64 + 64 * 64 + 128 * 64) * 2  # no workspace
    hbm = target.hbm_bytes_per_s * estimate.EFFICIENCY["memory"]
    launch = estimate.LAUNCH_S["cuda"]
    assert gemm.seconds == pytest.approx(max(gemm.flops / (target.peak_flops * 0.8), gemm.bytes / hbm) + launch)
    # the all-gather sends 7/8 of the gathered 1024 x 64; the two kernels scheduled before its done hide part
    ag = by_name["ag"]
    assert ag.bytes == pytest.approx(1024 * 64 * 2 * 7 / 8)
    assert ag.seconds == pytest.approx(ag.bytes / target.intra_host_bytes_per_s)
    covered = by_name["layer"].seconds + gemm.seconds
    assert ag.exposed == pytest.approx(max(0.0, ag.seconds - covered))
    compute = sum(k.seconds for k in kernels if k.kind != "collective")
    assert e["step_s"] == pytest.approx(max(compute + ag.exposed, ag.seconds))
    assert e["by_part"]["llm"]["flops"] == gemm.flops and e["by_part"]["optimizer"]["est_s"] > 0
    assert e["by_part"]["llm"]["by_phase"]["backward"] == pytest.approx(gemm.seconds)
    assert 0 < e["mfu"] <= 1


def compile_tool(tmp_path, *args):
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, TOOL, *args, "--json", str(out)], capture_output=True, text=True,
                          timeout=900, env={**os.environ, "XLA_FLAGS": ""})
    return proc, (json.loads(out.read_text()) if out.exists() else None)


def test_tiny_stage2_step_is_attributed_to_every_part(tmp_path):
    proc, r = compile_tool(tmp_path, "--config", f"{ROOT}/configs/stage2.py:tiny", "--target", "cpu", "--topology",
                           "1x1x2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    e = r["estimate"]
    assert e["step_s"] >= r["bound"]["step_s"] > 0 and 0 < e["mfu"] <= 1
    for part in ("ego_encoder", "exo_encoder", "mapper_f", "mapper_g", "losses", "connector", "llm", "optimizer"):
        assert e["by_part"][part]["est_s"] > 0 and e["by_part"][part]["bytes"] > 0, part
    for part in ("ego_encoder", "mapper_f", "mapper_g", "llm"):  # trained or back-propagated through
        assert e["by_part"][part]["by_phase"].get("backward", 0) > 0, part
    assert e["by_part"]["exo_encoder"]["by_phase"].get("backward", 0) == 0  # frozen, nothing upstream trains
    assert "per-kernel estimate" in proc.stdout and "mapper G" in proc.stdout


@pytest.mark.parametrize("program", ["prefill", "decode", "score"])
def test_serving_programs_compile_with_their_figures(tmp_path, program):
    proc, r = compile_tool(tmp_path, "--config", f"{ROOT}/configs/stage3.py:tiny", "--target", "cpu", "--topology",
                           "1x1x1", "--program", program, "--batch", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert r["program"] == program and r["fits"] and r["batch"] == 2
    assert (r["kv_cache_bytes"] > 0) == (program != "score") and r["weight_bytes"] > 0 and r["memory"]["total"] > 0
    assert r["estimate"]["step_s"] > 0 and r["estimate"]["tokens_per_s"] > 0 and r["flops"]["model"] > 0
    assert r["estimate"]["by_part"]["llm"]["est_s"] > 0
    if program == "decode":
        w = r["weight_read_bound"]
        assert w["tokens_per_s"] == pytest.approx(2 / (r["weight_bytes"] / TARGETS["cpu"].hbm_bytes_per_s))
        assert 0 < w["estimate_share"] <= 1  # reading the weights is part of the step
    else:
        assert r["estimate"]["by_part"]["ego_encoder"]["est_s"] > 0  # the clip is encoded


def test_profile_cycle_without_a_device_prints_the_parts(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "profile_cycle.py"), "--config",
                           f"{ROOT}/configs/stage2.py:tiny", "--target", "cpu", "--topology", "1x1x2", "--trace_dir",
                           str(tmp_path)], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "XLA_FLAGS": cpu_devices(1)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    for label in ("CLIP ego encoder", "mapper F", "mapper G", "cycle/KL/VTG losses", "LLM"):
        assert label in proc.stdout
    r = json.loads((tmp_path / "estimate.json").read_text())
    assert r["estimate"]["by_part"]["losses"]["est_s"] > 0
    assert (tmp_path / "hlo" / "stage2_step.after_optimizations.hlo.txt").stat().st_size > 0


@pytest.mark.slow
def test_gpu_check_runs_end_to_end_at_tiny_sizes(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "gpu_check.py"), "--out", str(tmp_path),
                           "--size", "tiny"], capture_output=True, text=True, timeout=1500,
                          env={**os.environ, "XLA_FLAGS": cpu_devices(1)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    r = json.loads((tmp_path / "gpu_check.json").read_text())
    parts = r["parts"]
    assert parts["stage3"]["measured"]["est_step_s"] > 0 and parts["stage3"]["measured"]["clips_per_s"] > 0
    assert parts["cycle"]["measured"]["estimate"]["by_part"]["mapper_f"]["est_s"] > 0
    assert parts["decode"]["measured"]["ms_per_token"] > 0 and parts["decode"]["estimate"]["estimate"]["step_s"] > 0
    assert parts["torch"]["status"] in ("ok",) or parts["torch"]["status"].startswith("skipped")
    assert r["commit"] and r["machine"] and "| decode B1 | ok |" in proc.stdout
