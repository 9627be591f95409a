"""Turn one messy input image and caption into a clean RGB JPEG and a UTF-8 caption, or say why not.

Each problem an input can have is either converted (counted under `converted`) or skipped with a reason
(counted under `skipped`); `process_image` and `clean_caption` raise `Skip(reason, message)` for the latter.
"""
from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

from contrastive.transforms import to_rgb

RESIZE_MODES = ("no", "border", "keep_ratio", "center_crop")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")

# Skip reasons, in the order the checks run.
SKIP_REASONS = ("unsafe_path", "bad_row", "no_class", "duplicate", "missing_image", "missing_caption",
                "empty_caption", "caption_not_utf8", "unreadable_file", "not_an_image", "truncated", "too_large",
                "too_small", "aspect_ratio", "bad_image")


class Skip(Exception):
    """An input that cannot become a sample; `reason` is one of SKIP_REASONS."""

    def __init__(self, reason: str, message: str = ""):
        super().__init__(f"{reason}: {message}" if message else reason)
        self.reason, self.message = reason, message or reason


@dataclass(frozen=True)
class ImageOptions:
    """How images are stored: img2dataset's options and defaults."""

    image_size: int = 256
    resize_mode: str = "border"
    jpeg_quality: int = 95
    # Inputs whose shorter side is below this many pixels are skipped (0: keep all).
    min_image_size: int = 0
    # Inputs with max(w, h) / min(w, h) above this are skipped.
    max_aspect_ratio: float = math.inf
    # Inputs with more pixels than this after reduced-size JPEG decoding are skipped (decompression bombs).
    max_pixels: int = 100_000_000

    def __post_init__(self):
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize mode must be one of {', '.join(RESIZE_MODES)}, got {self.resize_mode!r}")
        if self.image_size <= 0:
            raise ValueError(f"image size must be > 0, got {self.image_size}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"JPEG quality must be in 1..100, got {self.jpeg_quality}")
        if self.min_image_size < 0 or self.max_aspect_ratio < 1 or self.max_pixels <= 0:
            raise ValueError("min image size must be >= 0, max aspect ratio >= 1 and max pixels > 0")


def clean_caption(raw) -> str:
    """Strip and decode a caption (bytes must be UTF-8; a BOM is dropped); empty captions are skipped."""
    if raw is None:
        raise Skip("missing_caption")
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise Skip("caption_not_utf8", f"byte {e.start}: {raw[e.start:e.start + 1]!r}") from None
    elif isinstance(raw, str):
        # Text read with errors="surrogateescape" keeps undecodable bytes as lone surrogates.
        try:
            raw.encode("utf-8")
        except UnicodeEncodeError:
            raise Skip("caption_not_utf8", "undecodable bytes") from None
    else:
        raw = "" if isinstance(raw, float) and math.isnan(raw) else str(raw)
    caption = " ".join(raw.split())
    if not caption:
        raise Skip("empty_caption")
    return caption


def _target_size(width: int, height: int, opts: ImageOptions) -> tuple[int, int]:
    """Size before padding/cropping: border fits the longer side, keep_ratio/center_crop the shorter one."""
    size = opts.image_size
    if opts.resize_mode == "no":
        return width, height
    if opts.resize_mode == "border":
        scale = size / max(width, height)
    else:
        scale = size / min(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def process_image(data: bytes, opts: ImageOptions) -> tuple[bytes, dict, list[str]]:
    """Decode, validate, orient, convert to RGB and resize one image; returns (jpeg, info, conversions).

    Raises Skip for inputs that cannot be used. JPEGs far larger than needed are decoded at reduced size
    (PIL draft), which is also what keeps huge photographs within `max_pixels`.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    converted: list[str] = []
    # PIL's own bomb check runs before reduced-size decoding could apply; max_pixels replaces it below.
    bomb_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise Skip("not_an_image", "not a readable image format") from None
    except Exception as e:  # PIL raises many types on garbage headers; a cut-off header says "truncated"
        raise Skip("truncated" if "truncat" in str(e).lower() else "not_an_image",
                   f"{type(e).__name__}: {e}"[:120]) from None
    finally:
        Image.MAX_IMAGE_PIXELS = bomb_limit
    original_width, original_height = img.size
    if original_width <= 0 or original_height <= 0:
        raise Skip("not_an_image", "zero-sized image")
    is_original_jpeg = img.format == "JPEG"
    if img.format == "JPEG" and opts.resize_mode != "no":
        # Reduced-size DCT decoding; the final resize still decides the size, so quality is unchanged.
        tw, th = _target_size(original_width, original_height, opts)
        img.draft("RGB", (tw, th))
    if img.size[0] * img.size[1] > opts.max_pixels:
        raise Skip("too_large", f"{original_width}x{original_height} pixels")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.load()
    except (OSError, SyntaxError, EOFError) as e:
        # PIL reports missing data as OSError ("image file is truncated") and broken chunks as SyntaxError.
        reason = "truncated" if isinstance(e, (OSError, EOFError)) or "truncat" in str(e).lower() else "bad_image"
        raise Skip(reason, f"{type(e).__name__}: {e}"[:120]) from None
    except Exception as e:
        raise Skip("bad_image", f"{type(e).__name__}: {e}"[:120]) from None
    try:
        orientation = int(img.getexif().get(0x0112, 1) or 1)
    except Exception:  # a broken EXIF block: keep the pixels as stored
        orientation = 1
    if orientation in range(2, 9):
        img = ImageOps.exif_transpose(img)
        converted.append("exif_rotated")
    else:
        orientation = 1
    # Checks use the original resolution (before reduced-size decoding), as displayed (after EXIF rotation).
    width, height = (original_height, original_width) if orientation in (5, 6, 7, 8) else \
        (original_width, original_height)
    if min(width, height) < opts.min_image_size:
        raise Skip("too_small", f"{width}x{height} < {opts.min_image_size}")
    if max(width, height) / min(width, height) > opts.max_aspect_ratio:
        raise Skip("aspect_ratio", f"{width}x{height}")
    try:
        rgb = to_rgb(img, converted)
        keep_bytes = (opts.resize_mode == "no" and is_original_jpeg and not converted)
        if opts.resize_mode != "no":
            rgb = _resize(rgb, opts)
        if keep_bytes:
            out = data
        else:
            buf = io.BytesIO()
            rgb.save(buf, format="JPEG", quality=opts.jpeg_quality)
            out = buf.getvalue()
    except Skip:
        raise
    except Exception as e:
        raise Skip("bad_image", f"{type(e).__name__}: {e}"[:120]) from None
    info = {"width": rgb.width, "height": rgb.height, "original_width": width, "original_height": height}
    return out, info, converted


def _resize(img, opts: ImageOptions):
    from PIL import Image

    tw, th = _target_size(img.width, img.height, opts)
    if (tw, th) != img.size:
        # Downscaling: bicubic with a reducing gap (antialiased, fast); upscaling: Lanczos (img2dataset's choices).
        if tw < img.width:
            img = img.resize((tw, th), Image.BICUBIC, reducing_gap=3.0)
        else:
            img = img.resize((tw, th), Image.LANCZOS)
    size = opts.image_size
    if opts.resize_mode == "border" and (tw, th) != (size, size):
        canvas = Image.new("RGB", (size, size), (0, 0, 0))
        canvas.paste(img, ((size - tw) // 2, (size - th) // 2))
        img = canvas
    elif opts.resize_mode == "center_crop" and (tw, th) != (size, size):
        left, top = (tw - size) // 2, (th - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return img
