import hashlib
import io
import json
import re
import tarfile

import pyarrow.parquet as pq
from PIL import Image

from contrastive.data_prep.synthetic import COLORS, SHAPES, generate


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_layout_is_img2dataset(synthetic_data):
    train = synthetic_data["root"] / "train"
    tars = sorted(train.glob("*.tar"))
    assert [t.name for t in tars] == ["00000.tar", "00001.tar", "00002.tar", "00003.tar"]
    for tar in tars:
        stem = tar.stem
        assert (train / f"{stem}.parquet").is_file()
        stats = json.loads((train / f"{stem}_stats.json").read_text())
        assert stats["count"] == stats["successes"] == 128
        with tarfile.open(tar) as tf:
            names = tf.getnames()
        keys = sorted({n.split(".")[0] for n in names})
        assert len(keys) == 128 and all(re.fullmatch(r"\d{9}", k) for k in keys)
        assert keys[0] == f"{stem}0000"
        assert sorted({n.split(".", 1)[1] for n in names}) == ["jpg", "json", "txt"]
        table = pq.read_table(train / f"{stem}.parquet").to_pylist()
        assert [r["key"] for r in table] == keys
    sizes = json.loads((train / "sizes.json").read_text())
    assert sizes == {t.name: 128 for t in tars}
    assert json.loads((synthetic_data["root"] / "val" / "sizes.json").read_text()) == {"00000.tar": 128}


def test_samples_are_consistent(synthetic_data):
    with tarfile.open(synthetic_data["root"] / "train" / "00000.tar") as tf:
        members = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
    key = "000000007"
    meta = json.loads(members[f"{key}.json"])
    caption = members[f"{key}.txt"].decode()
    assert meta["shape"] in SHAPES and meta["color"] in COLORS
    assert meta["caption"] == caption and meta["key"] == key
    img = Image.open(io.BytesIO(members[f"{key}.jpg"]))
    assert img.size == (32, 32) and img.mode == "RGB"
    # Captions vary in phrasing across samples.
    captions = {members[n].decode() for n in members if n.endswith(".txt")}
    templates = {re.sub(r"|".join(list(SHAPES) + list(COLORS)), "_", c) for c in captions}
    assert len(templates) > 8


def test_deterministic_for_a_seed_and_different_across_seeds(tmp_path):
    a = generate(tmp_path / "a", num_samples=40, num_val=8, seed=5, image_size=32, samples_per_shard=16,
                 num_procs=1, progress=False)
    b = generate(tmp_path / "b", num_samples=40, num_val=8, seed=5, image_size=32, samples_per_shard=16,
                 num_procs=2, progress=False)
    c = generate(tmp_path / "c", num_samples=40, num_val=8, seed=6, image_size=32, samples_per_shard=16,
                 num_procs=1, progress=False)
    assert a["train"].endswith("{00000..00002}.tar")
    for split, n in (("train", 3), ("val", 1)):
        for i in range(n):
            name = f"{i:05d}.tar"
            assert _digest(tmp_path / "a" / split / name) == _digest(tmp_path / "b" / split / name)
    assert _digest(tmp_path / "a" / "train" / "00000.tar") != _digest(tmp_path / "c" / "train" / "00000.tar")
    # Train and validation are different draws.
    assert _digest(tmp_path / "a" / "train" / "00000.tar") != _digest(tmp_path / "a" / "val" / "00000.tar")


def test_rerun_keeps_finished_shards(tmp_path):
    generate(tmp_path, num_samples=32, num_val=0, seed=1, image_size=32, samples_per_shard=16, num_procs=1,
             progress=False)
    shard = tmp_path / "train" / "00000.tar"
    mtime = shard.stat().st_mtime_ns
    generate(tmp_path, num_samples=32, num_val=0, seed=1, image_size=32, samples_per_shard=16, num_procs=1,
             progress=False)
    assert shard.stat().st_mtime_ns == mtime
