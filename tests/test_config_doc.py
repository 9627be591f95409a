"""README.md's configuration reference is the one contrastive.config_doc generates from the config dataclasses,
and `--check` catches a reference left stale (a field added or removed without regenerating)."""
from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

from contrastive import config as config_module
from contrastive import config_doc

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_reference_is_current():
    assert config_doc.main(["--check", str(README)]) == 0, \
        "README.md's configuration reference is stale: run python -m contrastive.config_doc --write README.md"


def test_reference_lists_every_field():
    # Counted from the dataclasses, not from the generator's own walk: each key appears as a table row.
    text = config_doc.reference()
    for section in dataclasses.fields(config_module.Config):
        for f in dataclasses.fields(section.default_factory()):
            assert f"| `{section.name}.{f.name}` |" in text


def test_check_fails_on_a_missing_row(tmp_path):
    text = README.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| `train.steps` |"))
    stale = tmp_path / "README.md"
    stale.write_text(text.replace(row + "\n", "", 1))
    assert config_doc.main(["--check", str(stale)]) == 1
    assert stale.read_text() != text  # --check never writes
    assert config_doc.main(["--write", str(stale)]) == 0
    assert stale.read_text() == text


def test_check_fails_when_a_field_is_added(tmp_path, monkeypatch):
    # config.py with one field added (and documented) but README.md not regenerated: the generated reference
    # gains exactly that row, and --check on the unchanged README says stale.
    anchor = "    steps: int = 1000\n"
    source = Path(config_module.__file__).read_text()
    assert source.count(anchor) == 1
    patched_file = tmp_path / "config_patched.py"
    patched_file.write_text(source.replace(anchor, anchor + "    # A knob added without regenerating.\n"
                                                             "    new_knob: int = 3\n"))
    spec = importlib.util.spec_from_file_location("contrastive_config_patched", patched_file)
    patched = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, patched)  # dataclasses look their module up while building
    spec.loader.exec_module(patched)

    before = config_doc.reference().splitlines()
    monkeypatch.setattr(config_doc, "config_module", patched)
    # Types defined in the patched module carry its name; the README's carry contrastive.config's.
    after = config_doc.reference().replace(f"{spec.name}.", "contrastive.config.").splitlines()
    assert [line for line in after if line not in before] == \
        ["| `train.new_knob` | `int` | `3` | A knob added without regenerating. |"]
    assert len(after) == len(before) + 1
    assert config_doc.main(["--check", str(README)]) == 1
