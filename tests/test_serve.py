"""`contrastive serve` through an in-process client: the same ranking as `contrastive search`, images read at
their recorded offsets, the caption index, the token, and every bad request answered with one line of JSON
while the service goes on serving."""
import base64
import io
import json
import tarfile

import numpy as np
import pytest

from contrastive.cli import main
from tests.test_search import _one_faiss_thread, save_random_model  # noqa: F401 (an autouse fixture)

pytest.importorskip("fastapi")
pytest.importorskip("httpx")


def build_index(root, data: str):
    """(model, index): a tiny random model and an exact index, with captions, of `data`."""
    model = save_random_model(root / "model", "tiny-vit-32")
    index = root / "index"
    assert main(["index", "--model", str(model), "--data", data, "--out", str(index), "--batch-size", "64",
                 "--text"]) == 0
    return model, index


@pytest.fixture(scope="module")
def served(tmp_path_factory, synthetic_data):
    """A tiny random model, an exact index (with captions) of the 128 validation samples, the service on it."""
    from fastapi.testclient import TestClient

    from contrastive.eval.serve import Limits, SearchService, create_app

    root = tmp_path_factory.mktemp("serve")
    model, index = build_index(root, synthetic_data["val"])
    # A 3 KB upload limit: the synthetic 32 px JPEGs (~1.3 KB) pass, a 64 px noise PNG does not.
    service = SearchService(index, limits=Limits(max_k=20, max_upload_bytes=3000))
    client = TestClient(create_app(service), raise_server_exceptions=False)
    return {"root": root, "model": model, "index": index, "val": synthetic_data["val"], "service": service,
            "client": client}


def shard_member(spec: str, name: str) -> bytes:
    from contrastive.data import expand_sources

    for url in expand_sources(spec)[0]:
        with tarfile.open(url) as tar:
            if name in tar.getnames():
                return tar.extractfile(name).read()
    raise KeyError(name)


def cli_search(built, tmp_path, args) -> dict:
    out = tmp_path / "cli.json"
    assert main(["search", "--index", str(built["index"]), "--json", str(out), *args]) == 0
    return json.loads(out.read_text())


def assert_same_hits(api: dict, cli: dict) -> None:
    assert [h["key"] for h in api["results"]] == [r["image_path"] for r in cli["results"]]
    assert [h["score"] for h in api["results"]] == pytest.approx([r["score"] for r in cli["results"]], abs=1e-6)
    assert [h["caption"] for h in api["results"]] == [r["caption"] for r in cli["results"]]
    assert api["excluded_as_query_image"] == cli["query"]["excluded_as_query_image"]


def test_text_and_arithmetic_rank_as_the_command_line(served, tmp_path):
    client, keys = served["client"], served["service"].gallery.keys
    api = client.post("/search", json={"text": "a red circle", "k": 7}).json()
    assert_same_hits(api, cli_search(served, tmp_path, ["--text", "a red circle", "-k", "7"]))
    assert len(api["results"]) == 7 and [h["rank"] for h in api["results"]] == list(range(1, 8))
    # An indexed image by key, minus and plus texts at one weight W: the query image itself is left out.
    query = {"image_key": keys[5], "minus": [{"text": "blue"}], "plus": ["green"], "weight": 0.5, "k": 6}
    api = client.post("/search", json=query).json()
    cli = cli_search(served, tmp_path, ["--image", keys[5], "--minus", "blue", "--plus", "green", "--weight",
                                        "0.5", "-k", "6"])
    assert_same_hits(api, cli)
    # Only the text side: its sum plus the weighted difference.
    api = client.post("/search", json={"text": ["red", "circle"], "plus": ["large"], "minus": ["small"],
                                       "weight": 2, "k": 5}).json()
    assert_same_hits(api, cli_search(served, tmp_path, ["--text", "red", "--text", "circle", "--plus", "large",
                                                        "--minus", "small", "--weight", "2", "-k", "5"]))


def test_an_uploaded_image_ranks_as_the_same_file_on_the_command_line(served, tmp_path):
    key = served["service"].gallery.keys[9]
    data = shard_member(served["val"], f"{key}.jpg")
    (tmp_path / "q.jpg").write_bytes(data)
    cli = cli_search(served, tmp_path, ["--image", str(tmp_path / "q.jpg"), "--minus", "red", "--plus", "blue",
                                        "-k", "5"])
    assert cli["query"]["excluded_as_query_image"] == [key]  # the same image, recognised by its embedding
    query = {"minus": [{"text": "red"}], "plus": [{"text": "blue"}], "k": 5}
    upload = served["client"].post("/search", data={"query": json.dumps(query)},
                                   files={"image": ("q.jpg", data, "image/jpeg")}).json()
    assert_same_hits(upload, cli)
    as_base64 = served["client"].post("/search", json={**query, "image": base64.b64encode(data).decode()}).json()
    assert_same_hits(as_base64, cli)
    data_url = "data:image/jpeg;base64," + base64.b64encode(data).decode()
    assert_same_hits(served["client"].post("/search", json={**query, "image": data_url}).json(), cli)


