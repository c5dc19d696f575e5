"""launch/profile_cycle.py at tiny size on CPU: HLO of the one module, cost/memory JSON, a trace, and a table
whose parts sum to the step."""
import functools
import importlib.util
import glob
import json
import os

import pytest

from tests.helpers import ROOT, stage_config


@functools.cache  # the tool defines absl flags at import: load it once
def load_tool():
    spec = importlib.util.spec_from_file_location("profile_cycle", os.path.join(ROOT, "launch", "profile_cycle.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_profile_cycle_tiny(tmp_path, capsys):
    tool = load_tool()
    c = stage_config("stage2", **{"mesh.shape": (1, 1, 1), "mesh.num_devices": 1})
    summary = tool.profile(c, str(tmp_path), steps=2, warmup=1, top=5)
    hlo = open(tmp_path / "hlo" / "stage2_step.after_optimizations.hlo.txt").read()
    assert hlo.count("HloModule ") == 1 and "jit_step" in hlo.split("\n")[0]
    assert os.path.getsize(tmp_path / "hlo" / "stage2_step.stablehlo.mlir") > 0
    cost = json.load(open(tmp_path / "cost_analysis.json"))
    assert cost["flops"] > 0 and cost["bytes accessed"] > 0
    memory = json.load(open(tmp_path / "memory_analysis.json"))
    assert memory["argument_size_in_bytes"] > 0
    assert glob.glob(str(tmp_path / "plugins" / "profile" / "*" / "*.xplane.pb"))
    parts = {r["component"]: r["seconds"] for r in summary["components"]}
    assert sum(parts.values()) == pytest.approx(summary["step_time_s"], rel=1e-9)
    for name in ("CLIP ego encoder", "CLIP exo encoder", "mapper F", "mapper G", "STC connector", "LLM"):
        assert parts[name] > 0, name
    assert summary["top_ops"] and all(o["seconds"] > 0 for o in summary["top_ops"])
    out = capsys.readouterr().out
    assert "ms/step" in out and "mapper F" in out and "TFLOP/s" in out


def test_profile_cycle_rejects_other_stages(tmp_path):
    with pytest.raises(ValueError, match="profiles the stage-2 step"):
        load_tool().profile(stage_config("stage3"), str(tmp_path), steps=1, warmup=0, top=1)


@pytest.mark.slow
def test_bench_tiny_writes_plausible_rows(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_tool", os.path.join(ROOT, "launch", "bench.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.jsonl"
    bench.main(["--size", "tiny", "--reps", "1", "--only", "stage3,lora_a,decode_a", "--json", str(out)])
    rows = {r["part"]: r for r in map(json.loads, open(out))}
    assert set(rows) == {"stage3", "lora_B2_S64", "decode_B1"}
    stage3 = rows["stage3"]
    assert stage3["useful_tflops"] > 0 and stage3["xla_tflops"] > 0 and stage3["clips_per_s"] > 0
    # tokens per step = clips x (text - 1 + x and F(x) tokens); tiny: 4 frames on an 8x8 grid -> 3x5x5 = 75 each
    assert stage3["tokens_per_s"] * stage3["step_s"] == pytest.approx(2 * (16 - 1 + 2 * 75), rel=1e-6)
    assert rows["lora_B2_S64"]["tokens_per_s"] * rows["lora_B2_S64"]["step_s"] == pytest.approx(128)
    assert rows["decode_B1"]["new_tokens_per_s"] > 0 and rows["decode_B1"]["ms_per_token"] > 0
    assert "| stage3 |" in capsys.readouterr().out
