"""Image<->text retrieval Recall@K through FAISS, one chunk of queries at a time, never an N x M score matrix.

Ties: a query counts as retrieved within the top k when fewer than k gallery items score strictly higher than
its best true match (ties go to the true match, so the result does not depend on how a sort breaks them). That
is `topk_scores[k-1] <= positive_score`: the k-th best score over the whole gallery, which faiss returns exactly
whatever order it gives tied items, is at most the true match's score. Scores are float32 inner products.

Letters in names: N images, M captions (each caption belongs to one image; an image may have several), Q
queries in a chunk, D embedding dim, K the largest k asked for.
"""
from __future__ import annotations

import numpy as np

from contrastive.config import EvaluatorConfig
from contrastive.errors import UserError

DEFAULT_KS = (1, 5, 10)


def pair_scores(image_ND: np.ndarray, text_MD: np.ndarray, text_to_image_M: np.ndarray, *,
                chunk: int = 65536) -> np.ndarray:
    """Score of every caption with its own image, (M,) float32, computed row by row."""
    scores = np.empty(len(text_MD), dtype=np.float32)
    for start in range(0, len(text_MD), chunk):
        t = np.asarray(text_MD[start:start + chunk], dtype=np.float32)
        x = np.asarray(image_ND[text_to_image_M[start:start + chunk]], dtype=np.float32)
        scores[start:start + chunk] = np.einsum("md,md->m", t, x)
    return scores


def _flat_index(gallery_ND: np.ndarray, use_gpu: bool):
    import faiss

    from contrastive.eval.gpu import to_gpu

    index = faiss.IndexFlatIP(gallery_ND.shape[1])
    index.add(np.ascontiguousarray(gallery_ND, dtype=np.float32))
    return to_gpu(index) if use_gpu else index


def _chunked_hits(index, queries_QD: np.ndarray, positive_of, ks: tuple[int, ...], num_gallery: int, *,
                  chunk_size: int) -> dict[int, int]:
    """Count queries whose true match is within the top k, for each k; `positive_of(start, stop, D, I)` gives
    each chunk query's best true-match score (float32), snapped to faiss's own value where faiss returned it."""
    top = min(max(ks), num_gallery)
    hits = {k: 0 for k in ks}
    for start in range(0, len(queries_QD), chunk_size):
        stop = min(start + chunk_size, len(queries_QD))
        D, I = index.search(np.ascontiguousarray(queries_QD[start:stop], dtype=np.float32), top)
        best = positive_of(start, stop, D, I)
        for k in ks:
            hits[k] += int((D[:, k - 1] <= best).sum()) if k <= num_gallery else stop - start
    return hits


