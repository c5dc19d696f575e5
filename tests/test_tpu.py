"""Cloud TPU slices without a TPU: slice names and topologies, the hardware-dependent config choices, reading TPU
HLO (loop trip counts from conditions, matmuls written as dilated convolutions, reduce-scatter fusions, cross-slice
transfers, splash kernels), the compiler's out-of-memory refusal, and the tiny stage-3 step compiled for a v5p
slice with libtpu (skipped where the `tpu` extra is not installed)."""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from exo2ego_jax.bench import hlo
from exo2ego_jax.bench.aot import out_of_memory
from exo2ego_jax.bench.targets import TARGETS, parse_target, tpu_slice
from exo2ego_jax.errors import ConfigError
from exo2ego_jax.train.config import resolve_for_compile
from exo2ego_jax.train.hardware import Hardware, apply_hardware, tpu_generation
from tests.helpers import ROOT, stage_config

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU, reason="the `tpu` extra (libtpu) is not installed")
TOOL = os.path.join(ROOT, "launch", "aot_compile.py")


def test_slice_names_map_to_libtpu_topologies():
    cases = {"v5p-64": ("1x8x4", "v5:2x4x4", (False,) * 3), "v6e-64": ("1x16x4", "v6e:8x8", (False,) * 3),
             "v5e-256": ("1x64x4", "v5e:16x16", (True, True, False)), "v5e-8": ("1x1x8", "v5e:2x4", (False,) * 3),
             "v5p-128": ("1x16x4", "v5:4x4x4", (True, True, True)), "v4-8": ("1x1x4", "v4:2x2x1", (False,) * 3)}
    for name, (topology, libtpu_name, wrap) in cases.items():
        target, topo = parse_target(name, None)
        desc = tpu_slice(target, topo)
        assert (str(topo), desc["topology_name"], desc["wrap"]) == (topology, libtpu_name, wrap), name
    target, topo = parse_target("v5p-64", "2x8x4")  # two 32-chip slices
    assert tpu_slice(target, topo)["num_slices"] == 2 and topo.num_devices == 64
    with pytest.raises(ValueError, match="has 32 chips per slice but v5p-64 has 32|has 16 chips per slice"):
        parse_target("v5p-64", "1x4x4")
    with pytest.raises(ValueError, match="needs --topology"):
        parse_target("v6e", None)
    with pytest.raises(ValueError, match="v5p-64"):
        parse_target("tpu9", None)
    assert parse_target("h100", None)[1].num_devices == 8
    assert TARGETS["v5e"].hbm_bytes == int(15.75 * 2 ** 30) and TARGETS["v5p"].generation == "v5p"


def test_hardware_resolves_attention_and_preset_settings():
    c = stage_config("stage3", "7b")
    notes = apply_hardware(c, Hardware("tpu", "v5p"))
    assert c.model.attention_impl == "splash" and c.model.scan_layers is True
    assert any("attention_impl='splash'" in n for n in notes)
    c = stage_config("stage3", "7b")
    apply_hardware(c, Hardware("gpu"))
    assert c.model.attention_impl == "cudnn" and c.model.scan_layers is False
    c = stage_config("stage3", "7b")
    c.model.scan_layers = False
    apply_hardware(c, Hardware("tpu", "v5p"), explicit={"model.scan_layers"})  # the command line wins
    assert c.model.scan_layers is False
    c = stage_config("stage3", "7b")
    c.model.attention_impl = "cudnn"
    with pytest.raises(ConfigError, match=r"'cudnn' cannot run on tpu v6e.*attention_impl=auto"):
        resolve_for_compile(c, Hardware("tpu", "v6e"))
    c = stage_config("stage3", "7b")
    c.model.attention_impl = "splash"
    with pytest.raises(ConfigError, match="'splash' cannot run on gpu"):
        resolve_for_compile(c, Hardware("gpu"))
    assert [tpu_generation(k) for k in ("TPU v4", "TPU v5 lite", "TPU v5", "TPU v5p", "TPU v6 lite")] == \
        ["v4", "v5e", "v5p", "v5p", "v6e"]


