"""The open_clip baseline's own virtualenv (bench/.venv-openclip): open_clip_train as its authors pin it.

open_clip 3.3's trainer needs webdataset<=0.2.86 (1.x breaks its tar reader with KeyError 'fname'), while this
project runs on webdataset 1.x, so the baseline gets a separate environment, created on first use:

    python bench/openclip_env.py            # create or check it; prints its python
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
VENV_DIR = BENCH_DIR / ".venv-openclip"
# The same torch as the project's .venv, open_clip_train's own extra, and the webdataset it was written for.
REQUIREMENTS = ("torch==2.14.1", "torchvision==0.29.1", "open_clip_torch[training]==3.3.0", "webdataset<=0.2.86")
MARKER = ".installed"


def venv_python(venv: Path = VENV_DIR) -> Path:
    return venv / "bin" / "python"


def is_ready(venv: Path = VENV_DIR) -> bool:
    marker = venv / MARKER
    return venv_python(venv).is_file() and marker.is_file() and marker.read_text().split("\n") == list(REQUIREMENTS)


def ensure_venv(venv: Path = VENV_DIR, *, base_python: str | None = None, quiet: bool = False) -> Path:
    """Create `venv` with REQUIREMENTS unless it is already complete; returns its python."""
    if is_ready(venv):
        return venv_python(venv)
    base_python = base_python or os.environ.get("OPENCLIP_BASE_PYTHON") or "python3"
    log = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    log(f"creating the open_clip baseline environment in {venv} (a few minutes, once)")
    if not venv_python(venv).is_file():
        subprocess.run([base_python, "-m", "venv", str(venv)], check=True)
    pip = [str(venv_python(venv)), "-m", "pip", "install", "--quiet"]
    subprocess.run(pip + ["--upgrade", "pip"], check=True)
    subprocess.run(pip + list(REQUIREMENTS), check=True)
    check = "import open_clip, open_clip_train.main, webdataset; print(webdataset.__version__)"
    version = subprocess.run([str(venv_python(venv)), "-c", check], check=True, capture_output=True, text=True)
    log(f"open_clip_train ready (webdataset {version.stdout.strip()})")
    (venv / MARKER).write_text("\n".join(REQUIREMENTS))
    return venv_python(venv)


if __name__ == "__main__":
    print(ensure_venv())
