"""Embedding arithmetic eval on a hand-built embedding set whose answers are known."""
import numpy as np
import pandas as pd
import pytest

from contrastive.errors import UserError
from contrastive.eval.arith import arithmetic_eval, build_queries

COLORS = ["blue", "green", "red"]
SHAPES = ["circle", "square"]


def hand_built(eps: float = 0.05):
    """Two images per (colour, shape) except (blue, square), which has none.

    Image = unit(colour axis + shape axis + eps * own axis); text(colour) = the colour axis. The own axes keep
    every score distinct except where the answer does not depend on the order.
    """
    rows = [(c, s) for c in COLORS for s in SHAPES for _ in range(2) if (c, s) != ("blue", "square")]
    dim = len(COLORS) + len(SHAPES) + len(rows)
    image = np.zeros((len(rows), dim), dtype=np.float32)
    for i, (c, s) in enumerate(rows):
        image[i, COLORS.index(c)] = 1
        image[i, len(COLORS) + SHAPES.index(s)] = 1
        image[i, len(COLORS) + len(SHAPES) + i] = eps
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    text = {c: np.eye(dim, dtype=np.float32)[COLORS.index(c)] for c in COLORS}
    frame = pd.DataFrame({"image_path": [f"{i:04d}" for i in range(len(rows))], "color": [c for c, _ in rows],
                          "shape": [s for _, s in rows], "size": "small"})
    return image, frame, text


def flat_index(image):
    import faiss

    index = faiss.IndexFlatIP(image.shape[1])
    index.add(image)
    return index


def test_known_answers():
    image, frame, text = hand_built()
    result = arithmetic_eval(flat_index(image), image, frame, text, attribute="color", keep=["shape"],
                             weight=1.0, weights=(0.5, 1.0, 2.0), ks=(1, 4, 5))
    # 10 images x 2 other colours = 20 pairs; the 4 whose target is (blue, square) cannot be answered.
    assert result["num_queries"] == 16 and result["num_skipped_no_target"] == 4
    recall = result["recall"]
    # image - red + blue is closest to the blue images of the same shape.
    assert recall["arithmetic"] == {"1": 1.0, "4": 1.0, "5": 1.0}
    # The image alone first finds its twin (same colour and shape): never a hit at 1.
    assert recall["image_only"]["1"] == 0.0
    # The colour text alone scores the four images of that colour equally and every other image at 0, so the
    # two right ones are always within the first 4 (but not necessarily first).
    assert recall["text_only"]["4"] == 1.0
    assert recall["image_plus_text"]["1"] == 1.0
    assert result["weight_sweep"]["1"] == recall["arithmetic"]


def test_the_query_image_is_never_its_own_answer():
    """Keep nothing and change colour: every image of the target colour is a hit, the query itself never is."""
    image, frame, text = hand_built()
    queries, values, sig = build_queries(frame, "color", [])
    assert len(queries.rows_Q) == 20 and queries.num_skipped == 0
    assert all(sig[r] != s for r, s in zip(queries.rows_Q, queries.target_sig_Q))


def test_zero_weight_is_the_image_alone():
    image, frame, text = hand_built()
    result = arithmetic_eval(flat_index(image), image, frame, text, attribute="color", keep=["shape"],
                             weight=1.0, weights=(0.0,), ks=(1, 5, 10))
    assert result["weight_sweep"]["0"] == result["recall"]["image_only"]


def test_bad_attributes_are_user_errors():
    image, frame, text = hand_built()
    with pytest.raises(UserError, match="no attribute 'hue'"):
        arithmetic_eval(flat_index(image), image, frame, text, attribute="hue", keep=[])
    with pytest.raises(UserError, match="single value"):
        arithmetic_eval(flat_index(image), image, frame, text, attribute="size", keep=[])
    with pytest.raises(UserError, match="cannot include the attribute"):
        arithmetic_eval(flat_index(image), image, frame, text, attribute="color", keep=["color"])


