"""Decoding images for training and evaluation, and a faster equivalent of open_clip's transforms.

Letters in names: C channels.
"""
from __future__ import annotations

import functools
import io
import math
import warnings
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
            if not np.isfinite(arr).all():  # float images (TIFF) can hold NaN or inf: no pixel value to give them
                raise ValueError(f"image with non-finite pixel values ({img.mode}, {img.size[0]}x{img.size[1]})")
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
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_on_device": {}}  # DataLoader workers get the CPU constants only

    def constants_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(255 mean, 1 / (255 std)) as (C, 1, 1) float32 on `device`, copied there once: a copy from pageable
        host memory each batch would make the host wait for the device."""
        device = torch.device(device)
        if device not in self._on_device:
            self._on_device[device] = self.mean_C11.to(device), self.inv_std_C11.to(device)
        return self._on_device[device]

    def normalize_into(self, pixels_CHW: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 (C, H, W) pixels, any memory layout -> normalised float32 (C, H, W), written into `out`."""
        out = torch.empty(pixels_CHW.shape, dtype=torch.float32) if out is None else out
        return out.copy_(pixels_CHW).sub_(self.mean_C11).mul_(self.inv_std_C11)

    def normalize_batch(self, pixels_BCHW: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) batch in any memory layout, on any device -> the contiguous float32 batch
        normalize_into gives, bit for bit. Extra channels past C (the padding of RGBX pixels) are dropped."""
        mean, inv_std = self.constants_on(pixels_BCHW.device)
        pixels_BCHW = pixels_BCHW[:, :mean.shape[0]]
        return pixels_BCHW.to(torch.float32, memory_format=torch.contiguous_format).sub_(mean).mul_(inv_std)

    def __call__(self, pic) -> torch.Tensor:
        import numpy as np

        arr = np.asarray(pic)
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != self.mean_C11.shape[0]:
            from torchvision.transforms import functional as F

            return F.normalize(F.to_tensor(pic), (self.mean_C11 / 255.0).flatten().tolist(),
                               (1.0 / (self.inv_std_C11 * 255.0)).flatten().tolist())
        return self.normalize_into(torch.from_numpy(np.array(arr)).permute(2, 0, 1))


def _fuse_tail(preprocess: Callable) -> tuple[list, ToNormalizedTensor | None]:
    """(the steps before ToTensor + Normalize, their fused replacement) of a torchvision Compose."""
    from torchvision import transforms as T

    steps = list(getattr(preprocess, "transforms", []))
    if not isinstance(preprocess, T.Compose) or len(steps) < 2:
        return steps, None
    *head, to_tensor, normalize = steps
    if isinstance(normalize, T.Normalize) and type(to_tensor).__name__ in ("ToTensor", "MaybeToTensor"):
        return head, ToNormalizedTensor(normalize.mean, normalize.std)
    return steps, None


class DecodeThen:
    """Decode image bytes to RGB (optionally at reduced JPEG size), then apply a PIL transform."""

    def __init__(self, transform: Callable, draft_side: int | None = None):
        self.transform, self.draft_side = transform, draft_side

    def __call__(self, data: bytes, out: torch.Tensor | None = None) -> torch.Tensor:
        image = self.transform(decode_image(data, draft_side=self.draft_side))
        return image if out is None else out.copy_(image)


@functools.lru_cache(maxsize=16)
def _log_ratio(ratio: tuple[float, float]) -> tuple[float, float]:
    """get_params's float32 log of the ratio bounds (as the doubles its uniform_ call receives)."""
    return tuple(torch.log(torch.tensor(ratio)).tolist())