TPU_MODULE = """HloModule m
%cond (c: (s32[], f32[8,16])) -> pred[] {
  %c = (s32[], f32[8,16]{1,0}) parameter(0)
  %i = s32[]{:T(128)} get-tuple-element(%c), index=0
  %n = s32[]{:T(128)} constant(6)
  ROOT %lt = pred[]{:T(512)} compare(%i, %n), direction=LT
}
%body (b: (s32[], f32[8,16])) -> (s32[], f32[8,16]) {
  %b = (s32[], f32[8,16]{1,0}) parameter(0)
  %x = f32[8,16]{1,0:T(8,128)} get-tuple-element(%b), index=1
  %w = f32[16,16]{1,0:T(8,128)} constant({...})
  %mm = f32[8,16]{1,0:T(8,128)} convolution(%x, %w), dim_labels=bf_io->bf
  %splash_mha_fwd_segmented_residuals.1 = (f32[2,4,256,16]{3,2,1,0}, f32[2,4,256,128]{3,2,1,0}) \
custom-call(%q, %k, %v), custom_call_target="tpu_custom_call", \
frontend_attributes={kernel_metadata={
"xprof_metadata":"{\\"block_q\\": 128, \\"block_kv\\": 128}"
}}, metadata={op_name="jit(step)/self_attn/splash_mask_causal/shard_map/pallas_call"}
  %i = s32[] get-tuple-element(%b), index=0
  ROOT %t = (s32[], f32[8,16]{1,0}) tuple(%i, %mm)
}
%all-reduce-scatter (input: bf16[64,32]) -> bf16[16,32] {
  %input = bf16[64,32]{1,0} parameter(0)
  %ar = bf16[64,32]{1,0} all-reduce(%input), replica_groups={{0,1,2,3}}, to_apply=%add
  ROOT %ds = bf16[16,32]{1,0} dynamic-slice(%ar, %o, %z), dynamic_slice_sizes={16,32}
}
ENTRY %main (a: f32[8,16], g: bf16[64,32]) -> f32[8,16] {
  %a = f32[8,16]{1,0} parameter(0)
  %g = bf16[64,32]{1,0} parameter(1)
  %q = f32[2,4,256,16]{3,2,1,0} parameter(2)
  %k = f32[2,2,256,16]{3,2,1,0} parameter(3)
  %v = f32[2,2,256,16]{3,2,1,0} parameter(4)
  %zero = s32[] constant(1)
  %init = (s32[], f32[8,16]{1,0}) tuple(%zero, %a)
  %loop = (s32[], f32[8,16]{1,0}) while(%init), condition=%cond, body=%body
  %rs = bf16[16,32]{1,0} fusion(%g), kind=kCustom, calls=%all-reduce-scatter
  %send = (bf16[16,32]{1,0}, u32[], token[]) send(%rs, %tok), channel_id=2, \
is_host_transfer=true, frontend_attributes={_xla_megascale_transfer_type="ALL_REDUCE"}
  ROOT %r = f32[8,16]{1,0} get-tuple-element(%loop), index=1
}
"""


