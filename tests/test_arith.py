"""Embedding arithmetic eval on a hand-built embedding set whose answers are known."""
import numpy as np
import pandas as pd
import pytest

from contrastive.errors import UserError
from eval.arith import arithmetic_eval, build_queries

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