def test_term_weights_against_a_composition_by_hand(served):
    """plus/minus weights multiply their texts: normalise(text + 0.3 green - 1.7 blue), ranked in numpy."""
    from contrastive.eval.search import encode_texts

    service = served["service"]
    query = {"text": "a circle", "plus": [{"text": "green", "weight": 0.3}],
             "minus": [{"text": "blue", "weight": 1.7}], "k": 8}
    api = served["client"].post("/search", json=query).json()
    text, green, blue = encode_texts(service.bundle, ["a circle", "green", "blue"]).astype(np.float64)
    q = text + (0.3 * green - 1.7 * blue)
    q /= np.linalg.norm(q)
    scores = service.gallery.image_embeddings.astype(np.float64) @ q
    order = np.argsort(-scores, kind="stable")[:8]
    assert [h["key"] for h in api["results"]] == [service.gallery.keys[i] for i in order]
    assert [h["score"] for h in api["results"]] == pytest.approx(scores[order].tolist(), abs=1e-5)


def test_caption_search_uses_the_text_index(served, tmp_path):
    """modality text: the captions nearest the query, in the order of the stored caption embeddings' cosines,
    as `contrastive search --modality text` returns them; an image query may return its own caption."""
    from contrastive.eval.embed import read_embeddings

    service = served["service"]
    _, text, meta = read_embeddings(served["index"])
    text = text.astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    key = service.gallery.keys[3]
    api = served["client"].post("/search", json={"image_key": key, "modality": "text", "k": 5}).json()
    image = service.gallery.embedding_rows([3])[0]
    order = np.argsort(-(text @ image), kind="stable")[:5]
    assert api["modality"] == "text" and [h["key"] for h in api["results"]] == meta["image_path"][order].tolist()
    assert [h["caption"] for h in api["results"]] == meta["caption"][order].tolist()
    assert_same_hits(api, cli_search(served, tmp_path, ["--image", key, "--modality", "text", "-k", "5"]))
    assert json.loads((served["index"] / "text_index.json").read_text())["count"] == 128


def test_images_come_from_their_recorded_offsets(served, monkeypatch):
    """Every indexed image's bytes equal its tar member's; serving one opens no tar file (no scan)."""
    from contrastive.eval.image_store import ImageStore

    service, client = served["service"], served["client"]
    store = ImageStore(served["index"], service.gallery.params.count)
    for row, key in enumerate(service.gallery.keys):
        assert store.read(row)[0] == shard_member(served["val"], f"{key}.jpg"), key
    hit = client.post("/search", json={"text": "a square", "k": 1}).json()["results"][0]

    def no_scan(*args, **kwargs):
        raise AssertionError("a shard was opened as a tar file at query time")

    monkeypatch.setattr(tarfile, "open", no_scan)
    response = client.get(hit["image_url"])
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    assert response.content == store.read(service.gallery.row_of(hit["key"]))[0]
    assert "max-age" in response.headers["cache-control"]
    again = client.get(hit["image_url"], headers={"If-None-Match": response.headers["etag"]})
    assert again.status_code == 304 and not again.content


def test_a_changed_shard_is_not_read(served, tmp_path):
    """An image whose shard has another size than when it was indexed is a 404, never other bytes."""
    import shutil

    from contrastive.eval.image_store import LOCATIONS_FILE, ImageStore

    copy = tmp_path / "index"
    shutil.copytree(served["index"], copy)
    frame = __import__("pandas").read_parquet(copy / LOCATIONS_FILE)
    shard = tmp_path / "shard.tar"
    shutil.copy(frame["shard"][0], shard)
    frame["shard"] = str(shard)
    frame.to_parquet(copy / LOCATIONS_FILE)
    store = ImageStore(copy, len(frame))
    assert store.read(0) is not None
    with open(shard, "ab") as f:
        f.write(b"\0" * 512)
    assert store.read(0) is None