def retrieval_recall(image_ND: np.ndarray, text_MD: np.ndarray, text_to_image_M: np.ndarray, *,
                     ks: tuple[int, ...] = DEFAULT_KS, chunk_size: int = 4096, use_gpu: bool = True) -> dict:
    """Recall@k both ways, in CLIP_benchmark's names.

    image_retrieval_recall@k: text -> image (each caption finds its image among the N images).
    text_retrieval_recall@k: image -> text (each image finds any of its captions among the M captions); images
    without a caption are left out and counted in `num_images_without_caption`.
    mean_recall: the mean of all of these (the six of R@1/5/10 both ways), the usual single figure.
    """
    text_to_image_M = np.asarray(text_to_image_M, dtype=np.int64)
    num_images, num_texts = len(image_ND), len(text_MD)
    if num_images == 0 or num_texts == 0:
        raise UserError("retrieval needs at least one image and one caption")
    if len(text_to_image_M) != num_texts or text_to_image_M.min() < 0 or text_to_image_M.max() >= num_images:
        raise UserError("every caption must name the index of its image (0..N-1)")
    if min(ks) < 1:
        raise UserError(f"recall ks must be >= 1, got {ks}")
    ks = tuple(sorted(set(ks)))
    pos_M = pair_scores(image_ND, text_MD, text_to_image_M)

    # text -> image: one true match per caption.
    def caption_positive(start, stop, D, I):
        own = text_to_image_M[start:stop, None]
        found = I == own
        best = pos_M[start:stop].copy()
        rows = found.any(axis=1)
        best[rows] = np.where(found, D, -np.inf).max(axis=1)[rows]
        return best

    t2i = _chunked_hits(_flat_index(image_ND, use_gpu), text_MD, caption_positive, ks, num_images,
                        chunk_size=chunk_size)

    # image -> text: the best-scoring of the image's captions is its true match.
    best_N = np.full(num_images, -np.inf, dtype=np.float32)
    np.maximum.at(best_N, text_to_image_M, pos_M)
    has_caption = np.isfinite(best_N)
    image_ids = np.flatnonzero(has_caption)

    def image_positive(start, stop, D, I):
        own = image_ids[start:stop, None]
        found = (I >= 0) & (text_to_image_M[np.maximum(I, 0)] == own)
        best = best_N[image_ids[start:stop]].copy()
        rows = found.any(axis=1)
        best[rows] = np.where(found, D, -np.inf).max(axis=1)[rows]
        return best

    i2t = _chunked_hits(_flat_index(text_MD, use_gpu), np.asarray(image_ND)[image_ids] if len(image_ids) < num_images
                        else image_ND, image_positive, ks, num_texts, chunk_size=chunk_size)
    out = {}
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = t2i[k] / num_texts
        out[f"text_retrieval_recall@{k}"] = i2t[k] / max(1, len(image_ids))
    out["mean_recall"] = float(np.mean(list(out.values())))
    out.update(num_images=num_images, num_texts=num_texts,
               num_images_without_caption=int(num_images - len(image_ids)))
    return out


def captions_of(captions_per_image: list[list[str]]) -> tuple[list[str], np.ndarray]:
    """Each image's captions -> (flat caption list, caption -> image index)."""
    flat = [caption for captions in captions_per_image for caption in captions]
    owner = np.repeat(np.arange(len(captions_per_image), dtype=np.int64), [len(c) for c in captions_per_image])
    return flat, owner


class RetrievalEvaluator:
    """Plug-in for the training loop: image<->text Recall@1/5/10 and their mean on a captioned set (cfg.data: a
    shard spec or a folder eval/captioned.py reads), every caption of each image."""

    def __init__(self, cfg: EvaluatorConfig, *, batch_size: int = 256):
        from contrastive.eval.captioned import open_captioned

        if not cfg.data:
            raise UserError("the retrieval evaluator needs `data` (a shard spec of image-caption pairs)")
        open_captioned(cfg.data)  # checks paths before training starts
        self.cfg, self.batch_size = cfg, batch_size
        self.tag = cfg.tag or "retrieval"

    def __call__(self, bundle) -> dict:
        metrics = score_retrieval(bundle, self.cfg.data, batch_size=self.batch_size, max_samples=self.cfg.max_samples)
        return {k: v for k, v in metrics.items() if "recall" in k}


def encode_captions(bundle, captions: list[str], *, batch_size: int = 256) -> np.ndarray:
    """(M, D) float32 unit embeddings of `captions`, in order; on several ranks each encodes every W-th one
    (all ranks must call this together, see contrastive.evaluators.encode_sharded)."""
    from contrastive.distributed import rank_and_world_size
    from contrastive.evaluators import FeatureEncoder, encode_sharded

    rank, world_size = rank_and_world_size()
    encoder = FeatureEncoder(bundle.model)
    text_MD, _ = encode_sharded(((m, text, None) for m, text in enumerate(captions) if m % world_size == rank),
                                lambda batch: encoder.encode_text(bundle.tokenizer(batch)), dummy="",
                                batch_size=batch_size)
    return text_MD.numpy()


