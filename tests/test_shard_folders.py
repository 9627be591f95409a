"""A folder of shards (img2dataset's output folder, a CLIP_benchmark split folder) is accepted wherever a shard
spec is: expand_sources lists its .tar files, so training, `index` and the evaluators read it."""
import shutil
import tarfile
from pathlib import Path

import pytest

from contrastive.cli import main
from contrastive.errors import UserError
from contrastive.sharding import expand_sources, shard_sizes


def img2dataset_folder(src: Path, dest: Path, num_shards: int) -> Path:
    """The first shards of a synthetic set as img2dataset leaves them: 00000.tar, 00000.parquet and
    00000_stats.json each, nothing else (no sizes.json, no index files)."""
    dest.mkdir(parents=True)
    for i in range(num_shards):
        for name in (f"{i:05d}.tar", f"{i:05d}.parquet", f"{i:05d}_stats.json"):
            shutil.copy(src / name, dest / name)
    return dest


def tar_keys(paths) -> list[str]:
    """Sample keys in reading order, straight from the tar members."""
    keys = []
    for path in paths:
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key = member.name.rsplit(".", 1)[0] if "." in member.name else member.name
                if not keys or keys[-1] != key:
                    keys.append(key)
    return keys


@pytest.fixture()
def folder(synthetic_data, tmp_path) -> Path:
    return img2dataset_folder(Path(synthetic_data["root"]) / "train", tmp_path / "img2dataset_out", 2)


def test_a_folder_stands_for_its_shards(folder, tmp_path):
    shards = [str(folder / "00000.tar"), str(folder / "00001.tar")]
    assert expand_sources(str(folder)) == [shards]
    assert expand_sources(f"{folder}/::{folder}/00001.tar") == [shards, shards[1:]]
    assert shard_sizes(shards, count_unknown=False) == [128, 128]  # from img2dataset's _stats.json
    # CLIP_benchmark numbers its shards 0.tar, 1.tar, ..., 10.tar: numeric order, not the order of the names.
    split = tmp_path / "cb" / "test"
    split.mkdir(parents=True)
    for i in range(12):
        shutil.copy(folder / "00000.tar", split / f"{i}.tar")
    (split / "nshards.txt").write_text("12\n")
    assert expand_sources(str(split)) == [[str(split / f"{i}.tar") for i in range(12)]]
    with pytest.raises(UserError, match=r"holds no \.tar shards \(its sub-folders test do: name one\)"):
        expand_sources(str(tmp_path / "cb"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no .tar shards$"):
        expand_sources(str(tmp_path / "empty"))


def test_training_reads_every_sample_of_a_folder_once_per_epoch(folder):
    from tests.test_data import _loader

    # Epoch-exact mode needs every shard's size: here they come from img2dataset's _stats.json files.
    loader = _loader(str(folder), resampled=False, batch=32)
    keys = []
    for _, _, batch_keys in loader.batches_with_keys():
        keys += batch_keys
        if len(keys) >= 256:
            break
    expected = [f"{shard}#{key}" for shard in (folder / "00000.tar", folder / "00001.tar") for key in tar_keys([shard])]
    assert len(expected) == 256 and sorted(keys[:256]) == sorted(expected)  # the loader's keys name their shard


def test_index_of_an_img2dataset_folder(folder, tmp_path, capsys):
    from contrastive.eval.embed import read_embeddings
    from tests.test_search import save_random_model

    model = save_random_model(tmp_path / "model", "tiny-vit-32")
    out = tmp_path / "index"
    code = main(["index", "--model", str(model), "--data", str(folder), "--out", str(out), "--batch-size", "64"])
    assert code == 0, capsys.readouterr().err
    _, _, meta = read_embeddings(out)
    assert list(meta["image_path"]) == tar_keys([folder / "00000.tar", folder / "00001.tar"])
