"""Weights out: PEFT, transformers and VideoLLaMA2 exports load in the real packages and compute what the JAX
model computes (float32); the VideoLLaMA2 round trip is bit-identical; the tower from `mm_vision_tower`; bad
input; the chat template's ids."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from exo2ego_jax.checkpoints import load_pretrained, write_checkpoint
from exo2ego_jax.convert import convert_videollama2
from exo2ego_jax.data import template
from exo2ego_jax.data.tokenizer import train_tokenizer
from exo2ego_jax.errors import CheckpointError
from exo2ego_jax.export.exporters import export_hf, export_peft, export_videollama2
from exo2ego_jax.models.lora import LoRAConfig
from exo2ego_jax.models.params import flatten, unflatten
from tests.helpers import ROOT, TINY_CLIP, TINY_MISTRAL
from tests.torch_reference import FRAMES, write_tiny_videollama2

MAPPER = dict(mapper_width=4, mapper_blocks=2)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    texts = ["C picks up the red cup", "What does the camera wearer do?", template.SYSTEM_PROMPT] * 20
    folder = str(tmp_path_factory.mktemp("tok"))
    train_tokenizer(texts + ["[INST] <<SYS>>\n", "\n<</SYS>>\n\n", " [/INST] ", " </s>"] * 20, folder,
                    vocab_size=TINY_MISTRAL["vocab_size"])
    return folder


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tokenizer_dir):
    """A tiny VideoLLaMA2 download and its conversion (float32, scanned layers) with a tokenizer."""
    src = str(tmp_path_factory.mktemp("vl2"))
    refs = write_tiny_videollama2(src, TINY_CLIP, TINY_MISTRAL, num_frames=FRAMES)
    for name in os.listdir(tokenizer_dir):
        with open(os.path.join(tokenizer_dir, name), "rb") as f, open(os.path.join(src, name), "wb") as g:
            g.write(f.read())
    out = str(tmp_path_factory.mktemp("conv") / "ckpt")
    convert_videollama2(src, out, dtype="float32", show_progress=False, **MAPPER)
    return refs, src, out


@pytest.fixture(scope="module")
def tuned(converted, tmp_path_factory):
    """A fine-tuned stand-in: adapters on every projection with non-zero B, fusion tokens (F in use)."""
    _, _, path = converted
    module, params = load_pretrained(path, llm={"lora": LoRAConfig(rank=4, alpha=8.0, dropout=0.1)})
    key = jax.random.key(3)
    flat = {}
    for p, v in sorted(flatten(params).items()):
        key, sub = jax.random.split(key)
        flat[p] = jax.random.normal(sub, v.shape) * 0.05 if p.endswith("lora_b") else v
    out = str(tmp_path_factory.mktemp("tuned") / "ckpt")
    cfg = module.config.to_dict()
    cfg["fusion"] = "tokens"
    write_checkpoint(out, unflatten(flat), kind="exo2ego", config=cfg, dtype="float32")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if os.path.exists(os.path.join(path, name)):
            with open(os.path.join(path, name), "rb") as f, open(os.path.join(out, name), "wb") as g:
                g.write(f.read())
    return out


def jax_llm_logits(checkpoint, ids):
    module, params = load_pretrained(checkpoint)
    logits = module.apply({"params": params}, jnp.asarray(ids), method=lambda m, i: m.llm(i))
    return np.asarray(logits)


IDS = np.random.default_rng(0).integers(3, TINY_MISTRAL["vocab_size"], size=(2, 11))


def test_hf_export_loads_in_transformers_with_the_same_logits_and_features(tuned, tmp_path):
    import torch
    import transformers
    out = str(tmp_path / "hf")
    export_hf(tuned, out, dtype="float32")
    llm = transformers.MistralForCausalLM.from_pretrained(os.path.join(out, "llm")).eval()
    with torch.no_grad():
        theirs = llm(torch.from_numpy(IDS)).logits.numpy()
    np.testing.assert_allclose(theirs, jax_llm_logits(tuned, IDS), atol=1e-4)  # LoRA merged, no adapters left

    module, params = load_pretrained(tuned)
    pixels = np.random.default_rng(1).normal(size=(3, 16, 16, 3)).astype(np.float32)
    for view in ("ego", "exo"):
        tower = transformers.CLIPVisionModel.from_pretrained(os.path.join(out, f"{view}_encoder")).eval()
        with torch.no_grad():
            feats = tower(torch.from_numpy(pixels.transpose(0, 3, 1, 2))).last_hidden_state[:, 1:].numpy()
        ours = module.apply({"params": params}, jnp.asarray(pixels)[None], view=view, method="encode")
        np.testing.assert_allclose(feats, np.asarray(ours)[0], atol=1e-4)
    cfg = json.loads(open(os.path.join(out, "ego_encoder", "config.json")).read())
    assert cfg["num_hidden_layers"] == TINY_CLIP["num_hidden_layers"] - 1  # the layers up to mm_vision_select_layer


def test_bfloat16_hf_export_is_the_default_and_rounds_each_tensor_once(tuned, tmp_path):
    from safetensors.torch import load_file as load_torch  # numpy cannot hold bf16
    out = str(tmp_path / "hf16")
    subprocess.run([sys.executable, "-m", "exo2ego_jax.export", "hf", "--checkpoint", tuned, "--out", out],
                   check=True, capture_output=True, cwd=ROOT)
    tensors = load_torch(os.path.join(out, "llm", "model.safetensors"))
    w = tensors["model.layers.0.mlp.down_proj.weight"]
    assert str(w.dtype) == "torch.bfloat16"
    import ml_dtypes
    _, params = load_pretrained(tuned)
    f = flatten(params["llm"])
    down = "decoder/layers/mlp/down_proj/"
    merged = (np.asarray(f[down + "kernel"][0])
              + np.asarray(f[down + "lora_a"][0]) @ np.asarray(f[down + "lora_b"][0]) * 2.0)  # alpha / r = 8 / 4
    np.testing.assert_array_equal(w.float().numpy(), merged.T.astype(ml_dtypes.bfloat16).astype(np.float32))


def test_peft_export_loads_in_peft_with_the_same_logits(converted, tuned, tmp_path):
    import peft
    import torch
    import transformers
    base = str(tmp_path / "base")
    export_hf(converted[2], base, dtype="float32")  # the LLM the adapters were trained on
    out = str(tmp_path / "peft")
    export_peft(tuned, out, dtype="float32", base_model=os.path.join(base, "llm"))
    cfg = json.loads(open(os.path.join(out, "adapter_config.json")).read())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8.0 and cfg["lora_dropout"] == 0.1
    assert cfg["task_type"] == "CAUSAL_LM" and len(cfg["target_modules"]) == 7
    model = peft.PeftModel.from_pretrained(
        transformers.MistralForCausalLM.from_pretrained(cfg["base_model_name_or_path"]), out).eval()
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(float(p.abs().max()) > 0 for p in lora_b)  # the adapters arrived, not a fresh init
    with torch.no_grad():
        theirs = model(torch.from_numpy(IDS)).logits.numpy()
    np.testing.assert_allclose(theirs, jax_llm_logits(tuned, IDS), atol=1e-4)
    # the other trained parts under VideoLLaMA2's names
    from safetensors.numpy import load_file
    others = load_file(os.path.join(out, "non_lora_trainables.safetensors"))
    assert "base_model.model.model.mm_projector.readout.0.weight" in others
    assert "base_model.model.model.vision_tower.vision_tower.vision_model.embeddings.patch_embedding.weight" in others
    assert any(k.startswith("base_model.model.model.mapper_f.") for k in others)
    assert os.path.exists(os.path.join(out, "chat_template.jinja"))


def test_videollama2_round_trip_is_bit_identical(converted, tmp_path):
    _, _, first = converted
    out = str(tmp_path / "vl2")
    export_videollama2(first, out, dtype="float32")
    cfg = json.loads(open(os.path.join(out, "config.json")).read())
    assert cfg["model_type"] == "videollama2_mistral" and "vision_config" not in cfg
    assert cfg["mm_vision_tower"] == os.path.join(out, "vision_tower")  # the tower's folder, found by its pointer
    again = str(tmp_path / "again")
    convert_videollama2(out, again, dtype="float32", show_progress=False, **MAPPER)
    _, a = load_pretrained(first)
    _, b = load_pretrained(again)
    fa, fb = flatten(a), flatten(b)
    assert sorted(fa) == sorted(fb)
    for p in fa:
        np.testing.assert_array_equal(np.asarray(fa[p]), np.asarray(fb[p]), err_msg=p)


def test_tower_from_mm_vision_tower_folder(tmp_path):
    """VideoLLaMA2's training code records a local tower's path; its config.json gives the tower's shape."""
    src, tower = str(tmp_path / "vl2"), str(tmp_path / "my_clip")
    (clip, _, _) = write_tiny_videollama2(src, TINY_CLIP, TINY_MISTRAL, num_frames=FRAMES, tower_folder=tower)
    out = str(tmp_path / "jax")
    convert_videollama2(src, out, dtype="float32", show_progress=False, **MAPPER)
    module, params = load_pretrained(out)
    assert module.config.clip.hidden_size == TINY_CLIP["hidden_size"]
    import torch
    pixels = np.random.default_rng(2).normal(size=(2, 16, 16, 3)).astype(np.float32)
    with torch.no_grad():
        ref = clip(torch.from_numpy(pixels.transpose(0, 3, 1, 2)), output_hidden_states=True).hidden_states[-2][:, 1:]
    ours = module.apply({"params": params}, jnp.asarray(pixels)[None], view="ego", method="encode")
    np.testing.assert_allclose(np.asarray(ours)[0], ref.numpy(), atol=1e-4)

    # a tower folder that does not match the checkpoint's tensors is named
    wrong = str(tmp_path / "wrong_clip")
    os.makedirs(wrong)
    with open(os.path.join(tower, "config.json")) as f:
        cfg = json.load(f)
    cfg["intermediate_size"] = 2 * cfg["intermediate_size"]
    with open(os.path.join(wrong, "config.json"), "w") as f:
        json.dump(cfg, f)
    with open(os.path.join(src, "config.json")) as f:
        top = json.load(f)
    top["mm_vision_tower"] = wrong
    with open(os.path.join(src, "config.json"), "w") as f:
        json.dump(top, f)
    with pytest.raises(CheckpointError, match=r"fc1.*shape"):
        convert_videollama2(src, str(tmp_path / "bad"), dtype="float32", show_progress=False, **MAPPER)


