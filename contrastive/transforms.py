"""Decoding images for training and evaluation, and a faster equivalent of open_clip's transform tail.

Letters in names: C channels.
"""
from __future__ import annotations

import io
import math
from typing import Callable

import torch


def to_rgb(img, converted: list[str] | None = None):
    """RGB version of a PIL image: transparency is composited on white; each conversion is noted."""
    from PIL import Image

    note = converted.append if converted is not None else (lambda _: None)
    if img.mode == "RGB":
        return img
    if img.mode == "P":
        note("palette")
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode == "CMYK":
        note("cmyk")
    elif img.mode in ("L", "1", "I", "I;16", "I;16B", "I;16L", "F"):
        note("grayscale")
        if img.mode not in ("L", "1"):
            # 16-bit and float greys: scale to 8 bits rather than clip.
            import numpy as np

            arr = np.asarray(img, dtype=np.float64)
            top = arr.max() if arr.size and arr.max() > 255 else 255.0
            img = Image.fromarray(np.clip(arr * (255.0 / top), 0, 255).astype("uint8"), "L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        note("alpha")
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def decode_image(data: bytes, *, draft_side: int | None = None):
    """An RGB PIL image; a JPEG whose shorter side is at least 2 x `draft_side` is decoded at a reduced size
    (a power-of-two DCT scale that keeps the shorter side >= draft_side)."""
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    if draft_side and img.format == "JPEG":
        img.draft("RGB", (draft_side, draft_side))
    img.load()
    return to_rgb(img)


class ToNormalizedTensor:
    """ToTensor followed by Normalize in one pass over uint8 pixels: (x - 255 mean) / (255 std)."""

    def __init__(self, mean, std):
        self.mean_C11 = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1) * 255.0
        self.inv_std_C11 = 1.0 / (torch.tensor(std, dtype=torch.float32).view(-1, 1, 1) * 255.0)

    def __call__(self, pic) -> torch.Tensor:
        import numpy as np

        arr = np.asarray(pic)
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != self.mean_C11.shape[0]:
            from torchvision.transforms import functional as F

            return F.normalize(F.to_tensor(pic), (self.mean_C11 / 255.0).flatten().tolist(),
                               (1.0 / (self.inv_std_C11 * 255.0)).flatten().tolist())
        chw = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).float()
        return chw.sub_(self.mean_C11).mul_(self.inv_std_C11)


def fast_preprocess(preprocess: Callable) -> tuple[Callable, int | None]:
    """(transform, draft side) for an open_clip/torchvision Compose: the same transform with ToTensor +
    Normalize fused, and the smallest shorter side the first resize needs so that it never upsamples (used to
    decode JPEGs at reduced size); other callables are returned unchanged with no draft side."""
    from torchvision import transforms as T

    steps = list(getattr(preprocess, "transforms", []))
    if not isinstance(preprocess, T.Compose) or len(steps) < 2:
        return preprocess, None
    *head, to_tensor, normalize = steps
    if isinstance(normalize, T.Normalize) and type(to_tensor).__name__ in ("ToTensor", "MaybeToTensor"):
        transform = T.Compose(head + [ToNormalizedTensor(normalize.mean, normalize.std)])
    else:
        transform = preprocess
    first = steps[0]
    draft = None
    if isinstance(first, T.RandomResizedCrop):
        # The crop keeps >= scale[0] of the area at aspect >= min(ratio, 1/ratio); its shorter side is at least
        # sqrt(scale[0] * aspect) of the image's shorter side, and it is resized to max(size).
        aspect = min(first.ratio[0], 1.0 / first.ratio[1], 1.0)
        draft = math.ceil(max(first.size) / math.sqrt(first.scale[0] * aspect))
    elif isinstance(first, T.Resize):
        size = first.size
        draft = size if isinstance(size, int) else (size[0] if len(size) == 1 else max(size))
        if first.max_size is not None:
            draft = None
    return transform, draft
