"""`contrastive index`, `search` and `arith-eval` end to end on synthetic shards with a tiny model, plus query
composition and the errors a user can cause."""
import json
import tarfile

import numpy as np
import pytest

from contrastive.cli import main
from contrastive.errors import UserError
from contrastive.eval.search import compose_query


@pytest.fixture(autouse=True)
def _one_faiss_thread():
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def save_random_model(directory, name: str):
    """A randomly initialised model saved as a checkpoint directory (model.safetensors + model.json)."""
    from safetensors.torch import save_file

    from contrastive.checkpoint import ARCH_FILE, MODEL_FILE
    from contrastive.config import ModelConfig
    from contrastive.models import build_model

    import torch

    torch.manual_seed(0)
    bundle = build_model(ModelConfig(name=name))
    directory.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in bundle.model.state_dict().items()}, str(directory / MODEL_FILE))
    (directory / ARCH_FILE).write_text(json.dumps({"model_cfg": bundle.model_cfg,
                                                   "preprocess_cfg": bundle.preprocess_cfg}))
    return directory


@pytest.fixture(scope="module")
def built(tmp_path_factory, synthetic_data):
    """A tiny random model and an exact index of the 128 validation samples."""
    root = tmp_path_factory.mktemp("search")
    model = save_random_model(root / "model", "tiny-vit-32")
    index = root / "index"
    assert main(["index", "--model", str(model), "--data", synthetic_data["val"], "--out", str(index),
                 "--batch-size", "64", "--retrieval-metrics"]) == 0
    return {"root": root, "model": model, "index": index, "val": synthetic_data["val"]}


