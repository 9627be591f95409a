"""Flickr-style data: Kaggle's layout through `prep pairs` (grouped and one row per caption, split lists),
data_prep.flickr8k, and data.caption_sampling (seeded, resumable, every caption reachable)."""
import csv
import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import torch
from torchvision import transforms as T

from contrastive.cli import main
from contrastive.config import ConfigError, DataConfig
from contrastive.data import TrainLoader
from contrastive.distributed import WorldInfo
from contrastive.errors import UserError
from contrastive.data_prep import flickr8k
from contrastive.data_prep.build import BuildOptions
from contrastive.data_prep.images import ImageOptions
from contrastive.data_prep.pairs import prep_pairs
from contrastive.data_prep.shards import write_shard, write_sizes
from tests.test_data import _jpeg
from tests.test_prep import _encode, _photo, _samples

# Captions per image in captions.txt row order; "" is an empty caption (dropped from the group, counted).
CAPTIONS = {
    "1000_a.jpg": ["A dog runs , with a red ball .", "dog running", 'A "happy" dog on grass , outside .'],
    "1001_b.jpg": ["Two kids play.", "kids , playing", "children at play", "two children", "a game"],
    "1002_c.jpg": ["a cat sleeps", ""],
    "1003_d.jpg": ["A man rides a bike , fast .", "cyclist", "a man on a bicycle", "bike race"],
    "1004_e.jpg": ["boats on a lake", "a lake , with boats"],
    "1005_f.jpg": ["a copy of the dog photo", "same bytes, other file"],  # the bytes of 1000_a.jpg
}
LISTED = ["1000_a.jpg", "1001_b.jpg", "1002_c.jpg", "1005_f.jpg", "9999_missing.jpg"]


