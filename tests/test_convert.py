"""Conversion: sharded checkpoints, bounded host memory, CLI, and clear errors on bad input."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from exo2ego_jax.convert import CheckpointError, convert_clip, convert_mistral
from exo2ego_jax.convert.safetensors_reader import SafetensorsCheckpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_sharded_mistral(path, *, hidden, inter, layers, vocab, shards, dtype=np.float32, seed=0):
    """A Mistral-shaped HF checkpoint written with safetensors' numpy API, split over `shards` files."""
    from safetensors.numpy import save_file
    os.makedirs(path, exist_ok=True)
    heads, kv, hd = 4, 2, hidden // 4
    cfg = dict(model_type="mistral", vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
               num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv, head_dim=hd,
               rms_norm_eps=1e-5, rope_theta=1e6, hidden_act="silu", tie_word_embeddings=False)
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    rng = np.random.default_rng(seed)
    tensors = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
               "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors.update({p + "self_attn.q_proj.weight": (heads * hd, hidden),
                        p + "self_attn.k_proj.weight": (kv * hd, hidden),
                        p + "self_attn.v_proj.weight": (kv * hd, hidden),
                        p + "self_attn.o_proj.weight": (hidden, heads * hd),
                        p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
                        p + "mlp.down_proj.weight": (hidden, inter), p + "input_layernorm.weight": (hidden,),
                        p + "post_attention_layernorm.weight": (hidden,)})
    names = sorted(tensors)
    weight_map, total = {}, 0
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        chunk = {n: rng.standard_normal(tensors[n], dtype=np.float32).astype(dtype) for n in names[s::shards]}
        total += sum(a.nbytes for a in chunk.values())
        save_file(chunk, os.path.join(path, fname))
        weight_map.update(dict.fromkeys(chunk, fname))
        del chunk
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map},
              open(os.path.join(path, "model.safetensors.index.json"), "w"))
    return total


def test_sharded_checkpoint_converts_and_matches_tensors(tmp_path):
    src = tmp_path / "hf"
    write_sharded_mistral(str(src), hidden=32, inter=48, layers=2, vocab=50, shards=3)
    convert_mistral(str(src), str(tmp_path / "out"), dtype="float32", show_progress=False)
    import exo2ego_jax
    _, params = exo2ego_jax.load_pretrained(str(tmp_path / "out"))
    ckpt = SafetensorsCheckpoint(str(src))
    np.testing.assert_array_equal(params["decoder"]["layers"]["mlp"]["down_proj"]["kernel"][1],
                                  ckpt.read("model.layers.1.mlp.down_proj.weight").T)
    np.testing.assert_array_equal(params["lm_head"]["kernel"], ckpt.read("lm_head.weight").T)


def test_bfloat16_checkpoint_reads_without_torch(tmp_path):
    import ml_dtypes
    src = tmp_path / "hf"
    write_sharded_mistral(str(src), hidden=32, inter=48, layers=1, vocab=50, shards=2, dtype=ml_dtypes.bfloat16)
    convert_mistral(str(src), str(tmp_path / "out"), show_progress=False)  # default --dtype bfloat16
    import exo2ego_jax
    import jax.numpy as jnp
    _, params = exo2ego_jax.load_pretrained(str(tmp_path / "out"))
    assert params["norm"]["scale"].dtype == jnp.bfloat16
    _, params32 = exo2ego_jax.load_pretrained(str(tmp_path / "out"), dtype=jnp.float32)
    assert params32["norm"]["scale"].dtype == jnp.float32
    ref = SafetensorsCheckpoint(str(src)).read("model.norm.weight").astype(np.float32)
    np.testing.assert_array_equal(np.asarray(params32["norm"]["scale"]), ref)


PEAK_SCRIPT = r"""
import json, sys
from exo2ego_jax.convert import convert_mistral

def status(field):  # kB values from /proc/self/status
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(field + ":"))

src, out, warm_src, warm_out, scan = sys.argv[1:6]
# warm up every code path (imports, Orbax thread pools), then reset the peak-RSS counter (VmHWM)
convert_mistral(warm_src, warm_out, dtype="float32", scan_layers=scan == "1", buffer_mb=4, show_progress=False)
open("/proc/self/clear_refs", "w").write("5")
base = status("VmRSS")
convert_mistral(src, out, dtype="float32", scan_layers=scan == "1", buffer_mb=4, show_progress=False)
print(json.dumps({"base": base, "peak": status("VmHWM")}))
"""


