"""CLIP frame preprocessing in uint8 (normalisation happens on the way to the device, `train.loop.to_model_batch`).

`crop`: CLIPImageProcessor (PIL): shortest side to `size`, bicubic, centre crop `size` x `size`.
`pad`:  VideoLLaMA2's `expand2square` first (centre on a square of the CLIP mean colour (122, 116, 104)).
"""
from __future__ import annotations

import numpy as np
from PIL import Image

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
CLIP_MEAN_RGB = (122, 116, 104)  # int(x * 255) of CLIP's mean, as VideoLLaMA2's expand2square uses
ASPECT_MODES = ("crop", "pad")


def expand_to_square(image: np.ndarray, fill=CLIP_MEAN_RGB) -> np.ndarray:
    h, w, _ = image.shape
    if h == w:
        return image
    side = max(h, w)
    canvas = np.empty((side, side, 3), np.uint8)
    canvas[...] = np.asarray(fill, np.uint8)
    top, left = (side - h) // 2, (side - w) // 2
    canvas[top:top + h, left:left + w] = image
    return canvas


def resize_shortest_side(image: np.ndarray, size: int) -> np.ndarray:
    h, w, _ = image.shape
    if min(h, w) == size:
        return image
    # transformers' get_resize_output_image_size(default_to_square=False): long side = int(size * long / short).
    if h <= w:
        new_h, new_w = size, int(size * w / h)
    else:
        new_h, new_w = int(size * h / w), size
    return np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BICUBIC), np.uint8)


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    h, w, _ = image.shape
    top, left = (h - size) // 2, (w - size) // 2
    if top < 0 or left < 0:
        raise ValueError(f"cannot crop {size}x{size} from a {h}x{w} frame; resize first")
    return image[top:top + size, left:left + size]


def clip_frames(frames: np.ndarray, size: int, mode: str = "crop") -> np.ndarray:
    """uint8 [T, H, W, 3] -> uint8 [T, size, size, 3] as CLIP (and VideoLLaMA2's pad mode) prepare them."""
    if mode not in ASPECT_MODES:
        raise ValueError(f"config field 'data.aspect': {mode!r} is not one of {ASPECT_MODES}")
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    out = np.empty((frames.shape[0], size, size, 3), np.uint8)
    for t, frame in enumerate(frames):
        if mode == "pad":
            frame = expand_to_square(frame)
        out[t] = center_crop(resize_shortest_side(frame, size), size)
    return out


def normalize(frames: np.ndarray, dtype=np.float32) -> np.ndarray:
    """uint8 [..., 3] -> CLIP-normalised pixels (rescale by 1/255, then mean/std)."""
    return ((frames.astype(np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD).astype(dtype)
