"""Backbone presets as ml_collections configs: `configs/models.py:<7b|tiny>` gives the `model.clip` / `model.llm`
sections the stage configs (configs/base.py) use for that preset."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import base

import ml_collections


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    model = base.model_config(base.check_preset(arg, "models"))
    return ml_collections.ConfigDict(dict(clip=model.clip, llm=model.llm))