@pytest.mark.parametrize("scan", [False, True])
def test_conversion_keeps_host_memory_near_one_tensor(tmp_path, scan):
    # 16 layers x ~14.5 MB (+16 MB of embeddings): ~250 MB in 4 shards. Unscanned, the largest tensor is 4 MB;
    # scanned, the largest stacked tensor is 16 x 4 MB = 64 MB.
    total = write_sharded_mistral(str(tmp_path / "hf"), hidden=512, inter=2048, layers=16, vocab=4096, shards=4)
    write_sharded_mistral(str(tmp_path / "warm"), hidden=32, inter=48, layers=2, vocab=50, shards=2)
    result = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, str(tmp_path / "hf"), str(tmp_path / "out"), str(tmp_path / "warm"),
         str(tmp_path / "warm_out"), "1" if scan else "0"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr[-3000:]
    mem = json.loads(result.stdout.strip().splitlines()[-1])
    growth = mem["peak"] - mem["base"]
    largest = (64 if scan else 4) * 2 ** 20
    assert total > 240 * 2 ** 20
    print(f"peak host-memory growth {growth / 2 ** 20:.0f} MiB for a {total / 2 ** 20:.0f} MiB checkpoint")
    # A whole-model load would need the full checkpoint size. Unscanned: per-layer tensors, the 4 MB write
    # buffer and fixed Orbax/allocator overhead. Scanned: one stacked tensor being filled plus Orbax's
    # write copies of it (documented in the README: --no_scan for the smallest footprint).
    if scan:
        assert growth < 4 * largest, (growth / 2 ** 20, total / 2 ** 20)
    else:
        assert growth < 64 * 2 ** 20 and growth < 0.25 * total, (growth / 2 ** 20, total / 2 ** 20)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "exo2ego_jax.convert", *args], capture_output=True, text=True,
                          timeout=300, cwd=REPO)