def class_swap_set(*, per_class: int = 12, num_unlabelled: int = 12, eps: float = 0.05):
    """Images of three classes, unit(class axis + eps * own axis), and unlabelled images on a shared axis w that
    every class text also points to: text(c) = unit(class axis + 1.5 w), as if captions shared a phrasing that
    some other photos match. Only arithmetic cancels w, so only it can find the target class."""
    classes = ["airplane", "cat", "ship"]
    labels = [c for c in classes for _ in range(per_class)] + [None] * num_unlabelled
    dim = len(classes) + 1 + len(labels)
    w = len(classes)
    image = np.zeros((len(labels), dim), dtype=np.float32)
    for i, c in enumerate(labels):
        image[i, classes.index(c) if c else w] = 1
        image[i, w + 1 + i] = eps
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    text = {}
    for c in classes:
        t = np.zeros(dim, dtype=np.float32)
        t[classes.index(c)], t[w] = 1, 1.5
        text[c] = t / np.linalg.norm(t)
    frame = pd.DataFrame({"image_path": [f"{i:04d}" for i in range(len(labels))], "classname": labels})
    return image, frame, text


def test_class_swap_only_arithmetic_finds_the_target_class():
    image, frame, text = class_swap_set()
    result = arithmetic_eval(flat_index(image), image, frame, text, attribute="classname", keep=[], weights=(1.0,))
    # Unlabelled images are in the gallery but never queries: 36 labelled images x 2 other classes.
    assert result["num_labelled_images"] == 36 and result["num_queries"] == 72
    assert result["images_per_value"] == {"airplane": 12, "cat": 12, "ship": 12}
    recall = result["recall"]
    assert recall["arithmetic"] == {"1": 1.0, "5": 1.0, "10": 1.0}
    # The image alone finds its own class; the text and image + text find the unlabelled images on w first
    # (12 of them), then the query's own class: no hit within 10.
    for method in ("image_only", "text_only", "image_plus_text"):
        assert recall[method]["10"] == 0.0, method


def brute_force_recall(image, frame, text, method: str, weight: float, ks=(1, 5, 10)) -> dict:
    """Every labelled image to every other class present, by full score matrices and a per-query Python loop."""
    labels = [c if isinstance(c, str) else None for c in frame["classname"]]
    classes = sorted({c for c in labels if c})
    hits, num = {k: 0 for k in ks}, 0
    for q, source in enumerate(labels):
        if source is None:
            continue
        for target in classes:
            if target == source:
                continue
            vector = {"arithmetic": image[q] + weight * (text[target] - text[source]), "image_only": image[q],
                      "text_only": text[target], "image_plus_text": image[q] + text[target]}[method]
            scores = image.astype(np.float64) @ (vector / np.linalg.norm(vector))
            scores[q] = -np.inf
            order = np.argsort(-scores, kind="stable")
            num += 1
            for k in ks:
                hits[k] += any(labels[j] == target for j in order[:k])
    return {str(k): hits[k] / num for k in ks}


def test_class_swap_recall_equals_a_brute_force_count():
    """Random embeddings (so no ties) with a fifth of the images unlabelled: hits are judged by class alone."""
    rng = np.random.default_rng(0)
    classes = ["bird", "cat", "dog", "frog"]
    labels = [classes[i % 4] if i % 5 else None for i in range(60)]
    image = rng.normal(size=(60, 16)).astype(np.float32)
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    text = {c: v / np.linalg.norm(v) for c, v in zip(classes, rng.normal(size=(4, 16)).astype(np.float32))}
    frame = pd.DataFrame({"image_path": [str(i) for i in range(60)], "classname": labels})
    result = arithmetic_eval(flat_index(image), image, frame, text, attribute="classname", keep=[], weight=1.5,
                             weights=(0.5,))
    assert result["num_queries"] == 48 * 3
    for method in ("arithmetic", "image_only", "text_only", "image_plus_text"):
        assert result["recall"][method] == pytest.approx(brute_force_recall(image, frame, text, method, 1.5)), method
    assert result["weight_sweep"]["0.5"] == pytest.approx(brute_force_recall(image, frame, text, "arithmetic", 0.5))