def test_tpu_hlo_accounting_on_a_hand_written_module():
    module = hlo.parse_module(TPU_MODULE)
    loop = next(i for i in module.computations["main"] if i.opcode == "while")
    assert module.trip_count(loop) == 5  # i from 1 while i < 6: the condition's bound, no known_trip_count
    a = hlo.analyze(TPU_MODULE, num_devices=8, host_of=lambda d: d // 4, num_slices=2)
    assert a.flops["conv"] == 5 * 2 * 8 * 16 * 16
    # splash forward, causal over 2 x 2 blocks of 128: 3 blocks computed, 2 matmuls, 2 x 4 rows (batch x heads)
    assert a.flops["attention"] == 5 * 2 * 2.0 * (2 * 4) * (3 * 128 * 128) * 16
    assert a.collectives["reduce-scatter"] == {"count": 1, "bytes": 64 * 32 * 2 * 3 / 4, "cross_host_bytes": 0.0}
    dcn = a.collectives["all-reduce"]  # the megascale send: 2 (S-1)/S of the data, all of it over DCN
    assert dcn["bytes"] == dcn["cross_host_bytes"] == 16 * 32 * 2 * 2 * 1 / 2


def test_dilated_padded_convolutions_count_only_real_taps():
    """A brute-force count over every (output, tap) pair agrees with the closed form, padding and dilation
    included; a TPU-folded matmul counts as its matmul."""
    rng = np.random.default_rng(0)
    for _ in range(20):
        inputs, taps = int(rng.integers(1, 9)), int(rng.integers(1, 5))
        stride, lhs_d, rhs_d = (int(rng.integers(1, 4)) for _ in range(3))
        pad_low, pad_high = int(rng.integers(0, 4)), int(rng.integers(0, 4))
        span = (inputs - 1) * lhs_d + 1 + pad_low + pad_high - ((taps - 1) * rhs_d + 1)
        if span < 0:
            continue
        outputs = span // stride + 1
        brute = sum(1 for o in range(outputs) for k in range(taps)
                    if (p := o * stride + k * rhs_d - pad_low) >= 0 and p <= (inputs - 1) * lhs_d and p % lhs_d == 0)
        assert hlo._valid_taps(inputs, outputs, taps, stride, pad_low, lhs_d, rhs_d) == brute
    # [16, 64] x [64, 32] written as a 1-D convolution over the batch folded into a dilated window
    text = """HloModule m
ENTRY %e (x: f32[1,16,64], w: f32[16,64,32]) -> f32[16,1,32] {
  %x = f32[1,16,64]{2,1,0} parameter(0)
  %w = f32[16,64,32]{2,1,0} parameter(1)
  ROOT %c = f32[16,1,32]{2,1,0} convolution(%x, %w), window={size=16 stride=15 lhs_dilate=16}, dim_labels=b0f_0io->0bf
}
"""
    # 16 outputs x 16 taps, only the diagonal lands on real (undilated) inputs: 16 x 64 x 32 MACs
    assert hlo.analyze(text, num_devices=1).flops["conv"] == 2 * 16 * 64 * 32


def test_out_of_memory_refusals_become_figures():
    error = RuntimeError("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
                         "temporaries (28.00G) exceeds available HBM (15.75G).")
    oom = out_of_memory(error)
    assert oom["required_bytes"] == 28 * 2 ** 30 and oom["available_bytes"] == 15.75 * 2 ** 30
    assert out_of_memory(ValueError("shapes do not match")) is None


@needs_libtpu
@pytest.mark.slow
def test_tiny_stage3_compiles_for_a_v5p_slice_with_splash_attention(tmp_path):
    out = tmp_path / "tiny.json"
    proc = subprocess.run([sys.executable, TOOL, "--config", f"{ROOT}/configs/stage3.py:tiny", "--target", "v5p-8",
                           "--config.model.attention_impl=auto", "--json", str(out)],
                          capture_output=True, text=True, timeout=900, env={**os.environ, "XLA_FLAGS": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["target"]["generation"] == "v5p" and r["devices"] == 4 and r["fits"] is True
    assert r["attention"] == "splash" and r["custom_calls"].get("tpu_custom_call", 0) >= 6  # fwd, dq, dkv x 2
    assert r["flops"]["by_kind"]["attention"] > 0 and r["memory"]["total"] > 0


@needs_libtpu
@pytest.mark.slow
def test_tpu_flop_count_agrees_with_the_model_on_the_tiny_step(tmp_path):
    """The FLOPs read from the TPU module equal those of the same step compiled for CPU devices (plain dots and
    convolutions: no folding, no loop bounds to infer) within 1%, and sit 0-25% above the model's useful FLOPs:
    XLA attention computes every score, the masked half included, which the useful count leaves out."""
    def compiled(target, topology):
        out = tmp_path / f"{target}.json"
        proc = subprocess.run([sys.executable, TOOL, "--config", f"{ROOT}/configs/stage3.py:tiny", "--target", target,
                               "--topology", topology, "--json", str(out)],
                              capture_output=True, text=True, timeout=900, env={**os.environ, "XLA_FLAGS": ""})
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(out.read_text())["flops"]
    tpu, cpu = compiled("v5p", "1x1x4"), compiled("cpu", "1x1x4")
    assert tpu["executed"] == pytest.approx(cpu["executed"], rel=0.01), (tpu, cpu)
    assert 1.0 <= tpu["executed"] / tpu["model"] <= 1.25, tpu


@needs_libtpu
def test_tpu_meshes_follow_the_chips_and_put_slices_on_the_data_axis():
    import subprocess as sp
    code = """
import os
os.environ["JAX_PLATFORMS"] = "cpu"; os.environ["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"
from exo2ego_jax.bench.aot import target_devices
from exo2ego_jax.bench.targets import parse_target
from exo2ego_jax.sharding import create_mesh
target, topology = parse_target("v5p-8", "2x1x4")
devices = target_devices(target, topology)
mesh = create_mesh((1, -1, 1), devices)
slices = [[d.slice_index for d in row.flat] for row in mesh.devices]
print(dict(mesh.shape), slices)
assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}, mesh.shape
assert all(len(set(row)) == 1 for row in slices) and slices[0][0] != slices[1][0]
one = create_mesh((1, -1, 2), target_devices(target, parse_target("v5p-8", None)[1]))
assert dict(one.shape) == {"data": 1, "fsdp": 2, "tensor": 2}
"""
    proc = sp.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                  env={**os.environ, "XLA_FLAGS": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("stage_file", ["stage0", "stage1", "stage2", "stage3"])
def test_7b_presets_split_their_batch_on_the_tpu_slices(stage_file):
    """The paper's global batches stay on v5p-64, v6e-64 and v5e-256 (tensor-parallel v5e/v6e: 4 chips a row)."""
    for generation, chips in (("v5p", 32), ("v6e", 64), ("v5e", 256), ("v5e", 8)):
        c = stage_config(stage_file, "7b")
        run = resolve_for_compile(c, Hardware("tpu", generation))
        data_parallel = chips // c.mesh.shape[2]
        micro = run.microbatches(data_parallel)
        assert micro * c.per_device_batch * data_parallel == c.batch_size, (generation, chips)
        assert run.model.llm.attention_impl == "splash" and run.model.clip.attention_impl == "splash"
        assert c.model.scan_layers is True


@needs_libtpu
def test_cudnn_on_a_tpu_target_is_refused_at_start_up():
    proc = subprocess.run([sys.executable, TOOL, "--config", f"{ROOT}/configs/stage3.py:7b", "--target", "v5p-64",
                           "--config.model.attention_impl=cudnn"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "XLA_FLAGS": ""})
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    assert "'cudnn' cannot run on tpu v5p" in errors[0] and "attention_impl=auto" in errors[0]
