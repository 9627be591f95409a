"""`prep imagefolder` on real photographs: a CIFAR-10 subset streamed out of the shared archive."""
import hashlib
import io
import json
import os
import tarfile
from collections import Counter
from pathlib import Path

import pytest

from contrastive.data_prep.build import BuildOptions
from contrastive.data_prep.imagefolder import DEFAULT_TEMPLATES, prep_imagefolder
from contrastive.data_prep.images import ImageOptions

# The shared archive beside the checkout (../shared), or where this project's machines keep it (a fresh clone
# elsewhere, as CI makes), or CONTRASTIVE_CIFAR10_TAR.
_CANDIDATES = [os.environ.get("CONTRASTIVE_CIFAR10_TAR", ""),
               Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10" / "cifar10-train.tar.gz",
               "/work/shared/data/cifar10/cifar10-train.tar.gz"]
CIFAR = next((Path(c) for c in _CANDIDATES if c and Path(c).is_file()), Path(_CANDIDATES[1]))
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
PER_CLASS = 30


@pytest.fixture(scope="module")
def cifar_subset(tmp_path_factory) -> dict:
    """The first 30 images of each class, as a folder and as a tar.gz with the archive's own paths."""
    if not CIFAR.is_file():
        pytest.skip(f"the shared CIFAR-10 archive {CIFAR} is not on this machine")
    root = tmp_path_factory.mktemp("cifar")
    folder = root / "folder"
    taken = Counter()
    originals = {}
    with tarfile.open(CIFAR, "r|gz") as src, tarfile.open(root / "subset.tar.gz", "w:gz") as dst:
        for member in src:
            if not member.isreg():
                continue
            cls = member.name.split("/")[2]
            if taken[cls] >= PER_CLASS:
                continue
            taken[cls] += 1
            data = src.extractfile(member).read()
            (folder / cls).mkdir(parents=True, exist_ok=True)
            (folder / cls / Path(member.name).name).write_bytes(data)
            dst.addfile(member, io.BytesIO(data))
            originals[f"{cls}/{Path(member.name).name}"] = data
    assert sorted(taken) == CLASSES and set(taken.values()) == {PER_CLASS}
    return {"folder": folder, "tar": root / "subset.tar.gz", "originals": originals}


def _read_shards(split_dir: Path) -> list[list[dict]]:
    return [_read_shard(tar) for tar in sorted(split_dir.glob("[0-9][0-9][0-9][0-9][0-9].tar"))]


def _read_split(split_dir: Path) -> list[dict]:
    return [s for shard in _read_shards(split_dir) for s in shard]


def _read_shard(tar: Path) -> list[dict]:
    with tarfile.open(tar) as tf:
        members = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
    return [{"key": n[:-4], "jpg": members[n], "txt": members[f"{n[:-4]}.txt"].decode(),
             "cls": int(members[f"{n[:-4]}.cls"]), "json": json.loads(members[f"{n[:-4]}.json"])}
            for n in sorted(n for n in members if n.endswith(".jpg"))]


def test_cifar_subset_becomes_a_labelled_captioned_set(cifar_subset, tmp_path):
    opts = BuildOptions(ImageOptions(resize_mode="no"), samples_per_shard=128)
    summary = prep_imagefolder(cifar_subset["tar"], tmp_path / "set", opts=opts, split="train", num_procs=2,
                               progress=False)
    assert summary["num_samples"] == 10 * PER_CLASS and summary["skipped"] == {} and summary["classes"] == 10
    assert (tmp_path / "set" / "classnames.txt").read_text().split("\n")[:-1] == CLASSES
    assert (tmp_path / "set" / "zeroshot_classification_templates.txt").read_text().splitlines() == \
        list(DEFAULT_TEMPLATES)
    samples = _read_split(tmp_path / "set" / "train")
    assert len(samples) == 300 and Counter(s["cls"] for s in samples) == {i: PER_CLASS for i in range(10)}
    for s in samples:
        source = s["json"]["url"]
        assert CLASSES[s["cls"]] == source.split("/")[0] == s["json"]["classname"]
        assert s["txt"] in {t.format(c=CLASSES[s["cls"]]) for t in DEFAULT_TEMPLATES}
        # resize-mode no keeps a plain RGB JPEG's bytes as they were.
        assert hashlib.sha256(s["jpg"]).digest() == hashlib.sha256(cifar_subset["originals"][source]).digest()
    assert len({s["txt"] for s in samples}) > 50  # captions vary over the templates
    # CLIP_benchmark's names: nshards.txt and {0..n-1}.tar beside img2dataset's.
    split = tmp_path / "set" / "train"
    assert (split / "nshards.txt").read_text().strip() == "3"
    assert (split / "2.tar").resolve() == (split / "00002.tar").resolve()
    assert json.loads((split / "sizes.json").read_text()) == {"00000.tar": 128, "00001.tar": 128, "00002.tar": 44}
    assert json.loads((split / "prep.json").read_text())["options"]["shuffle_seed"] is None  # a tar: its own order

    # A folder in folder order gives the same shards as the tar of it (a tar is written in its own order).
    prep_imagefolder(cifar_subset["folder"], tmp_path / "from_folder", opts=opts, shuffle_seed=None, num_procs=1,
                     progress=False)
    for name in ("00000.tar", "00002.tar"):
        assert (split / name).read_bytes() == (tmp_path / "from_folder" / "train" / name).read_bytes()


