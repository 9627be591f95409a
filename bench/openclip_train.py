"""Run open_clip's own trainer (open_clip_train.main) with this repo's model configs registered.

open_clip_train only knows registered model names; configs/models/*.json use open_clip's schema, so adding that
folder to open_clip's registry before main() lets `--model tiny-vit-32` (or any of ours) build the same
architecture our trainer builds. Every other argument goes to open_clip_train unchanged:

    bench/.venv-openclip/bin/python bench/openclip_train.py --model tiny-vit-32 --train-data ... [open_clip_train args]
"""
from __future__ import annotations

import sys
from pathlib import Path

MODEL_CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "models"


def run(argv: list[str]):
    import open_clip
    from open_clip_train.main import main

    open_clip.add_model_config(MODEL_CONFIG_DIR)
    return main(argv)


if __name__ == "__main__":
    result = run(sys.argv[1:])
    sys.exit(1 if result == -1 else 0)  # main() returns -1 for "experiment already exists" and similar
