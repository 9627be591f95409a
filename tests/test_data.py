"""The training stream: epoch-exact coverage over ranks and workers, weighted sources, exact resume, skips."""
import io
import json
import random
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from contrastive.config import DataConfig
from contrastive.data import TrainLoader, decode_image, fast_preprocess, shard_sizes
from contrastive.distributed import WorldInfo
from contrastive.errors import UserError
from contrastive.data_prep.shards import write_shard, write_sizes


def _jpeg(seed: int, side: int = 8) -> bytes:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (side, side, 3), generator=g, dtype=torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _make_set(folder: Path, sizes: list[int], *, sizes_json: bool = True, start: int = 0) -> str:
    """Shards of the given sizes; sample i has a unique image and the caption 'sample <i>'."""
    folder.mkdir(parents=True, exist_ok=True)
    n = start
    for shard_id, size in enumerate(sizes):
        samples = [{"jpg": _jpeg(n + i), "txt": f"sample {n + i}"} for i in range(size)]
        write_shard(folder, shard_id, samples)
        n += size
    if sizes_json:
        write_sizes(folder)
    return str(folder / f"{{00000..{len(sizes) - 1:05d}}}.tar")


PREPROCESS = T.Compose([T.RandomResizedCrop(8, scale=(0.5, 1.0)), T.ToTensor(),
                        T.Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))])


def _tokenize(captions: list[str]) -> torch.Tensor:
    return torch.tensor([[len(c), sum(map(ord, c))] for c in captions])


def _loader(spec: str, *, rank=0, world_size=1, batch=5, seed=0, preprocess=PREPROCESS, **data) -> TrainLoader:
    cfg = DataConfig(train=spec, **{"num_workers": 0, "shuffle_buffer": 20, "block_samples": 40, **data})
    return TrainLoader(cfg, preprocess=preprocess, tokenizer=_tokenize, batch_size_per_rank=batch, seed=seed,
                       world=WorldInfo(rank, world_size))


def _take(loader: TrainLoader, num_batches: int):
    out = []
    for batch in loader.batches_with_keys():
        out.append(batch)
        if len(out) == num_batches:
            return out
    raise AssertionError("the stream ended")


# ---------------------------------------------------------------- epoch-exact

