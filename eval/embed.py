"""Image and text embeddings of a shard set, written in clip-retrieval's layout for indexing and retrieval.

Layout (as clip-retrieval's `clip inference` writes it, so its `clip index`, embedding-reader and autofaiss
read it unchanged):
    OUT/img_emb/img_emb_N.npy        (rows, D) float16, L2-normalised image embeddings
    OUT/text_emb/text_emb_N.npy      (rows, D) float16, L2-normalised caption embeddings
    OUT/metadata/metadata_N.parquet  one row per embedding row: image_path (the sample key), caption, and
                                     the fields of the sample's JSON record
Row i of each file of part N describes the same sample. Part numbers are zero-padded to a common width
(img_emb_0 .. img_emb_9, or img_emb_00 .. img_emb_11), so files sort in row order.

Letters in names: B batch, D embedding dim.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from contrastive.errors import UserError
from contrastive.evaluators import FeatureEncoder

IMG_DIR, TEXT_DIR, META_DIR = "img_emb", "text_emb", "metadata"
IMAGE_KEYS = "jpg;jpeg;png;webp"
# clip-retrieval writes image_path, caption, then the JSON fields that do not collide with those two.
RESERVED_COLUMNS = ("image_path", "caption")


def _first(sample: dict, keys: str):
    for key in keys.split(";"):
        if key in sample:
            return sample[key]
    return None


class _PartWriter:
    """Buffers rows and writes one (img_emb, text_emb, metadata) triple per `rows_per_file` rows."""

    def __init__(self, out_dir: Path, rows_per_file: int):
        self.out_dir, self.rows_per_file = out_dir, rows_per_file
        for sub in (IMG_DIR, TEXT_DIR, META_DIR):
            (out_dir / sub).mkdir(parents=True, exist_ok=True)
        self.img: list[np.ndarray] = []
        self.txt: list[np.ndarray] = []
        self.meta: list[dict] = []
        self.num_rows = 0
        self.num_parts = 0

    def add(self, img_BD: np.ndarray, txt_BD: np.ndarray, meta: list[dict]) -> None:
        self.img.append(img_BD)
        self.txt.append(txt_BD)
        self.meta.extend(meta)
        self.num_rows += len(meta)
        while len(self.meta) >= self.rows_per_file:
            self._write(self.rows_per_file)

    def _write(self, n: int) -> None:
        import pandas as pd

        img, txt = np.concatenate(self.img), np.concatenate(self.txt)
        part = self.num_parts
        np.save(self.out_dir / IMG_DIR / f"img_emb_{part}.npy", img[:n])
        np.save(self.out_dir / TEXT_DIR / f"text_emb_{part}.npy", txt[:n])
        frame = pd.DataFrame(self.meta[:n])
        frame.to_parquet(self.out_dir / META_DIR / f"metadata_{part}.parquet", index=False)
        self.img, self.txt, self.meta = [img[n:]], [txt[n:]], self.meta[n:]
        self.num_parts += 1

    def close(self) -> list[str]:
        if self.meta:
            self._write(len(self.meta))
        width = len(str(max(self.num_parts - 1, 0)))
        names = []
        for part in range(self.num_parts):
            padded = str(part).zfill(width)
            for sub, stem, ext in ((IMG_DIR, "img_emb", "npy"), (TEXT_DIR, "text_emb", "npy"),
                                   (META_DIR, "metadata", "parquet")):
                src = self.out_dir / sub / f"{stem}_{part}.{ext}"
                dst = self.out_dir / sub / f"{stem}_{padded}.{ext}"
                if src != dst:
                    os.replace(src, dst)
            names.append(padded)
        return names


def _metadata(sample: dict, caption: str) -> dict:
    row: dict[str, Any] = {"image_path": sample.get("__key__", ""), "caption": caption}
    if "json" in sample:
        try:
            record = json.loads(sample["json"])
        except (ValueError, TypeError):
            record = {}
        if isinstance(record, dict):
            for key, value in record.items():
                if key in RESERVED_COLUMNS:
                    continue
                # Nested values stay JSON text, so every part has the same flat parquet schema.
                row[key] = json.dumps(value) if isinstance(value, (dict, list)) else value
    return row


@torch.no_grad()
def write_embeddings(bundle, data_spec: str, out_dir: str | Path, *, batch_size: int = 256,
                     rows_per_file: int = 1_000_000, image_key: str = IMAGE_KEYS, caption_key: str = "txt",
                     progress: bool = True) -> dict:
    """Embed every (image, caption) sample of `data_spec` (shards, brace expansion allowed) with `bundle`'s
    model, in order, `batch_size` at a time; write the clip-retrieval layout into `out_dir`.

    Samples whose image cannot be decoded or that lack an image or a caption are skipped and counted.
    Returns a summary: num_samples, num_skipped, num_corrupt (unreadable tar members), dim, parts.
    """
    from contrastive.data import decode_image, eval_samples, expand_sources
    from contrastive.progress import progress_bar

    if batch_size <= 0 or rows_per_file <= 0:
        raise UserError("--batch-size and --rows-per-file must be > 0")
    expand_sources(data_spec)  # a clear error for a missing shard before any work
    out_dir = Path(out_dir)
    model = bundle.model
    was_training = model.training
    model.eval()
    encoder = FeatureEncoder(model)
    writer = _PartWriter(out_dir, rows_per_file)
    corrupt: dict = {}
    skipped = 0
    images, captions, meta = [], [], []

    def flush():
        img_BD = encoder.encode_image(torch.stack(images))
        txt_BD = encoder.encode_text(bundle.tokenizer(captions))
        writer.add(img_BD.cpu().numpy().astype(np.float16), txt_BD.cpu().numpy().astype(np.float16), list(meta))
        images.clear(), captions.clear(), meta.clear()

    bar = progress_bar(desc="embed", unit="img", disable=not progress)
    try:
        for sample in eval_samples(data_spec, handler_counts=corrupt):
            raw_image, raw_caption = _first(sample, image_key), _first(sample, caption_key)
            if raw_image is None or raw_caption is None:
                skipped += 1
                continue
            try:
                image = bundle.preprocess_val(decode_image(raw_image))
            except Exception:
                skipped += 1
                continue
            caption = raw_caption.decode("utf-8") if isinstance(raw_caption, bytes) else str(raw_caption)
            images.append(image)
            captions.append(caption)
            meta.append(_metadata(sample, caption))
            if len(images) == batch_size:
                flush()
                bar.update(batch_size)
        if images:
            bar.update(len(images))
            flush()
    finally:
        bar.close()
        model.train(was_training)
    if writer.num_rows == 0:
        shutil.rmtree(out_dir / IMG_DIR, ignore_errors=True)
        shutil.rmtree(out_dir / TEXT_DIR, ignore_errors=True)
        shutil.rmtree(out_dir / META_DIR, ignore_errors=True)
        raise UserError(f"no readable (image, caption) samples in {data_spec} "
                        f"(image keys {image_key!r}, caption key {caption_key!r})")
    parts = writer.close()
    dim = int(np.load(out_dir / IMG_DIR / f"img_emb_{parts[0]}.npy", mmap_mode="r").shape[1])
    return {"num_samples": writer.num_rows, "num_skipped": skipped, "num_corrupt": int(corrupt.get("corrupt", 0)),
            "dim": dim, "parts": parts, "layout": "clip-retrieval"}


def read_embeddings(out_dir: str | Path) -> tuple[np.ndarray, np.ndarray, Any]:
    """All parts of a clip-retrieval embeddings folder, in row order: (img_ND, text_ND, metadata DataFrame)."""
    import pandas as pd

    out_dir = Path(out_dir)
    img_files = sorted((out_dir / IMG_DIR).glob("img_emb_*.npy"))
    if not img_files:
        raise UserError(f"{out_dir} has no {IMG_DIR}/img_emb_*.npy files")
    img = np.concatenate([np.load(f) for f in img_files])
    txt = np.concatenate([np.load(f) for f in sorted((out_dir / TEXT_DIR).glob("text_emb_*.npy"))])
    meta = pd.concat([pd.read_parquet(f) for f in sorted((out_dir / META_DIR).glob("metadata_*.parquet"))],
                     ignore_index=True)
    return img, txt, meta
