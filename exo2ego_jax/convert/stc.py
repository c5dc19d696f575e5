"""VideoLLaMA2 `mm_projector` (STC connector) -> `STCConnector` params: a renaming plus layout changes."""
from __future__ import annotations

import numpy as np

from exo2ego_jax.convert.engine import CONV, LINEAR, TensorRule
from exo2ego_jax.errors import CheckpointError
from exo2ego_jax.models.params import unflatten


def stc_rules(config) -> list[TensorRule]:
    """Rules for an `STCConfig`; targets relative to the connector, sources relative to `mm_projector.`."""
    rules = []
    for stage, in_ch in (("s1", config.encoder_hidden_size), ("s2", config.hidden_size)):
        for j in range(1, config.depth + 1):
            block_in = in_ch if j == 1 else config.hidden_size
            b = f"{stage}.b{j}."
            t = f"{stage}/b{j}/"
            convs = ["conv1", "conv2", "conv3"] + (["downsample"] if block_in != config.hidden_size else [])
            for conv in convs:
                rules += [TensorRule(f"{t}{conv}/conv/kernel", f"{b}{conv}.conv.weight", CONV),
                          TensorRule(f"{t}{conv}/bn/scale", f"{b}{conv}.bn.weight"),
                          TensorRule(f"{t}{conv}/bn/bias", f"{b}{conv}.bn.bias")]
            for fc in ("fc1", "fc2"):
                rules += [TensorRule(f"{t}se/{fc}/kernel", f"{b}se.{fc}.weight", CONV),
                          TensorRule(f"{t}se/{fc}/bias", f"{b}se.{fc}.bias")]
    rules += [TensorRule("sampler/kernel", "sampler.0.weight", CONV), TensorRule("sampler/bias", "sampler.0.bias"),
              TensorRule("readout_0/kernel", "readout.0.weight", LINEAR), TensorRule("readout_0/bias", "readout.0.bias"),
              TensorRule("readout_2/kernel", "readout.2.weight", LINEAR), TensorRule("readout_2/bias", "readout.2.bias")]
    return rules


def params_from_state_dict(state: dict, rules, *, prefix: str = "") -> dict:
    """Apply `rules` to an in-memory {name: array} dict (no layer stacking); returns a nested param dict.

    Used for small modules (a separate `mm_projector` file, or a PyTorch reference in the tests). Missing
    and unexpected names raise, exactly as in the streaming engine.
    """
    flat, used = {}, set()
    for rule in rules:
        key = prefix + rule.source
        if key not in state:
            raise CheckpointError(f"tensor {key!r} (for param {rule.target!r}) is missing")
        flat[rule.target] = np.ascontiguousarray(rule.layout.apply(np.asarray(state[key])))
        used.add(key)
    extra = sorted(k for k in state if k.startswith(prefix) and k not in used)
    if extra:
        raise CheckpointError(f"unexpected tensor(s) {extra[:5]} in the projector weights")
    return unflatten(flat)
