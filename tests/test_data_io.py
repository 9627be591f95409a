"""Bytes the training stream reads: each sample's once per epoch, a resume only what remains, counts shared.

Bytes are counted by wrapping contrastive.shard_reader.open_shard (the reader opens every local tar through it,
unbuffered); each (rank, worker) slot is iterated in this process, as its DataLoader worker would run it.
"""
import gzip
import io
import itertools
import json
import random
import tarfile
from pathlib import Path

import pytest

from contrastive import shard_reader
from contrastive.config import DataConfig
from contrastive.data import SlotState, StreamSpec, TrainLoader, _SlotStream
from contrastive.distributed import WorldInfo
from contrastive.shard_reader import build_index, index_file, load_index, read_shard, shuffle_order
from contrastive.sharding import make_seed
from contrastive.data_prep.shards import write_shard, write_sizes
from tests.dist import run_ranks


def _make_set(folder: Path, sizes: list[int], *, payload: tuple[int, int] = (200, 3000), seed: int = 0) -> str:
    """Shards written by prep's write_shard (with index files); payloads of random length, so samples span
    different numbers of tar blocks. Nothing here decodes them."""
    rng = random.Random(seed)
    for shard, size in enumerate(sizes):
        write_shard(folder, shard, [{"jpg": rng.randbytes(rng.randrange(*payload)), "txt": f"s{shard} {i}"}
                                    for i in range(size)])
    write_sizes(folder)
    return str(folder / f"{{00000..{len(sizes) - 1:05d}}}.tar")


def _loader(spec: str, *, rank: int = 0, world_size: int = 1, **data) -> TrainLoader:
    cfg = DataConfig(train=spec, **{"resampled": False, "shuffle_buffer": 20, "block_samples": 50,
                                    "fast_decode": False, **data})
    return TrainLoader(cfg, preprocess=None, tokenizer=None, batch_size_per_rank=4, seed=0,
                       world=WorldInfo(rank, world_size))


def _stream(loader: TrainLoader) -> _SlotStream:
    spec = StreamSpec(plan=loader.plan, slots=list(loader.slots), worker_offset=0, batch_size=4, transform=None,
                      tokenizer=None, image_key="jpg", caption_key="txt", class_sets=[], class_set_of_shard=[])
    return _SlotStream(spec)


