"""Full-size shape arithmetic without compute: parameter counts of the released backbones."""
import importlib.util
import os

import pytest

from exo2ego_jax.errors import ConfigError
from exo2ego_jax.models import registry
from exo2ego_jax.models.clip import CLIPVisionConfig
from exo2ego_jax.models.mistral import MistralConfig
from exo2ego_jax.models.sizes import CLIP_L14_336, MISTRAL_7B

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "models.py")


def load_presets():
    spec = importlib.util.spec_from_file_location("model_presets", CONFIGS)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def count(kind, cfg):
    shapes = registry.flat_shapes(registry.abstract_params(kind, registry.build_module(kind, cfg)))
    return sum(int(s.size) for s in shapes.values())


def test_clip_l14_336_parameter_count():
    cfg = CLIPVisionConfig(**CLIP_L14_336, select_layer=24)
    # all 24 layers (no post_layernorm): the 303.5M of the reference minus post_layernorm's 2048
    assert abs(count("clip", cfg) - 303.5e6) < 0.1e6
    selected = CLIPVisionConfig(**load_presets().get_config("7b").clip.to_dict())
    assert selected.num_built_layers == 23
    one_layer = 4 * (1024 * 1024 + 1024) + 2 * 2 * 1024 + (1024 * 4096 + 4096) + (4096 * 1024 + 1024)
    assert count("clip", cfg) - count("clip", selected) == one_layer  # layer 24 is not built


def test_mistral_7b_parameter_count():
    assert count("mistral", MistralConfig(**load_presets().get_config("7b").llm.to_dict())) == 7_241_732_096
    assert count("mistral", MistralConfig(**MISTRAL_7B)) == 7_241_732_096


def test_unknown_preset_is_named():
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        load_presets().get_config("huge")
