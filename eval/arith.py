"""Embedding arithmetic, measured as in SIMAT and Pic2Word: does image - text(value) + text(target) find the image
with the target value that keeps everything else?

For each query image and each other value of the attribute, a hit is a gallery image (never the query itself)
that has the target value and the query's values of the `keep` attributes. A query whose target has no image in
the gallery cannot be answered and is left out (and counted). Arithmetic is compared with three baselines:
the image alone, the target text alone, and image + target text.

Letters in names: N gallery images, Q queries (one per query image and target value), V attribute values,
D embedding dim.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from contrastive.errors import UserError
from contrastive.eval.index import search_excluding

METHODS = ("arithmetic", "image_only", "text_only", "image_plus_text")
DEFAULT_KS = (1, 5, 10)
DEFAULT_WEIGHTS = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0)
# The attributes of the object itself in data_prep.synthetic; kept by default when another one changes.
INTRINSIC = ("shape", "color", "size")
# The bare value word, and the value in a couple of neutral phrases; their mean is the value's text embedding.
DEFAULT_TEMPLATES = ("{c}", "a {c} object", "a picture of something {c}")
# The class name column of a `prep imagefolder` set's samples (e.g. CIFAR-10's held-out split).
CLASS_COLUMN = "classname"


@dataclass
class Queries:
    """(query image row, source value index, target value index) per query, and each query's target signature."""

    rows_Q: np.ndarray
    source_Q: np.ndarray
    target_Q: np.ndarray
    target_sig_Q: np.ndarray
    num_skipped: int


def has_value(frame, column: str) -> np.ndarray:
    """(N,) True where a row has a value of `column`; rows without one (None, NaN, "") stay in the gallery but are
    never queries or hits."""
    series = frame[column]
    return (series.notna() & (series.astype(str).str.strip() != "")).to_numpy()


def signatures(frame, attribute: str, keep: list[str]) -> tuple[np.ndarray, list[str], np.ndarray, dict]:
    """Per gallery row: its value index, the value names, and a code of (value, kept values); -1 for both where
    the row lacks the attribute or a kept one."""
    labelled_N = has_value(frame, attribute)
    for name in keep:
        labelled_N = labelled_N & has_value(frame, name)
    as_text = frame[attribute].astype(str)
    values = sorted(as_text[has_value(frame, attribute)].unique().tolist())
    value_index = {v: i for i, v in enumerate(values)}
    value_N = np.where(labelled_N, as_text.map(value_index).fillna(-1).to_numpy(), -1).astype(np.int64)
    kept = [tuple(r) for r in frame[keep].astype(str).itertuples(index=False)] if keep else [()] * len(frame)
    codes: dict = {}
    sig_N = np.array([codes.setdefault((int(v),) + k, len(codes)) if v >= 0 else -1 for v, k in zip(value_N, kept)],
                     dtype=np.int64)
    return value_N, values, sig_N, {"kept": kept, "codes": codes}


def check_values(attribute: str, values: list[str]) -> None:
    if len(values) < 2:
        what = f"a single value ({values[0]!r})" if values else "no values"
        raise UserError(f"attribute {attribute!r} has {what} in the index; arithmetic needs two or more")


def build_queries(frame, attribute: str, keep: list[str], *, max_query_images: int = 0, seed: int = 0) -> tuple:
    """Every (query image, other value) pair whose target exists in the gallery; query images are the rows with
    a value of the attribute and of every kept one."""
    value_N, values, sig_N, aux = signatures(frame, attribute, keep)
    check_values(attribute, values)
    rows = np.flatnonzero(sig_N >= 0)
    if max_query_images and max_query_images < len(rows):
        rows = np.sort(np.random.default_rng(seed).choice(rows, size=max_query_images, replace=False))
    present = set(sig_N[sig_N >= 0].tolist())
    q_rows, q_src, q_tgt, q_sig, skipped = [], [], [], [], 0
    for row in rows:
        for target in range(len(values)):
            if target == value_N[row]:
                continue
            code = aux["codes"].get((target,) + aux["kept"][row])
            if code is None or code not in present:
                skipped += 1
                continue
            q_rows.append(row), q_src.append(value_N[row]), q_tgt.append(target), q_sig.append(code)
    queries = Queries(np.array(q_rows, dtype=np.int64), np.array(q_src, dtype=np.int64),
                      np.array(q_tgt, dtype=np.int64), np.array(q_sig, dtype=np.int64), skipped)
    return queries, values, sig_N


