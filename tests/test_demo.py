"""The README's main command at a smoke scale: every stage, both models, the question and the outputs."""
import pytest
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, os.path.join(REPO, "launch", "demo.py"), "--workdir", str(tmp_path),
                           "--scale", "0.001"], capture_output=True, text=True, env=env, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = open(tmp_path / "results.md").read()
    rows = re.findall(r"\| (Exo2Ego \(init, 1, 2, 3\)|VideoLLaMA2 baseline \(init, 3\)) \| ([\d.]+)% \| ([\d.]+)%",
                      results)
    assert len(rows) == 2 and all(0 <= float(a) <= 100 and 0 <= float(b) <= 100 for _, a, b in rows)
    for run in ("stage0", "stage1", "stage2", "stage3", "baseline_stage3"):
        assert f"| {run} | 4 |" in results  # --scale 0.001 -> the 4-step minimum per stage
        assert os.path.exists(tmp_path / run / "export" / "model_config.json")
    assert "- model: \"" in results and "- truth: \"" in results
    for png in ("losses.png", "losses_stage3_vs_baseline.png"):
        assert open(tmp_path / png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