def test_info_and_health(served):
    client = served["client"]
    assert client.get("/health").json() == {"status": "ok"}
    info = client.get("/info").json()
    assert info["num_vectors"] == 128 and info["dim"] == 64 and info["index"]["type"] == "flat"
    assert info["model"] == str(served["model"].resolve()) and info["text_index"]["type"] == "flat"
    assert info["images_with_location"] == 128 and info["limits"]["max_k"] == 20
    page = client.get("/")
    assert page.status_code == 200 and 'id="results"' in page.text
    for asset in ("static/app.js", "static/style.css"):
        assert client.get(f"/{asset}").status_code == 200


def noise_png(side: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (side, side, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


BAD_REQUESTS = [
    # (what, request kwargs, status, words in the error)
    ("malformed JSON", dict(content=b'{"text": "red",', headers={"content-type": "application/json"}), 400,
     "malformed JSON"),
    ("not an object", dict(json=["red"]), 400, "JSON object"),
    ("empty query", dict(json={"k": 3}), 400, "empty query"),
    ("blank texts", dict(json={"text": "  ", "plus": [""], "k": 3}), 400, "empty query"),
    ("k too large", dict(json={"text": "red", "k": 21}), 400, "between 1 and 20"),
    ("k zero", dict(json={"text": "red", "k": 0}), 400, "between 1 and 20"),
    ("k not a number", dict(json={"text": "red", "k": "many"}), 422, "k:"),
    ("unknown field", dict(json={"txt": "red"}), 422, "txt"),
    ("weight out of range", dict(json={"text": "red", "plus": [{"text": "a", "weight": 99}]}), 422, "weight"),
    ("unknown modality", dict(json={"text": "red", "modality": "audio"}), 422, "modality"),
    ("unknown key", dict(json={"image_key": "no-such-key"}), 404, "no-such-key"),
    ("not an image", dict(files={"image": ("notes.txt", b"hello, not an image", "text/plain")}), 415,
     "not an image"),
    ("upload over the limit", dict(files={"image": ("big.png", noise_png(64), "image/png")}), 413, "limit"),
    ("bad base64", dict(json={"image": "%%% not base64 %%%"}), 400, "base64"),
    ("image twice", dict(data={"query": '{"image": "aGk="}'}, files={"image": ("a.jpg", b"x", "image/jpeg")}), 400,
     "once"),
    ("body over the limit", dict(content=b"{" + b" " * 100_000 + b"}", headers={"content-type": "application/json"}),
     413, "limit"),
    ("other content type", dict(content=b"text=red", headers={"content-type": "text/plain"}), 415, "application/json"),
    ("stray form field", dict(data={"query": "{}", "other": "x"}, files={"image": ("a.jpg", b"x", "image/jpeg")}),
     400, "form field"),
    ("texts that cancel", dict(json={"plus": ["red"], "minus": ["red"]}), 400, "cancel"),
]


@pytest.mark.parametrize("what,request_kwargs,status,words", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_are_answered_and_the_service_goes_on(served, what, request_kwargs, status, words):
    client = served["client"]
    response = client.post("/search", **request_kwargs)
    body = response.json()
    assert response.status_code == status, body
    assert set(body) == {"error"} and words in body["error"] and "\n" not in body["error"]
    assert client.post("/search", json={"text": "red", "k": 2}).status_code == 200


def test_bad_image_and_route_requests(served):
    client = served["client"]
    for path, status in (("/image/no-such-key", 404), ("/nowhere", 404)):
        response = client.get(path)
        assert response.status_code == status and set(response.json()) == {"error"}
    response = client.get("/search")
    assert response.status_code == 405 and set(response.json()) == {"error"}
    assert client.get("/health").status_code == 200


def test_a_caption_query_on_an_index_without_captions(served, tmp_path):
    import shutil

    from fastapi.testclient import TestClient

    from contrastive.eval.index import TEXT_INDEX_FILE
    from contrastive.eval.serve import SearchService, create_app

    copy = tmp_path / "index"
    shutil.copytree(served["index"], copy)
    (copy / TEXT_INDEX_FILE).unlink()
    client = TestClient(create_app(SearchService(copy)))
    response = client.post("/search", json={"text": "red", "modality": "text"})
    assert response.status_code == 400 and "--text" in response.json()["error"]
    assert client.get("/info").json()["text_index"] is None


def test_token(served):
    from fastapi.testclient import TestClient

    from contrastive.eval.serve import TOKEN_COOKIE, create_app

    client = TestClient(create_app(served["service"], token="s3cret/+="))
    for method, path, kwargs in (("get", "/info", {}), ("post", "/search", {"json": {"text": "red"}}),
                                 ("get", "/image/" + served["service"].gallery.keys[0], {})):
        denied = getattr(client, method)(path, **kwargs)
        assert denied.status_code == 401 and denied.headers["www-authenticate"] == "Bearer", path
        wrong = getattr(client, method)(path, headers={"Authorization": "Bearer nope"}, **kwargs)
        assert wrong.status_code == 401
        assert getattr(client, method)(path, headers={"Authorization": "Bearer s3cret/+="}, **kwargs).status_code \
            == 200
    client.cookies.set(TOKEN_COOKIE, "s3cret%2F%2B%3D")  # as the page's encodeURIComponent writes it
    assert client.get("/info").status_code == 200
    client.cookies.clear()
    assert client.get("/health").status_code == 200 and client.get("/").status_code == 200


@pytest.mark.parametrize("host,warned", [("127.0.0.1", False), ("localhost", False), ("0.0.0.0", True),
                                         ("::", True)])
def test_serve_command_warns_off_loopback(served, monkeypatch, capsys, host, warned):
    import uvicorn

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append(kw))
    assert main(["serve", "--index", str(served["index"]), "--host", host, "--port", "8123"]) == 0
    err = capsys.readouterr().err
    assert calls == [{"host": host, "port": 8123, "log_level": "warning", "access_log": False}]
    assert ("warning: serving on" in err) == warned
    if warned:
        assert "--token" in err


def test_serve_command_errors_are_one_line(served, tmp_path, capsys):
    assert main(["serve", "--index", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip()
    assert "does not exist" in err and len(err.splitlines()) == 1
    assert main(["serve", "--index", str(served["index"]), "--model", str(tmp_path / "gone")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_load_benchmark_runs_small(tmp_path, capsys):
    """bench/serve_load.py at a small size (a real `contrastive serve` on loopback), so it does not rot."""
    import importlib.util

    from tests.conftest import REPO

    spec = importlib.util.spec_from_file_location("bench_serve_load", REPO / "bench" / "serve_load.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "load.json"
    assert bench.main(["--num-vectors", "3000", "--model", "tiny-vit-32", "--requests", "12", "--warmup", "2",
                       "--concurrency", "1,3", "--work", str(tmp_path / "work"), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["num_vectors"] == 3000 and result["index"] == "Flat"
    rows = {(r["kind"], r["concurrency"]): r for r in result["rows"]}
    assert set(rows) == {(k, c) for k in ("text", "image", "arithmetic") for c in (1, 3)}
    assert all(r["errors"] == 0 and r["requests"] == 12 and 0 < r["p50_ms"] <= r["p99_ms"] for r in rows.values())
    assert "p99 ms" in capsys.readouterr().out


def test_locations_of_repeated_keys_skipped_samples_and_compressed_shards(tmp_path):
    """Each index row finds its own sample: a key repeated in two shards maps in order, a sample the index
    skipped (no image) is passed over, the image member is chosen as eval/embed.py chooses it (jpg before png),
    and a gzip-compressed shard gives no location rather than a wrong one."""
    import gzip

    from contrastive.eval.embed import IMAGE_KEYS
    from contrastive.eval.image_store import record_locations

    def write_tar(path, members):
        with tarfile.open(path, "w") as tar:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))

    write_tar(tmp_path / "a.tar", [("k1.jpg", b"A1"), ("k1.txt", b"x"), ("k2.txt", b"no image"),
                                   ("k3.png", b"A3png"), ("k3.jpg", b"A3jpg"), ("k3.txt", b"x")])
    write_tar(tmp_path / "b.tar", [("k1.jpg", b"B1"), ("k1.txt", b"x"), ("d/k4.webp", b"B4"),
                                   ("d/k4.txt", b"x")])
    write_tar(tmp_path / "c.tar", [("k5.jpg", b"C5"), ("k5.txt", b"x")])
    (tmp_path / "c.tar.gz").write_bytes(gzip.compress((tmp_path / "c.tar").read_bytes()))
    spec = f"{tmp_path}/{{a,b}}.tar::{tmp_path}/c.tar.gz"
    frame = record_locations(spec, ["k1", "k3", "k1", "d/k4", "k5"], image_exts=tuple(IMAGE_KEYS.split(";")))

    def read(row):
        with open(frame["shard"][row], "rb") as f:
            f.seek(frame["offset"][row])
            return f.read(frame["size"][row])

    assert [read(row) for row in range(4)] == [b"A1", b"A3jpg", b"B1", b"B4"]
    assert frame["ext"].tolist()[:4] == ["jpg", "jpg", "jpg", "webp"]
    assert frame["shard"][0].endswith("a.tar") and frame["shard"][2].endswith("b.tar")
    assert frame["offset"][4] == -1 and frame["shard"][4] == ""
