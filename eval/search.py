"""Search an index directory by text, by image, or by arithmetic on embeddings (image + W * (plus - minus)).

An index directory is what `contrastive index` writes: the clip-retrieval embedding layout (img_emb/, text_emb/,
metadata/) plus the FAISS index (image.index) and its parameters (index.json, written last); with `--text`, the
captions' index too (text.index, text_index.json). The command line and the service (eval/serve.py) both rank
with `encode_query` and `rank`, so they return the same results for the same query.

Letters in names: N gallery images, Q queries, D embedding dim, K results.
"""
from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

import numpy as np

from contrastive.errors import UserError
from contrastive.eval.index import TEXT_INDEX_FILE, TEXT_PARAMS_FILE, load_index, read_params, search_excluding

KEY_COLUMN = "image_path"  # eval/embed.py stores the sample key under clip-retrieval's column name
# An image embedding this close to the query image's is the query image itself (float16 storage moves the
# cosine of an image with its own stored embedding by ~1e-6; distinct images sit far lower).
SAME_IMAGE_COSINE = 0.9999


def _read_parts(directory: Path, sub: str, stem: str, ext: str) -> list[Path]:
    return sorted((directory / sub).glob(f"{stem}_*.{ext}"))


class Gallery:
    """An index directory opened for search: the FAISS index, its parameters and the metadata rows."""

    def __init__(self, directory: str | Path, *, use_gpu: bool = True):
        import pandas as pd

        from contrastive.eval.embed import IMG_DIR, META_DIR

        self.dir = Path(directory)
        self.params = read_params(self.dir)
        self.index, _ = load_index(self.dir, use_gpu=use_gpu)
        meta_files = _read_parts(self.dir, META_DIR, "metadata", "parquet")
        self.image_files = _read_parts(self.dir, IMG_DIR, "img_emb", "npy")
        if not meta_files or not self.image_files:
            raise UserError(f"index directory {self.dir} is incomplete (no {META_DIR}/ or {IMG_DIR}/ files); "
                            f"rebuild it with `contrastive index`")
        self.metadata = pd.concat([pd.read_parquet(f) for f in meta_files], ignore_index=True)
        num_rows = sum(np.load(f, mmap_mode="r").shape[0] for f in self.image_files)
        if len(self.metadata) != self.params.count or num_rows != self.params.count:
            raise UserError(f"index directory {self.dir} is inconsistent: {self.params.count} indexed vectors, "
                            f"{num_rows} stored embeddings, {len(self.metadata)} metadata rows; rebuild it")
        self.keys = self.metadata[KEY_COLUMN].astype(str).tolist()
        self._row_of_key: dict[str, int] = {}
        for row, key in enumerate(self.keys):
            self._row_of_key.setdefault(key, row)
        self.use_gpu = use_gpu

    @property
    def has_text_index(self) -> bool:
        return (self.dir / TEXT_INDEX_FILE).is_file() and (self.dir / TEXT_PARAMS_FILE).is_file()

    @cached_property
    def text_index(self):
        """The captions' index (row i: metadata row i's caption), loaded on first use."""
        if not self.has_text_index:
            raise UserError(f"the index at {self.dir} has no caption index; rebuild it with `contrastive index "
                            f"--text` to search captions")
        index, params = load_index(self.dir, use_gpu=self.use_gpu, index_file=TEXT_INDEX_FILE,
                                   params_file=TEXT_PARAMS_FILE)
        if params.count != self.params.count:
            raise UserError(f"{self.dir}/{TEXT_INDEX_FILE} holds {params.count} captions for {self.params.count} "
                            f"images; rebuild the index")
        return index

    @cached_property
    def image_embeddings(self) -> np.ndarray:
        """(N, D) float32, L2-normalised as the index holds them."""
        import faiss

        emb = np.concatenate([np.load(f) for f in self.image_files]).astype(np.float32)
        faiss.normalize_L2(emb)
        return emb

    def embedding_rows(self, rows) -> np.ndarray:
        """(len(rows), D) float32 unit image embeddings of some rows, read through memory maps (not all of N)."""
        if "image_embeddings" in self.__dict__:
            return self.image_embeddings[np.asarray(rows)]
        parts = [np.load(f, mmap_mode="r") for f in self.image_files]
        starts = np.cumsum([0] + [len(p) for p in parts])
        out = []
        for row in np.asarray(rows).ravel():
            part = int(np.searchsorted(starts, row, side="right") - 1)
            out.append(np.asarray(parts[part][row - starts[part]], dtype=np.float32))
        emb = np.stack(out)
        return emb / np.linalg.norm(emb, axis=1, keepdims=True)

    def row_of(self, key: str) -> int | None:
        """The first row with this key, None for a key not indexed."""
        return self._row_of_key.get(key)

    def record(self, row: int) -> dict:
        """The metadata of one row as plain JSON values."""
        out = {}
        for name, value in self.metadata.iloc[row].items():
            out[name] = value.item() if hasattr(value, "item") else value
        return out

    def check_model(self, model) -> None:
        from contrastive.models import embed_dim

        dim = embed_dim(model)
        if dim != self.params.dim:
            raise UserError(f"the model embeds to {dim} dimensions but the index at {self.dir} holds "
                            f"{self.params.dim}-dimensional vectors; use the model the index was built with "
                            f"({self.params.extra.get('model', 'see index.json')})")

    def search(self, queries_QD: np.ndarray, k: int, exclude_Q: np.ndarray | None = None, *,
               modality: str = "image"):
        index = self.text_index if modality == "text" else self.index
        return search_excluding(index, queries_QD, k, exclude_Q)


