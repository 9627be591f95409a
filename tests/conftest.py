"""Shared fixtures: a small synthetic shard set and a tiny model config, built once per session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> dict:
    """512 training and 128 validation samples at 32 px, in shards of 128."""
    from contrastive.data_prep.synthetic import generate

    out = tmp_path_factory.mktemp("synthetic")
    specs = generate(out, num_samples=512, num_val=128, seed=3, image_size=32, samples_per_shard=128,
                     num_procs=1, progress=False)
    return {"root": out, **specs}


@pytest.fixture()
def tiny_overrides(synthetic_data) -> list[str]:
    """Overrides that turn any run config into a seconds-long CPU run of the tiny model."""
    return [f"data.train={synthetic_data['train']}", f"data.val={synthetic_data['val']}", "model.name=tiny-vit-32",
            "train.batch_size=32", "train.steps=6", "train.log_every=2", "train.checkpoint_every=3",
            "data.num_workers=0", "data.shuffle_buffer=64", "optim.warmup_steps=2", "eval.evaluators=[]"]
