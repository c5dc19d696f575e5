"""Shared fixtures: tiny random HF models saved locally (no hub access), converted once per session."""
from __future__ import annotations

import os

from tests.xla_flags import cpu_devices

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# 8 fake CPU devices for the sharding tests (unsharded computations still run on device 0); cheap CPU codegen.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + cpu_devices(8)).strip()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One persistent compilation cache for the session and the processes it launches: identical tiny programs
# (the same stage config in several tests and subprocesses) compile once.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="exo2ego_jax_cache_")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import importlib.util
import inspect
import re

import numpy as np
import pytest

from tests.helpers import TINY_CLIP, TINY_MISTRAL

# The PyTorch references (torch, torchvision, timm, peft) install only where a CPU-usable wheel exists (the `test`
# extra on Python 3.11). On another line, a test that uses them, directly or through a fixture, is skipped with
# the reason (pytest counts the skips); everything else runs.
_USES_TORCH = re.compile(r"\btorch\b|\btimm\b|\bpeft\b|torch_reference|build_videollama2|write_tiny_videollama2|"
                         r"transformers\.(CLIP|Mistral|Llava)|make_hf_mistral|torch_seed|randomize_")


def _uses_torch(item) -> bool:
    funcs = [getattr(item, "function", None)]
    for name in getattr(item, "fixturenames", ()):
        funcs += [d.func for d in item._fixtureinfo.name2fixturedefs.get(name, ())]
    for func in funcs:
        try:
            if func is not None and _USES_TORCH.search(inspect.getsource(func)):
                return True
        except (OSError, TypeError):
            continue
    return False


def pytest_collection_modifyitems(config, items):
    if importlib.util.find_spec("torch") is not None:
        return
    skip = pytest.mark.skip(reason="uses the PyTorch references (torch, timm, peft), not installed on this Python")
    for item in items:
        if _uses_torch(item):
            item.add_marker(skip)


def torch_seed(seed: int):
    import torch
    torch.manual_seed(seed)
    return torch


def randomize_(model, seed: int, std: float = 0.1):
    """HF inits norms to exactly 1/0; perturb every param so a swapped or untransposed weight shows."""
    torch = torch_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * std)
    return model


def save_hf(model, path) -> str:
    model.save_pretrained(str(path), safe_serialization=True)
    return str(path)


@pytest.fixture(scope="session")
def hf_clip(tmp_path_factory):
    import transformers
    torch_seed(0)
    model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**TINY_CLIP)).eval()
    randomize_(model, 1)
    return model, save_hf(model, tmp_path_factory.mktemp("hf_clip"))


def make_hf_mistral(path, seed: int = 0, **overrides):
    import transformers
    torch_seed(seed)
    config = transformers.MistralConfig(**{**TINY_MISTRAL, **overrides})
    model = transformers.MistralForCausalLM(config).eval()
    randomize_(model, seed + 1, std=0.05)
    return model, save_hf(model, path)


@pytest.fixture(scope="session")
def hf_mistral(tmp_path_factory):
    return make_hf_mistral(tmp_path_factory.mktemp("hf_mistral"))


@pytest.fixture(scope="session")
def hf_mistral_window(tmp_path_factory):
    return make_hf_mistral(tmp_path_factory.mktemp("hf_mistral_sw"), seed=3, sliding_window=4)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def llm(hf_mistral, tmp_path_factory):
    """The tiny HF Mistral converted (float32, scanned) and loaded: `(module, params)`."""
    from exo2ego_jax.checkpoints import load_pretrained
    from exo2ego_jax.convert import convert_mistral
    path = str(tmp_path_factory.mktemp("mistral_converted"))
    convert_mistral(hf_mistral[1], path, dtype="float32", show_progress=False)
    return load_pretrained(path)
