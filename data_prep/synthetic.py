"""The built-in synthetic dataset: procedurally drawn coloured shapes with varied natural-language captions."""
from __future__ import annotations

import io
import json
import math
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from contrastive.data_prep.shards import shard_done, shard_spec, write_shard, write_sizes

SHAPES = ("circle", "square", "triangle", "star", "hexagon", "cross")
COLORS = {
    "red": (215, 35, 35),
    "green": (40, 170, 50),
    "blue": (35, 75, 215),
    "yellow": (235, 215, 40),
    "purple": (140, 50, 190),
    "orange": (245, 135, 25),
}
SIZES = {"small": 0.16, "large": 0.30}  # radius as a fraction of the image side
POSITIONS = {
    "top left": (0.3, 0.3), "top right": (0.7, 0.3), "bottom left": (0.3, 0.7), "bottom right": (0.7, 0.7),
    "center": (0.5, 0.5),
}
BACKGROUNDS = {"grey": (128, 128, 128), "white": (240, 240, 240), "black": (20, 20, 20), "textured": None}
# Attributes of the object itself (not of where or on what it is drawn).
INTRINSIC = ("shape", "color", "size")
SPLIT_IDS = {"train": 0, "val": 1}

POSITION_PHRASES = {
    "top left": ["near the top left", "in the top left corner", "at the upper left"],
    "top right": ["near the top right", "in the top right corner", "at the upper right"],
    "bottom left": ["near the bottom left", "in the bottom left corner", "at the lower left"],
    "bottom right": ["near the bottom right", "in the bottom right corner", "at the lower right"],
    "center": ["in the center", "in the middle", "at the centre"],
}
SIZE_WORDS = {"small": ["small", "little", "tiny"], "large": ["large", "big", "huge"]}

# Caption templates; fields: {size} {color} {shape} {pos} {bg}. Some leave out the colour or the shape on purpose,
# so the text tower learns each word on its own, not only fixed combinations.
CAPTION_TEMPLATES = (
    "a {size} {color} {shape} {pos}",
    "{color} {shape}",
    "a picture of a {size} {color} {shape} on a {bg} background",
    "a {shape} in {color}",
    "there is a {color} {shape} {pos}",
    "a {color} {shape}",
    "a photo of a {color} {shape} on {bg}",
    "{size} {color} {shape}",
    "a {size} {shape} {pos}",
    "a drawing of a {shape}",
    "something {color} {pos}",
    "a {color} object on a {bg} background",
    "the {shape} is {color}",
    "an image showing a {color} {shape}, {size}, {pos}",
)


@dataclass(frozen=True)
class Attributes:
    shape: str
    color: str
    size: str
    position: str
    background: str
    rotation: float

    def as_dict(self) -> dict:
        return {"shape": self.shape, "color": self.color, "size": self.size, "position": self.position,
                "background": self.background, "rotation": round(self.rotation, 2)}


def sample_attributes(rng: np.random.Generator) -> Attributes:
    return Attributes(
        shape=SHAPES[rng.integers(len(SHAPES))],
        color=list(COLORS)[rng.integers(len(COLORS))],
        size=list(SIZES)[rng.integers(len(SIZES))],
        position=list(POSITIONS)[rng.integers(len(POSITIONS))],
        background=list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))],
        rotation=float(rng.uniform(0, 360)),
    )


def _polygon(shape: str, cx: float, cy: float, r: float, rotation: float) -> list[tuple[float, float]]:
    def ring(n, radius, phase=0.0):
        return [(cx + radius * math.cos(phase + 2 * math.pi * i / n), cy + radius * math.sin(phase + 2 * math.pi * i / n))
                for i in range(n)]

    rot = math.radians(rotation)
    if shape == "square":
        return ring(4, r * 1.15, rot + math.pi / 4)
    if shape == "triangle":
        return ring(3, r * 1.2, rot - math.pi / 2)
    if shape == "hexagon":
        return ring(6, r, rot)
    if shape == "star":
        outer, inner = ring(5, r * 1.2, rot - math.pi / 2), ring(5, r * 0.5, rot - math.pi / 2 + math.pi / 5)
        return [p for pair in zip(outer, inner) for p in pair]
    if shape == "cross":
        w = r * 0.38
        arm = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w), (-r, -w), (-w, -w)]
        c, s = math.cos(rot), math.sin(rot)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in arm]
    raise ValueError(shape)