def run(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip()


def test_index_directory_layout(built):
    from contrastive.eval.embed import read_embeddings

    index = built["index"]
    params = json.loads((index / "index.json").read_text())
    assert params["type"] == "flat" and params["count"] == 128 and params["dim"] == 64
    assert params["extra"]["data"] == built["val"]
    image, text, meta = read_embeddings(index)
    assert image.dtype == np.float16 and image.shape == (128, 64) and text.shape == (128, 64)
    assert np.allclose(np.linalg.norm(image.astype(np.float32), axis=1), 1, atol=2e-3)
    assert {"image_path", "caption", "color", "shape", "size"} <= set(meta.columns)
    from contrastive.eval.search import Gallery

    # Retrieval of each image with its own caption, against the full-matrix reference on the stored embeddings.
    from tests.test_retrieval import reference_recall

    unit = [e.astype(np.float32) / np.linalg.norm(e.astype(np.float32), axis=1, keepdims=True) for e in (image, text)]
    saved = json.loads((index / "retrieval.json").read_text())
    assert {k: saved[k] for k in reference_recall(*unit, np.arange(128))} == reference_recall(*unit, np.arange(128))
    gallery = Gallery(index)
    rows = gallery.embedding_rows([3, 100])  # through memory maps, before anything loads all rows
    assert np.allclose(rows, gallery.image_embeddings[[3, 100]]) and gallery.keys[3] == meta["image_path"][3]


def test_text_search_matches_brute_force(built, tmp_path, capsys):
    from contrastive.loading import load_for_inference
    from contrastive.eval.embed import read_embeddings
    from contrastive.eval.search import encode_texts

    out = tmp_path / "r.json"
    code, stdout, err = run(["search", "--index", str(built["index"]), "--text", "a red circle", "-k", "5",
                             "--json", str(out)], capsys)
    assert code == 0, err
    result = json.loads(out.read_text())
    keys = [r["image_path"] for r in result["results"]]
    # Reference: the same text embedding against every stored image embedding, sorted in numpy.
    bundle, _ = load_for_inference(built["model"])
    query = encode_texts(bundle, ["a red circle"])[0]
    image, _, meta = read_embeddings(built["index"])
    image = image.astype(np.float32)
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    scores = image @ query
    expected = meta["image_path"].to_numpy()[np.argsort(-scores, kind="stable")[:5]].tolist()
    assert keys == expected
    assert [r["score"] for r in result["results"]] == pytest.approx(np.sort(scores)[::-1][:5].tolist(), abs=1e-5)
    assert keys[0] in stdout and str(out) in stdout


def test_image_arithmetic_excludes_the_query_image(built, tmp_path, capsys):
    from contrastive.eval.embed import read_embeddings

    _, _, meta = read_embeddings(built["index"])
    key = meta["image_path"][0]
    out = tmp_path / "r.json"
    # The query image by key: its own embedding would rank first with W = 0.
    code, _, err = run(["search", "--index", str(built["index"]), "--image", key, "--minus", "red", "--plus", "blue",
                        "--weight", "0", "-k", "5", "--json", str(out), "--grid", str(tmp_path / "g.png")], capsys)
    assert code == 0, err
    result = json.loads(out.read_text())
    assert key not in [r["image_path"] for r in result["results"]] and len(result["results"]) == 5
    assert result["query"]["excluded_as_query_image"] == [key]
    assert (tmp_path / "g.png").stat().st_size > 0
    # The same image as a file: recognised by its embedding and left out too.
    from contrastive.data import expand_sources

    with tarfile.open(expand_sources(built["val"])[0][0]) as tar:
        data = tar.extractfile(f"{key}.jpg").read()
    (tmp_path / "q.jpg").write_bytes(data)
    code, _, err = run(["search", "--index", str(built["index"]), "--image", str(tmp_path / "q.jpg"),
                        "-k", "3", "--json", str(out)], capsys)
    assert code == 0, err
    result = json.loads(out.read_text())
    assert key not in [r["image_path"] for r in result["results"]] and key in result["query"]["excluded_as_query_image"]


def test_arith_eval_from_the_command_line(built, tmp_path, capsys):
    out = tmp_path / "arith.json"
    code, stdout, err = run(["arith-eval", "--index", str(built["index"]), "--attribute", "color",
                             "--weights", "0.5,1", "--output", str(out)], capsys)
    assert code == 0, err
    result = json.loads(out.read_text())
    assert result["attribute"] == "color" and result["keep"] == ["shape", "size"]
    assert set(result["recall"]) == {"arithmetic", "image_only", "text_only", "image_plus_text"}
    assert set(result["recall"]["arithmetic"]) == {"1", "5", "10"} and set(result["weight_sweep"]) == {"0.5", "1"}
    assert result["num_queries"] + result["num_skipped_no_target"] == 128 * 5
    assert out.with_suffix(".png").stat().st_size > 0 and "image_plus_text" in stdout


def test_rebuilding_needs_overwrite_and_loses_nothing(built, capsys):
    before = (built["index"] / "index.json").read_text()
    code, _, err = run(["index", "--model", str(built["model"]), "--data", built["val"], "--out",
                        str(built["index"])], capsys)
    assert code == 2 and "--overwrite" in err and len(err.splitlines()) == 1
    assert (built["index"] / "index.json").read_text() == before


@pytest.mark.parametrize("make_args,message", [
    (lambda b, t: ["search", "--index", str(t / "none"), "--text", "x"], "does not exist"),
    (lambda b, t: ["search", "--index", str(b["index"]), "--image", str(t / "bad.jpg")], "cannot be read"),
    (lambda b, t: ["search", "--index", str(b["index"]), "--image", str(t / "missing.jpg")], "neither an image file"),
    (lambda b, t: ["search", "--index", str(b["index"])], "give a query"),
    (lambda b, t: ["search", "--index", str(b["index"]), "--text", "x", "--model", str(b["root"] / "wide")],
     "embeds to 96 dimensions but the index"),
    (lambda b, t: ["arith-eval", "--index", str(b["index"]), "--attribute", "hue", "--output", str(t / "a.json")],
     "no attribute 'hue'"),
])
def test_user_errors_are_one_line(built, tmp_path, capsys, make_args, message):
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    if not (built["root"] / "wide").exists():
        save_random_model(built["root"] / "wide", "demo-vit-48")
    code, _, err = run(make_args(built, tmp_path), capsys)
    assert code == 2 and message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_partial_index_directory_is_a_user_error(built, tmp_path, capsys):
    import shutil

    partial = tmp_path / "partial"
    shutil.copytree(built["index"], partial)
    (partial / "index.json").unlink()
    code, _, err = run(["search", "--index", str(partial), "--text", "x"], capsys)
    assert code == 2 and "incomplete" in err
    shutil.copytree(built["index"], tmp_path / "short")
    for part in (tmp_path / "short" / "metadata").glob("*.parquet"):
        import pandas as pd

        pd.read_parquet(part).iloc[:10].to_parquet(part)
    code, _, err = run(["search", "--index", str(tmp_path / "short"), "--text", "x"], capsys)
    assert code == 2 and "inconsistent" in err


def test_compose_query():
    e = np.eye(4, dtype=np.float32)
    empty = np.zeros((0, 4), dtype=np.float32)
    assert np.allclose(compose_query(image_D=e[0], text_TD=empty, plus_PD=empty, minus_MD=empty, weight=2), e[0])
    assert np.allclose(compose_query(image_D=None, text_TD=e[1:2], plus_PD=empty, minus_MD=empty, weight=1), e[1])
    q = compose_query(image_D=e[0], text_TD=empty, plus_PD=e[2:3], minus_MD=e[1:2], weight=2)
    assert np.allclose(q, np.array([1, -2, 2, 0]) / 3)
    with pytest.raises(UserError, match="cancel"):
        compose_query(image_D=None, text_TD=empty, plus_PD=e[1:2], minus_MD=e[1:2], weight=1)


def test_search_by_an_indexed_key_alone(built, tmp_path, capsys):
    """The stored embedding is the query: no model is loaded, the key itself never comes back, and the order
    is that of the stored embeddings' cosine similarities."""
    from contrastive.eval.search import Gallery

    gallery = Gallery(built["index"])
    key = gallery.keys[7]
    out = tmp_path / "r.json"
    code, _, err = run(["search", "--index", str(built["index"]), "--image", key, "-k", "4", "--json", str(out),
                        "--model", str(tmp_path / "never-loaded")], capsys)
    assert code == 0, err
    emb = gallery.image_embeddings
    order = [int(i) for i in np.argsort(-(emb @ emb[7]), kind="stable") if i != 7][:4]
    assert [r["image_path"] for r in json.loads(out.read_text())["results"]] == [gallery.keys[i] for i in order]