def compose_query(*, image_D: np.ndarray | None, text_TD: np.ndarray, plus_PD: np.ndarray, minus_MD: np.ndarray,
                  weight: float, plus_weights_P=None, minus_weights_M=None) -> np.ndarray:
    """The unit query vector.

    With an image: normalise(image + W * (sum(texts) + sum(plus) - sum(minus))). Without one:
    normalise(sum(texts) + W * (sum(plus) - sum(minus))), or of the plus/minus difference alone.
    Each plus/minus text may carry its own weight (default 1), which multiplies it inside the sums.
    All inputs are unit embeddings; an empty group contributes nothing.
    """
    dim = next(a.shape[-1] for a in (image_D, text_TD, plus_PD, minus_MD) if a is not None and a.size)
    zero = np.zeros(dim, dtype=np.float64)
    texts = text_TD.sum(axis=0) if text_TD.size else zero

    def weighted_sum(terms_XD, weights_X):
        if not terms_XD.size:
            return zero
        weights_X = np.ones(len(terms_XD)) if weights_X is None else np.asarray(weights_X, dtype=np.float64)
        return (weights_X[:, None] * terms_XD).sum(axis=0)

    delta = weighted_sum(plus_PD, plus_weights_P) - weighted_sum(minus_MD, minus_weights_M)
    if image_D is not None:
        query = image_D + weight * (texts + delta)
    elif text_TD.size:
        query = texts + weight * delta
    else:
        query = delta
    norm = np.linalg.norm(query)
    if norm < 1e-6:
        raise UserError("the query embedding is zero (the plus and minus texts cancel out); change the query")
    return (query / norm).astype(np.float32)


def encode_texts(bundle, texts: list[str]) -> np.ndarray:
    """(T, D) unit text embeddings (T may be 0)."""
    import torch

    if not texts:
        return np.zeros((0, 0), dtype=np.float32)
    device = next(bundle.model.parameters()).device
    with torch.no_grad():
        feats = bundle.model.encode_text(bundle.tokenizer(list(texts)).to(device), normalize=True)
    return feats.float().cpu().numpy()