def test_a_folder_is_written_shuffled_so_that_every_shard_holds_every_class(cifar_subset, tmp_path):
    opts = BuildOptions(ImageOptions(resize_mode="no"), samples_per_shard=60)

    def shards(out: Path, seed) -> list[list[dict]]:
        prep_imagefolder(cifar_subset["folder"], out, opts=opts, shuffle_seed=seed, num_procs=1, progress=False)
        return _read_shards(out / "train")

    in_order, shuffled, again = shards(tmp_path / "a", None), shards(tmp_path / "b", 0), shards(tmp_path / "c", 0)
    # Folder order: 60 per shard, 30 per class, so each shard holds 2 classes.
    assert [len({s["cls"] for s in shard}) for shard in in_order] == [2] * 5
    assert all(len({s["cls"] for s in shard}) >= 8 for shard in shuffled)
    # The same samples (image, caption, label per source), only in another order, and the same order for a seed.
    def by_source(shards_):
        return {s["json"]["url"]: (s["jpg"], s["txt"], s["cls"]) for shard in shards_ for s in shard}
    assert by_source(shuffled) == by_source(in_order) and len(by_source(shuffled)) == 10 * PER_CLASS
    assert [[s["json"]["url"] for s in shard] for shard in shuffled] == \
        [[s["json"]["url"] for s in shard] for shard in again]


def test_prepared_set_is_read_by_zeroshot_and_by_the_loader(cifar_subset, tmp_path):
    import torch

    from contrastive.config import DataConfig
    from contrastive.data import TrainLoader
    from contrastive.distributed import WorldInfo
    from contrastive.eval.zeroshot import LabelledImages, shard_classnames

    opts = BuildOptions(ImageOptions(image_size=32, resize_mode="center_crop"), samples_per_shard=100)
    prep_imagefolder(cifar_subset["tar"], tmp_path / "set", opts=opts, split="test", num_procs=1, progress=False)
    spec = str(tmp_path / "set" / "test" / "{00000..00002}.tar")
    assert shard_classnames(spec) == CLASSES
    images = LabelledImages(spec)
    labels = Counter(label for _, label, _ in images)
    assert labels == {i: PER_CLASS for i in range(10)} and images.skipped == 0
    # CLIP_benchmark's own spec for the same set works too.
    assert shard_classnames(str(tmp_path / "set" / "test" / "{0..2}.tar")) == CLASSES

    captions = []
    cfg = DataConfig(train=spec, resampled=False, num_workers=0, shuffle_buffer=50)
    loader = TrainLoader(cfg, preprocess=lambda img: torch.zeros(3, 4, 4), batch_size_per_rank=100, seed=0,
                         tokenizer=lambda caps: captions.extend(caps) or torch.zeros(len(caps), 2), world=WorldInfo())
    keys = [k for _, (_, _, ks) in zip(range(3), loader.batches_with_keys()) for k in ks]
    assert len(set(keys)) == 300 and loader.epoch == 1
    assert all(any(c in caption for c in CLASSES) for caption in captions)
