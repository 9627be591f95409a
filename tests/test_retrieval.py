"""Chunked FAISS retrieval recall equals a brute-force full-matrix reference, ties included."""
import json

import numpy as np
import pytest

import eval.retrieval as retrieval
from contrastive.errors import UserError
from eval.retrieval import captions_of, retrieval_recall

KS = (1, 5, 10)


def reference_recall(image_ND, text_MD, owner_M, ks=KS) -> dict:
    """The whole N x M score matrix in float64; a match counts within k when fewer than k items score higher."""
    scores_MN = np.asarray(text_MD, np.float64) @ np.asarray(image_ND, np.float64).T
    out = {}
    for k in ks:
        t2i = [(row > row[owner_M[j]]).sum() < k for j, row in enumerate(scores_MN)]
        out[f"image_retrieval_recall@{k}"] = float(np.mean(t2i))
        i2t = []
        for i in range(len(image_ND)):
            mine = np.flatnonzero(owner_M == i)
            if len(mine):
                column = scores_MN[:, i]
                i2t.append((column > column[mine].max()).sum() < k)
        out[f"text_retrieval_recall@{k}"] = float(np.mean(i2t))
    out["mean_recall"] = float(np.mean(list(out.values())))
    return out


def argsort_recall(image_ND, text_MD, owner_M, ks=KS) -> dict:
    """Another way: sort each query's whole gallery (np.lexsort on score, then true matches first among equal
    scores, the documented tie rule) and read off the rank of the first true match."""
    scores_MN = np.asarray(text_MD, np.float64) @ np.asarray(image_ND, np.float64).T
    positive_MN = owner_M[:, None] == np.arange(len(image_ND))[None, :]

    def first_hit_ranks(scores_QG, positive_QG):
        ranks = []
        for row, positive in zip(scores_QG, positive_QG):
            if positive.any():
                order = np.lexsort((~positive, -row))  # last key first: by score, then positives first
                ranks.append(int(np.argmax(positive[order])))
        return np.array(ranks)

    t2i, i2t = first_hit_ranks(scores_MN, positive_MN), first_hit_ranks(scores_MN.T, positive_MN.T)
    out = {}
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = float(np.mean(t2i < k))
        out[f"text_retrieval_recall@{k}"] = float(np.mean(i2t < k))
    out["mean_recall"] = float(np.mean(list(out.values())))
    return out


def tied_data(seed: int, num_images: int = 240, dim: int = 12):
    """Small-integer embeddings: every score is an exact integer in float32, so ties are real ties; plus planted
    duplicate images and captions, images with several captions and images with none."""
    rng = np.random.default_rng(seed)
    image = rng.integers(-2, 3, size=(num_images, dim)).astype(np.float32)
    image[10:20] = image[0]             # ten copies of one image
    owner = np.concatenate([np.arange(num_images - 15), rng.integers(0, num_images - 15, size=200)])
    text = image[owner] + rng.integers(-1, 2, size=(len(owner), dim)).astype(np.float32)
    text[5:9] = text[4]                 # duplicate captions of different images
    return image, text, owner


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_chunked_recall_equals_full_matrix_with_ties(seed):
    image, text, owner = tied_data(seed)
    got = retrieval_recall(image, text, owner, ks=KS, chunk_size=37, use_gpu=False)
    want = reference_recall(image, text, owner)
    assert argsort_recall(image, text, owner) == pytest.approx(want, abs=1e-12)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    assert got["num_images_without_caption"] == 15
    # Ties matter here: breaking them against the true match would give a different, lower number.
    scores = text @ image.T
    strict_rank = np.array([(row >= row[owner[j]]).sum() - 1 for j, row in enumerate(scores)])
    assert np.mean(strict_rank < 1) < got["image_retrieval_recall@1"]


def test_chunked_recall_equals_full_matrix_on_real_valued_embeddings():
    rng = np.random.default_rng(5)
    image = rng.normal(size=(500, 32)).astype(np.float32)
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    owner = np.arange(500)
    text = image + 0.2 * rng.normal(size=image.shape).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    got = retrieval_recall(image, text, owner, chunk_size=64, use_gpu=False)
    want = reference_recall(image, text, owner)
    assert {k: got[k] for k in want} == want
    assert 0.05 < got["image_retrieval_recall@1"] < 0.95  # a non-trivial case