def test_bad_exports_are_one_line_errors(converted, tuned, tmp_path):
    _, _, plain = converted
    with pytest.raises(CheckpointError, match="no LoRA adapters.*merge_lora=False"):
        export_peft(plain, str(tmp_path / "p"))
    with pytest.raises(CheckpointError, match="fusion 'tokens'.*no place for F"):
        export_videollama2(tuned, str(tmp_path / "v"))
    os.makedirs(tmp_path / "taken")
    proc = subprocess.run([sys.executable, "-m", "exo2ego_jax.export", "hf", "--checkpoint", plain, "--out",
                           str(tmp_path / "taken")], capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(lines) == 1 and "already exists" in lines[0], proc.stderr[-2000:]
    assert not os.path.exists(tmp_path / "p") and not os.path.exists(tmp_path / "v")  # nothing half-written


def test_chat_template_reproduces_the_training_ids(tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer
    folder = str(tmp_path / "tok")
    os.makedirs(folder)
    for name in os.listdir(tokenizer_dir):
        with open(os.path.join(tokenizer_dir, name), "rb") as f, open(os.path.join(folder, name), "wb") as g:
            g.write(f.read())
    template.write_chat_template(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    messages = [{"role": "user", "content": "What does the camera wearer do?"},
                {"role": "assistant", "content": "C picks up the red cup"},
                {"role": "user", "content": "And then?"}]
    pairs = [("What does the camera wearer do?", "C picks up the red cup"), ("And then?", "")]
    text, _ = template.render(pairs, generation_prompt=True)
    assert tok.apply_chat_template(messages, tokenize=False) == tok.bos_token + " " + text
    ids = tok.apply_chat_template(messages, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert list(ids) == [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
    # a training conversation: the template's ids are tokenize_conversation's
    conv = [{"from": "human", "value": "What does the camera wearer do?"},
            {"from": "gpt", "value": "C picks up the red cup"}]
    trained = template.tokenize_conversation(tok, conv)
    ids = tok.apply_chat_template([{"role": "user", "content": "<video>\nWhat does the camera wearer do?"},
                                   {"role": "assistant", "content": "C picks up the red cup"}], tokenize=False)
    pieces = ids.split("<video>")
    head = tok(pieces[0], add_special_tokens=False)["input_ids"]
    tail = tok(pieces[1], add_special_tokens=False)["input_ids"]
    assert list(trained.input_ids) == head + [-201] + tail
