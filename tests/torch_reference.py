"""PyTorch reference builders for the parity tests and the quickstart notebook (need torch, timm and
transformers: the `test` extra).

`torch_stc` assembles VideoLLaMA2's STC connector from timm 1.0.3 RegStage exactly as its projector.py does;
`write_tiny_videollama2` writes a tiny random checkpoint in VideoLLaMA2's layout (CLIP tower + STC + Mistral
under its key names, its config.json), the input `convert videollama2` expects from the real 7B download.
Used by the parity tests and the quickstart notebook.
"""
from __future__ import annotations

import json
import os

from tests.helpers import TINY_CLIP, TINY_MISTRAL

FRAMES = 4  # frames per clip of the tiny VideoLLaMA2 checkpoint


def torch_stc(enc, hid, depth, padding):
    """VideoLLaMA2's STCConnector, assembled from timm 1.0.3 RegStage exactly as projector.py builds it."""
    import torch.nn as tnn
    from timm.layers import LayerNorm2d
    from timm.models.regnet import RegStage

    class STC(tnn.Module):
        def __init__(self):
            super().__init__()
            kw = dict(stride=1, dilation=1, act_layer=tnn.SiLU, norm_layer=LayerNorm2d)
            self.s1 = RegStage(depth=depth, in_chs=enc, out_chs=hid, **kw)
            self.sampler = tnn.Sequential(tnn.Conv3d(hid, hid, kernel_size=2, stride=2, padding=padding, bias=True),
                                          tnn.SiLU())
            self.s2 = RegStage(depth=depth, in_chs=hid, out_chs=hid, **kw)
            self.readout = tnn.Sequential(tnn.Linear(hid, hid), tnn.GELU(), tnn.Linear(hid, hid))

        def forward(self, x):  # [b, t, l, d] as VideoLLaMA2 receives it
            b, t, l, d = x.shape
            hw = int(l ** 0.5)
            x = x.reshape(b * t, hw, hw, d).permute(0, 3, 1, 2)          # (b t) d h w
            x = self.s1(x)
            x = x.reshape(b, t, hid, hw, hw).permute(0, 2, 1, 3, 4)      # b d t h w
            x = self.sampler(x)
            nt = x.shape[2]
            x = x.permute(0, 2, 1, 3, 4).reshape(b * nt, hid, x.shape[3], x.shape[4])
            x = self.s2(x)
            x = x.reshape(b, nt, hid, -1).permute(0, 1, 3, 2).reshape(b, -1, hid)  # b (t h w) d
            return self.readout(x)
    return STC()


def _perturb(module, seed: int, std: float):
    """HF inits norms to exactly 1/0; perturb every param so a swapped or untransposed weight shows."""
    import torch
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * std)
    return module


def write_tiny_videollama2(path: str, clip_config: dict, mistral_config: dict, *, num_frames: int, stc_depth: int = 4,
                           stc_padding: int = 1, seed: int = 0, with_projector: bool = True,
                           tower_folder: str | None = None):
    """-> (clip, stc, llm) torch modules, after writing them to `path` as a VideoLLaMA2 checkpoint.

    `tower_folder`: as VideoLLaMA2's training code leaves it for a local tower: the tower saved there on its own
    and named by `mm_vision_tower`, config.json without `vision_config`."""
    import torch
    import transformers
    from safetensors.torch import save_file
    torch.manual_seed(seed)
    clip = _perturb(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**clip_config)).eval(), seed + 1, 0.1)
    llm = _perturb(transformers.MistralForCausalLM(transformers.MistralConfig(**mistral_config)).eval(), seed + 2,
                   0.05)
    stc = _perturb(torch_stc(clip_config["hidden_size"], mistral_config["hidden_size"], stc_depth, stc_padding).eval(),
                   seed + 3, 0.05)
    tensors = {f"model.vision_tower.vision_tower.vision_model.{k}": v for k, v in clip.state_dict().items()}
    if with_projector:
        tensors.update({f"model.mm_projector.{k}": v for k, v in stc.state_dict().items()})
    tensors.update(llm.state_dict())
    os.makedirs(path, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(path, "model.safetensors"))
    config = {**llm.config.to_dict(), "model_type": "videollama2_mistral", "mm_projector_type": "stc_connector",
              "mm_hidden_size": clip_config["hidden_size"], "mm_vision_select_layer": -2, "num_frames": num_frames}
    if tower_folder:
        clip.save_pretrained(tower_folder)
        config["mm_vision_tower"] = tower_folder
    else:
        config["vision_config"] = clip.config.to_dict()
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, default=str)
    return clip, stc, llm


def build_videollama2(path, with_projector=True):
    """A tiny VideoLLaMA2-shaped checkpoint: CLIP tower + STC (timm) + Mistral, under VideoLLaMA2's key names."""
    return write_tiny_videollama2(path, TINY_CLIP, TINY_MISTRAL, num_frames=FRAMES, with_projector=with_projector)
