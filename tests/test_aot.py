"""Ahead-of-time compilation for pods this machine does not have: the tool on fake CPU devices and for an H100
topology (the `aot` extra's compiler), the HLO accounting, and the presets' batch split on 8-64 GPUs."""
import json
import os
import subprocess
import sys

import pytest

from exo2ego_jax.bench import hlo
from exo2ego_jax.bench.targets import TARGETS, Topology
from exo2ego_jax.errors import ConfigError
from exo2ego_jax.train.config import resolve_for_compile
from exo2ego_jax.train.hardware import Hardware
from tests.helpers import ROOT, stage_config

TOOL = os.path.join(ROOT, "launch", "aot_compile.py")


def compile_tool(tmp_path, *args, env=None):
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, TOOL, *args, "--json", str(out)], capture_output=True, text=True,
                          timeout=900, env={**os.environ, "XLA_FLAGS": "", **(env or {})})
    return proc, (json.loads(out.read_text()) if out.exists() else None)


def test_cpu_target_reports_memory_flops_and_collectives(tmp_path):
    proc, r = compile_tool(tmp_path, "--config", f"{ROOT}/configs/stage3.py:tiny", "--target", "cpu", "--topology",
                           "1x1x8", "--config.mesh.shape=(1,8,1)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert r["fits"] is True and r["devices"] == 8 and r["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    m = r["memory"]
    assert m["total"] == m["argument"] + m["output"] - m["alias"] + m["temp"] > 0
    # executed FLOPs include what the model does not need (XLA computes all of causal attention's scores)
    assert r["flops"]["executed"] >= r["flops"]["model"] > 0
    # FSDP over 8 devices: parameters are gathered, gradients reduced
    assert r["collectives"]["all-gather"]["count"] > 0 and r["collectives"]["all-gather"]["bytes"] > 0
    assert r["bound"]["step_s"] > 0 and r["bound"]["clips_per_s"] > 0
    assert "fits" in proc.stdout.lower() or "memory per device" in proc.stdout
    assert r["commit"] and r["machine"]  # every figure names the code and the machine that printed it


@pytest.mark.slow
def test_h100_topology_compiles_the_tiny_step(tmp_path):
    """The `aot` extra's CUDA plugin compiles for sm_90a without a GPU: cuBLAS gemms, cuDNN flash attention
    (CLIP's odd 17-token sequence included) and collectives across two hosts."""
    proc, r = compile_tool(tmp_path, "--config", f"{ROOT}/configs/stage3.py:tiny", "--target", "h100", "--topology",
                           "1x2x4", "--config.mesh.shape=(1,8,1)", "--config.model.attention_impl=cudnn",
                           "--config.model.llm.head_dim=16",  # cuDNN flash attention: a multiple of 8
                           "--config.compute_dtype=bfloat16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert r["target"]["name"] == "NVIDIA H100 80GB HBM3" and r["target"]["generation"] == "hopper"
    assert r["devices"] == 8
    calls = r["custom_calls"]
    assert calls.get("__cublas$lt$matmul", 0) > 0
    assert calls.get("__cudnn$fmhaSoftmax", 0) > 0 and calls.get("__cudnn$fmhaSoftmaxBackward", 0) > 0
    crossing = sum(v["cross_host_bytes"] for v in r["collectives"].values())
    assert crossing > 0  # FSDP over both hosts moves bytes across them
    assert r["flops"]["by_kind"].get("gemm", 0) > 0 and r["flops"]["by_kind"].get("attention", 0) > 0


@pytest.mark.parametrize("stage_file", ["stage0", "stage1", "stage2", "stage3"])
def test_7b_presets_split_their_batch_on_8_to_64_gpus(stage_file):
    """The paper's global batches stay; the per-device microbatch is the knob."""
    c = stage_config(stage_file, "7b")
    run = resolve_for_compile(c, Hardware("gpu"))
    for devices in (8, 16, 32, 64):
        micro = run.microbatches(devices)  # mesh (1, -1, 1): data x fsdp = all devices
        assert micro * c.per_device_batch * devices == c.batch_size, (devices, micro)


def test_impossible_splits_and_topologies_are_one_line_errors(tmp_path):
    run = resolve_for_compile(stage_config("stage3", "7b"), Hardware("gpu"))
    with pytest.raises(ConfigError, match=r"batch_size.*64.*per_device_batch 1 x 128"):
        run.microbatches(128)
    with pytest.raises(ValueError, match="use SxHxG"):
        Topology.parse("2x8")
    assert Topology.parse("1x2x8").num_devices == 16 and Topology.parse("1x2x8").num_hosts == 2
    proc, _ = compile_tool(tmp_path, "--config", f"{ROOT}/configs/stage3.py:7b", "--target", "cpu", "--topology",
                           "1x2x64")
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(lines) == 1 and "per_device_batch" in lines[0], proc.stderr[-2000:]


def test_hlo_accounting_on_a_hand_written_module():
    """FLOPs of gemm and flash-attention calls with loop trip counts; collectives with their group size."""
    text = """HloModule m
%body (p: (s32[], bf16[4,8])) -> (s32[], bf16[4,8]) {
  %p = (s32[], bf16[4,8]{1,0}) parameter(0)
  %x = bf16[4,8]{1,0} get-tuple-element(%p), index=1
  %w = bf16[8,8]{1,0} constant({...})
  %mm = (bf16[4,8]{1,0}, s8[16]{0}) custom-call(%x, %w), custom_call_target="__cublas$lt$matmul", """ \
        """backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"]}}}
  %ag = bf16[32,8]{1,0} all-gather(%x), replica_groups=[2,4]<=[8], dimensions={0}
  ROOT %t = (s32[], bf16[4,8]{1,0}) tuple(%i, %x)
}
%cond (q: (s32[], bf16[4,8])) -> pred[] {
  ROOT %c = pred[] constant(true)
}
ENTRY %main (a: bf16[4,8]) -> bf16[4,8] {
  %a = bf16[4,8]{1,0} parameter(0)
  %loop = (s32[], bf16[4,8]{1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"5"}}
  %ar = bf16[4,8]{1,0} all-reduce(%a), replica_groups={{0,1},{2,3},{4,5},{6,7}}, to_apply=%cond
  ROOT %r = bf16[4,8]{1,0} get-tuple-element(%loop), index=1
}
"""
    a = hlo.analyze(text, num_devices=8, host_of=lambda d: d // 4)
    assert a.flops == {"gemm": 5 * 2 * 4 * 8 * 8}
    assert a.collectives["all-gather"]["count"] == 5
    assert a.collectives["all-gather"]["bytes"] == pytest.approx(5 * 32 * 8 * 2 * 3 / 4)
    assert a.collectives["all-gather"]["cross_host_bytes"] == 0  # groups {0..3}, {4..7}: one host each
    assert a.collectives["all-reduce"]["bytes"] == pytest.approx(2 * 4 * 8 * 2 * 1 / 2)
    assert a.custom_calls == {"__cublas$lt$matmul": 1}
    assert TARGETS["h100"].gpu_target_config().count("sm_9.0a") == 1


def test_sweep_table_keeps_finished_entries_and_names_each_rows_commit(tmp_path, monkeypatch):
    """A rerun compiles nothing whose JSON exists; each row shows the commit its compile ran at."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("aot_sweep", os.path.join(ROOT, "launch", "aot_sweep.py"))
    sweep = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "aot_sweep", sweep)  # its dataclasses look their module up
    spec.loader.exec_module(sweep)
    gib = 2 ** 30

    def record(total_gib, commit=None):
        r = {"stage": "stage3", "per_device_batch": 1, "microbatches": 8, "fits": total_gib < 71.2,
             "memory": {"total": total_gib * gib}, "usable_bytes": 71.2 * gib, "headroom": 1 - total_gib / 71.2,
             "recompute_ratio": 1.16, "collectives": {"all-gather": {"count": 3, "bytes": 2e9},
                                                      "reduce-scatter": {"count": 1, "bytes": 1.5e9}},
             "bound": {"comm_s": 0.1, "compute_s": 1.9, "clips_per_s": 33.7}, "compile_s": 600.0}
        return dict(r, commit=commit) if commit else r

    (tmp_path / "s3_h100_1x1x8.json").write_text(json.dumps(record(50.0, "abc1234")))
    (tmp_path / "s3_pdb2.json").write_text(json.dumps(record(77.3)))  # written before JSONs named their commit
    assert sweep.main(["--out", str(tmp_path), "--only", "s3_h100_1x1x8,s3_pdb2"]) == 0
    table = (tmp_path / "table.md").read_text()
    preset_row = next(line for line in table.splitlines() if line.startswith("| s3_h100_1x1x8 |"))
    choice_row = next(line for line in table.splitlines() if line.startswith("| s3_pdb2 |"))
    assert "| 50.0 / 71.2 | 30% | 1.16 | 3.5 |" in preset_row and preset_row.endswith("| abc1234 |")
    assert "| -9% |" in choice_row and choice_row.endswith("| not recorded |")
    for line in table.splitlines():  # every row has as many cells as its header
        if line.startswith("| entry"):
            cells = line.count("|")
        elif line.startswith("| s3_"):
            assert line.count("|") == cells, line
    assert not list(tmp_path.glob("*.log"))  # nothing was compiled
    failed = sweep.row(next(e for e in sweep.ENTRIES if e.name == "s3_pdb2"), None)  # a compile that crashed
    assert "failed (see s3_pdb2.log)" in failed and failed.count("|") == table.splitlines()[-2].count("|")
