"""Chunked FAISS retrieval recall equals a brute-force full-matrix reference, ties included."""
import json
from pathlib import Path

import numpy as np
import pytest

import contrastive.eval.retrieval as retrieval
from contrastive.errors import UserError
from contrastive.eval.retrieval import captions_of, retrieval_recall

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
    from contrastive.eval.captioned import sample_captions

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


# ---------------------------------------------------------------- captioned sets in three layouts

def _captions(n: int) -> list[str]:
    """Two to four captions of image n; some hold commas (quoted in Kaggle's CSV, bare in CLIP_benchmark's)."""
    words = ["red", "green", "blue", "dark", "bright", "striped", "plain", "noisy"]
    own = [f"a {words[n % 8]} picture number {n}", f"image {n}, {words[(n * 3) % 8]} and {words[(n * 5) % 8]}",
           f"photo of thing {n}", f"the {words[(n + 1) % 8]} one"]
    return own[:2 + n % 3]


def build_flickr_like(root, num_images: int = 12) -> dict:
    """The same JPEGs and captions in the three layouts eval/captioned.py reads, plus a split file of the
    first two thirds of the images."""
    import csv
    import io

    import webdataset as wds
    from PIL import Image

    rng = np.random.default_rng(0)
    names = [f"{1000 + n}_{n:04x}.jpg" for n in range(num_images)]
    jpegs = []
    for n in range(num_images):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)).save(buf, format="JPEG")
        jpegs.append(buf.getvalue())
    kaggle, cb, shards = root / "kaggle", root / "cb", root / "shards"
    for folder in (kaggle / "Images", cb, shards):
        folder.mkdir(parents=True)
    with open(kaggle / "captions.txt", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption"])
        writer.writerows([name, caption] for n, name in enumerate(names) for caption in _captions(n))
    lines = ["image,caption"] + [f"{name},{caption}" for n, name in enumerate(names) for caption in _captions(n)]
    (cb / "flickr8k_test_karpathy.txt").write_text("\n".join(lines) + "\n")
    (cb / "flickr8k_train_karpathy.txt").write_text("image,caption\nnot_here.jpg,a train caption\n")
    with wds.TarWriter(str(shards / "00000.tar")) as sink:
        for n, (name, jpeg) in enumerate(zip(names, jpegs)):
            (kaggle / "Images" / name).write_bytes(jpeg)
            (cb / name).write_bytes(jpeg)
            captions = _captions(n)
            # Half keep every caption in the JSON (the .txt holds the first), half in a multi-line .txt.
            sample = ({"txt": captions[0], "json": {"captions": captions}} if n % 2 else
                      {"txt": "\n".join(captions), "json": {"n": n}})
            sink.write({"__key__": name[:-4], "jpg": jpeg, **sample})
    split = root / "split.txt"
    split.write_text("\n".join(names[: 2 * num_images // 3]) + "\n")
    return {"root": root, "names": names, "kaggle": kaggle, "cb": cb, "shards": str(shards / "00000.tar"),
            "split": split, "captions": [_captions(n) for n in range(num_images)]}


@pytest.fixture(scope="module")
def flickr_like(tmp_path_factory) -> dict:
    return build_flickr_like(tmp_path_factory.mktemp("flickr"))


def test_three_layouts_read_the_same_images_and_captions(flickr_like, tmp_path):
    from contrastive.eval.captioned import open_captioned

    f = flickr_like
    want = list(zip(f["names"], f["captions"]))

    def listed(data, **kw):
        found = open_captioned(str(data), **kw)
        rows = list(found.samples())
        assert [n for n, _, _ in rows] == list(range(len(rows)))
        return found.layout, [(Path(src).name if found.layout != "shards" else None, caps) for _, src, caps in rows]

    assert listed(f["kaggle"]) == ("kaggle", want)
    assert listed(f["kaggle"] / "captions.txt") == ("kaggle", want)
    assert listed(f["cb"]) == ("clip_benchmark", want)  # the test split's file, not the train one
    assert listed(f["cb"] / "flickr8k_test_karpathy.txt") == ("clip_benchmark", want)
    assert listed(f["shards"]) == ("shards", [(None, caps) for _, caps in want])
    assert listed(Path(f["shards"]).parent) == ("shards", [(None, caps) for _, caps in want])
    assert listed(f["kaggle"], images_list=str(f["split"])) == ("kaggle", want[:8])
    assert listed(f["cb"], images_list=str(f["split"])) == ("clip_benchmark", want[:8])
    assert [caps for _, _, caps in open_captioned(str(f["kaggle"])).samples(max_samples=3)] == f["captions"][:3]


def test_captioned_set_mistakes_are_user_errors(flickr_like, tmp_path):
    from contrastive.eval.captioned import open_captioned

    f = flickr_like
    with pytest.raises(UserError, match="a shard set is its own split"):
        open_captioned(f["shards"], images_list=str(f["split"]))
    with pytest.raises(UserError, match="does not exist"):
        open_captioned(str(f["kaggle"]), images_list=str(tmp_path / "nope.txt"))
    (tmp_path / "other.txt").write_text("9999_x.jpg\n")
    with pytest.raises(UserError, match="1 image.* have no caption"):
        open_captioned(str(f["kaggle"]), images_list=str(tmp_path / "other.txt"))
    with pytest.raises(UserError, match="give the one to use"):  # two splits, no test split among them
        bad = tmp_path / "two"
        bad.mkdir()
        for split in ("train", "val"):
            (bad / f"flickr8k_{split}_karpathy.txt").write_text("image,caption\n")
        open_captioned(str(bad))
    with pytest.raises(UserError, match="not in"):
        (f["cb"] / "flickr30k_test_karpathy.txt").write_text("image,caption\nmissing.jpg,a caption\n")
        try:
            open_captioned(str(f["cb"] / "flickr30k_test_karpathy.txt"))
        finally:
            (f["cb"] / "flickr30k_test_karpathy.txt").unlink()
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "captions.txt").write_text("file,text\na.jpg,b\n")
    with pytest.raises(UserError, match="header 'image,caption'"):
        open_captioned(str(tmp_path / "csv"))
    with pytest.raises(UserError, match="neither a captioned image folder"):
        open_captioned(str(tmp_path / "two" / ".."))  # a folder of folders and text files


def _one_by_one(bundle, jpegs: list[bytes], captions: list[list[str]]):
    """Embeddings computed here: each image and each caption through the model's own encoders on its own."""
    import torch

    from contrastive.data import decode_image

    with torch.no_grad():
        image = [bundle.model.encode_image(bundle.preprocess_val(decode_image(j))[None], normalize=True)[0]
                 for j in jpegs]
        text = [bundle.model.encode_text(bundle.tokenizer([c]), normalize=True)[0] for caps in captions for c in caps]
    owner = np.array([i for i, caps in enumerate(captions) for _ in caps])
    return torch.stack(image).numpy(), torch.stack(text).numpy(), owner


def test_retrieval_command_end_to_end(flickr_like, tmp_path, capsys):
    from contrastive.loading import load_for_inference
    from contrastive.cli import main
    from contrastive.export import export
    from tests.test_search import save_random_model

    f = flickr_like
    model = save_random_model(tmp_path / "model", "tiny-vit-32")
    results = {}
    for name, data, extra in (("kaggle", f["kaggle"], ["--images-list", str(f["split"])]),
                              ("cb", f["cb"] / "flickr8k_test_karpathy.txt", ["--images-list", str(f["split"])]),
                              ("shards", f["shards"], ["--max-samples", "8"])):
        out = tmp_path / f"{name}.json"
        code = main(["retrieval", "--model", str(model), "--data", str(data), "--output", str(out),
                     "--batch-size", "3", *extra])
        printed = capsys.readouterr().out.strip()
        assert code == 0 and len(printed.splitlines()) == 1 and printed.endswith(f"results: {out}")
        results[name] = json.loads(out.read_text())
    num_texts = sum(len(c) for c in f["captions"][:8])
    want_keys = {f"{side}_retrieval_recall@{k}" for side in ("image", "text") for k in KS} | {"mean_recall"}
    for result in results.values():
        assert set(result["metrics"]) == want_keys and result["task"] == "zeroshot_retrieval"
        assert (result["num_images"], result["num_texts"]) == (8, num_texts)
        assert result["metrics"] == pytest.approx(results["kaggle"]["metrics"], abs=1e-9)
    bundle, _ = load_for_inference(model)
    jpegs = [(f["kaggle"] / "Images" / name).read_bytes() for name in f["names"][:8]]
    want = reference_recall(*_one_by_one(bundle, jpegs, f["captions"][:8]))
    assert results["kaggle"]["metrics"] == pytest.approx(want, abs=1e-9)
    assert 0 < want["image_retrieval_recall@1"] < 1  # not a trivial case
    # An exported model scores the same.
    export(model, "open_clip", tmp_path / "oc", check=False, progress=False)
    assert main(["retrieval", "--model", str(tmp_path / "oc"), "--data", str(f["kaggle"]), "--output",
                 str(tmp_path / "oc.json"), "--images-list", str(f["split"])]) == 0
    capsys.readouterr()
    assert json.loads((tmp_path / "oc.json").read_text())["metrics"] == pytest.approx(want, abs=1e-6)
    # Mistakes a user can make: one line, exit 2.
    for args, message in ((["--model", str(tmp_path / "none")], "does not exist"),
                          (["--model", str(model), "--images-list", str(f["split"]), "--data", f["shards"]],
                           "its own split"),
                          (["--model", str(model), "--data", str(tmp_path / "nowhere.tar")], "")):
        base = ["retrieval", "--data", str(f["kaggle"]), "--output", str(tmp_path / "x.json")]
        code = main(base + args)
        err = capsys.readouterr().err.strip()
        assert code == 2 and message in err and len(err.splitlines()) == 1, err


def test_index_retrieval_metrics_pair_every_caption(flickr_like, tmp_path):
    """`index --retrieval-metrics` on a set with several captions per image (JSON lists and multi-line .txt)
    scores every caption of each image, not one text per sample."""
    from contrastive.loading import load_for_inference
    from contrastive.eval.embed import read_embeddings
    from contrastive.eval.index import build_index_dir
    from tests.test_search import save_random_model

    f = flickr_like
    model = save_random_model(tmp_path / "model", "tiny-vit-32")
    params = build_index_dir(model=str(model), data=f["shards"], out=tmp_path / "index", batch_size=5,
                             retrieval_metrics=True)
    got = json.loads((tmp_path / "index" / "retrieval.json").read_text())
    assert params.extra["retrieval"] == got
    assert (got["num_images"], got["num_texts"]) == (12, sum(len(c) for c in f["captions"]))
    bundle, _ = load_for_inference(model)
    stored, _, _ = read_embeddings(tmp_path / "index")  # the index's float16 image rows, as it scores them
    stored = stored.astype(np.float32) / np.linalg.norm(stored.astype(np.float32), axis=1, keepdims=True)
    _, text, owner = _one_by_one(bundle, [(f["cb"] / n).read_bytes() for n in f["names"]], f["captions"])
    want = reference_recall(stored, text, owner)
    assert {k: got[k] for k in want} == pytest.approx(want, abs=1e-9)


def test_agrees_with_clip_benchmark_zeroshot_retrieval(tmp_path):
    """Same model, same images, same annotation file: our recalls and CLIP_benchmark's zeroshot_retrieval
    (its Flickr dataset reader and evaluate) agree within 0.005, every K both ways. CLIP_benchmark breaks score
    ties by torch.topk's order and ours go to the true match; with real-valued embeddings there are none."""
    pytest.importorskip("clip_benchmark.metrics.zeroshot_retrieval", reason="clip-benchmark (dev extra) is missing")
    import torch
    from clip_benchmark.datasets.flickr import Flickr
    from clip_benchmark.metrics.zeroshot_retrieval import evaluate
    from torch.utils.data import DataLoader, default_collate

    from contrastive.config import ModelConfig
    from contrastive.models import build_model
    from contrastive.eval.retrieval import score_retrieval

    f = build_flickr_like(tmp_path, num_images=40)
    torch.manual_seed(0)
    bundle = build_model(ModelConfig(name="tiny-vit-32"))
    bundle.model.eval()
    ann = f["cb"] / "flickr8k_test_karpathy.txt"
    dataset = Flickr(root=str(f["cb"]), ann_file=str(ann), transform=bundle.preprocess_val)
    # CLIP_benchmark's image_captions_collate_fn (builder.py): images stacked, caption lists kept as they are.
    loader = DataLoader(dataset, batch_size=16, collate_fn=lambda b: (default_collate([x for x, _ in b]),
                                                                      [y for _, y in b]))
    # amp off: on a CPU CLIP_benchmark's autocast would run the towers in bfloat16, which ours does not.
    theirs = evaluate(bundle.model, loader, bundle.tokenizer, "cpu", amp=False, recall_k_list=list(KS))
    ours = score_retrieval(bundle, str(f["cb"]), batch_size=7)
    assert (ours["num_images"], ours["num_texts"]) == (40, sum(len(c) for c in f["captions"]))
    assert set(theirs) == {k for k in ours if "@" in k}
    for key, value in theirs.items():
        assert abs(ours[key] - value) <= 0.005, (key, ours[key], value)
    assert 0.05 < ours["text_retrieval_recall@5"] < 0.95 and 0.05 < ours["image_retrieval_recall@5"] < 0.95