def embed_captioned(bundle, data: str, *, batch_size: int = 256, max_samples: int = 0,
                    images_list: str | None = None, progress: bool = False):
    """(image_ND, caption_MD, caption -> image index) of the readable, captioned images among the first
    `max_samples` (0: all) of `data` (any layout eval/captioned.py reads), every caption of each image, as
    float32 arrays. On several ranks each encodes its share of the images and of the captions (see
    contrastive.evaluators.encode_sharded) and every rank returns the whole set's, in sample order."""
    import torch
    from PIL import Image

    from contrastive.data import decode_image
    from contrastive.distributed import rank_and_world_size
    from contrastive.evaluators import FeatureEncoder, encode_sharded
    from contrastive.eval.captioned import open_captioned

    model = bundle.model
    source = open_captioned(data, images_list=images_list)
    rank, world_size = rank_and_world_size()
    encoder = FeatureEncoder(model)

    def load(image):
        if isinstance(image, bytes):
            return decode_image(image)
        with Image.open(image) as img:
            return img.convert("RGB")

    def own_samples():
        """(index, image, captions) of this rank's readable samples; only those are decoded."""
        for n, image, captions in source.samples(max_samples=max_samples):
            if n % world_size != rank or image is None or not captions:
                continue
            try:
                yield n, bundle.preprocess_val(load(image)), captions
            except Exception:  # an unreadable image is skipped, as every reader of shards here does
                continue

    rows = own_samples()
    if progress:
        from contrastive.progress import progress_bar

        rows = progress_bar(rows, desc="retrieval: images", unit="img", disable=rank != 0)
    was_training = model.training
    model.eval()
    try:
        image_ND, captions = encode_sharded(rows, lambda batch: encoder.encode_image(torch.stack(batch)),
                                            dummy=bundle.preprocess_val(Image.new("RGB", (8, 8))),
                                            batch_size=batch_size)
        if not captions:  # every rank has gathered the same (empty) list, so all stop here together
            raise UserError(f"no readable (image, caption) samples in {data}")
        flat, owner = captions_of(captions)
        text_MD = encode_captions(bundle, flat, batch_size=batch_size)
    finally:
        model.train(was_training)
    return image_ND.numpy(), text_MD, owner


def score_retrieval(bundle, data: str, *, batch_size: int = 256, max_samples: int = 0,
                    images_list: str | None = None, progress: bool = False) -> dict:
    """Image<->text retrieval of `bundle` (.model, .preprocess_val, .tokenizer) on a captioned set, every caption
    of each image: the retrieval_recall dict (R@1/5/10 both ways, mean_recall, num_images, num_texts)."""
    image_ND, text_MD, owner_M = embed_captioned(bundle, data, batch_size=batch_size, max_samples=max_samples,
                                                 images_list=images_list, progress=progress)
    return retrieval_recall(image_ND, text_MD, owner_M)


def run_cli(args) -> dict:
    """`contrastive retrieval`: score a saved model (run, checkpoint or export directory) on a captioned set and
    write CLIP_benchmark's result shape to --output."""
    import json
    from pathlib import Path

    from contrastive.loading import load_for_inference
    from contrastive.eval.captioned import open_captioned
    from contrastive.eval.gpu import move_to_gpu

    if args.batch_size <= 0 or args.max_samples < 0:
        raise UserError("--batch-size must be > 0 and --max-samples >= 0")
    if not Path(args.model).exists():  # before reading any data
        raise UserError(f"--model {args.model} does not exist")
    layout = open_captioned(args.data, images_list=args.images_list).layout  # data errors before loading
    bundle, info = load_for_inference(args.model)
    move_to_gpu(bundle)
    scores = score_retrieval(bundle, args.data, batch_size=args.batch_size, max_samples=args.max_samples,
                             images_list=args.images_list, progress=True)
    result = {"dataset": args.data, "model": str(args.model), "task": "zeroshot_retrieval",
              "metrics": {k: v for k, v in scores.items() if "recall" in k},
              **{k: v for k, v in scores.items() if k.startswith("num_")},
              "layout": layout, "images_list": args.images_list, "max_samples": args.max_samples,
              "model_checkpoint": info.get("checkpoint"), "model_step": info.get("step")}
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2))
    return result