def _flickr_folder(root: Path) -> Path:
    """Kaggle's Flickr layout: Images/*.jpg, captions.txt (CSV, quoted where needed, one image's rows apart),
    and a split file naming four of the images and one that is not there."""
    (root / "Images").mkdir(parents=True)
    for i, name in enumerate(CAPTIONS):
        if name != "1005_f.jpg":
            (root / "Images" / name).write_bytes(_encode(_photo(40, 40, i), "JPEG", quality=90))
    (root / "Images" / "1005_f.jpg").write_bytes((root / "Images" / "1000_a.jpg").read_bytes())
    rows = [(name, c) for name, captions in CAPTIONS.items() for c in captions]
    rows.append(rows.pop(1))  # 1000_a.jpg's second caption comes last in the file
    with open(root / "captions.txt", "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(("image", "caption"))
        writer.writerows(rows)
    assert '"A dog runs , with a red ball ."' in (root / "captions.txt").read_text()  # quoted commas
    (root / "Flickr_8k.trainImages.txt").write_text("".join(n + "\n" for n in LISTED))
    return root


def _in_file_order(name: str) -> list[str]:
    captions = [c for c in CAPTIONS[name] if c]
    return captions[:1] + captions[2:] + captions[1:2] if name == "1000_a.jpg" else captions


OPTS = BuildOptions(ImageOptions(resize_mode="no"), samples_per_shard=4)


def test_kaggle_folder_becomes_one_sample_per_listed_image_with_all_its_captions(tmp_path):
    root = _flickr_folder(tmp_path / "flickr")
    summary = prep_pairs(root, tmp_path / "out", opts=OPTS, images_list=root / "Flickr_8k.trainImages.txt",
                         num_procs=1, progress=False)
    # Four listed images are inputs; 1005_f.jpg has 1000_a.jpg's bytes: one duplicate, whatever its row count.
    assert summary["num_inputs"] == 4 and summary["num_samples"] == 3
    assert summary["skipped"] == {"duplicate": 1} and summary["converted"] == {"caption_dropped": 1}
    assert summary["images_list"] == {"file": str(root / "Flickr_8k.trainImages.txt"), "listed": 5, "found": 4,
                                      "not_found": 1}
    found = _samples(tmp_path / "out")
    assert sorted(found) == ["1000_a.jpg", "1001_b.jpg", "1002_c.jpg"]
    for name, (txt, image, meta, _) in found.items():
        assert meta["captions"] == _in_file_order(name) and txt == meta["captions"][0]
        assert image.size == (40, 40)
    # --resize-mode no keeps the JPEG bytes as they are.
    with tarfile.open(tmp_path / "out" / "00000.tar") as tf:
        stored = tf.extractfile(f"{found['1001_b.jpg'][3]}.jpg").read()
    assert stored == (root / "Images" / "1001_b.jpg").read_bytes()
    prep = json.loads((tmp_path / "out" / "prep.json").read_text())
    assert prep["options"]["images_list"] == str(root / "Flickr_8k.trainImages.txt")
    assert prep["options"]["one_row_per_caption"] is False and prep["summary"]["images_list"]["not_found"] == 1


def test_captions_table_with_image_root_one_row_per_caption(tmp_path):
    root = _flickr_folder(tmp_path / "flickr")
    split = root / "Flickr_8k.trainImages.txt"
    rows = prep_pairs(root / "captions.txt", tmp_path / "rows", opts=OPTS, image_root=root / "Images",
                      images_list=split, one_row_per_caption=True, num_procs=1, progress=False)
    # One input per row of a listed image (3 + 5 + 2 + 2); rows naming the same file are not duplicates of each
    # other, 1005_f.jpg's rows are (another file with the same bytes); the empty caption is skipped.
    assert rows["num_inputs"] == 12 and rows["skipped"] == {"duplicate": 2, "empty_caption": 1}
    texts = Counter()
    for tar in sorted((tmp_path / "rows").glob("*.tar")):
        with tarfile.open(tar) as tf:
            members = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
        for name, data in members.items():
            if name.endswith(".json"):
                meta = json.loads(data)
                assert "captions" not in meta
                texts[meta["url"], members[name[:-5] + ".txt"].decode()] += 1
    assert texts == Counter((n, c) for n in ("1000_a.jpg", "1001_b.jpg", "1002_c.jpg") for c in _in_file_order(n))
    grouped = prep_pairs(root / "captions.txt", tmp_path / "grouped", opts=OPTS, image_root=root / "Images",
                         images_list=split, num_procs=1, progress=False)
    assert grouped["num_inputs"] == 4 and grouped["num_samples"] == 3
    assert {k: v[2]["captions"] for k, v in _samples(tmp_path / "grouped").items()} == \
        {n: _in_file_order(n) for n in ("1000_a.jpg", "1001_b.jpg", "1002_c.jpg")}
    with pytest.raises(UserError, match="none of the 1 images"):
        (tmp_path / "other.txt").write_text("elsewhere.jpg\n")
        prep_pairs(root, tmp_path / "none", opts=OPTS, images_list=tmp_path / "other.txt", progress=False)


def test_cli_prep_pairs_on_the_kaggle_layout(tmp_path, capsys):
    root = _flickr_folder(tmp_path / "flickr")
    code = main(["prep", "pairs", str(root), str(tmp_path / "out"), "--resize-mode", "no", "--num-procs", "1",
                 "--images-list", str(root / "Flickr_8k.trainImages.txt"), "--one-row-per-caption"])
    out = capsys.readouterr().out
    assert code == 0 and "9 samples from 12 inputs" in out and "4 of 5 listed images found, 1 not found" in out


def _flickr_tar(tmp_path: Path) -> Path:
    root = _flickr_folder(tmp_path / "src" / "flickr8k")
    (root / "Flickr_8k.devImages.txt").write_text("1003_d.jpg\n1004_e.jpg\n")
    path = tmp_path / "flickr8k-trainval.tar"
    with tarfile.open(path, "w") as tf:
        tf.add(root, arcname="flickr8k")
    return path


def test_flickr8k_split_writes_each_part_once_and_the_open_clip_csv(tmp_path, capsys):
    tar = _flickr_tar(tmp_path)
    work = tmp_path / "work"
    assert flickr8k.main(["split", "--tar", str(tar), "--out", str(work), "--num-procs", "1"]) == 0
    counts = {part: json.loads((work / "shards" / part / "prep.json").read_text())["summary"]["num_samples"]
              for part in flickr8k.PARTS}
    # Deduplication is off: 1005_f.jpg stays (as the real split's two same-bytes images do).
    assert counts == {"train": 4, "train_rows": 11, "dev": 2}
    dev = _samples(work / "shards" / "dev")
    assert {k: v[2]["captions"] for k, v in dev.items()} == {n: CAPTIONS[n] for n in ("1003_d.jpg", "1004_e.jpg")}
    table = pd.read_csv(work / "openclip_train.csv", sep="\t")  # as open_clip_train's CsvDataset reads it
    expected = [(str((work / "flickr8k" / "Images" / n).resolve()), c) for n in ("1000_a.jpg", "1001_b.jpg", "1002_c.jpg",
                                                                    "1005_f.jpg") for c in _in_file_order(n)]
    assert sorted(zip(table["filepath"], table["title"])) == sorted(expected)
    mtimes = {p: p.stat().st_mtime_ns for p in (work / "shards").rglob("*.tar")}
    capsys.readouterr()
    assert flickr8k.main(["split", "--tar", str(tar), "--out", str(work), "--num-procs", "1"]) == 0
    assert capsys.readouterr().out.count("kept from an earlier run") == 3
    assert {p: p.stat().st_mtime_ns for p in (work / "shards").rglob("*.tar")} == mtimes
    assert flickr8k.main(["spec", str(work / "shards" / "train_rows")]) == 0
    assert capsys.readouterr().out.strip() == f"{work}/shards/train_rows/00000.tar"
    # A smaller split is another input: the part is rebuilt, not resumed from the larger one.
    assert flickr8k.main(["split", "--tar", str(tar), "--out", str(work), "--max-train", "2", "--num-procs", "1"]) == 0
    assert json.loads((work / "shards" / "train" / "prep.json").read_text())["summary"]["num_samples"] == 2


# ---------------------------------------------------------------- data.caption_sampling

NUM_CAPTIONS = 5


def _multi_caption_set(folder: Path, num_samples: int) -> str:
    """Shards whose sample i has captions 'i/0'..'i/4' ('i/0' in its .txt); every 7th has no captions list."""
    samples = []
    for i in range(num_samples):
        captions = [f"{i}/{j}" for j in range(NUM_CAPTIONS)]
        samples.append({"jpg": _jpeg(i), "txt": captions[0], "json": {} if i % 7 == 6 else {"captions": captions}})
    write_shard(folder, 0, samples[:num_samples // 2])
    write_shard(folder, 1, samples[num_samples // 2:])
    write_sizes(folder)
    return str(folder / "{00000..00001}.tar")


def _bytes_tokenizer(captions: list[str]) -> torch.Tensor:
    """Each caption's bytes, zero-padded: the captions can be read back from a batch."""
    return torch.tensor([list(c.encode().ljust(16, b"\0")) for c in captions], dtype=torch.uint8)


def _captions_of(tokens: torch.Tensor) -> list[str]:
    return [bytes(row.tolist()).rstrip(b"\0").decode() for row in tokens]


def _caption_loader(spec: str, *, sampling: str, seed: int = 0, **data) -> TrainLoader:
    cfg = DataConfig(train=spec, caption_sampling=sampling,
                     **{"num_workers": 0, "shuffle_buffer": 8, "block_samples": 10, "resampled": False, **data})
    return TrainLoader(cfg, preprocess=T.ToTensor(), tokenizer=_bytes_tokenizer, batch_size_per_rank=4, seed=seed,
                       world=WorldInfo(0, 1))


def _visits(loader: TrainLoader, num_batches: int) -> list[tuple[str, str]]:
    """(sample key, caption) of each sample visited in the first `num_batches` batches."""
    out = []
    for i, (_, tokens, keys) in enumerate(loader.batches_with_keys()):
        out += zip(keys, _captions_of(tokens))
        if i + 1 == num_batches:
            return out
    raise AssertionError("the stream ended")


def test_random_caption_sampling_is_seeded_and_reaches_every_caption(tmp_path):
    spec = _multi_caption_set(tmp_path / "set", 20)
    torch.manual_seed(3)
    state = torch.get_rng_state()
    visits = _visits(_caption_loader(spec, sampling="random"), 200)  # 40 epochs
    # Without workers the loader runs in this process: it leaves the global random stream alone.
    assert torch.equal(torch.get_rng_state(), state)
    assert visits == _visits(_caption_loader(spec, sampling="random"), 200)
    assert visits != _visits(_caption_loader(spec, sampling="random", seed=1), 200)
    by_sample: dict[str, Counter] = {}
    for key, caption in visits:
        by_sample.setdefault(key, Counter())[caption] += 1
    assert len(by_sample) == 20
    for key, counts in by_sample.items():
        number = int(next(iter(counts)).split("/")[0])
        if number % 7 == 6:  # no captions list: its .txt at every visit
            assert counts == {f"{number}/0": 40}
        else:  # 40 visits: each of 5 captions expected 8 times; below 2 or above 18 has odds under 1e-3
            assert set(counts) == {f"{number}/{j}" for j in range(NUM_CAPTIONS)}
            assert all(2 <= n <= 18 for n in counts.values()), counts


def test_first_caption_sampling_always_gives_the_first_caption(tmp_path):
    spec = _multi_caption_set(tmp_path / "set", 20)
    for key, caption in _visits(_caption_loader(spec, sampling="first"), 50):
        assert caption.endswith("/0"), (key, caption)
    with pytest.raises(ConfigError, match="caption_sampling must be one of first, random"):
        DataConfig(caption_sampling="all")


def test_a_resumed_loader_draws_the_captions_of_the_uninterrupted_one(tmp_path):
    spec = _multi_caption_set(tmp_path / "set", 24)
    options = dict(sampling="random", num_workers=2, prefetch_factor=2)
    first = _caption_loader(spec, **options)
    batches = first.batches_with_keys()
    for _ in range(7):  # an odd count: the next batch is the second worker's turn
        next(batches)
    state = json.loads(json.dumps(first.state_dict()))
    expected = [(keys, _captions_of(tokens)) for _, tokens, keys in (next(batches) for _ in range(20))]
    resumed = _caption_loader(spec, **options)
    resumed.load_state_dict(state)
    got = []
    for _, tokens, keys in resumed.batches_with_keys():
        got.append((keys, _captions_of(tokens)))
        if len(got) == 20:
            break
    assert got == expected
    assert len({c for _, captions in expected for c in captions}) > 24  # not one caption per sample


# ---------------------------------------------------------------- data.captions_per_sample

def _visits_k(loader: TrainLoader, num_batches: int, k: int) -> list[tuple[str, list[str]]]:
    """(sample key, its K captions) of each sample visited in the first `num_batches` batches."""
    out = []
    for i, (_, tokens, keys) in enumerate(loader.batches_with_keys()):
        captions = _captions_of(tokens)
        assert len(captions) == k * len(keys)
        out += [(key, captions[j * k:(j + 1) * k]) for j, key in enumerate(keys)]
        if i + 1 == num_batches:
            return out
    raise AssertionError("the stream ended")


@pytest.mark.parametrize("k", [3, 5, 7])
def test_k_captions_per_sample_are_its_own_distinct_captions_in_a_seeded_shuffle(tmp_path, k):
    spec = _multi_caption_set(tmp_path / "set", 20)
    visits = _visits_k(_caption_loader(spec, sampling="random", captions_per_sample=k), 50, k)
    assert visits == _visits_k(_caption_loader(spec, sampling="random", captions_per_sample=k), 50, k)
    orders = set()
    for key, captions in visits:
        number = int(captions[0].split("/")[0])
        if number % 7 == 6:  # no captions list: its .txt, K times
            assert captions == [f"{number}/0"] * k
            continue
        own = [f"{number}/{j}" for j in range(NUM_CAPTIONS)]
        head = captions[:min(k, NUM_CAPTIONS)]
        assert sorted(head) == sorted(own)[:len(head)] if k >= NUM_CAPTIONS else set(head) <= set(own)
        assert len(set(head)) == len(head)  # without replacement
        assert captions == [head[i % NUM_CAPTIONS] for i in range(k)]  # fewer than K: repeated in turn
        orders.add(tuple(int(c.split("/")[1]) for c in head))  # the order of its captions' indices
    assert len(orders) > 5  # drawn, not the file order


def test_k_first_captions_are_the_first_k_in_file_order(tmp_path):
    spec = _multi_caption_set(tmp_path / "set", 20)
    for _, captions in _visits_k(_caption_loader(spec, sampling="first", captions_per_sample=3), 10, 3):
        number = captions[0].split("/")[0]
        assert captions in ([f"{number}/0", f"{number}/1", f"{number}/2"], [f"{number}/0"] * 3)


def test_k_captions_resume_where_the_uninterrupted_loader_is(tmp_path):
    spec = _multi_caption_set(tmp_path / "set", 24)
    options = dict(sampling="random", num_workers=2, prefetch_factor=2, captions_per_sample=3)
    first = _caption_loader(spec, **options)
    batches = first.batches_with_keys()
    for _ in range(5):
        next(batches)
    state = json.loads(json.dumps(first.state_dict()))
    expected = [(keys, _captions_of(tokens)) for _, tokens, keys in (next(batches) for _ in range(10))]
    resumed = _caption_loader(spec, **options)
    resumed.load_state_dict(state)
    got = [(keys, _captions_of(tokens)) for _, (_, tokens, keys) in zip(range(10), resumed.batches_with_keys())]
    assert got == expected


def test_k_captions_need_pair_positives():
    from contrastive.config import Config, LossConfig

    with pytest.raises(ConfigError, match="captions_per_sample must be >= 1"):
        DataConfig(captions_per_sample=0)
    with pytest.raises(ConfigError, match="captions_per_sample=2 works with loss.positives=pair, not caption"):
        Config(data=DataConfig(captions_per_sample=2), loss=LossConfig(positives="caption"))
