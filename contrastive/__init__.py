"""contrastive: CLIP-style contrastive image-text pretraining."""
from __future__ import annotations

import importlib.util
import os
import sys

__version__ = "0.1.0"

# The folders eval/ and data_prep/ sit beside this package in the repository and install as contrastive.eval and
# contrastive.data_prep (pyproject's package-dir mapping; an editable install maps them the same way).
_SUBPACKAGES = ("eval", "data_prep")


class _SourceTreeFinder:
    """Serves contrastive.eval and contrastive.data_prep from the folders beside this package when it is imported
    from a source tree that no install maps: a checkout or worktree on PYTHONPATH, a Slurm job's recorded copy of
    the code (contrastive/slurm.py), so that they import the eval/ and data_prep/ of the same tree."""

    def __init__(self, folders: dict[str, str]):
        self.folders = folders

    def find_spec(self, fullname, path=None, target=None):
        folder = self.folders.get(fullname)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(fullname, os.path.join(folder, "__init__.py"),
                                                      submodule_search_locations=[folder])


def _map_source_tree() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    folders = {f"{__name__}.{name}": os.path.join(root, name) for name in _SUBPACKAGES}
    installed = any(os.path.isdir(os.path.join(here, name)) for name in _SUBPACKAGES)  # a wheel: real subfolders
    if installed or not all(os.path.isfile(os.path.join(f, "__init__.py")) for f in folders.values()):
        return
    if not any(isinstance(f, _SourceTreeFinder) and f.folders == folders for f in sys.meta_path):
        sys.meta_path.insert(0, _SourceTreeFinder(folders))


_map_source_tree()