def test_queries_go_to_faiss_in_chunks(monkeypatch):
    """No step sees more than chunk_size queries at once: memory is chunk x K, never N x M."""
    seen = []
    make = retrieval._flat_index

    class Recording:
        def __init__(self, index):
            self.index = index

        def search(self, x, k):
            seen.append((len(x), k))
            return self.index.search(x, k)

    monkeypatch.setattr(retrieval, "_flat_index", lambda g, use_gpu: Recording(make(g, use_gpu)))
    image, text, owner = tied_data(3)
    retrieval_recall(image, text, owner, chunk_size=50, use_gpu=False)
    assert seen and max(n for n, _ in seen) <= 50 and {k for _, k in seen} == {10}
    assert sum(n for n, _ in seen) == len(text) + len(image) - 15


def test_gallery_smaller_than_k():
    image = np.eye(3, dtype=np.float32)
    text = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1]], dtype=np.float32)
    got = retrieval_recall(image, text, np.array([0, 1, 2]), use_gpu=False)
    want = reference_recall(image, text, np.array([0, 1, 2]))
    assert {k: got[k] for k in want} == want
    assert got["image_retrieval_recall@1"] == pytest.approx(1 / 3) and got["image_retrieval_recall@5"] == 1.0


def test_bad_caption_owner_is_a_user_error():
    with pytest.raises(UserError, match="index of its image"):
        retrieval_recall(np.eye(2, dtype=np.float32), np.eye(2, dtype=np.float32), np.array([0, 5]), use_gpu=False)


def test_captions_of_a_sample_json_list_else_txt_lines():
    from eval.captioned import sample_captions

    as_json = {"txt": b"a red circle", "json": json.dumps({"captions": ["a red circle", " a round red thing "]})}
    assert sample_captions(as_json) == ["a red circle", "a round red thing"]
    assert sample_captions({"txt": b"a red circle\n\na round red thing\n"}) == ["a red circle", "a round red thing"]
    assert sample_captions({"txt": b"blue square", "json": b'{"captions": []}'}) == ["blue square"]
    assert sample_captions({"txt": b"blue square", "json": b"not json"}) == ["blue square"]
    assert sample_captions({"jpg": b""}) == []
    flat, owner = captions_of([["a red circle", "a round red thing"], [], ["blue square"]])
    assert flat == ["a red circle", "a round red thing", "blue square"]
    assert owner.tolist() == [0, 0, 2]


def test_retrieval_evaluator_plugin(synthetic_data):
    """The training-loop plug-in, found by name, against embeddings computed here one sample at a time."""
    import torch

    from contrastive.config import EvaluatorConfig, ModelConfig
    from contrastive.data import decode_image, eval_samples
    from contrastive.evaluators import resolve
    from contrastive.models import build_model

    torch.manual_seed(0)
    bundle = build_model(ModelConfig(name="tiny-vit-32"))
    bundle.model.eval()
    evaluator = resolve("retrieval")(EvaluatorConfig(name="retrieval", data=synthetic_data["val"], max_samples=40),
                                     batch_size=16)
    metrics = evaluator(bundle)
    assert evaluator.tag == "retrieval" and set(metrics) == {f"{side}_retrieval_recall@{k}" for side in
                                                            ("image", "text") for k in KS} | {"mean_recall"}
    images, texts = [], []
    with torch.no_grad():
        for sample in eval_samples(synthetic_data["val"]):
            if len(images) == 40:
                break
            x = bundle.preprocess_val(decode_image(sample["jpg"]))[None]
            images.append(bundle.model.encode_image(x, normalize=True)[0].numpy())
            texts.append(bundle.model.encode_text(bundle.tokenizer([sample["txt"].decode()]), normalize=True)[0].numpy())
    want = reference_recall(np.stack(images), np.stack(texts), np.arange(40))
    assert metrics == pytest.approx(want)