def render(attrs: Attributes, rng: np.random.Generator, image_size: int) -> Image.Image:
    """Draw the shape's mask at 4x and box-filter it down (anti-aliasing), composite it over the background,
    then add colour jitter and pixel noise."""
    scale = 4
    side = image_size * scale
    if attrs.background == "textured":
        base = rng.integers(60, 190, size=3)
        tex = rng.normal(0, 25, size=(image_size // 4 + 1, image_size // 4 + 1, 3))
        bg = base + np.kron(tex, np.ones((4, 4, 1)))[:image_size, :image_size]
    else:
        bg = np.broadcast_to(np.array(BACKGROUNDS[attrs.background]) + rng.integers(-12, 13, size=3),
                             (image_size, image_size, 3))
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    px, py = POSITIONS[attrs.position]
    jitter = rng.uniform(-0.06, 0.06, size=2)
    r = SIZES[attrs.size] * side * rng.uniform(0.9, 1.1)
    cx, cy = (px + jitter[0]) * side, (py + jitter[1]) * side
    color = np.clip(np.array(COLORS[attrs.color]) + rng.integers(-20, 21, size=3), 0, 255)
    if attrs.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        draw.polygon(_polygon(attrs.shape, cx, cy, r, attrs.rotation), fill=255)
    alpha = np.asarray(mask.reduce(scale), dtype=np.float32)[..., None] / 255.0
    arr = bg * (1 - alpha) + color * alpha + rng.normal(0, 8, size=(image_size, image_size, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def caption(attrs: Attributes, rng: np.random.Generator) -> str:
    template = CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))]
    words = {
        "size": SIZE_WORDS[attrs.size][rng.integers(3)],
        "color": attrs.color,
        "shape": attrs.shape,
        "pos": POSITION_PHRASES[attrs.position][rng.integers(3)],
        "bg": attrs.background,
    }
    # "a orange star" -> "an orange star"
    return re.sub(r"\ba (?=[aeiou])", "an ", template.format(**words))


def make_sample(seed: int, split: str, index: int, image_size: int) -> dict:
    """Sample `index` of `split`, a pure function of its arguments (so shards can be drawn in parallel)."""
    rng = np.random.default_rng([seed, SPLIT_IDS[split], index])
    attrs = sample_attributes(rng)
    img = render(attrs, rng, image_size)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    text = caption(attrs, rng)
    return {"jpg": buf.getvalue(), "txt": text, "json": attrs.as_dict()}


def _write_one(args) -> int:
    out_dir, shard_id, start, stop, seed, split, image_size = args
    if shard_done(out_dir, shard_id):
        return 0
    write_shard(out_dir, shard_id, (make_sample(seed, split, i, image_size) for i in range(start, stop)))
    return stop - start


def generate(out_dir: str | Path, *, num_samples: int, num_val: int, seed: int = 0, image_size: int = 64,
             samples_per_shard: int = 1000, num_procs: int | None = None, progress: bool = True) -> dict:
    """Write OUT_DIR/train and OUT_DIR/val shard sets; returns {split: shard spec}. Finished shards are kept."""
    import os

    from contrastive.progress import progress_bar

    out_dir = Path(out_dir)
    specs = {}
    jobs = []
    for split, count in (("train", num_samples), ("val", num_val)):
        if count <= 0:
            continue
        split_dir = out_dir / split
        split_dir.mkdir(parents=True, exist_ok=True)
        num_shards = math.ceil(count / samples_per_shard)
        for shard_id in range(num_shards):
            start = shard_id * samples_per_shard
            jobs.append((split_dir, shard_id, start, min(count, start + samples_per_shard), seed, split, image_size))
        specs[split] = shard_spec(split_dir, num_shards)
    num_procs = num_procs or min(len(jobs), os.cpu_count() or 1)
    with progress_bar(total=num_samples + max(num_val, 0), desc="synthetic", unit="img",
                      disable=not progress) as bar:
        if num_procs <= 1:
            for job in jobs:
                _write_one(job)
                bar.update(job[3] - job[2])
        else:
            with ProcessPoolExecutor(num_procs) as pool:
                for job, _ in zip(jobs, pool.map(_write_one, jobs)):
                    bar.update(job[3] - job[2])
    for split in specs:
        write_sizes(out_dir / split)
    (out_dir / "dataset.json").write_text(json.dumps({
        "generator": "contrastive prep synthetic", "seed": seed, "image_size": image_size,
        "num_samples": num_samples, "num_val": num_val, "splits": specs,
        "attributes": {"shape": list(SHAPES), "color": list(COLORS), "size": list(SIZES),
                       "position": list(POSITIONS), "background": list(BACKGROUNDS)},
    }, indent=2))
    return specs