def random_resized_crop_params(*, height: int, width: int, scale: tuple[float, float],
                               ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """(top, left, crop_h, crop_w) exactly as torchvision's RandomResizedCrop.get_params draws them.

    The same values from the same draws of torch's default generator, which is left in the same state, at
    a tenth of the cost: get_params spends ~35 us of tiny torch ops per try and needs ~5 tries on a square
    image with open_clip's (0.9, 1.0) scale. Here the ten tries' uniforms are drawn in two vectorised calls
    from a saved generator state (once with the scale bounds, once with the log-ratio bounds: the same raw
    numbers, transformed by torch's own kernel, so every value is bit-identical), then the state is rewound
    and advanced past exactly the draws get_params consumes before its two randint calls, made as it makes them.
    """
    generator = torch.default_generator
    log_ratio = _log_ratio(tuple(ratio))
    start = generator.get_state()
    scales = torch.empty(20).uniform_(scale[0], scale[1])[0::2].tolist()
    generator.set_state(start)
    aspects = torch.exp(torch.empty(20).uniform_(log_ratio[0], log_ratio[1])[1::2]).tolist()
    area = height * width
    for attempt in range(10):
        target_area = area * scales[attempt]
        w = int(round(math.sqrt(target_area * aspects[attempt])))
        h = int(round(math.sqrt(target_area / aspects[attempt])))
        if 0 < w <= width and 0 < h <= height:
            generator.set_state(start)
            torch.empty(2 * attempt + 2).uniform_()  # the tries get_params made, one draw per uniform
            i = torch.randint(0, height - h + 1, size=(1,)).item()
            j = torch.randint(0, width - w + 1, size=(1,)).item()
            return i, j, h, w
    # Ten failed tries consumed the twenty draws made above: the generator is where get_params leaves it.
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def rgbx_pixels(img) -> torch.Tensor:
    """(1, 4, H, W) uint8 channels-last view of an RGB PIL image's pixels, the 4th channel padding.

    PIL keeps RGB pixels 4 bytes apart; copying them out as RGBX is a plain copy (RGB would repack every
    pixel), and torch's uint8 resampling kernels work on 4 channels (3 would be widened to 4 and back)."""
    import numpy as np

    width, height = img.size
    pixels_HWC = np.frombuffer(img.tobytes("raw", "RGBX"), dtype=np.uint8).reshape(height, width, 4)
    with warnings.catch_warnings():  # read-only pixels: nothing writes to them (resampling makes a new tensor)
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(pixels_HWC).permute(2, 0, 1).unsqueeze(0)


class FastTransform:
    """open_clip's RandomResizedCrop (+ RandomHorizontalFlip) or Resize (+ CenterCrop), then ToTensor + Normalize,
    run on uint8 pixels.

    The geometry and the random draws are torchvision's own (random_resized_crop_params reproduces get_params
    on the stored image's size, from the same torch generator), so a seed gives the same crop. The resampling
    runs in torch's channels-last uint8 antialiased kernels, which follow PIL's to within a grey level at a
    fraction of the cost, and a JPEG is decoded at the largest DCT reduction (1/2, 1/4, 1/8) that still
    leaves the crop at least as many pixels as the output: never an upsampled draft.
    """

    def __init__(self, *, kind: str, size_hw: tuple[int, int], mode: str, normalize: ToNormalizedTensor,
                 scale=(1.0, 1.0), ratio=(1.0, 1.0), resize: int | tuple[int, int] | None = None,
                 crop_hw: tuple[int, int] | None = None, uint8: bool = False, hflip: float = 0.0):
        self.kind, self.size_hw, self.mode, self.normalize = kind, size_hw, mode, normalize
        self.scale, self.ratio, self.resize, self.crop_hw = tuple(scale), tuple(ratio), resize, crop_hw
        self.uint8, self.hflip = uint8, hflip

    def as_uint8(self) -> "FastTransform":
        """The same transform stopping before Normalize: uint8 pixels as resampled, RGBX in channels-last
        memory ((4, H, W) with strides (1, 4W, 4): copied into a batch as they lie, where packing them into
        planes costs as much as the resampling), a third of the float batch's bytes;
        `self.normalize.normalize_batch` gives the float batch on the training device."""
        return FastTransform(kind=self.kind, size_hw=self.size_hw, mode=self.mode, normalize=self.normalize,
                             scale=self.scale, ratio=self.ratio, resize=self.resize, crop_hw=self.crop_hw,
                             uint8=True, hflip=self.hflip)

    @classmethod
    def from_compose(cls, preprocess: Callable) -> "FastTransform | None":
        """The fast equivalent of an open_clip train/val Compose, or None for any other transform."""
        from torchvision import transforms as T

        head, normalize = _fuse_tail(preprocess)
        head = [t for t in head if type(t).__name__ != "MaybeConvertMode"]  # pixels are RGB already
        if normalize is None or not head:
            return None
        first = head[0]
        mode = {T.InterpolationMode.BICUBIC: "bicubic", T.InterpolationMode.BILINEAR: "bilinear"}.get(
            getattr(first, "interpolation", None))
        if mode is None or getattr(first, "antialias", True) is False:
            return None
        flip = head[1] if len(head) == 2 and isinstance(head[1], T.RandomHorizontalFlip) else None
        if isinstance(first, T.RandomResizedCrop) and (len(head) == 1 or flip is not None):
            return cls(kind="crop", size_hw=tuple(first.size), mode=mode, normalize=normalize,
                       scale=tuple(first.scale), ratio=tuple(first.ratio), hflip=flip.p if flip else 0.0)
        if isinstance(first, T.Resize) and first.max_size is None:
            size = first.size if isinstance(first.size, int) else tuple(first.size)
            if isinstance(size, tuple) and len(size) == 1:
                size = size[0]
            if len(head) == 1 and isinstance(size, tuple):
                return cls(kind="resize", size_hw=size, mode=mode, normalize=normalize, resize=size)
            if len(head) == 2 and isinstance(head[1], T.CenterCrop) and isinstance(size, int):
                crop_hw = tuple(head[1].size) if len(head[1].size) == 2 else (head[1].size[0],) * 2
                if max(crop_hw) <= size:
                    return cls(kind="resize", size_hw=crop_hw, mode=mode, normalize=normalize, resize=size,
                               crop_hw=crop_hw)
        return None

    def draw(self, *, height: int, width: int) -> tuple[tuple[int, int, int, int], bool]:
        """A training sample's random draws for an image of the given stored size: ((top, left, crop_h, crop_w),
        flipped), from torch's default generator in RandomResizedCrop's then RandomHorizontalFlip's order (the
        flip only when hflip > 0: nothing is drawn after it, so a draw left out changes no other)."""
        box = random_resized_crop_params(height=height, width=width, scale=self.scale, ratio=self.ratio)
        return box, bool(self.hflip) and bool(torch.rand(1) < self.hflip)

    def _resized_hw(self, height: int, width: int) -> tuple[int, int]:
        """torchvision's Resize output size: an int sets the shorter side (the longer one truncated)."""
        if isinstance(self.resize, tuple):
            return self.resize
        if height <= width:
            return self.resize, int(self.resize * width / height)
        return int(self.resize * height / width), self.resize

    def __call__(self, data: bytes, out: torch.Tensor | None = None) -> torch.Tensor:
        import torch.nn.functional as F
        from PIL import Image

        img = Image.open(io.BytesIO(data))
        width, height = img.size
        if self.kind == "crop":
            (top, left, crop_h, crop_w), flip = self.draw(height=height, width=width)
            room = min(crop_h / self.size_hw[0], crop_w / self.size_hw[1])
        else:
            resized_hw = self._resized_hw(height, width)
            room = min(height / resized_hw[0], width / resized_hw[1])
        reduction = next((k for k in (8, 4, 2) if k <= room), 1)
        if reduction > 1 and img.format == "JPEG":
            img.draft("RGB", (width // reduction, height // reduction))
        x = rgbx_pixels(to_rgb(img))  # (1, 4, H, W), channels-last memory
        if self.kind == "crop":
            sy, sx = x.shape[2] / height, x.shape[3] / width
            y0, x0 = round(top * sy), round(left * sx)
            y1, x1 = max(y0 + 1, round((top + crop_h) * sy)), max(x0 + 1, round((left + crop_w) * sx))
            # A crop view's rows are not adjacent, which would send the resampling down a slower path.
            x = x[..., y0:y1, x0:x1].contiguous(memory_format=torch.channels_last)
            x = F.interpolate(x, size=self.size_hw, mode=self.mode, antialias=True)
            if flip:
                x = x.flip(-1)
        else:
            x = F.interpolate(x, size=resized_hw, mode=self.mode, antialias=True)
            if self.crop_hw is not None:
                crop_h, crop_w = self.crop_hw
                top = int(round((resized_hw[0] - crop_h) / 2.0))
                left = int(round((resized_hw[1] - crop_w) / 2.0))
                x = x[..., top:top + crop_h, left:left + crop_w]
        if self.uint8:
            x = x.contiguous(memory_format=torch.channels_last)  # a flip or a centre crop may have moved it
            return x[0] if out is None else out.copy_(x[0])
        return self.normalize.normalize_into(x[0, :3], out)


def fast_preprocess(preprocess: Callable) -> Callable:
    """A callable (image bytes, out=None) -> (C, H, W) tensor equivalent to decoding, then `preprocess`.

    open_clip's plain train and val transforms run as FastTransform; any other Compose keeps its PIL steps
    with ToTensor + Normalize fused, and decodes JPEGs at reduced size only where its first resize needs no
    more pixels than that (a Resize of the shorter side)."""
    from torchvision import transforms as T

    fast = FastTransform.from_compose(preprocess)
    if fast is not None:
        return fast
    head, normalize = _fuse_tail(preprocess)
    transform = T.Compose(head + [normalize]) if normalize is not None else preprocess
    first = head[0] if head else None
    draft = None
    if isinstance(first, T.Resize) and first.max_size is None:
        size = first.size
        draft = size if isinstance(size, int) else (size[0] if len(size) == 1 else None)
    return DecodeThen(transform, draft)