def test_cli_converts_and_reports(hf_clip, tmp_path):
    _, hf_dir = hf_clip
    result = run_cli("clip", "--hf_dir", hf_dir, "--out", str(tmp_path / "out"), "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    assert "tensors converted" in result.stdout
    meta = json.load(open(tmp_path / "out" / "model_config.json"))
    assert meta["kind"] == "clip" and meta["config"]["select_layer"] == -2 and meta["dtype"] == "float32"


def test_cli_unknown_kind(tmp_path):
    result = run_cli("llama", "--hf_dir", str(tmp_path), "--out", str(tmp_path / "o"))
    assert result.returncode == 2
    assert "invalid choice: 'llama'" in result.stderr and "clip" in result.stderr


def test_cli_empty_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_cli("mistral", "--hf_dir", str(tmp_path / "empty"), "--out", str(tmp_path / "o"))
    assert result.returncode == 2
    assert "config.json is missing" in result.stderr


def test_config_without_weights(tmp_path, hf_mistral):
    (tmp_path / "hf").mkdir()
    shutil.copy(os.path.join(hf_mistral[1], "config.json"), tmp_path / "hf")
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors files"):
        convert_mistral(str(tmp_path / "hf"), str(tmp_path / "o"), show_progress=False)


def _rewrite(src_dir, dst_dir, edit):
    """Copy a single-file HF checkpoint, letting `edit(dict)` change its tensors."""
    from safetensors.numpy import save_file
    shutil.copytree(src_dir, dst_dir)
    tensors = dict(SafetensorsCheckpoint(src_dir).items())
    edit(tensors)
    for f in os.listdir(dst_dir):
        if f.endswith(".safetensors") or f.endswith(".index.json"):
            os.remove(os.path.join(dst_dir, f))
    save_file(tensors, os.path.join(dst_dir, "model.safetensors"))


def test_missing_tensor_is_named(hf_mistral, tmp_path):
    _rewrite(hf_mistral[1], tmp_path / "hf", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"tensor 'model\.layers\.1\.mlp\.up_proj\.weight'.*missing"):
        convert_mistral(str(tmp_path / "hf"), str(tmp_path / "o"), show_progress=False)
    assert not (tmp_path / "o" / "params").exists()


def test_wrong_shape_is_named(hf_mistral, tmp_path):
    def edit(t):
        t["model.layers.0.self_attn.k_proj.weight"] = np.zeros((16, 64), np.float32)
    _rewrite(hf_mistral[1], tmp_path / "hf", edit)
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.self_attn\.k_proj\.weight' has shape \(16, 64\)"):
        convert_mistral(str(tmp_path / "hf"), str(tmp_path / "o"), show_progress=False)


def test_unexpected_tensor_is_named(hf_clip, tmp_path):
    def edit(t):
        t["encoder.layers.0.self_attn.extra_gate.weight"] = np.zeros((2,), np.float32)
    _rewrite(hf_clip[1], tmp_path / "hf", edit)
    with pytest.raises(CheckpointError, match=r"unexpected tensor.*extra_gate"):
        convert_clip(str(tmp_path / "hf"), str(tmp_path / "o"), show_progress=False)


def test_wrong_kind_is_detected(hf_clip, tmp_path):
    with pytest.raises(CheckpointError, match="not a Mistral config"):
        convert_mistral(hf_clip[1], str(tmp_path / "o"), show_progress=False)


def test_truncated_file_is_named(hf_clip, tmp_path):
    shutil.copytree(hf_clip[1], tmp_path / "hf")
    path = tmp_path / "hf" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:6])
    with pytest.raises(CheckpointError, match="model.safetensors is not a safetensors file"):
        convert_clip(str(tmp_path / "hf"), str(tmp_path / "o"), show_progress=False)


def test_existing_output_is_not_overwritten(hf_clip, tmp_path):
    convert_clip(hf_clip[1], str(tmp_path / "o"), show_progress=False)
    with pytest.raises(CheckpointError, match="already exists"):
        convert_clip(hf_clip[1], str(tmp_path / "o"), show_progress=False)


def test_transformers4_prefix_and_full_clip_model(hf_clip, tmp_path):
    """`vision_model.` prefix (transformers 4.x / full CLIPModel with a text tower) converts the same."""
    import exo2ego_jax
    def edit(t):
        for k in list(t):
            t["vision_model." + k] = t.pop(k)
        t["text_model.embeddings.token_embedding.weight"] = np.zeros((5, 4), np.float32)
        t["logit_scale"] = np.zeros((), np.float32)
    _rewrite(hf_clip[1], tmp_path / "hf", edit)
    convert_clip(str(tmp_path / "hf"), str(tmp_path / "a"), dtype="float32", show_progress=False)
    convert_clip(hf_clip[1], str(tmp_path / "b"), dtype="float32", show_progress=False)
    _, a = exo2ego_jax.load_pretrained(str(tmp_path / "a"))
    _, b = exo2ego_jax.load_pretrained(str(tmp_path / "b"))
    import jax
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


def test_load_pretrained_on_a_non_checkpoint(tmp_path):
    import exo2ego_jax
    with pytest.raises(CheckpointError, match="model_config.json is missing"):
        exo2ego_jax.load_pretrained(str(tmp_path))
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(CheckpointError, match="is a file, not a checkpoint folder"):
        exo2ego_jax.load_pretrained(str(tmp_path / "a_file"))


def test_tokenizer_files_are_copied(hf_clip, tmp_path):
    shutil.copytree(hf_clip[1], tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.json").write_text('{"version": "1.0"}')
    (tmp_path / "hf" / "tokenizer_config.json").write_text("{}")
    summary = convert_clip(str(tmp_path / "hf"), str(tmp_path / "out"), show_progress=False)
    assert summary["tokenizer_files"] == ["tokenizer.json", "tokenizer_config.json"]
    assert (tmp_path / "out" / "tokenizer.json").read_text() == '{"version": "1.0"}'
