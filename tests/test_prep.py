"""`prep pairs` on messy real-world inputs: every conversion and skip counted exactly, nothing good lost."""
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from contrastive.cli import main
from contrastive.errors import UserError
from contrastive.data_prep.build import BuildOptions
from contrastive.data_prep.images import ImageOptions
from contrastive.data_prep.pairs import prep_pairs


def _photo(width: int, height: int, seed: int) -> Image.Image:
    """A smooth random picture (compresses like a photograph, unlike noise)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(max(2, height // 16), max(2, width // 16), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.BICUBIC)


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _messy_folder(root: Path) -> dict:
    """A folder with one input per problem; returns {file: expected outcome}."""
    root.mkdir(parents=True)
    files: dict[str, tuple[bytes, bytes | None]] = {}
    good = _encode(_photo(96, 64, 0), "JPEG", quality=90)
    files["good.jpg"] = (good, b"a good photo")
    files["good_copy.jpg"] = (good, b"the same bytes again")  # duplicate
    files["good2.png"] = (_encode(_photo(64, 64, 1), "PNG"), "\ufeff  a caption with a BOM\n and spaces ".encode())
    files["gray.png"] = (_encode(_photo(64, 64, 2).convert("L"), "PNG"), b"grey")
    files["gray16.png"] = (_encode(Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 15).astype(np.uint16)),
                                   "PNG"), b"16-bit grey")
    files["cmyk.jpg"] = (_encode(_photo(64, 64, 3).convert("CMYK"), "JPEG"), b"cmyk")
    files["palette.png"] = (_encode(_photo(64, 64, 4).convert("P"), "PNG"), b"palette")
    rgba = _photo(64, 64, 5).convert("RGBA")
    rgba.putalpha(128)
    files["rgba.png"] = (_encode(rgba, "PNG"), b"half transparent")
    rotated = _photo(80, 40, 6)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, displayed portrait (rotate 90 degrees clockwise)
    files["rotated.jpg"] = (_encode(rotated, "JPEG", exif=exif), b"rotated")
    files["huge.jpg"] = (_encode(_photo(2400, 1600, 7), "JPEG", quality=80), b"huge jpeg, decoded at 1/8")
    files["bomb.png"] = (_encode(_photo(1200, 1000, 8), "PNG", compress_level=1), b"huge png")  # > max_pixels
    full = _encode(_photo(64, 64, 9), "JPEG")
    files["truncated.jpg"] = (full[:len(full) // 2], b"cut off")
    files["notes.jpg"] = (b"these are my notes, not a picture", b"not an image")
    files["empty_caption.jpg"] = (_encode(_photo(64, 64, 10), "JPEG"), b"  \n\t ")
    files["latin1.jpg"] = (_encode(_photo(64, 64, 11), "JPEG"), "caf\u00e9".encode("latin-1"))
    files["no_caption.jpg"] = (_encode(_photo(64, 64, 12), "JPEG"), None)
    files["tiny.jpg"] = (_encode(_photo(12, 12, 13), "JPEG"), b"too small")
    files["banner.jpg"] = (_encode(_photo(400, 40, 14), "JPEG"), b"too wide")
    (root / "sub").mkdir()
    files["sub/nested.webp"] = (_encode(_photo(64, 48, 15), "WEBP"), b"nested webp")
    for name, (data, caption) in files.items():
        (root / name).write_bytes(data)
        if caption is not None:
            (root / name).with_suffix(".txt").write_bytes(caption)
    (root / "good.json").write_text(json.dumps({"photographer": "me", "year": 2020}))
    (root / "README.md").write_text("not an input")
    return files


MESSY_OPTIONS = BuildOptions(ImageOptions(image_size=64, resize_mode="border", min_image_size=16, max_aspect_ratio=4,
                                          max_pixels=1_000_000), samples_per_shard=8)
EXPECTED_SKIPS = {"duplicate": 1, "empty_caption": 1, "caption_not_utf8": 1, "missing_caption": 1,
                  "not_an_image": 1, "truncated": 1, "too_large": 1, "too_small": 1, "aspect_ratio": 1}
EXPECTED_CONVERSIONS = {"grayscale": 2, "cmyk": 1, "palette": 1, "alpha": 1, "exif_rotated": 1}
GOOD = {"good.jpg": "a good photo", "good2.png": "a caption with a BOM and spaces", "gray.png": "grey",
        "gray16.png": "16-bit grey", "cmyk.jpg": "cmyk", "palette.png": "palette", "rgba.png": "half transparent",
        "rotated.jpg": "rotated", "huge.jpg": "huge jpeg, decoded at 1/8", "sub/nested.webp": "nested webp"}


def _samples(out: Path) -> dict:
    """{source: (caption, PIL image, json, key)} over all shards."""
    found = {}
    for tar in sorted(out.glob("[0-9][0-9][0-9][0-9][0-9].tar")):
        with tarfile.open(tar) as tf:
            members = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
        for name in members:
            if name.endswith(".jpg"):
                key = name[:-4]
                meta = json.loads(members[f"{key}.json"])
                found[meta["url"]] = (members[f"{key}.txt"].decode(), Image.open(io.BytesIO(members[name])), meta, key)
    return found


def test_messy_folder_counts_every_conversion_and_skip_exactly(tmp_path):
    files = _messy_folder(tmp_path / "in")
    summary = prep_pairs(tmp_path / "in", tmp_path / "out", opts=MESSY_OPTIONS, num_procs=2, progress=False)
    assert summary["skipped"] == EXPECTED_SKIPS
    assert summary["converted"] == EXPECTED_CONVERSIONS
    assert summary["num_inputs"] == len(files) == summary["num_samples"] + sum(EXPECTED_SKIPS.values())
    found = _samples(tmp_path / "out")
    assert {k: v[0] for k, v in found.items()} == GOOD
    for source, (_, img, meta, key) in found.items():
        assert img.mode == "RGB" and img.size == (64, 64)
        assert meta["key"] == key and len(key) == 9
    # EXIF rotation applied: an 80x40 picture displayed as 40x80 fills the middle 32 columns of the square.
    rotated = np.asarray(found["rotated.jpg"][1]).astype(int)
    assert rotated[:, :12].max() < 20 and rotated[:, 18:46].mean() > 40
    assert found["rotated.jpg"][2]["original_width"] == 40 and found["rotated.jpg"][2]["original_height"] == 80
    assert found["huge.jpg"][2]["original_width"] == 2400
    # Transparency is composited on white, not black.
    assert np.asarray(found["rgba.png"][1]).mean() > np.asarray(Image.open(io.BytesIO(files["rgba.png"][0]))
                                                                 .convert("RGB")).mean()
    assert found["good.jpg"][2]["photographer"] == "me"  # the sidecar JSON joins the sample's JSON
    # Every input has a parquet row with its status.
    rows = [r for p in sorted((tmp_path / "out").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    statuses = {r["url"]: r["status"] for r in rows}
    assert statuses["notes.jpg"] == "not_an_image" and statuses["good_copy.jpg"] == "duplicate"
    assert statuses["no_caption.jpg"] == "missing_caption"
    assert sum(s == "success" for s in statuses.values()) == len(GOOD) and len(rows) == len(files)
    sizes = json.loads((tmp_path / "out" / "sizes.json").read_text())
    assert sum(sizes.values()) == len(GOOD) and len(sizes) == 3


def test_tables_give_captions_and_extra_columns(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        (images / f"{i}.jpg").write_bytes(_encode(_photo(48, 48, i), "JPEG"))
    rows = [{"filepath": f"images/{i}.jpg", "title": f"picture {i}", "score": i / 2, "source": "web"}
            for i in range(4)]
    rows.append({"filepath": "images/missing.jpg", "title": "gone", "score": 0.0, "source": "web"})
    (tmp_path / "t.csv").write_text("filepath,title,score,source\n" +
                                    "".join(f"{r['filepath']},{r['title']},{r['score']},{r['source']}\n" for r in rows)
                                    + "images/0.jpg,too,many,fields,here\n")
    (tmp_path / "t.tsv").write_text("path\tcaption\n" + "".join(f"{r['filepath']}\t{r['title']}\n" for r in rows))
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "{broken\n")
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    options = BuildOptions(ImageOptions(image_size=32), samples_per_shard=100, dedup=False)
    expected_skips = {"csv": {"missing_image": 1, "bad_row": 1}, "tsv": {"missing_image": 1},
                      "jsonl": {"missing_image": 1, "bad_row": 1}, "parquet": {"missing_image": 1}}
    for kind, skips in expected_skips.items():
        summary = prep_pairs(tmp_path / f"t.{kind}", tmp_path / f"out_{kind}", opts=options, num_procs=1,
                             progress=False)
        assert summary["skipped"] == skips and summary["num_samples"] == 4, kind
        found = _samples(tmp_path / f"out_{kind}")
        assert sorted(v[0] for v in found.values()) == [f"picture {i}" for i in range(4)]
        if kind != "tsv":
            meta = found["images/3.jpg"][2]
            assert meta["source"] == "web" and float(meta["score"]) == 1.5
    with pytest.raises(UserError, match="no caption column"):
        (tmp_path / "bad.csv").write_text("filepath,words\nimages/0.jpg,hello\n")
        prep_pairs(tmp_path / "bad.csv", tmp_path / "out_bad", opts=options, num_procs=1, progress=False)
    summary = prep_pairs(tmp_path / "bad.csv", tmp_path / "out_named", opts=options, caption_column="words",
                         num_procs=1, progress=False)
    assert summary["num_samples"] == 1


def test_tar_input_refuses_unsafe_members_and_keeps_the_rest(tmp_path):
    archive = tmp_path / "pairs.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))

        for i in range(3):
            add(f"data/{i:03d}.jpg", _encode(_photo(40, 40, i), "JPEG"))
            add(f"data/{i:03d}.txt", f"tar caption {i}".encode())
        add("/etc/evil.jpg", _encode(_photo(40, 40, 9), "JPEG"))
        add("../escape.jpg", _encode(_photo(40, 40, 10), "JPEG"))
        link = tarfile.TarInfo("data/link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
        add("data/late.jpg", _encode(_photo(40, 40, 11), "JPEG"))  # its caption comes later in the archive
        add("data/other.txt", b"caption without image")
        add("data/late.txt", b"late caption")
    before = sorted(os.listdir(tmp_path))
    summary = prep_pairs(archive, tmp_path / "out", opts=BuildOptions(ImageOptions(image_size=32)), num_procs=1,
                         progress=False)
    assert summary["skipped"] == {"unsafe_path": 3, "missing_image": 1}
    found = _samples(tmp_path / "out")
    assert sorted(v[0] for v in found.values()) == ["late caption"] + [f"tar caption {i}" for i in range(3)]
    assert sorted(os.listdir(tmp_path)) == sorted(before + ["out"])  # nothing written outside OUT_DIR
    assert not (tmp_path.parent / "escape.jpg").exists()


def test_rerun_resumes_and_refuses_other_options(tmp_path):
    _messy_folder(tmp_path / "in")
    out = tmp_path / "out"
    prep_pairs(tmp_path / "in", out, opts=MESSY_OPTIONS, num_procs=1, progress=False)
    tars = sorted(out.glob("0000[0-9].tar"))
    mtimes = {t: t.stat().st_mtime_ns for t in tars}
    (out / "00001_stats.json").unlink()  # as if the run had stopped while writing shard 1
    summary = prep_pairs(tmp_path / "in", out, opts=MESSY_OPTIONS, num_procs=1, progress=False)
    assert summary["shards_kept"] == 2 and summary["shards_written"] == 1
    assert summary["skipped"] == EXPECTED_SKIPS
    assert tars[0].stat().st_mtime_ns == mtimes[tars[0]] and tars[2].stat().st_mtime_ns == mtimes[tars[2]]
    other = BuildOptions(ImageOptions(image_size=128), samples_per_shard=8)
    with pytest.raises(UserError, match="other settings \(--image-size, "):
        prep_pairs(tmp_path / "in", out, opts=other, num_procs=1, progress=False)
    # A shard this input does not make (left by an earlier, larger input) is not silently counted.
    (out / "00007_stats.json").write_text((out / "00000_stats.json").read_text())
    with pytest.raises(UserError, match="earlier, larger input"):
        prep_pairs(tmp_path / "in", out, opts=MESSY_OPTIONS, num_procs=1, progress=False)


def test_cli_prep_pairs_reports_and_fails_cleanly(tmp_path, capsys):
    _messy_folder(tmp_path / "in")
    code = main(["prep", "pairs", str(tmp_path / "in"), str(tmp_path / "out"), "--image-size", "32",
                 "--num-procs", "1", "--min-image-size", "16"])
    out = capsys.readouterr().out
    assert code == 0 and "12 samples from 19 inputs" in out and "duplicate=1" in out and "exif_rotated=1" in out
    assert main(["prep", "pairs", str(tmp_path / "nowhere"), str(tmp_path / "out2")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["prep", "pairs", str(tmp_path / "in"), str(tmp_path / "out3"), "--samples-per-shard", "20000"]) == 2


def test_a_damaged_input_archive_stops_with_a_message_and_keeps_finished_shards(tmp_path):
    archive = tmp_path / "pairs.tar"
    with tarfile.open(archive, "w") as tf:
        for i in range(12):
            for name, data in ((f"{i:03d}.jpg", _encode(_photo(40, 40, i), "JPEG")), (f"{i:03d}.txt", b"caption")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    data = archive.read_bytes()
    archive.write_bytes(data[:int(len(data) * 0.7)])
    with pytest.raises(UserError, match="damaged"):
        prep_pairs(archive, tmp_path / "out", opts=BuildOptions(ImageOptions(image_size=32), samples_per_shard=3),
                   num_procs=1, progress=False)
    assert (tmp_path / "out" / "00000_stats.json").is_file() and (tmp_path / "out" / "00001_stats.json").is_file()
