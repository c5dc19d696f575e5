"""The README's main command at a smoke scale: every stage, both models, the held-out questions, the outputs."""
import os
import re
import subprocess
import sys

import pytest
from tests.xla_flags import cpu_devices

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    env = {**os.environ, "XLA_FLAGS": cpu_devices(1), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, os.path.join(REPO, "launch", "demo.py"), "--workdir", str(tmp_path),
                           "--scale", "0.001"], capture_output=True, text=True, env=env, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = open(tmp_path / "results.md").read()
    assert "n = 300 held-out four-option questions" in results
    rows = re.findall(r"\| (Exo2Ego \(init, 1, 2, 3\)|VideoLLaMA2 baseline \(init, captioning, 3\)) \| ([\d.]+)% \| "
                      r"\[([\d.]+), ([\d.]+)\] \|", results)
    assert len(rows) == 2
    for _, acc, lo, hi in rows:
        assert 0 <= float(lo) <= float(acc) <= float(hi) <= 100
    assert re.search(r"Exo2Ego - baseline: [+-][\d.]+ points, 95% CI \[[+-][\d.]+, [+-][\d.]+\]", results)
    # the F(x) probe after stage 2, with n and its interval, and the probe table for every stage
    assert re.search(r"Linear probe of the action on F\(x\) after stage 2: [\d.]+% \[[\d.]+, [\d.]+\] \(n = 300;",
                     results)
    assert re.search(r"\| full \| stage2 \| [\d.]+ \[", results) and re.search(r"\| baseline \| stage3 \| ", results)
    for run in ("init", "stage1", "stage2", "stage3", "baseline captioning", "baseline stage3"):
        assert re.search(rf"\| {run} \| \d+ \|", results), run
    for job in ("init", "stage1", "stage2_full", "stage3_full", "caption_baseline", "stage3_baseline"):
        assert os.path.exists(tmp_path / "runs" / "seed0" / job / "export" / "model_config.json"), job
    assert "- model: \"" in results and "- truth: \"" in results and "Commit " in results
    for png in ("losses.png", "losses_stage3_vs_baseline.png"):
        assert open(tmp_path / png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
