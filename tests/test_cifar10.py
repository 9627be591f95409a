"""CIFAR-10 scaffolding: the committed held-out list, the unpack and split, and the recipe configs."""
import io
import os
import tarfile
from collections import Counter
from pathlib import Path

import pytest

from contrastive.errors import UserError
from contrastive.data_prep import cifar10
from tests.conftest import REPO


def _names_as_in_the_tar() -> dict[str, list[str]]:
    """The tar's layout (see ../shared/data/cifar10/README.md): <class>/0000.jpg .. 4999.jpg."""
    return {c: [f"{i:04d}.jpg" for i in range(cifar10.IMAGES_PER_CLASS)] for c in cifar10.CLASSES}


def test_committed_val_list_is_500_per_class_and_is_what_the_seeded_draw_gives(tmp_path):
    entries = cifar10.read_val_list(cifar10.DEFAULT_VAL_LIST)
    assert len(entries) == 5000 == len(set(entries))
    assert Counter(e.split("/")[0] for e in entries) == {c: 500 for c in cifar10.CLASSES}
    # Redraw it from the same file names: the list in the repo is exactly the documented seeded draw.
    assert cifar10.draw_val_list(_names_as_in_the_tar(), per_class=500, seed=0) == entries
    assert cifar10.draw_val_list(_names_as_in_the_tar(), per_class=500, seed=1) != entries


def test_the_shared_tar_holds_every_listed_file():
    if not cifar10.DEFAULT_TAR.is_file():
        pytest.skip(f"{cifar10.DEFAULT_TAR} is not on this machine")
    with tarfile.open(cifar10.DEFAULT_TAR) as tar:
        names = {m.name for m in tar.getmembers() if m.isfile()}
    listed = {f"{cifar10.TAR_ROOT}/{e}" for e in cifar10.read_val_list(cifar10.DEFAULT_VAL_LIST)}
    assert listed <= names and len(names) == 50000


def _image_folder(root: Path, classes=("cat", "dog", "ship"), per_class=6) -> Path:
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            (root / c / f"{i:04d}.jpg").write_bytes(f"{c}{i}".encode())
    return root


def test_split_puts_listed_files_in_val_and_the_rest_in_train(tmp_path):
    root = _image_folder(tmp_path / "all")
    val = ["cat/0001.jpg", "dog/0000.jpg", "ship/0005.jpg"]
    result = cifar10.split(root, tmp_path / "split", val_list=val)
    assert (result["num_train"], result["num_val"]) == (15, 3)

    def files(part):
        return sorted(str(p.relative_to(tmp_path / "split" / part)) for p in (tmp_path / "split" / part).rglob("*.jpg"))

    assert files("val") == sorted(val)
    everything = sorted(str(p.relative_to(root)) for p in root.rglob("*.jpg"))
    assert sorted(files("train") + files("val")) == everything and not set(files("train")) & set(val)
    # Hard links: the same bytes, no copy.
    linked = tmp_path / "split" / "val" / "cat" / "0001.jpg"
    assert linked.read_bytes() == b"cat1" and os.stat(linked).st_ino == os.stat(root / "cat" / "0001.jpg").st_ino


def test_split_subsets_train_and_rebuilds_only_when_asked_for_something_else(tmp_path):
    root = _image_folder(tmp_path / "all")
    out = tmp_path / "split"
    val = ["cat/0000.jpg"]
    first = cifar10.split(root, out, val_list=val, train_per_class=2)
    assert first["num_train"] == 6
    assert sorted(p.name for p in (out / "train" / "cat").iterdir()) == ["0001.jpg", "0002.jpg"]
    marker_time = (out / cifar10.SPLIT_MARKER).stat().st_mtime_ns
    cifar10.split(root, out, val_list=val, train_per_class=2)  # the same request: nothing rewritten
    assert (out / cifar10.SPLIT_MARKER).stat().st_mtime_ns == marker_time
    again = cifar10.split(root, out, val_list=val)  # a different one: rebuilt, no stale files left
    assert again["num_train"] == 17 and len(list((out / "train").rglob("*.jpg"))) == 17


@pytest.mark.parametrize("lines,message", [
    (["cat/0001.jpg", "cat/0001.jpg"], "names some files twice"),
    (["../etc/passwd"], "not a relative class/file path"),
    (["/abs/x.jpg"], "not a relative class/file path"),
    (["cat/9999.jpg"], "not under"),
])
def test_bad_val_lists_are_refused(tmp_path, lines, message):
    root = _image_folder(tmp_path / "all")
    path = tmp_path / "val.txt"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=message):
        cifar10.split(root, tmp_path / "split", val_list=cifar10.read_val_list(path))
    assert not (tmp_path / "split").exists()  # nothing half-written


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_unpack_once_and_refuse_paths_out_of_the_folder(tmp_path):
    good = _tar(tmp_path / "good.tar.gz", {"cifar10/train/cat/0000.jpg": b"x", "cifar10/train/dog/0000.jpg": b"y"})
    root = cifar10.unpack(good, tmp_path / "work")
    assert root == tmp_path / "work" / "cifar10" / "train" and (root / "dog" / "0000.jpg").read_bytes() == b"y"
    (root / "dog" / "0000.jpg").write_bytes(b"z")
    cifar10.unpack(good, tmp_path / "work")  # already unpacked: left alone
    assert (root / "dog" / "0000.jpg").read_bytes() == b"z"

    evil = _tar(tmp_path / "evil.tar.gz", {"cifar10/train/cat/0000.jpg": b"x", "../escaped.jpg": b"!"})
    with pytest.raises(UserError, match="cannot unpack"):
        cifar10.unpack(evil, tmp_path / "work2")
    assert not (tmp_path / "escaped.jpg").exists()
    with pytest.raises(UserError, match="does not exist"):
        cifar10.unpack(tmp_path / "missing.tar.gz", tmp_path / "work3")


def test_shard_spec_of(tmp_path):
    for i in range(3):
        (tmp_path / f"{i:05d}.tar").write_bytes(b"")
    assert cifar10.shard_spec_of(tmp_path) == f"{tmp_path}/{{00000..00002}}.tar"
    (tmp_path / "00001.tar").unlink()
    with pytest.raises(UserError, match="without gaps"):
        cifar10.shard_spec_of(tmp_path)


@pytest.mark.parametrize("name", ["cifar10.yaml", "cifar10_tiny.yaml"])
def test_recipe_configs_load_and_evaluate_on_the_held_out_split(name):
    from contrastive.config import load_config
    from contrastive.models import get_open_clip_config
    from contrastive.eval.zeroshot import load_templates

    cfg = load_config(REPO / "configs" / name)
    arch = get_open_clip_config(cfg.model.name)
    assert arch["vision_cfg"]["image_size"] == 32
    (evaluator,) = cfg.eval.evaluators
    assert evaluator.data.endswith("/split/val")
    assert evaluator.templates == load_templates("cifar")  # the same 18 prompts `zeroshot --templates cifar` uses
    assert 0 < cfg.train.max_time_s <= 900