def test_epoch_exact_reads_every_sample_once_per_epoch_over_2_ranks_x_2_workers(tmp_path):
    sizes = [37, 128, 5, 90, 61, 79]  # 400 samples in shards of unequal sizes
    spec = _make_set(tmp_path / "set", sizes)
    every = {f"{tmp_path / 'set'}/{i:05d}.tar" for i in range(len(sizes))}
    num_batches = 400 // (2 * 5)  # per rank: one epoch = 400 samples / (2 ranks x 5)
    epochs = [Counter(), Counter()]
    orders = [[], []]
    for rank in range(2):
        loader = _loader(spec, rank=rank, world_size=2, resampled=False, num_workers=2)
        batches = _take(loader, 2 * num_batches)
        for i, (images, tokens, keys) in enumerate(batches):
            assert images.shape == (5, 3, 8, 8) and tokens.shape == (5, 2)
            epochs[i // num_batches].update(keys)
            orders[i // num_batches] += keys
        assert loader.epoch == 2
    for seen in epochs:
        assert len(seen) == 400 and set(seen.values()) == {1}
        assert {k.split("#")[0] for k in seen} == every
    assert orders[0] != orders[1]  # shard order and shuffle change with the epoch


def test_epoch_exact_with_a_remainder_gives_each_slot_its_piece(tmp_path):
    """403 samples over 4 slots: pieces of 101/101/101/100, the extra rotating; each epoch's pieces cover
    every sample exactly once although batches straddle epoch boundaries."""
    spec = _make_set(tmp_path / "set", [100, 3, 200, 100])
    per_slot: dict = {}
    plans = {}
    for rank in range(2):
        loader = _loader(spec, rank=rank, world_size=2, resampled=False, num_workers=2, batch=7)
        plans[rank] = loader.plan
        for i, (_, _, keys) in enumerate(_take(loader, 64)):
            per_slot.setdefault((rank, i % 2), []).extend(keys)
    for epoch in range(2):
        seen = Counter()
        lengths = []
        for (rank, worker), keys in sorted(per_slot.items()):
            slot = rank * 2 + worker
            before = sum(sum(hi - lo for _, lo, hi in plans[rank].epoch_ranges(e, slot)) for e in range(epoch))
            length = sum(hi - lo for _, lo, hi in plans[rank].epoch_ranges(epoch, slot))
            lengths.append(length)
            seen.update(keys[before:before + length])
        assert sorted(lengths) == [100, 101, 101, 101]
        assert len(seen) == 403 and set(seen.values()) == {1}


def test_epoch_exact_refuses_weights(tmp_path):
    spec = _make_set(tmp_path / "set", [10])
    with pytest.raises(UserError, match="resampled"):
        _loader(f"{spec}::{spec}", resampled=False, train_weights=[1.0, 2.0])


# ---------------------------------------------------------------- resampled

def _source_shares(loader: TrainLoader, num_batches: int) -> Counter:
    shares = Counter()
    for _, _, keys in _take(loader, num_batches):
        shares.update("a" if "/a/" in k else "b" for k in keys)
    return shares


def test_weighted_sources_are_sampled_in_proportion(tmp_path):
    spec_a = _make_set(tmp_path / "a", [10] * 8)
    spec_b = _make_set(tmp_path / "b", [4] * 5, start=1000)
    # data.train_weights are shares of samples: 3:1 -> 75% from a, whatever the shard sizes.
    options = dict(batch=50, shuffle_buffer=0, block_samples=20, preprocess=T.ToTensor())
    loader = _loader(f"{spec_a}::{spec_b}", train_weights=[3.0, 1.0], **options)
    # 2500 samples are ~340 shard draws: the share's standard deviation is ~0.02; tolerance 0.06 (3 sigma).
    shares = _source_shares(loader, 50)
    assert shares["a"] / 2500 == pytest.approx(0.75, abs=0.06)
    # Without weights every sample is equally likely: a holds 80 of the 100 samples.
    shares = _source_shares(_loader(f"{spec_a}::{spec_b}", **options), 50)
    assert shares["a"] / 2500 == pytest.approx(0.80, abs=0.06)


def test_resampled_streams_differ_by_rank_and_repeat_for_a_seed(tmp_path):
    spec = _make_set(tmp_path / "set", [20] * 4)
    keys = lambda **kw: [k for _, _, ks in _take(_loader(spec, **kw), 6) for k in ks]
    assert keys(rank=0, world_size=2) == keys(rank=0, world_size=2)
    assert keys(rank=0, world_size=2) != keys(rank=1, world_size=2)
    assert keys(seed=1) != keys(seed=2)


# ---------------------------------------------------------------- resume

def _corrupt_set(folder: Path) -> str:
    """Three shards, two of them with bad samples: a non-image, a sample without caption."""
    spec = _make_set(folder, [30, 25, 30])
    path = folder / "00001.tar"
    with tarfile.open(path, "a") as tf:
        for name, data in (("bad000001.jpg", b"not an image"), ("bad000001.txt", b"broken"),
                           ("nocap00002.jpg", _jpeg(99))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    sizes = json.loads((folder / "sizes.json").read_text())
    sizes["00001.tar"] = 27
    (folder / "sizes.json").write_text(json.dumps(sizes))
    return spec


@pytest.mark.parametrize("resampled", [False, True])
def test_resumed_loader_continues_exactly_where_the_interrupted_one_stopped(tmp_path, resampled):
    spec = _corrupt_set(tmp_path / "set")
    options = dict(resampled=resampled, num_workers=2, batch=4, shuffle_buffer=10, block_samples=25)
    first = _loader(spec, **options, prefetch_factor=2)
    batches = first.batches_with_keys()
    for _ in range(9):  # an odd count: the next batch is the second worker's turn
        next(batches)
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint stores it
    expected = [next(batches) for _ in range(30)]  # the uninterrupted run goes on (past an epoch end)
    assert first.num_skipped > 0

    resumed = _loader(spec, **options, prefetch_factor=5)  # another prefetch depth
    resumed.load_state_dict(state)
    got = _take(resumed, 30)
    for (images, tokens, keys), (want_images, want_tokens, want_keys) in zip(got, expected):
        assert keys == want_keys
        assert torch.equal(images, want_images) and torch.equal(tokens, want_tokens)
    assert resumed.skipped_by_reason() == first.skipped_by_reason()
    assert resumed.state_dict() == first.state_dict()


def test_resume_refuses_a_changed_setup(tmp_path):
    spec = _make_set(tmp_path / "set", [20, 20])
    state = _loader(spec, num_workers=2).state_dict()
    with pytest.raises(UserError, match="num_workers"):
        _loader(spec, num_workers=1).load_state_dict(state)
    with pytest.raises(UserError, match="other shards"):
        _loader(str(tmp_path / "set" / "00000.tar"), num_workers=2).load_state_dict(state)


def test_loading_in_the_main_process_leaves_the_global_rng_alone(tmp_path):
    spec = _make_set(tmp_path / "set", [20])
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    _take(_loader(spec), 3)
    assert torch.equal(torch.rand(3), expected)


# ---------------------------------------------------------------- bad samples and other layouts

def test_corrupt_samples_are_skipped_and_counted_by_reason(tmp_path):
    folder = tmp_path / "set"
    _make_set(folder, [10, 10], sizes_json=False)
    with tarfile.open(folder / "00000.tar", "a") as tf:
        for name, data in (("x1.jpg", b"\xff\xd8 not a jpeg"), ("x1.txt", b"a caption"), ("x2.jpg", _jpeg(7)),
                           ("x3.txt", b"caption without image"), ("x4.jpg", _jpeg(8)), ("x4.txt", b"\xff\xfe")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    # A shard cut off inside sample 6's image: samples 6..9 cannot be read.
    with tarfile.open(folder / "00001.tar") as tf:
        cut = next(m for m in tf.getmembers() if m.name == "000010006.jpg").offset_data + 10
    (folder / "00001.tar").write_bytes((folder / "00001.tar").read_bytes()[:cut])
    (folder / "sizes.json").write_text(json.dumps({"00000.tar": 14, "00001.tar": 10}))
    loader = _loader(str(folder / "{00000..00001}.tar"), resampled=False, batch=1, shuffle_buffer=0)
    good = [k for _, _, ks in _take(loader, 17) for k in ks]
    # 16 good + 8 skipped = the 24 samples of epoch 0; the 17th good one starts epoch 1.
    assert loader.skipped_by_reason() == {"bad_caption": 1, "bad_image": 1, "no_caption": 1, "no_image": 1,
                                          "unreadable_shard": 4}
    assert len(set(good[:16])) == 16 and sum("00001.tar" in k for k in good[:16]) == 6 and good[16] in good[:16]
    assert loader.epoch == 1


def test_reads_clip_benchmark_sets_and_captions_them_from_classnames(tmp_path):
    root = tmp_path / "cb"
    (root / "train").mkdir(parents=True)
    (root / "classnames.txt").write_text("cat\ndog\n")
    (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\nart of the {c}.\n")
    labels = {}
    for shard in range(2):
        with tarfile.open(root / "train" / f"{shard}.tar", "w") as tf:
            for i in range(6):
                key = f"s{shard * 6 + i:07d}"
                img = io.BytesIO()
                Image.open(io.BytesIO(_jpeg(i))).save(img, format="WEBP")
                labels[key] = i % 2
                for ext, data in (("webp", img.getvalue()), ("cls", str(i % 2).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    spec = str(root / "train" / "{0..1}.tar")
    assert shard_sizes([str(root / "train" / "0.tar")]) == [6]
    captions = []
    loader = _loader(spec, resampled=False, batch=12, shuffle_buffer=0)
    loader.tokenizer = lambda caps: captions.extend(caps) or _tokenize(caps)
    (_, _, keys), = _take(loader, 1)
    assert loader.num_skipped == 0
    for key, caption in zip(keys, captions):
        name = ("cat", "dog")[labels[key.split("#")[1]]]
        assert caption in (f"a photo of a {name}.", f"art of the {name}.")
    assert len(set(captions)) == 4
    # Each sample's class id (for loss.positives=class): class set 0, its .cls label.
    assert loader.last_classes.tolist() == [labels[key.split("#")[1]] for key in keys]


def test_samples_without_a_class_set_have_no_class_id(tmp_path):
    loader = _loader(_make_set(tmp_path / "plain", [4, 4]), batch=8)
    _take(loader, 1)
    assert loader.last_classes.tolist() == [-1] * 8


def test_sizes_come_from_img2dataset_stats_without_sizes_json(tmp_path):
    spec = _make_set(tmp_path / "set", [7, 9], sizes_json=False)
    assert shard_sizes([str(tmp_path / "set" / "00000.tar"), str(tmp_path / "set" / "00001.tar")]) == [7, 9]
    for stats in (tmp_path / "set").glob("*_stats.json"):
        stats.unlink()
    assert shard_sizes([str(tmp_path / "set" / "00001.tar")]) == [9]  # counted
    assert len({k for _, _, ks in _take(_loader(spec, resampled=False, batch=16), 1) for k in ks}) == 16


def test_counting_a_shard_from_headers_agrees_with_reading_it(tmp_path):
    from contrastive.shard_reader import count_samples, read_shard

    path = tmp_path / "odd.tar"
    with tarfile.open(path, "w") as tf:
        tf.addfile(tarfile.TarInfo("dir"))
        tf.getmembers()[-1].type = tarfile.DIRTYPE
        for name in ("a.jpg", "a.txt", "__meta__", "sub/__cache__/x.txt", "b.jpg", "noext", "c.jpg", "c.txt",
                     "a.json", "d.e.f"):
            info = tarfile.TarInfo(name)
            info.size = 3
            tf.addfile(info, io.BytesIO(b"abc"))
    # a, sub/__cache__/x, b, c, a again, d: "__meta__" is skipped, "noext" has no key, keys group only in runs
    assert count_samples(str(path)) == len(list(read_shard(str(path)))) == 6
    gz = tmp_path / "odd.tar.gz"
    import gzip

    gz.write_bytes(gzip.compress(path.read_bytes()))
    assert count_samples(str(gz)) == 6


# ---------------------------------------------------------------- the fast transform path

def _smooth_jpeg(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(height // 20, width // 20, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(small).resize((width, height), Image.BICUBIC).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


@pytest.mark.parametrize("is_train", [True, False])
def test_fast_transform_matches_open_clip_transforms(is_train):
    from open_clip.transform import PreprocessCfg, image_transform_v2

    from contrastive.transforms import DecodeThen, FastTransform

    reference = image_transform_v2(PreprocessCfg(size=64), is_train=is_train)
    fast = fast_preprocess(reference)
    assert isinstance(fast, FastTransform)
    for seed in range(4):
        # No room for reduced-size decoding: the same crop (the same random draws), resampled by torch's uint8
        # kernels to within a grey level of PIL's (one level is 1/255/0.27 ~ 0.015 after Normalize).
        data = _smooth_jpeg(100, 80, seed)
        torch.manual_seed(seed)
        want = reference(decode_image(data))
        torch.manual_seed(seed)
        got = fast(data)
        assert got.shape == want.shape == (3, 64, 64)
        assert (got - want).abs().mean() < 0.002 and (got - want).abs().max() < 0.035
        # Decoded at 1/4 size: the DCT downscale filters differently and the crop box snaps to the reduced
        # pixel grid (half a reduced pixel at most), so the same picture within a few grey levels.
        data = _smooth_jpeg(640, 480, seed)
        torch.manual_seed(seed)
        want = reference(decode_image(data))
        torch.manual_seed(seed)
        got = fast(data)
        assert (got - want).abs().mean() < 0.1
        assert np.corrcoef(got.flatten().numpy(), want.flatten().numpy())[0, 1] > 0.98
    # Anything else keeps open_clip's PIL steps, with only ToTensor + Normalize fused (same to 1e-5).
    jitter = image_transform_v2(PreprocessCfg(size=64), is_train=True,
                                aug_cfg={"color_jitter": (0.4, 0.4, 0.4, 0.1), "color_jitter_prob": 0.8})
    other = fast_preprocess(jitter)
    assert isinstance(other, DecodeThen)
    data = _smooth_jpeg(120, 100, 5)
    for seed in range(4):  # open_clip's colour jitter draws from Python's random, the crop from torch's
        torch.manual_seed(seed), random.seed(seed)
        want = jitter(decode_image(data))
        torch.manual_seed(seed), random.seed(seed)
        assert torch.allclose(other(data), want, atol=1e-5)


def test_fast_transform_flips_as_torchvision_does():
    from open_clip.transform import PreprocessCfg, image_transform_v2

    from contrastive.models import with_hflip
    from contrastive.transforms import FastTransform

    reference = with_hflip(image_transform_v2(PreprocessCfg(size=64), is_train=True), 0.5)
    fast = fast_preprocess(reference)
    assert isinstance(fast, FastTransform) and fast.hflip == 0.5
    unflipped = FastTransform.from_compose(image_transform_v2(PreprocessCfg(size=64), is_train=True))
    data = _smooth_jpeg(100, 80, 3)
    flips = 0
    for seed in range(12):
        torch.manual_seed(seed)
        want = reference(decode_image(data))
        after_reference = torch.rand(1)
        torch.manual_seed(seed)
        got = fast(data)
        assert torch.rand(1) == after_reference  # the same draws, crop then flip
        assert (got - want).abs().mean() < 0.002 and (got - want).abs().max() < 0.035
        torch.manual_seed(seed)
        plain = unflipped(data)
        flipped = not torch.equal(got, plain)
        if flipped:
            assert torch.equal(got, plain.flip(-1))
        flips += flipped
    assert 0 < flips < 12


def test_hflip_is_ours_on_top_of_open_clips_aug(tmp_path):
    from torchvision import transforms as T

    from contrastive.config import load_config
    from contrastive.errors import UserError
    from contrastive.models import build_model

    for aug in ("{hflip: 0.5, scale: [0.6, 1.0]}", "{hflip: 0.5, scale: [0.6, 1.0], use_timm: true}"):
        steps = build_model(load_config(None, [f"model.aug={aug}"]).model).preprocess_train.transforms
        names = [type(t).__name__ for t in steps]
        assert isinstance(steps[names.index("RandomHorizontalFlip")], T.RandomHorizontalFlip)
        assert names[names.index("RandomHorizontalFlip") + 1] in ("ToTensor", "MaybeToTensor")
        assert tuple(steps[0].scale) == (0.6, 1.0)
    with pytest.raises(UserError, match="hflip is a probability"):
        build_model(load_config(None, ["model.aug={hflip: 2}"]).model)


def test_reduced_size_jpeg_decoding_keeps_the_side_and_the_picture():
    big = Image.open(io.BytesIO(_jpeg(4, side=16))).resize((640, 480), Image.BICUBIC)
    buf = io.BytesIO()
    big.save(buf, format="JPEG", quality=95)
    full = decode_image(buf.getvalue())
    draft = decode_image(buf.getvalue(), draft_side=100)
    assert full.size == (640, 480) and draft.size == (160, 120)  # 1/4 scale keeps the shorter side >= 100
    small = np.asarray(full.resize(draft.size, Image.BOX), dtype=np.float32)
    assert np.abs(small - np.asarray(draft, dtype=np.float32)).mean() < 3.0


def test_cached_tokenizer_gives_the_tokenizers_rows_and_tokenises_each_caption_once():
    import open_clip

    from contrastive.data import CachedTokenizer

    tokenizer = open_clip.get_tokenizer("tiny-vit-32")
    calls = []
    cached = CachedTokenizer(lambda captions: calls.append(list(captions)) or tokenizer(captions), max_entries=4)
    batch = ["a photo of a cat.", "a dog", "a photo of a cat.", "a dog", "a bird"]
    assert torch.equal(cached(batch), tokenizer(batch))
    assert calls == [["a photo of a cat.", "a dog", "a bird"]]
    assert torch.equal(cached(["a bird", "a dog"]), tokenizer(["a bird", "a dog"])) and len(calls) == 1
    # Past max_entries it starts over, and the rows stay right.
    many = ["one", "two", "three", "a dog"]
    assert torch.equal(cached(many), tokenizer(many))
    assert calls[-1] == many and len(cached.rows) == 4