def read_image(path: str | Path):
    """A PIL image or a UserError naming the file."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise UserError(f"image {path} does not exist")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise UserError(f"image {path} cannot be read ({type(e).__name__}: {e})") from None


def encode_image(bundle, image) -> np.ndarray:
    import torch

    device = next(bundle.model.parameters()).device
    with torch.no_grad():
        feats = bundle.model.encode_image(bundle.preprocess_val(image)[None].to(device), normalize=True)
    return feats[0].float().cpu().numpy()


def fetch_images(data_spec: str, keys: list[str]) -> dict:
    """{key: PIL image} for the given sample keys, read from the shards the index was built from."""
    from contrastive.data import decode_image, eval_samples

    wanted, found = set(keys), {}
    for sample in eval_samples(data_spec):
        key = sample.get("__key__")
        if key in wanted:
            raw = next((sample[k] for k in ("jpg", "jpeg", "png", "webp") if k in sample), None)
            if raw is not None:
                try:
                    found[key] = decode_image(raw)
                except Exception:
                    pass
            if len(found) == len(wanted):
                break
    return found


def encode_query(bundle, *, dim: int, texts: list[str], plus: list[str], minus: list[str], image=None,
                 image_D: np.ndarray | None = None, weight: float = 1.0, plus_weights=None,
                 minus_weights=None) -> tuple[np.ndarray, np.ndarray | None]:
    """(unit query_D, the query image's embedding or None) of a query (compose_query says how the parts add up).

    `image` is a PIL image to encode; `image_D` an embedding already at hand (an indexed image's). Every text
    of the query goes through the text tower in one batch. `bundle` may be None when there is no text and no
    `image` to encode.
    """
    empty = np.zeros((0, dim), dtype=np.float32)
    text_TD, plus_PD, minus_MD = empty, empty, empty
    if image is not None:
        image_D = encode_image(bundle, image)
    if texts or plus or minus:
        feats = encode_texts(bundle, [*texts, *plus, *minus])
        text_TD, plus_PD, minus_MD = np.split(feats, [len(texts), len(texts) + len(plus)])
    query_D = compose_query(image_D=image_D, text_TD=text_TD, plus_PD=plus_PD, minus_MD=minus_MD, weight=weight,
                            plus_weights_P=plus_weights, minus_weights_M=minus_weights)
    return query_D, image_D


def rank(gallery: Gallery, query_D: np.ndarray, *, k: int, modality: str = "image",
         image_D: np.ndarray | None = None, exclude_row: int | None = None) -> tuple[list[tuple[int, float]], list]:
    """The top k (row, score) of a unit query in the image index (or, modality "text", the caption index), and
    the keys left out as the query image.

    Searching images with an image query never returns the query image: the indexed row it came from
    (`exclude_row`), or else any image whose stored embedding equals the query image's (a file that is also in
    the index). A caption search returns the query image's own caption like any other.
    """
    image_side = modality == "image" and image_D is not None
    extra = 10 if image_side else 0  # room to drop the query image and its stored copies
    scores, rows = gallery.search(query_D[None], min(k + extra, gallery.params.count), modality=modality)
    found = rows[0] >= 0
    rows, scores = rows[0][found], scores[0][found]
    same = (gallery.embedding_rows(rows) @ image_D >= SAME_IMAGE_COSINE) if image_side and len(rows) \
        else np.zeros(len(rows), dtype=bool)
    hits, excluded = [], []
    for score, row, is_copy in zip(scores, rows, same):
        if image_side and (row == exclude_row or (exclude_row is None and is_copy)):
            excluded.append(gallery.keys[row])
            continue
        if len(hits) < k:
            hits.append((int(row), float(score)))
    return hits, excluded


def run_cli(args) -> dict:
    """`contrastive search`: compose the query, search, print results, optionally write a grid and JSON."""
    from contrastive.loading import load_for_inference
    from contrastive.eval.gpu import move_to_gpu

    if args.k <= 0:
        raise UserError(f"-k must be > 0, got {args.k}")
    if not (args.text or args.image or args.plus or args.minus):
        raise UserError("give a query: --text, --image, or --plus/--minus texts (with or without --image)")
    gallery = Gallery(args.index)
    modality = getattr(args, "modality", "image")
    if modality == "text":
        gallery.text_index  # a directory without captions indexed fails here, before the model loads
    model_path = args.model or gallery.params.extra.get("model")
    if not model_path:
        raise UserError(f"{gallery.dir}/index.json names no model; pass --model")
    query_image, exclude_row, image_D = None, None, None
    if args.image:
        row = gallery.row_of(args.image) if not Path(args.image).is_file() else None
        if row is not None:  # a gallery key: its stored embedding is the query image
            exclude_row, image_D = row, gallery.embedding_rows([row])[0]
        elif not Path(args.image).exists():
            raise UserError(f"--image {args.image} is neither an image file nor the key of an indexed sample")
        else:
            query_image = read_image(args.image)
    bundle = None
    if query_image is not None or args.text or args.plus or args.minus:  # an indexed key alone needs no model
        bundle, _ = load_for_inference(model_path)
        move_to_gpu(bundle)
        gallery.check_model(bundle.model)
    query_D, image_D = encode_query(bundle, dim=gallery.params.dim, texts=args.text or [], plus=args.plus or [],
                                    minus=args.minus or [], image=query_image, image_D=image_D, weight=args.weight)
    hits, excluded = rank(gallery, query_D, k=args.k, modality=modality, image_D=image_D, exclude_row=exclude_row)
    results = [{"rank": i + 1, "score": score, **gallery.record(row)} for i, (row, score) in enumerate(hits)]
    query = {"text": args.text or [], "image": args.image, "plus": args.plus or [], "minus": args.minus or [],
             "weight": args.weight, "modality": modality, "excluded_as_query_image": excluded}
    out = {"index": str(gallery.dir), "model": str(model_path), "query": query, "results": results}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))
    if args.grid:
        from contrastive.eval.plots import contact_sheet

        data = gallery.params.extra.get("data", "")
        images = fetch_images(data, [r[KEY_COLUMN] for r in results]) if data else {}
        if exclude_row is not None and data:
            query_image = fetch_images(data, [gallery.keys[exclude_row]]).get(gallery.keys[exclude_row])
        contact_sheet(args.grid, query_image=query_image, query_label=describe_query(query), results=results,
                      images=images, key_column=KEY_COLUMN)
    return out


def describe_query(query: dict) -> str:
    parts = []
    if query["image"]:
        parts.append(f"image {Path(str(query['image'])).name}")
    parts += [f"+ '{t}'" for t in query["text"]]
    w = f"{query['weight']:g} x " if query["image"] and query["weight"] != 1 else ""
    parts += [f"+ {w}'{t}'" for t in query["plus"]] + [f"- {w}'{t}'" for t in query["minus"]]
    return " ".join(parts).lstrip("+ ")