class _Counted:
    def __init__(self, raw, log: list):
        self.raw, self.log = raw, log

    def read(self, size=-1):
        data = self.raw.read(size)
        self.log.append(len(data))
        return data

    def __getattr__(self, name):
        return getattr(self.raw, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.raw.close()


@pytest.fixture()
def bytes_read(monkeypatch) -> list:
    """A list that collects the size of every read from a local shard."""
    log: list = []
    real = shard_reader.open_shard
    monkeypatch.setattr(shard_reader, "open_shard", lambda path: _Counted(real(path), log))
    return log


def _data_end(url: str) -> int:
    """Where a tar's last member ends: the rest is the end-of-archive blocks and the record padding."""
    with tarfile.open(url) as tf:
        last = tf.getmembers()[-1]
    return last.offset_data + -(-last.size // 512) * 512


def _epoch_keys(stream: _SlotStream, worker: int, state: SlotState) -> list[str]:
    keys = []
    for sample, _, after in stream._samples(worker, state):
        keys.append(f"{sample['__url__']}#{sample['__key__']}")
        if after[0] > state.epoch:
            return keys
    raise AssertionError("the stream ended")


# ---------------------------------------------------------------- an epoch

@pytest.mark.parametrize("prep_index", [True, False])
def test_an_epoch_over_2_ranks_x_4_workers_reads_each_sample_once(tmp_path, bytes_read, prep_index):
    spec = _make_set(tmp_path / "set", [70, 45, 61])
    urls = [str(tmp_path / "set" / f"{i:05d}.tar") for i in range(3)]
    if not prep_index:  # shards as img2dataset writes them: indexed from their headers when the loader starts
        for url in urls:
            index_file(url).unlink()
    seen, read = [], 0
    for rank in range(2):
        loader = _loader(spec, rank=rank, world_size=2, num_workers=4)
        assert all(loader.plan.shard_index(i) is not None for i in range(3))
        bytes_read.clear()  # count the epoch, not the start-up
        stream = _stream(loader)
        for worker in range(4):
            seen += _epoch_keys(stream, worker, SlotState())
        read += sum(bytes_read)
    assert len(seen) == len(set(seen)) == 176
    # 8 slots over 3 shards: most slots start mid-shard. Read from byte 0 up to each slot's first sample, this
    # epoch read 2.8x the data.
    data = sum(_data_end(u) for u in urls)
    assert data - 8 * 512 <= read <= data + 8 * 512, (read, data)


def test_shards_without_index_files_are_indexed_only_with_a_quarter_as_many_slots(tmp_path):
    spec = _make_set(tmp_path / "set", [3] * 9)
    for i in range(9):
        index_file(str(tmp_path / "set" / f"{i:05d}.tar")).unlink()
    for num_workers, indexed in [(0, False), (2, False), (3, True)]:  # 1, 2, 3 slots for 9 shards
        loader = _loader(spec, num_workers=num_workers)
        assert [loader.plan.shard_index(i) is not None for i in range(9)] == [indexed] * 9
        stream = _stream(loader)
        keys = [k for w in range(max(1, num_workers)) for k in _epoch_keys(stream, w, SlotState())]
        assert len(keys) == len(set(keys)) == 27


def test_the_order_is_webdatasets_shuffle_of_the_samples_read_in_turn(tmp_path):
    """The stream replays webdataset's shuffle on sample numbers; the reference shuffles the samples
    themselves, read whole-shard from byte 0, as the stream did before."""
    import webdataset as wds

    spec = _make_set(tmp_path / "set", [70, 45, 61])
    loader = _loader(spec, num_workers=2, shuffle_buffer=30, block_samples=40)
    plan = loader.plan
    for worker in range(2):
        want = []
        for block, ranges in enumerate(plan.blocks(0, worker)):
            raw = (s for shard, lo, hi in ranges for s in read_shard(plan.urls[shard], lo, hi))
            rng = random.Random(make_seed(plan.seed, 0, plan.rank, worker, block, 0x5F))
            want += [f"{s['__url__']}#{s['__key__']}" for s in wds.shuffle(30, 30, rng=rng)(raw)]
        assert _epoch_keys(_stream(loader), worker, SlotState()) == want
    for num, bufsize, initial in [(0, 5, 5), (1, 5, 5), (7, 100, 100), (100, 10, 3), (333, 64, 64)]:
        items = [object() for _ in range(num)]
        rng = random.Random(num)
        order = shuffle_order(num, bufsize=bufsize, initial=initial, rng=random.Random(num))
        assert [items[i] for i in order] == list(wds.shuffle(bufsize, initial, rng=rng)(iter(items)))


# ---------------------------------------------------------------- a resume

@pytest.mark.parametrize("resampled", [False, True])
def test_a_resume_reads_only_what_remains_of_its_block(tmp_path, bytes_read, resampled):
    spec = _make_set(tmp_path / "set", [50, 50, 50], payload=(2000, 20000))
    urls = [str(tmp_path / "set" / f"{i:05d}.tar") for i in range(3)]
    if resampled:  # resampled mode indexes at start-up only what has an index file: a resume indexes the rest
        for url in urls:
            index_file(url).unlink()
    loader = _loader(spec, num_workers=0, resampled=resampled, shuffle_buffer=20, block_samples=120)
    stream = _stream(loader)
    uninterrupted = []
    for sample, position, after in stream._samples(0, SlotState()):
        uninterrupted.append((f"{sample['__url__']}#{sample['__key__']}", position))
        if after[:2] != (0, 0):  # the next block (of this epoch or the next)
            break
    offset = 97  # those left: the last samples of the block and the ones still in the shuffle buffer
    resumed, bytes_read[:] = [], []
    for sample, position, after in stream._samples(0, SlotState(offset=offset)):
        resumed.append((f"{sample['__url__']}#{sample['__key__']}", position))
        if after[:2] != (0, 0):  # the next block (of this epoch or the next)
            break
    assert resumed == uninterrupted[offset:]
    # What remains: the bytes of the samples left, each from its first header to the end of its last member.
    spans, members = {}, 0
    for url in urls:
        with tarfile.open(url) as tf:
            for m in tf.getmembers():
                key = f"{url}#{m.name.split('.')[0]}"
                spans[key] = (spans.get(key, (m.offset,))[0], m.offset_data + -(-m.size // 512) * 512)
                members += 1
    remaining = sum(spans[key][1] - spans[key][0] for key, _ in resumed)
    # Resampled mode indexes the block's shards from their headers (at most all three: 512 bytes a member).
    headers = 512 * members if resampled else 0
    assert remaining <= sum(bytes_read) <= remaining + headers + 512 * len(resumed), (sum(bytes_read), remaining)


# ---------------------------------------------------------------- reading ranges of damaged shards

def _add(tf: tarfile.TarFile, name: str, data: bytes = b"abc", **info) -> None:
    member = tarfile.TarInfo(name)
    member.size = len(data)
    for key, value in info.items():
        setattr(member, key, value)
    tf.addfile(member, io.BytesIO(data))


def _tar(path: Path, names: list[str], **kwargs) -> Path:
    # GNU headers in latin-1 hold names byte for byte: a name can start like a compressed stream's magic bytes.
    with tarfile.open(path, "w", **{"format": tarfile.GNU_FORMAT, "encoding": "latin-1", **kwargs}) as tf:
        for i, name in enumerate(names):
            if name == "dir":
                _add(tf, "dir", b"", type=tarfile.DIRTYPE)
            else:
                _add(tf, name, bytes([i]) * (100 + 300 * i))
    return path


def _plain(tmp_path: Path) -> Path:
    return _tar(tmp_path / "plain.tar", [f"{k}.{ext}" for k in ("a", "b", "c", "d", "e") for ext in ("jpg", "txt")])


def _cut(path: Path, member: str, *, at: str) -> Path:
    """The tar cut inside `member`: its header, its data, or the padding after its data."""
    with tarfile.open(path) as tf:
        m = tf.getmember(member)
    end = {"header": m.offset + 100, "data": m.offset_data + m.size // 2, "padding": m.offset_data + m.size + 1}[at]
    out = path.with_name(f"{path.stem}-cut-{member}-{at}.tar")
    out.write_bytes(path.read_bytes()[:end])
    return out


def _damaged_shards(tmp_path: Path) -> dict[str, Path]:
    plain = _plain(tmp_path)
    shards = {"plain": plain, "odd": _tar(tmp_path / "odd.tar", [
        "dir", "a.jpg", "a.txt", "__meta__", "sub/__cache__/x.txt", "b.jpg", "noext", "c.jpg", "c.txt", "a.json",
        "d.e.f", "BZh91AY&SYx.jpg", "BZh91AY&SYx.txt", "\x1f\x8b\x08y.jpg", "z.jpg"])}
    for member, at in [("c.txt", "data"), ("c.jpg", "data"), ("c.jpg", "header"), ("e.txt", "padding"),
                       ("a.jpg", "data"), ("b.txt", "header")]:
        shards[f"cut {member} {at}"] = _cut(plain, member, at=at)
    shards["duplicate"] = _tar(tmp_path / "dup.tar", ["a.jpg", "a.txt", "b.jpg", "b.JPG", "b.txt", "c.jpg"])
    shards["clashes with __key__"] = _tar(tmp_path / "key.tar", ["a.jpg", "b.jpg", "b.__key__", "c.jpg"])
    garbage = tmp_path / "garbage.tar"  # a block that is no header mid-archive: tarfile stops there, silently
    with tarfile.open(plain) as tf:
        at = tf.getmember("c.jpg").offset
    garbage.write_bytes(plain.read_bytes()[:at] + b"x" * 512 + plain.read_bytes()[at:])
    shards["garbage"] = garbage
    no_end = tmp_path / "no-end.tar"  # no end-of-archive blocks
    no_end.write_bytes(plain.read_bytes()[:_data_end(str(plain))])
    shards["no end"] = no_end
    return shards


def _items(samples) -> list:
    return [(s.get("__key__"), s.get("__bad__"), sorted((k, v) for k, v in s.items() if not k.startswith("__")))
            for s in samples]


def test_an_indexed_range_reads_what_a_whole_shard_read_gives_it(tmp_path):
    """Every range of every shard, clean or damaged: the samples (or bad-sample reasons) a read from byte 0
    gives, whatever the index leaves to reading the damaged tail."""
    for name, path in _damaged_shards(tmp_path).items():
        url = str(path)
        index = build_index(url)
        assert index is not None, name
        n = len(list(read_shard(url)))
        for start, stop in itertools.combinations_with_replacement(range(n + 3), 2):
            assert _items(read_shard(url, start, stop, index=index)) == _items(read_shard(url, start, stop)), \
                (name, start, stop)
    assert build_index(str(tmp_path / "plain-cut-c.jpg-data.tar")).complete is False
    assert build_index(str(tmp_path / "plain.tar")).complete is True


def test_what_is_not_a_plain_tar_has_no_index(tmp_path):
    plain = _plain(tmp_path)
    gz = tmp_path / "plain.tar.gz"
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    pax = _tar(tmp_path / "pax.tar", ["a.jpg", "a.txt"], format=tarfile.PAX_FORMAT, pax_headers={"comment": "x"})
    for path in (gz, pax, tmp_path / "missing.tar"):
        assert build_index(str(path)) is None
    assert [s["__key__"] for s in read_shard(str(gz), 1, 3)] == ["b", "c"]


def test_prep_writes_the_index_and_a_changed_shard_ignores_it(tmp_path):
    _make_set(tmp_path / "set", [9])
    url = str(tmp_path / "set" / "00000.tar")
    saved = json.loads(index_file(url).read_text())
    assert saved["tar_bytes"] == Path(url).stat().st_size and saved["complete"] is True
    assert saved["offsets"] == list(build_index(url).offsets) == list(load_index(url).offsets)
    with tarfile.open(url) as tf:
        assert saved["offsets"][:-1] == [m.offset for m in tf.getmembers() if m.name.endswith(".jpg")]
    with tarfile.open(url, "a") as tf:  # within the last record's padding: the size stays the same
        _add(tf, "late.jpg")
    assert json.loads(index_file(url).read_text())["tar_bytes"] == Path(url).stat().st_size
    with pytest.warns(UserWarning, match="more members than its index"):
        assert load_index(url) is None
    with tarfile.open(url, "a") as tf:  # past the padding: another size
        _add(tf, "later.jpg", b"x" * 20000)
    with pytest.warns(UserWarning, match="of another size|bytes, this one has"):
        assert load_index(url) is None
    # The shard is then read from its first byte: every sample, the late ones too (counted: 11).
    for written in ("sizes.json", "00000_stats.json"):
        (tmp_path / "set" / written).unlink()
    loader = _loader(url, num_workers=0, shuffle_buffer=0, block_samples=100)
    with pytest.warns(UserWarning):
        keys = [s["__key__"] for s, _, _ in itertools.islice(_stream(loader)._samples(0, SlotState()), 11)]
    assert keys[-2:] == ["late", "later"]


# ---------------------------------------------------------------- start-up

def _loader_sizes(rank: int, world_size: int, spec: str) -> list:
    return _loader(spec, rank=rank, world_size=world_size).plan.sizes


def _loader_error(rank: int, world_size: int, spec: str) -> str:
    try:
        _loader(spec, rank=rank, world_size=world_size)
    except OSError as exn:
        return str(exn)
    return "no error"


def test_remote_shards_are_counted_once_over_2_ranks(tmp_path):
    _make_set(tmp_path / "set", [5, 7, 6])
    log = tmp_path / "opened.log"
    spec = f"pipe:echo opened >> {log} && cat {tmp_path / 'set'}/{{00000..00002}}.tar"
    assert run_ranks(_loader_sizes, world_size=2, args=(spec,)) == [[5, 7, 6]] * 2
    assert log.read_text().count("opened") == 3  # once per shard, on rank 0
    # A shard that cannot be counted stops every rank, not only rank 0 (the other would wait for its counts).
    errors = run_ranks(_loader_error, world_size=2, args=(f"pipe:exit 3::{spec}",), timeout_s=20)
    assert all("exit 3" in error for error in errors), errors
