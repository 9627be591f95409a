"""bench/arith_real.py end to end on a tiny CIFAR-like folder and a tiny Flickr8k-like tar, with a random model:
shards, index, `arith-eval --attribute classname` and `--attributes-from-captions` joined by file name."""
import csv
import importlib.util
import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from contrastive.eval.zeroshot import load_templates
from tests.test_search import save_random_model

REPO = Path(__file__).resolve().parent.parent

# Per dev image: its captions (5), and the attributes eval/caption_attributes.py must read from them.
FLICKR = {
    "d0_aa.jpg": (["A dog runs .", "A dog and a man in a red shirt", "A man in a red shirt and his dog",
                   "Someone outside", "A park"], {"animal": "dog", "clothing_color": "red"}),
    "d1_bb.jpg": (["A dog", "A puppy in snow", "Snow", "Cold day", "White ground"], {"animal": "dog"}),
    "d2_cc.jpg": (["A cat , a boy in a blue jacket", "A kitten", "A boy in a blue jacket", "Indoors", "A room"],
                  {"animal": "cat", "clothing_color": "blue"}),
    "d3_dd.jpg": (["A cat", "A dog", "A woman in a blue dress", "A woman in a blue dress", "Pets"],
                  {"clothing_color": "blue"}),
    "d4_ee.jpg": (["A dog on a street", "Cars", "A city", "Buildings", "Night"], {}),
    "d5_ff.jpg": (["A horse", "A pony and a girl in a red coat", "A girl in a red coat rides", "Field", "Grass"],
                  {"animal": "horse", "clothing_color": "red"}),
}
TRAIN = {"t0_gg.jpg": ["A cat", "A cat", "A cat", "A cat", "A cat"]}


def _jpeg(rng) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, size=(48, 48, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def flickr_like_tar(path: Path) -> None:
    rng = np.random.default_rng(0)
    captions = io.StringIO()
    writer = csv.writer(captions)
    writer.writerow(["image", "caption"])
    for name, caps in [*((n, c) for n, (c, _) in FLICKR.items()), *TRAIN.items()]:
        writer.writerows([name, c] for c in caps)
    files = {"flickr8k/captions.txt": captions.getvalue().encode(),
             "flickr8k/Flickr_8k.devImages.txt": "".join(n + "\n" for n in FLICKR).encode(),
             "flickr8k/Flickr_8k.trainImages.txt": "".join(n + "\n" for n in TRAIN).encode(),
             **{f"flickr8k/Images/{n}": _jpeg(rng) for n in [*FLICKR, *TRAIN]}}
    with tarfile.open(path, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def cifar_like_folder(root: Path) -> None:
    rng = np.random.default_rng(1)
    for cls in ("airplane", "cat", "ship"):
        (root / cls).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, size=(32, 32, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")


def test_both_cases_end_to_end(tmp_path):
    spec = importlib.util.spec_from_file_location("arith_real", REPO / "bench" / "arith_real.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    model = save_random_model(tmp_path / "model", "tiny-vit-32")
    flickr_like_tar(tmp_path / "flickr.tar")
    cifar_like_folder(tmp_path / "cifar_val")
    out = tmp_path / "out"
    # --max-images 6: two images per CIFAR class, the first six dev images (all of them here).
    code = bench.main(["--cifar-model", str(model), "--flickr-model", str(model), "--out", str(out),
                       "--cifar-val", str(tmp_path / "cifar_val"), "--flickr-tar", str(tmp_path / "flickr.tar"),
                       "--max-images", "6", "--max-queries", "0", "--batch-size", "8"])
    assert code == 0
    results = {r["case"]: r for r in json.loads((out / "arith_real.json").read_text())}
    assert set(results) == {"cifar10 classname", "flickr8k animal", "flickr8k clothing_color"}
    cifar = results["cifar10 classname"]
    assert cifar["images_per_value"] == {"airplane": 2, "cat": 2, "ship": 2} and cifar["num_queries"] == 12
    assert cifar["keep"] == [] and cifar["templates"] == load_templates("cifar")
    for attribute in ("animal", "clothing_color"):
        expected = {}
        for _, attributes in FLICKR.values():
            if attribute in attributes:
                expected[attributes[attribute]] = expected.get(attributes[attribute], 0) + 1
        result = results[f"flickr8k {attribute}"]
        assert result["images_per_value"] == dict(sorted(expected.items())), attribute
        # Every labelled image asks for each other value (all present in this gallery).
        assert result["num_queries"] == sum(expected.values()) * (len(expected) - 1)
        assert set(result["weight_sweep"]) == {"0.25", "0.5", "0.75", "1", "1.5", "2", "3", "4"}
    table = (out / "arith_real.md").read_text()
    assert all(f"| {case} |" in table for case in results)
