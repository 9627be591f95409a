"""Packaging: eval/ and data_prep/ install as contrastive.eval and contrastive.data_prep, so nothing named `eval` or
`data_prep` lands in site-packages and a user's own eval/ folder cannot shadow ours; a bare copy of the source tree
(a Slurm job's recorded code) imports its own eval/ and data_prep/; the wheel carries the page and the templates."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from tests.conftest import REPO


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def _python(code: str, *, cwd, path_first: str | None = None) -> str:
    argv = [sys.executable, "-c", (f"import sys; sys.path.insert(0, {path_first!r}); " if path_first else "") + code]
    proc = subprocess.run(argv, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip()


def test_a_users_own_eval_folder_does_not_shadow_ours(tmp_path):
    """The issue's reproduction: run from a folder with its own eval/zeroshot.py (and data_prep/), as torchrun, the
    DeepSpeed launcher and the Slurm script start us from the user's working directory."""
    for name in ("eval", "data_prep"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("")
    (tmp_path / "eval" / "zeroshot.py").write_text("raise ImportError('the user eval/ was imported')\n")
    proc = subprocess.run([sys.executable, "-m", "contrastive.cli", "zeroshot", "--help"], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    files = _python("import contrastive.eval.zeroshot as z, contrastive.data_prep.pairs as p; "
                    "print(z.__file__); print(p.__file__)", cwd=tmp_path)
    assert files.splitlines() == [str(REPO / "eval" / "zeroshot.py"), str(REPO / "data_prep" / "pairs.py")]


def test_no_top_level_eval_or_data_prep_is_installed(tmp_path):
    found = _python("import importlib.util as u; print([n for n in ('eval', 'data_prep') if u.find_spec(n)])",
                    cwd=tmp_path)
    assert found == "[]"


def test_a_bare_copy_of_the_source_tree_imports_its_own_subpackages(tmp_path):
    """A Slurm job's recorded code (contrastive/slurm.py): contrastive/, eval/ and data_prep/ copied side by side
    and put first on sys.path import each other from the copy, not from the checkout the venv maps."""
    code = tmp_path / "code"
    for name in ("contrastive", "eval", "data_prep"):
        shutil.copytree(REPO / name, code / name, ignore=shutil.ignore_patterns("__pycache__"))
    files = _python("import contrastive, contrastive.eval.search as s, contrastive.data_prep.pairs as p; "
                    "print(contrastive.__file__); print(s.__file__); print(p.__file__)", cwd=tmp_path,
                    path_first=str(code))
    assert files.splitlines() == [str(code / "contrastive" / "__init__.py"), str(code / "eval" / "search.py"),
                                  str(code / "data_prep" / "pairs.py")]


@pytest.mark.timeout(300)
def test_the_wheel_maps_the_folders_inside_the_package(tmp_path):
    source = tmp_path / "src"  # a copy: setuptools builds in the source tree (build/), which stays clean
    for name in ("contrastive", "eval", "data_prep"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(source)], env=_env(), capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("contrastive-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"contrastive"}, tops
    for needed in ("contrastive/eval/__init__.py", "contrastive/eval/zeroshot.py", "contrastive/eval/web/index.html",
                   "contrastive/eval/templates/cifar.txt", "contrastive/data_prep/pairs.py", "contrastive/cli.py"):
        assert needed in names, needed


def test_without_faiss_the_cli_says_which_extra_to_install(monkeypatch, capsys):
    import argparse

    from contrastive import cli

    def needs_faiss(args):
        import faiss  # noqa: F401 (None in sys.modules: as if no FAISS wheel were installed)

    parser = argparse.ArgumentParser()
    parser.set_defaults(func=needs_faiss, command="search")
    monkeypatch.setitem(sys.modules, "faiss", None)
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    assert cli.main([]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "contrastive[cpu]" in err and "contrastive[gpu]" in err