def _normalise(x_QD: np.ndarray) -> np.ndarray:
    return (x_QD / np.maximum(np.linalg.norm(x_QD, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def query_vectors(method: str, image_ND: np.ndarray, text_VD: np.ndarray, q: Queries, weight: float) -> np.ndarray:
    image = image_ND[q.rows_Q].astype(np.float64)
    source, target = text_VD[q.source_Q].astype(np.float64), text_VD[q.target_Q].astype(np.float64)
    if method == "arithmetic":
        return _normalise(image + weight * (target - source))
    if method == "image_only":
        return _normalise(image)
    if method == "text_only":
        return _normalise(target)
    if method == "image_plus_text":
        return _normalise(image + target)
    raise ValueError(method)


def recall_of(index, queries_QD: np.ndarray, q: Queries, sig_N: np.ndarray, ks: tuple[int, ...],
              *, chunk: int = 8192) -> dict:
    """{"k": fraction of queries with a hit among their top k results (the query image excluded)}."""
    top = max(ks)
    hits = {k: 0 for k in ks}
    for start in range(0, len(queries_QD), chunk):
        stop = start + chunk
        _, I = search_excluding(index, queries_QD[start:stop], top, q.rows_Q[start:stop])
        match = (I >= 0) & (sig_N[np.maximum(I, 0)] == q.target_sig_Q[start:stop, None])
        for k in ks:
            hits[k] += int(match[:, :k].any(axis=1).sum())
    return {str(k): hits[k] / len(queries_QD) for k in ks}


def arithmetic_eval(index, image_ND: np.ndarray, frame, text_VD_by_value: dict, *, attribute: str,
                    keep: list[str], weight: float = 1.0, weights: tuple[float, ...] = DEFAULT_WEIGHTS,
                    ks: tuple[int, ...] = DEFAULT_KS, max_query_images: int = 0, seed: int = 0) -> dict:
    """Recall@k of arithmetic and the three baselines, and arithmetic's recall over a sweep of W.

    index: a faiss index over image_ND's rows (row ids = frame rows); text_VD_by_value: {value: unit (D,)}.
    """
    for name in [attribute, *keep]:
        if name not in frame.columns:
            attrs = [c for c in frame.columns if c not in ("image_path", "caption")]
            raise UserError(f"the index metadata has no attribute {name!r}; it has {attrs}")
    if attribute in keep:
        raise UserError(f"--keep cannot include the attribute being changed ({attribute!r})")
    queries, values, sig_N = build_queries(frame, attribute, keep, max_query_images=max_query_images, seed=seed)
    if not len(queries.rows_Q):
        raise UserError(f"no query has a target image in the gallery ({queries.num_skipped} left out); "
                        f"keep fewer attributes (--keep) or index more images")
    missing = [v for v in values if v not in text_VD_by_value]
    if missing:
        raise UserError(f"no text embedding for attribute values {missing}")
    text_VD = np.stack([np.asarray(text_VD_by_value[v], dtype=np.float32) for v in values])
    recall = {m: recall_of(index, query_vectors(m, image_ND, text_VD, queries, weight), queries, sig_N, ks)
              for m in METHODS}
    sweep = {f"{w:g}": recall_of(index, query_vectors("arithmetic", image_ND, text_VD, queries, w), queries,
                                 sig_N, ks) for w in weights}
    labelled = frame[attribute][sig_N >= 0].astype(str)
    return {"attribute": attribute, "keep": list(keep), "values": values,
            "images_per_value": {v: int((labelled == v).sum()) for v in values},
            "num_labelled_images": int(len(labelled)), "num_queries": int(len(queries.rows_Q)),
            "num_query_images": int(len(np.unique(queries.rows_Q))),
            "num_skipped_no_target": int(queries.num_skipped), "weight": weight, "recall": recall,
            "weight_sweep": sweep}


def default_templates(attribute: str) -> list[str]:
    """The value texts' templates when --templates is not given: a caption rule's own (eval/caption_attributes.py),
    CLIP's 18 CIFAR templates for the class of a classification set (`prep imagefolder` writes it as
    `classname`; the recipe's captions and its zero-shot use the same ones), else the synthetic set's."""
    from contrastive.eval.caption_attributes import RULES
    from contrastive.eval.zeroshot import load_templates

    if attribute in RULES:
        return list(RULES[attribute].templates)
    if attribute == CLASS_COLUMN:
        return load_templates("cifar")
    return list(DEFAULT_TEMPLATES)


def _stem(path: str) -> str:
    return PurePosixPath(str(path).replace("\\", "/")).stem


def join_labels(frame, labels, *, source: str):
    """`frame` with the attribute columns of `labels` (an `image` column of file names, one column per
    attribute) joined by file name without its suffix, matched against the index's `url` column (the input path
    `prep` records) or else its sample keys. Unmatched index rows get no value."""
    from contrastive.eval.caption_attributes import IMAGE_COLUMN
    from contrastive.eval.embed import RESERVED_COLUMNS

    if IMAGE_COLUMN not in labels.columns:
        raise UserError(f"{source} has no {IMAGE_COLUMN!r} column (its columns are {list(labels.columns)})")
    attributes = [c for c in labels.columns if c != IMAGE_COLUMN]
    clash = [c for c in attributes if c in RESERVED_COLUMNS]
    if clash:
        raise UserError(f"{source} has columns named like the index's own {clash}; rename them")
    by_stem = labels.assign(_stem=labels[IMAGE_COLUMN].map(_stem)).drop_duplicates("_stem").set_index("_stem")
    for column in ("url", "image_path"):
        if column in frame.columns:
            stems = frame[column].map(_stem)
            if stems.isin(by_stem.index).any():
                break
    else:
        example = frame["url"].iloc[0] if "url" in frame.columns else frame["image_path"].iloc[0]
        raise UserError(f"no image of {source} matches an indexed image by file name (e.g. "
                        f"{labels[IMAGE_COLUMN].iloc[0]!r} vs the index's {example!r}); index those images")
    joined = frame.drop(columns=[c for c in attributes if c in frame.columns])
    for name in attributes:
        joined[name] = stems.map(by_stem[name]).to_numpy()
    return joined


def read_labels(args, frame):
    """The attribute table named by --labels or --attributes-from-captions (None: the index's metadata only)."""
    import pandas as pd

    from contrastive.eval.caption_attributes import attribute_table, captions_of_index, read_captions

    if args.labels and args.attributes_from_captions is not None:
        raise UserError("give --labels or --attributes-from-captions, not both")
    if args.labels:
        if not Path(args.labels).is_file():
            raise UserError(f"--labels {args.labels} does not exist")
        return pd.read_csv(args.labels, dtype=str, keep_default_na=True), str(args.labels)
    if args.attributes_from_captions is None:
        return None, None
    if args.attributes_from_captions:
        return attribute_table(read_captions(args.attributes_from_captions)), str(args.attributes_from_captions)
    return attribute_table(captions_of_index(frame)), "the index's captions"


def value_embeddings(bundle, values: list[str], templates: list[str]) -> dict:
    """{value: unit text embedding}, each the normalised mean over the templates (as zero-shot class weights)."""
    from contrastive.eval.zeroshot import class_embeddings

    weights_VD = class_embeddings(bundle.model, bundle.tokenizer, values, templates)
    return {v: weights_VD[i].float().cpu().numpy() for i, v in enumerate(values)}


def run_cli(args) -> dict:
    """`contrastive arith-eval`: load the index directory and its model, evaluate, write JSON and a chart."""
    from contrastive.loading import load_for_inference
    from contrastive.eval.gpu import move_to_gpu
    from contrastive.eval.plots import plot_arithmetic
    from contrastive.eval.search import Gallery
    from contrastive.eval.zeroshot import load_templates

    gallery = Gallery(args.index)
    frame = gallery.metadata
    labels, labels_source = read_labels(args, frame)
    if labels is not None:
        frame = join_labels(frame, labels, source=labels_source)
    if args.attribute not in frame.columns:
        from contrastive.eval.caption_attributes import RULES

        attrs = [c for c in frame.columns if c not in ("image_path", "caption", "key")]
        hint = "; read it from captions with --attributes-from-captions" if args.attribute in RULES else ""
        raise UserError(f"the index metadata has no attribute {args.attribute!r}; it has {attrs}{hint}")
    values = sorted(frame.loc[has_value(frame, args.attribute), args.attribute].astype(str).unique().tolist())
    check_values(args.attribute, values)
    if args.keep is None:
        keep = [a for a in INTRINSIC if a != args.attribute and a in frame.columns]
    else:
        keep = [k.strip() for k in args.keep.split(",") if k.strip()]
    templates = load_templates(args.templates) if args.templates else default_templates(args.attribute)
    try:
        weights = tuple(float(w) for w in args.weights.split(",") if w.strip())
    except ValueError:
        raise UserError(f"--weights must be comma-separated numbers, got {args.weights!r}") from None
    model_path = args.model or gallery.params.extra.get("model")
    if not model_path:
        raise UserError(f"{gallery.dir}/index.json names no model; pass --model")
    bundle, _ = load_for_inference(model_path)
    move_to_gpu(bundle)
    gallery.check_model(bundle.model)
    text = value_embeddings(bundle, values, templates)
    result = arithmetic_eval(gallery.index, gallery.image_embeddings, frame, text, attribute=args.attribute,
                             keep=keep, weight=args.weight, weights=weights, max_query_images=args.max_queries,
                             seed=args.seed)
    result.update(index=str(gallery.dir), model=str(model_path), templates=templates, labels=labels_source)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2))
    plot = Path(args.plot) if args.plot else output.with_suffix(".png")
    plot_arithmetic(plot, result)
    result["plot"] = str(plot)
    return result
